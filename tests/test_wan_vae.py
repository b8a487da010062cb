"""Wan VAE against diffusers' AutoencoderKLWan (oracle), streaming against one-shot."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from helpers import rel_err

from engine.models import wan_vae
from engine.models.wan_vae import (
    CONFIGS,
    WanImageEncoder,
    WanStreamDecoder,
    WanStreamEncoder,
    load_wan_vae,
    random_wan_vae,
)
from engine.weights.checkpoint import WeightsError


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    """A tiny VAE written in Wan-native naming as a .pth, with non-trivial norm gains."""
    vae = random_wan_vae(CONFIGS["tiny"], seed=3)
    g = torch.Generator().manual_seed(4)
    sd = {}
    for k, v in vae.state_dict().items():
        sd[k] = torch.rand(v.shape, generator=g) + 0.5 if k.endswith("gamma") else v.clone()
    path = tmp_path_factory.mktemp("vae") / "Wan2.1_VAE.pth"
    torch.save(sd, path)
    return path, sd


@pytest.fixture(scope="module")
def ours(tiny_file):
    return load_wan_vae(tiny_file[0])


@pytest.fixture(scope="module")
def oracle(tiny_file):
    ref = AutoencoderKLWan(base_dim=8, z_dim=16)
    ref.load_state_dict(convert_wan_vae_to_diffusers(dict(tiny_file[1])), strict=True)
    return ref.eval()


def test_file_has_wan_native_names(tiny_file):
    keys = set(tiny_file[1])
    for k in (
        "encoder.conv1.weight",
        "encoder.downsamples.0.residual.0.gamma",
        "encoder.downsamples.3.shortcut.weight",
        "encoder.downsamples.5.time_conv.weight",
        "encoder.middle.1.to_qkv.weight",
        "encoder.head.2.weight",
        "conv1.weight",
        "conv2.weight",
        "decoder.upsamples.3.time_conv.weight",
        "decoder.upsamples.3.resample.1.weight",
        "decoder.upsamples.4.shortcut.weight",
        "decoder.head.0.gamma",
    ):
        assert k in keys, k


@torch.no_grad()
def test_decode_matches_diffusers(ours, oracle):
    z = torch.randn(1, 16, 5, 4, 6)
    ref = oracle.decode(z).sample
    out = ours.decode(z)
    assert out.shape == ref.shape == (1, 3, 17, 32, 48)
    assert (
        ref.abs() < 0.999
    ).float().mean() > 0.5  # not all clamped: the comparison means something
    assert rel_err(out, ref) <= 1e-4


@torch.no_grad()
def test_encode_matches_diffusers(ours, oracle):
    x = torch.rand(2, 3, 9, 32, 32) * 2 - 1
    ref = oracle.encode(x).latent_dist.mean
    out = ours.encode(x)
    assert out.shape == ref.shape == (2, 16, 3, 4, 4)
    assert rel_err(out, ref) <= 1e-4
    # the anchor path: one image, normalised per channel like diffusers' pipelines do
    img = x[:, :, :1]
    mean = torch.tensor(oracle.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(oracle.config.latents_std).view(1, 16, 1, 1, 1)
    want = (oracle.encode(img).latent_dist.mean - mean) / std
    assert rel_err(WanImageEncoder(ours).encode_image(img), want) <= 1e-4


@torch.no_grad()
def test_stream_decode_equals_whole(ours):
    # (latent by latent, Wan's own schedule, is what the diffusers oracle above does)
    z = torch.randn(1, 16, 9, 4, 4)
    whole = ours.decode(ours.denormalize(z))
    dec = WanStreamDecoder(ours)
    blocks = [dec.decode(z[:, :, i : i + 3]) for i in range(0, 9, 3)]
    assert [b.shape[2] for b in blocks] == [9, 12, 12]
    torch.testing.assert_close(torch.cat(blocks, 2), whole, rtol=1e-5, atol=1e-5)
    # reset starts a new stream: the first block again gives 9 frames, the same ones
    dec.reset()
    torch.testing.assert_close(dec.decode(z[:, :, :3]), whole[:, :, :9], rtol=1e-5, atol=1e-5)
    # sub-chunks inside a block (lower peak memory) change nothing either
    dec = WanStreamDecoder(ours, chunk=2)
    blocks = [dec.decode(z[:, :, i : i + 3]) for i in range(0, 9, 3)]
    assert [b.shape[2] for b in blocks] == [9, 12, 12]
    torch.testing.assert_close(torch.cat(blocks, 2), whole, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_stream_encode_equals_whole(ours):
    x = torch.rand(1, 3, 13, 32, 32) * 2 - 1
    whole = ours.normalize(ours.encode(x))
    enc = WanStreamEncoder(ours)
    parts = [enc.encode(x[:, :, :5]), enc.encode(x[:, :, 5:9]), enc.encode(x[:, :, 9:])]
    assert [p.shape[2] for p in parts] == [2, 1, 1]
    torch.testing.assert_close(torch.cat(parts, 2), whole, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 4"):
        enc.encode(x[:, :, :3])


def test_bad_inputs_refused(ours):
    dec = WanStreamDecoder(ours)
    with pytest.raises(ValueError, match="not a multiple of 16"):
        dec.decode(torch.randn(1, 16, 3, 5, 4))
    with pytest.raises(ValueError, match=r"\[B,16,n,h,w\]"):
        dec.decode(torch.randn(1, 8, 3, 4, 4))
    with pytest.raises(ValueError, match="not a multiple of 16"):
        WanImageEncoder(ours).encode_image(torch.zeros(1, 3, 1, 40, 32))
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        WanStreamEncoder(ours).encode(torch.zeros(1, 3, 4, 32, 32))
    # a stream that changes resolution without reset is refused, and its state is untouched
    dec.decode(torch.randn(1, 16, 3, 4, 4))
    with pytest.raises(ValueError, match="reset"):
        dec.decode(torch.randn(1, 16, 3, 6, 6))


def test_weights_errors(tmp_path, tiny_file):
    with pytest.raises(WeightsError, match="not found"):
        load_wan_vae(tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="bad.pth"):
        load_wan_vae(bad)
    other = tmp_path / "other.pth"
    torch.save({"blocks.0.weight": torch.zeros(2)}, other)
    with pytest.raises(WeightsError, match="not a Wan VAE"):
        load_wan_vae(other)
    sd = dict(tiny_file[1])
    del sd["decoder.head.2.bias"]
    trunc = tmp_path / "trunc.pth"
    torch.save(sd, trunc)
    with pytest.raises(WeightsError, match="decoder.head.2.bias"):
        load_wan_vae(trunc)
    # only the encoder when asked: the decoder's keys are not required
    enc_only = load_wan_vae(trunc, parts=("encoder",))
    assert not hasattr(enc_only, "decoder")


def test_resolution_check_names_reason():
    with pytest.raises(ValueError, match="multiple of 16"):
        wan_vae.check_frames(torch.zeros(1, 3, 1, 48, 56), "x")


class RecordingEncoder(WanImageEncoder):
    """The real encoder, remembering what it was asked to encode (not a mock)."""

    def __init__(self, vae):
        super().__init__(vae)
        self.seen: list[torch.Tensor] = []

    def encode_image(self, frame):
        self.seen.append(frame.clone())
        return super().encode_image(frame)


@pytest.mark.parametrize("kind", ["wan", "tae"])
def test_block_loop_with_vae(kind):
    """The session's block loop with a tiny transformer and each decoder: 9 then 12 frames,
    and from block 2 on the anchor is the encoding of the oldest of the last 9 frames."""
    from engine.models.decoders import build_decoder
    from engine.models.wan import CONFIGS as WAN_CONFIGS
    from engine.stream.session import BlockInputs, StreamSession
    from engine.weights.transformer import random_transformer

    cfg = WAN_CONFIGS["tiny"]
    decoder, encoder = build_decoder(kind, tiny=True, device="cpu", dtype=torch.float32)
    assert isinstance(encoder, WanImageEncoder)  # Wan's encoder is the anchor for both kinds
    encoder = RecordingEncoder(encoder.vae)
    session = StreamSession(
        random_transformer(cfg), height=32, width=48, decoder=decoder, encoder=encoder, timing=False
    )
    inputs = BlockInputs(
        text=torch.randn(1, cfg.text_len, cfg.text_dim), text_key="a", steps=[1000], seed=7
    )
    outs = [session.next_block(inputs) for _ in range(3)]
    assert [o.frames.shape for o in outs] == [(1, 3, t, 32, 48) for t in (9, 12, 12)]
    assert all(o.frames.abs().max() <= 1 for o in outs)
    video = torch.cat([o.frames for o in outs], 2)
    # before block 2 frames 0..20 exist; the oldest of the last 9 is frame 12
    assert len(encoder.seen) == 1
    torch.testing.assert_close(encoder.seen[0], video[:, :, 12:13])
    # reset: the decoder starts a new stream, the same seed gives the same first block
    session.reset()
    again = session.next_block(inputs)
    torch.testing.assert_close(again.frames, outs[0].frames)


def test_latent_stats_stay_float32_in_bf16():
    vae = random_wan_vae(CONFIGS["tiny"], dtype=torch.bfloat16, parts=("encoder",))
    assert "latents_mean" not in vae.state_dict()
    mu = torch.full((1, 16, 1, 2, 2), 1.0, dtype=torch.bfloat16)
    z = vae.normalize(mu)
    want = ((1.0 - torch.tensor(wan_vae.LATENTS_MEAN)) / torch.tensor(wan_vae.LATENTS_STD)).view(
        1, 16, 1, 1, 1
    )
    torch.testing.assert_close(z.float(), want.expand_as(z).to(torch.bfloat16).float())
    torch.testing.assert_close(vae.denormalize(z.float()), mu.float(), rtol=1e-2, atol=1e-2)


def test_bf16_model_takes_float32_latents_and_stays_close():
    """The session hands float32 latents to a bf16 VAE: cast inside, result near float32."""
    z = torch.randn(1, 16, 3, 4, 4)
    ref = WanStreamDecoder(random_wan_vae(CONFIGS["tiny"], seed=5)).decode(z)
    out = WanStreamDecoder(random_wan_vae(CONFIGS["tiny"], seed=5, dtype=torch.bfloat16)).decode(z)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert rel_err(out.float(), ref) < 0.05
