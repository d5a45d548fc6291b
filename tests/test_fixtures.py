"""The tiny MiniCPM fixtures: deterministic, self-consistent, MiniCPM-shaped, non-degenerate."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # plain `pytest` does not put the repo root on sys.path
    sys.path.insert(0, str(ROOT))

from fixtures.make_fixtures import (  # noqa: E402
    FIXTURES,
    MINICPM_2B_CONFIG,
    STAMP_FILE,
    TOKENIZER_DIR,
    TOKENIZER_FILES,
    build,
    build_all,
    shard_plan,
    tensor_plan,
    write_checkpoint,
)

# The contract other code relies on (names, sizes, storage, layout).
EXPECTED = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab_extra, dtype, tied, weight files)
    "tiny": (256, 4, 4, 4, 512, 0, torch.bfloat16, True, ["model.safetensors"]),
    "gqa": (256, 2, 8, 2, 512, 0, torch.float16, True, ["model.safetensors"]),
    "untied": (256, 2, 4, 4, 512, 6, torch.float32, False, ["model.safetensors"]),
    "odd": (160, 2, 5, 5, 400, 0, torch.bfloat16, True, ["model.safetensors"]),
    "sharded": (256, 4, 4, 4, 512, 0, torch.bfloat16, True,
                [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)] + ["model.safetensors.index.json"]),
    "bin": (256, 2, 4, 4, 512, 0, torch.bfloat16, True, ["pytorch_model.bin"]),
    "moe": (256, 2, 4, 4, 512, 0, torch.bfloat16, True, ["model.safetensors"]),  # + 8 experts, top-2
}
# The Llama-architecture fixture (MiniCPM5's structure) has a config of its own, checked in
# tests/test_minicpm5.py.
LLAMA_FIXTURES = {"minicpm5"}
MOE = {"moe": (8, 2)}  # name: (num_experts, num_experts_per_tok)
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _sp():
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(TOKENIZER_DIR / "tokenizer.model"))


def _load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            assert s.metadata() == {"format": "pt"}, f
            for k in s.keys():
                assert k not in out, f"{k} in two shards"
                out[k] = s.get_tensor(k)
    for f in sorted(folder.glob("*.bin")):
        sd = torch.load(f, map_location="cpu", weights_only=True)
        assert not set(sd) & set(out)
        out.update(sd)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fixtures_a")
    paths = build_all(root)
    assert set(paths) == set(FIXTURES) == set(EXPECTED) | LLAMA_FIXTURES
    return root


def test_deterministic_across_builds_and_processes(built, tmp_path):
    # second build: a fresh process through the CLI, into another folder
    other = tmp_path / "fixtures_b"
    r = subprocess.run([sys.executable, str(ROOT / "fixtures" / "make_fixtures.py"), "--out", str(other)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    a, b = _digests(built), _digests(other)
    assert a == b
    assert len(a) == sum(len(f.files()) + 1 for f in FIXTURES.values())  # + the stamp
    # nothing left behind (temp folders) and only the fixture folders at top level
    assert sorted(p.name for p in other.iterdir()) == sorted(FIXTURES)

    # building again skips complete fixtures (untouched files) ...
    mtimes = {p: p.stat().st_mtime_ns for p in other.rglob("*") if p.is_file()}
    r = subprocess.run([sys.executable, str(ROOT / "fixtures" / "make_fixtures.py"), "--out", str(other), "tiny"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "up to date" in r.stdout, r.stdout + r.stderr
    assert mtimes == {p: p.stat().st_mtime_ns for p in other.rglob("*") if p.is_file()}
    # ... rebuilds a stale one (stamp mismatch) and --force rebuilds, with the same bytes
    (other / "odd" / STAMP_FILE).write_text("stale\n")
    build("odd", other)
    build("gqa", other, force=True)
    assert _digests(other) == a


def test_tiny_and_sharded_hold_the_same_tensors(built):
    tiny, sharded = _load_state_dict(built / "tiny"), _load_state_dict(built / "sharded")
    assert tiny.keys() == sharded.keys()
    assert all(torch.equal(tiny[k], sharded[k]) for k in tiny)
    files = {f.name for f in (built / "sharded").glob("*.safetensors")}
    assert len(files) == 3


@pytest.mark.parametrize("name", list(EXPECTED))
def test_config_matches_tensors(built, name):
    hidden, layers, heads, kv, inter, extra, dtype, tied, weight_files = EXPECTED[name]
    folder = built / name
    cfg = json.loads((folder / "config.json").read_text())
    n_tokens = _sp().get_piece_size()

    # MiniCPM-2B-sft-bf16's keys and constants
    assert cfg["architectures"] == ["MiniCPMForCausalLM"]
    assert cfg["model_type"] == "minicpm"
    assert cfg["auto_map"]["AutoConfig"] == "configuration_minicpm.MiniCPMConfig"
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_minicpm.MiniCPMForCausalLM"
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert cfg["hidden_act"] == "silu" and cfg["rms_norm_eps"] == 1e-5
    assert cfg["rope_theta"] == 10000.0 and cfg["rope_scaling"] is None
    assert cfg["scale_emb"] == 12 and cfg["scale_depth"] == 1.4 and cfg["dim_model_base"] > 0
    assert cfg["use_cache"] is True and cfg["initializer_range"] > 0 and cfg["max_position_embeddings"] > 0
    assert set(MINICPM_2B_CONFIG) - {"tie_word_embeddings"} <= set(cfg)
    # this fixture's sizes
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["intermediate_size"]) == (hidden, layers, heads, kv, inter)
    assert cfg["vocab_size"] == n_tokens + extra
    assert cfg["torch_dtype"] == DTYPE_NAMES[dtype]
    if tied:
        assert "tie_word_embeddings" not in cfg
    else:
        assert cfg["tie_word_embeddings"] is False
    if name == "tiny":
        assert cfg["dim_model_base"] == 64

    # files
    present = {p.name for p in folder.iterdir()}
    assert present == {"config.json", *TOKENIZER_FILES, *weight_files, STAMP_FILE}
    for f in TOKENIZER_FILES:
        assert _sha256(folder / f) == _sha256(TOKENIZER_DIR / f)

    # tensors: names, shapes, dtype exactly as the config says
    sd = _load_state_dict(folder)
    hd = hidden // heads
    expect = {"model.embed_tokens.weight": (cfg["vocab_size"], hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        expect.update({
            p + "self_attn.q_proj.weight": (heads * hd, hidden),
            p + "self_attn.k_proj.weight": (kv * hd, hidden),
            p + "self_attn.v_proj.weight": (kv * hd, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * hd),
        })
        if name in MOE:  # MiniCPM-MoE: experts w1 (gate), w2 (down), w3 (up), then the router
            n_exp, top_k = MOE[name]
            assert (cfg["num_experts"], cfg["num_experts_per_tok"]) == (n_exp, top_k)
            for e in range(n_exp):
                expect.update({p + f"mlp.experts.{e}.w1.weight": (inter, hidden),
                               p + f"mlp.experts.{e}.w2.weight": (hidden, inter),
                               p + f"mlp.experts.{e}.w3.weight": (inter, hidden)})
            expect[p + "mlp.gate.weight"] = (n_exp, hidden)
        else:
            assert "num_experts" not in cfg
            expect.update({
                p + "mlp.gate_proj.weight": (inter, hidden),
                p + "mlp.up_proj.weight": (inter, hidden),
                p + "mlp.down_proj.weight": (hidden, inter),
            })
        expect.update({
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        })
    expect["model.norm.weight"] = (hidden,)
    if not tied:
        expect["lm_head.weight"] = (cfg["vocab_size"], hidden)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expect
    assert {v.dtype for v in sd.values()} == {dtype}
    assert [s.name for s in tensor_plan(cfg)] == list(expect)
    assert all(torch.isfinite(v.float()).all() for v in sd.values())

    if name == "sharded":
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sd.values())
        assert set(index["weight_map"]) == set(sd)
        from safetensors import safe_open

        for k, fname in index["weight_map"].items():
            with safe_open(str(folder / fname), "pt") as s:
                assert k in s.keys()


def test_weight_statistics(built):
    sd = {k: v.float() for k, v in _load_state_dict(built / "tiny").items()}
    emb = sd["model.embed_tokens.weight"]
    assert 0.05 <= emb.std().item() <= 0.1
    q = sd["model.layers.0.self_attn.q_proj.weight"]
    col = q.abs().amax(0)  # per input channel
    assert (col > 4 * col.median()).sum().item() >= 2, "expected a few outlier input channels"
    for i in range(4):
        w = sd[f"model.layers.{i}.input_layernorm.weight"]
        assert abs(w.mean().item() - 1.0) < 0.05 and 0 < w.std().item() < 0.2

    untied = _load_state_dict(built / "untied")
    n = _sp().get_piece_size()
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.count_nonzero(untied[k][n:]) == 0, "vocab padding rows are zeros"
        assert torch.count_nonzero(untied[k][:n].abs().sum(-1)) == n
    assert not torch.equal(untied["lm_head.weight"], untied["model.embed_tokens.weight"])


def _minicpm_logits(cfg: dict, sd: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Reference MiniCPM forward (float32), written out here on purpose."""
    sd = {k: v.float() for k, v in sd.items()}
    h, n_layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, eps, t = h // heads, cfg["rms_norm_eps"], len(ids)

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    inv = 1.0 / cfg["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.arange(t).float()[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = sd["model.embed_tokens.weight"][ids] * cfg["scale_emb"]
    res = cfg["scale_depth"] / math.sqrt(n_layers)
    mask = torch.full((t, t), float("-inf")).triu(1)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        a = norm(x, sd[p + "input_layernorm.weight"])
        q = rope((a @ sd[p + "self_attn.q_proj.weight"].T).view(t, heads, hd).transpose(0, 1))
        k = rope((a @ sd[p + "self_attn.k_proj.weight"].T).view(t, kv, hd).transpose(0, 1))
        v = (a @ sd[p + "self_attn.v_proj.weight"].T).view(t, kv, hd).transpose(0, 1)
        k, v = k.repeat_interleave(heads // kv, 0), v.repeat_interleave(heads // kv, 0)
        att = ((q @ k.transpose(1, 2)) / math.sqrt(hd) + mask).softmax(-1)
        x = x + res * ((att @ v).transpose(0, 1).reshape(t, h) @ sd[p + "self_attn.o_proj.weight"].T)
        m = norm(x, sd[p + "post_attention_layernorm.weight"])
        act = torch.nn.functional.silu(m @ sd[p + "mlp.gate_proj.weight"].T) * (m @ sd[p + "mlp.up_proj.weight"].T)
        x = x + res * (act @ sd[p + "mlp.down_proj.weight"].T)
    x = norm(x, sd["model.norm.weight"]) / (h / cfg["dim_model_base"])
    return x @ sd.get("lm_head.weight", sd["model.embed_tokens.weight"]).T


@pytest.mark.parametrize("name", ["tiny", "gqa", "untied", "odd"])
def test_logits_are_spread_with_clear_top1(built, name):
    folder = built / name
    cfg = json.loads((folder / "config.json").read_text())
    sd = _load_state_dict(folder)
    n_tokens = _sp().get_piece_size()
    ids = torch.from_numpy(np.random.default_rng(0).integers(3, n_tokens, size=96))
    logits = _minicpm_logits(cfg, sd, ids)
    assert torch.isfinite(logits).all()
    std = logits.std(-1)
    top2 = logits.topk(2, -1).values
    gap = (top2[:, 0] - top2[:, 1]) / std
    top1 = logits.argmax(-1)
    assert 0.8 < std.mean().item() < 3.0  # well spread, not saturated
    assert gap.median().item() > 0.6  # a clear winner at most positions
    assert (top1 == ids).float().mean().item() < 0.5  # not just "repeat the input token"
    assert len(set(top1.tolist())) > 0.75 * len(ids)  # not one token everywhere
    assert (top1 < n_tokens).all()  # never a vocab padding row


def test_sentencepiece_tokenizer():
    """The committed tokenizer has the structure of OpenBMB's MiniCPM-1B/2B SentencePiece model."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    sp = _sp()
    assert 1000 <= sp.get_piece_size() <= 1500
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    m = pb.ModelProto()
    m.ParseFromString((TOKENIZER_DIR / "tokenizer.model").read_bytes())
    ts = m.trainer_spec
    assert ts.model_type == pb.TrainerSpec.BPE
    assert ts.byte_fallback and ts.split_digits
    assert not m.normalizer_spec.add_dummy_prefix  # as OpenBMB's: tokenizer.json prepends "▁" instead
    assert sum(p.type == pb.ModelProto.SentencePiece.BYTE for p in m.pieces) == 256
    # user-defined pieces right after the control ones: markup, single characters (Chinese
    # punctuation among them), reserved tokens
    user = [p.piece for p in m.pieces if p.type == pb.ModelProto.SentencePiece.USER_DEFINED]
    assert [sp.piece_to_id(p) for p in user] == list(range(3, 3 + len(user)))
    assert {"，", "。", "！", "？", "\n", "\t", "<SEP>", "<reserved_0>"} <= set(user)
    assert sum(len(p) == 1 for p in user) >= 30 and "<用户>" not in user

    # As in MiniCPM-2B, the chat tags are plain text (several pieces); user-defined pieces are whole.
    assert sp.decode(sp.encode("<用户>你好<AI>")) == "<用户>你好<AI>"
    assert len(sp.encode("<用户>", out_type=str)) > 1
    assert sp.piece_to_id("<reserved_0>") in sp.encode("a<reserved_0>b")
    assert sp.is_control(1) and not sp.is_unknown(sp.piece_to_id("<reserved_0>"))

    emoji = sp.encode("🤖", out_type=str)
    assert [p for p in emoji if p != "▁"] == ["<0xF0>", "<0x9F>", "<0xA4>", "<0x96>"]
    assert sp.decode(sp.encode("🤖 ok 你好 12345")) == "🤖 ok 你好 12345"
    assert [p for p in sp.encode("2024", out_type=str) if p != "▁"] == ["2", "0", "2", "4"]
    assert sp.unk_id() not in sp.encode("任何文字 any text ✓ 🙂 Ω")


def test_tokenizer_json_is_built_as_openbmbs():
    """tokenizer_json.build reproduces OpenBMB's MiniCPM-1B tokenizer.json byte for byte from its
    tokenizer.model (the real files in ../shared), and the fixture's is built by the same code."""
    sys.path.insert(0, str(TOKENIZER_DIR))
    from tokenizer_json import build, dumps

    from tests.requirements import shared_data

    real = shared_data("minicpm-1b-tokenizer")
    assert dumps(build(real / "tokenizer.model")) == (real / "tokenizer.json").read_text(encoding="utf-8")
    assert dumps(build(TOKENIZER_DIR / "tokenizer.model")) == (TOKENIZER_DIR / "tokenizer.json").read_text(
        encoding="utf-8")


@pytest.mark.parametrize("name", ["tiny", "untied"])
def test_autotokenizer_loads(built, name):
    from transformers import AutoTokenizer

    cfg = json.loads((built / name / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(built / name), trust_remote_code=False)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert len(tok) == _sp().get_piece_size() <= cfg["vocab_size"]
    ids = tok.encode("<用户>你好<AI>")
    assert ids[0] == 1 and ids[-1] != 2  # add_bos_token true, add_eos_token false
    from tokenizers import Tokenizer

    assert tok.decode(ids, skip_special_tokens=True) == "<用户>你好<AI>"
    reference = Tokenizer.from_file(str(built / name / "tokenizer.json"))
    assert tok.encode("hello 12345，你好") == reference.encode("hello 12345，你好").ids
    chat = tok.apply_chat_template(
        [{"role": "user", "content": " 你好 "}, {"role": "assistant", "content": "你好！"},
         {"role": "user", "content": "1+1?"}],
        tokenize=False, add_generation_prompt=True,
    )
    assert chat == "<用户>你好<AI>你好！<用户>1+1?<AI>"


def test_write_checkpoint_generic(tmp_path):
    from fixtures.make_fixtures import make_config

    cfg = make_config(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=96, vocab_size=300, torch_dtype=torch.float16, dim_model_base=16)
    files = write_checkpoint(tmp_path / "a", cfg, torch.float16, shards=2, fmt="bin", seed=3)
    assert files == ["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
                     "pytorch_model.bin.index.json"]
    write_checkpoint(tmp_path / "b", cfg, torch.float16, shards=2, fmt="bin", seed=3)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    index = json.loads((tmp_path / "a" / "pytorch_model.bin.index.json").read_text())
    sd = _load_state_dict(tmp_path / "a")
    assert set(index["weight_map"]) == set(sd) == {s.name for s in tensor_plan(cfg)}
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for v in sd.values())
    # a different seed gives different values; sharding does not change them
    write_checkpoint(tmp_path / "c", cfg, torch.float16, seed=4)
    write_checkpoint(tmp_path / "d", cfg, torch.float16, seed=3)
    c, d = _load_state_dict(tmp_path / "c"), _load_state_dict(tmp_path / "d")
    assert not torch.equal(c["model.norm.weight"], d["model.norm.weight"])
    assert all(torch.equal(d[k], sd[k]) for k in sd)
    with pytest.raises(ValueError):
        shard_plan(tensor_plan(cfg), 1000, 2)


def test_minicpm_2b_plan():
    plan = tensor_plan(MINICPM_2B_CONFIG)
    n = sum(s.numel for s in plan)
    assert len(plan) == 1 + 40 * 9 + 1
    assert 2.7e9 < n < 2.8e9  # about 5.4 GB in bf16
    groups = shard_plan(plan, 3, 2)
    sizes = [sum(s.numel * 2 for s in g) for g in groups]
    assert max(sizes) < 2.0e9
