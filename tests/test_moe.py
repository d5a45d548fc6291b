"""MiniCPM-MoE-8x2B: the reference routing, the Mixtral export in transformers, the GGUF in llama.cpp.

The `moe` fixture: 2 layers, 8 experts, top-2, bf16, tied; experts `mlp.experts.E.w1/w2/w3`,
router `mlp.gate`, config keys `num_experts` / `num_experts_per_tok` as MiniCPM-MoE-8x2B's.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader

from minicpm_convert import reference
from minicpm_convert.families import minicpm_moe as moe
from minicpm_convert.sources.checkpoint import Checkpoint
from minicpm_convert.formats.gguf.plan import FILE_TYPES
from minicpm_convert.verify import compare, prompt_tokens
from tests.conftest import ROOT, run_cli
from tests.requirements import require

NAME = "moe"


# -- the routing -----------------------------------------------------------------------------

def test_route_by_hand():
    """softmax over all experts, top-2, renormalised: weights e/(1+e) and 1/(1+e) for logits 2, 1."""
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    router = torch.tensor([[2.0, 0.0], [1.0, -1.0], [0.0, 1.0], [-1.0, 3.0]])  # logits [2,1,0,-1] and [0,-1,1,3]
    weights, experts = moe.route(h, router, 2)
    e = math.e
    assert experts.tolist() == [[0, 1], [3, 2]]
    torch.testing.assert_close(weights[0], torch.tensor([e / (1 + e), 1 / (1 + e)]))
    torch.testing.assert_close(weights[1], torch.tensor([e ** 2 / (1 + e ** 2), 1 / (1 + e ** 2)]))


def test_moe_mlp_by_hand():
    """Each token's output is the routing-weighted sum of its two experts' SwiGLU outputs."""
    g = torch.Generator().manual_seed(0)
    hidden, inter, n_exp = 4, 3, 4
    h = torch.randn(3, hidden, generator=g)
    router = torch.randn(n_exp, hidden, generator=g) * 2
    experts = [[torch.randn(inter, hidden, generator=g), torch.randn(inter, hidden, generator=g),
                torch.randn(hidden, inter, generator=g)] for _ in range(n_exp)]
    weights = {"mlp.gate.weight": router}
    for i, (wg, wu, wd) in enumerate(experts):
        weights.update({f"mlp.experts.{i}.w1.weight": wg, f"mlp.experts.{i}.w3.weight": wu,
                        f"mlp.experts.{i}.w2.weight": wd})
    asked = []

    class Source:
        def read(self, name):
            if ".experts." in name and name.endswith("w1.weight"):
                asked.append(int(name.split(".")[2]))
            return weights[name]

    got = moe.moe_mlp(h, Source(), "mlp.", 2)
    for t in range(3):
        logits = [float(sum(h[t, j] * router[i, j] for j in range(hidden))) for i in range(n_exp)]
        probs = [math.exp(x) for x in logits]
        probs = [p / sum(probs) for p in probs]
        top = sorted(range(n_exp), key=lambda i: -probs[i])[:2]
        want = torch.zeros(hidden)
        for i in top:
            wg, wu, wd = experts[i]
            act = torch.nn.functional.silu(wg @ h[t]) * (wu @ h[t])
            want += probs[i] / (probs[top[0]] + probs[top[1]]) * (wd @ act)
        torch.testing.assert_close(got[t], want, rtol=1e-5, atol=1e-5)
    assert len(asked) == len(set(asked))  # each used expert read once


def test_fixture_routing_is_not_degenerate(fixture_path, monkeypatch):
    """On the default prompt every layer uses most experts, and the top-2 weights are mixed."""
    src = Checkpoint(fixture_path(NAME))
    assert src.spec.variant == "minicpm-moe"
    assert (src.spec.num_experts, src.spec.num_experts_per_tok) == (8, 2)
    seen = []
    real = moe.route

    def spy(h, router, k):
        weights, experts = real(h, router, k)
        seen.append((weights, experts))
        return weights, experts

    monkeypatch.setattr(moe, "route", spy)
    reference.forward(src, prompt_tokens(src, None, None))
    assert len(seen) == src.spec.num_hidden_layers
    for weights, experts in seen:
        assert len(experts.unique()) >= 6
        assert 0.55 < weights[:, 0].median().item() < 0.95


# -- exports ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exports(tmp_path_factory, fixture_path):
    out = tmp_path_factory.mktemp("moe")
    made = {}

    def make(kind: str, option: str, arch: str = "minicpm"):
        key = (kind, option, arch)
        if key not in made:
            if kind == "llama":
                dest = out / f"llama-{option}"
                code, _, err = run_cli("to-llama", fixture_path(NAME), dest, "--dtype", option, "-q")
            else:
                dest = out / f"{option}-{arch}.gguf"
                code, _, err = run_cli("to-gguf", fixture_path(NAME), dest, "--quant", option, "--arch", arch, "-q")
            assert code == 0, err
            made[key] = dest
        return made[key]
    return make


@pytest.fixture(scope="module")
def source_and_reference(fixture_path):
    src = Checkpoint(fixture_path(NAME))
    tokens = prompt_tokens(src, None, None)
    return src, tokens, reference.forward(src, tokens)


def test_mixtral_layout(exports, fixture_path):
    out = exports("llama", "auto")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["model_type"] == "mixtral"
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"]) == (8, 2)
    assert cfg["tie_word_embeddings"] is False and "router_aux_loss_coef" in cfg
    assert not any(k in cfg for k in ("scale_emb", "scale_depth", "dim_model_base", "num_experts"))
    names = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    assert "model.layers.1.block_sparse_moe.gate.weight" in names
    assert "model.layers.1.block_sparse_moe.experts.7.w2.weight" in names
    assert not any(".mlp." in n for n in names)


def test_mixtral_folding(exports, fixture_path):
    """w2 of every expert carries the residual scale; w1, w3 and the router are untouched."""
    src, out = Checkpoint(fixture_path(NAME)), Checkpoint(exports("llama", "float32"))
    assert out.spec.family == "mixtral" and out.spec.num_experts == 8
    r = src.spec.scale_depth / math.sqrt(src.spec.num_hidden_layers)
    for e in range(8):
        w2 = src.get(f"model.layers.1.mlp.experts.{e}.w2.weight").float() * r
        torch.testing.assert_close(out.get(f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight"), w2, rtol=0, atol=0)
        w1 = src.get(f"model.layers.0.mlp.experts.{e}.w1.weight").float()
        torch.testing.assert_close(out.get(f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"), w1, rtol=0, atol=0)
    torch.testing.assert_close(out.get("model.layers.0.block_sparse_moe.gate.weight"),
                               src.get("model.layers.0.mlp.gate.weight").float(), rtol=0, atol=0)


def test_transformers_mixtral_matches_minicpm_moe_reference(exports, source_and_reference):
    from transformers import MixtralForCausalLM

    _, tokens, want = source_and_reference
    model = MixtralForCausalLM.from_pretrained(exports("llama", "float32"), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        got = model(torch.tensor([tokens])).logits[0]
    m = compare(want, got)
    assert m["rel_err"] < 1e-4, m
    assert m["top1"] == 1.0, m


@pytest.mark.parametrize("arch", ["minicpm", "llama"])
def test_llama_cpp_f32_logits_match_reference(arch, exports, source_and_reference):
    from tests import llama_cpp_client as client

    _, tokens, want = source_and_reference
    m = compare(want, client.logits(exports("gguf", "f32", arch), tokens))
    assert m["rel_err"] < 2e-3, m
    assert m["top1"] == 1.0, m


def _tensors(path):
    return [(t.name, t.tensor_type, tuple(t.shape.tolist()), np.asarray(t.data).view(np.uint8).tobytes())
            for t in GGUFReader(path).tensors]


@pytest.mark.parametrize("arch", ["minicpm", "llama"])
@pytest.mark.parametrize("quant", ["q4_K_M", "q8_0", "q5_K_M", "q4_0", "q6_K", "bf16"])
def test_bytes_identical_to_llama_quantize(quant, arch, exports, tmp_path):
    from tests import llama_cpp_client as client

    theirs = tmp_path / "theirs.gguf"
    client.quantize(exports("gguf", "f32", arch), theirs, int(FILE_TYPES[quant].ftype))
    ours, want = _tensors(exports("gguf", quant, arch)), _tensors(theirs)
    assert [t[0] for t in ours] == [t[0] for t in want], "tensor order differs"
    for (n, qt, shape, data), (_, wqt, wshape, wdata) in zip(ours, want):
        assert (qt, shape) == (wqt, wshape), n
        assert data == wdata, f"{n} ({qt.name}): bytes differ"


@pytest.mark.parametrize("quant", ["q4_K_M", "q8_0"])
def test_llama_cpp_quantized_logits_no_worse_than_llama_cpps_own(quant, exports, source_and_reference, tmp_path):
    from tests import llama_cpp_client as client

    _, tokens, want = source_and_reference
    theirs = tmp_path / "theirs.gguf"
    client.quantize(exports("gguf", "f32"), theirs, int(FILE_TYPES[quant].ftype))
    ours = compare(want, client.logits(exports("gguf", quant), tokens))
    bound = compare(want, client.logits(theirs, tokens))
    assert ours["rel_err"] <= bound["rel_err"] * 1.0001 + 1e-6, (ours, bound)
    assert ours["kl"] <= bound["kl"] * 1.0001 + 1e-9, (ours, bound)
    assert ours["top1"] >= bound["top1"], (ours, bound)


def test_gguf_moe_tensors_and_plan(exports, fixture_path):
    """Stacked experts [n_expert, rows, cols] (ggml ne cols, rows, n_expert), counts, q4_K_M's 8-expert plan."""
    path = exports("gguf", "q4_K_M")
    r = GGUFReader(path)
    kv = {k: f.contents() for k, f in r.fields.items()}
    assert kv["general.architecture"] == "minicpm"
    assert (kv["minicpm.expert_count"], kv["minicpm.expert_used_count"]) == (8, 2)
    assert kv["minicpm.feed_forward_length"] == 512
    types = {t.name: t.tensor_type for t in r.tensors}
    shapes = {t.name: tuple(int(d) for d in t.shape.tolist()) for t in r.tensors}
    for i in range(2):
        b = f"blk.{i}."
        assert shapes[b + "ffn_gate_exps.weight"] == (256, 512, 8)
        assert shapes[b + "ffn_up_exps.weight"] == (256, 512, 8)
        assert shapes[b + "ffn_down_exps.weight"] == (512, 256, 8)
        assert shapes[b + "ffn_gate_inp.weight"] == (256, 8)
        assert types[b + "ffn_gate_inp.weight"] == T.F32  # the router is never quantized
        assert types[b + "attn_k.weight"] == T.Q8_0 and types[b + "attn_v.weight"] == T.Q8_0
        assert types[b + "attn_output.weight"] == T.Q5_K and types[b + "attn_q.weight"] == T.Q4_K
        # layer from the name: use_more_bits(i, 2) holds for layer 1 only (i >= 7*2//8)
        assert types[b + "ffn_down_exps.weight"] == (T.Q6_K if i == 1 else T.Q4_K)
        assert types[b + "ffn_gate_exps.weight"] == T.Q4_K
    assert not any(n.endswith(("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")) for n in types)
    # expert E of the stack is expert E of the checkpoint
    src = Checkpoint(fixture_path(NAME))
    f32 = {t.name: t for t in GGUFReader(exports("gguf", "f32")).tensors}
    stack = np.asarray(f32["blk.1.ffn_down_exps.weight"].data)
    for e in (0, 5):
        np.testing.assert_array_equal(stack[e], src.get(f"model.layers.1.mlp.experts.{e}.w2.weight").float().numpy())


