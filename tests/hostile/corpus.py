"""A corpus of broken and hostile inputs, each made from a fixture into a temporary folder.

Every `Case` builds one bad input (a checkpoint folder, or an export for `verify`) and states
the one-line error every command that reads it must print. Nothing here is checked in: the
files are made by the tests, from the deterministic fixtures.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

# Commands that read a source checkpoint (SRC), and those that read an export.
SOURCE_COMMANDS = ("to-llama", "to-gguf", "to-int4", "inspect", "verify-src")
OPEN_ONLY = ("to-llama", "to-gguf", "to-int4", "inspect", "verify-src")
DATA_COMMANDS = ("to-llama", "to-gguf", "to-int4", "verify-src")  # inspect does not read tensor data
EXPORT_COMMANDS = ("verify-export", "inspect")
GGUF_WRITERS = ("to-gguf",)

MARKER = "PWNED_MARKER"  # a hostile pickle would create this file next to the checkpoint


@dataclass
class Ctx:
    """What a case builder gets: a scratch folder and the fixtures / good exports."""

    tmp: Path
    fixture: Callable[[str], Path]
    good: Callable[[str], Path]  # "gguf" | "int4" | "awq" | "llama": a valid export of tiny

    def copy(self, name: str = "tiny") -> Path:
        dest = self.tmp / "src"
        shutil.copytree(self.fixture(name), dest)
        return dest


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Ctx], Path]  # returns the bad input (SRC folder, or export path)
    error: str  # a substring the one stderr line must contain
    names: str  # the file, tensor or key the line must name
    commands: tuple[str, ...] = SOURCE_COMMANDS
    marker: bool = False  # the case is a code-running pickle: assert MARKER never appears
    extra: dict = field(default_factory=dict)


# -- safetensors surgery ----------------------------------------------------------------------

def read_st(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(path: Path, header: dict | bytes, data: bytes) -> None:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)


def edit_header(fn: Callable[[dict], None], file: str = "model.safetensors"):
    def build(ctx: Ctx) -> Path:
        src = ctx.copy()
        header, data = read_st(src / file)
        fn(header)
        write_st(src / file, header, data)
        return src
    return build


def edit_tensors(fn: Callable[[dict], None], base: str = "tiny", file: str = "model.safetensors"):
    def build(ctx: Ctx) -> Path:
        from safetensors.torch import load_file, save_file
        src = ctx.copy(base)
        tensors = load_file(src / file)
        fn(tensors)
        save_file(tensors, src / file, metadata={"format": "pt"})
        return src
    return build


def edit_config(fn: Callable[[dict], None]):
    def build(ctx: Ctx) -> Path:
        src = ctx.copy()
        cfg = json.loads((src / "config.json").read_text())
        fn(cfg)
        (src / "config.json").write_text(json.dumps(cfg))
        return src
    return build


def write_file(name: str, content: bytes, base: str = "tiny"):
    def build(ctx: Ctx) -> Path:
        src = ctx.copy(base)
        (src / name).write_bytes(content)
        return src
    return build


def truncate(name: str, keep: Callable[[int], int], base: str = "tiny"):
    def build(ctx: Ctx) -> Path:
        src = ctx.copy(base)
        raw = (src / name).read_bytes()
        (src / name).write_bytes(raw[:keep(len(raw))])
        return src
    return build


def edit_index(fn: Callable[[dict, Path], None]):
    def build(ctx: Ctx) -> Path:
        src = ctx.copy("sharded")
        index = json.loads((src / "model.safetensors.index.json").read_text())
        fn(index, src)
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
        return src
    return build


def _header_len_huge(ctx: Ctx) -> Path:
    src = ctx.copy()
    with open(src / "model.safetensors", "r+b") as f:
        f.write((1 << 40).to_bytes(8, "little"))
    return src


def _header_not_json(ctx: Ctx) -> Path:
    src = ctx.copy()
    header, data = read_st(src / "model.safetensors")
    blob = json.dumps(header).encode()
    write_st(src / "model.safetensors", b"\x00\xffnot json" + blob[10:], data)
    return src


def _header_not_object(ctx: Ctx) -> Path:
    src = ctx.copy()
    write_st(src / "model.safetensors", b"[1, 2, 3]", b"")
    return src


NAN_CONFIG = (b'{"model_type": "minicpm", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, '
              b'"intermediate_size": 512, "vocab_size": 1499, "rms_norm_eps": NaN}')


def _overlap(h: dict) -> None:
    a, b = h["model.layers.0.input_layernorm.weight"], h["model.layers.0.post_attention_layernorm.weight"]
    b["data_offsets"] = [a["data_offsets"][0] + 2, a["data_offsets"][1] + 2]


def _past_end(h: dict) -> None:
    entry = h["model.norm.weight"]
    size = entry["data_offsets"][1] - entry["data_offsets"][0]
    entry["data_offsets"] = [10 ** 9, 10 ** 9 + size]


def _duplicate(ctx: Ctx) -> Path:
    from safetensors.torch import load_file, save_file
    src = ctx.copy("sharded")
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    first = load_file(src / index["model.embed_tokens.weight"])
    other = next(f for f in sorted(set(index.values())) if f != index["model.embed_tokens.weight"])
    tensors = load_file(src / other)
    tensors["model.embed_tokens.weight"] = first["model.embed_tokens.weight"]
    save_file(tensors, src / other, metadata={"format": "pt"})
    return src


def _vocab_smaller_than_tokenizer(ctx: Ctx) -> Path:
    """A consistent checkpoint (embedding 1400 rows) whose tokenizer.model has 1499 pieces."""
    from fixtures.make_fixtures import FIXTURES, copy_tokenizer_files, write_checkpoint
    src = ctx.tmp / "src"
    fx = FIXTURES["tiny"]
    cfg = fx.config(1400)
    cfg["num_hidden_layers"] = 1
    write_checkpoint(src, cfg, torch.bfloat16, seed=7)
    copy_tokenizer_files(src)
    return src


def _odd_q_proj(t: dict) -> None:
    t["model.layers.1.self_attn.q_proj.weight"] = t["model.layers.1.self_attn.q_proj.weight"][:128].clone()


def _set(t: dict, name: str, value: float) -> None:
    t[name] = t[name].clone()
    t[name].view(-1)[5] = value


# -- pickles that would run code ----------------------------------------------------------------

class _RunsShell:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _OpensFile:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import builtins
        return builtins.open, (self.marker, "w")


def _evil_zip(ctx: Ctx) -> Path:
    src = ctx.copy("bin")
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    state["model.norm.weight"] = _RunsShell(str(src / MARKER))
    torch.save(state, src / "pytorch_model.bin")
    return src


def _evil_legacy(ctx: Ctx) -> Path:
    src = ctx.copy("bin")
    (src / "pytorch_model.bin").write_bytes(pickle.dumps({"model.norm.weight": _OpensFile(str(src / MARKER))},
                                                          protocol=2))
    return src


def _not_tensors(ctx: Ctx) -> Path:
    src = ctx.copy("bin")
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    state["model.norm.weight"] = [1.0, 2.0]
    torch.save(state, src / "pytorch_model.bin")
    return src


# -- exports for verify ----------------------------------------------------------------------

def _gguf_copy(ctx: Ctx) -> Path:
    out = ctx.tmp / "export.gguf"
    shutil.copyfile(ctx.good("gguf"), out)
    return out


def gguf_cut(fraction: float):
    def build(ctx: Ctx) -> Path:
        out = _gguf_copy(ctx)
        raw = out.read_bytes()
        out.write_bytes(raw[:int(len(raw) * fraction)])
        return out
    return build


def _gguf_magic(ctx: Ctx) -> Path:
    out = _gguf_copy(ctx)
    with open(out, "r+b") as f:
        f.write(b"GGML")
    return out


def gguf_field(key: str, value: int):
    def build(ctx: Ctx) -> Path:
        from gguf import GGUFReader
        out = _gguf_copy(ctx)
        reader = GGUFReader(out, "r+")
        f = reader.fields[key]
        f.parts[f.data[0]][0] = value
        reader.data.flush()
        del reader
        return out
    return build


def _int4_no_scales(ctx: Ctx) -> Path:
    from safetensors.torch import load_file, save_file
    out = ctx.tmp / "int4"
    shutil.copytree(ctx.good("int4"), out)
    for shard in out.glob("*.safetensors"):
        tensors = {k: v for k, v in load_file(shard).items() if not k.endswith(".scales")}
        save_file(tensors, shard, metadata={"format": "pt"})
    index = out / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v for k, v in data["weight_map"].items() if not k.endswith(".scales")}
        index.write_text(json.dumps(data))
    return out


def awq_tensor(suffix: str, edit: Callable[[torch.Tensor], torch.Tensor]):
    """A valid AWQ export of tiny with layer 0's q_proj tensor `suffix` replaced by edit(it)."""
    def build(ctx: Ctx) -> Path:
        from safetensors.torch import load_file, save_file
        out = ctx.tmp / "awq"
        shutil.copytree(ctx.good("awq"), out)
        name = f"model.layers.0.self_attn.q_proj.{suffix}"
        for shard in out.glob("model-*.safetensors"):
            tensors = load_file(shard)
            if name in tensors:
                tensors[name] = edit(tensors[name]).contiguous()
                save_file(tensors, shard, metadata={"format": "pt"})
        return out
    return build


