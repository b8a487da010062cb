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


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def diffusers_vace_twin(model, vace):
    from diffusers import WanVACETransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    c = model.cfg
    ref = WanVACETransformer3DModel(
        patch_size=c.patch,
        num_attention_heads=c.heads,
        attention_head_dim=c.head_dim,
        in_channels=c.in_dim,
        out_channels=c.out_dim,
        text_dim=c.text_dim,
        freq_dim=c.freq_dim,
        ffn_dim=c.ffn_dim,
        num_layers=c.layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=c.eps,
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
                caches.append(
                    [
                        (torch.randn(1, 6 * fsl, CFG.heads, CFG.head_dim),) * 2
                        for _ in range(CFG.layers)
                    ]
                )
            a = model.forward_stream(x, t, kv, rope, caches[0], mode, 2 * fsl, None)
            b = forward_stream_vace(
                model, vace, x, t, kv, rope, caches[1], mode, 2 * fsl, None, vin
            )
            c = forward_stream_vace(model, None, x, t, kv, rope, caches[1], mode, 2 * fsl, None)
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


_ = SimpleNamespace  # used by the context tests below
