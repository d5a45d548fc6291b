"""to-gguf for every llama-quantize file type, with and without an importance matrix, byte for byte
llama-quantize's own output (llama_model_quantize of our f32 GGUF of the same weights), tensor by
tensor: type, shape, order and bytes.  The fixtures have rows divisible by 256 (tiny, gqa, untied,
moe) and not (odd: 160 and 400), so llama-quantize's fallbacks are exercised too; gqa (8/2 heads)
and moe (8 experts, one never routed to) reach its GQA and MoE rules.

The importance matrix is a GGUF file in llama-imatrix's format written from deterministic
positive sums (formats/gguf/imatrix.py); llama.cpp gets the weights llama-quantize derives from
it (in_sum2 / counts per expert, 1 where a count is 0).  When llama.cpp's own llama-quantize is
built (scripts/build_llama_cpp_tools.sh), it also reads the very file, as users run it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from minicpm_convert.formats.gguf import imatrix as imatrix_file
from minicpm_convert.formats.gguf.plan import FILE_TYPES, file_type
from tests import llama_cpp_client as client
from tests.conftest import run_cli

TYPES = [name for name in FILE_TYPES if name not in ("f32", "f16", "bf16")]
NEEDS_IMATRIX = {"iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "q2_K_S"}


def tensors(path):
    return [(t.name, t.tensor_type, tuple(t.shape.tolist()), np.asarray(t.data).view(np.uint8).tobytes())
            for t in GGUFReader(path).tensors]


def assert_same_tensors(ours: Path, theirs: Path):
    a, b = tensors(ours), tensors(theirs)
    assert [t[0] for t in a] == [t[0] for t in b], "tensor order differs"
    for (n, qt, shape, data), (_, wqt, wshape, wdata) in zip(a, b):
        assert (qt, shape) == (wqt, wshape), f"{n}: ours {qt.name} {shape}, llama-quantize {wqt.name} {wshape}"
        assert data == wdata, f"{n} ({qt.name}): bytes differ"


def make_imatrix(f32_gguf: Path, seed: int) -> imatrix_file.ImportanceMatrix:
    """What llama-imatrix would collect for this file: every matrix a mul_mat reads (the tied head is
    token_embd), per expert for stacked experts, from deterministic positive sums."""
    rng = np.random.default_rng(seed)
    im = imatrix_file.ImportanceMatrix(datasets=["fixture-calibration.txt"], chunk_count=7, chunk_size=512)
    names = {t.name for t in GGUFReader(f32_gguf).tensors}
    for t in GGUFReader(f32_gguf).tensors:
        shape = [int(d) for d in t.shape]  # ggml order: row length first
        if len(shape) < 2 or not t.name.endswith(".weight") or "_norm" in t.name:
            continue
        if t.name == "token_embd.weight" and "output.weight" in names:
            continue  # an untied embedding is only looked up, never multiplied
        n_mat = shape[2] if len(shape) == 3 else 1
        counts = np.full(n_mat, 512 * 7, np.int64)
        if n_mat > 1:
            counts[rng.integers(n_mat)] = 0  # an expert no calibration token was routed to
            counts[rng.integers(n_mat)] //= 3
        mean_sq = (0.05 + rng.gamma(0.6, 1.0, (n_mat, shape[0]))) * np.exp(rng.normal(0, 1.2, (1, shape[0])))
        im.entries[t.name] = imatrix_file.Entry((mean_sq * counts[:, None]).astype(np.float32), counts)
    return im


def llama_weights(im: imatrix_file.ImportanceMatrix) -> dict[str, np.ndarray]:
    """The arrays llama-quantize hands to llama_model_quantize (tools/quantize/quantize.cpp)."""
    out = {}
    for name, e in im.entries.items():
        c = e.counts.astype(np.float32)[:, None]
        out[name] = np.where(c > 0, e.sums / np.where(c > 0, c, 1), np.float32(1)).astype(np.float32).reshape(-1)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory, fixture_path):
    out = tmp_path_factory.mktemp("quantize")
    cache = {}

    def f32(name: str, arch: str = "minicpm") -> Path:
        key = ("f32", name, arch)
        if key not in cache:
            dest = out / f"{name}-{arch}-f32.gguf"
            code, _, err = run_cli("to-gguf", fixture_path(name), dest, "--quant", "f32", "--arch", arch, "-q")
            assert code == 0, err
            cache[key] = dest
        return cache[key]

    def imatrix(name: str) -> tuple[Path, dict[str, np.ndarray]]:
        key = ("imatrix", name)
        if key not in cache:
            im = make_imatrix(f32(name), seed=sum(map(ord, name)))
            path = out / f"{name}.imatrix.gguf"
            imatrix_file.write(path, im)
            cache[key] = (path, llama_weights(im))
        return cache[key]

    f32.imatrix = imatrix
    f32.out = out
    f32.src = fixture_path
    return f32


def run_both(files, fixture, quant, with_imatrix, arch="minicpm", options=(), llama_options=None):
    """(ours, theirs, (we refused, our stderr), llama.cpp refused) for one conversion."""
    tag = f"{fixture}-{arch}-{quant}-{'im' if with_imatrix else 'plain'}-{'_'.join(options).replace('/', '')}"
    ours, theirs = files.out / f"{tag}-ours.gguf", files.out / f"{tag}-theirs.gguf"
    imatrix_path, weights = files.imatrix(fixture) if with_imatrix else (None, None)
    cli = ["--quant", quant, "--arch", arch, "-q", *options]
    if imatrix_path:
        cli += ["--imatrix", imatrix_path]
    code, _, err = run_cli("to-gguf", files.src(fixture), ours, *cli)
    refused = code != 0
    try:
        client.quantize(files(fixture, arch), theirs, int(file_type(quant).ftype), imatrix=weights,
                        **(llama_options or {}))
        theirs_refused = False
    except AssertionError:
        theirs_refused = True
    return ours, theirs, (refused, err), theirs_refused


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("quant", TYPES)
@pytest.mark.parametrize("fixture", ["tiny", "odd"])
def test_every_type_is_llama_quantizes(files, fixture, quant, with_imatrix):
    ours, theirs, (refused, err), theirs_refused = run_both(files, fixture, quant, with_imatrix)
    if quant in NEEDS_IMATRIX and not with_imatrix and fixture == "tiny":
        # llama-quantize: "this quantization requires an importance matrix!"; so do we, with exit 2
        assert refused and "importance matrix" in err and theirs_refused
        return
    if refused and theirs_refused:
        assert "importance matrix" in err  # odd: every IQ2 tensor fell back, but llama-quantize still refuses
        return
    assert not refused, err
    assert not theirs_refused
    assert_same_tensors(ours, theirs)


@pytest.mark.parametrize("quant", ["q2_K", "q3_K_M", "q4_K_M", "q5_K_S", "q4_0", "iq4_xs", "iq3_xxs", "iq3_m", "iq2_xs", "iq2_m", "tq2_0"])
@pytest.mark.parametrize("fixture", ["gqa", "untied", "moe"])
def test_gqa_untied_and_moe(files, fixture, quant):
    ours, theirs, (refused, err), theirs_refused = run_both(files, fixture, quant, True)
    assert not refused and not theirs_refused, err
    assert_same_tensors(ours, theirs)


@pytest.mark.parametrize("quant", ["q4_K_M", "iq3_xxs"])
def test_arch_llama(files, quant):
    ours, theirs, (refused, err), _ = run_both(files, "tiny", quant, True, arch="llama")
    assert not refused, err
    assert_same_tensors(ours, theirs)


OPTIONS = [
    (["--pure"], dict(pure=True)),
    (["--leave-output-tensor"], dict(leave_output_tensor=True)),
    (["--output-tensor-type", "q8_0", "--token-embedding-type", "Q4_K"], dict(output_tensor_type=8, token_embedding_type=12)),
    (["--tensor-type", "attn_v=q8_0", "--tensor-type", r"blk\.1\.ffn=iq4_nl"], dict(tensor_types=(("attn_v", 8), (r"blk\.1\.ffn", 20)))),
]


@pytest.mark.parametrize("o", range(len(OPTIONS)))
@pytest.mark.parametrize("fixture", ["tiny", "untied"])
def test_per_tensor_options_are_llama_quantizes(files, fixture, o):
    cli, params = OPTIONS[o]
    ours, theirs, (refused, err), theirs_refused = run_both(files, fixture, "q3_K_M", True, options=cli,
                                                            llama_options=params)
    assert not refused and not theirs_refused, err
    assert_same_tensors(ours, theirs)


@pytest.mark.parametrize("quant", ["q4_K_M", "iq2_m", "q3_K_S"])
def test_dry_run_prints_the_plan_and_the_exact_size(files, quant, tmp_path):
    imatrix_path, _ = files.imatrix("tiny")
    code, out, err = run_cli("to-gguf", files.src("tiny"), tmp_path / "never.gguf", "--quant", quant,
                             "--imatrix", imatrix_path, "--dry-run")
    assert code == 0, err
    assert not (tmp_path / "never.gguf").exists()
    assert "blk.0.ffn_down.weight" in out and "bits per weight" in out
    code, _, err = run_cli("to-gguf", files.src("tiny"), tmp_path / "real.gguf", "--quant", quant,
                           "--imatrix", imatrix_path, "-q")
    assert code == 0, err
    size = (tmp_path / "real.gguf").stat().st_size
    assert f"({size:,} bytes)" in out
    for name, qtype, _, _ in tensors(tmp_path / "real.gguf"):
        assert any(line.split()[:1] == [name] and qtype.name in line.split() for line in out.splitlines()), name


def test_dry_run_warns_where_writing_is_refused(files, tmp_path):
    code, out, _ = run_cli("to-gguf", files.src("tiny"), tmp_path / "x.gguf", "--quant", "iq2_xxs", "--dry-run")
    assert code == 0 and "need an importance matrix" in out


def test_legacy_dat_gives_the_same_file(files, tmp_path):
    """A legacy .dat importance matrix (llama-imatrix --output-format dat) reads to the same weights
    up to its float round trip; the file quantized with it is llama-quantize's with those weights."""
    im = make_imatrix(files("tiny"), seed=5)
    dat = tmp_path / "m.dat"
    imatrix_file.write_legacy(dat, im)
    back = imatrix_file.read(dat)
    assert back.legacy and sorted(back.entries) == sorted(im.entries)
    weights = {n: back.weights(n) for n in back.entries}
    for name, w in llama_weights(im).items():
        np.testing.assert_allclose(weights[name], w, rtol=1e-6)
    code, _, err = run_cli("to-gguf", files.src("tiny"), tmp_path / "ours.gguf", "--quant", "iq3_xxs", "--imatrix", dat, "-q")
    assert code == 0, err
    client.quantize(files("tiny"), tmp_path / "theirs.gguf", int(file_type("iq3_xxs").ftype), imatrix=weights)
    assert_same_tensors(tmp_path / "ours.gguf", tmp_path / "theirs.gguf")


