"""Our Wan transformer against diffusers' `WanTransformer3DModel` on the same weights
(converted from our Wan-native state dict by diffusers' own converter), and the
attention pieces against explicit references."""

import math

import pytest
import torch
from helpers import diffusers_wan_kwargs, rel_err

from engine.models import attention as A
from engine.models.wan import CONFIGS, WanConfig, WanModel, init_random_, rope_table


def tiny_model(seed: int = 0) -> WanModel:
    return init_random_(WanModel(CONFIGS["tiny"]), seed).eval()


def diffusers_twin(model: WanModel):
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    c = model.cfg
    ref = WanTransformer3DModel(**diffusers_wan_kwargs(c))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ref.load_state_dict(convert_wan_transformer_to_diffusers(sd), strict=True)
    return ref.eval()


@pytest.mark.parametrize(
    "frames,h,w,t",
    [(1, 8, 8, [1000.0]), (3, 8, 12, [937.0]), (5, 4, 6, [250.0]), (2, 6, 4, [0.0, 500.0])],
)
def test_matches_diffusers(frames, h, w, t):
    model = tiny_model()
    ref = diffusers_twin(model)
    c = model.cfg
    B = len(t)
    x = torch.randn(B, c.in_dim, frames, h, w)
    tt = torch.tensor(t)
    text = torch.randn(B, c.text_len, c.text_dim)
    text[:, 5:] = 0  # zero past the prompt's tokens, as the text encoder does
    with torch.no_grad():
        ours = model(x, tt, text)
        theirs = ref(x, tt, text, return_dict=False)[0]
    assert ours.shape == x.shape
    assert rel_err(ours, theirs) <= 1e-4


def test_state_dict_uses_wan_names():
    keys = set(tiny_model().state_dict())
    for k in [
        "patch_embedding.weight",
        "text_embedding.0.weight",
        "text_embedding.2.bias",
        "time_embedding.0.weight",
        "time_projection.1.weight",
        "blocks.0.self_attn.q.weight",
        "blocks.0.self_attn.norm_k.weight",
        "blocks.1.cross_attn.o.bias",
        "blocks.1.norm3.weight",
        "blocks.1.ffn.2.weight",
        "blocks.0.modulation",
        "head.head.weight",
        "head.modulation",
    ]:
        assert k in keys, k
    assert not any("norm1" in k or "norm2" in k for k in keys)  # those norms have no weights


def test_rope_split_matches_wan():
    assert CONFIGS["14b"].rope_split == (44, 42, 42)
    assert CONFIGS["tiny"].rope_split == (12, 10, 10)
    c14 = CONFIGS["14b"]
    assert (c14.dim, c14.ffn_dim, c14.heads, c14.layers, c14.head_dim) == (5120, 13824, 40, 40, 128)
    c13 = CONFIGS["1.3b"]
    assert (c13.dim, c13.ffn_dim, c13.heads, c13.layers, c13.head_dim) == (1536, 8960, 12, 30, 128)


def test_rope_positions_are_relative():
    """Attention scores depend only on position differences: shifting all time
    positions by the same amount leaves q·k unchanged (why a window can start at 0)."""
    cfg = WanConfig(dim=64, ffn_dim=8, heads=2, layers=1, text_dim=4)
    q = torch.randn(1, 3 * 4, 2, 32)
    k = torch.randn(1, 3 * 4, 2, 32)
    scores = []
    for start in (0, 7):
        cos, sin = rope_table(cfg, range(start, start + 3), 2, 2)
        from engine.models.wan import apply_rope

        scores.append(
            torch.einsum("bqhd,bkhd->bhqk", apply_rope(q, cos, sin), apply_rope(k, cos, sin))
        )
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- attention


def explicit_biased(q, k1, v1, k2, v2, b):
    """Reference: one softmax over both key sets with log(b) added to the first set."""
    k = torch.cat([k1, k2], 1)
    v = torch.cat([v1, v2], 1)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    s[..., : k1.shape[1]] += math.log(b)
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.double())


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("b", [0.3, 0.01, 1.0])
def test_lse_merge_equals_explicit_bias(backend, b):
    att = A.Attention(backend)
    q = torch.randn(2, 10, 3, 16) * 2
    k1, v1 = torch.randn(2, 8, 3, 16) * 2, torch.randn(2, 8, 3, 16)
    k2, v2 = torch.randn(2, 12, 3, 16) * 2, torch.randn(2, 12, 3, 16)
    out = att.biased(q, k1, v1, k2, v2, torch.tensor(math.log(b)))
    ref = explicit_biased(q, k1, v1, k2, v2, b)
    assert rel_err(out, ref) < 1e-5


