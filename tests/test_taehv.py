"""TAEHV: the taew2_1 key layout, streaming equals whole-sequence, a frame-by-frame
reference of the temporal semantics, and Wan-equal frame counts."""

from __future__ import annotations

import pytest
import torch

from engine.models.taehv import (
    CONFIGS,
    MemBlock,
    TAEHVImageEncoder,
    TAEHVStreamDecoder,
    TAEHVStreamEncoder,
    TGrow,
    TPool,
    load_taehv,
    random_taehv,
)
from engine.weights.checkpoint import WeightsError


def taew2_1_layout(
    enc: int, dec: tuple[int, int, int, int], latent: int = 16
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a taew2_1-style file, spelled out from the published layout
    (encoder/decoder as flat sequences; MemBlock = conv.0/2/4 with 2C inputs first)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, c_in, c_out, k=3, bias=True):
        shapes[f"{name}.weight"] = (c_out, c_in, k, k)
        if bias:
            shapes[f"{name}.bias"] = (c_out,)

    def memblock(name, c):
        conv(f"{name}.conv.0", 2 * c, c)
        conv(f"{name}.conv.2", c, c)
        conv(f"{name}.conv.4", c, c)

    conv("encoder.0", 3, enc)
    for level, base in enumerate((2, 7, 12)):
        stride = 2 if level < 2 else 1
        shapes[f"encoder.{base}.conv.weight"] = (enc, enc * stride, 1, 1)  # TPool
        conv(f"encoder.{base + 1}", enc, enc, bias=False)
        for j in range(3):
            memblock(f"encoder.{base + 2 + j}", enc)
    conv("encoder.17", enc, latent)
    conv("decoder.1", latent, dec[0])
    for level, base in enumerate((3, 9, 15)):
        c, stride = dec[level], (1, 2, 2)[level]
        for j in range(3):
            memblock(f"decoder.{base + j}", c)
        shapes[f"decoder.{base + 4}.conv.weight"] = (c * stride, c, 1, 1)  # TGrow
        conv(f"decoder.{base + 5}", c, dec[level + 1], bias=False)
    conv("decoder.22", dec[3], 3)
    return shapes


