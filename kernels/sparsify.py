"""Triton kernels of fastlora's top-k sparsification with error feedback (``topk_sparsify``).

A leaf module: it imports only torch, triton and the standard library, never fastlora, so that
it can be loaded (and tested under ``TRITON_INTERPRET=1``) on its own. Semantics are those of
``fastlora.reference.topk_sparsify``; exact mode is bit-identical to it (and to the C++ CPU
kernel, csrc/cpu/sparsify_cpu.cpp, whose algorithm this follows):

    v = float32(delta) + residual          (one fp32 add, or float32(delta) alone)
    keep the k largest |v| over all tensors laid end to end, ties to the lowest flat index;
    indices int64 ascending, values = v rounded to value_dtype;
    residual = v, and v - float32(value) at the kept entries (updated in place).

Keys: for finite float32 v the bit pattern of |v| read as int32 (``bits & 0x7FFFFFFF``) orders
like |v| (denormals included, -0 == +0), so every comparison below is an integer one; keys
>= 0x7F800000 are inf or nan.

Algorithm (0 < k < n):
  1. ``_sample_kernel``: a deterministic jittered-strided sample of ~2**16 keys (one key drawn
     from every stratum of STRIDE consecutive elements, the offset inside the stratum given by
     a hash, so that power-of-two strides cannot alias with row lengths). torch sorts it and
     picks, on the device (no host sync), a low bound ``lo`` a few sigma below the k-th
     largest key and the sampled threshold ``t`` (approx mode).
  2. ``_count_kernel`` (read-only): per block of BLOCK elements, the first non-finite position
     and the counts of keys >= lo and >= t. One host sync reads the totals: a non-finite value
     raises here, before anything has been written.
  3. ``_compact_kernel`` (read-only over the data): writes the candidates (flat index, v), keys
     >= lo, in flat-index order; each block's output offset is the exclusive cumsum of the
     counts and its position inside the block a tl.cumsum, so the output is deterministic
     and needs no atomics.
  4. Exact selection among the m candidates with torch (a stable descending sort of the keys
     is exactly the reference's tie rule, on m << n elements), or, in approx mode when the
     sampled threshold keeps within +-5% of k, compaction with lo = t and no selection at all.
  5. ``_residual_kernel`` writes residual = v everywhere, then ``_scatter_kernel`` writes
     v - float32(value) at the k kept entries (stream order makes the second write win).
  Fallback when the sample misled us (fewer than k candidates), or when k/n is too large
  for the sample to bound it: compaction of everything (lo = 0) and the same exact selection.
  k == 0 runs only the check and the residual pass; k == n compacts everything.

Several tensors, one launch per pass: instead of launching per tensor (hundreds of tensors in
a LoRA state dict would mean ~3 launches each, ~10 us apiece, far more than the ~us of memory
traffic of a small tensor), every pass runs over a *block table*: one row per BLOCK-element
block of any tensor, holding the raw addresses of the block's delta and residual, its length,
the flat index of its first element and its global block number. Kernels turn the addresses
into typed pointers (``int -> pointer`` casts, as Triton's grouped-GEMM tutorial does). The
element type must be a compile-time constant, so there is one launch per delta dtype present
(usually one). Cost of the table: built once per distinct tensor set and cached.

Host syncs: one in the common path (reading the counts, which sizes the candidate buffer);
the sample's bounds stay on the device. Traffic with residuals: the data is read three times
(count, compact, residual pass) and the residual written once, plus 12 bytes per candidate.
GPU tuning left open (no GPU was available when this was written): loads go through runtime
addresses, which carry no alignment facts, so they may not be vectorised; an unmasked
full-block path with ``tl.multiple_of`` hints is the first thing to try if a pass falls short
of memory bandwidth.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from ._common import INTERPRET as _INTERPRET, fmix32 as _fmix32, on_device as _on_device, lru_get as _lru_get

# The Triton CPU interpreter (tests) converts bf16 -> fp32 with denormals flushed to zero (and
# bf16 arithmetic is wrong there), so bf16 deltas are loaded as raw uint16 and widened by hand
# (bits << 16 is exactly float32(bf16), also on a GPU). Under the interpreter each program
# costs milliseconds, so the data blocks are as large as on a GPU and the tests use sizes of
# a few blocks.

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NONFINITE_KEY = 0x7F800000          # keys >= this are inf or nan
_NO_BAD = (1 << 63) - 1            # "no non-finite value in this block"
SAMPLE_TARGET = 1 << 16            # sample size aimed at (the C++ kernel uses 2**16 too)


def _block_size() -> int:
    """Elements per program of the data passes (count, compact, residual).

    4096 fp32 = 16 KiB per block, 16 elements per thread at 8 warps: long enough streams per
    program to hide latency, and a block table of only n / 4096 rows. tl.cumsum over the block
    (the compaction) is a register + shared-memory scan. Tests monkeypatch this to exercise
    many blocks per tensor."""
    return 4096


# ----------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_v(d_addr, r_addr, offs, mask, DTYPE: tl.constexpr, HAS_RES: tl.constexpr):
    """v = float32(delta[offs]) (+ residual[offs]) for a block whose delta starts at address
    d_addr (DTYPE: 0 fp32, 1 fp16, 2 bf16, 3 fp64) and residual (fp32) at r_addr."""
    if DTYPE == 2:
        # bf16 -> fp32 is exact by bits (the interpreter's conversion flushes denormals).
        b = tl.load(d_addr.to(tl.pointer_type(tl.uint16)) + offs, mask=mask, other=0)
        v = (b.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    elif DTYPE == 1:
        p16 = d_addr.to(tl.pointer_type(tl.float16))
        v = tl.load(p16 + offs, mask=mask, other=0.0).to(tl.float32)
    elif DTYPE == 3:
        # Round to nearest even, like torch's .float(); an fp64 overflowing fp32 becomes inf
        # and is reported as a non-finite delta, as the C++ kernel does.
        p64 = d_addr.to(tl.pointer_type(tl.float64))
        v = tl.load(p64 + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        v = tl.load(d_addr.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
    if HAS_RES:
        # One IEEE fp32 add (no multiply, so nothing can be fused): the reference's f + r.
        v += tl.load(r_addr.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
    return v


@triton.jit
def _key(v):
    # |v|'s bit pattern as int32: monotone in |v| for finite floats, -0 == +0.
    return v.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _block(tab_ptr, BLOCK: tl.constexpr, DTYPE: tl.constexpr, HAS_RES: tl.constexpr):
    """This program's block: (v, lane offsets, lane mask, flat index of lane 0, global block
    number, residual address). Table row: d_addr, r_addr, len, gstart, gid, dtype code."""
    row = tab_ptr + tl.program_id(0).to(tl.int64) * 6
    d_addr = tl.load(row)
    r_addr = tl.load(row + 1)
    n = tl.load(row + 2)
    gstart = tl.load(row + 3)
    gid = tl.load(row + 4)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    v = _load_v(d_addr, r_addr, offs, mask, DTYPE, HAS_RES)
    return v, offs, mask, gstart, gid, r_addr


@triton.jit
def _first_bad(key, offs, mask, gstart):
    # Flat index of the block's first non-finite value, or _NO_BAD (int64 max).
    bad = mask & (key >= 0x7F800000)
    pos = tl.where(bad, gstart + offs.to(tl.int64), 0x7FFFFFFFFFFFFFFF)
    return tl.min(pos, 0)


# ----------------------------------------------------------------------------------------------
# kernels (grid: one program per row of the group's block table, unless said otherwise)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _sample_kernel(tab_ptr, out_ptr, STRIDE: tl.constexpr, SPB: tl.constexpr,
                   DTYPE: tl.constexpr, HAS_RES: tl.constexpr):
    """out[gid * SPB + i] = key of one element of stratum i (elements [i*STRIDE, (i+1)*STRIDE)
    of the block), or -1 past the block's end. SPB = BLOCK / STRIDE."""
    row = tab_ptr + tl.program_id(0).to(tl.int64) * 6
    d_addr = tl.load(row)
    r_addr = tl.load(row + 1)
    n = tl.load(row + 2)
    gid = tl.load(row + 4)
    i = tl.arange(0, SPB)
    start = i * STRIDE
    valid = start < n
    # The last stratum may be short: draw inside what exists (width >= 1 avoids a % 0).
    width = tl.maximum(tl.minimum(n - start, STRIDE), 1).to(tl.uint32)
    h = _fmix32((gid * SPB + i).to(tl.uint32) * 0x9E3779B9 + 0x7F4A7C15)
    pos = start + (h % width).to(tl.int32)
    v = _load_v(d_addr, r_addr, pos, valid, DTYPE, HAS_RES)
    tl.store(out_ptr + gid * SPB + i, tl.where(valid, _key(v), -1))


