"""Triton kernels of fastlora's grouped LoRA linear (mixed-adapter batches, punica SGMV-style).

A leaf module: torch, triton and its siblings in kernels/ only. Semantics are those of
``fastlora.reference.lora_grouped_linear``: per row i with adapter a = row_adapter[i] >= 0,

    y[i] = x[i] @ W^T + bias + s_a * (x[i] @ A[a, :r_a]^T) @ B[a, :, :r_a]^T

and rows with a = -1 get the base layer only. The launcher computes the base GEMM with torch
(cuBLAS), sorts the rows by adapter on the host (stable) and builds a tile table of
(adapter, start, end) over the sorted order, BLOCK_M rows per tile at most, never crossing
adapters. Then two kernels:

    sgmv_shrink  xa[pos, r-chunk] = x[perm[pos]] @ A[a, r-chunk]^T
                                                         one program per (tile, r-chunk)
    sgmv_expand  y[perm[pos], n-tile] += s_a * xa[pos, :r_a] @ B[a, n-tile, :r_a]^T
                                                         one program per (tile, n-tile), looping
                                                         over the rank in r-chunks

The rank is processed in chunks of BLOCK_R columns (a power of two >= 16, tl.dot's minimum on
the tensor cores; at most 128, 64 in float32), so no tile holds the whole rank: shared memory
and registers stay bounded at any rank (a rank-1024 adapter loaded whole needed 270-393 KB of
shared memory against 227 KB on an H100). Rank columns past r_a are masked to zero on load, so
the zero-padding of the stacked weights is never read. Every y element belongs to one program (rows of a tile are distinct, each row is in
one tile): no atomics. xa is rounded to the input dtype (it is a tensor-core operand, and PEFT
rounds it too); the LoRA term is added to y on the fp32 accumulator and rounded once.
float64 is not supported (the op falls back to the reference for it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET as _INTERPRET, check_dtype as _check_dtype, dot_precision as _dot_precision
from ._common import mma as _mma, on_device as _on_device, pow2 as _pow2, round_to as _round_to


@triton.jit
def _tile(tiles_ptr, ranks_ptr, BLOCK_M: tl.constexpr):
    """(adapter, sorted positions of the tile's rows, their mask, adapter rank) of a program."""
    t = tl.program_id(0)
    adapter = tl.load(tiles_ptr + 3 * t)
    start = tl.load(tiles_ptr + 3 * t + 1)
    end = tl.load(tiles_ptr + 3 * t + 2)
    pos = start + tl.arange(0, BLOCK_M)
    return adapter, pos, pos < end, tl.load(ranks_ptr + adapter)


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr, a_ptr, xa_ptr, perm_ptr, tiles_ptr, ranks_ptr,
    K,
    stride_xm, stride_xk, stride_aa, stride_ar, stride_ak, stride_xam, stride_xar,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    adapter, pos, mask_m, rank = _tile(tiles_ptr, ranks_ptr, BLOCK_M)
    r0 = tl.program_id(1) * BLOCK_R
    if r0 >= rank:
        return  # a chunk past this adapter's rank: those xa columns are never read
    rows = tl.load(perm_ptr + pos, mask=mask_m, other=0)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    a_cols = a_ptr + adapter.to(tl.int64) * stride_aa + offs_r.to(tl.int64)[None, :] * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xt = tl.load(x_rows + offs_k.to(tl.int64)[None, :] * stride_xk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        at = tl.load(a_cols + offs_k.to(tl.int64)[:, None] * stride_ak,
                     mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = _mma(xt, at, acc, DOT_PRECISION, INTERPRET)
    xa_ptrs = xa_ptr + pos.to(tl.int64)[:, None] * stride_xam + offs_r.to(tl.int64)[None, :] * stride_xar
    tl.store(xa_ptrs, _round_to(acc, xa_ptr.dtype.element_ty, INTERPRET), mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _sgmv_expand_kernel(
    xa_ptr, b_ptr, y_ptr, perm_ptr, tiles_ptr, ranks_ptr, scal_ptr,
    N,
    stride_xam, stride_xar, stride_ba, stride_bn, stride_br, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    adapter, pos, mask_m, rank = _tile(tiles_ptr, ranks_ptr, BLOCK_M)
    rows = tl.load(perm_ptr + pos, mask=mask_m, other=0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    xa_rows = xa_ptr + pos.to(tl.int64)[:, None] * stride_xam
    b_cols = b_ptr + adapter.to(tl.int64) * stride_ba + offs_n.to(tl.int64)[None, :] * stride_bn
    lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        xa = tl.load(xa_rows + offs_r.to(tl.int64)[None, :] * stride_xar,
                     mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        b = tl.load(b_cols + offs_r.to(tl.int64)[:, None] * stride_br,
                    mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        lora = _mma(xa, b, lora, DOT_PRECISION, INTERPRET)
    s = tl.load(scal_ptr + adapter)
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + offs_n.to(tl.int64)[None, :] * stride_yn
    mask = mask_m[:, None] & mask_n[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32) + s * lora
    tl.store(y_ptrs, _round_to(y, y_ptr.dtype.element_ty, INTERPRET), mask=mask)


def _blocks(max_rows: int, K: int, N: int, r_max: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_K, BLOCK_N, BLOCK_R, num_warps). GPU: decode-sized groups get 16-row tiles
    (tl.dot's minimum), prefill-sized ones 64 (32 with 128-wide rank chunks, so the BLOCK_M x
    BLOCK_R shrink accumulator stays in registers); fp32 halves the K / N / R edges to bound
    registers. Interpreter: one large M / K / N tile per program (small test shapes run in one
    program, one trip), but the GPU's rank chunks, so tests walk the same rank loop."""
    block_r = _pow2(r_max, 16, 64 if dtype == torch.float32 else 128)
    if _INTERPRET:
        return _pow2(max_rows, 16, 128), _pow2(K, 16, 128), _pow2(N, 16, 128), block_r, 4
    cap_k, cap_n = (32, 64) if dtype == torch.float32 else (64, 128)
    cap_m = 32 if block_r >= 128 else 64
    return _pow2(max_rows, 16, cap_m), _pow2(K, 16, cap_k), _pow2(N, 16, cap_n), block_r, 4


def _block_m_cap() -> int:
    """Most rows per tile: 64 on a GPU, 128 under the interpreter (tests force 16)."""
    return 128 if _INTERPRET else 64


def tile_table(row_adapter: torch.Tensor, ranks: torch.Tensor, block_m_cap: int = 64):
    """Host-side schedule: (perm, tiles, block_m). perm (M,) int64 sorts the rows by adapter
    (stable, base rows first); tiles (T, 3) int32 rows (adapter, start, end) over positions of
    perm, at most block_m rows each, one adapter per tile; adapters of rank 0 and base rows get
    no tile. Both tensors are on the CPU."""
    ra = row_adapter.to("cpu", torch.int64)
    rk = ranks.to("cpu", torch.int64).tolist()
    K = len(rk)
    perm = torch.argsort(ra, stable=True)
    counts = torch.bincount(ra + 1, minlength=K + 1).tolist()  # counts[0]: base rows
    live = [counts[k + 1] for k in range(K) if rk[k] > 0]
    block_m = _pow2(max(live, default=1), 16, block_m_cap)
    tiles, start = [], counts[0]
    for k in range(K):
        end = start + counts[k + 1]
        if rk[k] > 0:
            tiles += [(k, b, min(b + block_m, end)) for b in range(start, end, block_m)]
        start = end
    return perm, torch.tensor(tiles, dtype=torch.int32).reshape(-1, 3), block_m


def grouped_forward(x: torch.Tensor, weight: torch.Tensor, bias, lora_A: torch.Tensor, lora_B: torch.Tensor,
                    scalings: torch.Tensor, ranks: torch.Tensor, row_adapter: torch.Tensor) -> torch.Tensor:
    """y (M, N) of the grouped LoRA linear: x (M, K) any strides, weight (N, K), bias (N,) or None,
    lora_A (A, r_max, K), lora_B (A, N, r_max), scalings (A,), ranks (A,) int64, row_adapter (M,)
    int64 in [-1, A). Shapes, dtypes and value ranges are validated by the caller."""
    _check_dtype(x, weight, bias, lora_A, lora_B)
    M, K = x.shape
    N, r_max = weight.shape[0], lora_A.shape[1]
    dev = x.device
    y = torch.nn.functional.linear(x, weight, bias)  # base GEMM: cuBLAS / ATen
    if M == 0 or N == 0 or lora_A.shape[0] == 0 or r_max == 0:
        return y
    perm, tiles, _ = tile_table(row_adapter, ranks, _block_m_cap())
    if tiles.shape[0] == 0:
        return y
    max_rows = int((tiles[:, 2] - tiles[:, 1]).max())
    bm, bk, bn, br, num_warps = _blocks(max_rows, K, N, r_max, x.dtype)
    perm, tiles = perm.to(dev), tiles.to(dev)
    ranks_d = ranks.to(dev, torch.int32)
    scal_d = scalings.to(dev, torch.float32)
    xa = torch.empty((M, r_max), dtype=x.dtype, device=dev)
    prec = _dot_precision(x.dtype)
    T = tiles.shape[0]
    with _on_device(dev):
        _sgmv_shrink_kernel[(T, triton.cdiv(r_max, br))](
            x, lora_A, xa, perm, tiles, ranks_d, K,
            x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), lora_A.stride(2),
            xa.stride(0), xa.stride(1),
            BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=br, DOT_PRECISION=prec, INTERPRET=_INTERPRET,
            num_warps=num_warps, num_stages=1 if _INTERPRET else 3)
        _sgmv_expand_kernel[(T, triton.cdiv(N, bn))](
            xa, lora_B, y, perm, tiles, ranks_d, scal_d, N,
            xa.stride(0), xa.stride(1), lora_B.stride(0), lora_B.stride(1), lora_B.stride(2),
            y.stride(0), y.stride(1),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br, DOT_PRECISION=prec, INTERPRET=_INTERPRET,
            num_warps=num_warps, num_stages=1 if _INTERPRET else 2)
    return y
