"""LoRA merges of round two (engine/models/lora_merge.py, engine/models/lora.py): the fp8
merge kernel against the float32 reference, chunked merges equal to unchunked ones bit for
bit, the re-merge-every-block mechanism (pristine on the device) against the direct
formula and against the still path, compiled blocks that never recompile, and the memory
accounting against the tensors that really exist.

Without a GPU the Triton kernel runs under the Triton interpreter (numpy), switched on
before triton is imported, as tests/test_triton_attention.py does; with a GPU it runs for
real (the device script runs this file's kernel tests there).
"""

from __future__ import annotations

import gc
import os
import random
import warnings

import pytest
import torch
from helpers import rel_err
from test_lora import inputs, random_lora, tiny, write_lora

from engine.models.fp8 import Fp8Linear, quantize_linears, quantize_rowwise
from engine.models.lora import LoraLinear, LoraSlots
from engine.models.lora_merge import fp8_merge_rows_, linear_merge_rows_, merge_rows_reference
from engine.models.wan import CONFIGS, fuse_qkv
from engine.weights.lora import load_lora

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _kernel_ok() -> bool:
    try:
        from engine.models import triton_attention as T
    except ImportError:
        return False
    return DEV.type == "cuda" or T._INTERPRET


needs_kernel = pytest.mark.skipif(
    not _kernel_ok(), reason="triton missing, or imported before TRITON_INTERPRET=1 was set"
)


def _codes(q: torch.Tensor) -> torch.Tensor:
    """fp8 e4m3 values as signed integers in value order (neighbours differ by 1)."""
    u = q.view(torch.uint8).to(torch.int32)
    mag = u & 0x7F
    return torch.where(u >= 0x80, -mag, mag)


@needs_kernel
@pytest.mark.parametrize("variant", ["tf32-32", "bf16-64", "split-64x128", "split-128x128"])
@pytest.mark.parametrize("n,k,r", [(70, 200, 5), (33, 130, 17), (64, 256, 64), (40, 300, 130)])
def test_fp8_kernel_matches_the_float32_reference(n, k, r, variant):
    """Rows of an fp8 weight re-quantised after adding (B·diag(c)) @ A: the kernel (in place
    and out of place, each variant) against `merge_rows_reference`: the same row scales
    and fp8 values on the CPU (the interpreter multiplies in float32, and runs bf16-64 as
    tf32-32); on a GPU the products are tf32 or bf16, so scales agree within 1e-3 and
    values are the same or a neighbour for ≤ 1% of them."""
    g = torch.Generator().manual_seed(n + k + r)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 3
    q, s = quantize_rowwise(w)
    B = (torch.randn(n, r, generator=g) * 0.5).to(torch.bfloat16)
    A = (torch.randn(r, k, generator=g) * 0.5).to(torch.bfloat16)
    cs = torch.randn(r, generator=g)
    rq, rs = torch.empty_like(q), torch.empty(n)
    merge_rows_reference(rq, rs, q, s.view(-1), [(0, B, A, cs)], [], torch.empty(4 * k))
    q, s, B, A, cs = (t.to(DEV) for t in (q, s.view(-1), B, A, cs))
    dq, ds = torch.empty_like(q), torch.empty(n, device=DEV)
    fp8_merge_rows_(dq, ds, q, s, B, A, cs, variant=variant)
    assert rel_err(ds.cpu(), rs) < (1e-3 if DEV.type == "cuda" else 1e-6)
    diff = (_codes(dq.cpu()) - _codes(rq)).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.01
    if DEV.type == "cpu":
        assert diff.max() == 0  # the interpreter multiplies in float32, as the reference
    q2, s2 = q.clone(), s.clone()
    fp8_merge_rows_(q2, s2, q2, s2, B, A, cs, variant=variant)  # in place (host pristine)
    assert torch.equal(q2.view(torch.uint8), dq.view(torch.uint8)) and torch.equal(s2, ds)
    # the merged weight is the formula within fp8 rounding (3 mantissa bits)
    q, s, B, A, cs = (t.cpu().float() for t in (q, s, B, A, cs))
    want = q * s.view(-1, 1) + (B * cs) @ A
    got = dq.float().cpu() * ds.cpu().view(-1, 1)
    assert rel_err(got, want) < 0.05


