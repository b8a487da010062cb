"""Text conditioning: UMT5-XXL (transformers' `UMT5EncoderModel`) fed from Wan's checkpoint,
and a weight-free stand-in for the tiny model.

Why transformers and not our own T5: the encoder runs once per prompt change, off the block
loop, so its speed hardly matters, and transformers is the oracle anyway. What is ours:
the map from Wan's key names (`models_t5_umt5-xxl-enc-bf16.pth`) onto transformers', the
text cleaning, the "zero past the prompt's tokens" rule the transformer was trained with,
and the placements (GPU bf16, GPU fp8 weights, CPU) that let a 24-32 GB card keep the 11 GB
encoder out of its memory.

Encoding runs only over the longest prompt of the batch and is then zero-padded to 512:
with the attention mask excluding padding and T5's purely relative positions, the real
tokens' outputs are the same as with 512 padded positions (tested), at a fraction of the cost.
"""

from __future__ import annotations

import hashlib
import html
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.weights.checkpoint import (
    WeightsError,
    assign_state_dict,
    load_checkpoint,
    materialize_,
    strip_prefix,
)

log = logging.getLogger(__name__)

TEXT_LEN = 512
TEXT_DIM = 4096
# Placement names a preset's `text_encoder` key may use; aliases map onto the canonical three.
PLACEMENTS = ("gpu", "fp8", "cpu")
_PLACEMENT_ALIASES = {
    "gpu": "gpu",
    "cuda": "gpu",
    "bf16": "gpu",
    "gpu-bf16": "gpu",
    "fp8": "fp8",
    "gpu-fp8": "fp8",
    "cuda-fp8": "fp8",
    "cpu": "cpu",
}


def normalize_placement(placement: str) -> str:
    """Canonical placement name ("gpu" | "fp8" | "cpu"), or a ValueError naming the choices."""
    p = _PLACEMENT_ALIASES.get(str(placement).strip().lower())
    if p is None:
        raise ValueError(
            f"text_encoder placement {placement!r} is not one of {', '.join(PLACEMENTS)}"
            " (aliases: cuda, bf16, gpu-fp8, cuda-fp8)"
        )
    return p


# ---------------------------------------------------------------------------------------------
# Text cleaning
# ---------------------------------------------------------------------------------------------


def clean_text(text: str) -> str:
    """Repair mojibake (ftfy), undo HTML escapes (twice: prompts pasted from the web are
    often double-escaped) and collapse white space, as Wan's pipeline does before tokenising."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # ftfy is a dependency; degrade rather than fail on a live stage
        pass
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


# ---------------------------------------------------------------------------------------------
# Tokenisers
# ---------------------------------------------------------------------------------------------


class Tokenizer(Protocol):
    def __call__(self, texts: Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
        """Cleaned texts -> (ids [N, l] padded with 0 to the longest, lengths [N]); each ends
        with EOS and holds at most `max_length` tokens."""
        ...


class HFTokenizer:
    """transformers' tokenizer from a folder laid out like `google/umt5-xxl`
    (tokenizer.json / spiece.model + tokenizer_config.json)."""

    def __init__(self, folder: str | Path):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(folder))

    def __call__(self, texts: Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
        out = self.tok(
            list(texts),
            padding="longest",
            truncation=True,
            max_length=max_length,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return out.input_ids, out.attention_mask.sum(1)


class SentencePieceTokenizer:
    """The same tokenisation straight from `spiece.model` (pieces + EOS id 1, pad id 0): the
    fallback when transformers cannot build a tokenizer from the folder (no tokenizer.json and
    no protobuf to convert spiece.model)."""

    def __init__(self, model_file: str | Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.eos = self.sp.eos_id() if self.sp.eos_id() >= 0 else 1
        self.pad = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0

    def __call__(self, texts: Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
        seqs = [self.sp.encode(t)[: max_length - 1] + [self.eos] for t in texts]
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), self.pad, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
        return ids, torch.tensor([len(s) for s in seqs])


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """The UMT5 tokenizer from `folder` (transformers first, sentencepiece as fallback)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: tokenizer folder not found (run `dreamdeck download`)")
    try:
        return HFTokenizer(folder)
    except Exception as e:  # transformers raises many kinds here (missing protobuf, tiktoken, ...)
        spiece = folder / "spiece.model"
        if not spiece.is_file():
            raise WeightsError(
                f"{folder}: cannot load tokenizer ({e}) and no spiece.model"
            ) from None
        log.info("tokenizer: transformers could not load %s (%s); using sentencepiece", folder, e)
        return SentencePieceTokenizer(spiece)