@triton.jit
def _count_kernel(tab_ptr, bounds_ptr, cnt_ptr, bad_ptr, BLOCK: tl.constexpr,
                  DTYPE: tl.constexpr, HAS_RES: tl.constexpr):
    """Read-only pass: cnt[gid] = (#keys >= lo, #keys >= t), bad[gid] = first non-finite flat
    index. lo and t are read from device memory (bounds_ptr) so that picking them from the
    sample needs no host sync."""
    v, offs, mask, gstart, gid, _r = _block(tab_ptr, BLOCK, DTYPE, HAS_RES)
    key = _key(v)
    lo = tl.load(bounds_ptr)
    t = tl.load(bounds_ptr + 1)
    tl.store(cnt_ptr + gid * 2, tl.sum((mask & (key >= lo)).to(tl.int32), 0))
    tl.store(cnt_ptr + gid * 2 + 1, tl.sum((mask & (key >= t)).to(tl.int32), 0))
    tl.store(bad_ptr + gid, _first_bad(key, offs, mask, gstart))


@triton.jit
def _compact_kernel(tab_ptr, bounds_ptr, offsets_ptr, idx_ptr, val_ptr, bad_ptr,
                    BLOCK: tl.constexpr, DTYPE: tl.constexpr, HAS_RES: tl.constexpr,
                    ALL: tl.constexpr):
    """Writes the block's candidates (flat index, v), keys >= lo, in flat order from
    offsets[gid] on. ALL: every element is a candidate (lo = 0); the block's output then
    starts at its flat index and, as no count pass ran, non-finite values are flagged here
    (candidates are scratch, so writing them before the check is harmless)."""
    v, offs, mask, gstart, gid, _r = _block(tab_ptr, BLOCK, DTYPE, HAS_RES)
    if ALL:
        take = mask
        base = gstart
        tl.store(bad_ptr + gid, _first_bad(_key(v), offs, mask, gstart))
    else:
        take = mask & (_key(v) >= tl.load(bounds_ptr))
        base = tl.load(offsets_ptr + gid)
    t32 = take.to(tl.int32)
    pos = base + (tl.cumsum(t32, 0) - t32).to(tl.int64)  # exclusive scan: deterministic slots
    tl.store(idx_ptr + pos, gstart + offs.to(tl.int64), mask=take)
    tl.store(val_ptr + pos, v, mask=take)