@pytest.mark.parametrize("fp8", [False, True])
def test_chunked_merge_equals_unchunked_bit_for_bit(fp8):
    """The general merge through scratches of 1 to 257 rows equals one chunk of all rows,
    bit for bit, with two low-rank parts on different row ranges (a fused qkv) and a full
    `.diff` crossing chunk borders; the source may be the destination's own dtype on the
    host. This is what lets the scratch stay small (32 MB) on the 14B."""
    g = torch.Generator().manual_seed(5)
    n, k = 330, 24
    w = torch.randn(n, k, generator=g)
    parts = [  # q and v of a fused qkv, say: rows 0..99 and 200..329, k untouched
        (0, torch.randn(100, 3, generator=g), torch.randn(3, k, generator=g), torch.randn(3)),
        (200, torch.randn(130, 5, generator=g), torch.randn(5, k, generator=g), torch.randn(5)),
    ]
    diffs = [(4, 0.7, torch.randn(260, k, generator=g))]
    if fp8:
        src, src_s = quantize_rowwise(w)
        src_s = src_s.view(-1)
    else:
        src, src_s = w, None
    outs = []
    for rows in (1, 64, 100, 150, 257, n):  # 1: below TILE rows, a bigger scratch is taken
        dst = torch.empty_like(src)
        dst_s = torch.empty(n) if fp8 else None
        merge_rows_reference(dst, dst_s, src, src_s, parts, diffs, torch.empty(rows * k))
        outs.append((dst.view(torch.uint8) if fp8 else dst, dst_s))
    for d, sc in outs[:-1]:
        assert torch.equal(d, outs[-1][0])
        assert sc is None or torch.equal(sc, outs[-1][1])
    # and the unchunked result is the formula
    full = w if not fp8 else src.float() * src_s.view(-1, 1)
    want = full.clone()
    for r0, B, A, c in parts:
        want[r0 : r0 + B.shape[0]] += (B * c) @ A
    want[4:264] += 0.7 * diffs[0][2]
    got = (
        outs[-1][0].view(torch.float8_e4m3fn).float() * outs[-1][1].view(-1, 1)
        if fp8
        else outs[-1][0]
    )
    assert rel_err(got, want) < (0.05 if fp8 else 1e-6)


def test_linear_merge_in_place_and_out_of_place_agree():
    g = torch.Generator().manual_seed(2)
    src = torch.randn(12, 8, generator=g)
    B, A, c = torch.randn(12, 3, generator=g), torch.randn(3, 8, generator=g), torch.randn(3)
    out = torch.empty_like(src)
    linear_merge_rows_(out, src, B, A, c)
    inplace = src.clone()
    linear_merge_rows_(inplace, inplace, B, A, c)
    assert torch.equal(out, inplace)
    assert rel_err(out, src + (B * c) @ A) < 1e-6


def _direct(loras, strengths):
    ref = tiny()
    with torch.no_grad():
        for lora, s in zip(loras, strengths, strict=False):
            for name, t in lora.items():
                mod = ref.get_submodule(name)
                mod.weight += s * (float(t["alpha"]) / t["down"].shape[0]) * (t["up"] @ t["down"])
                if "diff_b" in t:
                    mod.bias += s * t["diff_b"]
    return ref