class HashTokenizer:
    """Tokenizer-free stand-in for the tiny model: each word of the cleaned text becomes
    a token id from a hash of the word, so the same text always gives the same ids and
    different texts (almost always) different ones, with nothing to download."""

    def __init__(self, vocab_size: int):
        if vocab_size < 3:
            raise ValueError("HashTokenizer needs a vocabulary of at least 3 (pad, eos, words)")
        self.vocab_size = vocab_size

    def _id(self, word: str) -> int:
        h = int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")
        return 2 + h % (self.vocab_size - 2)  # 0 = pad, 1 = eos, like T5

    def __call__(self, texts: Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
        seqs = [[self._id(w) for w in t.lower().split()][: max_length - 1] + [1] for t in texts]
        n = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), n, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
        return ids, torch.tensor([len(s) for s in seqs])


# ---------------------------------------------------------------------------------------------
# Configs and Wan <-> transformers names
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UMT5Spec:
    vocab: int = 256384
    dim: int = 4096
    dim_ffn: int = 10240
    heads: int = 64
    layers: int = 24
    buckets: int = 32
    max_distance: int = 128

    def hf_config(self):
        from transformers import UMT5Config

        return UMT5Config(
            vocab_size=self.vocab,
            d_model=self.dim,
            d_kv=self.dim // self.heads,
            d_ff=self.dim_ffn,
            num_layers=self.layers,
            num_heads=self.heads,
            relative_attention_num_buckets=self.buckets,
            relative_attention_max_distance=self.max_distance,
            feed_forward_proj="gated-gelu",  # gelu_new (tanh) gate, as Wan's T5 FFN
            layer_norm_epsilon=1e-6,
            dropout_rate=0.0,
            tie_word_embeddings=False,
            is_encoder_decoder=False,
            use_cache=False,
        )


UMT5_XXL = UMT5Spec()
# A few layers, small dims: tests and `--model tiny`.
UMT5_TINY = UMT5Spec(vocab=1024, dim=64, dim_ffn=128, heads=4, layers=2, buckets=8, max_distance=32)

_WAN_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    # Wan: fc1(x) * gelu(gate(x)); transformers: gelu(wi_0(x)) * wi_1(x)
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_HF_BLOCK = {v: k for k, v in _WAN_BLOCK.items()}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HF_BLOCK_RE = re.compile(r"^encoder\.block\.(\d+)\.(.+)$")


def wan_to_hf_key(key: str) -> list[str]:
    """transformers key(s) for one Wan T5 key (the token embedding feeds two tied names)."""
    if key == "token_embedding.weight":
        return ["shared.weight", "encoder.embed_tokens.weight"]
    if key == "norm.weight":
        return ["encoder.final_layer_norm.weight"]
    m = _BLOCK_RE.match(key)
    if m and m.group(2) in _WAN_BLOCK:
        return [f"encoder.block.{m.group(1)}.{_WAN_BLOCK[m.group(2)]}"]
    raise KeyError(key)


def hf_to_wan_key(key: str) -> str | None:
    """Wan key for a transformers key (None for the tied duplicate `encoder.embed_tokens`)."""
    if key == "shared.weight":
        return "token_embedding.weight"
    if key == "encoder.embed_tokens.weight":
        return None
    if key == "encoder.final_layer_norm.weight":
        return "norm.weight"
    m = _HF_BLOCK_RE.match(key)
    if m and m.group(2) in _HF_BLOCK:
        return f"blocks.{m.group(1)}.{_HF_BLOCK[m.group(2)]}"
    raise KeyError(key)


