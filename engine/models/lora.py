"""Live LoRA slots on a `WanModel`: up to 4 LoRAs whose strengths change at any block
boundary, with no per-frame cost while they stand still and the base model's exact
output at strength 0.

The mechanism, per targeted linear (a "site"):

- **Merged** (strengths still): the weight holds ``W = base + sum_i m_i * d_i`` where
  ``d_i = (alpha/rank) * up @ down`` and ``m_i`` the slot strengths it was merged at. The
  forward is the plain linear: no extra cost. The sum is always computed from the
  *pristine* base weight, then cast (or, for fp8 weights, re-quantised row by row with
  new scales), in place in the weight's storage by engine/models/lora_merge.py (one GEMM
  per row range for all slots; fp8 in one Triton kernel; no large scratch), so merging
  never drifts however often strengths move. A slot standing still is merged even while
  another moves.
- **Moving** strengths, by where the pristine weights live (`pristine_device`):
  - host (pinned on CUDA; GPU memory grows by the LoRA factors only): a **side path**.
    The forward adds ``B @ (scale * (A @ x))`` (one `addmm` into the layer's output) with
    the stacked factors of every slot and ``scale`` the per-rank tensor
    ``(s_i - m_i) * alpha_i / rank_i``. Moving strengths only rewrite that small tensor
    (no recompile). When a slot has stood still for a block its sites are merged
    (`merge_per_block` sites per boundary, so a host-to-device merge is spread out) and
    the side paths switch off.
  - device (`remerge`): every site is **re-merged at every block** from the device
    pristine (no side path, no wrapped module): ~3 B of memory traffic per fp8 weight
    (1-2 % of a 14B block by bytes; 7 % measured, docs/PERFORMANCE.md), at the memory
    cost of the pristine copy.
- **Exactness at 0**: when every slot's strength is 0 (or every slot is empty) each
  merged site gets its pristine weight back, copied, not subtracted: the model is the
  base model bit for bit from that very block. A LoRA loaded at strength 0 touches
  nothing.
- Full differences (`.diff`, `.diff_b`, also on norms) are merged at once at every
  change, from the pristine tensors (they are rare and small or full-rank, where a side
  path would cost as much as the layer).
- **Compiled models** (`rank_bucket`, side path only): every block linear is wrapped up
  front and, while a LoRA is loaded (or during warm-up), holds zero factors padded to a
  rank bucket; the side path is switched per transformer block, so loading, moving,
  merging and unloading change no module structure, shape or guard: `warm` runs the
  side-path graph once during warm-up and the show compiles nothing new.
- **Memory**: the sites' stacks (or parts) are the only device copy of the factors (the
  loaded file's tensors are dropped after install); `memory()` accounts for every byte.

All changes happen in `install` and `update`, which the caller runs between blocks (the
stream session is synchronous), so a change lands atomically at the next block. File
reading and the copy of the factors to the device happen in `prepare`, which touches no
model state and is meant for a loader thread (engine/runtime/lora_loader.py).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.models.fp8 import Fp8Linear
from engine.models.lora_merge import (
    fp8_merge_rows_,
    linear_merge_rows_,
    merge_rows_reference,
    triton_usable,
)
from engine.models.wan import CONFIGS, SelfAttention, WanModel

log = logging.getLogger(__name__)


class LoraError(ValueError):
    """A LoRA that cannot be used: the message names the file and what is wrong."""


SLOTS = 4
# float32 elements of the one scratch buffer the general merge path works through
# (engine/models/lora_merge.py): 32 MB; the fast GPU paths need none.
MERGE_CHUNK_ELEMS = 1 << 23
# Modules whose output feeds the cached cross-attention K/V (engine/stream/session.py):
# changing them means recomputing that cache.
_TEXT_KV = re.compile(r"(^text_embedding\.)|(\.cross_attn\.(k|v|norm_k)$)")


class LoraLinear(nn.Module):
    """A linear (`nn.Linear` or `Fp8Linear`) with an optional low-rank side path. With the
    path off, the forward is exactly the wrapped linear's."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.side_on = False
        # Buffers (not saved): the stacked factors of every slot, and per rank column its
        # slot, alpha/rank and the strength already merged times alpha/rank. `strength` is
        # the slots' one shared device tensor: a moving strength is one 16-byte copy per
        # block for the whole model, no recompile, no per-layer work on the host.
        for name in ("A", "B", "slot", "escale", "offset", "strength"):
            self.register_buffer(name, None, persistent=False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.side_on:
            scale = self.strength[self.slot] * self.escale - self.offset  # (s - m) alpha/r
            u = (F.linear(x.to(self.A.dtype), self.A).float() * scale).to(y.dtype)
            # One GEMM that adds the layer's output in its epilogue (float32, one rounding):
            # the up-projection's output is never written and read back on its own, which
            # halves the side path's memory traffic (docs/PERFORMANCE.md, LoRA slots).
            y2 = torch.addmm(
                y.reshape(-1, y.shape[-1]), u.reshape(-1, u.shape[-1]), self.B.t().to(y.dtype)
            )
            y = y2.view(y.shape)
        return y


@dataclass
class _Entry:
    """One slot's update of one site (rows: the part of a fused q/k/v weight)."""

    slot: int
    rows: slice
    down: Tensor | None
    up: Tensor | None
    scale: float
    diff: Tensor | None
    diff_b: Tensor | None


@dataclass
class _Part:
    """The low-rank factors of every slot on one row range of a site (all rows; or q, k or
    v of a fused qkv), columns in slot order: a merge is one GEMM per part,
    ``W[rows] += (B · diag(strength[slot] · escale)) @ A``. A and B are views into the
    site's side-path stacks when it has a side path, else their own tensors: the only
    device copy of the factors either way."""

    r0: int  # first row
    A: Tensor  # rank x in
    B: Tensor  # rows x rank
    slot: Tensor  # per rank column: its slot (device, long)
    escale: Tensor  # per rank column: alpha/rank (device, float32)
    slots: frozenset[int]
    off: int = -1  # first column in LoraSlots' all-parts column vectors (`_colscales`)


@dataclass
class _Site:
    name: str  # the module's name in the model (after q/k/v fusion)
    module: nn.Module  # LoraLinear, or a norm holding weight/bias
    text_kv: bool
    entries: list[_Entry] = field(default_factory=list)
    merged: list[float] = field(default_factory=lambda: [0.0] * SLOTS)  # low-rank m_i
    wdiffs: list[float] = field(default_factory=lambda: [0.0] * SLOTS)  # `.diff` strengths in
    bdiffs: list[float] = field(default_factory=lambda: [0.0] * SLOTS)  # `.diff_b` strengths in
    pristine: dict[str, Tensor] | None = None
    side: tuple | None = None  # (on, merged, strengths) the side path was last set for
    rank_slots: list[int] = field(default_factory=list)  # slot of each stacked rank column
    need: bool = False  # the side path must be on (a strength differs from the merged one)
    parts: list[_Part] = field(default_factory=list)  # low-rank factors by row range

    @property
    def group(self) -> str:
        """The transformer block a site belongs to ("blocks.3"), or its own name."""
        m = re.match(r"blocks\.\d+", self.name)
        return m.group(0) if m else self.name

    @property
    def target(self) -> nn.Module:
        return self.module.base if isinstance(self.module, LoraLinear) else self.module


@dataclass
class PreparedLora:
    """A LoRA read and placed on the device, ready for `LoraSlots.install`."""

    path: str
    info: Any  # engine.weights.lora.LoraInfo
    targets: dict[str, dict]  # module -> {down, up, scale, diff, diff_b}
    nbytes: int


def config_name(model: WanModel) -> str:
    for name, cfg in CONFIGS.items():
        if cfg == model.cfg:
            return name
    return "custom"


class LoraSlots:
    """Up to `SLOTS` LoRAs on `model`. Not thread-safe by design: `install` and `update`
    run on the generation thread between blocks; `check` and `prepare` may run anywhere."""

    def __init__(
        self,
        model: WanModel,
        *,
        pristine_device: str | torch.device = "cpu",
        merge_per_block: int | None = None,
        max_bytes: int | None = None,
        rank_bucket: int | None = None,
        remerge: bool | None = None,
        merge_chunk_elems: int = MERGE_CHUNK_ELEMS,
    ):
        self.model = model
        self.config = config_name(model)
        self.device = model.device
        self.pristine_device = torch.device(pristine_device)
        # Moving strengths: re-merge every targeted weight at every block from pristine
        # weights kept on the device (exact, ~2-4 B of traffic per weight, no side path,
        # no wrapped modules), or ride the low-rank side path (pristine on the host).
        # Default: re-merge when the pristine weights live on an accelerator.
        self.remerge = self.pristine_device.type != "cpu" if remerge is None else remerge
        # Static shapes for torch.compile (see `_prewrap`): every block linear wrapped up
        # front, factors zero-padded to a multiple of `rank_bucket`, the side path switched
        # per transformer block. None: wrap on demand, exact sizes (eager, the CPU). A
        # re-merging model has no side path, so nothing to wrap or pad.
        self.rank_bucket = None if self.remerge else rank_bucket
        self.merge_chunk_elems = max(1, int(merge_chunk_elems))
        self._scratch: Tensor | None = None  # float32 rows of the general merge, reused
        self._kernel_ok = True  # the fp8 merge kernel built (else: the float32 reference)
        self._cols: tuple[Tensor, Tensor] | None = None  # all parts' column slots, scales
        self._cs: Tensor | None = None  # their strength · alpha/rank, this block's
        self.merge_per_block = merge_per_block
        self.max_bytes = max_bytes
        self.slots: list[PreparedLora | None] = [None] * SLOTS
        self.strengths = [0.0] * SLOTS  # what `update` was last given (0 for empty slots)
        self._strength = torch.zeros(SLOTS, device=self.device, dtype=torch.float32)
        self._sites: dict[str, _Site] = {}
        # Static mode: whether the wrapped sites hold their (zero-padded) stacks now. Only
        # while warming up or while a LoRA is loaded: a show without LoRAs pays nothing.
        self._stacked = False
        if self.rank_bucket is not None:
            self._prewrap()

    # -- placing a loaded file (any thread) ------------------------------------------------
    def prepare(self, lf: Any) -> PreparedLora:
        """Put a loaded LoRA file's tensors (engine.weights.lora.LoraFile: `.path`,
        `.info`, `.targets` of down/up/scale/diff/diff_b) on the model's device, checked
        against the model. Touches no model state (safe on a loader thread)."""
        info = lf.info
        dtype = self.model.dtype
        out: dict[str, dict] = {}
        nbytes = 0
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        ctx = torch.cuda.stream(stream) if stream is not None else _null()
        with ctx:
            for name, t in lf.targets.items():
                site, rows = self._locate(name)
                self._check_shapes(info.path, name, t, site, rows)
                d: dict = {"scale": t.scale}
                for part in ("down", "up", "diff", "diff_b"):
                    x = getattr(t, part)
                    if x is not None:
                        if not torch.isfinite(x).all():
                            raise LoraError(f"{info.path}: {name}.{part}: not finite (NaN or inf)")
                        d[part] = x.to(self.device, dtype)
                        nbytes += d[part].numel() * d[part].element_size()
                out[name] = d
        if stream is not None:
            stream.synchronize()
        return PreparedLora(str(lf.path), info, out, nbytes)

    def _check_shapes(self, path, name: str, t: Any, module: nn.Module, rows: slice) -> None:
        """The file's tensors against the module they land on (the header check knows only
        the standard configs; this one knows the model in hand)."""
        linear = isinstance(module, (nn.Linear, Fp8Linear, LoraLinear))
        w = getattr(module, "weight", None) if not isinstance(module, LoraLinear) else None
        if linear:
            n_out = module.out_features if rows.start is None else rows.stop - rows.start
            wshape, bshape = (n_out, module.in_features), (n_out,)
        elif w is not None:
            b = getattr(module, "bias", None)
            wshape, bshape = tuple(w.shape), (tuple(b.shape) if b is not None else None)
        else:
            raise LoraError(f"{path}: {name}: not a module a LoRA can change")
        want = {"diff": wshape, "diff_b": bshape}
        if t.down is not None:
            if not linear:
                raise LoraError(f"{path}: {name}: a low-rank pair on a module that is not linear")
            r = t.down.shape[0]
            want["down"], want["up"] = (r, wshape[1]), (wshape[0], r)
        for part in ("down", "up", "diff", "diff_b"):
            x = getattr(t, part)
            if x is not None and (want[part] is None or tuple(x.shape) != want[part]):
                raise LoraError(
                    f"{path}: {name}.{part}: file {list(x.shape)}, this model"
                    f" {list(want[part]) if want[part] else 'has no such parameter'}"
                )

    def _locate(self, name: str) -> tuple[nn.Module, slice]:
        """The module holding Wan-native `name` in the model (the fused qkv for q/k/v)
        and the rows of its weight that belong to `name`."""
        parent_name, _, leaf = name.rpartition(".")
        try:
            parent = self.model.get_submodule(parent_name)
        except AttributeError:
            raise LoraError(f"{name}: no such module in this model") from None
        if isinstance(parent, SelfAttention) and parent.fused and leaf in ("q", "k", "v"):
            d = self.model.cfg.dim
            i = "qkv".index(leaf)
            return parent.qkv, slice(i * d, (i + 1) * d)
        try:
            return parent.get_submodule(leaf), slice(None)
        except AttributeError:
            raise LoraError(f"{name}: no such module in this model") from None

    # -- state changes (generation thread, between blocks) --------------------------------
    @torch.no_grad()
    def install(self, n: int, lora: PreparedLora | None) -> bool:
        """Slot n (0-based) := `lora` (None empties it). Its strength starts at 0 until
        the next `update`. Returns True when the text K/V cache must be recomputed."""
        if not 0 <= n < SLOTS:
            raise ValueError(f"LoRA slot {n + 1} is not in 1..{SLOTS}")
        dirty = False
        old = self.slots[n]
        if old is not None:
            for site in list(self._sites.values()):
                if any(e.slot == n for e in site.entries):
                    w = site.merged[n] != 0.0 or site.wdiffs[n] != 0.0
                    b = site.bdiffs[n] != 0.0
                    site.merged[n] = site.wdiffs[n] = site.bdiffs[n] = 0.0
                    self._write(site, weight=w, bias=b)
                    site.entries = [e for e in site.entries if e.slot != n]
                    self._rebuild_side(site)
                    dirty |= site.text_kv
        self.slots[n] = lora
        self._restack(any(p is not None for p in self.slots))
        self.strengths[n] = 0.0
        self._push_strengths()
        if lora is not None:
            for name, d in lora.targets.items():
                module, rows = self._locate(name)
                site = self._site_for(module, name)
                site.entries.append(
                    _Entry(
                        n,
                        rows,
                        d.get("down"),
                        d.get("up"),
                        d["scale"],
                        d.get("diff"),
                        d.get("diff_b"),
                    )
                )
                self._rebuild_side(site)
            # The sites' stacks (or parts) now hold the only device copy of the factors.
            for d in lora.targets.values():
                d.pop("down", None)
                d.pop("up", None)
        self._apply_groups()
        return dirty

    def _site_for(self, module: nn.Module, name: str) -> _Site:
        for site in self._sites.values():
            if site.module is module or site.target is module:
                return site
        full = next(k for k, m in self.model.named_modules() if m is module)
        if isinstance(module, (nn.Linear, Fp8Linear)) and not self.remerge:
            parent_name, _, leaf = full.rpartition(".")
            parent = self.model.get_submodule(parent_name)
            wrapped = LoraLinear(module)
            setattr(parent, leaf, wrapped)
            module = wrapped
        text_kv = _TEXT_KV.search(full) is not None
        site = _Site(full, module, text_kv)
        self._sites[full] = site
        return site

    def _prewrap(self) -> None:
        """Wrap every linear of every block now, so that loading a LoRA later changes no
        module structure (a compiled block runs on). The zero factors of one rank bucket
        that make every tensor shape static are allocated by `_restack` only while they
        are needed (warm-up, a LoRA loaded): same shapes, dtypes and strides each time,
        so the compiled side-path graph takes them as they come."""
        for i, block in enumerate(self.model.blocks):
            for name, mod in list(block.named_modules()):
                if isinstance(mod, (nn.Linear, Fp8Linear)):
                    self._site_for(mod, f"blocks.{i}.{name}")
        self._apply_groups()

    def _restack(self, want: bool) -> None:
        """Static mode: give every wrapped site its zero-padded stacks (want) or free them
        (no LoRA loaded any more, warm-up over)."""
        if self.rank_bucket is None or want == self._stacked:
            return
        self._stacked = want
        for site in self._sites.values():
            self._rebuild_side(site)

    def _rebuild_side(self, site: _Site) -> None:
        """Lay out the low-rank factors of every slot on a site: the parts (one per row
        range, columns in slot order) and, on a wrapped site, the side path's stacks A, B
        (zero padded to the rank bucket in static mode) that the parts are views of. The
        entries' factors become views too, so one device copy of each factor remains."""
        m = site.module
        lows = sorted(
            (e for e in site.entries if e.down is not None),
            key=lambda e: (e.rows.start or 0, e.slot),
        )
        site.side = None
        dev = self.device
        wrapped = isinstance(m, LoraLinear)
        A = B = None
        if wrapped and (lows or (self.rank_bucket is not None and self._stacked)):
            bucket = self.rank_bucket
            R = sum(e.down.shape[0] for e in lows)
            if bucket is not None and site.name.endswith(".qkv"):
                bucket *= 3  # q, k and v each bring their own rank
            Rp = R if bucket is None else bucket * max(1, -(-R // bucket))
            dtype = lows[0].down.dtype if lows else self.model.dtype
            A = torch.zeros(Rp, m.in_features, device=dev, dtype=dtype)
            B = torch.zeros(m.out_features, Rp, device=dev, dtype=dtype)
            slot, escale, off = [0] * Rp, [0.0] * Rp, 0
            for e in lows:
                r = e.down.shape[0]
                A[off : off + r] = e.down
                B[e.rows, off : off + r] = e.up
                slot[off : off + r] = [e.slot] * r
                escale[off : off + r] = [e.scale] * r
                off += r
            site.rank_slots = slot
            tensors = {
                "A": A,
                "B": B,
                "slot": torch.tensor(slot, device=dev),
                "escale": torch.tensor(escale, device=dev, dtype=torch.float32),
                "offset": torch.zeros(Rp, device=dev, dtype=torch.float32),
            }
            for name, t in tensors.items():
                old = getattr(m, name)
                if old is not None and old.shape == t.shape and old.dtype == t.dtype:
                    old.copy_(t)  # same tensors: nothing for a compiled graph to notice
                else:
                    setattr(m, name, t)
            m.strength = self._strength
            A, B = m.A, m.B
        elif wrapped:
            m.A = m.B = m.slot = m.escale = m.offset = m.strength = None
            m.side_on = site.need = False
        parts: list[_Part] = []
        off = 0
        i = 0
        while i < len(lows):
            j = i
            while j < len(lows) and lows[j].rows == lows[i].rows:
                j += 1
            group, rows = lows[i:j], lows[i].rows
            r = sum(e.down.shape[0] for e in group)
            if A is not None:
                Ag, Bg = A[off : off + r], B[rows, off : off + r]
            elif len(group) == 1:
                Ag, Bg = group[0].down, group[0].up
            else:
                Ag = torch.cat([e.down for e in group])
                Bg = torch.cat([e.up for e in group], dim=1)
            c, cols = 0, []
            for e in group:
                k = e.down.shape[0]
                e.down, e.up = Ag[c : c + k], Bg[:, c : c + k]
                cols += [(e.slot, e.scale)] * k
                c += k
            parts.append(
                _Part(
                    rows.start or 0,
                    Ag,
                    Bg,
                    torch.tensor([x[0] for x in cols], device=dev),
                    torch.tensor([x[1] for x in cols], device=dev, dtype=torch.float32),
                    frozenset(e.slot for e in group),
                )
            )
            off += r
            i = j
        site.parts = parts
        self._cols = None  # the all-parts column layout changed
        if wrapped and A is not None:
            self._set_side(site)

    def _set_side(self, site: _Site) -> bool:
        """Whether the site needs its side path (a slot's strength differs from what is
        merged), with the offset following the merged strengths. True when the site's
        output changed. `_apply_groups` then switches the paths."""
        m = site.module
        if not isinstance(m, LoraLinear) or m.A is None:
            return False
        slots = sorted({e.slot for e in site.entries if e.down is not None})
        merged = tuple(site.merged[i] for i in slots)
        live = tuple(self.strengths[i] for i in slots)
        on = merged != live
        state = (on, merged, live if on else None)
        if state == site.side:
            return False
        if site.side is None or site.side[1] != merged:
            per_rank = torch.tensor([site.merged[i] for i in site.rank_slots])
            m.offset.copy_(_to_device(per_rank.float(), m.offset.device).mul_(m.escale))
        site.need = on
        site.side = state
        return True

    def _apply_groups(self, force: bool | None = None) -> None:
        """Switch the side paths: per site (eager), or per transformer block in static
        mode, where a site that does not need it adds an exact zero (its strength minus
        its merged strength, or a zero factor), so a block has two graphs, not 2^8."""
        if self.rank_bucket is None:
            for site in self._sites.values():
                if isinstance(site.module, LoraLinear):
                    site.module.side_on = bool(site.need) if force is None else force
            return
        groups: dict[str, list[_Site]] = {}
        for site in self._sites.values():
            if isinstance(site.module, LoraLinear) and site.module.A is not None:
                groups.setdefault(site.group, []).append(site)
        for sites in groups.values():
            on = any(x.need for x in sites) if force is None else force
            for x in sites:
                x.module.side_on = on

    def warm(self, on: bool) -> None:
        """Static mode: every side path on (adding exact zeros where nothing moves) for a
        warm-up block, so its compiled graph exists before the show; off again after."""
        if self.rank_bucket is not None:
            if on:
                self._restack(True)
            self._apply_groups(True if on else None)
            if not on:
                self._restack(any(p is not None for p in self.slots))

    @torch.no_grad()
    def warm_merges(self, ranks: Sequence[int] = (16, 32, 64, 128)) -> dict:
        """Before the show (GPU, fp8 weights): pick the fp8 merge kernel's variant by timing
        each on the largest real weight (`lora_merge.pick_fp8_variant`), then compile it
        (Triton JIT, ~1 s per rank class) with one merge of a few rows into a throwaway
        tensor per rank class, so the first LoRA merge does not stall a block. Returns
        {"variants": {name: ms or error}, "chosen": name} ({} where nothing applies)."""
        from engine.models import lora_merge

        if self.device.type != "cuda" or not triton_usable(self.device) or not self._kernel_ok:
            return {}
        fp8 = [m for m in self.model.blocks.modules() if isinstance(m, Fp8Linear)]
        if not fp8:
            return {}
        big = max(fp8, key=lambda m: m.weight.numel())
        try:
            timed = lora_merge.pick_fp8_variant(big.weight, big.weight_scale.view(-1))
            w = fp8[0]
            src, src_s = w.weight[:64], w.weight_scale.view(-1)[:64]
            dst, dst_s = torch.empty_like(src), torch.empty_like(src_s)
            for r in ranks:
                B = torch.zeros(src.shape[0], r, device=self.device, dtype=self.model.dtype)
                A = torch.zeros(r, src.shape[1], device=self.device, dtype=self.model.dtype)
                fp8_merge_rows_(dst, dst_s, src, src_s, B, A, torch.zeros(r, device=self.device))
        except Exception:
            log.exception("fp8 LoRA merge kernel failed; merges use the float32 reference")
            self._kernel_ok = False
            return {"variants": {}, "chosen": "float32 reference"}
        log.info("fp8 LoRA merge kernel: %s (timed: %s)", lora_merge.fp8_variant, timed)
        return {"variants": timed, "chosen": lora_merge.fp8_variant}

    def _push_strengths(self) -> None:
        self._cs = None  # the column scales follow the strengths
        t = torch.tensor(self.strengths, dtype=torch.float32)
        if self.device.type == "cuda":
            self._strength.copy_(t.pin_memory(), non_blocking=True)  # no host sync
        else:
            self._strength.copy_(t)

    @torch.no_grad()
    def update(self, strengths: Sequence[float]) -> bool:
        """The strengths of this block, slot by slot (an empty slot counts as 0). Returns
        True when the text K/V cache must be recomputed (cross-attention K/V changed)."""
        s = [float(strengths[i]) if self.slots[i] is not None else 0.0 for i in range(SLOTS)]
        moved = s != self.strengths
        # A slot whose strength moved this block rides the side path (or, re-merging, is
        # merged at once); the slots standing still are merged meanwhile.
        moving = [a != b for a, b in zip(s, self.strengths, strict=True)]
        self.strengths = s
        if moved:
            self._push_strengths()
        dirty = False
        zero = all(v == 0.0 for v in s)
        budget = self.merge_per_block
        merging = None  # the block being merged: finished even past the budget
        for site in self._sites.values():
            wd, bd = [0.0] * SLOTS, [0.0] * SLOTS
            target = [0.0] * SLOTS  # low-rank strengths this site would be merged at
            for e in site.entries:
                if e.diff is not None:
                    wd[e.slot] = s[e.slot]
                if e.diff_b is not None:
                    bd[e.slot] = s[e.slot]
                if e.down is not None:
                    still = self.remerge or not moving[e.slot]
                    target[e.slot] = s[e.slot] if still else site.merged[e.slot]
            merged = site.merged
            if zero:
                merged = [0.0] * SLOTS  # strength 0: the pristine weight back, at once
            elif target != merged and (
                self.remerge  # every block, from the device pristine: no side path
                or budget is None
                or budget > 0
                or site.group == merging
            ):
                merged = target  # the still slots (all, re-merging) at these strengths
                merging = site.group if self.rank_bucket is not None else None
                if budget is not None:
                    budget -= 1
            weight = merged != site.merged or wd != site.wdiffs
            bias = bd != site.bdiffs  # small: follows every move, no side path needed
            site.merged, site.wdiffs, site.bdiffs = list(merged), wd, bd
            if weight or bias:
                self._write(site, weight=weight, bias=bias)
            touched = weight or bias
            touched |= self._set_side(site)
            dirty |= touched and site.text_kv
        self._apply_groups()
        return dirty

    def _write(self, site: _Site, *, weight: bool = True, bias: bool = True) -> None:
        """The site's weight := pristine + merged low-rank + `.diff`s, and/or its bias :=
        pristine + `.diff_b`s; exactly the pristine tensors where all of those are 0."""
        t = site.target
        wnames = [n for n in ("weight", "weight_scale") if getattr(t, n, None) is not None]
        bnames = ["bias"] if getattr(t, "bias", None) is not None else []
        w_zero = all(v == 0.0 for v in site.merged + site.wdiffs)
        b_zero = all(v == 0.0 for v in site.bdiffs)
        if site.pristine is None:
            if w_zero and b_zero:
                return  # nothing merged yet and nothing to merge
            pin = self.pristine_device.type == "cpu" and self.device.type == "cuda"
            site.pristine = {}
            for n in wnames + bnames:
                p = getattr(t, n).detach().to(self.pristine_device, copy=True)
                site.pristine[n] = p.pin_memory() if pin else p
        pr = site.pristine
        if weight and w_zero:
            for n in wnames:
                getattr(t, n).copy_(pr[n], non_blocking=True)
        elif weight:
            self._merge_weight(site)
        if bias and bnames and b_zero:
            t.bias.copy_(pr["bias"], non_blocking=True)
        elif bias and bnames:
            b = _f32_copy(pr["bias"], self.device)
            for e in site.entries:
                s = site.bdiffs[e.slot]
                if s != 0.0 and e.diff_b is not None:
                    b[e.rows] += s * e.diff_b.float()
            t.bias.copy_(b.to(t.bias.dtype))

    def _merged_strengths(self, site: _Site) -> Tensor:
        """The slot strengths a site is merged at, as a device tensor: the shared strength
        tensor when they are this block's (always, but mid-install), else a small copy."""
        if site.merged == self.strengths:
            return self._strength
        return _to_device(torch.tensor(site.merged, dtype=torch.float32), self.device)

    def _merge_weight(self, site: _Site) -> None:
        """The site's weight := pristine + merged low-rank parts + `.diff`s, in place in
        the weight's own storage (compiled graphs keep their inputs), with no host sync:
        bf16/fp32 by one `addmm` per part, fp8 by the Triton merge kernel, anything else
        (the CPU's fp8, `.diff`s) through the bounded float32 scratch
        (engine/models/lora_merge.py)."""
        t, pr, dev = site.target, site.pristine, self.device
        fp8 = isinstance(t, Fp8Linear)
        live = [p for p in site.parts if any(site.merged[i] != 0.0 for i in p.slots)]
        if all(site.merged[i] == self.strengths[i] for p in live for i in p.slots):
            # merged at this block's strengths (re-merging: always): one gather per update
            cs = self._colscales()
            parts = [(p.r0, p.B, p.A, cs[p.off : p.off + len(p.slot)]) for p in live]
        else:
            sv = self._merged_strengths(site)
            parts = [(p.r0, p.B, p.A, sv[p.slot] * p.escale) for p in live]
        diffs = [
            (e.rows.start or 0, site.wdiffs[e.slot], e.diff)
            for e in site.entries
            if e.diff is not None and site.wdiffs[e.slot] != 0.0
        ]
        dst_s = t.weight_scale.view(-1) if fp8 else None
        src_s = pr["weight_scale"].view(-1) if fp8 else None
        if diffs or (fp8 and not (self._kernel_ok and triton_usable(dev))):
            merge_rows_reference(
                t.weight, dst_s, pr["weight"], src_s, parts, diffs, self._scratch_rows()
            )
            return
        src_w = pr["weight"]
        if src_w.device != dev:  # host pristine: stage it in the weight, merge in place
            t.weight.copy_(src_w, non_blocking=True)
            src_w = t.weight
            if fp8:
                t.weight_scale.copy_(pr["weight_scale"], non_blocking=True)
                src_s = dst_s
        covered = [(r0, r0 + B.shape[0]) for r0, B, _, _ in parts]
        if src_w is not t.weight:  # rows no part touches get the pristine back
            for a, b in _gaps(covered, t.weight.shape[0]):
                t.weight[a:b].copy_(src_w[a:b])
                if fp8:
                    dst_s[a:b].copy_(src_s[a:b])
        for r0, B, A, cs in parts:
            r1 = r0 + B.shape[0]
            if fp8:
                try:
                    fp8_merge_rows_(
                        t.weight[r0:r1], dst_s[r0:r1], src_w[r0:r1], src_s[r0:r1], B, A, cs
                    )
                except Exception:  # a Triton that cannot build the kernel: slower, still exact
                    log.exception("fp8 LoRA merge kernel failed; using the float32 reference")
                    self._kernel_ok = False
                    merge_rows_reference(  # from the pristine: rows done so far redone
                        t.weight, dst_s, pr["weight"], pr["weight_scale"].view(-1), parts, [],
                        self._scratch_rows(),
                    )  # fmt: skip
                    return
            else:
                linear_merge_rows_(t.weight[r0:r1], src_w[r0:r1], B, A, cs)

    def _colscales(self) -> Tensor:
        """strength[slot] · alpha/rank for every rank column of every part, this block's
        strengths: two kernels per update instead of two per part (a 14B re-merge has 400
        parts, and their launches, not their bytes, would bound it)."""
        if self._cols is None:
            sites = list(self._sites.values())
            off, slot, escale = 0, [], []
            for site in sites:
                for p in site.parts:
                    p.off = off
                    off += len(p.slot)
                    slot.append(p.slot)
                    escale.append(p.escale)
            empty = torch.zeros(0, device=self.device)
            self._cols = (
                torch.cat(slot) if slot else empty.long(),
                torch.cat(escale) if escale else empty,
            )
            self._cs = None
        if self._cs is None:
            self._cs = self._strength[self._cols[0]] * self._cols[1]
        return self._cs

    def _scratch_rows(self) -> Tensor:
        if self._scratch is None:
            self._scratch = torch.empty(self.merge_chunk_elems, device=self.device)
        return self._scratch

    # -- reporting ------------------------------------------------------------------------
    def describe(self) -> list[dict | None]:
        return [
            None
            if p is None
            else {"file": p.path, "strength": self.strengths[i], "bytes": p.nbytes}
            for i, p in enumerate(self.slots)
        ]

    @property
    def side_sites(self) -> int:
        """Sites whose side path is on (a strength moved and is not merged yet)."""
        return sum(
            isinstance(s.module, LoraLinear) and s.module.side_on for s in self._sites.values()
        )

    def memory(self) -> dict[str, int]:
        """Every byte the LoRA slots hold on the model's device, by kind (each storage
        counted once, views included):
        - `factors`: the low-rank factors (the sites' parts / side-path stacks, with the
          static mode's zero padding) and their per-rank-column slot/scale/offset vectors;
        - `diffs`: `.diff` / `.diff_b` full differences;
        - `pristine`: base weights kept on the device (`pristine_device` = the device);
        - `scratch`: the general merge's float32 rows;
        - `total`: their sum.
        Transient memory (a merge's small scaled factor, the side path's activations) is
        not held and so not here: docs/PERFORMANCE.md accounts for it."""
        seen: set[int] = set()

        def size(*ts: Tensor | None) -> int:
            n = 0
            for t in ts:
                if t is None or t.device != self.device:
                    continue
                st = t.untyped_storage()
                if st.data_ptr() in seen or st.nbytes() == 0:
                    continue
                seen.add(st.data_ptr())
                n += st.nbytes()
            return n

        out = {"factors": 0, "diffs": 0, "pristine": 0, "scratch": size(self._scratch)}
        out["factors"] += size(self._strength, *(self._cols or ()), self._cs)
        for site in self._sites.values():
            m = site.module
            if isinstance(m, LoraLinear):
                out["factors"] += size(m.A, m.B, m.slot, m.escale, m.offset)
            for p in site.parts:
                out["factors"] += size(p.A, p.B, p.slot, p.escale)
            for e in site.entries:
                out["factors"] += size(e.down, e.up)
                out["diffs"] += size(e.diff, e.diff_b)
            out["pristine"] += size(*(site.pristine or {}).values())
        out["total"] = sum(out.values())
        return out

    def pristine_need(self, names: Sequence[str]) -> int:
        """Device bytes that loading a LoRA targeting the Wan-native module `names` would
        add as pristine copies (base weights kept on the device to merge from), for the
        targeted modules that have none yet; 0 when they live elsewhere than the model (on
        the host for a GPU model). Reads only (safe from the loader thread)."""
        if self.pristine_device != self.device:
            return 0
        held = {
            id(m)
            for site in list(self._sites.values())
            if site.pristine is not None
            for m in (site.module, site.target)
        }
        seen, need = set(), 0
        for name in names:
            try:
                module, _ = self._locate(name)
            except LoraError:
                continue  # the shape checks name it
            base = module.base if isinstance(module, LoraLinear) else module
            if id(module) in held or id(base) in held or id(base) in seen:
                continue
            seen.add(id(base))
            for n in ("weight", "weight_scale", "bias"):
                t = getattr(base, n, None)
                if isinstance(t, Tensor):
                    need += t.numel() * t.element_size()
        return need

    @property
    def device_bytes(self) -> int:
        """The loaded LoRAs' own size on the device (what the memory budget counts; safe
        from any thread). `memory()` has everything the slots hold."""
        return sum(p.nbytes for p in self.slots if p is not None)


def _gaps(spans: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """The row ranges of 0..n that no span covers."""
    out, at = [], 0
    for a, b in sorted(spans):
        if a > at:
            out.append((at, a))
        at = max(at, b)
    if at < n:
        out.append((at, n))
    return out


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """A small host tensor on `device` without a host sync (pinned, non-blocking on CUDA;
    the caching host allocator keeps the pinned copy alive until the transfer is done)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _f32_copy(t: Tensor, device: torch.device) -> Tensor:
    """A float32 copy of `t` on `device`, moved in its own (smaller) dtype and cast there.
    Always a new tensor: the sums done on it must never touch the pristine weights."""
    x = t.to(device, non_blocking=True)
    return x.float() if x.dtype != torch.float32 else x.clone()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
