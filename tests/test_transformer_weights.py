"""Loading Wan-native transformer checkpoints: round trip, prefix, dtypes, and the errors
for broken or mismatched files."""

import pytest
import torch
from safetensors.torch import save_file

from engine.models.wan import CONFIGS, WanModel, init_random_
from engine.weights.checkpoint import WeightsError
from engine.weights.transformer import load_transformer, random_transformer

CFG = CONFIGS["tiny"]


@pytest.fixture(scope="module")
def source():
    return init_random_(WanModel(CFG), seed=3).eval()


def inputs():
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(1, 16, 2, 4, 6, generator=g),
        torch.tensor([500.0]),
        torch.randn(1, CFG.text_len, CFG.text_dim, generator=g),
    )


def write(path, sd):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


@pytest.mark.parametrize("prefix", ["", "model."])
def test_round_trip(tmp_path, source, prefix):
    f = write(tmp_path / "w.safetensors", {prefix + k: v for k, v in source.state_dict().items()})
    model = load_transformer(f, CFG, "cpu", torch.float32)
    assert not any(p.is_meta or p.requires_grad for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs()), source(*inputs()), rtol=0, atol=0)


def test_bf16_keeps_modulation_in_float32(tmp_path, source):
    f = write(tmp_path / "w.safetensors", source.state_dict())
    model = load_transformer(f, CFG, "cpu", torch.bfloat16)
    dtypes = {k: p.dtype for k, p in model.named_parameters()}
    assert dtypes["blocks.0.self_attn.q.weight"] == torch.bfloat16
    assert dtypes["blocks.0.modulation"] == torch.float32
    assert dtypes["time_projection.1.weight"] == torch.float32
    # float32 tables come from the file exactly, not through bf16
    assert torch.equal(model.blocks[1].modulation, source.blocks[1].modulation)
    with torch.no_grad():
        out = model(*inputs()).float()
        ref = source(*inputs())
    assert ((out - ref).norm() / ref.norm()).item() < 5e-2


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="nope.safetensors: weights file not found"):
        load_transformer(tmp_path / "nope.safetensors", CFG)


def test_truncated_file(tmp_path, source):
    f = write(tmp_path / "w.safetensors", source.state_dict())
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightsError, match=r"w\.safetensors: truncated file"):
        load_transformer(f, CFG)


def test_wrong_shape(tmp_path, source):
    sd = dict(source.state_dict())
    sd["blocks.1.ffn.0.weight"] = torch.zeros(64, 64)
    f = write(tmp_path / "w.safetensors", sd)
    with pytest.raises(WeightsError) as e:
        load_transformer(f, CFG)
    msg = str(e.value)
    assert "w.safetensors" in msg and "'blocks.1.ffn.0.weight'" in msg
    assert "(64, 64)" in msg and "(128, 64)" in msg


def test_missing_key(tmp_path, source):
    sd = dict(source.state_dict())
    del sd["blocks.0.cross_attn.norm_k.weight"]
    f = write(tmp_path / "w.safetensors", sd)
    with pytest.raises(
        WeightsError, match=r"w\.safetensors.*missing key.*blocks\.0\.cross_attn\.norm_k\.weight"
    ):
        load_transformer(f, CFG)


def test_extra_key(tmp_path, source):
    sd = dict(source.state_dict())
    sd["vace_blocks.0.after_proj.weight"] = torch.zeros(2, 2)
    f = write(tmp_path / "w.safetensors", sd)
    with pytest.raises(
        WeightsError, match=r"w\.safetensors.*unexpected key.*vace_blocks\.0\.after_proj\.weight"
    ):
        load_transformer(f, CFG)


def test_wrong_model_size(tmp_path, source):
    """A checkpoint for another size names a key and both shapes."""
    f = write(tmp_path / "w.safetensors", source.state_dict())
    other = CONFIGS["tiny"].__class__(**{**CFG.to_dict(), "dim": 32, "ffn_dim": 64})
    with pytest.raises(WeightsError, match=r"in the file but the model expects"):
        load_transformer(f, other)