def convert_wan_t5(
    sd: dict[str, Tensor], *, file: str | Path = "<state dict>"
) -> dict[str, Tensor]:
    """Wan-named UMT5 encoder weights -> transformers `UMT5EncoderModel` names."""
    sd = strip_prefix(sd)
    out: dict[str, Tensor] = {}
    unknown = []
    for k, v in sd.items():
        try:
            for hk in wan_to_hf_key(k):
                out[hk] = v
        except KeyError:
            unknown.append(k)
    if unknown:
        raise WeightsError(
            f"{file}: {len(unknown)} key(s) are not Wan UMT5 encoder names, e.g. {', '.join(unknown[:5])}"
            " (is this `models_t5_umt5-xxl-enc-bf16.pth`?)"
        )
    return out


def spec_from_wan_state_dict(
    sd: dict[str, Tensor], *, file: str | Path = "<state dict>"
) -> UMT5Spec:
    """Read the dims off the weights, so tiny test checkpoints load through the same path."""
    sd = strip_prefix(sd)
    try:
        vocab, dim = sd["token_embedding.weight"].shape
        dim_ffn = sd["blocks.0.ffn.fc1.weight"].shape[0]
        buckets, heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
    except KeyError as e:
        raise WeightsError(f"{file}: not a Wan UMT5 encoder checkpoint: no key {e}") from None
    layers = 1 + max(int(m.group(1)) for k in sd if (m := _BLOCK_RE.match(k)))
    max_distance = UMT5_XXL.max_distance
    return UMT5Spec(vocab, dim, dim_ffn, heads, layers, buckets, max_distance)


# ---------------------------------------------------------------------------------------------
# fp8 weights
# ---------------------------------------------------------------------------------------------


class Fp8Linear(nn.Module):
    """A bias-free Linear whose weight rests in float8_e4m3fn with one float32 scale per output
    channel and is dequantised to the activation dtype at each call. That halves the
    encoder's resident memory (11 -> ~6 GB); speed is not the point (it runs per prompt)."""

    def __init__(
        self,
        linear: nn.Linear,
        compute_dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device | None = None,
    ):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Fp8Linear handles bias-free linears only (T5 has no biases)")
        # Quantise on the target device, one weight at a time: a CPU-resident (mmapped) bf16
        # encoder never needs to be on the GPU in full.
        w = linear.weight.detach().to(device or linear.weight.device, torch.float32)
        scale = (
            w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
            / torch.finfo(torch.float8_e4m3fn).max
        )
        self.register_buffer("qweight", (w / scale).to(torch.float8_e4m3fn))
        self.register_buffer("scale", scale)
        self.compute_dtype = compute_dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @property
    def weight(self) -> Tensor:
        # transformers' T5 FFN casts its input to `wo.weight.dtype`; an empty meta tensor of
        # the compute dtype makes that cast right without materialising a dequantised copy.
        return torch.empty(0, dtype=self.compute_dtype, device="meta")

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        return self.qweight.to(dtype) * self.scale.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantize(x.dtype))