def awq_config(key: str, value):
    def build(ctx: Ctx) -> Path:
        out = ctx.tmp / "awq"
        shutil.copytree(ctx.good("awq"), out)
        config = json.loads((out / "config.json").read_text())
        config["quantization_config"][key] = value
        (out / "config.json").write_text(json.dumps(config))
        return out
    return build


def _llama_nan(ctx: Ctx) -> Path:
    from safetensors.torch import load_file, save_file
    out = ctx.tmp / "llama"
    shutil.copytree(ctx.good("llama"), out)
    shard = sorted(out.glob("*.safetensors"))[0]
    tensors = load_file(shard)
    _set(tensors, "model.norm.weight", float("nan"))
    save_file(tensors, shard, metadata={"format": "pt"})
    return out


ST = "model.safetensors"
EMB = "model.embed_tokens.weight"

CASES: list[Case] = [
    # safetensors container
    Case("st-truncated-prefix", truncate(ST, lambda n: 5), "truncated safetensors file", ST),
    Case("st-truncated-in-header", truncate(ST, lambda n: 2000), "runs past the end of the file", ST),
    Case("st-truncated-in-data", truncate(ST, lambda n: n - 1000), "data runs past the end of the file", ST),
    Case("st-header-length-huge", _header_len_huge, "header length 1099511627776 runs past the end", ST),
    Case("st-header-not-json", _header_not_json, "safetensors header is not valid JSON", ST),
    Case("st-header-not-object", _header_not_object, "safetensors header is not a JSON object", ST),
    Case("st-unknown-dtype", edit_header(lambda h: h[EMB].update(dtype="Q4")), "unknown dtype 'Q4'", EMB),
    Case("st-bad-shape", edit_header(lambda h: h[EMB].update(shape=[-1, 256])),
         "is not a list of non-negative integers", EMB),
    Case("st-shape-overflows", edit_header(lambda h: h["model.norm.weight"].update(shape=[2 ** 32, 2 ** 32],
                                                                                   data_offsets=[0, 0])),
         "needs", "model.norm.weight"),
    Case("st-span-disagrees", edit_header(lambda h: h[EMB].update(shape=[1499, 255])),
         "needs", EMB),
    Case("st-offsets-overlap", edit_header(_overlap), "overlap in the data section", "post_attention_layernorm"),
    Case("st-offsets-past-end", edit_header(_past_end), "data runs past the end of the file", "model.norm.weight"),
    # index and shards
    Case("index-missing-shard", edit_index(lambda i, s: i["weight_map"].update({EMB: "model-00009-of-00009.safetensors"})),
         "does not exist", "model-00009-of-00009.safetensors"),
    Case("index-parent-path", edit_index(lambda i, s: i["weight_map"].update({EMB: "../evil.safetensors"})),
         "points outside the checkpoint folder", "../evil.safetensors"),
    Case("index-absolute-path", edit_index(lambda i, s: i["weight_map"].update({EMB: "/etc/passwd"})),
         "points outside the checkpoint folder", "/etc/passwd"),
    Case("index-not-json", lambda ctx: (lambda s: ((s / "model.safetensors.index.json").write_text("{oops"), s)[1])(
        ctx.copy("sharded")), "not valid JSON", "model.safetensors.index.json"),
    Case("index-no-weight-map", edit_index(lambda i, s: i.pop("weight_map")), "missing or empty 'weight_map'",
         "model.safetensors.index.json"),
    Case("tensor-in-two-shards", _duplicate, "is stored twice", EMB),
    # config.json
    Case("config-not-json", write_file("config.json", b"{\"hidden_size\": 256,"), "not valid JSON", "config.json"),
    Case("config-not-object", write_file("config.json", b"[256, 4]"), "expected a JSON object", "config.json"),
    Case("config-wrong-type", edit_config(lambda c: c.update(hidden_size="256")), "must be an integer", "hidden_size"),
    Case("config-bool-size", edit_config(lambda c: c.update(num_hidden_layers=True)), "must be an integer",
         "num_hidden_layers"),
    Case("config-zero-layers", edit_config(lambda c: c.update(num_hidden_layers=0)), "must be positive",
         "num_hidden_layers"),
    Case("config-negative-size", edit_config(lambda c: c.update(intermediate_size=-512)), "must be positive",
         "intermediate_size"),
    Case("config-missing-key", edit_config(lambda c: c.pop("hidden_size")), "missing key", "hidden_size"),
    Case("config-heads-do-not-divide", edit_config(lambda c: c.update(num_attention_heads=3)),
         "not divisible by num_attention_heads 3", "hidden_size"),
    Case("config-kv-heads-do-not-divide", edit_config(lambda c: c.update(num_key_value_heads=3)),
         "not divisible by num_key_value_heads 3", "num_attention_heads"),
    Case("config-nan-eps", write_file("config.json", NAN_CONFIG), "must be positive", "rms_norm_eps"),
    Case("config-billion-layers", edit_config(lambda c: c.update(num_hidden_layers=10 ** 9)),
         "missing tensor 'model.layers.4.input_layernorm.weight'", "num_hidden_layers"),
    Case("config-unknown-model-type", edit_config(lambda c: c.update(model_type="gpt2")), "unknown model_type 'gpt2'",
         "config.json"),
    Case("vocab-disagrees-with-embedding", edit_config(lambda c: c.update(vocab_size=1500)),
         "config.json implies [1500, 256]", EMB),
    Case("tokenizer-more-pieces-than-vocab", _vocab_smaller_than_tokenizer, "has 1499 pieces but config.json vocab_size is 1400",
         "tokenizer.model"),
    Case("tokenizer-corrupt", write_file("tokenizer.model", b"\x0a\xff\xff\xff\xff\x0fgarbage" * 10),
         "not a valid SentencePiece model", "tokenizer.model"),
    # tensor set
    Case("tensor-missing", edit_tensors(lambda t: t.pop("model.layers.2.mlp.up_proj.weight")), "missing tensor",
         "model.layers.2.mlp.up_proj.weight"),
    Case("tensor-unexpected", edit_tensors(lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(256)})),
         "unexpected tensor", "model.layers.0.self_attn.q_proj.bias"),
    Case("tensor-shape-disagrees", edit_tensors(_odd_q_proj), "has shape [128, 256], config.json implies [256, 256]",
         "model.layers.1.self_attn.q_proj.weight"),
    Case("no-weights", lambda ctx: (lambda s: ((s / ST).unlink(), s)[1])(ctx.copy()), "no weights found", "src"),
    Case("weight-nan", edit_tensors(lambda t: _set(t, EMB, float("nan"))), "contains NaN", EMB,
         commands=DATA_COMMANDS),
    Case("weight-inf", edit_tensors(lambda t: _set(t, "model.layers.0.self_attn.q_proj.weight", float("-inf"))),
         "contains Inf", "model.layers.0.self_attn.q_proj.weight", commands=DATA_COMMANDS),
    # pytorch_model.bin
    Case("bin-pickle-runs-shell", _evil_zip, "refused to load", "pytorch_model.bin", marker=True),
    Case("bin-legacy-pickle-opens-file", _evil_legacy, "refused to load", "pytorch_model.bin", marker=True),
    Case("bin-truncated", truncate("pytorch_model.bin", lambda n: n // 2, base="bin"), "not a readable PyTorch checkpoint",
         "pytorch_model.bin"),
    Case("bin-not-tensors", _not_tensors, "expected a state dict of named tensors", "pytorch_model.bin"),
    # exports given to verify (SRC is the good tiny fixture)
    Case("gguf-truncated-header", gguf_cut(0.003), "truncated or corrupt GGUF file", "export.gguf",
         commands=EXPORT_COMMANDS),
    Case("gguf-truncated-data", gguf_cut(0.6), "truncated or corrupt GGUF file", "export.gguf",
         commands=EXPORT_COMMANDS),
    Case("gguf-empty", gguf_cut(0.0), "truncated or corrupt GGUF file", "export.gguf", commands=("verify-export",)),
    Case("gguf-wrong-magic", _gguf_magic, "not a GGUF file", "export.gguf", commands=("verify-export",)),
    Case("gguf-shape-disagrees-with-metadata", gguf_field("minicpm.feed_forward_length", 1024),
         "has shape [512, 256], the metadata implies [1024, 256]", "blk.0.ffn_gate.weight", commands=EXPORT_COMMANDS),
    Case("gguf-block-count-disagrees", gguf_field("minicpm.block_count", 5), "missing tensor 'blk.4.",
         "export.gguf", commands=EXPORT_COMMANDS),
    Case("gguf-zero-heads", gguf_field("minicpm.attention.head_count", 0), "must be positive",
         "minicpm.attention.head_count", commands=EXPORT_COMMANDS),
    Case("int4-missing-scales", _int4_no_scales, "missing tensor", ".scales", commands=("verify-export",)),
    # AWQ (AutoAWQ GEMM): qweight is [in, out/8] (tiny: [256, 32]); GPTQ's [in/8, out] is refused
    Case("awq-qweight-gptq-shape", awq_tensor("qweight", lambda t: t.reshape(32, 256)),
         "has shape [32, 256], expected [256, 32]", "model.layers.0.self_attn.q_proj.qweight",
         commands=EXPORT_COMMANDS),
    Case("awq-qzeros-float", awq_tensor("qzeros", lambda t: t.float()), "is torch.float32, expected torch.int32",
         "model.layers.0.self_attn.q_proj.qzeros", commands=EXPORT_COMMANDS),
    Case("awq-scales-missing-group", awq_tensor("scales", lambda t: t[:1]), "has shape [1, 256], expected [2, 256]",
         "model.layers.0.self_attn.q_proj.scales", commands=EXPORT_COMMANDS),
    Case("awq-zero-point-false", awq_config("zero_point", False), "AWQ with zero_point=False", "config.json",
         commands=EXPORT_COMMANDS),
    Case("awq-version-gemv", awq_config("version", "gemv"), "AWQ version 'gemv'", "config.json",
         commands=EXPORT_COMMANDS),
    Case("llama-export-nan", _llama_nan, "contains NaN", "model.norm.weight", commands=("verify-export",)),
]