def test_verify_passes_for_every_export(exports, fixture_path, tmp_path):
    paths = [exports("llama", "auto"), exports("llama", "float32"), exports("gguf", "f32"),
             exports("gguf", "q4_K_M"), exports("gguf", "q8_0"), exports("gguf", "f32", "llama")]
    report = tmp_path / "verify.json"
    code, out, err = run_cli("verify", fixture_path(NAME), *paths, "--json", report)
    assert code == 0, out + err
    data = json.loads(report.read_text())
    assert data["passed"] and len(data["exports"]) == len(paths)
    kinds = {e["kind"] for e in data["exports"]}
    assert {"llama-bfloat16", "llama-float32", "gguf-f32", "gguf-q4_K_M"} <= kinds


def test_verify_catches_wrong_routing(exports, fixture_path, tmp_path):
    """A Mixtral export whose router rows are swapped (experts 0 and 1) fails verify."""
    broken = tmp_path / "broken"
    shutil.copytree(exports("llama", "float32"), broken)
    from safetensors.torch import load_file, save_file
    for f in broken.glob("*.safetensors"):
        sd = load_file(f)
        for k in [k for k in sd if k.endswith("block_sparse_moe.gate.weight")]:
            sd[k] = sd[k][[1, 0, *range(2, 8)]].contiguous()
        save_file(sd, f, metadata={"format": "pt"})
    code, out, err = run_cli("verify", fixture_path(NAME), broken)
    assert code == 1, out + err
    assert "tensor 'model.layers.0.block_sparse_moe.gate.weight' (float32)" in out