def quantize_fp8_(
    module: nn.Module,
    compute_dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Swap every bias-free nn.Linear of `module` for an Fp8Linear (built on `device`), in place."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and child.bias is None:
            setattr(module, name, Fp8Linear(child, compute_dtype, device))
            del child
        else:
            quantize_fp8_(child, compute_dtype, device)
    return module


def _try_torchao_fp8(model: nn.Module) -> bool:
    """Opt-in (DREAMDECK_FP8_BACKEND=torchao): torchao's fp8 weight-only tensors on CUDA.
    Not the default: ours is tested here, torchao's API has moved between releases."""
    try:
        from torchao.quantization import float8_weight_only, quantize_

        quantize_(model, float8_weight_only())
        return True
    except Exception as e:  # missing or API drift: our own fp8 path is always there
        log.warning("torchao fp8 unavailable (%s); using dreamdeck's Fp8Linear", e)
        return False


# ---------------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------------


def _init_random_(model: nn.Module, seed: int) -> None:
    """Deterministic weights with sane activation scales (T5's own init scheme, roughly):
    no transformers init, so building an XXL on the GPU takes seconds."""
    gens: dict[torch.device, torch.Generator] = {}
    for name, p in model.named_parameters():
        g = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
        with torch.no_grad():
            if "layer_norm" in name:
                p.fill_(1.0)
                continue
            std = 1.0 if "shared" in name or "embed" in name else p.shape[-1] ** -0.5
            if "relative_attention_bias" in name:
                std = 0.1
            p.normal_(0.0, std, generator=g)


class TextEncoder:
    """UMT5 encoder + tokenizer: `encode(texts) -> [N, 512, D]`, zero past each prompt's tokens.

    `device` is where the model runs; `output_device` where embeddings are returned (the
    transformer's GPU when the encoder lives on the CPU)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        *,
        length: int = TEXT_LEN,
        device: str | torch.device = "cpu",
        output_device: str | torch.device | None = None,
        output_dtype: torch.dtype | None = None,
        placement: str = "cpu",
    ):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.length = length
        self.device = torch.device(device)
        self.output_device = (
            torch.device(output_device) if output_device is not None else self.device
        )
        self.output_dtype = output_dtype
        self.placement = placement
        self.dim = int(model.config.d_model)
        self._stream: torch.cuda.Stream | None = None

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> Tensor:
        """[N, L, D] on `output_device`. On a GPU the work runs on a high-priority stream
        of its own and this call waits for that stream only: the generation thread keeps
        up to a few denoising steps of kernels queued on the default stream, and an encode
        queued behind them would hold a prompt change back by that much (issue 15's
        latency). The result is marked as used by the default stream, where the mixer
        blends it, so its memory is not reused while work queued there may still read it."""
        if isinstance(texts, str) or not texts:
            raise ValueError("encode takes a non-empty list of strings")
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("encode takes strings only")
        side = self._side_stream()
        if side is None:
            return self._encode(texts)
        with torch.cuda.stream(side):
            out = self._encode(texts)
        side.synchronize()
        if out.is_cuda:
            out.record_stream(torch.cuda.default_stream(out.device))
        return out

    def _side_stream(self) -> torch.cuda.Stream | None:
        dev = self.output_device if self.output_device.type == "cuda" else self.device
        if dev.type != "cuda":
            return None
        if self._stream is None:
            # the weights were placed by work on the default stream: finished once, here
            torch.cuda.current_stream(dev).synchronize()
            self._stream = torch.cuda.Stream(dev, priority=-1)
        return self._stream

    def _encode(self, texts: Sequence[str]) -> Tensor:
        ids, lengths = self.tokenizer([clean_text(t) for t in texts], self.length)
        mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
        hidden = self.model(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
        ).last_hidden_state
        hidden = hidden * mask.to(hidden.device, hidden.dtype)[..., None]  # zero past the prompt
        out = hidden.new_zeros(len(texts), self.length, hidden.shape[-1])
        out[:, : hidden.shape[1]] = hidden
        return out.to(self.output_device, self.output_dtype or out.dtype)

    __call__ = encode


def _place(model: nn.Module, placement: str, device: torch.device, dtype: torch.dtype) -> None:
    """Move to `device`; for "fp8" quantise the linears on `device` first (the embedding
    table and norms stay in `dtype`)."""
    if placement == "fp8":
        if os.environ.get("DREAMDECK_FP8_BACKEND", "").lower() == "torchao":
            model.to(device)
            if _try_torchao_fp8(model):
                return
        quantize_fp8_(model, compute_dtype=dtype, device=device)
    model.to(device)


def _resolve(placement: str, device: str | torch.device | None, dtype: torch.dtype | None):
    placement = normalize_placement(placement)
    if device is None:
        device = "cpu" if placement == "cpu" or not torch.cuda.is_available() else "cuda"
    device = torch.device(device)
    if placement == "cpu":
        device = torch.device("cpu")
    if dtype is None:
        dtype = torch.bfloat16  # on the CPU too: 11 GB of host memory instead of 22
    return placement, device, dtype


def load_text_encoder(
    weights: str | Path,
    tokenizer_dir: str | Path,
    *,
    placement: str = "gpu",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    output_device: str | torch.device | None = None,
    length: int = TEXT_LEN,
) -> TextEncoder:
    """Wan's `models_t5_umt5-xxl-enc-bf16.pth` (or a transformers `text_encoder/` folder of a
    -Diffusers repo) plus the `google/umt5-xxl` tokenizer folder, placed by `placement`:
    "gpu" (bf16 on the GPU), "fp8" (fp8 weights on the GPU), "cpu" (bf16 on the CPU, outputs
    moved to `output_device`)."""
    from transformers import UMT5EncoderModel

    placement, device, dtype = _resolve(placement, device, dtype)
    weights = Path(weights)
    tokenizer = load_tokenizer(tokenizer_dir)
    if weights.is_dir():  # transformers format
        try:
            model = UMT5EncoderModel.from_pretrained(str(weights), dtype=dtype)
        except Exception as e:
            raise WeightsError(f"{weights}: cannot load transformers UMT5 encoder: {e}") from None
    else:
        sd = load_checkpoint(weights)
        spec = spec_from_wan_state_dict(sd, file=weights)
        with torch.device("meta"):
            model = UMT5EncoderModel(spec.hf_config())
        target = device if placement != "fp8" else torch.device("cpu")
        assign_state_dict(
            model, convert_wan_t5(sd, file=weights), file=weights, dtype=dtype, device=target
        )
        model.encoder.embed_tokens = model.shared  # keep the tie after assignment
    _place(model, placement, device, dtype)
    return TextEncoder(
        model,
        tokenizer,
        length=length,
        device=device,
        output_device=output_device,
        output_dtype=dtype,
        placement=placement,
    )


def random_text_encoder(
    spec: UMT5Spec = UMT5_XXL,
    *,
    placement: str = "gpu",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    output_device: str | torch.device | None = None,
    length: int = TEXT_LEN,
    seed: int = 0,
) -> TextEncoder:
    """A random-weights encoder of `spec` with a hash tokenizer: times encode for each
    placement (bench) without downloading 11 GB. Not meant to give meaningful embeddings."""
    from transformers import UMT5EncoderModel

    placement, device, dtype = _resolve(placement, device, dtype)
    with torch.device("meta"):
        model = UMT5EncoderModel(spec.hf_config())
    model.to_empty(device=device)
    model.to(dtype)
    _init_random_(model, seed)
    model.encoder.embed_tokens = model.shared
    _place(model, placement, device, dtype)
    return TextEncoder(
        model,
        HashTokenizer(spec.vocab),
        length=length,
        device=device,
        output_device=output_device,
        output_dtype=dtype,
        placement=placement,
    )


def _bucket(rel: Tensor, buckets: int, max_distance: int) -> Tensor:
    """T5's bidirectional relative-position buckets: half the buckets for keys after the
    query, of those half exact offsets and half logarithmic bins up to `max_distance`."""
    half = buckets // 2
    out = (rel > 0).long() * half
    dist = rel.abs()
    exact = half // 2
    far = (
        exact
        + (
            torch.log(dist.float().clamp(min=1) / exact)
            / math.log(max_distance / exact)
            * (half - exact)
        ).long()
    )
    return out + torch.where(dist < exact, dist, far.clamp(max=half - 1))


class _RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * (x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6))


class _Attention(nn.Module):
    def __init__(self, spec: UMT5Spec):
        super().__init__()
        self.spec = spec
        self.q, self.k, self.v, self.o = (
            nn.Linear(spec.dim, spec.dim, bias=False) for _ in range(4)
        )
        self.relative_attention_bias = nn.Embedding(spec.buckets, spec.heads)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, n, _ = x.shape
        h = self.spec.heads
        q, k, v = (f(x).view(b, n, h, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        pos = torch.arange(n, device=x.device)
        rel = _bucket(pos[None, :] - pos[:, None], self.spec.buckets, self.spec.max_distance)
        bias = self.relative_attention_bias(rel).permute(2, 0, 1)[None]  # [1, H, n, n]
        bias = bias.masked_fill(~mask[:, None, None, :], torch.finfo(x.dtype).min)
        # T5 does not scale the logits (its init folds 1/sqrt(d) into q)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class _SelfAttentionLayer(nn.Module):
    def __init__(self, spec: UMT5Spec):
        super().__init__()
        self.SelfAttention = _Attention(spec)  # transformers' parameter names
        self.layer_norm = _RMSNorm(spec.dim)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return x + self.SelfAttention(self.layer_norm(x), mask)


class _GatedGelu(nn.Module):
    def __init__(self, spec: UMT5Spec):
        super().__init__()
        self.wi_0 = nn.Linear(spec.dim, spec.dim_ffn, bias=False)
        self.wi_1 = nn.Linear(spec.dim, spec.dim_ffn, bias=False)
        self.wo = nn.Linear(spec.dim_ffn, spec.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class _FeedForwardLayer(nn.Module):
    def __init__(self, spec: UMT5Spec):
        super().__init__()
        self.DenseReluDense = _GatedGelu(spec)  # transformers' parameter names
        self.layer_norm = _RMSNorm(spec.dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class _Block(nn.Module):
    def __init__(self, spec: UMT5Spec):
        super().__init__()
        self.layer = nn.ModuleList([_SelfAttentionLayer(spec), _FeedForwardLayer(spec)])

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.layer[1](self.layer[0](x, mask))


class _Stack(nn.Module):
    def __init__(self, spec: UMT5Spec):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab, spec.dim)  # tied to `shared` once built
        self.block = nn.ModuleList([_Block(spec) for _ in range(spec.layers)])
        self.final_layer_norm = _RMSNorm(spec.dim)


@dataclass
class _Output:
    last_hidden_state: Tensor


@dataclass(frozen=True)
class _Config:
    d_model: int


class TinyUMT5(nn.Module):
    """A float32 UMT5 encoder in a few lines, for the tiny model only: transformers'
    `UMT5EncoderModel` is the same network (parameter names and outputs match it, tested)
    but importing transformers costs about 7 s of CPU, on every `dreamdeck run --model tiny`
    start (tests start dozens). The real encoder stays transformers' (module docstring)."""

    def __init__(self, spec: UMT5Spec):
        super().__init__()
        self.config = _Config(spec.dim)
        self.shared = nn.Embedding(spec.vocab, spec.dim)
        self.encoder = _Stack(spec)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> _Output:
        x = self.encoder.embed_tokens(input_ids)
        mask = attention_mask.bool()
        for block in self.encoder.block:
            x = block(x, mask)
        return _Output(self.encoder.final_layer_norm(x))


