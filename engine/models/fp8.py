"""fp8 (e4m3) linears: weights quantised once per output channel, activations per row
on the fly, multiplied by `torch._scaled_mm` (Hopper/Ada fp8 tensor cores).

Why per-channel weights and per-row activations: the Wan transformer's activations have a
few large rows (tokens) and the weights a few large output channels; a single tensor-wide
scale loses the small ones. Row-wise scales keep the error near 0.3-0.4% of bf16.

Two scalings of the activations (`SCALINGS`):
- "rowwise": one scale per token, one per output channel, both applied inside
  `_scaled_mm` (a CUTLASS kernel in PyTorch). The most accurate.
- "tensorwise": one scale for the whole activation and `scale_b = 1`; the per-channel
  weight scale is applied to the output afterwards (fused by the compiler into whatever
  consumes it). This takes cuBLASLt's fp8 path, which is faster on Hopper for these
  shapes, at a little more error where a few tokens are much larger than the rest.

The activation quantisation (abs-max, divide, cast) is plain tensor code on purpose: under
`torch.compile` Inductor fuses it into the norm/modulation kernel that produces the input,
so it costs no separate pass over memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
SCALINGS = ("rowwise", "tensorwise")


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] -> (fp8 [..., K], float32 scale [..., 1]) with x ~= q * scale: one scale
    per row of the last dim."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


class Fp8Linear(nn.Module):
    """A drop-in for `nn.Linear` holding an fp8 weight and its per-output-channel scale."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        out_dtype=torch.bfloat16,
        device=None,
        scaling: str = "rowwise",
    ):
        super().__init__()
        if scaling not in SCALINGS:
            raise ValueError(f"fp8 scaling {scaling!r}: choose one of {', '.join(SCALINGS)}")
        self.in_features, self.out_features = in_features, out_features
        self.out_dtype = out_dtype
        self.scaling = scaling
        self.register_buffer(
            "weight", torch.empty(out_features, in_features, dtype=FP8, device=device)
        )
        self.register_buffer(
            "weight_scale", torch.ones(1, out_features, dtype=torch.float32, device=device)
        )
        self.register_buffer(
            "bias", torch.zeros(out_features, dtype=out_dtype, device=device) if bias else None
        )

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, out_dtype: torch.dtype | None = None, scaling: str = "rowwise"
    ) -> Fp8Linear:
        w = linear.weight.detach()
        dtype = out_dtype or w.dtype
        m = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            out_dtype=dtype,
            device=w.device,
            scaling=scaling,
        )
        q, s = quantize_rowwise(w)  # per output channel = per row of the weight
        m.weight.copy_(q)
        m.weight_scale.copy_(s.view(1, -1))
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().to(dtype))
        return m

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale.view(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.scaling == "tensorwise":
            sa = x2.abs().amax().float().clamp(min=1e-12) / FP8_MAX
            q = (x2.float() / sa).clamp(-FP8_MAX, FP8_MAX).to(FP8)
            one = torch.ones((), dtype=torch.float32, device=x.device)
            y = torch._scaled_mm(
                q, self.weight.t(), scale_a=sa, scale_b=one, out_dtype=torch.float32
            )
            y = y * self.weight_scale
            if self.bias is not None:
                y = y + self.bias
            return y.to(self.out_dtype).reshape(*shape[:-1], self.out_features)
        q, sa = quantize_rowwise(x2)
        # weight is [out, in] row-major, so .t() is the column-major operand _scaled_mm wants.
        y = torch._scaled_mm(
            q,
            self.weight.t(),
            scale_a=sa,
            scale_b=self.weight_scale,
            bias=self.bias,
            out_dtype=self.out_dtype,
        )
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features},"
            f" fp8=e4m3, scaling={self.scaling}"
        )


def quantize_linears(
    model: nn.Module,
    include: Callable[[str, nn.Linear], bool] | None = None,
    *,
    out_dtype: torch.dtype | None = None,
    scaling: str = "rowwise",
) -> int:
    """Replace the selected `nn.Linear`s of `model` by `Fp8Linear`s in place, one at a time
    (so peak memory grows by one layer, not a model). Returns how many were replaced.

    `_scaled_mm` needs both matrix dimensions divisible by 16; other linears are kept.
    """
    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, nn.Linear):
                continue
            if child.in_features % 16 or child.out_features % 16:
                continue
            if include is not None and not include(full, child):
                continue
            setattr(
                module,
                child_name,
                Fp8Linear.from_linear(child, out_dtype=out_dtype, scaling=scaling),
            )
            del child
            count += 1
    return count