def test_remerge_every_block_is_exact_and_never_uses_the_side_path(tmp_path):
    """Pristine weights on the device: a strength moving at every block is merged at that
    block (no side path, no wrapped module), equal to the direct formula; all-zero blocks
    are the base model bit for bit; the weights equal the still path's settled weights."""
    cfg = CONFIGS["tiny"]
    la, lb = random_lora(cfg, 31), random_lora(cfg, 32, rank=2, alpha=1.0, diff_b=False)
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_lora(la, "wan", pa)
    write_lora(lb, "kohya", pb)
    model, still = tiny(), tiny()
    fuse_qkv(model)
    fuse_qkv(still)
    slots = LoraSlots(model, remerge=True)
    other = LoraSlots(still)  # side path while moving, merged once still
    for sl in (slots, other):
        sl.install(0, sl.prepare(load_lora(pa)))
        sl.install(1, sl.prepare(load_lora(pb)))
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    x, t, text = inputs(cfg)
    rng = random.Random(3)
    s = [0.0] * 4
    with torch.no_grad():
        base = tiny()(x, t, text)
        for i in range(12):
            s = [0.0] * 4 if i in (4, 9) else [round(rng.uniform(-2, 2), 3) for _ in "ab"] + [0, 0]
            slots.update(s)
            assert slots.side_sites == 0
            got = model(x, t, text)
            if s == [0.0] * 4:
                assert torch.equal(got, base)
                continue
            assert rel_err(got, _direct([la, lb], s)(x, t, text)) <= 1e-5, s
            other.update(s)
            other.update(s)  # settled: merged from the host pristine
            assert other.side_sites == 0
            for (n1, a), (n2, b) in zip(
                model.state_dict().items(), still.state_dict().items(), strict=True
            ):
                assert torch.equal(a, b), (n1, n2)


def test_remerge_on_fp8_weights_matches_the_still_path_bytes(tmp_path):
    """fp8 linears: re-merged every block (the Triton kernel under the interpreter where
    available, else the reference) and the still path give the same fp8 values (or a
    neighbour) and scales; strength 0 gives back the very bytes of the base."""
    p = tmp_path / "a.safetensors"
    write_lora(random_lora(CONFIGS["tiny"], 5), "wan", p)
    models = []
    for remerge in (True, False):
        m = tiny()
        fuse_qkv(m)
        quantize_linears(m.blocks, out_dtype=torch.float32)
        sl = LoraSlots(m, remerge=remerge)
        sl.install(0, sl.prepare(load_lora(p)))
        models.append((m, sl))
    fp8 = [  # by the unwrapped name (the still path wraps its linears)
        {n.removesuffix(".base"): x for n, x in m.named_modules() if isinstance(x, Fp8Linear)}
        for m, _ in models
    ]
    before = {n: (x.weight.clone(), x.weight_scale.clone()) for n, x in fp8[0].items()}
    for s in (0.4, -1.1):
        models[0][1].update([s, 0, 0, 0])
        models[1][1].update([s, 0, 0, 0])
        models[1][1].update([s, 0, 0, 0])
        for n, x in fp8[0].items():
            y = fp8[1][n]
            assert (_codes(x.weight) - _codes(y.weight)).abs().max() <= 1, n
            assert rel_err(x.weight_scale, y.weight_scale) < 1e-5, n
    models[0][1].update([0.0] * 4)
    for n, x in fp8[0].items():
        w, sc = before[n]
        assert torch.equal(x.weight.view(torch.uint8), w.view(torch.uint8))
        assert torch.equal(x.weight_scale, sc)


def _storages(keep: list | None = None) -> dict[int, int]:
    """data_ptr -> bytes of every live tensor storage; `keep` receives the tensors, so
    that none of them dies and lends its address to a new one while the test runs."""
    gc.collect()
    out = {}
    with warnings.catch_warnings():  # isinstance on deprecated torch objects warns
        warnings.simplefilter("ignore")
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    if keep is not None:
        keep.extend(tensors)
    for o in tensors:
        if o.is_meta:
            continue
        try:
            st = o.untyped_storage()
            out[st.data_ptr()] = st.nbytes()
        except RuntimeError:  # fake tensors left behind by an earlier compile: no storage
            continue
    return out