def test_random_transformer_is_seeded_and_on_device():
    a = random_transformer(CFG, "cpu", torch.bfloat16, seed=1)
    b = random_transformer(CFG, "cpu", torch.bfloat16, seed=1)
    c = random_transformer(CFG, "cpu", torch.bfloat16, seed=2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.blocks[0].self_attn.q.weight, c.blocks[0].self_attn.q.weight)
    assert a.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert a.blocks[0].modulation.dtype == torch.float32
    x, t, text = inputs()
    with torch.no_grad():
        assert torch.isfinite(a(x, t, text)).all()


def test_materialize_is_to_empty_without_the_refs_path():
    """materialize_ (random_transformer's meta -> device step) gives what to_empty gives:
    the same parameter and buffer names, shapes, dtypes (float32 tables of a bf16 model
    included), device, Parameter-ness and requires_grad."""
    from engine.models.wan import cast_model
    from engine.weights.checkpoint import materialize_

    def built():
        with torch.device("meta"):
            return cast_model(WanModel(CFG), torch.bfloat16)

    ours, ref = materialize_(built(), "cpu"), built().to_empty(device="cpu")

    def layout(m):
        rows = [
            (n, t.shape, t.dtype, t.device, type(t), t.requires_grad)
            for n, t in m.named_parameters()
        ]
        return rows + [(n, t.shape, t.dtype, t.device) for n, t in m.named_buffers()]

    assert layout(ours) == layout(ref) and layout(ours)
    assert {t.dtype for t in ours.parameters()} == {torch.bfloat16, torch.float32}


def test_a_random_tiny_model_does_not_import_sympy():
    """The point of materialize_: to_empty on meta tensors imports sympy through torch._refs
    (about a second of CPU per process); a fresh process builds the tiny model without it."""
    from helpers import imports_in_fresh_process

    code = (
        "from engine.weights.transformer import random_transformer as r\n"
        "from engine.models.wan import CONFIGS\nr(CONFIGS['tiny'])"
    )
    assert not imports_in_fresh_process(code, "sympy")


def test_attention_chosen_at_load(tmp_path, source):
    f = write(tmp_path / "w.safetensors", source.state_dict())
    assert load_transformer(f, CFG, "cpu", torch.float32).attn.backend == "sdpa"
    assert load_transformer(f, CFG, "cpu", torch.float32, attention="math").attn.backend == "math"
    assert random_transformer(CFG, attention="math").attn.backend == "math"


def _one_block_at_a_time(model_blocks, seen):
    """A prepare hook that records, for each block it is given, whether any later block
    already holds real memory: building must materialise one block at a time."""

    def prepare(block):
        i = next(j for j, b in enumerate(model_blocks()) if b is block)
        later = [p for b in model_blocks()[i + 1 :] for p in b.parameters()]
        seen.append((i, all(p.is_meta for p in later)))

    return prepare


def test_block_by_block_build_same_weights_one_block_at_a_time(tmp_path, source, monkeypatch):
    """random_transformer and load_transformer with a prepare hook (fuse q/k/v here) give
    the same model as without it, and each block is prepared before the next one exists:
    a 14B fp8 model never holds more than one bf16 block on the GPU."""
    from engine.weights.transformer import block_preparer

    holder, seen = {}, []
    hook = _one_block_at_a_time(lambda: holder["m"].blocks, seen)
    fuse = block_preparer()

    def prepare(block):
        hook(block)
        fuse(block)

    import engine.weights.transformer as tr

    class Capture(WanModel):  # lets the hook see the model being built
        def __init__(self, cfg):
            super().__init__(cfg)
            holder["m"] = self

    monkeypatch.setattr(tr, "WanModel", Capture)
    a = random_transformer(CFG, "cpu", torch.float32, seed=1, prepare_block=prepare)
    f = write(tmp_path / "w.safetensors", source.state_dict())
    loaded = load_transformer(f, CFG, "cpu", torch.float32, prepare_block=prepare)
    monkeypatch.undo()
    assert seen == [(i, True) for i in range(CFG.layers)] * 2
    plain = random_transformer(CFG, "cpu", torch.float32, seed=1)
    assert all(b.self_attn.fused for b in a.blocks) and not plain.blocks[0].self_attn.fused
    assert torch.equal(
        a.blocks[1].self_attn.qkv.weight,
        torch.cat([getattr(plain.blocks[1].self_attn, n).weight for n in "qkv"]),
    )
    with torch.no_grad():
        torch.testing.assert_close(a(*inputs()), plain(*inputs()), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loaded(*inputs()), source(*inputs()), rtol=1e-5, atol=1e-6)