def llama_quantize_binary() -> Path:
    """llama.cpp's llama-quantize (scripts/build_llama_cpp_tools.sh builds it; CI requires it)."""
    from tests.requirements import require
    return require("llama.cpp tools") / "llama-quantize"


@pytest.mark.parametrize("quant", ["q4_K_M", "iq2_xs", "iq4_nl", "q2_K_S"])
@pytest.mark.parametrize("fixture", ["tiny", "moe"])
def test_llama_quantize_reads_our_imatrix_file_as_we_do(files, fixture, quant, tmp_path):
    """The real tool, given the very GGUF imatrix file: same tensors as ours."""
    imatrix_path, _ = files.imatrix(fixture)
    theirs = tmp_path / "theirs.gguf"
    r = subprocess.run([str(llama_quantize_binary()), "--imatrix", str(imatrix_path), str(files(fixture)), str(theirs),
                        quant.upper(), "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    code, _, err = run_cli("to-gguf", files.src(fixture), tmp_path / "ours.gguf", "--quant", quant,
                           "--imatrix", imatrix_path, "-q")
    assert code == 0, err
    assert_same_tensors(tmp_path / "ours.gguf", theirs)
    kv = {f.name: f.contents() for f in GGUFReader(tmp_path / "ours.gguf").fields.values()}
    theirs_kv = {f.name: f.contents() for f in GGUFReader(theirs).fields.values()}
    for key in ("quantize.imatrix.entries_count", "quantize.imatrix.chunks_count", "quantize.imatrix.dataset"):
        assert kv[key] == theirs_kv[key], key
