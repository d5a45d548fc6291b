"""INT4 group quantization: packings round-trip exactly, codes and zeros stay in range, scales
are what a float16 loader sees, degenerate groups decode exactly, and the scale search never
loses to plain rounding on the fixtures' weights."""

from __future__ import annotations

import pytest

from tests.requirements import require
import torch

from minicpm_convert.sources.checkpoint import Checkpoint
from minicpm_convert.formats.hf.int4 import is_projection, layer_type
from minicpm_convert.quants import int4, int4_search
from minicpm_convert.stream import llama_stream

GROUPS = [32, 64, 128]


def random_weight(out=64, inp=256, seed=0, outliers=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.02
    if outliers:  # a few large input channels, as real weights have
        w[:, torch.randint(0, inp, (3,), generator=g)] *= 12
    return w


def random_parts(out, inp, group_size, sym, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out, inp), generator=g, dtype=torch.uint8)
    scales = (torch.rand(out, inp // group_size, generator=g) * 0.01 + 1e-4).half().float()
    zeros = (torch.full((out, inp // group_size), 8, dtype=torch.uint8) if sym else
             torch.randint(1, 16, (out, inp // group_size), generator=g, dtype=torch.uint8))
    return codes, scales, zeros


# -- packing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", GROUPS)
def test_gptq_pack_round_trip(group_size, sym):
    codes, scales, zeros = random_parts(48, 256, group_size, sym)
    packed = int4.pack_gptq(codes, scales, zeros, group_size)
    assert packed["qweight"].dtype == torch.int32 and packed["qweight"].shape == (256 // 8, 48)
    assert packed["qzeros"].dtype == torch.int32 and packed["qzeros"].shape == (256 // group_size, 48 // 8)
    assert packed["scales"].dtype == torch.float16 and packed["scales"].shape == (256 // group_size, 48)
    assert torch.equal(packed["g_idx"], torch.arange(256, dtype=torch.int32) // group_size)
    c, s, z, g = int4.unpack_gptq(**packed)
    assert g == group_size
    assert torch.equal(c, codes) and torch.equal(s, scales) and torch.equal(z, zeros)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", GROUPS)
def test_compressed_pack_round_trip(group_size, sym):
    codes, scales, zeros = random_parts(48, 256, group_size, sym)
    packed = int4.pack_compressed(codes, scales, zeros, group_size, sym)
    assert packed["weight_packed"].shape == (48, 256 // 8)
    assert packed["weight_scale"].shape == (48, 256 // group_size)
    assert packed["weight_shape"].tolist() == [48, 256] and packed["weight_shape"].dtype == torch.int64
    assert ("weight_zero_point" in packed) == (not sym)
    c, s, z, g = int4.unpack_compressed(**packed)
    assert g == group_size
    assert torch.equal(c, codes) and torch.equal(s, scales) and torch.equal(z, zeros)


def test_symmetric_gptq_zeros_are_0x77777777():
    codes, scales, zeros = random_parts(16, 128, 32, sym=True)
    qzeros = int4.pack_gptq(codes, scales, zeros, 32)["qzeros"]
    assert (qzeros == 0x77777777).all()


@pytest.mark.parametrize("sym", [True, False])
def test_compressed_packing_is_compressed_tensors_own(sym):
    """The packed words and zero points equal compressed-tensors' pack_to_int32 of its signed codes."""
    require("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized import helpers
    codes, scales, zeros = random_parts(48, 256, 64, sym)
    packed = int4.pack_compressed(codes, scales, zeros, 64, sym)
    signed = (codes.to(torch.int32) - 8).to(torch.int8)
    assert torch.equal(packed["weight_packed"], helpers.pack_to_int32(signed, 4))
    if not sym:
        zp = (zeros.to(torch.int32) - 8).to(torch.int8)
        assert torch.equal(packed["weight_zero_point"], helpers.pack_to_int32(zp, 4, packed_dim=0))


# -- quantization bounds -------------------------------------------------------------------------
@pytest.mark.parametrize("search", [False, True])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", GROUPS)
def test_codes_zeros_and_scales_in_range(group_size, sym, search):
    w = random_weight()
    codes, scales, zeros = int4.quantize_groups(w, group_size, sym, search)
    assert codes.dtype == torch.uint8 and codes.shape == w.shape and int(codes.max()) <= 15
    assert scales.shape == zeros.shape == (w.shape[0], w.shape[1] // group_size)
    assert (scales > 0).all()
    assert torch.equal(scales, scales.half().float()), "scales must be exactly float16 values"
    if sym:
        assert (zeros == 8).all()
    else:
        assert int(zeros.min()) >= 1 and int(zeros.max()) <= 15, "GPTQ v1 cannot store zero 0"
    # the codes are nearest rounding against the stored (float16) scale: what a loader decodes
    x = w.reshape(-1, group_size)
    s, z = scales.reshape(-1, 1), zeros.reshape(-1, 1).float()
    nearest = torch.clamp(torch.round(x / s) + z, 0, 15).to(torch.uint8).reshape(w.shape)
    assert torch.equal(codes, nearest)


@pytest.mark.parametrize("group_size", GROUPS)
def test_plain_rounding_error_bounds(group_size):
    """Round-to-nearest: |w - w_hat| <= s/2 symmetric (plus what float16 rounding of s moves the
    top code), <= s asymmetric (the integer zero shifts the grid by up to s/2)."""
    w = random_weight()
    x = w.reshape(-1, group_size)
    for sym in (True, False):
        codes, scales, zeros = int4.quantize_groups(w, group_size, sym, search=False)
        err = (w - int4.dequantize(codes, scales, zeros, group_size)).abs().reshape(-1, group_size)
        s = scales.reshape(-1, 1)
        if sym:
            absmax = x.abs().amax(1, keepdim=True)
            bound = 0.5 * s + (absmax - 7.5 * s).clamp(min=0)
        else:
            bound = s
        assert (err <= bound * (1 + 1e-6)).all()


def test_symmetric_scale_is_gptq_convention():
    w = random_weight(outliers=False)
    _, scales, _ = int4.quantize_groups(w, 128, sym=True, search=False)
    absmax = w.reshape(-1, 128).abs().amax(1).reshape(scales.shape)
    assert torch.equal(scales, (2 * absmax / 15).half().float())


# -- degenerate groups ---------------------------------------------------------------------------
@pytest.mark.parametrize("search", [False, True])
@pytest.mark.parametrize("sym", [True, False])
def test_zero_groups_decode_to_exact_zero(sym, search):
    w = random_weight(8, 128)
    w[:, :32] = 0  # a whole zero group per row
    w[3] = 0  # a whole zero row
    codes, scales, zeros = int4.quantize_groups(w, 32, sym, search)
    assert (scales > 0).all()  # GPTQ's convention: a zero group gets the range [-1, 1], never scale 0
    w_hat = int4.dequantize(codes, scales, zeros, 32)
    assert (w_hat[:, :32] == 0).all() and (w_hat[3] == 0).all()


@pytest.mark.parametrize("value", [0.37, -0.37, 1e-3, -5.0])
@pytest.mark.parametrize("sym", [True, False])
def test_constant_groups(value, sym):
    """A constant group: plain rounding is off by at most 1/15 of it (the top code is clamped);
    the search finds a scale that reproduces it to float16 precision."""
    w = torch.full((4, 64), value)
    rtn = int4.dequantize(*int4.quantize_groups(w, 32, sym, search=False), 32)
    found = int4.dequantize(*int4.quantize_groups(w, 32, sym, search=True), 32)
    # 1/15 of the value, plus what float16 rounding of the scale moves the clamped top code (7 s)
    assert ((rtn - w).abs() <= abs(value) / 15 * (1 + 7.5 * 2 ** -10)).all()
    assert ((found - w).abs() <= abs(value) * 2 ** -10).all()


def test_single_outlier_group():
    w = torch.zeros(2, 32)
    w[0, 5] = 3.0
    w[1, 7] = -3.0
    for sym in (True, False):
        for search in (False, True):
            w_hat = int4.dequantize(*int4.quantize_groups(w, 32, sym, search), 32)
            assert (w_hat[w == 0] == 0).all()
            assert torch.allclose(w_hat[w != 0], w[w != 0], rtol=0.07)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of group size"):
        int4.quantize_groups(torch.zeros(4, 160), 128)
    bad = torch.zeros(4, 64)
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        int4.quantize_groups(bad, 32)


# -- the search against plain rounding on the fixtures ------------------------------------------
def layer_type_errors(fixture_dir, group_size, sym):
    """Mean ||W - W_hat|| / ||W|| per layer type, (search, plain rounding)."""
    ckpt = Checkpoint(fixture_dir)
    found: dict[str, list[float]] = {}
    plain: dict[str, list[float]] = {}
    for job in llama_stream(ckpt):
        if not is_projection(job.name):
            continue
        w = job.read_all()
        kind = layer_type(job.name)
        found.setdefault(kind, []).append(
            int4.relative_error(w, int4.dequantize(*int4.quantize_groups(w, group_size, sym, True), group_size)))
        plain.setdefault(kind, []).append(
            int4.relative_error(w, int4.dequantize(*int4.quantize_groups(w, group_size, sym, False), group_size)))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return {k: (mean(found[k]), mean(plain[k])) for k in found}


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("name", ["tiny", "gqa", "untied"])
def test_search_beats_plain_rounding_on_every_layer_type(name, group_size, sym, fixture_path):
    errors = layer_type_errors(fixture_path(name), group_size, sym)
    assert set(errors) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for kind, (found, plain) in errors.items():
        assert found < plain, f"{kind}: search {found:.4f} vs plain rounding {plain:.4f}"


def test_search_never_worse_per_group_in_its_own_measure():
    """Plain rounding is one of the candidates, so the weighted error can only go down, group by group."""
    w = random_weight(32, 512, seed=3)
    x = w.reshape(-1, 32)
    weights = torch.from_numpy(int4_search.importance(x.numpy().T.copy()).T.copy())
    for sym in (True, False):
        errs = []
        for search in (False, True):
            w_hat = int4.dequantize(*int4.quantize_groups(w, 32, sym, search), 32).reshape(-1, 32)
            errs.append(((x - w_hat).square() * weights).sum(1))
        assert (errs[1] <= errs[0] * (1 + 1e-5) + 1e-12).all()