def test_inspect_names_the_variant(exports, fixture_path):
    code, out, err = run_cli("inspect", fixture_path(NAME))
    assert code == 0, err
    assert "minicpm-moe" in out and "MiniCPM-MoE" in out
    code, out, err = run_cli("inspect", exports("gguf", "q4_K_M"))
    assert code == 0, err
    assert "minicpm.expert_count: 8" in out and "ffn_down_exps.weight" in out


# -- INT4: compressed-tensors per expert, loaded by transformers -----------------------------------
CALIBRATION = ("--calibration", str(ROOT / "tests" / "data" / "calibration.md"))


@pytest.fixture(scope="module")
def int4_exports(tmp_path_factory, fixture_path):
    """to-int4 of the moe fixture, compressed-tensors g64: data-free, and GPTQ on 8 x 128 tokens."""
    out = tmp_path_factory.mktemp("moe-int4")
    made = {}

    def make(how: str):
        if how not in made:
            extra = {"data-free": (), "gptq": (*CALIBRATION, "--samples", "8", "--seq-len", "128")}[how]
            code, _, err = run_cli("to-int4", fixture_path(NAME), out / how, "--format", "compressed-tensors",
                                   "--group-size", "64", "-q", *extra)
            assert code == 0, err
            made[how] = out / how
        return made[how]
    return make


