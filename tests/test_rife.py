"""The RIFE network against slow references written here: the backward warp against a
per-pixel bilinear loop, the whole forward against a plain re-implementation of the
published equations (functional ops on the state dict, a gather-based warp), and the
loader against files in Practical-RIFE's layout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine.models.rife import CONFIGS, IFNet, RifeConfig, load_rife, random_rife, warp
from engine.weights.checkpoint import WeightsError


def warp_loop(img, flow):
    """out[c, y, x] = bilinear sample of img at (x + fx, y + fy), clamped to the border."""
    n, c, h, w = img.shape
    out = torch.zeros_like(img)
    for b in range(n):
        for y in range(h):
            for x in range(w):
                sx = min(max(x + float(flow[b, 0, y, x]), 0.0), w - 1.0)
                sy = min(max(y + float(flow[b, 1, y, x]), 0.0), h - 1.0)
                x0, y0 = int(math.floor(sx)), int(math.floor(sy))
                x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
                ax, ay = sx - x0, sy - y0
                for ch in range(c):
                    v = (
                        img[b, ch, y0, x0] * (1 - ax) * (1 - ay)
                        + img[b, ch, y0, x1] * ax * (1 - ay)
                        + img[b, ch, y1, x0] * (1 - ax) * ay
                        + img[b, ch, y1, x1] * ax * ay
                    )
                    out[b, ch, y, x] = v
    return out


def warp_gather(img, flow):
    """The same equation, vectorised with gather (no grid_sample)."""
    n, c, h, w = img.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=img.dtype), torch.arange(w, dtype=img.dtype), indexing="ij"
    )
    sx = (xs + flow[:, 0]).clamp(0, w - 1)
    sy = (ys + flow[:, 1]).clamp(0, h - 1)
    x0, y0 = sx.floor(), sy.floor()
    ax, ay = (sx - x0).unsqueeze(1), (sy - y0).unsqueeze(1)
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
    flat = img.reshape(n, c, h * w)

    def at(yy, xx):
        idx = (yy * w + xx).reshape(n, 1, h * w).expand(n, c, h * w)
        return flat.gather(2, idx).reshape(n, c, h, w)

    return (
        at(y0, x0) * (1 - ax) * (1 - ay)
        + at(y0, x1) * ax * (1 - ay)
        + at(y1, x0) * (1 - ax) * ay
        + at(y1, x1) * ax * ay
    )


def reference_forward(sd, cfg: RifeConfig, img0, img1, t, scale=1.0):
    """The published equations, written out with functional ops on the state dict."""
    lrelu = lambda x: F.leaky_relu(x, 0.2)  # noqa: E731
    n, _, h, w = img0.shape
    m = math.ceil(4 * max(cfg.scales) / scale)
    H, W = math.ceil(h / m) * m, math.ceil(w / m) * m
    img0 = F.pad(img0, (0, W - w, 0, H - h))
    img1 = F.pad(img1, (0, W - w, 0, H - h))
    tmap = torch.as_tensor(t, dtype=img0.dtype).reshape(-1, 1, 1, 1) * torch.ones(n, 1, H, W)

    def head(x):
        x = lrelu(
            F.conv2d(x, sd["encode.cnn0.weight"], sd["encode.cnn0.bias"], stride=2, padding=1)
        )
        x = lrelu(F.conv2d(x, sd["encode.cnn1.weight"], sd["encode.cnn1.bias"], padding=1))
        x = lrelu(F.conv2d(x, sd["encode.cnn2.weight"], sd["encode.cnn2.bias"], padding=1))
        return F.conv_transpose2d(x, sd["encode.cnn3.weight"], sd["encode.cnn3.bias"], 2, 1)

    def block(i, x, s):
        p = f"block{i}."
        x = F.interpolate(x, scale_factor=1 / s, mode="bilinear", align_corners=False)
        for j in range(2):
            k = f"{p}conv0.{j}.0."
            x = lrelu(F.conv2d(x, sd[k + "weight"], sd[k + "bias"], stride=2, padding=1))
        for j in range(cfg.res_convs):
            k = f"{p}convblock.{j}."
            y = F.conv2d(x, sd[k + "conv.weight"], sd[k + "conv.bias"], padding=1)
            x = lrelu(y * sd[k + "beta"] + x)
        y = F.conv_transpose2d(x, sd[p + "lastconv.0.weight"], sd[p + "lastconv.0.bias"], 2, 1)
        y = F.pixel_shuffle(y, 2)
        y = F.interpolate(y, scale_factor=s, mode="bilinear", align_corners=False)
        return y[:, :4] * s, y[:, 4:5], y[:, 5:]

    f0, f1 = head(img0), head(img1)
    flow = None
    for i, s0 in enumerate(cfg.scales):
        s = s0 / scale
        if flow is None:
            flow, mask, side = block(i, torch.cat([img0, img1, f0, f1, tmap], 1), s)
        else:
            wi0, wi1 = warp_gather(img0, flow[:, :2]), warp_gather(img1, flow[:, 2:])
            wf0, wf1 = warp_gather(f0, flow[:, :2]), warp_gather(f1, flow[:, 2:])
            x = torch.cat([wi0, wi1, wf0, wf1, tmap, mask, side, flow / s], 1)
            d, mask, side = block(i, x, s)
            flow = flow + d
    # the synthesis, on the frame itself (pad cut off)
    flow, mask = flow[:, :, :h, :w], mask[:, :, :h, :w]
    img0, img1 = img0[:, :, :h, :w], img1[:, :, :h, :w]
    a = torch.sigmoid(mask)
    return warp_gather(img0, flow[:, :2]) * a + warp_gather(img1, flow[:, 2:]) * (1 - a)


def test_warp_matches_a_per_pixel_bilinear_loop():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 6, 9, generator=g, dtype=torch.float64)
    flow = (
        torch.rand(2, 2, 6, 9, generator=g, dtype=torch.float64) - 0.5
    ) * 10  # off the edges too
    got = warp(img, flow)
    assert torch.allclose(got, warp_loop(img, flow), atol=1e-9)
    assert torch.allclose(got, warp_gather(img, flow), atol=1e-9)


def test_zero_flow_warp_is_the_identity():
    img = torch.rand(1, 4, 17, 31)
    # (float32 grid coordinates: exact up to rounding)
    assert torch.allclose(warp(img, torch.zeros(1, 2, 17, 31)), img, atol=2e-5)
    # a whole-pixel shift moves the image (and repeats the border)
    shifted = warp(img, torch.cat([torch.full((1, 1, 17, 31), 2.0), torch.zeros(1, 1, 17, 31)], 1))
    assert torch.allclose(shifted[..., :-2], img[..., 2:], atol=1e-5)
    assert torch.allclose(shifted[..., -1], img[..., -1], atol=1e-5)


SMALL = RifeConfig(
    head_channels=6,
    feat_channels=3,
    block_channels=(12, 10, 8),
    scales=(4, 2, 1),
    side_channels=3,
    res_convs=2,
)


@pytest.mark.parametrize(
    ("cfg", "size", "t", "scale"),
    [
        (CONFIGS["tiny"], (40, 56), 0.5, 1.0),  # padded up to 48 x 64
        (SMALL, (32, 48), [0.0, 0.3], 1.0),  # per-sample times
        (SMALL, (20, 36), 0.85, 0.5),  # flow at half resolution
        (RifeConfig(block_channels=(16, 12, 8, 8, 4), head_channels=4), (64, 64), 0.25, 1.0),
    ],
)
def test_forward_matches_the_published_equations(cfg, size, t, scale):
    net = random_rife(cfg, dtype=torch.float64, seed=3)
    with torch.no_grad():  # keep the random flows in a sane range: shrink the last convs
        for b in net.blocks:
            b.lastconv[0].weight.mul_(0.1)
    n = len(t) if isinstance(t, list) else 1
    g = torch.Generator().manual_seed(1)
    img0 = torch.rand(n, 3, *size, generator=g, dtype=torch.float64)
    img1 = torch.rand(n, 3, *size, generator=g, dtype=torch.float64)
    tt = torch.tensor(t, dtype=torch.float64) if isinstance(t, list) else t
    got = net(img0, img1, tt, scale=scale)
    want = reference_forward(net.state_dict(), cfg, img0, img1, tt, scale)
    assert got.shape == img0.shape
    assert torch.allclose(got, want, atol=1e-8), (got - want).abs().max()
    # t is a real input: another time gives another frame
    other = net(img0, img1, 0.9 if not isinstance(t, list) else torch.tensor([0.9, 0.9]))
    assert not torch.allclose(other, got)


def test_identity_flow_reduces_to_the_mask_blend():
    """Flow outputs silenced (identity flow): the output is sigmoid(m) I0 + (1 - sigmoid(m))
    I1 exactly, so a mask saturated towards a frame returns that endpoint frame. (The
    interpolator's own t = 0 / t = 1 endpoints are tested in test_interpolator.py.)"""
    net = random_rife(CONFIGS["tiny"], dtype=torch.float64)
    with torch.no_grad():
        for b in net.blocks:
            b.lastconv[0].weight.zero_()
            b.lastconv[0].bias.zero_()
    img0 = torch.rand(1, 3, 32, 48, dtype=torch.float64)
    img1 = torch.rand(1, 3, 32, 48, dtype=torch.float64)
    out = net(img0, img1, 0.3)
    # zero flow, mask logit 0: the plain average of the two frames
    assert torch.allclose(out, (img0 + img1) / 2, atol=1e-12)
    with torch.no_grad():
        net.blocks[-1].lastconv[0].bias[4 * 4 : 4 * 5].fill_(80.0)  # mask channel after shuffle
    assert torch.allclose(net(img0, img1, 0.0), img0, atol=1e-12)
    with torch.no_grad():
        net.blocks[-1].lastconv[0].bias[4 * 4 : 4 * 5].fill_(-80.0)
    assert torch.allclose(net(img0, img1, 1.0), img1, atol=1e-12)


def test_bad_frames_are_refused():
    net = random_rife(CONFIGS["tiny"])
    with pytest.raises(ValueError, match="frames"):
        net(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 32), 0.5)
    with pytest.raises(ValueError, match="frames"):
        net(torch.rand(1, 4, 16, 16), torch.rand(1, 4, 16, 16), 0.5)
    with pytest.raises(ValueError, match="scale"):
        net(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), 0.5, scale=0.0)


