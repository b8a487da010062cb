"""VACE and plain V2V through the stream session (tiny model, tiny Wan VAE, CPU, float32).

Oracles: the base session itself (VACE off must be it bit for bit), the Wan VAE encoding
the whole input video at once (V2V at strength 0 is the encoded input), a block-0
reference written here with the one-shot `WanModel.forward` (V2V start latents and cut
step list), and a fresh context encoder (restart after a loss, the VACE wiring of a step).
"""

import math

import numpy as np
import pytest
import torch

from engine.models import wan_vae
from engine.models.decoders import build_decoder
from engine.models.vace import (
    VACE_CONFIGS,
    forward_stream_vace,
    random_vace,
    vace_cross_kv,
    vace_rope,
)
from engine.models.wan import CONFIGS, SELF, WanModel, init_random_
from engine.stream.schedule import renoise, sigma, x0_from_velocity
from engine.stream.session import BlockInputs, StreamSession
from engine.stream.v2v import VideoLatentEncoder, adapt_strength, motion
from engine.stream.vace_context import VaceConditioner, VaceContextEncoder

H, W = 32, 48
CFG = CONFIGS["tiny"]
STEPS = [1000, 750]


@pytest.fixture(scope="module")
def parts():
    model = init_random_(WanModel(CFG), seed=1).eval()
    vace = random_vace(CFG, VACE_CONFIGS["tiny"], seed=2)
    vae = wan_vae.random_wan_vae(wan_vae.CONFIGS["tiny"], seed=3)
    g = torch.Generator().manual_seed(5)
    text = torch.randn(1, CFG.text_len, CFG.text_dim, generator=g)
    text[:, 7:] = 0
    return model, vace, vae, text


def video(frames: int, start: int = 0) -> torch.Tensor:
    """A moving pattern in [-1, 1]: [1, 3, frames, H, W]."""
    t = torch.arange(start, start + frames, dtype=torch.float32)[:, None, None]
    y = torch.linspace(-1, 1, H)[:, None]
    x = torch.linspace(-1, 1, W)[None, :]
    r = torch.sin(5 * x + 0.4 * t) * torch.cos(3 * y)
    g = torch.cos(4 * y - 0.3 * t).expand_as(r)
    b = ((x - 0.1 * t % 2 + 1) ** 2 + y**2 < 0.2).float() * 2 - 1
    return torch.stack([r, g, b])[None].clamp(-1, 1)


def session(parts, *, vace=True, decoder=False, v2v=False):
    model, vmod, vae, _ = parts
    dec = enc = None
    if decoder:
        dec, enc = build_decoder("tae", tiny=True, device="cpu", dtype=torch.float32)
    s = StreamSession(model, height=H, width=W, decoder=dec, encoder=enc, timing=False)
    if vace:
        s.vace = VaceConditioner(model, vmod, vae, height=H, width=W, assets_dir=None)
    if v2v:
        s.video_encoder = VideoLatentEncoder(vae)
    return s


def blocks(n: int):
    """The input video of n blocks: 9 frames, then 12 each, one continuous clip."""
    out, start = [], 0
    for i in range(n):
        t = 9 if i == 0 else 12
        out.append(video(t, start))
        start += t
    return out


def run(s, text, n, **kw):
    vids = blocks(n)
    outs = []
    for i in range(n):
        per = {k: (v[i] if isinstance(v, list) else v) for k, v in kw.items()}
        outs.append(s.next_block(BlockInputs(text, "t", STEPS, seed=7, video=vids[i], **per)))
    return outs


def test_vace_off_is_the_base_stream_bit_for_bit(parts):
    text = parts[3]
    base = run(session(parts, vace=False, decoder=True), text, 3)
    # VACE attached, scale 0: the input is ignored, same ops as the base model
    zero = run(session(parts, decoder=True), text, 3, vace_scale=0.0)
    for a, b in zip(base, zero, strict=True):
        assert torch.equal(a.latents, b.latents) and torch.equal(a.frames, b.frames)
        assert not b.vace
    # VACE attached, no video and no references: the same
    s = session(parts, decoder=True)
    for i, a in enumerate(base):
        b = s.next_block(BlockInputs(text, "t", STEPS, seed=7))
        assert torch.equal(a.latents, b.latents), i
    # on: hints act from the first block, and the scale is live
    on = run(session(parts), text, 3)
    assert all(o.vace for o in on)
    assert not torch.allclose(on[0].latents, base[0].latents, atol=1e-3)
    half = run(session(parts), text, 3, vace_scale=[1.0, 1.0, 0.5])
    assert torch.equal(half[1].latents, on[1].latents)
    assert not torch.allclose(half[2].latents, on[2].latents, atol=1e-4)


