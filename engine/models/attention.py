"""Attention kernels for the Wan transformer, and the KV-cache bias done exactly by a
log-sum-exp merge.

The backend is chosen once, when a model is set up, and logged, so a live set never
changes kernels halfway. Order of preference (measured on an H100, docs/streaming-model.md §8):

- Hopper (sm90): FA3 (`flash_attn_interface`) if importable, else PyTorch SDPA with the
  cuDNN kernel first (1.5 ms against 2.6 ms for the flash kernel at 832×480). FA2 is not
  picked on Hopper by default because cuDNN SDPA beats it there.
- Other NVIDIA GPUs: SageAttention 2 (`sageattention`) unless `DISABLE_SAGEATTENTION=1`,
  then FA2 (`flash_attn`), then SDPA.
- Anywhere else: SDPA.

`DREAMDECK_ATTENTION` (or the `requested` argument, which wins) forces one of
`fa3 fa2 sage sdpa cudnn math triton triton-fp8`; a forced backend that cannot run here is
an error, not a silent fallback.

`triton` / `triton-fp8` (engine/models/triton_attention.py, forced only until measured):
one kernel for the kv bias (no merge), plain attention as the same kernel with an empty
biased set. triton-fp8 runs QK^T in int8 and PV in fp8 (per-token scales). Neither returns
a log-sum-exp, so `with_lse` on these backends uses cuDNN (bf16) instead.

All tensors here are in the layout the model produces and caches: [B, N, heads, head_dim].
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

BACKENDS = ("fa3", "fa2", "sage", "sdpa", "cudnn", "math", "triton", "triton-fp8")
TRITON_BACKENDS = ("triton", "triton-fp8")


class AttentionError(RuntimeError):
    """A requested attention backend is unknown or cannot run on this machine."""


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # a broken CUDA extension raises more than ImportError
        return False
    return True


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _is_hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def select_backend(
    requested: str | None = None,
    device: torch.device | str | None = None,
    *,
    importable: Callable[[str], bool] = _importable,
    env: dict[str, str] | None = None,
) -> str:
    """The attention backend for `device`. `requested` beats `DREAMDECK_ATTENTION` beats the
    automatic choice. `importable` and `env` exist so the choice can be tested without GPUs."""
    env = os.environ if env is None else env
    device = torch.device(device if device is not None else "cpu")
    choice = (requested or env.get("DREAMDECK_ATTENTION") or "auto").strip().lower()
    if choice not in (*BACKENDS, "auto"):
        raise AttentionError(
            f"unknown attention backend {choice!r}; choose one of {', '.join(BACKENDS)} or auto"
        )
    cuda = device.type == "cuda"
    if choice == "auto":
        hopper = cuda and _is_hopper(device)
        sage_ok = env.get("DISABLE_SAGEATTENTION", "0") != "1"
        if hopper and importable("flash_attn_interface"):
            choice = "fa3"
        elif hopper:
            choice = "cudnn"
        elif cuda and sage_ok and importable("sageattention") and sage_has_lse():
            choice = "sage"
        elif cuda and importable("flash_attn"):
            choice = "fa2"
        else:
            choice = "sdpa"
        log.info("attention backend: %s (auto, device %s)", choice, device)
        return choice
    need = {"fa3": "flash_attn_interface", "fa2": "flash_attn", "sage": "sageattention"}
    need.update({b: "triton" for b in TRITON_BACKENDS})
    if choice in need or choice == "cudnn":
        if not cuda:
            raise AttentionError(f"attention backend {choice!r} needs a CUDA device, not {device}")
        if choice in need and not importable(need[choice]):
            raise AttentionError(
                f"attention backend {choice!r} needs the package {need[choice]!r}, which does not import"
            )
        if choice == "triton-fp8" and _capability(device) < (8, 9):
            raise AttentionError(
                "attention backend 'triton-fp8' needs fp8 tensor cores (sm89+: Ada, Hopper)"
            )
    log.info("attention backend: %s (forced, device %s)", choice, device)
    return choice


# --------------------------------------------------------------------------- kernels
# Each takes q [B,Nq,H,D], k/v [B,Nk,H,D] and returns (out [B,Nq,H,D], lse [B,H,Nq] float32
# or None when not asked for).


_cudnn_failed = False  # set once cuDNN rejects a call; PyTorch's dispatch is used after


def _sdpa(
    q: Tensor, k: Tensor, v: Tensor, want_lse: bool, kind: str
) -> tuple[Tensor, Tensor | None]:
    global _cudnn_failed
    if kind == "math":
        return _math(q, k, v, want_lse)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    B, Nq, H, _ = q.shape
    half = q.dtype in (torch.float16, torch.bfloat16)
    if kind == "cudnn" and q.is_cuda and half and not _cudnn_failed:
        # The aten op directly (not an sdpa_kernel context): traceable by torch.compile and
        # the same kernel with or without the log-sum-exp.
        # Schema: (q, k, v, attn_bias, compute_log_sumexp, dropout_p, is_causal, return_debug_mask)
        try:
            o, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
                qt, kt, vt, None, want_lse, 0.0, False, False
            )[:2]
            return o.transpose(1, 2), (_flat_lse(lse, B, H, Nq) if want_lse else None)
        except RuntimeError as e:
            _cudnn_failed = True
            log.warning("cuDNN attention failed (%s); using PyTorch's SDPA dispatch instead", e)
    if not want_lse:
        return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2), None
    if q.device.type == "cpu":
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt)
    elif half:
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt)[:2]
    else:
        o, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True)[:2]
    return o.transpose(1, 2), _flat_lse(lse, B, H, Nq)


def _flat_lse(lse: Tensor, B: int, H: int, Nq: int) -> Tensor:
    """cuDNN gives [B,H,Nq,1]; the efficient kernel may pad Nq: cut and flatten to [B,H,Nq]."""
    return lse.reshape(B, H, -1)[..., :Nq].float()


def _math(q: Tensor, k: Tensor, v: Tensor, want_lse: bool) -> tuple[Tensor, Tensor | None]:
    """Plain float32 attention: the slow reference that runs anywhere."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(s, dim=-1)
    o = torch.einsum("bhqk,bkhd->bqhd", torch.exp(s - lse[..., None]), v.float()).to(q.dtype)
    return o, (lse if want_lse else None)