def test_load_a_practical_rife_layout_file(tmp_path):
    """v4.25's flownet.pkl holds the training wrapper's `module.` prefix; a file of that
    layout (random weights, full size) loads and computes what the source network does."""
    src = random_rife(seed=7)
    path = tmp_path / "flownet.pkl"
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, path)
    net = load_rife(path)
    x0, x1 = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    assert torch.equal(net(x0, x1, 0.4), src(x0, x1, 0.4))


def test_wrong_files_get_clear_errors(tmp_path):
    bad = tmp_path / "flownet.pkl"
    torch.save({"foo.weight": torch.zeros(3)}, bad)
    with pytest.raises(WeightsError, match="not a RIFE"):
        load_rife(bad)
    # a 4-block v4 release (e.g. 4.6 / 4.22) is named as such
    four = IFNet(RifeConfig(block_channels=(16, 8, 8, 8), scales=(8, 4, 2, 1)))
    torch.save(four.state_dict(), bad)
    with pytest.raises(WeightsError, match="4 flow blocks"):
        load_rife(bad)
    # same block count, other widths: the key and both shapes
    torch.save(random_rife(RifeConfig(block_channels=(16, 12, 8, 8, 4))).state_dict(), bad)
    with pytest.raises(WeightsError, match="shape"):
        load_rife(bad)
    bad.write_bytes(b"\x80\x02garbage")
    with pytest.raises(WeightsError):
        load_rife(bad)
    with pytest.raises(WeightsError, match="not found"):
        load_rife(tmp_path / "missing.pkl")


