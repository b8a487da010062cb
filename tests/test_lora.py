"""LoRA files and live LoRA slots against diffusers + PEFT (oracle), and the properties the
stream needs: strength 0 is the base model bit for bit, merged equals side path, a slot
change leaves the others alone, bad files change nothing.

The oracle: the same random LoRA for the tiny Wan, written by the test in each layout
(diffusers/PEFT, Wan-native lora_down/up and lora_A/B, kohya flattened, with alpha and
diff_b), loaded into diffusers' `WanTransformer3DModel` through diffusers' own LoRA
loading (`WanLoraLoaderMixin.lora_state_dict` + `load_lora_adapter` + `set_adapters`)
and into ours through `engine.weights.lora` + `LoraSlots`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, diffusers_wan_kwargs, rel_err
from safetensors.torch import save_file

from engine.models.lora import LoraError, LoraLinear, LoraSlots
from engine.models.wan import CONFIGS, WanModel, fuse_qkv, init_random_
from engine.weights.lora import check_lora, load_lora, read_lora_header, summary

LINEARS = [
    "self_attn.q",
    "self_attn.k",
    "self_attn.v",
    "self_attn.o",
    "cross_attn.q",
    "cross_attn.k",
    "cross_attn.v",
    "cross_attn.o",
    "ffn.0",
    "ffn.2",
]
DIFFUSERS = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
LAYOUTS = ("diffusers", "wan", "wan_AB", "kohya")


def tiny(seed: int = 0) -> WanModel:
    return init_random_(WanModel(CONFIGS["tiny"]), seed).eval()


def twin(model: WanModel):
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    ref = WanTransformer3DModel(**diffusers_wan_kwargs(model.cfg))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ref.load_state_dict(convert_wan_transformer_to_diffusers(sd), strict=True)
    return ref.eval()


def random_lora(cfg, seed: int, rank: int = 4, alpha: float | None = 8.0, diff_b: bool = True):
    """Wan-native module -> {down, up, alpha, diff_b}: every attention and FFN linear."""
    g = torch.Generator().manual_seed(seed)
    shapes = {k: tuple(v.shape) for k, v in tiny().state_dict().items()}
    out = {}
    for i in range(cfg.layers):
        for n in LINEARS:
            o, inp = shapes[f"blocks.{i}.{n}.weight"]
            t = {
                "down": torch.randn(rank, inp, generator=g) * 0.2,
                "up": torch.randn(o, rank, generator=g) * 0.2,
            }
            if alpha is not None:
                t["alpha"] = torch.tensor(float(alpha))
            if diff_b:
                t["diff_b"] = torch.randn(o, generator=g) * 0.05
            out[f"blocks.{i}.{n}"] = t
    return out


def write_lora(lora: dict, layout: str, path) -> None:
    """The LoRA in one of the layouts found in the wild."""
    sd = {}
    for name, t in lora.items():
        if layout == "diffusers":
            i, rest = name.split(".", 2)[1], name.split(".", 2)[2]
            base = f"transformer.blocks.{i}.{DIFFUSERS[rest]}"
            assert "alpha" not in t  # diffusers' own files carry the scale in the weights
            sd[f"{base}.lora_A.weight"] = t["down"]
            sd[f"{base}.lora_B.weight"] = t["up"]
            if "diff_b" in t:
                sd[f"{base}.lora_B.bias"] = t["diff_b"]
            continue
        if layout == "kohya":
            base, d, u = "lora_unet_" + name.replace(".", "_"), "lora_down", "lora_up"
        else:
            base = "diffusion_model." + name
            d, u = ("lora_A", "lora_B") if layout == "wan_AB" else ("lora_down", "lora_up")
        sd[f"{base}.{d}.weight"] = t["down"]
        sd[f"{base}.{u}.weight"] = t["up"]
        if "alpha" in t:
            sd[f"{base}.alpha"] = t["alpha"]
        if "diff_b" in t:
            sd[f"{base}.diff_b"] = t["diff_b"]
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


def inputs(cfg, seed=3, frames=2, h=4, w=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.in_dim, frames, h, w, generator=g)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    text[:, 6:] = 0
    return x, torch.tensor([700.0]), text


def ours_with(model: WanModel, paths, strengths, settle: bool):
    """Load `paths` into slots 1.. and set `strengths`; with `settle`, one more update at
    the same strengths merges them into the weights (else the side path carries them)."""
    slots = LoraSlots(model)
    for n, p in enumerate(paths):
        slots.install(n, slots.prepare(load_lora(p)))
    padded = list(strengths) + [0.0] * (4 - len(strengths))
    slots.update(padded)
    if settle:
        slots.update(padded)
        assert slots.side_sites == 0
    else:
        assert strengths == [0.0] * len(strengths) or slots.side_sites > 0
    return slots


def theirs_with(model: WanModel, paths, strengths):
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    ref = twin(model)
    names = []
    for n, p in enumerate(paths):
        sd = WanLoraLoaderMixin.lora_state_dict(str(p))
        ref.load_lora_adapter(sd, adapter_name=f"l{n}", prefix="transformer")
        names.append(f"l{n}")
    ref.set_adapters(names, weights=list(strengths))
    return ref


# -------------------------------------------------------------------------- reading


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reads_onto_wan_names(tmp_path, layout):
    cfg = CONFIGS["tiny"]
    lora = random_lora(cfg, 1, alpha=None if layout == "diffusers" else 8.0)
    p = tmp_path / f"{layout}.safetensors"
    write_lora(lora, layout, p)
    info = read_lora_header(p)
    assert info.format == {"wan_AB": "wan"}.get(layout, layout)
    assert set(info.targets) == set(lora)
    assert info.rank == 4 and info.base == "tiny"
    lf = load_lora(p, info)
    for name, t in lora.items():
        got = lf.targets[name]
        assert torch.equal(got.down, t["down"]) and torch.equal(got.up, t["up"])
        assert torch.equal(got.diff_b, t["diff_b"])
        assert got.scale == (2.0 if "alpha" in t else 1.0)  # alpha 8 / rank 4


@pytest.mark.slow
def test_inspect_cli_json_and_errors(tmp_path):
    cfg = CONFIGS["tiny"]
    p = tmp_path / "k.safetensors"
    write_lora(random_lora(cfg, 2), "kohya", p)
    cmd = [sys.executable, "-m", "engine", "lora", "inspect", str(p), "--json"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["format"] == "kohya" and s["rank"] == 4 and s["alpha"] == 8.0
    assert s["base"] == "tiny" and s["targets"] == sorted(LINEARS)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    r = subprocess.run(cmd[:-2] + [str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "bad.safetensors" in r.stderr and "not JSON" in r.stderr


def test_summary_matches_header(tmp_path):
    p = tmp_path / "w.safetensors"
    write_lora(random_lora(CONFIGS["tiny"], 2, rank=3, alpha=6.0), "wan", p)
    info = read_lora_header(p)
    from engine.weights.lora import read_alphas

    s = summary(info, read_alphas(info))
    assert (s["rank"], s["alpha"], s["scale"], s["modules"]) == (3, 6.0, 2.0, 20)
    assert s["parts"] == ["diff_b", "down", "up"]


# -------------------------------------------------------------------------- oracle


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_lora_matches_diffusers_peft(tmp_path, layout):
    model = tiny()
    cfg = model.cfg
    p = tmp_path / "a.safetensors"
    lora = random_lora(
        cfg,
        5,
        alpha=None if layout == "diffusers" else 8.0,
        diff_b=layout != "kohya",  # diffusers reads no diff_b from kohya names
    )
    write_lora(lora, layout, p)
    ref = theirs_with(model, [p], [1.0])
    ours = tiny()
    fuse_qkv(ours)
    slots = LoraSlots(ours)
    slots.install(0, slots.prepare(load_lora(p)))
    x, t, text = inputs(cfg)
    with torch.no_grad():
        base = model(x, t, text)
        for s in (1.0, 0.4, -0.7, 2.0):
            ref.set_adapters(["l0"], weights=[s])
            theirs = ref(x, t, text, return_dict=False)[0]
            assert rel_err(base, theirs) > 1e-2  # the LoRA does something
            slots.update([s, 0, 0, 0])  # a move: the side path carries it
            assert slots.side_sites == 16  # q/k/v fused: 8 linears a block
            assert rel_err(ours(x, t, text), theirs) <= 1e-4, ("side", s)
            slots.update([s, 0, 0, 0])  # still: merged into the weights
            assert slots.side_sites == 0
            assert rel_err(ours(x, t, text), theirs) <= 1e-4, ("merged", s)


def test_two_loras_negative_strength_and_fused_qkv(tmp_path):
    model = tiny()
    cfg = model.cfg
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_lora(random_lora(cfg, 7), "wan", pa)
    write_lora(random_lora(cfg, 8, rank=2, alpha=1.0, diff_b=False), "kohya", pb)
    x, t, text = inputs(cfg)
    ref = theirs_with(model, [pa, pb], [1.0, 1.0])
    m = tiny()
    fuse_qkv(m)  # q/k/v as one linear, as the engine builds it
    slots = LoraSlots(m)
    slots.install(0, slots.prepare(load_lora(pa)))
    slots.install(1, slots.prepare(load_lora(pb)))
    with torch.no_grad():
        for strengths in ([0.8, -1.3], [-0.5, 0.0], [1.5, 2.0]):
            ref.set_adapters(["l0", "l1"], weights=strengths)
            theirs = ref(x, t, text, return_dict=False)[0]
            for how in ("side", "merged"):
                slots.update(strengths + [0.0, 0.0])
                assert rel_err(m(x, t, text), theirs) <= 1e-4, (strengths, how)


def test_full_diff_against_a_reference_in_the_test(tmp_path):
    """`.diff` weights (diffusers skips them on blocks): against W + s·diff done here."""
    model = tiny()
    g = torch.Generator().manual_seed(11)
    sd, ref = {}, tiny()
    s = -0.6
    for name in ["blocks.0.self_attn.k", "blocks.1.ffn.2", "blocks.1.norm3"]:
        mod = ref.get_submodule(name)
        d = torch.randn(mod.weight.shape, generator=g) * 0.1
        sd[f"diffusion_model.{name}.diff"] = d
        with torch.no_grad():
            mod.weight += s * d
    p = tmp_path / "d.safetensors"
    save_file(sd, str(p))
    x, t, text = inputs(model.cfg)
    fuse_qkv(model)
    slots = ours_with(model, [p], [s], settle=True)
    with torch.no_grad():
        assert rel_err(model(x, t, text), ref(x, t, text)) <= 1e-5
        slots.update([0.0] * 4)
        assert torch.equal(model(x, t, text), tiny()(x, t, text))


# -------------------------------------------------------------------------- exactness


def test_strength_zero_is_base_bit_for_bit_after_moves(tmp_path):
    p = tmp_path / "a.safetensors"
    write_lora(random_lora(CONFIGS["tiny"], 5), "wan", p)
    base = tiny()
    fuse_qkv(base)
    model = tiny()
    fuse_qkv(model)
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    x, t, text = inputs(model.cfg)
    with torch.no_grad():
        want = base(x, t, text)
        slots = LoraSlots(model)
        slots.install(0, slots.prepare(load_lora(p)))
        slots.update([0.0] * 4)  # loaded at 0: nothing changes
        assert torch.equal(model(x, t, text), want)
        for s in (0.3, 0.3, 0.9, -1.2, -1.2, 0.5, 0.5):  # moves and merges
            slots.update([s, 0, 0, 0])
        assert not torch.equal(model(x, t, text), want)
        slots.update([0.0] * 4)
        assert torch.equal(model(x, t, text), want)
        sd = {k.replace(".base.", "."): v for k, v in model.state_dict().items()}
        assert all(torch.equal(sd[k], v) for k, v in pristine.items())
        slots.update([0.7, 0, 0, 0])
        slots.install(0, None)  # unloading restores too
        assert torch.equal(model(x, t, text), want)


def test_random_moves_always_equal_the_direct_formula(tmp_path):
    """Any sequence of strength moves, stills and returns to 0 over three slots (low-rank
    with diff_b, low-rank only, full diffs), with merges spread 5 sites per block: every
    block equals W = base + sum s_i (alpha/r up@down + diff), b = base + sum s_i diff_b,
    computed directly in the test; every all-zero block is the base model bit for bit."""
    import random

    cfg = CONFIGS["tiny"]
    la = random_lora(cfg, 21)
    lb = random_lora(cfg, 22, rank=2, alpha=1.0, diff_b=False)
    g = torch.Generator().manual_seed(23)
    shapes = {k: tuple(v.shape) for k, v in tiny().state_dict().items()}
    lc = {
        n: torch.randn(shapes[n + ".weight"], generator=g) * 0.05
        for n in ("blocks.0.cross_attn.v", "blocks.1.self_attn.q", "blocks.1.norm3")
    }
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"]
    write_lora(la, "wan", paths[0])
    write_lora(lb, "kohya", paths[1])
    save_file({f"diffusion_model.{n}.diff": d for n, d in lc.items()}, str(paths[2]))

    def direct(strengths):
        ref = tiny()
        with torch.no_grad():
            for lora, s in ((la, strengths[0]), (lb, strengths[1])):
                for name, t in lora.items():
                    mod = ref.get_submodule(name)
                    scale = float(t["alpha"]) / t["down"].shape[0] if "alpha" in t else 1.0
                    mod.weight += s * scale * (t["up"] @ t["down"])
                    if "diff_b" in t:
                        mod.bias += s * t["diff_b"]
            for name, d in lc.items():
                ref.get_submodule(name).weight += strengths[2] * d
        return ref

    model = tiny()
    fuse_qkv(model)
    slots = LoraSlots(model, merge_per_block=5)
    for n, p in enumerate(paths):
        slots.install(n, slots.prepare(load_lora(p)))
    x, t, text = inputs(cfg)
    rng = random.Random(0)
    s = [0.0, 0.0, 0.0, 0.0]
    zeros = sides = 0
    with torch.no_grad():
        base = tiny()(x, t, text)
        for _ in range(24):
            r = rng.random()
            if r < 0.15:
                s = [0.0] * 4
            elif r > 0.45:
                s = list(s)
                s[rng.randrange(3)] = rng.choice([0.0, round(rng.uniform(-2, 2), 3)])
            slots.update(s)
            sides += slots.side_sites > 0
            got = model(x, t, text)
            if s == [0.0] * 4:
                zeros += 1
                assert torch.equal(got, base)
            else:
                assert rel_err(got, direct(s)(x, t, text)) <= 1e-5, s
    assert zeros >= 2 and sides >= 5  # the sequence did exercise both paths


def test_merge_budget_spreads_merges_and_stays_exact(tmp_path):
    p = tmp_path / "a.safetensors"
    write_lora(random_lora(CONFIGS["tiny"], 5), "wan", p)
    x, t, text = inputs(CONFIGS["tiny"])
    ref_model = tiny()
    ref = LoraSlots(ref_model)
    ref.install(0, ref.prepare(load_lora(p)))
    ref.update([0.6, 0, 0, 0])
    model = tiny()
    slots = LoraSlots(model, merge_per_block=3)
    slots.install(0, slots.prepare(load_lora(p)))
    slots.update([0.6, 0, 0, 0])
    sides = [slots.side_sites]
    with torch.no_grad():
        want = ref_model(x, t, text)
        while slots.side_sites:
            slots.update([0.6, 0, 0, 0])
            sides.append(slots.side_sites)
            assert rel_err(model(x, t, text), want) <= 1e-5  # side + merged agree throughout
    assert sides[0] == 20 and all(a - b == 3 for a, b in zip(sides, sides[1:-1], strict=False))


def test_text_kv_flag_only_when_cross_kv_changes(tmp_path):
    cfg = CONFIGS["tiny"]
    lora = {k: v for k, v in random_lora(cfg, 5).items() if "self_attn" in k}
    p = tmp_path / "s.safetensors"
    write_lora(lora, "wan", p)
    full = tmp_path / "f.safetensors"
    write_lora(random_lora(cfg, 6), "wan", full)
    slots = LoraSlots(tiny())
    slots.install(0, slots.prepare(load_lora(p)))
    assert slots.update([1.0, 0, 0, 0]) is False  # self-attention only: text K/V unchanged
    slots.install(1, slots.prepare(load_lora(full)))
    assert slots.update([1.0, 0.5, 0, 0]) is True
    assert slots.update([1.0, 0.5, 0, 0]) is True  # merged at the new strengths
    assert slots.update([1.0, 0.5, 0, 0]) is False  # nothing changed


# -------------------------------------------------------------------------- bad files


def test_bad_files_are_named_and_change_nothing(tmp_path):
    cfg = CONFIGS["tiny"]
    good = tmp_path / "good.safetensors"
    write_lora(random_lora(cfg, 5), "wan", good)
    model = tiny()
    x, t, text = inputs(cfg)
    slots = LoraSlots(model)
    slots.install(0, slots.prepare(load_lora(good)))
    slots.update([0.5, 0, 0, 0])
    with torch.no_grad():
        before = model(x, t, text)

    cases = {}
    cases["text.safetensors"] = b"hello, not a LoRA"
    data = good.read_bytes()
    cases["trunc.safetensors"] = data[: len(data) - 100]
    cases["empty.safetensors"] = b""
    cases["huge_header.safetensors"] = (10**12).to_bytes(8, "little") + b"{}"
    nest = b"[" * 200_000 + b"]" * 200_000
    cases["nested.safetensors"] = len(nest).to_bytes(8, "little") + nest
    cases["no_tensors.safetensors"] = (2).to_bytes(8, "little") + b"{}"
    entry = {"dtype": "F32", "shape": [10**12, 10**12], "data_offsets": [0, 16]}
    raw = json.dumps({"diffusion_model.blocks.0.ffn.0.lora_down.weight": entry}).encode()
    cases["lying_shape.safetensors"] = len(raw).to_bytes(8, "little") + raw + bytes(16)
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
    i2v = tmp_path / "i2v.safetensors"
    save_file(
        {
            "diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight": torch.zeros(2, 64),
            "diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight": torch.zeros(64, 2),
        },
        str(i2v),
    )
    deep = tmp_path / "deep.safetensors"  # block 7 of a 2-layer model
    save_file(
        {
            "diffusion_model.blocks.7.ffn.0.lora_down.weight": torch.zeros(2, 64),
            "diffusion_model.blocks.7.ffn.0.lora_up.weight": torch.zeros(128, 2),
        },
        str(deep),
    )
    expect = {
        "text.safetensors": "not a safetensors file",
        "trunc.safetensors": "truncated",
        "empty.safetensors": "not a safetensors file",
        "huge_header.safetensors": "not a safetensors file",
        "nested.safetensors": "nests too deep",
        "no_tensors.safetensors": "no tensors",
        "lying_shape.safetensors": "truncated or corrupt",
        "i2v.safetensors": "does not have",
        "deep.safetensors": "blocks.7.ffn.0",
    }
    for name, why in expect.items():
        with pytest.raises(LoraError) as e:
            check_lora(tmp_path / name, "tiny", torch.float32)
        assert name in str(e.value) and why in str(e.value), str(e.value)
    with pytest.raises(LoraError, match="budget"):
        check_lora(good, "tiny", torch.float32, max_bytes=1000)
    with torch.no_grad():
        assert torch.equal(model(x, t, text), before)
    assert slots.strengths[0] == 0.5 and slots.slots[0] is not None


def test_other_base_model_names_both_shapes(tmp_path):
    """A 1.3B LoRA on the 14B: both shapes in the message (headers only: no big tensors)."""
    p = tmp_path / "small.safetensors"
    header = {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": {
            "dtype": "BF16",
            "shape": [16, 1536],
            "data_offsets": [0, 16 * 1536 * 2],
        },
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": {
            "dtype": "BF16",
            "shape": [1536, 16],
            "data_offsets": [16 * 1536 * 2, 2 * 16 * 1536 * 2],
        },
    }
    raw = json.dumps(header).encode()
    p.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(2 * 16 * 1536 * 2))
    info = read_lora_header(p)
    assert info.base == "1.3b"
    with pytest.raises(LoraError) as e:
        check_lora(p, "14b")
    msg = str(e.value)
    assert "[16, 1536]" in msg and "[16, 5120]" in msg and "1.3b" in msg and "small" in msg


def test_low_rank_pair_missing_half(tmp_path):
    p = tmp_path / "half.safetensors"
    save_file({"diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.zeros(2, 64)}, str(p))
    with pytest.raises(LoraError, match="up"):
        read_lora_header(p)


def test_fp8_weights_merge_by_requantising_and_restore_exactly(tmp_path):
    """fp8 linears (engine/models/fp8.py): the merged weight is the re-quantised
    base + s·d (within fp8's rounding), and strength 0 gives back the very same fp8 bytes
    and scales. Weights only: fp8 matmuls need a GPU."""
    from engine.models.fp8 import Fp8Linear, quantize_linears

    p = tmp_path / "a.safetensors"
    lora = random_lora(CONFIGS["tiny"], 5)
    write_lora(lora, "wan", p)
    model = tiny()
    fuse_qkv(model)
    quantize_linears(model.blocks, out_dtype=torch.float32)
    fp8 = {n: m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    assert len(fp8) == 16
    before = {n: (m.weight.clone(), m.weight_scale.clone(), m.bias.clone()) for n, m in fp8.items()}
    slots = LoraSlots(model)
    slots.install(0, slots.prepare(load_lora(p)))
    slots.update([0.7, 0, 0, 0])
    slots.update([0.7, 0, 0, 0])  # merged
    assert slots.side_sites == 0
    o = model.blocks[1].ffn[2]  # an LoraLinear around the Fp8Linear
    assert isinstance(o, LoraLinear) and isinstance(o.base, Fp8Linear)
    t = lora["blocks.1.ffn.2"]
    w0, s0, b0 = before["blocks.1.ffn.2"]
    want = w0.float() * s0.view(-1, 1) + 0.7 * 2.0 * (t["up"] @ t["down"])
    got = o.base.dequantized_weight()
    assert rel_err(got, want) < 0.05  # e4m3 keeps 3 mantissa bits
    assert rel_err(got, want) < 0.5 * rel_err(w0.float() * s0.view(-1, 1), want)
    assert torch.allclose(o.base.bias, b0 + 0.7 * t["diff_b"], atol=1e-6)
    slots.update([0.0] * 4)
    for n, m in fp8.items():
        w, s, b = before[n]
        assert torch.equal(m.weight.view(torch.uint8), w.view(torch.uint8)), n
        assert torch.equal(m.weight_scale, s) and torch.equal(m.bias, b), n


def test_side_path_off_is_the_wrapped_linear():
    lin = torch.nn.Linear(8, 4)
    w = LoraLinear(lin)
    x = torch.randn(3, 8)
    assert torch.equal(w(x), lin(x))


def test_a_model_of_no_standard_config_checks_shapes_itself(tmp_path):
    """The header check knows the standard configs; a custom model is checked when the
    tensors are placed: the message names the module and both shapes."""
    from engine.models.wan import WanConfig

    cfg = WanConfig(dim=32, ffn_dim=64, heads=2, layers=2, text_dim=32, text_len=16, freq_dim=32)
    model = init_random_(WanModel(cfg), 0)
    slots = LoraSlots(model)
    assert slots.config == "custom"
    p = tmp_path / "t.safetensors"
    write_lora(random_lora(CONFIGS["tiny"], 3), "wan", p)
    with pytest.raises(LoraError) as e:
        slots.prepare(load_lora(p))
    assert re.search(
        r"t\.safetensors: blocks\.\d\.\w+\.\w+\.down: file \[4, 64\], this model \[4, 32\]",
        str(e.value),
    ), str(e.value)
    assert slots.slots == [None] * 4 and not any(isinstance(m, LoraLinear) for m in model.modules())


@pytest.mark.slow
def test_static_mode_never_recompiles_a_compiled_block_after_warm(tmp_path):
    """Static mode (what the engine uses with compile): after `warm`, loading LoRAs (within
    the rank bucket), moving, merging, a second LoRA and the return to 0 compile nothing
    new. Dynamo's CompileCounter backend counts the graphs (no Inductor: fast on a CPU).
    Outputs equal the eager mode's; warm and strength 0 are the base bit for bit."""
    from torch._dynamo.testing import CompileCounter

    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_lora(random_lora(CONFIGS["tiny"], 5, rank=4), "wan", pa)
    write_lora(random_lora(CONFIGS["tiny"], 6, rank=2, diff_b=False), "kohya", pb)
    x, t, text = inputs(CONFIGS["tiny"])
    model, eager = tiny(), tiny()
    fuse_qkv(model)
    fuse_qkv(eager)
    slots, ref = LoraSlots(model, rank_bucket=8, merge_per_block=5), LoraSlots(eager)
    cnt = CompileCounter()
    torch._dynamo.reset()
    for b in model.blocks:
        b.compile(backend=cnt, dynamic=False)
    with torch.no_grad():
        base = model(x, t, text)
        slots.warm(True)
        assert torch.equal(model(x, t, text), base)  # zero factors add exact zeros
        slots.warm(False)
        warmed = cnt.frame_count
        assert warmed == 2  # one graph with the side path, one without, for every block
        steps = [("a", [0.5, 0]), ("", [0.5, 0]), ("", [0.9, 0]), ("b", [0.9, -1.0])]
        steps += [("", [0.9, -1.0]), ("", [0.9, -1.0]), ("", [0.0, 0.0])]
        for load, s in steps:
            for sl in (slots, ref):
                if load:
                    n = "ab".index(load)
                    sl.install(n, sl.prepare(load_lora(pa if load == "a" else pb)))
                sl.update([*s, 0.0, 0.0])
            got = model(x, t, text)
            assert rel_err(got, eager(x, t, text)) <= 1e-5, (load, s)
            if s == [0.0, 0.0]:
                assert torch.equal(got, base)
    assert cnt.frame_count == warmed
    torch._dynamo.reset()