def write_file(path, shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {
        k: torch.randn(s, generator=g) * (0.5 / (s[1] * s[2] * s[3]) ** 0.5 if len(s) == 4 else 0.1)
        for k, s in shapes.items()
    }
    torch.save(sd, path)
    return sd


def reference_apply(layers, frames: list[torch.Tensor]) -> torch.Tensor:
    """One frame at a time, depth first: a MemBlock sees its previous input frame (zeros
    at first), TPool waits for `stride` frames, TGrow emits `stride` frames in order."""
    memory: dict[int, torch.Tensor] = {}
    pooled: dict[int, list[torch.Tensor]] = {}
    out: list[torch.Tensor] = []

    def push(x, i):
        if i == len(layers):
            out.append(x)
            return
        layer = layers[i]
        if isinstance(layer, MemBlock):
            past = memory.get(i, torch.zeros_like(x))
            memory[i] = x
            push(layer(x, past), i + 1)
        elif isinstance(layer, TPool):
            pooled.setdefault(i, []).append(x)
            if len(pooled[i]) == layer.stride:
                push(layer.conv(torch.cat(pooled.pop(i), 1)), i + 1)
        elif isinstance(layer, TGrow):
            for f in layer.conv(x).chunk(layer.stride, 1):
                push(f, i + 1)
        else:
            push(layer(x), i + 1)

    for f in frames:
        push(f, 0)
    return torch.stack(out, 1)


@pytest.fixture(scope="module")
def tae():
    return random_taehv(CONFIGS["tiny"], seed=1)


def test_full_config_matches_taew2_1_layout():
    with torch.device("meta"):
        from engine.models.taehv import TAEHV

        model = TAEHV(CONFIGS["taew2_1"])
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert own == taew2_1_layout(64, (256, 128, 64, 64))


@torch.no_grad()
def test_whole_sequence_matches_frame_by_frame_reference(tae):
    z = torch.randn(1, 4, 16, 4, 4)
    whole = tae.decode_video(z)
    ref = reference_apply(tae.decoder, list(z.unbind(1))).clamp(0, 1)
    assert whole.shape == ref.shape == (1, 16, 3, 32, 32)
    torch.testing.assert_close(whole, ref, rtol=1e-5, atol=1e-6)
    x = torch.rand(1, 8, 3, 32, 32)
    torch.testing.assert_close(
        tae.encode_video(x), reference_apply(tae.encoder, list(x.unbind(1))), rtol=1e-5, atol=1e-6
    )


@torch.no_grad()
def test_stream_decode_equals_whole_and_counts_match_wan(tae):
    z = torch.randn(2, 16, 12, 4, 6)
    whole = tae.decode_video(z.transpose(1, 2))[:, tae.frames_to_trim :].transpose(1, 2) * 2 - 1
    dec = TAEHVStreamDecoder(tae)
    blocks = [dec.decode(z[:, :, i : i + 3]) for i in range(0, 12, 3)]
    assert [b.shape[2] for b in blocks] == [9, 12, 12, 12]  # Wan's 1+4(n-1), then 4n
    out = torch.cat(blocks, 2)
    assert out.shape == (2, 3, 45, 32, 48)
    assert out.min() >= -1 and out.max() <= 1
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-6)
    dec.reset()
    torch.testing.assert_close(dec.decode(z[:, :, :3]), whole[:, :, :9], rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_stream_encode_equals_whole_with_wan_alignment(tae):
    x = torch.rand(1, 3, 13, 32, 32) * 2 - 1
    x01 = (x.transpose(1, 2) + 1) / 2
    # Wan alignment: latent 0 <- frame 0 alone (repeated in front), then groups of 4
    whole = tae.encode_video(torch.cat([x01[:, :1]] * 3 + [x01], 1)).transpose(1, 2)
    enc = TAEHVStreamEncoder(tae)
    parts = [enc.encode(x[:, :, :5]), enc.encode(x[:, :, 5:13])]
    assert [p.shape[2] for p in parts] == [2, 2]
    torch.testing.assert_close(torch.cat(parts, 2), whole, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 4"):
        enc.encode(x[:, :, :5])
    img = TAEHVImageEncoder(tae).encode_image(x[:, :, :1])
    torch.testing.assert_close(img, whole[:, :, :1], rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_file_in_taew2_1_layout_loads(tmp_path):
    shapes = taew2_1_layout(8, (16, 8, 8, 8))
    sd = write_file(tmp_path / "taew2_1.pth", shapes)
    tae = load_taehv(tmp_path / "taew2_1.pth")
    for k, v in tae.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0)
    # a TGrow stored wider than used (time growth trained there): the last channels are kept
    wide = dict(sd)
    wide["decoder.7.conv.weight"] = torch.cat(
        [torch.zeros_like(sd["decoder.7.conv.weight"]), sd["decoder.7.conv.weight"]]
    )
    torch.save(wide, tmp_path / "wide.pth")
    torch.testing.assert_close(
        load_taehv(tmp_path / "wide.pth").decoder[7].conv.weight, sd["decoder.7.conv.weight"]
    )


def test_wrong_files_fail_clearly(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_taehv(tmp_path / "taew2_1.pth")
    write_file(tmp_path / "taew2_2.pth", taew2_1_layout(8, (16, 8, 8, 8), latent=48))
    with pytest.raises(WeightsError, match="48 latent channels"):
        load_taehv(tmp_path / "taew2_2.pth")
    shapes = taew2_1_layout(8, (16, 8, 8, 8))
    del shapes["decoder.16.conv.2.bias"]
    write_file(tmp_path / "cut.pth", shapes)
    with pytest.raises(WeightsError, match=r"cut\.pth.*decoder\.16\.conv\.2\.bias"):
        load_taehv(tmp_path / "cut.pth")
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="not a TAEHV"):
        load_taehv(tmp_path / "other.pth")


def test_bad_latents_refused(tae):
    dec = TAEHVStreamDecoder(tae)
    with pytest.raises(ValueError, match="not a multiple of 16"):
        dec.decode(torch.randn(1, 16, 3, 3, 4))
    assert dec.started is False  # nothing changed


def test_stream_shape_change_needs_reset(tae):
    dec = TAEHVStreamDecoder(tae)
    dec.decode(torch.randn(1, 16, 3, 4, 4))
    with pytest.raises(ValueError, match="reset"):
        dec.decode(torch.randn(1, 16, 3, 4, 6))
    dec.reset()
    assert dec.decode(torch.randn(1, 16, 3, 4, 6)).shape == (1, 3, 9, 32, 48)


def test_build_decoder_choices():
    from engine.models.decoders import build_decoder
    from engine.models.wan_vae import WanImageEncoder, WanStreamDecoder

    dec, enc = build_decoder("wan", tiny=True, device="cpu", dtype=torch.float32)
    assert isinstance(dec, WanStreamDecoder) and isinstance(enc, WanImageEncoder)
    assert enc.vae is dec.vae  # one VAE for both
    dec, enc = build_decoder("tae", tiny=True, device="cpu", dtype=torch.float32)
    assert isinstance(dec, TAEHVStreamDecoder) and isinstance(enc, WanImageEncoder)
    assert not hasattr(enc.vae, "decoder")  # only Wan's encoder is built for the anchor
    z = enc.encode_image(torch.rand(1, 3, 1, 32, 32) * 2 - 1)
    assert z.shape == (1, 16, 1, 4, 4)
    assert dec.decode(z).shape == (1, 3, 1, 32, 32)
    dec, enc = build_decoder("tae", tiny=True, device="cpu", dtype=torch.float32, anchor="tae")
    assert isinstance(enc, TAEHVImageEncoder)
    with pytest.raises(ValueError, match="unknown decoder kind 'vq'"):
        build_decoder("vq", tiny=True, device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="vae_path"):  # refused before reading any file
        build_decoder(
            "tae", tiny=False, device="cpu", dtype=torch.float32, path="nowhere/taew2_1.pth"
        )


@torch.no_grad()
def test_channels_last_and_compiled_decoders_give_the_same_frames():
    """The GPU knobs change layout and execution, never the frames (CPU, eager backend)."""
    from engine.models.decoders import build_decoder

    z = torch.randn(1, 16, 4, 4, 4)
    for kind in ("wan", "tae"):
        plain, _ = build_decoder(
            kind, tiny=True, device="cpu", dtype=torch.float32, channels_last=False
        )
        fast, enc = build_decoder(
            kind, tiny=True, device="cpu", dtype=torch.float32, channels_last=True
        )
        assert enc.vae.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
        want = [plain.decode(z[:, :, :2]), plain.decode(z[:, :, 2:])]
        got = [fast.decode(z[:, :, :2]), fast.decode(z[:, :, 2:])]
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    dec, _ = build_decoder("tae", tiny=True, device="cpu", dtype=torch.float32)
    ref = [dec.decode(z[:, :, :3]), dec.decode(z[:, :, 3:])]
    dec.reset()
    dec.compile(backend="eager")
    for a, b in zip([dec.decode(z[:, :, :3]), dec.decode(z[:, :, 3:])], ref, strict=True):
        torch.testing.assert_close(a, b)
