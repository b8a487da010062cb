"""VACE against diffusers' `WanVACETransformer3DModel` (weights converted from our Wan-native
state dicts by diffusers' own converter), the streaming hint path against the one-shot
forward, scale 0 == base bit for bit, the 96-channel context against diffusers' pipeline
helpers, reference images and the V2V math."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import diffusers_wan_kwargs, rel_err

from engine.models.kv_cache import KVCache
from engine.models.vace import (
    VACE_CONFIGS,
    VaceConfig,
    VaceInputs,
    forward_stream_vace,
    forward_vace,
    load_vace,
    noised_refs,
    random_vace,
    vace_cross_kv,
    vace_rope,
)
from engine.models.wan import CONFIGS, CONTEXT, DENOISE, SELF, WanModel, init_random_, rope_table
from engine.weights.checkpoint import WeightsError

CFG = CONFIGS["tiny"]
VCFG = VACE_CONFIGS["tiny"]


def tiny_pair(seed: int = 0):
    model = init_random_(WanModel(CFG), seed).eval()
    vace = random_vace(CFG, VCFG, seed=seed + 1)
    return model, vace


def diffusers_vace_twin(model, vace):
    from diffusers import WanVACETransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    c = model.cfg
    ref = WanVACETransformer3DModel(
        **diffusers_wan_kwargs(c),
        vace_layers=list(vace.vcfg.layers),
        vace_in_channels=vace.vcfg.in_dim,
    )
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd.update({k: v.clone() for k, v in vace.state_dict().items()})
    ref.load_state_dict(convert_wan_transformer_to_diffusers(sd), strict=True)
    return ref.eval()


def inputs(frames=3, h=4, w=6, t=(750.0,)):
    B = len(t)
    x = torch.randn(B, CFG.in_dim, frames, h, w)
    text = torch.randn(B, CFG.text_len, CFG.text_dim)
    text[:, 5:] = 0
    ctx = torch.randn(B, 96, frames, h, w)
    return x, torch.tensor(t), text, ctx


@pytest.mark.parametrize("scale", [1.0, 0.4, 2.0])
def test_matches_diffusers(scale):
    model, vace = tiny_pair()
    ref = diffusers_vace_twin(model, vace)
    x, t, text, ctx = inputs()
    s = torch.full((len(VCFG.layers),), scale)
    with torch.no_grad():
        ours = forward_vace(model, vace, x, t, text, ctx, scale)
        theirs = ref(x, t, text, control_hidden_states=ctx, control_hidden_states_scale=s)[0]
        base = model(x, t, text)
    assert rel_err(ours, theirs) <= 1e-4
    assert rel_err(base, theirs) > 1e-2  # the hints matter: the comparison can fail


def test_matches_diffusers_other_layers_and_batch():
    model = init_random_(WanModel(replace(CFG, layers=4)))
    vcfg = VaceConfig(layers=(0, 2, 3))
    vace = random_vace(model.cfg, vcfg, seed=5)
    ref = diffusers_vace_twin(model.eval(), vace)
    x, t, text, ctx = inputs(frames=2, h=6, w=4, t=(1000.0, 250.0))
    with torch.no_grad():
        ours = forward_vace(model, vace, x, t, text, ctx)
        theirs = ref(x, t, text, control_hidden_states=ctx)[0]
    assert rel_err(ours, theirs) <= 1e-4


def test_scale_zero_is_base_bit_for_bit():
    model, vace = tiny_pair()
    x, t, text, ctx = inputs()
    with torch.no_grad():
        base = model(x, t, text)
        assert torch.equal(forward_vace(model, vace, x, t, text, ctx, 0.0), base)
        assert torch.equal(forward_vace(model, vace, x, t, text, None, 1.0), base)
        # streaming: every cache mode, with and without a VACE input at scale 0
        hp, wp = x.shape[3] // 2, x.shape[4] // 2
        fsl = hp * wp
        kv = model.cross_kv(text)
        vin = VaceInputs(
            ctx, vace_cross_kv(model, vace, text), vace_rope(CFG, 0, hp, wp), scale=0.0
        )
        for mode, pos in ((SELF, (0, 1, 2)), (CONTEXT, (1, 2, 0)), (DENOISE, (3, 4, 5))):
            rope = rope_table(CFG, pos, hp, wp)
            caches = []
            for _ in range(2):
                torch.manual_seed(3)
                cache = KVCache(
                    CFG.layers, fsl, CFG.heads, CFG.head_dim, device="cpu", dtype=torch.float32
                )
                for layer in cache:
                    layer.k.normal_(), layer.v.normal_()
                caches.append(cache)
            a = model.forward_stream(x, t, kv, rope, caches[0], mode, None)
            b = forward_stream_vace(model, vace, x, t, kv, rope, caches[1], mode, None, vin)
            c = forward_stream_vace(model, None, x, t, kv, rope, caches[1], mode, None)
            assert torch.equal(a, b) and torch.equal(a, c)


def test_stream_hints_equal_one_shot_on_a_chunk():
    """A first block (mode SELF, positions 0..2) with hints equals the one-shot VACE
    forward of those 3 frames: the streaming hint path is the oracle-checked one."""
    model, vace = tiny_pair(2)
    x, t, text, ctx = inputs(frames=3)
    hp, wp = 2, 3
    with torch.no_grad():
        one = forward_vace(model, vace, x, t, text, ctx, 0.7)
        vin = VaceInputs(
            ctx,
            vace_cross_kv(model, vace, text),
            vace_rope(CFG, 0, hp, wp, current=(0, 1, 2)),
            scale=0.7,
        )
        rope = rope_table(CFG, (0, 1, 2), hp, wp)
        got = forward_stream_vace(
            model, vace, x, t, model.cross_kv(text), rope, None, SELF, vin=vin
        )
    assert rel_err(got, one) <= 1e-5


def test_refs_in_vace_branch_match_one_shot_reference_layout():
    """With reference frames, the VACE branch sees [refs, current] like Wan's VACE sees
    [refs, video]: the hints it gives the current tokens equal those of diffusers'
    one-shot model run on the concatenated sequence (positions shifted by r, which RoPE
    does not see), when the main stream is a single block with the refs in front."""
    model, vace = tiny_pair(4)
    ref = diffusers_vace_twin(model, vace)
    r, hp, wp = 2, 2, 3
    x, t, text, ctx = inputs(frames=3)
    ref_lat = torch.randn(1, 16, r, 4, 6)
    ref_ctx = torch.cat([ref_lat, torch.zeros(1, 80, r, 4, 6)], dim=1)
    noise = torch.randn_like(ref_lat)
    xr = noised_refs(ref_lat, noise, 0.75)
    # our hints for the current tokens
    with torch.no_grad():
        h = model.patchify(torch.cat([xr, x], 2))
        _, e0 = model.embed_time(t)
        vrope = vace_rope(CFG, r, hp, wp, current=(0, 1, 2))
        hints = vace.hints(
            h,
            torch.cat([ref_ctx, ctx], 2),
            e0,
            vace_cross_kv(model, vace, text),
            vrope,
            model.attn,
        )
        # diffusers' hints, recorded by hooking its VACE blocks' outputs
        got = []
        hooks = [b.register_forward_hook(lambda m, i, o: got.append(o[0])) for b in ref.vace_blocks]
        ref(
            torch.cat([xr, x], 2),
            t,
            text,
            control_hidden_states=torch.cat([ref_ctx, ctx], 2),
        )
        for hk in hooks:
            hk.remove()
    assert len(got) == len(hints)
    for a, b in zip(hints, got, strict=True):
        assert rel_err(a, b) <= 1e-4
    # and the streaming call takes the same refs and returns the current block only
    vin = VaceInputs(ctx, vace_cross_kv(model, vace, text), vace_rope(CFG, r, hp, wp), ref_ctx, xr)
    with torch.no_grad():
        out = forward_stream_vace(
            model, vace, x, t, model.cross_kv(text), rope_table(CFG, (3, 4, 5), hp, wp), vin=vin
        )
    assert out.shape == x.shape


def test_bad_context_is_refused():
    model, vace = tiny_pair()
    x, t, text, ctx = inputs()
    with pytest.raises(ValueError, match="VACE context must be"):
        forward_vace(model, vace, x, t, text, ctx[:, :95])
    vin = VaceInputs(ctx, vace_cross_kv(model, vace, text), vace_rope(CFG, 1, 2, 3))
    with pytest.raises(ValueError, match="rope table"):
        forward_stream_vace(
            model, vace, x, t, model.cross_kv(text), rope_table(CFG, (3, 4, 5), 2, 3), vin=vin
        )
    with pytest.raises(ValueError, match="at most 3"):
        vace_rope(CFG, 4, 2, 3)
    with pytest.raises(ValueError, match="start at 0"):
        random_vace(CFG, VaceConfig(layers=(1,)))


def test_load_vace_roundtrip_and_errors(tmp_path: Path):
    from safetensors.torch import save_file

    _, vace = tiny_pair()
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in vace.state_dict().items()}
    f = tmp_path / "vace.safetensors"
    save_file(sd, str(f))
    got = load_vace(f, CFG, dtype=torch.float32)
    assert got.vcfg.layers == (0, 1)
    for k, v in got.state_dict().items():
        assert torch.equal(v, sd[k].float()), k
    assert got.vace_blocks[0].modulation.dtype == torch.float32
    # a file with other keys too (a full VACE model) still loads the VACE part
    save_file({**sd, "blocks.0.x": torch.zeros(1)}, str(tmp_path / "full.safetensors"))
    load_vace(tmp_path / "full.safetensors", CFG, dtype=torch.float32, vcfg=VCFG)
    save_file({"blocks.0.x": torch.zeros(1)}, str(tmp_path / "none.safetensors"))
    with pytest.raises(WeightsError, match="no VACE weights"):
        load_vace(tmp_path / "none.safetensors", CFG)
    bad = dict(sd)
    bad["vace_patch_embedding.weight"] = torch.zeros(CFG.dim, 95, 1, 2, 2, dtype=torch.bfloat16)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError, match="vace_patch_embedding.weight"):
        load_vace(tmp_path / "bad.safetensors", CFG)
    assert len(VACE_CONFIGS["14b"].layers) == 8 and VACE_CONFIGS["14b"].layers[-1] == 35


def test_rope_refs_positions():
    cos, _ = vace_rope(CFG, 2, 1, 1)
    ref_cos, _ = rope_table(CFG, (-2, -1, 3, 4, 5), 1, 1)
    assert torch.equal(cos, ref_cos)
    assert not math.isclose(cos[0, 0, 0].item(), cos[2, 0, 0].item())


# --------------------------------------------------------------------------- context


@pytest.fixture(scope="module")
def vae_pair():
    """Our tiny VAE and diffusers' AutoencoderKLWan on the same weights."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from engine.models.wan_vae import CONFIGS as VAE_CONFIGS
    from engine.models.wan_vae import random_wan_vae

    vae = random_wan_vae(VAE_CONFIGS["tiny"], seed=3)
    ref = AutoencoderKLWan(base_dim=8, z_dim=16)
    sd = {k: v.clone() for k, v in vae.state_dict().items()}
    ref.load_state_dict(convert_wan_vae_to_diffusers(sd), strict=True)
    return vae, ref.eval()