def test_half_precision_frames_warp_with_float32_coordinates():
    """An 832-pixel row in half-precision coordinates is off by up to half a pixel at the
    edge; the warp keeps its coordinates in float32 whatever the frames' dtype."""
    g = torch.Generator().manual_seed(5)
    img = torch.rand(1, 3, 16, 832, generator=g)
    flow = (torch.rand(1, 2, 16, 832, generator=g) - 0.5) * 8
    full = warp(img, flow)
    half = warp(img.half(), flow.half())
    assert half.dtype == torch.float16
    # only the half rounding of values and flow remains (a coordinate error of 0.25 px on
    # random pixels would show as ~0.2)
    assert (half.float() - warp(img.half().float(), flow.half().float())).abs().max() < 2e-3
    assert (half.float() - full).abs().max() < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (host-sync check)")
def test_forward_has_no_host_sync_on_cuda():
    """No .item(), no host-to-device tensor per call: the interpolation stream never
    stalls the CPU that launches it (sync debug mode raises on any sync)."""
    net = random_rife(device="cuda").half()
    x0 = torch.rand(1, 3, 480, 832, device="cuda", dtype=torch.half)
    x1 = torch.rand(1, 3, 480, 832, device="cuda", dtype=torch.half)
    net(x0, x1, 0.5)  # first call builds the cached grid
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = net(x0, x1, 0.25)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == x0.shape and out.dtype == torch.half
