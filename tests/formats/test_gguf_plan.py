"""llama-quantize's type plan (formats/gguf/plan.py) against llama.cpp's own: llama_quant_compute_types
(libllama, src/llama-ext.h) on mock models built from the same facts, for every file type, on model
shapes far beyond the fixtures (1 to 96 layers, GQA, 4 and 8 experts, MLA, tied or not, rows not
divisible by 256, the 70B rule), with llama-quantize's per-tensor options.  (That entry point runs
the plan without an importance matrix; the importance-dependent rules are held to llama-quantize's
files in test_gguf_quantize.py.)"""

from __future__ import annotations

import itertools
import random

import pytest
from gguf import GGMLQuantizationType as T

from minicpm_convert.errors import ConvertError
from minicpm_convert.formats.gguf.plan import (FILE_TYPES, ModelFacts, Options, block_size, file_type, format_report,
                                               make_plan, parse_options, report, sort_key, tensor_type_name)
from tests import llama_cpp_client as client

QUANTIZED = [ft for name, ft in FILE_TYPES.items() if name not in ("f32", "f16", "bf16")]


def tensors(n_layers: int, hidden: int, ff: int, n_expert: int, tied: bool, mla: bool) -> list[tuple[str, tuple[int, ...]]]:
    """A model's GGUF tensors (shape rows-major, row length last) in llama.cpp's file order."""
    out = [("token_embd.weight", (1000, hidden)), ("output_norm.weight", (hidden,))]
    if not tied:
        out.append(("output.weight", (1000, hidden)))
    for i in range(n_layers):
        p = f"blk.{i}."
        if mla:
            out += [(p + "attn_q_a.weight", (hidden // 2, hidden)), (p + "attn_q_b.weight", (hidden, hidden // 2)),
                    (p + "attn_kv_a_mqa.weight", (96, hidden)), (p + "attn_kv_b.weight", (hidden, 64)),
                    (p + "attn_q_a_norm.weight", (hidden // 2,)), (p + "attn_kv_a_norm.weight", (64,))]
        else:
            out += [(p + "attn_q.weight", (hidden, hidden)), (p + "attn_k.weight", (hidden // 4, hidden)),
                    (p + "attn_v.weight", (hidden // 4, hidden))]
        out += [(p + "attn_output.weight", (hidden, hidden)), (p + "attn_norm.weight", (hidden,)),
                (p + "ffn_norm.weight", (hidden,))]
        if n_expert:
            out += [(p + "ffn_gate_inp.weight", (n_expert, hidden)), (p + "ffn_gate_exps.weight", (n_expert, ff, hidden)),
                    (p + "ffn_up_exps.weight", (n_expert, ff, hidden)), (p + "ffn_down_exps.weight", (n_expert, hidden, ff))]
        else:
            out += [(p + "ffn_gate.weight", (ff, hidden)), (p + "ffn_up.weight", (ff, hidden)),
                    (p + "ffn_down.weight", (hidden, ff))]
    return sorted(out, key=lambda t: sort_key(t[0]))


def models():
    rng = random.Random(14)
    yield "minicpm", 40, 36, 36, 0, tensors(40, 2304, 5760, 0, True, False)  # MiniCPM-2B's shapes
    yield "minicpm", 52, 24, 8, 0, tensors(52, 1536, 3840, 0, True, False)  # MiniCPM-1B
    yield "minicpm", 40, 36, 36, 8, tensors(40, 2304, 1408, 8, True, False)  # MiniCPM-MoE-8x2B
    yield "minicpm3", 62, 40, 40, 0, tensors(62, 2560, 6400, 0, False, True)  # MiniCPM3-4B (MLA)
    yield "llama", 80, 64, 8, 0, tensors(80, 512, 1024, 0, False, False)  # the 70B rule (small rows)
    yield "llama", 80, 64, 64, 0, tensors(80, 512, 1024, 0, False, False)  # 80 layers without GQA: not 70B
    yield "falcon", 32, 32, 32, 0, tensors(32, 256, 512, 0, False, False)  # Falcon's own rules
    for _ in range(10):
        n_layers = rng.choice([1, 2, 3, 5, 7, 8, 9, 16, 17, 24, 33, 96])
        n_head, n_head_kv = rng.choice([(8, 8), (8, 2), (32, 4), (16, 8), (12, 3), (40, 40)])
        n_expert = rng.choice([0, 0, 4, 8])
        hidden, ff = rng.choice([(256, 512), (160, 400), (96, 256), (512, 768), (256, 416)])
        arch = rng.choice(["minicpm", "llama"])
        yield arch, n_layers, n_head, n_head_kv, n_expert, tensors(n_layers, hidden, ff, n_expert, rng.random() < 0.5, False)


MODELS = list(models())


def ours(arch, n_layers, n_head, n_head_kv, n_expert, ts, opts: Options) -> list[T]:
    plan = make_plan(ModelFacts(arch, n_layers, n_head, n_head_kv, tuple(ts), n_expert), opts)
    return [t.type for t in plan.tensors]


def theirs(arch, n_layers, n_head, n_head_kv, n_expert, ts, opts: Options) -> list[T]:
    got = client.plan_types(arch, n_layers, n_head, n_head_kv, n_expert, ts, int(opts.file_type.ftype),
                            output_tensor_type=opts.output_tensor_type, token_embedding_type=opts.token_embedding_type,
                            tensor_types=opts.tensor_types, pure=opts.pure, leave_output_tensor=opts.leave_output_tensor)
    return [T(t) for t in got]


def assert_same_plan(model, opts: Options):
    a, b = ours(*model, opts), theirs(*model, opts)
    bad = [(name, x.name, y.name) for (name, _), x, y in zip(model[5], a, b) if x != y]
    assert not bad, f"{model[0]} {model[1]} layers, {opts}: {len(bad)} tensors differ, e.g. {bad[:4]}"


@pytest.mark.parametrize("ft", QUANTIZED + [FILE_TYPES["f16"], FILE_TYPES["bf16"]], ids=lambda f: f.name)
@pytest.mark.parametrize("m", range(len(MODELS)))
def test_plan_matches_llama_cpp(m, ft):
    assert_same_plan(MODELS[m], Options(ft))


OPTION_SETS = [
    dict(pure=True),
    dict(leave_output_tensor=True),
    dict(output_tensor_type=T.Q8_0),
    dict(token_embedding_type=T.Q4_K),
    dict(output_tensor_type=T.F16, token_embedding_type=T.Q8_0),
    dict(tensor_types=(("attn_v", T.Q8_0),)),
    dict(tensor_types=(("ffn_down", T.Q6_K), (r"blk\.1\.", T.Q2_K), ("ffn", T.IQ4_NL))),
    dict(tensor_types=((r"blk\.[0-3]\.attn_(q|k)", T.Q5_0),), pure=True),
    dict(tensor_types=(("token_embd", T.Q8_0), ("output", T.Q5_K))),
]


@pytest.mark.parametrize("ft", [FILE_TYPES[n] for n in ("q4_K_M", "q3_K_S", "q2_K", "iq3_xxs", "iq2_m", "q5_0", "iq4_xs")],
                         ids=lambda f: f.name)
@pytest.mark.parametrize("o", range(len(OPTION_SETS)))
def test_per_tensor_options_match_llama_cpp(o, ft):
    for model in (MODELS[0], MODELS[2], MODELS[3], MODELS[7]):
        opts = Options(ft, **OPTION_SETS[o])
        rows = {s[-1] for _, s in model[5]}
        explicit = [t for t in (opts.output_tensor_type, opts.token_embedding_type) if t is not None]
        if any(r % block_size(t) for r in rows for t in explicit):
            continue  # llama-quantize would write a broken tensor there; we refuse (test below)
        assert_same_plan(model, opts)


def test_explicit_types_that_cannot_fit_are_refused():
    """--output-tensor-type/--token-embedding-type skip llama-quantize's fallback: a row that does
    not fill whole blocks would give a broken tensor in llama.cpp; we refuse it by name."""
    tied = ModelFacts("minicpm", 2, 5, 5, tuple(tensors(2, 160, 400, 0, True, False)))
    untied = ModelFacts("minicpm", 2, 5, 5, tuple(tensors(2, 160, 400, 0, False, False)))
    with pytest.raises(ConvertError, match="token_embd.weight has rows of 160"):
        make_plan(tied, Options(FILE_TYPES["q4_K_M"], token_embedding_type=T.Q4_K))
    with pytest.raises(ConvertError, match="output.weight has rows of 160"):
        make_plan(untied, Options(FILE_TYPES["q4_K_M"], output_tensor_type=T.IQ4_XS))
    make_plan(untied, Options(FILE_TYPES["q4_K_M"], output_tensor_type=T.Q8_0))


def test_importance_rules():
    """The rules that change with an importance matrix (llama.cpp's compute entry point cannot show
    them: it forces has_imatrix off), checked on their own terms."""
    facts = ModelFacts("minicpm", 16, 8, 8, tuple(tensors(16, 256, 512, 0, True, False)))
    types = {}
    for ft in ("iq3_xxs", "iq4_nl", "iq4_xs", "q4_0", "q5_0"):
        for im in (False, True):
            types[ft, im] = make_plan(facts, Options(FILE_TYPES[ft], imatrix=im)).types()
    assert types["iq3_xxs", False]["blk.3.attn_v.weight"] == T.IQ3_S
    assert types["iq3_xxs", True]["blk.3.attn_v.weight"] == T.IQ3_XXS
    assert types["iq3_xxs", False]["blk.0.ffn_down.weight"] == T.Q4_K and types["iq3_xxs", False]["blk.5.ffn_down.weight"] == T.Q3_K
    assert types["iq3_xxs", True]["blk.0.ffn_down.weight"] == T.IQ3_XXS
    for ft in ("iq4_nl", "iq4_xs"):
        assert types[ft, False]["blk.1.ffn_down.weight"] == T.Q5_K and types[ft, True]["blk.1.ffn_down.weight"] != T.Q5_K
    assert types["q4_0", True]["blk.1.ffn_down.weight"] == T.Q4_1 and types["q4_0", False]["blk.1.ffn_down.weight"] == T.Q4_0
    assert types["q5_0", True]["blk.0.ffn_down.weight"] == T.Q5_1 and types["q5_0", True]["blk.2.ffn_down.weight"] == T.Q5_0


def test_types_that_need_an_importance_matrix_are_refused_without_one():
    facts = ModelFacts("minicpm", 4, 4, 4, tuple(tensors(4, 256, 512, 0, True, False)))
    for name in ("iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "q2_K_S"):  # iq3_xs: its attn_q/k are IQ3_XXS
        plan = make_plan(facts, Options(FILE_TYPES[name]))
        assert plan.needs_imatrix, name
        with pytest.raises(ConvertError, match="importance matrix"):
            plan.check()
        make_plan(facts, Options(FILE_TYPES[name], imatrix=True)).check()
    for name in ("q2_K", "q3_K_M", "iq3_s", "iq3_m", "iq4_xs", "q4_K_M", "tq1_0"):
        make_plan(facts, Options(FILE_TYPES[name])).check()
    # token_embd/output are never required to have importance data (llama-imatrix cannot collect them)
    assert all(t.name not in ("token_embd.weight", "output.weight") for t in make_plan(facts, Options(FILE_TYPES["iq2_xxs"])).needs_imatrix)


def test_spellings():
    """--quant accepts llama-quantize's spellings, case-insensitive, and its numbers."""
    for text, name in [("Q4_K_M", "q4_K_M"), ("q4_k_m", "q4_K_M"), ("Q4_K", "q4_K_M"), ("q3_k", "q3_K_M"), ("Q5_K", "q5_K_M"),
                       ("q4km", "q4_K_M"), ("IQ4_XS", "iq4_xs"), ("iq2_m", "iq2_m"), ("15", "q4_K_M"), ("Q2_K_S", "q2_K_S"),
                       ("tq1_0", "tq1_0"), ("F16", "f16"), ("bf16", "bf16"), ("7", "q8_0")]:
        assert file_type(text).name == name, text
    assert file_type("q4_K_X") is None and file_type("iq1_s") is None and file_type("99") is None
    assert tensor_type_name("q8_0") == T.Q8_0 and tensor_type_name("IQ4_nl") == T.IQ4_NL and tensor_type_name("f16") == T.F16
    assert tensor_type_name("mxfp4") is None


def test_parse_options():
    o = parse_options("Q3_K_L", imatrix=True, output_tensor_type="q8_0", token_embedding_type="Q6_K",
                      tensor_types=["ATTN_V=q8_0", r"blk\.0\.=iq4_nl"], pure=True, leave_output_tensor=True)
    assert o.file_type.name == "q3_K_L" and o.imatrix and o.pure and o.leave_output_tensor
    assert (o.output_tensor_type, o.token_embedding_type) == (T.Q8_0, T.Q6_K)
    assert o.tensor_types == (("attn_v", T.Q8_0), (r"blk\.0\.", T.IQ4_NL))  # names lowered, as llama-quantize does
    for bad, match in [(dict(quant="q9_K"), "--quant"), (dict(tensor_types=["attn_v"]), "REGEX=TYPE"),
                       (dict(tensor_types=["attn_v=q9"]), "--tensor-type"), (dict(tensor_types=["(=q8_0"]), "regular"),
                       (dict(output_tensor_type="mxfp4"), "--output-tensor-type")]:
        kw = {"quant": "q4_K_M", **bad}
        with pytest.raises(ConvertError, match=match):
            parse_options(kw.pop("quant"), **kw)


def test_report():
    facts = ModelFacts("minicpm", 2, 5, 5, tuple(tensors(2, 160, 400, 0, True, False)))
    plan = make_plan(facts, Options(FILE_TYPES["q4_K_M"]))
    r = report(plan, header_bytes=1000)
    by = {t["name"]: t for t in r["tensors"]}
    assert by["blk.0.ffn_down.weight"]["type"] == "F16" and "400 columns" in by["blk.0.ffn_down.weight"]["fallback"]
    assert by["blk.0.attn_q.weight"]["type"] == "Q5_0" and "160 columns" in by["blk.0.attn_q.weight"]["fallback"]
    assert by["output_norm.weight"]["how"] == "not quantized"
    assert r["fallbacks"] == len(plan.fallbacks) > 0
    assert r["tensor_bytes"] == sum(t["bytes"] for t in r["tensors"])
    assert r["bits_per_weight"] == pytest.approx(8 * r["tensor_bytes"] / r["weights"], abs=1e-4)
    assert r["file_bytes"] >= 1000 + r["tensor_bytes"]
    text = format_report(r)
    assert "blk.0.ffn_down.weight" in text and "bits per weight" in text
    assert list(itertools.islice((t.name for t in plan.tensors), 2)) == ["output_norm.weight", "token_embd.weight"]