def _fa3(q: Tensor, k: Tensor, v: Tensor, want_lse: bool) -> tuple[Tensor, Tensor | None]:
    from flash_attn_interface import flash_attn_func

    # FA3 releases differ: older ones always return (out, lse), newer ones only with
    # return_attn_probs=True. Accept both.
    try:
        r = flash_attn_func(q, k, v, causal=False, return_attn_probs=want_lse)
    except TypeError:
        r = flash_attn_func(q, k, v, causal=False)
    if isinstance(r, tuple):
        return r[0], (r[1].float() if want_lse else None)
    if want_lse:
        raise AttentionError("this flash_attn_interface build does not return the log-sum-exp")
    return r, None


def _fa2(q: Tensor, k: Tensor, v: Tensor, want_lse: bool) -> tuple[Tensor, Tensor | None]:
    from flash_attn import flash_attn_func

    if want_lse:
        o, lse, _ = flash_attn_func(q, k, v, causal=False, return_attn_probs=True)
        return o, lse.float()
    return flash_attn_func(q, k, v, causal=False), None


def sage_has_lse() -> bool:
    """SageAttention returns the log-sum-exp (which the KV-bias merge needs) from 2.0 on;
    PyPI's 1.0.6 (Triton, int8 QK) returns the output alone."""
    try:
        from importlib.metadata import version

        return int(version("sageattention").split(".")[0]) >= 2
    except Exception:  # noqa: BLE001 - not installed, or a version string we cannot read
        return False