@pytest.mark.parametrize("mode", ["side", "remerge", "static"])
def test_memory_accounting_is_every_tensor_the_slots_added(tmp_path, mode):
    """`LoraSlots.memory()` against the tensors that exist: every storage alive after two
    LoRAs are loaded, moved and merged that was not alive before (found through the
    garbage collector) is counted once, and nothing else. Also: one device copy of the
    factors (the file's tensors are not kept beside the stacks), and in static mode the
    zero stacks exist only while a LoRA is loaded."""
    cfg = CONFIGS["tiny"]
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_lora(random_lora(cfg, 5, rank=4), "wan", pa)
    write_lora(random_lora(cfg, 6, rank=2, diff_b=False), "kohya", pb)
    model = tiny()
    fuse_qkv(model)
    kw = {"remerge": mode == "remerge", "rank_bucket": 8 if mode == "static" else None}
    slots = LoraSlots(model, merge_chunk_elems=256, **kw)
    empty = slots.memory()["total"]
    assert empty == 16  # the 4-float strength tensor: no zero stacks before any LoRA
    alive: list = []
    before = _storages(alive)
    for n, p in enumerate((pa, pb)):
        lf = load_lora(p)
        slots.install(n, slots.prepare(lf))
        del lf
    for s in ([0.5, 0.2], [0.9, 0.2], [0.9, 0.2]):
        slots.update([*s, 0.0, 0.0])
    mem = slots.memory()
    added = {k: v for k, v in _storages().items() if k not in before}
    assert mem["total"] - empty == sum(added.values()), (mem, sorted(added.values()))
    files = sum(p.nbytes for p in slots.slots if p is not None)
    if mode == "remerge":
        # the factors themselves (the file less its diff_b), per part and once for all
        # parts the column vectors (slot int64, alpha/rank float32), the columns' scales
        # (float32) and the 4 strengths: no second copy of anything
        cols = sum(len(p.slot) for site in slots._sites.values() for p in site.parts)
        assert mem["factors"] == files - sum(
            e.diff_b.numel() * 4 for st in slots._sites.values() for e in st.entries
            if e.diff_b is not None
        ) + cols * (12 + 12 + 4) + 16  # fmt: skip
    slots.install(0, None)
    slots.install(1, None)
    if mode == "static":
        assert slots.memory()["factors"] == 16  # the zero stacks went with the last LoRA


@pytest.mark.slow
def test_compiled_blocks_never_recompile_while_re_merging_or_restacking(tmp_path):
    """Dynamo's CompileCounter (no Inductor) around every block: re-merging every block
    (in place, into the weights' own storage) compiles nothing after the first forward;
    in static mode, freeing the zero stacks when the last LoRA goes and allocating them
    again for the next compiles nothing either. Outputs equal the eager model's."""
    from torch._dynamo.testing import CompileCounter

    p = tmp_path / "a.safetensors"
    write_lora(random_lora(CONFIGS["tiny"], 5, rank=4), "wan", p)
    x, t, text = inputs(CONFIGS["tiny"])
    for remerge in (True, False):
        model, eager = tiny(), tiny()
        fuse_qkv(model)
        fuse_qkv(eager)
        slots = LoraSlots(model, remerge=remerge, rank_bucket=8)
        ref = LoraSlots(eager, remerge=remerge)
        cnt = CompileCounter()
        torch._dynamo.reset()
        for b in model.blocks:
            b.compile(backend=cnt, dynamic=False)
        with torch.no_grad():
            base = model(x, t, text)
            slots.warm(True)
            model(x, t, text)
            slots.warm(False)
            warmed = cnt.frame_count
            plan = [("a", 0.5), ("", 0.7), ("", -0.4), ("", -0.4), ("-", 0.0), ("a", 1.2)]
            plan += [("", 0.3), ("", 0.0)]
            for load, s in plan:
                for sl in (slots, ref):
                    if load:
                        sl.install(0, None if load == "-" else sl.prepare(load_lora(p)))
                    sl.update([s, 0.0, 0.0, 0.0])
                got = model(x, t, text)
                assert rel_err(got, eager(x, t, text)) <= 1e-5, (remerge, load, s)
                if s == 0.0:
                    assert torch.equal(got, base)
        assert cnt.frame_count == warmed, remerge
    torch._dynamo.reset()