@pytest.mark.parametrize("how", ["data-free", "gptq"])
def test_int4_export_loads_in_transformers_and_passes_verify(how, int4_exports, fixture_path):
    """transformers (MixtralForCausalLM, compressed-tensors building its fused experts from our
    per-expert tensors) gives our reference's logits on the dequantized weights; verify passes."""
    require("compressed_tensors")
    from minicpm_convert.sources.int4 import Int4Source
    from minicpm_convert.verify import verify
    from tests.formats.test_int4 import transformers_logits

    folder = int4_exports(how)
    src = Checkpoint(fixture_path(NAME))
    tokens = prompt_tokens(src, None, None)
    same_weights = compare(reference.forward(Int4Source(folder), tokens), transformers_logits(folder, tokens))
    assert same_weights["rel_err"] < 1e-3, same_weights
    report, = verify(src, [folder], tokens)
    assert report.passed, report.failures
    stored = Checkpoint(folder, validate=False)
    assert stored.get("model.layers.0.block_sparse_moe.gate.weight").dtype == torch.float16  # the router
    assert stored.get("model.layers.1.block_sparse_moe.experts.7.w2.weight_packed").dtype == torch.int32
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == ["lm_head", "re:.*block_sparse_moe.gate$"]
    card = (folder / "README.md").read_text()
    assert "| architecture | `MixtralForCausalLM` |" in card and "every expert's w1/w3/w2" in card