def _sage(q: Tensor, k: Tensor, v: Tensor, want_lse: bool) -> tuple[Tensor, Tensor | None]:
    from sageattention import sageattn

    # Sage's own K smoothing subtracts the keys' mean *in place*, which would write into our
    # KV cache: do it here out of place (softmax is unchanged by subtracting one vector from
    # every key) and turn Sage's off. The log-sum-exp path takes the keys as they are, so the
    # value it returns is the true one for the merge.
    if want_lse:
        if not sage_has_lse():
            raise AttentionError(
                "attention backend 'sage': this sageattention has no log-sum-exp output (2.0+"
                " has), which the KV-bias path needs; use kv_bias 1.0 or another backend"
            )
        o, lse = sageattn(
            q, k, v, tensor_layout="NHD", is_causal=False, return_lse=True, smooth_k=False
        )
        return o, lse.float()
    k = k - k.mean(dim=1, keepdim=True)
    return sageattn(q, k, v, tensor_layout="NHD", is_causal=False, smooth_k=False), None


class Attention:
    """One backend, chosen once. `__call__` is plain attention; `biased` is attention over
    two key sets where the first set's logits get `log_bias` added (the Krea KV bias)."""

    def __init__(self, backend: str = "sdpa"):
        if backend not in BACKENDS:
            raise AttentionError(f"unknown attention backend {backend!r}")
        self.backend = backend

    def __repr__(self) -> str:
        return f"Attention({self.backend!r})"

    def with_lse(self, q: Tensor, k: Tensor, v: Tensor, want_lse: bool = True):
        b = self.backend
        if b == "fa3":
            return _fa3(q, k, v, want_lse)
        if b == "fa2":
            return _fa2(q, k, v, want_lse)
        if b == "sage":
            return _sage(q, k, v, want_lse)
        if b in TRITON_BACKENDS:
            if not want_lse:
                return self._triton(q, k[:, :0], v[:, :0], k, v, None), None
            b = "cudnn"  # the Triton kernel has no log-sum-exp output
        return _sdpa(q, k, v, want_lse, b)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.with_lse(q, k, v, want_lse=False)[0]

    def _triton(self, q, k1, v1, k2, v2, log_bias) -> Tensor:
        from engine.models.triton_attention import biased_attention

        fp8 = self.backend == "triton-fp8"
        # the kernel reads a float32 from device memory
        if isinstance(log_bias, Tensor):
            log_bias = log_bias.to(device=q.device, dtype=torch.float32)  # no-op if it is one
        elif log_bias is not None:  # a number: a device fill, no host sync
            log_bias = torch.full((), float(log_bias), device=q.device)
        return biased_attention(q, k1, v1, k2, v2, log_bias, fp8=fp8, qk_int8=fp8)

    def biased(
        self,
        q: Tensor,
        k_bias: Tensor,
        v_bias: Tensor,
        k: Tensor,
        v: Tensor,
        log_bias: Tensor | None,
    ) -> Tensor:
        """softmax over [k_bias; k] with log_bias added to the logits of k_bias (None: no
        bias), exactly, without a dense mask: two attentions and a merge by their
        log-sum-exps. The Triton backends do it in one kernel instead."""
        if self.backend in TRITON_BACKENDS:
            return self._triton(q, k_bias, v_bias, k, v, log_bias)
        o1, l1 = self.with_lse(q, k_bias, v_bias)
        o2, l2 = self.with_lse(q, k, v)
        return merge_lse(o1, l1, o2, l2, 0.0 if log_bias is None else log_bias)


def merge_lse(
    o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor, log_bias: Tensor | float
) -> Tensor:
    """Merge two partial attentions: out = (b e^L1 o1 + e^L2 o2) / (b e^L1 + e^L2).

    Written as o2 + (o1 - o2)·sigmoid(L1 + log b - L2): one stable float32 op chain, no
    exp overflow. o: [B,N,H,D]; lse: [B,H,N]."""
    w1 = torch.sigmoid(lse1 + log_bias - lse2).transpose(1, 2).unsqueeze(-1)  # [B,N,H,1]
    o2f = o2.float()
    return (o2f + (o1.float() - o2f) * w1).to(o2.dtype)
