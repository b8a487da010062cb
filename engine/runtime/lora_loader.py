"""LoRA files for the live slots, read on a thread of their own.

`/dd/lora/1/file "style.safetensors"` must never stall generation for a file read (a 14B
LoRA is hundreds of MB). The registry's validation (`check`, on the sender's thread)
reads only the file's header: a path outside the assets folder, a file that is not
safetensors or is truncated, modules the model does not have, a LoRA for the other base
model, or one over the memory budget is refused at once (an `/dd/error` naming the file)
and nothing changes. A file that passes is read and put on the device here, on the
loader thread; the block driver installs it at the first block boundary after it is
ready (`take`), or waits for it where frames must not depend on timing (render, replay,
the first block: `wait`).

One pending request per slot, latest wins: a controller flood of file names costs one
read per slot at a time, never a queue.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.models.lora import SLOTS, LoraError, LoraSlots, PreparedLora

log = logging.getLogger(__name__)

GPU_RESERVE = 2 * 2**30  # bytes left free for activations when no budget is set


@dataclass
class LoadResult:
    slot: int  # 0-based
    file: str  # the value asked for (as the registry holds it)
    lora: PreparedLora | None
    error: str | None


class LoraLoader:
    def __init__(self, slots: LoraSlots, assets_dir: str | Path | None):
        self.slots = slots
        self.assets_dir = assets_dir
        self._cond = threading.Condition()
        self._want: dict[int, str] = {}
        self._busy: dict[int, str] = {}
        self._done: dict[int, LoadResult] = {}
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- checks (any thread) ----------------------------------------------------------------
    def resolve(self, file: str) -> Path:
        from engine.assets import AssetError, resolve_asset

        if self.assets_dir is None:
            raise LoraError(
                f"LoRA {file[:80]!r}: no assets folder is set (start dreamdeck with --assets DIR);"
                " LoRA files must lie inside it"
            )
        try:
            return resolve_asset(file, self.assets_dir)
        except AssetError as e:
            raise LoraError(f"LoRA {e}") from None

    def budget(self) -> int | None:
        """Bytes a new LoRA may take on the device: the set budget, or on a GPU what is
        free less a reserve for activations; None (no limit) on the CPU."""
        if self.slots.max_bytes is not None:
            return max(0, self.slots.max_bytes - self.slots.device_bytes)
        dev = self.slots.device
        if dev.type == "cuda":
            free, _ = torch.cuda.mem_get_info(dev)
            # memory PyTorch holds in its cache but does not use is free for us too
            free += torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
            return max(0, free - GPU_RESERVE)
        return None

    def check(self, file: str) -> Path:
        """Header-only checks of a `lora/{n}/file` value; LoraError says what is wrong."""
        from engine.weights.lora import check_lora, device_bytes

        path = self.resolve(file)
        cfg = None if self.slots.config == "custom" else self.slots.config
        budget = self.budget()
        info = check_lora(path, cfg, self.slots.model.dtype, budget)
        pristine = self.slots.pristine_need(list(info.targets))
        if budget is not None and pristine:
            need = device_bytes(info, self.slots.model.dtype)
            if need + pristine > budget:
                raise LoraError(
                    f"{info.path}: needs {need / 2**20:.1f} MiB on the device and"
                    f" {pristine / 2**20:.1f} MiB of base weights to merge from"
                    " (lora_pristine: device), over the LoRA memory budget of"
                    f" {budget / 2**20:.1f} MiB; lora_pristine: host needs only the first"
                )
        return path

    def load(self, file: str) -> PreparedLora:
        """Check, read and place a file (synchronously, on the caller's thread)."""
        from engine.weights.lora import load_lora, read_lora_header

        path = self.check(file)
        return self.slots.prepare(load_lora(path, read_lora_header(path)))

    # -- the loader thread ---------------------------------------------------------------
    def request(self, slot: int, file: str) -> None:
        """Read `file` for `slot` (0-based) in the background; a newer request replaces one
        not yet started."""
        if not 0 <= slot < SLOTS:
            raise ValueError(f"LoRA slot {slot + 1} is not in 1..{SLOTS}")
        with self._cond:
            if self._closed:
                return
            self._want[slot] = file
            self._done.pop(slot, None)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="dreamdeck-lora-loader", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def take(self, slot: int) -> LoadResult | None:
        """The finished load for `slot`, once (None while reading or when none was asked)."""
        with self._cond:
            return self._done.pop(slot, None)

    def wait(self, slot: int, timeout: float | None = None) -> bool:
        """Block until `slot` has no load pending (True) or `timeout` passes (False)."""
        with self._cond:
            return self._cond.wait_for(
                lambda: slot not in self._want and slot not in self._busy, timeout
            )

    def pending(self, slot: int) -> bool:
        with self._cond:
            return slot in self._want or slot in self._busy

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._want.clear()
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._want)
                if self._closed:
                    return
                slot = next(iter(self._want))
                file = self._want.pop(slot)
                self._busy[slot] = file
            lora = error = None
            try:
                lora = self.load(file)
            except LoraError as e:
                error = str(e)
            except (OSError, RuntimeError, ValueError) as e:  # out of memory, device errors
                error = f"LoRA {file[:80]!r}: {type(e).__name__}: {e}"[:400]
            except Exception as e:  # noqa: BLE001 - the loader must outlive any bad file
                log.exception("LoRA loader")
                error = f"LoRA {file[:80]!r}: {type(e).__name__}: {e}"[:400]
            with self._cond:
                self._busy.pop(slot, None)
                if slot not in self._want:  # not superseded by a newer request
                    self._done[slot] = LoadResult(slot, file, lora, error)
                self._cond.notify_all()