def tiny_spec(dim: int) -> UMT5Spec:
    """The tiny model's encoder shape for a transformer text width `dim`."""
    heads = 4 if dim % 4 == 0 else 1
    return UMT5Spec(
        vocab=1024, dim=dim, dim_ffn=2 * dim, heads=heads, layers=2, buckets=8, max_distance=32
    )


class TinyTextEncoder(TextEncoder):
    """Stand-in for `--model tiny`: a small random UMT5 (fixed seed) over hashed words.
    Deterministic: the same prompt gives the same embedding, different prompts different
    ones, zero past the prompt's tokens like the real encoder. It knows nothing of
    language; it exists so the whole engine runs on a CPU with nothing downloaded."""

    def __init__(self, length: int = 32, dim: int = 64, *, seed: int = 0, device: str = "cpu"):
        spec = tiny_spec(dim)
        # Built on the meta device: nn.Linear's own init would draw from the global RNG,
        # and this encoder may be built on a thread beside the transformer and decoder
        # (engine/runtime/pipeline.py), whose random builds seed and use that RNG: the
        # two interleaving made random weights differ from one build to the next.
        with torch.device("meta"):
            model = TinyUMT5(spec)
        materialize_(model, device)
        _init_random_(model, seed)  # every parameter: the same weights as transformers' gets
        model.encoder.embed_tokens = model.shared
        super().__init__(
            model, HashTokenizer(spec.vocab), length=length, device=device, placement="cpu"
        )


def time_encode(encoder: TextEncoder, texts: Sequence[str], repeats: int = 5) -> dict[str, float]:
    """Median / min wall time of `encoder.encode(texts)` in ms after one warm-up, synchronising
    CUDA around each call (for `bench` and device scripts; not used in the live path)."""
    import statistics
    import time

    def sync() -> None:
        for d in {encoder.device, encoder.output_device}:
            if d.type == "cuda":
                torch.cuda.synchronize(d)

    encoder.encode(texts)
    sync()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        encoder.encode(texts)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "n": len(times)}
