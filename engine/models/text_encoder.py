"""Text conditioning: UMT5-XXL (our `UMT5Encoder`) fed from Wan's checkpoint or a
transformers-format folder, and a weight-free stand-in for the tiny model.

Why our own T5 and not transformers': start-up. Every `dreamdeck run` of the full model
builds the encoder while the 14B transformer loads on another thread, and importing
transformers' `UMT5EncoderModel` costs about 5 s of pure-Python CPU on this 2-core test
machine (1.3-1.8 s for `import transformers` or its `AutoTokenizer` alone), GIL time taken
from that load on every start (issue 15: restart to first frames). The network is small:
UMT5 is T5 with a relative position bias in every layer, written here in a few classes with
transformers' parameter names, so its state dicts and `save_pretrained` folders load
strictly. transformers stays the oracle in tests: ours equals its `UMT5EncoderModel` on the
same weights in float32 and in bf16 computed its way (float32 mean square in the norm, cast
back before the scale, FFN input cast to `wo`'s dtype, unscaled logits, padded keys at the
dtype's minimum), and the tokenizer (`tokenizer.json` through the `tokenizers` library)
gives its ids. The encoder runs once per prompt change, off the block loop, so its speed
hardly matters. Also ours: the map from Wan's key names (`models_t5_umt5-xxl-enc-bf16.pth`)
onto transformers', the text cleaning, the "zero past the prompt's tokens" rule the
transformer was trained with, and the placements (GPU bf16, GPU fp8 weights, CPU) that let
a 24-32 GB card keep the 11 GB encoder out of its memory.

Encoding runs only over the longest prompt of the batch and is then zero-padded to 512:
with the attention mask excluding padding and T5's purely relative positions, the real
tokens' outputs are the same as with 512 padded positions (tested), at a fraction of the cost.
"""

from __future__ import annotations

import hashlib
import html
import json
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


class JsonTokenizer:
    """The UMT5 tokenizer from the folder's `tokenizer.json` with the `tokenizers` library
    (what transformers' fast tokenizer wraps), without importing transformers (seconds).

    Set up as transformers' `T5Tokenizer` sets itself up from that file: the file's
    vocabulary and special tokens, of its normaliser only sentencepiece's precompiled map,
    white-space split then Metaspace ("▁" before every word), and EOS after the pieces,
    whatever pre-tokeniser and post-processor the file names. Truncated to `max_length - 1`
    pieces + EOS and padded with <pad> to the longest, as transformers' `padding="longest",
    truncation=True, max_length=` gives (tested against it). One deliberate difference: the
    file's Unigram model is kept as it is, `byte_fallback` included (characters outside the
    vocabulary become byte pieces, as in sentencepiece and in transformers 4's fast tokenizer,
    which Wan used); transformers 5's T5Tokenizer rebuilds the model without it (<unk>)."""

    _T5_CLASSES = (None, "T5Tokenizer", "T5TokenizerFast")

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer as _Backend
        from tokenizers import pre_tokenizers

        folder = Path(folder)
        config_file = folder / "tokenizer_config.json"
        config = (
            json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        )
        if config.get("tokenizer_class") not in self._T5_CLASSES:
            raise ValueError(
                f"{config_file}: tokenizer_class {config['tokenizer_class']!r} is not T5's"
            )
        tok = _Backend.from_file(str(folder / "tokenizer.json"))
        if type(tok.model).__name__ != "Unigram":
            raise ValueError(f"{folder / 'tokenizer.json'}: not a Unigram (sentencepiece) model")

        def name(v: object) -> str | None:  # a token is a string or {"content": ...}
            return v.get("content") if isinstance(v, dict) else v if isinstance(v, str) else None

        eos_name = name(config.get("eos_token", "</s>"))
        pad_name = name(config.get("pad_token", "<pad>"))
        unk_name = name(config.get("unk_token", "<unk>"))
        eos, pad = tok.token_to_id(str(eos_name)), tok.token_to_id(str(pad_name))
        if eos is None or pad is None:
            raise ValueError(f"{folder / 'tokenizer.json'}: no {eos_name} or {pad_name} token")
        # transformers registers these as special tokens, matched whole before the pieces
        # (a literal "</s>" in a prompt is EOS, not "▁" + "</s>"); files from its converters
        # list them already, and re-adding an existing token changes nothing
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        special = [eos_name, pad_name, unk_name, *(name(t) for t in extra)]
        tok.add_special_tokens([t for t in special if t and tok.token_to_id(t) is not None])
        tok.normalizer = _precompiled_only(tok.normalizer)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.WhitespaceSplit(),
                pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
            ]
        )
        # EOS, truncation and padding are done below (stateless calls), not by the backend
        tok.no_truncation()
        tok.no_padding()
        self.tok, self.eos, self.pad = tok, eos, pad

    def __call__(self, texts: Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
        pieces = self.tok.encode_batch(list(texts), add_special_tokens=False)
        seqs = [e.ids[: max_length - 1] + [self.eos] for e in pieces]
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), self.pad, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
        return ids, torch.tensor([len(s) for s in seqs])