def test_a_still_slot_is_merged_while_another_moves(tmp_path):
    """Host pristine (side path): slot 1 moves at every block, slot 2 stands still. Slot 2
    is merged into every site after one block (within the merge budget) while slot 1 keeps
    riding the side path, and every block equals the direct formula."""
    cfg = CONFIGS["tiny"]
    la, lb = random_lora(cfg, 41), random_lora(cfg, 42, rank=2, alpha=1.0, diff_b=False)
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_lora(la, "wan", pa)
    write_lora(lb, "wan", pb)
    model = tiny()
    slots = LoraSlots(model, merge_per_block=7)
    slots.install(0, slots.prepare(load_lora(pa)))
    slots.install(1, slots.prepare(load_lora(pb)))
    x, t, text = inputs(cfg)
    merged_b = []
    with torch.no_grad():
        for i in range(6):
            s = [0.3 + 0.2 * i, -0.8, 0.0, 0.0]
            slots.update(s)
            assert slots.side_sites > 0  # slot 1 moved this block
            merged_b.append(sum(site.merged[1] == -0.8 for site in slots._sites.values()))
            assert rel_err(model(x, t, text), _direct([la, lb], s)(x, t, text)) <= 1e-5, i
    n = len(slots._sites)
    assert merged_b[0] == 0 and merged_b[1] == 7 and merged_b[-1] == n == 20  # budget 7
    assert all(site.merged[0] == 0.0 for site in slots._sites.values())  # slot 1 never


def test_remerge_with_a_lora_on_some_sites_only(tmp_path):
    """Re-merging, slot 1 on every linear and slot 2 on self-attention only (its other
    sites are merged at 0 while its strength is not): both moving, every block equals the
    direct formula."""
    cfg = CONFIGS["tiny"]
    la = random_lora(cfg, 51, diff_b=False)
    lb = {k: v for k, v in random_lora(cfg, 52, rank=3, diff_b=False).items() if "self_attn" in k}
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_lora(la, "wan", pa)
    write_lora(lb, "kohya", pb)
    model = tiny()
    fuse_qkv(model)
    slots = LoraSlots(model, remerge=True)
    slots.install(0, slots.prepare(load_lora(pa)))
    slots.install(1, slots.prepare(load_lora(pb)))
    x, t, text = inputs(cfg)
    with torch.no_grad():
        for s in ([0.5, 1.5], [-0.3, 1.2], [0.0, 0.9], [0.8, 0.0]):
            slots.update([*s, 0.0, 0.0])
            assert rel_err(model(x, t, text), _direct([la, lb], s)(x, t, text)) <= 1e-5, s


def test_the_memory_budget_counts_the_pristine_copies_a_device_re_merge_adds(tmp_path):
    """With the pristine weights on the model's device (re-merge), a LoRA needs room for
    its factors and for a copy of every base weight it targets that has none yet: the
    loader refuses it over the budget, naming both sizes, and accepts it at exactly the
    sum. Once merged, the copies exist (the memory accounting agrees) and the same file
    needs no more. With host pristine (another device than the model's) nothing is added."""
    from engine.runtime.lora_loader import LoraLoader
    from engine.weights.lora import LoraError, device_bytes, read_lora_header

    cfg = CONFIGS["tiny"]
    assets = tmp_path / "assets"
    assets.mkdir()
    write_lora(random_lora(cfg, 41, rank=3), "wan", assets / "s.safetensors")
    model = tiny()
    fuse_qkv(model)
    slots = LoraSlots(model, pristine_device=model.device, remerge=True)
    loader = LoraLoader(slots, assets)
    info = read_lora_header(assets / "s.safetensors")
    own = device_bytes(info, model.dtype)
    pristine = slots.pristine_need(list(info.targets))
    # a slow count written here: the weight (and bias) bytes of each distinct module hit
    mods = {id(m): m for m in (slots._locate(n)[0] for n in info.targets)}
    want = sum(
        t.numel() * t.element_size()
        for m in mods.values()
        for t in (m.weight, getattr(m, "bias", None))
        if t is not None
    )
    assert pristine == want > 0
    slots.max_bytes = own + pristine - 1
    with pytest.raises(LoraError, match="base weights to merge from") as e:
        loader.check("s.safetensors")
    assert "s.safetensors" in str(e.value) and f"{pristine / 2**20:.1f} MiB" in str(e.value)
    slots.max_bytes = own + pristine
    slots.install(0, loader.load("s.safetensors"))
    slots.update([0.7, 0, 0, 0])
    assert slots.memory()["pristine"] == pristine
    assert slots.pristine_need(list(info.targets)) == 0
    host = LoraSlots(tiny(), pristine_device="meta")  # any device but the model's
    assert host.pristine_need(list(info.targets)) == 0