def test_vace_block0_matches_a_reference_step_loop(parts):
    """The session's first block with VACE: context from a fresh encoder, hints at every
    denoising step with the VACE rope at 3, 4, 5, noise from the block's generator."""
    model, vmod, vae, text = parts
    vid = video(9)
    out = session(parts).next_block(BlockInputs(text, "t", STEPS, seed=7, video=vid))

    ctx = VaceContextEncoder(vae).encode_block(vid)
    hp, wp = H // 16, W // 16
    cross, vcross = model.cross_kv(text), vace_cross_kv(model, vmod, text)
    from engine.models.vace import VaceInputs
    from engine.models.wan import rope_table

    rope = rope_table(CFG, (0, 1, 2), hp, wp)
    vin = VaceInputs(ctx, vcross, vace_rope(CFG, 0, hp, wp), scale=1.0)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 16, 3, H // 8, W // 8, generator=g)
    for i, t in enumerate(STEPS):
        v = forward_stream_vace(
            model, vmod, x, torch.tensor([float(t)]), cross, rope, None, SELF, vin=vin
        )
        x0 = x0_from_velocity(x, v, sigma(t))
        if i + 1 < len(STEPS):
            x = renoise(x0, torch.randn(x.shape, generator=g), sigma(STEPS[i + 1]))
    torch.testing.assert_close(out.latents, x0, rtol=1e-5, atol=1e-5)


def test_context_encoder_restarts_when_the_input_does(parts):
    """After a restart (new source, input back after a loss) or a block without input, the
    block's context is that of a new video starting at its first frame."""
    text = parts[3]
    s = session(parts)
    vids = blocks(4)
    s.next_block(BlockInputs(text, "t", STEPS, seed=7, video=vids[0]))
    s.next_block(BlockInputs(text, "t", STEPS, seed=7, video=vids[1]))
    continued = s.vace.ctx.clone()
    s.next_block(BlockInputs(text, "t", STEPS, seed=7, video=vids[2], video_restart=True))
    fresh = VaceContextEncoder(parts[2]).encode_block(vids[2])
    torch.testing.assert_close(s.vace.ctx, fresh, rtol=0, atol=0)
    # one text-only block, then input again: also a fresh start
    s.next_block(BlockInputs(text, "t", STEPS, seed=7))
    s.next_block(BlockInputs(text, "t", STEPS, seed=7, video=vids[3]))
    torch.testing.assert_close(s.vace.ctx, VaceContextEncoder(parts[2]).encode_block(vids[3]))
    # while continuous, the context is the whole clip's encoding, not a restart
    whole = VaceContextEncoder(parts[2])
    whole.encode_block(vids[0])
    torch.testing.assert_close(continued, whole.encode_block(vids[1]))


def test_reference_images_alone_steer_and_clearing_returns_to_base(parts):
    text = parts[3]
    base = session(parts, vace=False).next_block(BlockInputs(text, "t", STEPS, seed=7))
    s = session(parts)
    img = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    s.vace.refs.set_frame(1, img)
    out = s.next_block(BlockInputs(text, "t", STEPS, seed=7))
    assert out.vace and not torch.allclose(out.latents, base.latents, atol=1e-4)
    s.reset()
    s.vace.refs.clear()
    again = s.next_block(BlockInputs(text, "t", STEPS, seed=7))
    assert not again.vace and torch.equal(again.latents, base.latents)