@triton.jit
def _residual_kernel(tab_ptr, BLOCK: tl.constexpr, DTYPE: tl.constexpr):
    """residual = float32(delta) + residual over the block (each lane reads then writes its
    own element)."""
    v, offs, mask, gstart, gid, r_addr = _block(tab_ptr, BLOCK, DTYPE, True)
    tl.store(r_addr.to(tl.pointer_type(tl.float32)) + offs, v, mask=mask)


@triton.jit
def _scatter_kernel(addr_ptr, src_ptr, n, BLOCK: tl.constexpr):
    """*(float*)addr[j] = src[j] for j < n (the kept entries' residual fix-up). Grid: n/BLOCK."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    addr = tl.load(addr_ptr + offs, mask=mask, other=0)
    x = tl.load(src_ptr + offs, mask=mask, other=0.0)
    tl.store(addr.to(tl.pointer_type(tl.float32)), x, mask=mask)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
class _Plan:
    """Block table of a list of tensors (the same for every call on the same tensors).

    table (device, int64, nb x 6; _block and _sample_kernel read rows of 6): rows grouped by delta dtype, in flat order inside a group:
        d_addr, r_addr (0 without residuals), len (<= BLOCK), gstart (flat index of the
        block's first element), gid (block number in flat order over all tensors), dtype code
    groups: [(dtype code, first row, row count)], one launch each per pass.
    t_offset / t_raddr (device, int64): per tensor, flat offset and residual address (maps a
        kept flat index to the residual element to fix).
    Rows depend only on the addresses, sizes and dtypes, so a cached plan stays valid even if
    its tensors were freed and others allocated at the same addresses."""

    def __init__(self, deltas, residuals, block, device):
        sizes = torch.tensor([d.numel() for d in deltas], dtype=torch.int64)
        d_addr = torch.tensor([d.data_ptr() for d in deltas], dtype=torch.int64)
        esize = torch.tensor([d.element_size() for d in deltas], dtype=torch.int64)
        codes = torch.tensor([_DTYPE_CODE[d.dtype] for d in deltas], dtype=torch.int64)
        r_addr = (torch.tensor([r.data_ptr() for r in residuals], dtype=torch.int64)
                  if residuals else torch.zeros(len(deltas), dtype=torch.int64))
        offset = torch.cumsum(sizes, 0) - sizes
        nblk = (sizes + block - 1) // block              # empty tensors have no block
        nb = int(nblk.sum())
        tid = torch.repeat_interleave(torch.arange(len(deltas)), nblk)
        first = torch.cumsum(nblk, 0) - nblk
        start = (torch.arange(nb) - first[tid]) * block  # element index of the block's start
        table = torch.stack([
            d_addr[tid] + start * esize[tid],
            torch.where(r_addr[tid] != 0, r_addr[tid] + start * 4, 0),
            torch.clamp(sizes[tid] - start, max=block),
            offset[tid] + start,
            torch.arange(nb),
            codes[tid],
        ], 1)
        order = torch.sort(table[:, 5], stable=True).indices  # group by dtype, keep flat order
        table = table[order].contiguous()
        self.groups = []
        row = 0
        for code, cnt in zip(*torch.unique_consecutive(table[:, 5], return_counts=True)):
            self.groups.append((int(code), row, int(cnt)))
            row += int(cnt)
        self.nb = nb
        self.table = table.to(device)
        self.t_offset = offset.to(device)
        self.t_raddr = r_addr.to(device)
        self.sizes = sizes.tolist()
        self.offsets = offset.tolist()

    def launch(self, kernel, *args, **kw):
        """Runs ``kernel`` over every block: one launch per dtype group (usually one), one
        program per block-table row, the group's rows as the kernel's first argument."""
        for code, row0, cnt in self.groups:
            kernel[(cnt,)](self.table[row0:row0 + cnt], *args, DTYPE=code, **kw)


_PLANS: "OrderedDict[tuple, _Plan]" = OrderedDict()
_PLAN_CACHE_SIZE = 16


def _plan(deltas, residuals, block, device) -> _Plan:
    key = (block, str(device),
           tuple((d.data_ptr(), d.numel(), _DTYPE_CODE[d.dtype]) for d in deltas),
           tuple(r.data_ptr() for r in residuals))
    return _lru_get(_PLANS, key, lambda: _Plan(deltas, residuals, block, device), _PLAN_CACHE_SIZE)


def _sample_stride(n: int, nb: int, block: int) -> int:
    """Power-of-two stratum width giving ~SAMPLE_TARGET samples (1: every element sampled).

    Every block draws BLOCK / stride slots, so many tiny tensors (each a short block) would
    make a mostly empty sample buffer of nb * BLOCK keys: the stride also keeps that buffer
    within 4 * SAMPLE_TARGET slots (a tiny tensor still gives at least one sample)."""
    want = max(-(-n // SAMPLE_TARGET), -(-nb * block // (4 * SAMPLE_TARGET)))
    return max(1, min(block, triton.next_power_of_2(want)))


def _sample_bounds(plan: _Plan, n: int, k: int, has_res: bool, block: int, device):
    """(bounds, rank_ok): bounds = int32 device tensor [lo, t] from the sorted sample; rank_ok
    False when the sample cannot bound the k-th largest (k/n too large for its size).

    Ranks as in the C++ kernel: in a sample of S keys, the k-th largest key of the data sits
    near rank q*S (q = k/n) with standard deviation sqrt(q*S*(1-q)) (binomial; the stratified
    sample varies less), so rank q*S + 6 sigma + 16 is below it with overwhelming probability;
    the approximate threshold t is the key at rank q*S."""
    stride = _sample_stride(n, plan.nb, block)
    spb = block // stride
    # Valid samples, known without the data: BLOCK is a multiple of the stride, so each tensor
    # has ceil(numel / stride) strata (its blocks' strata laid end to end).
    S = sum(-(-size // stride) for size in plan.sizes)
    q = k / n
    mean = q * S
    rank_lo = int(mean + 6.0 * math.sqrt(mean * (1.0 - q)) + 16.0)
    if rank_lo >= S:
        return None, False
    rank_t = min(int(mean), S - 1)
    keys = torch.empty(plan.nb * spb, dtype=torch.int32, device=device)
    plan.launch(_sample_kernel, keys, STRIDE=stride, SPB=spb, HAS_RES=has_res, num_warps=4)
    # Invalid slots are -1 and sort last; the valid keys are the first S.
    sorted_keys = torch.sort(keys, descending=True).values
    # Clamped so that non-finite keys always count as candidates (and are reported).
    bounds = torch.stack([sorted_keys[rank_lo], sorted_keys[rank_t]])
    return torch.clamp(bounds, max=NONFINITE_KEY), True


def _raise_nonfinite(pos: int, plan: _Plan, deltas) -> None:
    i = max(j for j, off in enumerate(plan.offsets) if off <= pos and plan.sizes[j] > 0)
    local = pos - plan.offsets[i]
    delta_bad = not bool(torch.isfinite(deltas[i].reshape(-1)[local].float()))
    # The C++ kernel's message (positions only; the Python op names the tensor by its key).
    raise ValueError(f"topk_sparsify: non-finite value in {'delta' if delta_bad else 'residual'}"
                     f"[{i}] at flat position {local}")


def _compact(plan: _Plan, n_out: int, has_res: bool, block: int, device, *, bounds=None,
             counts=None, all_=False):
    """Candidates (flat index int64, v float32) in flat order, and the bad-position tensor
    (ALL mode only). counts: per-gid candidate counts (int32) giving the block offsets."""
    idx = torch.empty(n_out, dtype=torch.int64, device=device)
    val = torch.empty(n_out, dtype=torch.float32, device=device)
    bad = torch.empty(plan.nb if all_ else 1, dtype=torch.int64, device=device)
    if all_:
        offsets = bounds = bad  # unused by the kernel in ALL mode (any tensor will do)
    else:
        offsets = torch.cumsum(counts, 0, dtype=torch.int64) - counts  # exclusive scan
    plan.launch(_compact_kernel, bounds, offsets, idx, val, bad, BLOCK=block, HAS_RES=has_res,
                ALL=all_, num_warps=8)
    return idx, val, bad


def _select_exact(idx: torch.Tensor, val: torch.Tensor, k: int):
    """The k candidates of largest key, ties to the lowest flat index (candidates are in flat
    order, so a stable descending sort is exactly the reference's rule), in flat order."""
    if k == idx.numel():
        return idx, val
    keys = val.view(torch.int32) & 0x7FFFFFFF
    order = torch.sort(keys, descending=True, stable=True).indices[:k]
    pos = torch.sort(order).values
    return idx[pos], val[pos]


def _check_args(deltas, residuals, k, value_dtype):
    for i, d in enumerate(deltas):
        if d.dtype not in _DTYPE_CODE:
            raise TypeError(f"topk_sparsify: delta[{i}] has dtype {d.dtype}; expected float32, "
                            "float64, float16 or bfloat16")
    if residuals and len(residuals) != len(deltas):
        raise ValueError("topk_sparsify: residuals must be empty or match deltas one to one")
    for i, (r, d) in enumerate(zip(residuals, deltas)):
        if r.dtype != torch.float32:
            raise TypeError(f"topk_sparsify: residual[{i}] must be float32, got {r.dtype}")
        if r.numel() != d.numel():
            raise ValueError(f"topk_sparsify: residual[{i}] has {r.numel()} elements but "
                             f"delta[{i}] has {d.numel()}")
        if not r.is_contiguous():
            raise ValueError(f"topk_sparsify: residual[{i}] must be contiguous (updated in place)")
        if r.device != d.device:
            raise ValueError(f"topk_sparsify: residual[{i}] is on {r.device}, delta on {d.device}")
    if len({d.device for d in deltas}) > 1:
        raise ValueError("topk_sparsify: all tensors must be on one device")
    if k < 0:
        raise ValueError(f"topk_sparsify: k must be >= 0, got {k}")
    if value_dtype not in _VALUE_DTYPES:
        raise TypeError(f"topk_sparsify: value_dtype must be float32, float16 or bfloat16, "
                        f"got {value_dtype}")


# ----------------------------------------------------------------------------------------------
# public launcher
# ----------------------------------------------------------------------------------------------
def topk_sparsify(deltas, residuals, k: int, approx: bool, value_dtype: torch.dtype):
    """(indices int64 ascending, values in value_dtype) of the top-k |delta + residual| over
    the tensors laid end to end; residuals (float32, or an empty list) updated in place.

    Semantics of ``fastlora.reference.topk_sparsify`` (bit-exact in exact mode; approx mode
    keeps every |v| >= a sampled threshold when that keeps within +-5% of k entries, else is
    exact). Non-finite values raise ValueError before any residual is written."""
    deltas = [d.detach().contiguous() for d in deltas]   # the list keeps them alive
    residuals = [r.detach() for r in (residuals or [])]
    k = int(k)
    _check_args(deltas, residuals, k, value_dtype)
    device = deltas[0].device if deltas else torch.device("cpu")
    if _INTERPRET and device.type != "cpu":
        # The kernels dereference raw addresses from the block table, which the interpreter
        # (running on the host) can only do for CPU tensors.
        raise RuntimeError("fastlora Triton topk_sparsify under TRITON_INTERPRET=1 needs CPU "
                           "tensors")
    n = sum(d.numel() for d in deltas)
    k = min(k, n)
    if n == 0:
        return (torch.empty(0, dtype=torch.int64, device=device),
                torch.empty(0, dtype=value_dtype, device=device))
    has_res = len(residuals) > 0
    block = _block_size()
    with _on_device(device):
        plan = _plan(deltas, residuals, block, device)
        idx, val = _select(plan, deltas, n, k, bool(approx), has_res, block, device)
        values = val.to(value_dtype)
        if value_dtype != torch.float32:
            # A kept value beyond the travel dtype's range would travel as inf and leave -inf in
            # the residual: refuse before anything (the residual included) is written.
            bad = ~torch.isfinite(values)
            if bool(bad.any()):
                j = int(bad.nonzero()[0])
                raise ValueError(f"topk_sparsify: the kept value {float(val[j])} (flat index {int(idx[j])}) "
                                 f"overflows {value_dtype} (largest finite {torch.finfo(value_dtype).max}); nothing "
                                 f"was changed, the residual included: send float32 values or scale the update")
        if has_res:
            # Residual = v everywhere, then v - float32(value) at the kept entries: rounding
            # first leaves the rounding error in the residual, so that
            # dense(values) + residual_new == delta + residual_old bitwise in fp32.
            plan.launch(_residual_kernel, BLOCK=block, num_warps=8)
            if idx.numel():
                fix = val - values.float()
                tid = torch.searchsorted(plan.t_offset, idx, right=True) - 1
                addr = plan.t_raddr[tid] + (idx - plan.t_offset[tid]) * 4
                sb = 1024
                _scatter_kernel[(triton.cdiv(idx.numel(), sb),)](addr, fix, idx.numel(),
                                                                 BLOCK=sb, num_warps=4)
    return idx, values


def _select(plan: _Plan, deltas, n: int, k: int, approx: bool, has_res: bool, block: int, device):
    """(kept flat indices ascending, their v) after checking every value is finite."""
    if 0 < k < n:
        bounds, ok = _sample_bounds(plan, n, k, has_res, block, device)
        if ok:
            cnt = torch.empty((plan.nb, 2), dtype=torch.int32, device=device)
            bad = torch.empty(plan.nb, dtype=torch.int64, device=device)
            plan.launch(_count_kernel, bounds, cnt, bad, BLOCK=block, HAS_RES=has_res, num_warps=8)
            # The one host sync of the common path: candidate totals and the finiteness check.
            m, above_t, first_bad = torch.stack(
                [cnt[:, 0].sum(), cnt[:, 1].sum(), bad.min()]).tolist()
            if first_bad != _NO_BAD:
                _raise_nonfinite(first_bad, plan, deltas)
            # Approx: everything >= t when that is within +-5% of k (the C++ kernel's rule):
            # compacting with lo = t gives exactly the kept set, no selection needed.
            if approx and int(0.95 * k) <= above_t <= int(1.05 * k) + 1:
                idx, val, _ = _compact(plan, above_t, has_res, block, device,
                                       bounds=bounds[1:].contiguous(),
                                       counts=cnt[:, 1].contiguous())
                return idx, val
            if m >= k:
                idx, val, _ = _compact(plan, m, has_res, block, device, bounds=bounds,
                                       counts=cnt[:, 0].contiguous())
                return _select_exact(idx, val, k)
        # The sample misled us (fewer than k candidates) or k/n is too large for it: every
        # element is a candidate (exact, at the cost of n candidates and an n-element sort).
    # k == 0 only needs the finiteness check: a count-only pass (bounds above every key).
    if k == 0:
        nf = torch.full((2,), NONFINITE_KEY, dtype=torch.int32, device=device)
        cnt = torch.empty((plan.nb, 2), dtype=torch.int32, device=device)
        bad = torch.empty(plan.nb, dtype=torch.int64, device=device)
        plan.launch(_count_kernel, nf, cnt, bad, BLOCK=block, HAS_RES=has_res, num_warps=8)
        first_bad = int(bad.min())
        if first_bad != _NO_BAD:
            _raise_nonfinite(first_bad, plan, deltas)
        return (torch.empty(0, dtype=torch.int64, device=device),
                torch.empty(0, dtype=torch.float32, device=device))
    idx, val, bad = _compact(plan, n, has_res, block, device, all_=True)
    first_bad = int(bad.min())
    if first_bad != _NO_BAD:
        _raise_nonfinite(first_bad, plan, deltas)
    return _select_exact(idx, val, k)