def test_lse_matches_logsumexp():
    q, k, v = torch.randn(1, 5, 2, 8), torch.randn(1, 7, 2, 8), torch.randn(1, 7, 2, 8)
    for backend in ("sdpa", "math"):
        o, lse = A.Attention(backend).with_lse(q, k, v)
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(8)
        torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            o, torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v), rtol=1e-5, atol=1e-5
        )


def test_merge_is_stable_for_large_logits():
    o1, o2 = torch.ones(1, 2, 1, 4), torch.zeros(1, 2, 1, 4)
    lse1 = torch.tensor([[[1e4, -1e4]]])
    lse2 = torch.tensor([[[-1e4, 1e4]]])
    out = A.merge_lse(o1, lse1, o2, lse2, 0.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([1.0, 0.0]))


def test_backend_selection():
    cpu = torch.device("cpu")
    none = lambda name: False  # noqa: E731
    assert A.select_backend(None, cpu, importable=none, env={}) == "sdpa"
    assert (
        A.select_backend(None, cpu, importable=none, env={"DREAMDECK_ATTENTION": "math"}) == "math"
    )
    # the argument beats the environment
    assert (
        A.select_backend("sdpa", cpu, importable=none, env={"DREAMDECK_ATTENTION": "math"})
        == "sdpa"
    )
    with pytest.raises(A.AttentionError, match="unknown attention backend 'flash9'"):
        A.select_backend("flash9", cpu, env={})
    with pytest.raises(A.AttentionError, match="needs a CUDA device"):
        A.select_backend("fa3", cpu, importable=lambda n: True, env={})
    with pytest.raises(A.AttentionError, match="unknown"):
        A.Attention("nope")


def test_backend_selection_on_gpus(monkeypatch):
    """The automatic order on CUDA devices. No GPU exists here, so the device capability
    query is replaced (the only stand-in in this file)."""
    cuda = torch.device("cuda", 0)
    have = lambda *names: lambda n: n in names  # noqa: E731
    monkeypatch.setattr(A, "_is_hopper", lambda d: True)
    assert (
        A.select_backend(None, cuda, importable=have("flash_attn_interface", "flash_attn"), env={})
        == "fa3"
    )
    assert (
        A.select_backend(None, cuda, importable=have("flash_attn", "sageattention"), env={})
        == "cudnn"
    )
    monkeypatch.setattr(A, "_is_hopper", lambda d: False)
    # SageAttention 1.x (PyPI's 1.0.6) returns no log-sum-exp, which the KV-bias merge needs:
    # never picked automatically; 2.x is
    monkeypatch.setattr(A, "sage_has_lse", lambda: False)
    assert (
        A.select_backend(None, cuda, importable=have("flash_attn", "sageattention"), env={})
        == "fa2"
    )
    monkeypatch.setattr(A, "sage_has_lse", lambda: True)
    assert (
        A.select_backend(None, cuda, importable=have("flash_attn", "sageattention"), env={})
        == "sage"
    )
    env = {"DISABLE_SAGEATTENTION": "1"}
    assert (
        A.select_backend(None, cuda, importable=have("flash_attn", "sageattention"), env=env)
        == "fa2"
    )
    assert A.select_backend(None, cuda, importable=have(), env={}) == "sdpa"
    with pytest.raises(A.AttentionError, match="flash_attn_interface"):
        A.select_backend("fa3", cuda, importable=have(), env={})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["sdpa", "cudnn", "fa3", "fa2", "sage"])
def test_gpu_backends_agree(backend):
    need = {"fa3": "flash_attn_interface", "fa2": "flash_attn", "sage": "sageattention"}
    if backend in need and not A._importable(need[backend]):
        pytest.skip(f"{need[backend]} not installed")
    dev = torch.device("cuda")
    q = torch.randn(1, 300, 4, 128, device=dev, dtype=torch.bfloat16)
    k1, v1 = (torch.randn(1, 200, 4, 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
    k2, v2 = (torch.randn(1, 400, 4, 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
    att = A.Attention(backend)
    ref = explicit_biased(q.float(), k1.float(), v1.float(), k2.float(), v2.float(), 0.3)
    if backend == "sage" and not A.sage_has_lse():
        with pytest.raises(A.AttentionError, match="log-sum-exp"):
            att.biased(q, k1, v1, k2, v2, torch.tensor(math.log(0.3), device=dev))
    else:
        out = att.biased(q, k1, v1, k2, v2, torch.tensor(math.log(0.3), device=dev))
        assert rel_err(out, ref) < 3e-2
    k2_before = k2.clone()
    plain = att(q, k2, v2)
    assert torch.equal(k2, k2_before)  # the keys (our KV cache) are never written to
    assert (
        rel_err(
            plain, explicit_biased(q.float(), k1[:, :0], v1[:, :0], k2.float(), v2.float(), 1.0)
        )
        < 3e-2
    )