def test_int4_gptq_per_expert_lowers_kl_on_the_calibration_text(int4_exports, fixture_path):
    """GPTQ with each expert's own Hessian (its routed tokens) against the data-free codes, on the
    text it was calibrated on (measured: KL 0.037 -> 0.019)."""
    from pathlib import Path
    from minicpm_convert.verify import text_tokens, verify

    src = Checkpoint(fixture_path(NAME))
    tokens = text_tokens(src, Path(CALIBRATION[1]).read_text())[:1024]
    kl = {how: verify(src, [int4_exports(how)], tokens)[0].text.kl_mean for how in ("data-free", "gptq")}
    assert kl["gptq"] < 0.75 * kl["data-free"], kl
    report = json.loads((int4_exports("gptq") / "quantization_report.json").read_text())
    assert report["method"].startswith("gptq") and "uncalibrated" not in report  # 1024 tokens reach every expert


def test_int4_expert_no_token_reached_is_quantized_data_free(fixture_path, tmp_path):
    """Two calibration tokens route to at most 4 of 8 experts per layer: the others have no
    Hessian, get the data-free codes (not GPTQ's zeros for an input never seen), and are listed."""
    require("compressed_tensors")
    from minicpm_convert.sources.int4 import Int4Source

    code, _, err = run_cli("to-int4", fixture_path(NAME), tmp_path / "o", "--format", "compressed-tensors",
                           "--group-size", "64", "-q", *CALIBRATION, "--samples", "1", "--seq-len", "2")
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "quantization_report.json").read_text())
    missed = report["uncalibrated"]
    assert len(missed) >= 2 * 4 * 3 and all(".block_sparse_moe.experts." in n for n in missed)
    code, _, err = run_cli("to-int4", fixture_path(NAME), tmp_path / "d", "--format", "compressed-tensors",
                           "--group-size", "64", "-q")
    assert code == 0, err
    calibrated, data_free = Int4Source(tmp_path / "o"), Int4Source(tmp_path / "d")
    for name in missed:
        assert torch.equal(calibrated.dequantized(name), data_free.dequantized(name)), name
    code, out, err = run_cli("verify", fixture_path(NAME), tmp_path / "o")
    assert code == 0, out + err


@pytest.mark.parametrize("args, message", [
    ((), "--format gptq: MiniCPM-MoE's experts are exported to INT4 as compressed-tensors only"),
    (("--format", "awq"), "--format awq: MiniCPM-MoE's experts are exported to INT4 as compressed-tensors only"),
    (("--format", "compressed-tensors", *CALIBRATION, "--method", "awq-gptq"),
     "--method awq-gptq: MiniCPM-MoE's post-attention norm also feeds the router"),
])
def test_to_int4_refusals_are_one_line(args, message, fixture_path, tmp_path):
    code, _, err = run_cli("to-int4", fixture_path(NAME), tmp_path / "o", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_bad_top_k_is_refused(fixture_path, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(fixture_path(NAME), bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_experts_per_tok"] = 9
    (bad / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli("to-gguf", bad, tmp_path / "o.gguf")
    assert code == 2 and "num_experts_per_tok" in err
