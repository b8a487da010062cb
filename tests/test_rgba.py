"""to_rgba8 against a numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.stream.rgba import to_rgba8


def reference(frames: np.ndarray) -> np.ndarray:
    b, _, t, h, w = frames.shape
    rgb = np.clip(frames.astype(np.float64), -1, 1)
    rgb = np.round((rgb + 1) * 127.5).astype(np.uint8)  # numpy rounds half to even, like torch
    out = np.full((b * t, h, w, 4), 255, np.uint8)
    out[..., :3] = rgb.transpose(0, 2, 3, 4, 1).reshape(b * t, h, w, 3)
    return out


def test_matches_numpy_reference():
    x = torch.randn(2, 3, 5, 8, 6) * 0.8
    # exact ties and the ends: -1 -> 0, 1 -> 255, out of range clamps
    x[0, :, 0, 0, :4] = torch.tensor([-1.0, 1.0, -3.0, 2.5])
    x[0, 0, 1, 0, :2] = torch.tensor([1 / 255 - 1, 3 / 255 - 1])  # (x+1)*127.5 = 0.5, 1.5
    out = to_rgba8(x)
    assert out.dtype == torch.uint8 and out.shape == (10, 8, 6, 4) and out.is_contiguous()
    np.testing.assert_array_equal(out.numpy(), reference(x.numpy()))
    assert out[0, 0, 0, 0] == 0 and out[0, 0, 1, 0] == 255 and out[0, 0, 2, 0] == 0
    assert (out[..., 3] == 255).all()


def test_bf16_and_strided_input():
    x = (torch.rand(1, 5, 3, 4, 4) * 2 - 1).transpose(1, 2)  # non-contiguous, like TAEHV's output
    np.testing.assert_array_equal(to_rgba8(x).numpy(), reference(x.numpy()))
    xb = x.to(torch.bfloat16)
    np.testing.assert_array_equal(to_rgba8(xb).numpy(), reference(xb.float().numpy()))


def test_nan_is_black_and_bad_shape_refused():
    x = torch.zeros(1, 3, 1, 2, 2)
    x[0, :, 0, 0, 0] = float("nan")
    assert to_rgba8(x)[0, 0, 0].tolist() == [0, 0, 0, 255]
    with pytest.raises(ValueError, match=r"\[B,3,T,H,W\]"):
        to_rgba8(torch.zeros(1, 4, 1, 2, 2))
