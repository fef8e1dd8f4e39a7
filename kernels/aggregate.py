"""Triton kernels of fastlora's sparse aggregation (``fastlora::sparse_aggregate_`` on CUDA).

A leaf module: it imports only torch, triton and the standard library, never fastlora, so that
it can be loaded (and tested under ``TRITON_INTERPRET=1``) on its own. Semantics are those of
``fastlora.reference.sparse_aggregate_`` and of the C++ CPU kernel
(csrc/cpu/aggregate_cpu.cpp), bit for bit:

    for each client i in list order:  out[idx_i] = out[idx_i] + float32(w_i) * float32(val_i)

over the float32 tensors of ``out`` laid end to end (one flat index space), the product
rounded to float32 and then the sum rounded to float32 (never one fused multiply-add).

Algorithm (no atomics in the accumulation, so the bits never depend on scheduling):
  1. ``_validate_kernel`` (validate=True only; read-only): one program per (block of
     VBLOCK entries, client) finds the block's first bad entry (index out of range, not
     greater than its predecessor, non-finite float32(value): NaN / inf, or a float64 beyond
     float32's range, which the message tells apart) and folds ``pos * 4 + kind``
     into a per-client minimum (``atomic_min``: order-independent, hence deterministic). One
     host sync reads the minima; the lowest bad client raises the C++ kernel's ValueError
     before anything is written.
  2. The flat output is cut into chunks of CHUNK elements, never straddling two tensors of
     ``out`` (each tensor is cut on its own, so a chunk has one base address). Chunk c covers
     flat [bnd[c], bnd[c+1]); the chunks tile the flat space in order.
  3. ``_bounds_kernel``: for every (client i, chunk boundary c) a vectorised binary search
     gives ``bounds[i, c] = lower_bound(idx_i, bnd[c])``, so client i's entries in chunk c are
     ``[bounds[i, c], bounds[i, c+1])`` (the C++ kernel's per-chunk std::lower_bound, done for
     all pairs at once in one launch).
  4. ``_aggregate_kernel``: one program per chunk, which it owns exclusively. It walks the
     clients in list order; for each it gathers its entries' output elements, adds the
     products and scatters them back, then ``tl.debug_barrier()`` (__syncthreads, which also
     makes the CTA's global stores visible to all its threads) before the next client, whose
     entries may hit the same elements from other threads. Every element therefore receives
     its clients' contributions in client order, whatever CHUNK, the entry block or the
     number of programs: the result is bitwise independent of the launch configuration.
     The chunk's elements stay in L2 while all the clients' entries for it land (the reason
     for chunking rather than one launch per client sweeping the whole output each time).

Several tensors, one launch: clients and chunks are reached through tables of raw addresses
(``int -> pointer`` casts, as in kernels/sparsify.py and Triton's grouped-GEMM tutorial), so
neither the clients' entries nor a multi-tensor ``out`` (a LoRA state dict: hundreds of
tensors) are ever concatenated or copied: no scratch buffer, no copy back. The value dtype is
a compile-time constant when all clients share one (the usual case); mixed dtypes take a
per-client runtime branch in the same kernel (uniform per program, so it costs a few scalar
instructions per block). The chunk table depends only on ``out``'s addresses and sizes and is
cached (a server folds many client groups into the same accumulator).

validate=False (inputs already checked: decoded payloads, sparsify outputs) skips step 1, but
the kernel still never writes outside ``out``: an entry is applied only if its index lies in
its chunk's window and is greater than the entry before it, and each program flags anything
else (and windows that do not tile the client's entries). One host sync then raises
"sparse_aggregate: client i: indices are unsorted or out of range" (the C++ message), after
the valid entries have been applied, as the C++ kernel does. Non-finite values are not
checked in this mode (they propagate, as on CPU). In either mode a sum that overflows float32
becomes inf, as IEEE arithmetic does: fastlora.sparse_aggregate checks that, once for every
kernel.

Host syncs: one per call (the validation minima with validate=True, the error flag with
validate=False), plus one to read the weights if they live on the GPU (the op's callers keep
them on the CPU). Launches per call: validate (1), bounds (1), aggregate (1), and two small
host-to-device copies (client table, weights); the chunk table is cached.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

from ._common import INTERPRET as _INTERPRET, on_device as _on_device, num_sms as _num_sms, lru_get as _lru_get
from ._common import is_nonfinite as _is_nonfinite

# The Triton CPU interpreter (tests) has gaps: bf16 -> fp32 conversion flushes denormals and
# bf16 arithmetic is wrong there, so bf16 values are loaded as raw uint16 and widened by hand
# ((bits << 16) read as float32 is exactly float32(bf16), also on a GPU). Under the interpreter
# each program costs milliseconds, so the default blocks are large; tests monkeypatch
# _chunk_size / _entry_block / _validate_block to exercise many programs and loop trips.

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_NCOL = 4               # client-table columns: idx address, value address, nnz, dtype code
_NO_BAD = tl.constexpr(1 << 62)  # "no bad entry" in the validation minima (pos * 4 + kind < it)
_MAX_GRID_Y = 65535     # CUDA's limit on grid dimension 1


# ----------------------------------------------------------------------------------------------
# sizes (tests monkeypatch these; the result never depends on them)
# ----------------------------------------------------------------------------------------------


def _chunk_size(numel: int, device: torch.device) -> int:
    """Output elements owned by one program of the aggregate kernel.

    64 Ki float32 (256 KiB) at most, so that a chunk's lines stay in L2 while every client's
    entries for it land; smaller on a GPU when the output is small, so that there are ~8
    programs per SM to hide the gathers' latency (never below 1 Ki: each (client, chunk) pair
    costs two bound loads and a barrier). Under the interpreter one program covers the small
    test outputs. Any positive size gives the same bits."""
    if _INTERPRET or device.type != "cuda":
        return 1 << 16
    want = numel // (8 * _num_sms(device))
    ch = 1 << max(0, want.bit_length() - 1) if want > 0 else 1
    return max(1 << 10, min(1 << 16, ch))


def _entry_block(total_nnz: int, n_clients: int, n_chunks: int) -> int:
    """Entries of one client handled per inner-loop trip of the aggregate kernel: about the
    mean entries per (client, chunk), as a power of two in [128, 1024] (4 warps: 1 to 8
    entries per thread), so that sparse clients do not run mostly masked lanes and dense
    ones take few trips."""
    mean = total_nnz // max(1, n_clients * n_chunks)
    return max(128, min(1024, triton.next_power_of_2(max(mean, 1))))


def _validate_block() -> int:
    """Entries per program of the validation pass (16 per thread at 8 warps)."""
    return 4096


# ----------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_f32(v_addr, offs, mask, code):
    """float32(values[offs]) for a values array at address v_addr with dtype ``code``
    (0 fp32, 1 fp16, 2 bf16, 3 fp64): a compile-time constant, or a runtime scalar when the
    clients' dtypes differ (then a uniform branch). Masked lanes give 0."""
    if code == 2:
        # bf16 -> fp32 exactly by bits (the interpreter's conversion flushes denormals).
        b = tl.load(v_addr.to(tl.pointer_type(tl.uint16)) + offs, mask=mask, other=0)
        v = (b.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    elif code == 1:
        v = tl.load(v_addr.to(tl.pointer_type(tl.float16)) + offs, mask=mask, other=0.0).to(tl.float32)
    elif code == 3:
        # Round to nearest even like torch's .to(float32); an fp64 beyond fp32's range
        # becomes inf (and is reported as non-finite, as the C++ kernel does).
        v = tl.load(v_addr.to(tl.pointer_type(tl.float64)) + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        v = tl.load(v_addr.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
    return v


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["numel", "client0"])
def _validate_kernel(ctab_ptr, best_ptr, numel, client0,
                     BLOCK: tl.constexpr, DTYPE: tl.constexpr):
    """Grid (entry blocks, clients). best[i] = min over client i's bad entries of
    pos * 4 + kind (kind 0: index out of [0, numel), 1: not above the previous index,
    2: non-finite float32 value); the C++ check order at one position is range, order,
    finiteness, and the lowest position wins."""
    i = client0 + tl.program_id(1)
    row = ctab_ptr + i.to(tl.int64) * 4
    i_addr = tl.load(row)
    v_addr = tl.load(row + 1)
    n = tl.load(row + 2)
    if DTYPE >= 0:
        code = DTYPE
    else:
        code = tl.load(row + 3)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    ip = i_addr.to(tl.pointer_type(tl.int64))
    g = tl.load(ip + offs, mask=mask, other=0)
    prev = tl.load(ip + offs - 1, mask=mask & (offs > 0), other=-1)
    v = _load_f32(v_addr, offs, mask, code)
    bad_range = (g < 0) | (g >= numel)
    bad_order = (offs > 0) & (g <= prev)
    bad_value = _is_nonfinite(v)
    kind = tl.where(bad_range, 0, tl.where(bad_order, 1, 2))
    bad = mask & (bad_range | bad_order | bad_value)
    key = tl.where(bad, offs * 4 + kind, _NO_BAD)
    first = tl.min(key, 0)
    if first < _NO_BAD:
        tl.atomic_min(best_ptr + i, first)


@triton.jit(do_not_specialize=["n_bnd", "iters"])
def _bounds_kernel(ctab_ptr, bnd_ptr, bounds_ptr, n_bnd, iters, BLOCK: tl.constexpr):
    """Grid (clients, boundary blocks). bounds[i, c] = lower_bound(idx_i, bnd[c]) by a
    vectorised binary search of ``iters`` = bit_length(max nnz) halvings. Loads stay inside
    [0, nnz_i) even for unsorted input (then the bounds are merely meaningless, which the
    aggregate kernel detects)."""
    i = tl.program_id(0).to(tl.int64)
    row = ctab_ptr + i * 4
    ip = tl.load(row).to(tl.pointer_type(tl.int64))
    n = tl.load(row + 2)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_bnd
    x = tl.load(bnd_ptr + offs, mask=mask, other=0)
    lo = tl.zeros([BLOCK], dtype=tl.int64)
    hi = lo + n
    for _ in range(iters):
        active = lo < hi
        mid = (lo + hi) >> 1
        a = tl.load(ip + mid, mask=mask & active, other=0)
        right = active & (a < x)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & (a >= x), mid, hi)
    tl.store(bounds_ptr + i * n_bnd + offs, lo, mask=mask)


@triton.jit(do_not_specialize=["n_clients", "n_chunks"])
def _aggregate_kernel(ctab_ptr, w_ptr, bnd_ptr, caddr_ptr, bounds_ptr, err_ptr,
                      n_clients, n_chunks,
                      BLOCK: tl.constexpr, DTYPE: tl.constexpr):
    """Grid (chunks,). The program owns flat [bnd[c], bnd[c+1]) (float32 at caddr[c]) and
    applies every client's entries in it, clients in list order."""
    c = tl.program_id(0).to(tl.int64)
    lo = tl.load(bnd_ptr + c)
    hi = tl.load(bnd_ptr + c + 1)
    out = tl.load(caddr_ptr + c).to(tl.pointer_type(tl.float32))
    n_bnd = n_chunks.to(tl.int64) + 1
    # Lowest client seen with a bad entry, per lane (reduced once at the end, so that the
    # inner loop carries no cross-thread reduction) and for the windows (scalar).
    bad_lane = tl.full([BLOCK], n_clients, dtype=tl.int32)
    bad_win = n_clients
    for i in range(n_clients):
        row = ctab_ptr + i * 4
        ip = tl.load(row).to(tl.pointer_type(tl.int64))
        v_addr = tl.load(row + 1)
        n = tl.load(row + 2)
        if DTYPE >= 0:
            code = DTYPE
        else:
            code = tl.load(row + 3)
        w = tl.load(w_ptr + i)
        brow = bounds_ptr + i * n_bnd + c
        j0 = tl.load(brow)
        j1 = tl.load(brow + 1)
        # The windows must tile [0, nnz): otherwise entries were skipped (an index below 0 or
        # >= numel, or unsorted input). Together with the per-entry checks below this detects
        # every unsorted / duplicate / out-of-range index list.
        win_bad = (j1 < j0) | ((c == 0) & (j0 != 0)) | ((c == n_chunks - 1) & (j1 != n))
        bad_win = tl.where(win_bad, tl.minimum(bad_win, i), bad_win)
        for j in range(j0, j1, BLOCK):
            offs = j + tl.arange(0, BLOCK)
            mask = offs < j1
            g = tl.load(ip + offs, mask=mask, other=0)
            prev = tl.load(ip + offs - 1, mask=mask & (offs > j0), other=-1)
            # Memory safety without validation: only indices inside this chunk's window (and
            # strictly increasing, so that no two lanes hit one element) are applied.
            ok = mask & (g >= lo) & (g < hi) & ((offs == j0) | (g > prev))
            v = _load_f32(v_addr, offs, ok, code)
            p = out + (g - lo)
            o = tl.load(p, mask=ok, other=0.0)
            # Product rounded to float32, then the sum: two roundings, as the reference. The
            # launch disables fp fusion so that the compiler cannot contract them into an FMA.
            prod = w * v
            tl.store(p, o + prod, mask=ok)
            bad_lane = tl.where(mask & ~ok, tl.minimum(bad_lane, i), bad_lane)
        # The next client's entries may hit the elements just stored, from other threads of
        # this program: __syncthreads orders (and makes visible) the CTA's global accesses.
        tl.debug_barrier()
    first_bad = tl.minimum(tl.min(bad_lane, 0), bad_win)
    if first_bad < n_clients:
        tl.atomic_min(err_ptr, first_bad)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
class _Chunks:
    """Chunk table of an ``out`` list: bnd (int64, C + 1: flat start of every chunk, then the
    total numel) and caddr (int64, C: address of the chunk's first float32), on the device.
    Every tensor is cut on its own (a chunk never spans two tensors); empty tensors have no
    chunk. Depends only on addresses, sizes and the chunk size, so a cached table stays valid
    even if its tensors were freed and others allocated at the same addresses."""

    def __init__(self, out, ch: int, device: torch.device):
        sizes = torch.tensor([o.numel() for o in out], dtype=torch.int64)
        addr = torch.tensor([o.data_ptr() for o in out], dtype=torch.int64)
        offset = torch.cumsum(sizes, 0) - sizes
        nch = (sizes + ch - 1) // ch
        self.n = int(nch.sum())
        tid = torch.repeat_interleave(torch.arange(len(out)), nch)
        first = torch.cumsum(nch, 0) - nch
        start = (torch.arange(self.n) - first[tid]) * ch          # element offset in its tensor
        numel = int(sizes.sum())
        bnd = torch.cat([offset[tid] + start, torch.tensor([numel], dtype=torch.int64)])
        caddr = addr[tid] + start * 4
        self.table = torch.cat([bnd, caddr]).to(device)
        self.bnd = self.table[:self.n + 1]
        self.caddr = self.table[self.n + 1:]


_CHUNKS: "OrderedDict[tuple, _Chunks]" = OrderedDict()
_CHUNK_CACHE_SIZE = 16


def _chunks(out, ch: int, device: torch.device) -> _Chunks:
    key = (ch, str(device), tuple((o.data_ptr(), o.numel()) for o in out))
    return _lru_get(_CHUNKS, key, lambda: _Chunks(out, ch, device), _CHUNK_CACHE_SIZE)


def _check_args(out, indices, values, weights):
    """The C++ kernel's argument checks, in its order; returns the float32 CPU weights."""
    n = len(indices)
    if len(values) != n:
        raise ValueError(f"sparse_aggregate: {n} index tensors but {len(values)} value tensors")
    if not isinstance(weights, torch.Tensor) or weights.dim() != 1 or weights.shape[0] != n:
        shape = list(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise ValueError(f"sparse_aggregate: weights must have one entry per client ({n}), "
                         f"got shape {shape}")
    for p, o in enumerate(out):
        if o.dtype != torch.float32:
            raise TypeError(f"sparse_aggregate: out[{p}] must be float32 (the accumulator), got {o.dtype}")
        if not o.is_contiguous():
            raise ValueError(f"sparse_aggregate: out[{p}] must be contiguous")
        if o.device != out[0].device:
            raise ValueError(f"sparse_aggregate: out[{p}] is on {o.device}, out[0] on {out[0].device}")
    # Weights are read on the host (finiteness, and one H2D copy for the kernel); the op's
    # callers keep them on the CPU, where this costs no sync.
    w = weights.detach().to(device="cpu", dtype=torch.float32)
    finite = torch.isfinite(w).tolist()
    for i in range(n):
        if indices[i].dtype != torch.int64 or indices[i].dim() != 1:
            raise ValueError(f"sparse_aggregate: client {i}: indices must be a 1-D int64 tensor")
        if values[i].dim() != 1 or values[i].numel() != indices[i].numel():
            raise ValueError(f"sparse_aggregate: client {i}: values must be 1-D with as many "
                             "entries as indices")
        if not finite[i]:
            raise ValueError(f"sparse_aggregate: client {i}: weight is not finite")
        if values[i].dtype not in _DTYPE_CODE:
            raise TypeError(f"sparse_aggregate: values must be floating point, got {values[i].dtype}")
    return w


def _validate(ctab, indices, values, nnz, numel, dtype_code, device):
    """Step 1: raises the C++ kernel's ValueError for the lowest bad client (one host sync)."""
    n = len(nnz)
    best = torch.full((n,), _NO_BAD.value, dtype=torch.int64, device=device)
    vb = _validate_block()
    nblk = triton.cdiv(max(nnz), vb)
    for c0 in range(0, n, _MAX_GRID_Y):
        _validate_kernel[(nblk, min(_MAX_GRID_Y, n - c0))](
            ctab, best, numel, c0, BLOCK=vb, DTYPE=dtype_code, num_warps=8,
            enable_fp_fusion=False)
    for i, b in enumerate(best.tolist()):
        if b == _NO_BAD.value:
            continue
        pos, kind = divmod(b, 4)
        if kind == 0:
            raise ValueError(f"sparse_aggregate: client {i}: index {int(indices[i][pos])} at position "
                             f"{pos} is out of range [0, {numel})")
        if kind == 1:
            raise ValueError(f"sparse_aggregate: client {i}: indices must be sorted ascending and "
                             f"unique (position {pos})")
        x = float(values[i][pos])
        if x == x and abs(x) != float("inf"):   # a finite float64 beyond float32's range
            raise ValueError(f"sparse_aggregate: client {i}: value {x:g} at position {pos} does not fit "
                             "float32 (the accumulator)")
        raise ValueError(f"sparse_aggregate: client {i}: non-finite value at position {pos}")


def sparse_aggregate_(out, indices, values, weights, validate: bool = True) -> None:
    """In place: for each client i in order, out[indices[i]] += float32(weights[i]) *
    float32(values[i]) over the float32 tensors of ``out`` laid end to end (product and sum
    each rounded in float32: bitwise equal to ``fastlora.reference.sparse_aggregate_``).

    out: contiguous float32 tensors on one GPU; indices: 1-D int64, sorted ascending, unique,
    in [0, total numel); values: 1-D float32/float16/bfloat16/float64, as long as indices;
    weights: 1-D, one per client (may live on the CPU). validate=True checks everything
    before writing and raises the C++ kernel's ValueError; validate=False trusts the input
    but never writes outside ``out`` (bad indices raise, see the module docstring)."""
    out = list(out)
    indices = list(indices)
    values = list(values)
    w = _check_args(out, indices, values, weights)
    n = len(indices)
    device = out[0].device if out else (indices[0].device if indices else torch.device("cpu"))
    if _INTERPRET and device.type != "cpu":
        # The kernels dereference raw addresses from tables, which the interpreter (running on
        # the host) can only do for CPU tensors.
        raise RuntimeError("fastlora Triton sparse_aggregate_ under TRITON_INTERPRET=1 needs CPU tensors")
    numel = sum(o.numel() for o in out)
    # Contiguous copies on out's device where needed; these lists keep them alive across the
    # launches (a freed block is only reused by later work on the same stream anyway).
    idx = [t.detach().to(device).contiguous() for t in indices]
    val = [t.detach().to(device).contiguous() for t in values]
    nnz = [t.numel() for t in idx]
    if n == 0 or (max(nnz) == 0):
        return  # nothing to check, nothing to add
    codes = [_DTYPE_CODE[v.dtype] for v in val]
    dtype_code = codes[0] if len(set(codes)) == 1 else -1  # -1: per-client runtime dtype
    ctab = torch.tensor([[a.data_ptr(), b.data_ptr(), k, code]
                         for a, b, k, code in zip(idx, val, nnz, codes)], dtype=torch.int64).to(device)

    with _on_device(device):
        if validate:
            _validate(ctab, indices, values, nnz, numel, dtype_code, device)
        if numel == 0:
            return
        ch = _chunk_size(numel, device)
        chunks = _chunks(out, ch, device)
        n_bnd = chunks.n + 1
        bounds = torch.empty((n, n_bnd), dtype=torch.int64, device=device)
        bb = 1024
        _bounds_kernel[(n, triton.cdiv(n_bnd, bb))](
            ctab, chunks.bnd, bounds, n_bnd, max(nnz).bit_length(), BLOCK=bb, num_warps=4,
            enable_fp_fusion=False)
        err = torch.full((1,), n, dtype=torch.int32, device=device)
        _aggregate_kernel[(chunks.n,)](
            ctab, w.to(device), chunks.bnd, chunks.caddr, bounds, err, n, chunks.n,
            BLOCK=_entry_block(sum(nnz), n, chunks.n), DTYPE=dtype_code,
            # num_stages=1: nothing to pipeline (data-dependent gathers), and no load of the
            # output may be hoisted ahead of the previous trip's or client's stores.
            num_warps=4, num_stages=1,
            # No FMA contraction of w * v + o: the product must be rounded on its own.
            enable_fp_fusion=False)
        if not validate:
            # Validated input cannot trip the flag: the sync is only paid without validation.
            bad = int(err.item())
            if bad < n:
                raise ValueError(f"sparse_aggregate: client {bad}: indices are unsorted or out of range")
