"""A corpus of broken exports: each made by mutating a correct export in place the way a real bug
breaks a file, each failing verify (exit 1) with a line that names the tensor or the key; and
every correct export of every fixture, variant and type passes."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from minicpm_convert.formats.gguf.layout import unpermute_rows
from tests.conftest import run_cli
from tests.verify import mutate

TOKENS = "1,20,300,400,500,600,700,800,900,1000,1100,1200"
TINY_R = 1.4 / math.sqrt(4)  # tiny's residual scale
TINY_LOGIT = 256 / 64  # tiny's hidden / dim_model_base

EXPORTS = {  # name -> (CLI arguments after SRC OUT, output name)
    "q4_K_M": (["to-gguf", "--quant", "q4_K_M"], "m.gguf"),
    "f16": (["to-gguf", "--quant", "f16"], "m.gguf"),
    "q8_0": (["to-gguf", "--quant", "q8_0"], "m.gguf"),
    "llama-f32": (["to-llama", "--dtype", "float32"], "llama"),
    "llama-bf16": (["to-llama"], "llama"),
    "gptq": (["to-int4", "--group-size", "64"], "int4"),
    "gptq-asym": (["to-int4", "--group-size", "64", "--asym"], "int4"),
    "ct-asym": (["to-int4", "--format", "compressed-tensors", "--asym"], "int4"),
}


@pytest.fixture(scope="module")
def correct(tmp_path_factory, fixture_path):
    root = tmp_path_factory.mktemp("correct")
    made = {}

    def get(kind: str) -> Path:
        if kind not in made:
            args, name = EXPORTS[kind]
            dest = root / kind / name
            code, _, err = run_cli(args[0], fixture_path("tiny"), dest, *args[1:], "-q")
            assert code == 0, err
            made[kind] = dest
        return made[kind]
    return get


@dataclass(frozen=True)
class Broken:
    name: str
    export: str
    mutate: Callable[[Path], None]
    says: str  # the fragment of the failure line that names what is wrong


def _swap_rows(a: np.ndarray, fraction: float) -> None:
    n = max(2, int(len(a) * fraction) // 2 * 2)
    rows = np.arange(n) * (len(a) // n)
    a[rows] = a[rows[np.arange(n) ^ 1]]


def _q4k_double_scales(a: np.ndarray) -> None:
    blocks = a.reshape(-1, 144)  # Q4_K: fp16 d, fp16 dmin, 12 bytes of scales, 128 of nibbles
    d = blocks[:, 0:2].copy().view(np.float16)
    blocks[:, 0:2] = (d * 2).view(np.uint8)


def _q8_negate_one_block(a: np.ndarray) -> None:
    block = a.reshape(-1, 34)[5]  # Q8_0: fp16 d, then 32 int8
    block[0:2] = (-block[0:2].copy().view(np.float16)).view(np.uint8)


def _rope_rows_unpermuted(a: np.ndarray) -> None:
    a[...] = unpermute_rows(torch.from_numpy(a.copy()), 4).numpy()


CASES = [
    Broken("ffn-down-holds-next-layers-data", "q4_K_M",
           lambda p: mutate.gguf_edit_tensor(p, "blk.0.ffn_down.weight", lambda a: a.__setitem__(
               ..., np.asarray(mutate.gguf_tensor(mutate.GGUFReader(p), "blk.1.ffn_down.weight")))),
           "tensor 'blk.0.ffn_down.weight' (Q4_K)"),
    Broken("q4k-super-block-scales-doubled", "q4_K_M",
           lambda p: mutate.gguf_edit_tensor(p, "blk.2.attn_q.weight", _q4k_double_scales),
           "tensor 'blk.2.attn_q.weight' (Q4_K)"),
    Broken("attn-q-rows-in-the-wrong-rope-order", "f16",
           lambda p: mutate.gguf_edit_tensor(p, "blk.1.attn_q.weight", _rope_rows_unpermuted),
           "tensor 'blk.1.attn_q.weight' (F16)"),
    Broken("two-percent-of-embedding-rows-swapped", "f16",
           lambda p: mutate.gguf_edit_tensor(p, "token_embd.weight", lambda a: _swap_rows(a, 0.02)),
           "tensor 'token_embd.weight' (F16)"),
    Broken("q8-block-scale-negated", "q8_0",
           lambda p: mutate.gguf_edit_tensor(p, "blk.0.ffn_up.weight", _q8_negate_one_block),
           "tensor 'blk.0.ffn_up.weight' (Q8_0)"),
    Broken("gptq-scales-times-1.5", "gptq",
           lambda p: mutate.st_edit(p, "model.layers.1.self_attn.q_proj.scales", lambda t: t * 1.5),
           "tensor 'model.layers.1.self_attn.q_proj.weight' (int4-g64-sym)"),
    Broken("gptq-zero-off-by-one", "gptq-asym",
           lambda p: mutate.st_edit(p, "model.layers.0.self_attn.o_proj.qzeros", lambda t: mutate.add_to_nibbles(t, 1)),
           "tensor 'model.layers.0.self_attn.o_proj.weight' (int4-g64-asym)"),
    Broken("gptq-nibbles-reversed", "gptq",
           lambda p: mutate.st_edit(p, "model.layers.0.mlp.gate_proj.qweight", mutate.reverse_nibbles),
           "tensor 'model.layers.0.mlp.gate_proj.weight' (int4-g64-sym)"),
    Broken("compressed-tensors-zero-point-off-by-one", "ct-asym",
           lambda p: mutate.st_edit(p, "model.layers.2.mlp.up_proj.weight_zero_point",
                                    lambda t: mutate.add_to_nibbles(t, 1)),
           "tensor 'model.layers.2.mlp.up_proj.weight' (int4-g128-asym)"),
    Broken("unscaled-head", "llama-f32",
           lambda p: mutate.st_edit(p, "lm_head.weight", lambda t: t * TINY_LOGIT),
           "tensor 'lm_head.weight' (float32)"),
    Broken("unfolded-residual-scale", "llama-f32",
           lambda p: mutate.st_edit(p, "model.layers.2.mlp.down_proj.weight", lambda t: t / TINY_R),
           "tensor 'model.layers.2.mlp.down_proj.weight' (float32)"),
    Broken("unfolded-embedding-scale", "llama-bf16",
           lambda p: mutate.st_edit(p, "model.embed_tokens.weight", lambda t: (t.float() / 12).to(t.dtype)),
           "tensor 'model.embed_tokens.weight' (bfloat16)"),
    Broken("transposed-tensor", "llama-f32",
           lambda p: mutate.st_edit(p, "model.layers.1.self_attn.o_proj.weight", lambda t: t.T),
           "tensor 'model.layers.1.self_attn.o_proj.weight' (float32)"),
    Broken("wrong-rope-theta", "q4_K_M",
           lambda p: mutate.gguf_set(p, "minicpm.rope.freq_base", 20000.0),
           "metadata 'minicpm.rope.freq_base' gives rope_theta 20000"),
    Broken("wrong-eps", "q4_K_M",
           lambda p: mutate.gguf_set(p, "minicpm.attention.layer_norm_rms_epsilon", 1e-6),
           "metadata 'minicpm.attention.layer_norm_rms_epsilon' gives rms_norm_eps 1e-06"),
    Broken("wrong-mup-residual-scale", "q4_K_M",
           lambda p: mutate.gguf_set(p, "minicpm.residual_scale", TINY_R * 1.1),
           "metadata 'minicpm.residual_scale'"),
    Broken("wrong-mup-logit-scale", "q8_0",
           lambda p: mutate.gguf_set(p, "minicpm.logit_scale", 1.0),
           "metadata 'minicpm.logit_scale'"),
    Broken("wrong-bos-id", "q4_K_M",
           lambda p: mutate.gguf_set(p, "tokenizer.ggml.bos_token_id", 2),
           "metadata 'tokenizer.ggml.bos_token_id' is 2"),
    Broken("truncated-vocabulary", "q8_0",
           lambda p: mutate.gguf_rewrite(p, lambda k, v: v[:1000] if k.startswith("tokenizer.ggml.") and
                                         isinstance(v, list) and len(v) > 1000 else v),
           "metadata 'tokenizer.ggml.tokens' holds 1000 tokens"),
    Broken("wrong-head-dim", "llama-f32",
           lambda p: mutate.config_edit(p, head_dim=32, num_attention_heads=8, num_key_value_heads=8),
           "metadata 'head_dim' gives head_dim 32, the source says 64"),
]


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 15 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_broken_export_fails_naming_what_is_wrong(case, correct, fixture_path, tmp_path):
    good = correct(case.export)
    broken = tmp_path / good.name
    (shutil.copytree if good.is_dir() else shutil.copyfile)(good, broken)
    case.mutate(broken)
    code, out, err = run_cli("verify", fixture_path("tiny"), broken, "--tokens", TOKENS)
    assert code == 1, out + err
    lines = [line for line in out.splitlines() if line.startswith(f"FAIL {broken.name}: ")]
    assert any(case.says in line for line in lines), (case.says, lines)


@pytest.mark.parametrize("kind", list(EXPORTS))
def test_the_unbroken_exports_pass(kind, correct, fixture_path):
    code, out, err = run_cli("verify", fixture_path("tiny"), correct(kind), "--tokens", TOKENS)
    assert code == 0, out + err
