"""fp8 linears against a float64 reference: quantisation error within what e4m3 allows."""

import copy

import torch
from helpers import rel_err
from torch import nn

from engine.models.fp8 import FP8, Fp8Linear, quantize_linears, quantize_rowwise


def test_rowwise_quantisation_roundtrip_and_scales():
    x = torch.randn(64, 128) * torch.logspace(-3, 3, 64).unsqueeze(1)  # rows of very different size
    q, s = quantize_rowwise(x)
    assert q.dtype == FP8 and s.shape == (64, 1)
    back = q.float() * s
    # e4m3 has 3 mantissa bits: relative error per element <= 2^-4; per row well under 5%.
    for r in range(64):
        assert rel_err(back[r], x[r]) < 0.05
    assert q.float().abs().amax(dim=1).max() <= 448


def test_fp8_linear_matches_float64_within_fp8_error():
    torch.manual_seed(1)
    lin = nn.Linear(256, 96)
    x = torch.randn(3, 40, 256)
    ref = lin.double()(x.double())
    lin = lin.float()
    f8 = Fp8Linear.from_linear(lin, out_dtype=torch.float32)
    y = f8(x)
    assert y.shape == (3, 40, 96) and y.dtype == torch.float32
    err = rel_err(y, ref)
    assert 1e-4 < err < 0.06  # really quantised (not a float path), and close
    # the dequantised weight is the weight up to e4m3 rounding
    assert rel_err(f8.dequantized_weight(), lin.weight) < 0.05


def test_quantize_linears_replaces_only_selected_and_aligned():
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 10), nn.Linear(10, 32))
    x = torch.randn(8, 32)
    ref = model(x)
    n = quantize_linears(model, out_dtype=torch.float32)
    assert n == 1  # 64->10 and 10->32 are not multiples of 16: kept in full precision
    assert isinstance(model[0], Fp8Linear) and isinstance(model[2], nn.Linear)
    assert rel_err(model(x), ref) < 0.06
    model2 = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 32))
    assert (
        quantize_linears(model2, include=lambda name, m: name == "1", out_dtype=torch.float32) == 1
    )
    assert isinstance(model2[1], Fp8Linear) and isinstance(model2[0], nn.Linear)


def test_tensorwise_scaling_matches_float64_within_fp8_error():
    torch.manual_seed(2)
    lin = nn.Linear(128, 64)
    x = torch.randn(2, 30, 128)
    ref = lin.double()(x.double())
    lin = lin.float()
    f8 = Fp8Linear.from_linear(lin, out_dtype=torch.float32, scaling="tensorwise")
    err = rel_err(f8(x), ref)
    assert 1e-4 < err < 0.06
    # tensorwise and rowwise agree with each other about as well as each with the truth
    rw = Fp8Linear.from_linear(lin, out_dtype=torch.float32)
    assert rel_err(f8(x), rw(x)) < 0.08


def test_unknown_scaling_is_refused():
    import pytest

    with pytest.raises(ValueError, match="scaling"):
        Fp8Linear(16, 16, scaling="blockwise")


def test_fused_qkv_quantises_like_the_separate_linears():
    """q/k/v fused into one linear, then fp8: per-output-channel weight scales and per-row
    activation scales are the same as for the three linears, so the outputs are too."""
    from engine.models.wan import CONFIGS, SelfAttention, fuse_qkv

    cfg = CONFIGS["tiny"]
    torch.manual_seed(2)
    sep = nn.ModuleDict({"a": SelfAttention(cfg)})
    for p in sep.parameters():
        p.data.normal_(0, 0.2)
    fused = copy.deepcopy(sep)
    assert fuse_qkv(fused) == 1
    x = torch.randn(2, 12, cfg.dim)
    a, f = sep["a"], fused["a"]
    want = torch.cat([a.q(x), a.k(x), a.v(x)], dim=-1)
    torch.testing.assert_close(f.qkv(x), want, rtol=1e-5, atol=1e-5)
    quantize_linears(sep, out_dtype=torch.float32)
    quantize_linears(fused, out_dtype=torch.float32)
    assert isinstance(fused["a"].qkv, Fp8Linear)
    want8 = torch.cat([sep["a"].q(x), sep["a"].k(x), sep["a"].v(x)], dim=-1)
    torch.testing.assert_close(fused["a"].qkv(x), want8, rtol=1e-5, atol=1e-5)
    assert rel_err(want8, want) > 1e-4  # really fp8