def test_v2v_at_strength_zero_is_the_encoded_input(parts):
    """No step at all: each block's latents are the input encoded by the Wan VAE, and the
    stream of blocks equals encoding the whole clip at once."""
    text, vae = parts[3], parts[2]
    s = session(parts, vace=False, decoder=True, v2v=True)
    outs = run(s, text, 3, v2v_strength=0.0)
    whole = wan_vae.WanStreamEncoder(vae).encode(torch.cat(blocks(3), dim=2))
    streamed = torch.cat([o.latents for o in outs], dim=2)
    assert whole.shape == streamed.shape == (1, 16, 9, H // 8, W // 8)
    torch.testing.assert_close(streamed, whole.float(), rtol=1e-4, atol=1e-5)
    assert all(o.steps == () and o.v2v_strength == 0.0 for o in outs)
    assert outs[1].frames.shape[2] == 12  # decoded as usual


def test_v2v_first_step_at_1000_strength_against_a_reference(parts):
    model, _, vae, text = parts
    s = session(parts, vace=False, v2v=True)
    vid = video(9)
    out = s.next_block(
        BlockInputs(text, "t", [1000, 750, 500, 250], seed=7, video=vid, v2v_strength=0.6)
    )
    assert out.steps == (600, 500, 250)
    enc = wan_vae.WanStreamEncoder(vae).encode(vid).float()
    g = torch.Generator().manual_seed(7)
    x = 0.6 * torch.randn(enc.shape, generator=g) + 0.4 * enc
    for i, t in enumerate(out.steps):
        v = model(x, torch.tensor([float(t)]), text)  # one-shot forward: block 0 = SELF
        x0 = x0_from_velocity(x, v, sigma(t))
        if i + 1 < len(out.steps):
            x = renoise(x0, torch.randn(x.shape, generator=g), sigma(out.steps[i + 1]))
    torch.testing.assert_close(out.latents, x0, rtol=1e-4, atol=1e-5)
    # input lost: the block is plain text-to-video again
    nxt = s.next_block(BlockInputs(text, "t", STEPS, seed=7, v2v_strength=0.6))
    assert nxt.steps == tuple(STEPS) and nxt.v2v_strength is None


def test_v2v_auto_strength_follows_motion(parts):
    text = parts[3]
    s = session(parts, vace=False, v2v=True)
    vids = blocks(3)
    still = video(12, 0)[:, :, :1].expand(1, 3, 12, H, W)
    feed = [vids[0], vids[1], still]
    # each block follows the motion of the block before it (read a block late: no host sync)
    want, prev_s, prev_f, prev_m = [], 0.5, None, 0.0
    for v in feed:
        prev_s = adapt_strength(prev_s, prev_m)
        prev_m, prev_f = motion(v, prev_f), v[:, :, -1:]
        want.append(prev_s)
        out = s.next_block(
            BlockInputs(text, "t", STEPS, seed=7, video=v, v2v_strength=0.5, v2v_auto=True)
        )
        assert math.isclose(out.v2v_strength, prev_s, rel_tol=1e-9)
        assert out.steps[0] == round(1000 * prev_s)
    assert motion(vids[1]) > 0 and want[1] != want[2]


def test_bad_block_inputs_change_nothing(parts):
    text = parts[3]
    s = session(parts, v2v=True)
    bad = [
        dict(video=video(12)),  # block 0 takes 9 frames
        dict(video=video(9)[:, :, :, :16]),  # wrong size
        dict(video=video(9), video_mask=torch.ones(1, 1, 8, H, W)),
        dict(video_mask=torch.ones(1, 1, 9, H, W)),  # a mask without a video
        dict(vace_scale=2.5),
        dict(vace_scale=float("nan")),
        dict(v2v_strength=1.5),
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            s.next_block(BlockInputs(text, "t", STEPS, seed=7, **kw))
        assert s.index == 0
    no_encoder = session(parts)
    with pytest.raises(ValueError, match="video encoder"):
        no_encoder.next_block(BlockInputs(text, "t", STEPS, seed=7, v2v_strength=0.5))


# --------------------------------------------------------------------------- GPU (lead's runs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_compiled_vace_stream_close_to_fp32_eager(parts):
    """The live configuration (bf16, compiled main and VACE blocks, a reference image, V2V
    off) against float32 eager on the same weights."""
    from engine.models.vace import compile_vace
    from engine.models.wan import cast_model

    model, vmod, vae, text = parts
    img = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    outs = []
    for dtype, compiled in ((torch.float32, False), (torch.bfloat16, True)):
        m = cast_model(init_random_(WanModel(CFG), seed=1).eval(), dtype).cuda()
        v = cast_model(random_vace(CFG, VACE_CONFIGS["tiny"], seed=2), dtype).cuda()
        e = wan_vae.random_wan_vae(wan_vae.CONFIGS["tiny"], seed=3, device="cuda", dtype=dtype)
        if compiled:
            m.compile_blocks()
            compile_vace(v)
        s = StreamSession(m, height=H, width=W, dtype=dtype)
        s.vace = VaceConditioner(m, v, e, height=H, width=W, assets_dir=None)
        s.vace.refs.set_frame(1, img)
        outs.append(
            [
                s.next_block(
                    BlockInputs(text.cuda().to(dtype), "t", STEPS, seed=7, video=b.cuda())
                ).latents
                for b in blocks(3)
            ]
        )
    for x, y in zip(*outs, strict=True):
        assert x.is_cuda and y.dtype == torch.float32
        assert ((y - x).norm() / x.norm()).item() < 5e-2


def test_the_compiled_context_encoder_traces_whole_and_gives_the_same_context(parts):
    """torch.compile of the stream encoder (the GPU presets compile it, issue 15) must
    trace as one graph per shape, cache included, and change no value: eager backend here,
    over a video start, two steady blocks and a restart."""
    import torch._dynamo

    vae = parts[2]
    blocks = [video(9), video(12, 9), video(12, 21), video(9, 40)]
    plain = VaceContextEncoder(vae)
    want = [plain.encode_block(v) for v in blocks]
    torch._dynamo.reset()
    fast = VaceContextEncoder(vae)
    fast.stream.compile(backend="eager")
    got = [fast.encode_block(v) for v in blocks]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