def _precompiled_only(normalizer):
    """The sentencepiece charsmap (`Precompiled`) of a tokenizer.json normaliser, the only
    part transformers' T5Tokenizer keeps (converters add a Strip and a Replace of repeated
    spaces, no-ops on cleaned text); None when there is none."""
    if normalizer is None:
        return None
    parts = [normalizer]
    if type(normalizer).__name__ == "Sequence":
        parts = []
        while True:
            try:
                parts.append(normalizer[len(parts)])
            except IndexError:
                break
    kept = [n for n in parts if type(n).__name__ == "Precompiled"]
    return kept[-1] if kept else None


class HFTokenizer:
    """transformers' tokenizer from a folder laid out like `google/umt5-xxl`
    (tokenizer.json / spiece.model + tokenizer_config.json): the fallback for a folder that
    `JsonTokenizer` cannot read (no tokenizer.json); importing transformers costs seconds."""

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
    """The UMT5 tokenizer from `folder`: `tokenizer.json` through the `tokenizers` library
    first (no transformers import), then transformers, then sentencepiece."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: tokenizer folder not found (run `dreamdeck download`)")
    if (folder / "tokenizer.json").is_file():
        try:
            return JsonTokenizer(folder)
        except Exception as e:  # tokenizers' own errors, a config of another class, bad JSON
            log.info("tokenizer: tokenizers could not load %s (%s); trying transformers", folder, e)
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
    head_dim: int = 0  # 0: dim // heads (T5 allows heads * head_dim != dim; UMT5-XXL has 64 * 64)
    eps: float = 1e-6

    @property
    def kv_dim(self) -> int:
        return self.head_dim or self.dim // self.heads

    def hf_config(self):
        """transformers' config of this spec: for the oracle in tests (imports transformers)."""
        from transformers import UMT5Config

        return UMT5Config(
            vocab_size=self.vocab,
            d_model=self.dim,
            d_kv=self.kv_dim,
            d_ff=self.dim_ffn,
            num_layers=self.layers,
            num_heads=self.heads,
            relative_attention_num_buckets=self.buckets,
            relative_attention_max_distance=self.max_distance,
            feed_forward_proj="gated-gelu",  # gelu_new (tanh) gate, as Wan's T5 FFN
            layer_norm_epsilon=self.eps,
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
        inner = sd["blocks.0.attn.q.weight"].shape[0]
    except KeyError as e:
        raise WeightsError(f"{file}: not a Wan UMT5 encoder checkpoint: no key {e}") from None
    layers = 1 + max(int(m.group(1)) for k in sd if (m := _BLOCK_RE.match(k)))
    max_distance = UMT5_XXL.max_distance  # not in the weights; Wan's T5 uses 128
    head_dim = 0 if inner == dim else inner // heads
    return UMT5Spec(vocab, dim, dim_ffn, heads, layers, buckets, max_distance, head_dim)


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


_HF_CONFIG_KEYS = {  # transformers' UMT5Config name -> UMT5Spec field
    "vocab_size": "vocab",
    "d_model": "dim",
    "d_ff": "dim_ffn",
    "num_heads": "heads",
    "num_layers": "layers",
    "relative_attention_num_buckets": "buckets",
    "relative_attention_max_distance": "max_distance",
}


def spec_from_hf_config(cfg: object, *, file: str | Path = "config.json") -> UMT5Spec:
    """The spec of a transformers UMT5 `config.json` (already parsed), or a WeightsError
    naming `file` and the key at fault."""
    if not isinstance(cfg, dict):
        raise WeightsError(f"{file}: not a JSON object")
    model_type = cfg.get("model_type", "umt5")
    if model_type != "umt5":
        raise WeightsError(
            f"{file}: model_type {model_type!r} is not 'umt5' (UMT5 has a position bias in"
            " every layer; T5 and mT5 share layer 0's, which this encoder does not implement)"
        )
    missing = [k for k in (*_HF_CONFIG_KEYS, "feed_forward_proj") if k not in cfg]
    if missing:
        raise WeightsError(
            f"{file}: no {', '.join(missing)} (not a transformers UMT5 encoder config.json?)"
        )
    if cfg["feed_forward_proj"] != "gated-gelu":
        raise WeightsError(
            f"{file}: feed_forward_proj is {cfg['feed_forward_proj']!r}; only 'gated-gelu'"
            " (UMT5's tanh-GELU gated FFN) is supported"
        )

    def positive_int(key: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise WeightsError(f"{file}: {key} = {value!r} is not a positive integer")
        return value

    fields = {f: positive_int(k, cfg[k]) for k, f in _HF_CONFIG_KEYS.items()}
    if fields["buckets"] < 4 or fields["max_distance"] <= fields["buckets"] // 4:
        raise WeightsError(
            f"{file}: relative_attention_num_buckets = {fields['buckets']} and"
            f" relative_attention_max_distance = {fields['max_distance']} leave no logarithmic"
            " buckets (need at least 4 buckets and a distance past a quarter of them)"
        )
    d_kv = positive_int("d_kv", cfg.get("d_kv", fields["dim"] // fields["heads"]))
    eps = cfg.get("layer_norm_epsilon", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps < 1:
        raise WeightsError(f"{file}: layer_norm_epsilon = {eps!r} is not a small positive number")
    head_dim = 0 if d_kv * fields["heads"] == fields["dim"] else d_kv
    return UMT5Spec(**fields, head_dim=head_dim, eps=float(eps))


def _safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a transformers folder: `model.safetensors`, or the shards its
    `model.safetensors.index.json` names."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(
                f"{index}: not a safetensors index ({type(e).__name__}: {e})"
            ) from None
        plain = all(
            isinstance(n, str) and n not in ("", ".", "..") and "/" not in n and "\\" not in n
            for n in names
        )
        if not names or not plain:
            raise WeightsError(f"{index}: its weight_map names no shard files in this folder")
        for n in names:  # a missing shard, a folder or a device (a FIFO would block the read)
            if not (folder / n).is_file():
                raise WeightsError(f"{index}: shard {n[:80]!r} not found as a file in {folder}")
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise WeightsError(
        f"{folder}: no model.safetensors or model.safetensors.index.json (a transformers"
        " UMT5 encoder folder holds config.json and one of them)"
    )


def load_umt5_folder(
    folder: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> UMT5Encoder:
    """Our encoder from a transformers-format folder (`config.json` + safetensors, sharded or
    not, as `save_pretrained` and the -Diffusers repos' `text_encoder/` lay it out), without
    importing transformers. Shards are checked (names, shapes) and assigned one at a time;
    errors name the file and the key."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise WeightsError(f"{cfg_path}: not found (a transformers-format encoder folder needs it)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{cfg_path}: not readable JSON ({e})") from None
    spec = spec_from_hf_config(cfg, file=cfg_path)
    with torch.device("meta"):
        model = UMT5Encoder(spec)
    own = model.state_dict(keep_vars=True)
    seen: set[str] = set()
    for f in _safetensors_files(folder):
        part = load_checkpoint(f)
        unknown = [k for k in part if k not in own]
        if unknown:
            raise WeightsError(
                f"{f}: {len(unknown)} key(s) are not UMT5 encoder names, e.g."
                f" {', '.join(unknown[:5])} (only a UMT5EncoderModel's weights load here)"
            )
        assign_state_dict(model, part, file=f, dtype=dtype, device=device, strict=False)
        seen.update(part)
        del part
    if "shared.weight" not in seen and "encoder.embed_tokens.weight" in seen:
        model.shared = model.encoder.embed_tokens  # saved under the tied name only
        seen.add("shared.weight")
    seen.add("encoder.embed_tokens.weight")  # tied to `shared` below
    missing = [k for k in own if k not in seen]
    if missing:
        raise WeightsError(
            f"{folder}: {len(missing)} weight(s) missing from its safetensors, e.g."
            f" {', '.join(missing[:5])}"
        )
    return model.tie_()


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
    moved to `output_device`). Builds our `UMT5Encoder` either way: no transformers import."""
    placement, device, dtype = _resolve(placement, device, dtype)
    weights = Path(weights)
    tokenizer = load_tokenizer(tokenizer_dir)
    # fp8 quantises from host memory, one linear at a time, onto the GPU (`_place`)
    target = device if placement != "fp8" else torch.device("cpu")
    if weights.is_dir():  # transformers format
        model = load_umt5_folder(weights, dtype=dtype, device=target)
    else:
        sd = load_checkpoint(weights)
        spec = spec_from_wan_state_dict(sd, file=weights)
        with torch.device("meta"):
            model = UMT5Encoder(spec)
        assign_state_dict(
            model, convert_wan_t5(sd, file=weights), file=weights, dtype=dtype, device=target
        )
        model.tie_()  # keep the tie after assignment
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
    placement, device, dtype = _resolve(placement, device, dtype)
    with torch.device("meta"):
        model = UMT5Encoder(spec).to(dtype)  # dtype first: no float32 XXL on the way
    materialize_(model, device)
    _init_random_(model, seed)
    model.tie_()
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


# Weight dtypes a FFN input is cast to before `wo` (T5 keeps `wo` in float32 for some int8 and
# fp16 setups; an fp8 or int8 storage dtype is not a compute dtype and is left alone).
_COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _clamp_fp16(x: Tensor) -> Tensor:
    """T5's guard against fp16 overflow after each sub-layer (a no-op in bf16 and float32)."""
    if x.dtype != torch.float16:
        return x
    top = torch.finfo(torch.float16).max
    lim = torch.where(torch.isinf(x).any(), top - 1000, top)
    return x.clamp(min=-lim, max=lim)


def _gelu_tanh(x: Tensor) -> Tensor:
    """The tanh GELU op by op, as Wan's T5 and transformers' `gelu_new` evaluate it (in bf16
    each op rounds: the fused `F.gelu(approximate="tanh")` would differ in the last bits)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3.0))))


class _RMSNorm(nn.Module):
    """T5's norm: no mean, no bias; the mean square in float32, the normalised state back in
    the weight's dtype (when that is fp16/bf16) before the scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class _Attention(nn.Module):
    def __init__(self, spec: UMT5Spec):
        super().__init__()
        self.heads = spec.heads
        inner = spec.heads * spec.kv_dim
        self.q = nn.Linear(spec.dim, inner, bias=False)
        self.k = nn.Linear(spec.dim, inner, bias=False)
        self.v = nn.Linear(spec.dim, inner, bias=False)
        self.o = nn.Linear(inner, spec.dim, bias=False)
        # UMT5: every layer has its own position bias (T5 shares layer 0's)
        self.relative_attention_bias = nn.Embedding(spec.buckets, spec.heads)

    def forward(self, x: Tensor, mask: Tensor, buckets: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = (
            f(x).view(b, n, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v)
        )
        bias = self.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # [1, H, n, n]
        low = max(torch.finfo(q.dtype).min, torch.finfo(bias.dtype).min)
        bias = bias.masked_fill(~mask[:, None, None, :], low).to(q.dtype)  # padded keys out
        # T5 does not scale the logits (its init folds 1/sqrt(d) into q)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class _SelfAttentionLayer(nn.Module):
    def __init__(self, spec: UMT5Spec):
        super().__init__()
        self.SelfAttention = _Attention(spec)  # transformers' parameter names
        self.layer_norm = _RMSNorm(spec.dim, spec.eps)

    def forward(self, x: Tensor, mask: Tensor, buckets: Tensor) -> Tensor:
        return x + self.SelfAttention(self.layer_norm(x), mask, buckets)


class _GatedGelu(nn.Module):
    def __init__(self, spec: UMT5Spec):
        super().__init__()
        self.wi_0 = nn.Linear(spec.dim, spec.dim_ffn, bias=False)
        self.wi_1 = nn.Linear(spec.dim, spec.dim_ffn, bias=False)
        self.wo = nn.Linear(spec.dim_ffn, spec.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = _gelu_tanh(self.wi_0(x)) * self.wi_1(x)
        w = self.wo.weight  # Fp8Linear answers with its compute dtype
        if isinstance(w, Tensor) and w.dtype in _COMPUTE_DTYPES and h.dtype != w.dtype:
            h = h.to(w.dtype)
        return self.wo(h)


class _FeedForwardLayer(nn.Module):
    def __init__(self, spec: UMT5Spec):
        super().__init__()
        self.DenseReluDense = _GatedGelu(spec)  # transformers' parameter names
        self.layer_norm = _RMSNorm(spec.dim, spec.eps)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class _Block(nn.Module):
    def __init__(self, spec: UMT5Spec):
        super().__init__()
        self.layer = nn.ModuleList([_SelfAttentionLayer(spec), _FeedForwardLayer(spec)])

    def forward(self, x: Tensor, mask: Tensor, buckets: Tensor) -> Tensor:
        x = _clamp_fp16(self.layer[0](x, mask, buckets))
        return _clamp_fp16(self.layer[1](x))


class _Stack(nn.Module):
    def __init__(self, spec: UMT5Spec):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab, spec.dim)  # tied to `shared` once built
        self.block = nn.ModuleList([_Block(spec) for _ in range(spec.layers)])
        self.final_layer_norm = _RMSNorm(spec.dim, spec.eps)


@dataclass
class _Output:
    last_hidden_state: Tensor


@dataclass(frozen=True)
class _Config:
    d_model: int


class UMT5Encoder(nn.Module):
    """The UMT5 encoder (every size: XXL for the real model, a few layers for tiny), ours.

    transformers' `UMT5EncoderModel` is the same network: the parameter names are its names
    (so its state dicts load strictly), and the outputs equal its outputs on the same
    weights in float32 and, op for op, in bf16 (tests/test_text_encoder.py). Ours because
    importing transformers' model costs seconds of CPU on every start (module docstring).

    Call as transformers' model is called: `model(input_ids=, attention_mask=)` ->
    `.last_hidden_state` [N, l, D] (padded positions hold values; `TextEncoder` zeroes them).
    """

    def __init__(self, spec: UMT5Spec):
        super().__init__()
        self.spec = spec
        self.config = _Config(spec.dim)
        self.shared = nn.Embedding(spec.vocab, spec.dim)
        self.encoder = _Stack(spec)

    def tie_(self) -> UMT5Encoder:
        """Make `encoder.embed_tokens` the `shared` table again (after weights are assigned)."""
        self.encoder.embed_tokens = self.shared
        return self

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> _Output:
        x = self.encoder.embed_tokens(input_ids)
        n = x.shape[1]
        if attention_mask is None:
            mask = torch.ones(input_ids.shape, dtype=torch.bool, device=x.device)
        else:
            mask = attention_mask.to(x.device).bool()
        pos = torch.arange(n, device=x.device)
        buckets = _bucket(pos[None, :] - pos[:, None], self.spec.buckets, self.spec.max_distance)
        for block in self.encoder.block:
            x = block(x, mask, buckets)
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
            model = UMT5Encoder(spec)
        materialize_(model, device)
        _init_random_(model, seed)  # every parameter: the same weights as transformers' gets
        model.tie_()
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