def pipeline_oracle(ref_vae):
    """diffusers' WanVACEPipeline condition helpers, bound to a stand-in `self` holding only
    what they read (the VAE and the scale factors): the real functions, no pipeline load."""
    from diffusers import WanVACEPipeline

    fake = SimpleNamespace(
        vae=ref_vae,
        vae_scale_factor_temporal=4,
        vae_scale_factor_spatial=8,
        transformer=SimpleNamespace(config=SimpleNamespace(patch_size=(1, 2, 2))),
        transformer_2=None,
        _execution_device=torch.device("cpu"),
    )

    def context(video, mask, refs=((),)):
        refs = [list(r) for r in refs]  # the pipeline passes [[]] when there are none
        lat = WanVACEPipeline.prepare_video_latents(fake, video, mask, refs, None, "cpu")
        masks = WanVACEPipeline.prepare_masks(fake, mask, refs)
        return torch.cat([lat, masks], dim=1)

    return context


def video_and_mask(t, h=16, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    video = torch.rand(1, 3, t, h, w, generator=g) * 2 - 1
    mask = (torch.rand(1, 1, t, h // 8, w // 8, generator=g) > 0.5).float()
    mask = mask.repeat_interleave(8, 3).repeat_interleave(8, 4)
    mask[..., :3, :5] = 0.3  # soft values: binarised at 0.5 like diffusers
    return video, mask


def test_context_matches_diffusers_first_block(vae_pair):
    from engine.stream.vace_context import VaceContextEncoder

    vae, ref = vae_pair
    video, mask = video_and_mask(9)
    with torch.no_grad():
        want = pipeline_oracle(ref)(video, mask)
        got = VaceContextEncoder(vae).encode_block(video, mask)
    assert got.shape == want.shape == (1, 96, 3, 2, 4)
    assert rel_err(got[:, :32], want[:, :32]) <= 1e-4
    assert torch.equal(got[:, 32:], want[:, 32:])
    # no mask = all ones: nothing kept, all to regenerate
    with torch.no_grad():
        ones = VaceContextEncoder(vae).encode_block(video)
        want1 = pipeline_oracle(ref)(video, torch.ones_like(mask))
    assert rel_err(ones, want1) <= 1e-4


def test_context_streams_like_whole_video(vae_pair):
    """Blocks of 9 then 12 frames give the whole 21-frame encode for the 32 video channels
    (causal cache carried); the mask channels are the per-block nearest-exact fold."""
    from engine.stream.vace_context import VaceContextEncoder, fold_mask

    vae, ref = vae_pair
    video, mask = video_and_mask(21, h=16, w=16, seed=1)
    enc = VaceContextEncoder(vae)
    with torch.no_grad():
        whole = pipeline_oracle(ref)(video, mask)
        a = enc.encode_block(video[:, :, :9], mask[:, :, :9])
        b = enc.encode_block(video[:, :, 9:], mask[:, :, 9:])
    assert rel_err(torch.cat([a, b], 2)[:, :32], whole[:, :32]) <= 1e-4
    assert torch.equal(b[:, 32:], fold_mask(mask[:, :, 9 + torch.tensor([2, 6, 10])], 3))
    # cell (row offset 1, col offset 2) of latent pixel (0, 0) is channel 8 + 2
    assert b[0, 32 + 10, 0, 0, 0] == mask[0, 0, 11, 1, 2]
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        enc.encode_block(video[:, :, :10])
    with pytest.raises(ValueError, match="VACE mask must be"):
        enc.encode_block(video[:, :, :12], mask[:, :, :8])
    # a 1 + 4k block is a video start again: same as a fresh encoder
    with torch.no_grad():
        again = enc.encode_block(video[:, :, :9], mask[:, :, :9])
    assert torch.equal(again, a)
    # a 12-frame block with nothing to continue (after a loss): its first frame is put in
    # front as the video start, and the 3 latents are those of the 13-frame video's end
    enc.reset()
    with torch.no_grad():
        got = enc.encode_block(video[:, :, 9:], mask[:, :, 9:])
        lead = torch.cat([video[:, :, 9:10], video[:, :, 9:]], 2)
        lead_m = torch.cat([mask[:, :, 9:10], mask[:, :, 9:]], 2)
        want = pipeline_oracle(ref)(lead, lead_m)[:, :32, 1:]
    assert got.shape == (1, 96, 3, 2, 2)
    assert rel_err(got[:, :32], want) <= 1e-4
    assert torch.equal(got[:, 32:], b[:, 32:])


def write_png(path: Path, rgb):
    from PIL import Image

    Image.fromarray(rgb).save(path)
    return path


def test_reference_images(vae_pair, tmp_path: Path):
    import numpy as np

    from engine.stream.vace_context import AssetPathError, ReferenceImages, to_model_frame

    vae, ref = vae_pair
    assets = tmp_path / "assets"
    assets.mkdir()
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)
    write_png(assets / "a.png", img)
    big = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    write_png(assets / "b.png", big)
    outside = write_png(tmp_path / "secret.png", img)
    (assets / "link.png").symlink_to(outside)
    (assets / "notes.png").write_text("not an image")

    refs = ReferenceImages(vae, width=48, height=32, assets_dir=assets)
    assert refs.tensors() == (None, None, None)
    refs.set_path(1, "a.png")
    lat, ctx, noise = refs.tensors()
    # the reference context is diffusers' reference latent, zero-padded to 96 channels
    video = torch.zeros(1, 3, 1, 32, 48)
    with torch.no_grad():
        want = pipeline_oracle(ref)(
            video, torch.ones(1, 1, 1, 32, 48), [[to_model_frame(img)[0, :, 0]]]
        )
    assert ctx.shape == (1, 96, 1, 4, 6) and noise.shape == lat.shape
    assert rel_err(ctx[:, :32], want[:, :32, :1]) <= 1e-4
    assert torch.equal(ctx[:, 32:], want[:, 32:, :1]) and not ctx[:, 16:].any()

    # crop to fill: a square image fills 48x32 by a centre crop
    refs.set_path(2, assets / "b.png")
    assert refs.count == 2 and refs.tensors()[1].shape[2] == 2
    v = refs.version
    refs.set_path(2, "b.png")  # same file again: cached, set unchanged
    assert refs.version == v and len(refs._cache) == 2

    for bad, msg in [
        ("../secret.png", "not allowed"),
        (outside, "outside the assets folder"),
        ("link.png", "outside the assets folder"),
        ("missing.png", "no such file"),
        ("notes.png", "cannot be read as an image"),
    ]:
        with pytest.raises(AssetPathError, match=msg):
            refs.set_path(3, bad)
        assert refs.version == v and refs.count == 2  # nothing changed
    with pytest.raises(ValueError, match="slot must be 1..3"):
        refs.set_path(4, "a.png")

    refs.set_frame(3, np.concatenate([img, np.full((32, 48, 1), 255, np.uint8)], -1))
    assert refs.count == 3
    refs.clear(1)
    assert refs.count == 2 and torch.equal(
        refs.tensors()[0][:, :, :1], lat * 0 + refs.tensors()[0][:, :, :1]
    )
    refs.clear()
    assert refs.count == 0 and refs.tensors() == (None, None, None)


# --------------------------------------------------------------------------- V2V


def test_v2v_strength_zero_is_the_encoded_input(vae_pair):
    from engine.models.wan_vae import WanStreamEncoder
    from engine.stream.v2v import v2v_start, v2v_steps

    vae, _ = vae_pair
    video, _ = video_and_mask(9)
    enc = WanStreamEncoder(vae).encode(video)
    noise = torch.randn_like(enc)
    assert torch.equal(v2v_start(enc, noise, 0.0), enc)
    assert v2v_steps((1000, 750, 500, 250), 0.0) == ()
    assert torch.equal(v2v_start(enc, noise, 1.0), noise)
    x = v2v_start(enc, noise, 0.3)
    assert torch.allclose(x, 0.3 * noise + 0.7 * enc)
    # a model that predicts the exact velocity (noise - x0) gets E(frames) back at any s
    from engine.stream.schedule import renoise, sigma, x0_from_velocity

    for s in (0.0, 0.25, 0.6, 1.0):
        x = v2v_start(enc, noise, s)
        steps = v2v_steps((1000, 750, 500, 250), s)
        x0 = x
        for i, t in enumerate(steps):
            x0 = x0_from_velocity(x, noise - enc, sigma(t))
            if i + 1 < len(steps):
                x = renoise(x0, noise, sigma(steps[i + 1]))
        assert torch.allclose(x0, enc, atol=1e-5)


def test_v2v_steps_and_motion():
    from engine.stream.v2v import adapt_strength, motion, v2v_steps

    assert v2v_steps((1000, 750, 500, 250), 1.0) == (1000, 750, 500, 250)
    assert v2v_steps((1000, 750, 500, 250), 0.5) == (500, 250)
    assert v2v_steps((1000, 750), 0.6) == (600,)
    with pytest.raises(ValueError, match="0..1"):
        v2v_steps((1000,), 1.5)
    still = torch.zeros(1, 3, 5, 8, 8)
    assert motion(still) == 0.0
    flip = torch.cat([-torch.ones(1, 3, 1, 8, 8), torch.ones(1, 3, 1, 8, 8)], 2)
    assert motion(flip) == 1.0
    # one frame-to-frame step of 0.1 on the 0..1 scale (0.2 in [-1, 1]): motion 0.5
    ramp = torch.zeros(1, 3, 3, 8, 8)
    ramp[:, :, 2] = 0.2
    assert motion(ramp) == pytest.approx(0.5)
    assert motion(still[:, :, :1], previous=ramp[:, :, 2:]) == pytest.approx(0.5)
    s = 0.3
    for _ in range(50):
        s = adapt_strength(s, 0.0)
    assert s == pytest.approx(0.8)
    assert adapt_strength(0.5, 1.0) == pytest.approx(0.9 * 0.6 + 0.05)
    assert adapt_strength(0.5, 7.0) == adapt_strength(0.5, 1.0)


def test_conditioner_drives_a_streaming_block(vae_pair, tmp_path: Path):
    """The per-block glue: a first block (9 frames) with a reference image gives the hints
    of [refs + current] and the 3-frame output; text-only blocks give no VACE input; the
    base forward is untouched without it."""
    import numpy as np

    from engine.stream.vace_context import VaceConditioner

    vae, _ = vae_pair
    model, vace = tiny_pair(6)
    assets = tmp_path
    write_png(assets / "r.png", np.full((16, 32, 3), 90, np.uint8))
    cond = VaceConditioner(model, vace, vae, height=16, width=32, assets_dir=assets)
    video, mask = video_and_mask(9)
    text = torch.randn(1, CFG.text_len, CFG.text_dim)
    cond.prepare_block(video, mask, text, "a")
    assert cond.step_inputs(0.75, 1.0).refs_ctx is None
    cond.refs.set_path(1, "r.png")
    vin = cond.step_inputs(0.75, 1.0)
    lat, rctx, noise = cond.refs.tensors()
    assert (
        torch.equal(vin.refs_x, 0.25 * lat + 0.75 * noise)
        and vin.rope[0].shape[0] == (1 + 3) * 1 * 2
    )  # (ref + 3 frames) x hp x wp
    x = torch.randn(1, 16, 3, 2, 4)
    t = torch.tensor([750.0])
    kv = model.cross_kv(text)
    rope = rope_table(CFG, (0, 1, 2), 1, 2)
    with torch.no_grad():
        out = forward_stream_vace(model, vace, x, t, kv, rope, None, SELF, vin=vin)
        base = model.forward_stream(x, t, kv, rope, None, SELF)
    assert out.shape == x.shape and not torch.equal(out, base)
    cond.prepare_block(None, None, text, "a")  # input lost: text only
    assert cond.step_inputs(0.5, 1.0) is None


def test_fp8_vace_stays_close_to_full_precision():
    """`quantize_vace` (the preset's `vace.fp8`): every VACE-block linear becomes fp8 and the
    hinted forward stays within e4m3's error of the full-precision one. _scaled_mm runs on
    the CPU too, so this runs here."""
    from engine.models.fp8 import Fp8Linear
    from engine.models.vace import quantize_vace

    model, vace = tiny_pair(seed=3)
    x, t, text, ctx = inputs()
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in vace.vace_blocks.modules())
    with torch.no_grad():
        full = forward_vace(model, vace, x, t, text, ctx)
        base = model(x, t, text)
        assert quantize_vace(vace) == n_linear
        assert sum(isinstance(m, Fp8Linear) for m in vace.vace_blocks.modules()) == n_linear
        q = forward_vace(model, vace, x, t, text, ctx)
    assert 1e-6 < rel_err(q, full) < 0.05  # really quantised, and close
    assert rel_err(q - base, full - base) < 0.15  # the hints themselves survive
