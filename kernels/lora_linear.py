"""Triton kernels of fastlora's LoRA Linear (forward and backward).

A leaf module: it imports only torch, triton and math, never fastlora, so that it can be
loaded (and tested under ``TRITON_INTERPRET=1``) on its own. Semantics are those of
``fastlora.reference``; in particular the dropout keep-mask is fastlora's counter-based hash
(MurmurHash3 fmix32 of the (row, column) index and the seed), regenerated inside every kernel
that needs it, so the dropped input is never materialised and forward and backward agree bit
for bit with the reference and with the C++ kernels.

The two base products (``x @ weight.T``, ``grad_y @ weight``) are cuBLAS GEMMs (torch.mm): an
untuned Triton GEMM runs them at an estimated 65-85% of cuBLAS, which alone would cost more
than the whole LoRA branch. The rank-r work of a step runs in three more launches, for padded
ranks up to BAND_MAX_RANK (128). The band kernels split the rows into bands of BLOCK_M rows, and
each band into a few programs over the columns (chunks) that recompute the band's rank-r product
in registers rather than pass it between launches:

    lora_linear_forward  y      = x @ weight.T                                  (cuBLAS)
      _lora_fwd_band_kernel   xa[band]  = dropout(x[band]) @ lora_A.T            (chunk 0 stores it)
                              y[band]  += bias + scaling * xa[band] @ lora_B.T
    lora_backward        grad_x = grad_y @ weight                               (cuBLAS)
      _lora_bwd_band_kernel   g[band]   = scaling * grad_y[band] @ lora_B        (registers)
                              grad_A   += g[band].T @ dropout(x[band])          (per-band partials)
                              grad_B   += scaling * grad_y[band].T @ xa[band]   (per-band partials)
                              grad_x[band] += dropout(g[band] @ lora_A)          (mask at x's index)
      _band_sum_kernel        grad_A, grad_B = the sum of the bands' fp32 partials, in band order
                              (deterministic; with one band the partials are the gradients)

With the op's seed draw that is six launches per training step and no host sync. Above
BAND_MAX_RANK the rank tiles would not fit in registers, and where the bands' partial sums would
outgrow dY (backward_band_rows) their memory would not be worth the launches saved: the
launchers then use two generic kernels instead. ``_lora_gemm_kernel``, for the products with a short output side:

    C[m, n] = alpha * sum_k A'[m, k] * B'[k, n]

where A' (B') is A (B) passed through fastlora's dropout when DROP_A (DROP_B) is set, using
the operand's own (row, column) index for the mask; ``_lora_add_kernel``, the light kernel that
adds the LoRA term to a base product in place:

    C[m, n] += dropE(lora_scale * sum_j E[m, j] * F[j, n]) (+ bias[n])

where dropE applies the mask at the output index (m, n). Operands are strided 2-D views, so
transposes (``weight.t()``) cost nothing. The launchers map the LoRA ops onto them:

    lora_shrink    xa     = dropA(x) @ lora_A.T
    lora_forward   y      = x @ weight.T                              (cuBLAS)
                   y     += bias + scaling * (xa @ lora_B.T)          (add kernel)
    lora_backward  g      = scaling * grad_y @ lora_B                 (M, r), once, reused
                   grad_A = g.T @ dropB(x)                            (mask regenerated)
                   grad_B = scaling * grad_y.T @ xa
                   grad_x = grad_y @ weight                           (cuBLAS)
                   grad_x += dropE(g @ lora_A)                        (add kernel)

grad_weight (grad_y.T @ x) and grad_bias (grad_y.sum(0)) are plain cuBLAS / ATen work.

Numerics: operands are fed to tl.dot in their own dtype (fp16/bf16 tensor cores; fp32 uses
IEEE fp32 unless torch allows TF32 for matmuls, as cuBLAS does), accumulation is always fp32.
The base products are rounded by cuBLAS; the add kernel adds the fp32 LoRA term (and the bias)
to the rounded value and rounds once more, as the CPU kernels do and as PEFT's
``base + lora`` rounds the base output before the sum. Dropped operands are rounded to the
input dtype before the dot exactly as the reference's ``dropout`` rounds them. float64 is not
supported (use the reference path).

Mixed precision: x, weight, grad_y (and bias) may be float16 or bfloat16 while lora_A, lora_B
and xa are float32, PEFT's default on a half-precision model (adapters kept in float32). The
LoRA branch then follows PEFT, which runs it in the adapters' dtype on the input cast to it:

    xa     = dropout(x.to(f32)) @ lora_A.T                          float32
    y      = x @ weight.T + bias + scaling * (xa @ lora_B.T)        x's dtype
    g      = scaling * grad_y.to(f32) @ lora_B                      float32
    grad_A = g.T @ dropout(x.to(f32))                               float32
    grad_B = scaling * grad_y.to(f32).T @ xa                        float32
    grad_x = grad_y @ weight + dropE(g @ lora_A)                    x's dtype

In the kernel, a GEMM whose two operands differ in dtype (one of them float32) upcasts the
tiles of the half-precision operand to float32 right after their load (A_TO_F32 / B_TO_F32),
before the dropout, so dropout(x.to(f32)) is never rounded to x's dtype and the dot runs in
float32 (as torch.mm on the cast input would, TF32 included when torch allows it: an upcast
fp16/bf16 value is exact in TF32). The base GEMMs stay half-precision cuBLAS ones; the add
kernel's E @ F runs in its own (float32) dtype with its own precision (EPI_PRECISION), and the
sum is rounded once to x's dtype. bias may be in x's dtype or float32 (an effective bias
``bias + lora_B_bias * scaling`` with a float32 lora_B_bias is float32); it is added in fp32
either way. Any other mix of dtypes is a TypeError.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET as _INTERPRET, check_dtype as _check_dtype, choose_split as _choose_split
from ._common import dot_precision as _dot_precision, dropout_args as _dropout_args, grouped_tile as _grouped_tile
from ._common import keep_mask as _keep_mask, lora_term as _lora_term, mma as _mma, on_device as _on_device
from ._common import load_seed as _load_seed, num_sms as _num_sms, pow2 as _pow2
from ._common import round_to as _round_to


# ----------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dropout_tile(t, rows, cols, drop_scale, seed_lo, seed_hi, threshold, INTERPRET: tl.constexpr):
    """fastlora dropout of a loaded tile: float32(t) * keep * scale, rounded once to t's dtype
    (x * 0 rather than a select, so that a dropped inf/nan gives nan like the reference)."""
    keep = _keep_mask(rows, cols, seed_lo, seed_hi, threshold)
    t32 = t.to(tl.float32) * keep.to(tl.float32) * drop_scale
    return _round_to(t32, t.dtype, INTERPRET)


# ----------------------------------------------------------------------------------------------
# the kernel
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["M", "threshold"])
def _lora_gemm_kernel(
    a_ptr, b_ptr, c_ptr, seed_ptr,
    M, N, K, k_per_split,
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_cs, stride_cm, stride_cn,
    alpha, drop_scale, threshold,
    DROP_A: tl.constexpr, DROP_B: tl.constexpr,
    A_TO_F32: tl.constexpr, B_TO_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    if DROP_A or DROP_B:
        seed_lo, seed_hi = _load_seed(seed_ptr)
    else:
        seed_lo, seed_hi = 0, 0
    # Split-K: program_id(1) owns reduction range [k_lo, k_lo + k_per_split) (a multiple of
    # BLOCK_K, so splits never overlap) and writes its own fp32 partial plane of C.
    pid_s = tl.program_id(1)
    k_lo = pid_s * k_per_split
    k_hi = min(k_lo + k_per_split, K)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # int64 address arithmetic: row * stride can exceed 2**31 elements on large tensors.
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    b_cols = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_hi
        a = tl.load(a_rows + offs_k.to(tl.int64)[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_cols + offs_k.to(tl.int64)[:, None] * stride_bk,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        # Mixed precision: the half-precision operand of a GEMM with a float32 one is upcast
        # before its dropout, so that the dropped values are float32 (PEFT's x.to(f32)) and
        # the dot is a float32 one.
        if A_TO_F32:
            a = a.to(tl.float32)
        if B_TO_F32:
            b = b.to(tl.float32)
        # Dropout is applied to the loaded tile (masked-out padding is 0 and stays 0).
        if DROP_A:
            a = _dropout_tile(a, offs_m, offs_k, drop_scale, seed_lo, seed_hi, threshold, INTERPRET)
        if DROP_B:
            b = _dropout_tile(b, offs_k, offs_n, drop_scale, seed_lo, seed_hi, threshold, INTERPRET)
        acc = _mma(a, b, acc, DOT_PRECISION, INTERPRET)
    acc = acc * alpha
    c_ptrs = (c_ptr + pid_s.to(tl.int64) * stride_cs + offs_m.to(tl.int64)[:, None] * stride_cm
              + offs_n.to(tl.int64)[None, :] * stride_cn)
    tl.store(c_ptrs, _round_to(acc, c_ptr.dtype.element_ty, INTERPRET),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["M", "threshold"])
def _lora_add_kernel(
    c_ptr, bias_ptr, e_ptr, f_ptr, seed_ptr,
    M, N, R,
    stride_cm, stride_cn, stride_em, stride_er, stride_fr, stride_fn,
    lora_scale, drop_scale, threshold,
    DROP_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    EPI_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    """C += dropE(lora_scale * E @ F) (+ bias), in fp32 on C's rounded values, rounded once:
    the rank-r LoRA term added to a cuBLAS base product in place (E @ F in E's and F's dtype,
    which may differ from C's: float32 adapters under a half-precision base)."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    if DROP_LORA:
        seed_lo, seed_hi = _load_seed(seed_ptr)
    else:
        seed_lo, seed_hi = 0, 0
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    lora = _lora_term(e_ptr, f_ptr, offs_m, offs_n, mask_m, mask_n, R, stride_em, stride_er, stride_fr, stride_fn,
                      lora_scale, drop_scale, seed_lo, seed_hi, threshold,
                      BLOCK_M, BLOCK_N, BLOCK_R, DROP_LORA, False, EPI_PRECISION, INTERPRET)
    mask = mask_m[:, None] & mask_n[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    acc = tl.load(c_ptrs, mask=mask, other=0.0).to(tl.float32) + lora
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += bias[None, :]
    tl.store(c_ptrs, _round_to(acc, c_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit(do_not_specialize=["M", "threshold"])
def _lora_fwd_band_kernel(
    x_ptr, a_ptr, b_ptr, bias_ptr, y_ptr, xa_ptr, seed_ptr,
    M, N, K, R, n_per_chunk,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_ym, stride_yn, stride_xam, stride_xar,
    scaling, drop_scale, threshold,
    DROP: tl.constexpr, HAS_BIAS: tl.constexpr, X_TO_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    """The whole LoRA branch of the forward in one launch after the cuBLAS base product Y:

        xa[band]          = dropout(x[band]) @ A.T                    (stored by chunk 0)
        Y[band, chunk]   += scaling * xa[band] @ B[chunk].T (+ bias)  (fp32, rounded once)

    Program (band, chunk) owns BLOCK_M rows and a range of output columns. Every chunk of a band
    recomputes the band's xa (BLOCK_M x r, in registers) from x, which the band's programs read
    together from L2: a rank-r recomputation is cheaper than a second launch and an M x r round
    trip through memory."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    if DROP:
        seed_lo, seed_hi = _load_seed(seed_ptr)
    else:
        seed_lo, seed_hi = 0, 0
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    a_cols = a_ptr + offs_r.to(tl.int64)[None, :] * stride_ar  # A.T tiles (BLOCK_K, BLOCK_R)

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xt = tl.load(x_rows + offs_k.to(tl.int64)[None, :] * stride_xk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        at = tl.load(a_cols + offs_k.to(tl.int64)[:, None] * stride_ak,
                     mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        if X_TO_F32:  # float32 adapters: x upcast before its dropout (PEFT's x.to(f32))
            xt = xt.to(tl.float32)
        if DROP:
            xt = _dropout_tile(xt, offs_m, offs_k, drop_scale, seed_lo, seed_hi, threshold, INTERPRET)
        acc = _mma(xt, at, acc, DOT_PRECISION, INTERPRET)
    # xa is rounded to its dtype before the expand, as the reference's saved xa is.
    xa = _round_to(acc, xa_ptr.dtype.element_ty, INTERPRET)
    if pid_c == 0:
        xa_ptrs = xa_ptr + offs_m.to(tl.int64)[:, None] * stride_xam + offs_r.to(tl.int64)[None, :] * stride_xar
        tl.store(xa_ptrs, xa, mask=mask_m[:, None] & mask_r[None, :])

    n_lo = pid_c * n_per_chunk
    n_hi = min(n_lo + n_per_chunk, N)
    b_rows = b_ptr + offs_r.to(tl.int64)[:, None] * stride_br  # B.T tiles (BLOCK_R, BLOCK_N)
    y_rows = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_hi
        bt = tl.load(b_rows + offs_n.to(tl.int64)[None, :] * stride_bn,
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        lora = _mma(xa, bt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_PRECISION, INTERPRET)
        mask = mask_m[:, None] & mask_n[None, :]
        y_ptrs = y_rows + offs_n.to(tl.int64)[None, :] * stride_yn
        out = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32) + lora * scaling
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, _round_to(out, y_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit(do_not_specialize=["M", "threshold"])
def _lora_bwd_band_kernel(
    dy_ptr, x_ptr, a_ptr, b_ptr, xa_ptr, dx_ptr, ga_ptr, gb_ptr, seed_ptr,
    M, N, K, R, n_per_chunk, k_per_chunk,
    stride_dym, stride_dyn, stride_xm, stride_xk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_xam, stride_xar, stride_dxm, stride_dxk, stride_gband,
    scaling, drop_scale, threshold,
    DROP: tl.constexpr, NEED_DX: tl.constexpr, HALF_TO_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    """The LoRA branch of the backward in one launch after the cuBLAS dX = dY @ W:

        g[band]            = scaling * dY[band] @ B                (registers, adapter dtype)
        gB[band][n chunk]  = scaling * dY[band, n chunk].T @ xa[band]
        gA[band][k chunk]  = g[band].T @ dropout(x[band, k chunk])
        dX[band, k chunk] += dropout(g[band] @ A[:, k chunk])     (mask at x's index)

    Program (band, chunk) owns BLOCK_M rows and one chunk of the N and of the K columns. It
    reads its band of dY once for g (every chunk of a band recomputes g; the band's programs
    read dY together from L2) and writes its band's partial sums of grad_A (R x K, at ga_ptr)
    and grad_B (N x R, at gb_ptr), stride_gband apart: a later launch sums the bands in a fixed
    order (deterministic, no atomics), or with one band they are the gradients themselves."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    if DROP:
        seed_lo, seed_hi = _load_seed(seed_ptr)
    else:
        seed_lo, seed_hi = 0, 0
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    band = pid_m.to(tl.int64) * stride_gband
    xa_t = tl.load(xa_ptr + offs_m.to(tl.int64)[:, None] * stride_xam + offs_r.to(tl.int64)[None, :] * stride_xar,
                   mask=mask_m[:, None] & mask_r[None, :], other=0.0)

    dy_rows = dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym
    b_cols = b_ptr + offs_r.to(tl.int64)[None, :] * stride_br  # B tiles (BLOCK_N, BLOCK_R)
    n_lo = pid_c * n_per_chunk  # a multiple of BLOCK_N: a tile is in one chunk or not at all
    n_hi = n_lo + n_per_chunk
    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        dyt = tl.load(dy_rows + offs_n.to(tl.int64)[None, :] * stride_dyn,
                      mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        bt = tl.load(b_cols + offs_n.to(tl.int64)[:, None] * stride_bn,
                     mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        if HALF_TO_F32:  # float32 adapters: dY upcast (PEFT's grad in the adapters' dtype)
            dyt = dyt.to(tl.float32)
        g = _mma(dyt, bt, g, DOT_PRECISION, INTERPRET)
        if (n0 >= n_lo) & (n0 < n_hi):
            gb = _mma(tl.trans(dyt), xa_t, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32), DOT_PRECISION,
                      INTERPRET)
            gb_ptrs = gb_ptr + band + offs_n.to(tl.int64)[:, None] * R + offs_r[None, :]
            tl.store(gb_ptrs, _round_to(gb * scaling, gb_ptr.dtype.element_ty, INTERPRET),
                     mask=mask_n[:, None] & mask_r[None, :])
    # g is rounded to the adapters' dtype, as the reference's g (an operand of both products).
    g = _round_to(g * scaling, a_ptr.dtype.element_ty, INTERPRET)

    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    a_rows = a_ptr + offs_r.to(tl.int64)[:, None] * stride_ar  # A tiles (BLOCK_R, BLOCK_K)
    dx_rows = dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dxm
    k_lo = pid_c * k_per_chunk
    k_hi = min(k_lo + k_per_chunk, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_hi
        xt = tl.load(x_rows + offs_k.to(tl.int64)[None, :] * stride_xk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if HALF_TO_F32:
            xt = xt.to(tl.float32)
        if DROP:
            xt = _dropout_tile(xt, offs_m, offs_k, drop_scale, seed_lo, seed_hi, threshold, INTERPRET)
        ga = _mma(tl.trans(g), xt, tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32), DOT_PRECISION, INTERPRET)
        ga_ptrs = ga_ptr + band + offs_r.to(tl.int64)[:, None] * K + offs_k[None, :]
        tl.store(ga_ptrs, _round_to(ga, ga_ptr.dtype.element_ty, INTERPRET), mask=mask_r[:, None] & mask_k[None, :])
        if NEED_DX:
            at = tl.load(a_rows + offs_k.to(tl.int64)[None, :] * stride_ak,
                         mask=mask_r[:, None] & mask_k[None, :], other=0.0)
            t = _mma(g, at, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), DOT_PRECISION, INTERPRET)
            if DROP:
                keep = _keep_mask(offs_m, offs_k, seed_lo, seed_hi, threshold)
                t = t * keep.to(tl.float32) * drop_scale
            mask = mask_m[:, None] & mask_k[None, :]
            dx_ptrs = dx_rows + offs_k.to(tl.int64)[None, :] * stride_dxk
            out = tl.load(dx_ptrs, mask=mask, other=0.0).to(tl.float32) + t
            tl.store(dx_ptrs, _round_to(out, dx_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _band_sum_kernel(part_ptr, ga_ptr, gb_ptr, n_bands, RK, total, stride_band,
                     BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    """grad_A (R x K, flat) and grad_B (N x R, flat) from the bands' fp32 partial sums, laid
    out [band, R*K + N*R]: summed in band order (deterministic), rounded once."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for b in range(0, n_bands):
        acc += tl.load(part_ptr + b * stride_band + offs, mask=mask, other=0.0)
    in_a = offs < RK
    tl.store(ga_ptr + offs, _round_to(acc, ga_ptr.dtype.element_ty, INTERPRET), mask=mask & in_a)
    tl.store(gb_ptr + (offs - RK), _round_to(acc, gb_ptr.dtype.element_ty, INTERPRET), mask=mask & (offs >= RK))

# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
def _blocks(M: int, N: int, K: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for a loop over K in ``dtype``
    (float32 when either operand is float32, the other then being upcast in registers).

    GPU (H100): 128x128x64 tiles for fp16/bf16 (the usual tensor-core sweet spot: 32 KiB of
    operands per pipeline stage, 3 stages, 8 warps); fp32 runs as IEEE FMA or TF32 with half
    the tile edges so registers and shared memory stay bounded. Dims smaller than a tile
    (r-sized outputs, tiny M at decode time) shrink to the next power of two, never below 16
    (tl.dot's minimum on the tensor cores); ragged edges are handled by masks.
    Interpreter: one large tile per program so that the small test shapes run in one program
    and one loop trip (the interpreter costs milliseconds per program per loop iteration)."""
    if _INTERPRET:
        return _pow2(M, 16, 128), _pow2(N, 16, 128), _pow2(K, 16, 256), 4, 1
    if dtype == torch.float32:
        cap_mn, cap_k = 64, 32
    else:
        cap_mn, cap_k = 128, 64
    bm, bn, bk = _pow2(M, 16, cap_mn), _pow2(N, 16, cap_mn), _pow2(K, 16, cap_k)
    num_warps = 8 if bm * bn >= 128 * 128 else 4
    return bm, bn, bk, num_warps, 3


def _gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, alpha: float = 1.0,
          drop_a=None, drop_b=None) -> torch.Tensor:
    """out (M, N) = alpha * dropA(a) (M, K) @ dropB(b) (K, N).

    drop_a / drop_b: (p, seed) or None. All operands are strided 2-D views; out is written in
    place. a and b may differ in dtype only if one of them is float32: the other one is then
    upcast tile by tile (before its dropout) and the loop is a float32 GEMM."""
    if a.dtype != b.dtype and torch.float32 not in (a.dtype, b.dtype):
        raise TypeError(f"operands {a.dtype} and {b.dtype}: a mixed GEMM needs one float32 side")
    a_to_f32 = a.dtype != b.dtype and a.dtype != torch.float32
    b_to_f32 = a.dtype != b.dtype and b.dtype != torch.float32
    main_dtype = torch.float32 if (a_to_f32 or b_to_f32) else a.dtype
    M, K = a.shape
    N = b.shape[1]
    if out.numel() == 0:
        return out
    assert drop_a is None or drop_b is None, "one dropout mask per launch"
    drop = drop_a if drop_a is not None else drop_b
    seed, threshold, drop_scale = _dropout_args(*drop, a.device) if drop is not None else (a, 0, 1.0)

    bm, bn, bk, num_warps, num_stages = _blocks(M, N, K, main_dtype)
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    split = _choose_split(tiles, K, bk, a.device)
    k_per_split = triton.cdiv(triton.cdiv(max(K, 1), split), bk) * bk
    split = max(1, triton.cdiv(K, k_per_split))
    if split > 1:
        # Deterministic split-K: each split writes an fp32 partial plane, summed afterwards.
        c = torch.empty((split, M, N), dtype=torch.float32, device=out.device)
        stride_cs, stride_cm, stride_cn = c.stride()
    else:
        c = out
        stride_cs, (stride_cm, stride_cn) = 0, out.stride()

    with _on_device(a.device):
        _lora_gemm_kernel[(tiles, split)](
            a, b, c, seed,
            M, N, K, k_per_split,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            stride_cs, stride_cm, stride_cn,
            float(alpha), float(drop_scale), threshold,
            DROP_A=drop_a is not None, DROP_B=drop_b is not None,
            A_TO_F32=a_to_f32, B_TO_F32=b_to_f32,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
            DOT_PRECISION=_dot_precision(main_dtype), INTERPRET=_INTERPRET,
            num_warps=num_warps, num_stages=num_stages,
        )
    if split > 1:
        if out.dtype == torch.float32 and out.is_contiguous():
            torch.sum(c, 0, out=out)  # one launch where the sum and a copy took two
        else:
            out.copy_(c.sum(0))
    return out


def _add_lora(out: torch.Tensor, e: torch.Tensor, f: torch.Tensor, lora_scale: float, drop=None,
              bias=None) -> torch.Tensor:
    """out (M, N) += dropE(lora_scale * e (M, R) @ f (R, N)) (+ bias (N,)), in place, in fp32
    on out's values and rounded once. drop: (p, seed) or None, the mask at out's index."""
    if e.dtype != f.dtype:
        raise TypeError(f"LoRA term operands {e.dtype} and {f.dtype} must share a dtype")
    M, N = out.shape
    R = e.shape[1]
    if out.numel() == 0:
        return out
    seed, threshold, drop_scale = _dropout_args(*drop, out.device) if drop is not None else (out, 0, 1.0)
    bm, bn, br, num_warps, num_stages = _blocks(M, N, R, e.dtype)
    if e.dtype == torch.float32 and out.dtype != torch.float32:
        # float32 adapters under a half-precision base: the float32 E / F chunks of a 128 x 128
        # tile would take twice a half-precision loop's shared memory per stage at 64 wide.
        br = min(br, 32)
    bias_t = bias if bias is not None else out  # a dummy: never dereferenced without HAS_BIAS
    with _on_device(out.device):
        _lora_add_kernel[(triton.cdiv(M, bm) * triton.cdiv(N, bn),)](
            out, bias_t, e, f, seed,
            M, N, R,
            out.stride(0), out.stride(1), e.stride(0), e.stride(1), f.stride(0), f.stride(1),
            float(lora_scale), float(drop_scale), threshold,
            DROP_LORA=drop is not None, HAS_BIAS=bias is not None,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br, GROUP_M=8,
            EPI_PRECISION=_dot_precision(e.dtype), INTERPRET=_INTERPRET,
            num_warps=num_warps, num_stages=num_stages,
        )
    return out


# The rank-r work of a forward (backward) runs as one band kernel (two: the band kernel and
# the band sum) for padded ranks up to this; above it the band's rank-r tiles would not fit in
# registers, and the launchers use the separate rank-r GEMMs and the add kernel.
BAND_MAX_RANK = 128


def _band_plan(M: int, N: int, K: int, R: int, dtype: torch.dtype, device: torch.device,
               backward: bool = False):
    """(BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, chunks, num_warps, num_stages) of the band kernels
    for M rows, N outputs, K inputs, rank R, computed in ``dtype`` (float32 when the adapters
    are); for the backward, None where its partial sums would outgrow dY (backward_band_rows).

    A band is BLOCK_M rows; each band is split into ``chunks`` programs over the columns so that
    a layer's few bands still fill the GPU (~one program per SM), at the price of recomputing
    the band's rank-r product (xa, g) once per chunk: at most 8 chunks, and never more than the
    column tiles. The tiles are the ones the sm_90 compile check accepts, to be tuned on a GPU.
    Interpreter: one band, one chunk, large tiles (it costs milliseconds per program and trip);
    tests force the multi-band, multi-chunk paths by monkeypatching this function."""
    br = _pow2(R, 16, BAND_MAX_RANK)
    if _INTERPRET:
        return _pow2(M, 16, 128), _pow2(N, 16, 128), _pow2(K, 16, 256), br, 1, 4, 1
    if dtype == torch.float32:
        bm, bnk = 32, 32
    else:
        bm, bnk = 64, 64
    bm = _pow2(M, 16, bm)
    if backward:
        # (float32 tiles of 128-row bands spill registers on sm_90: at most 32 rows there)
        bm = backward_band_rows(M, N, K, R, bm, bm if dtype == torch.float32 else 128)
        if bm is None:
            return None
    bn, bk = _pow2(N, 16, bnk), _pow2(K, 16, bnk)
    bands = triton.cdiv(M, bm)
    col_tiles = min(triton.cdiv(N, bn), triton.cdiv(K, bk))
    chunks = max(1, min(8, col_tiles, triton.cdiv(_num_sms(device), bands)))
    # 4 warps spill the float32 rank tiles at r = 128, and 128-row bands (sm_90 compile)
    num_warps = 8 if br >= 64 or bm >= 128 else 4
    return bm, bn, bk, br, chunks, num_warps, 2


def backward_band_rows(M: int, N: int, K: int, R: int, block_m: int, tallest: int):
    """Rows per band of the backward: block_m, or ``tallest`` where block_m-row bands' float32
    partial sums (bands x R x (K + N) values) would be more values than dY (M x N): with K = N
    that is bands of fewer than 2R rows. None where the tallest bands are not enough either: the
    launcher then takes the split-K GEMMs, whose partial planes stay small. The partials' size
    is so bounded by dY's at any token count."""
    for bm in (block_m, tallest):
        bands = triton.cdiv(M, bm)
        if bands == 1 or bands * R * (K + N) <= M * N:
            return bm
    return None


def _chunk(n: int, chunks: int, block: int) -> int:
    """Columns per chunk: a multiple of block, so that a tile never straddles two chunks."""
    return triton.cdiv(triton.cdiv(max(n, 1), chunks), block) * block


def _forward_band(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    # The base product in cuBLAS; the bias is added in fp32 with the LoRA term (one rounding).
    y = torch.mm(x, weight.t())
    xa = torch.empty((M, R), dtype=lora_A.dtype, device=x.device)
    if M == 0:
        return y, xa
    drop = (float(dropout_p), seed) if dropout_p > 0.0 else None
    seed_t, threshold, drop_scale = _dropout_args(*drop, x.device) if drop is not None else (x, 0, 1.0)
    bm, bn, bk, br, chunks, num_warps, num_stages = _band_plan(M, N, K, R, lora_A.dtype, x.device)
    n_per_chunk = _chunk(N, chunks, bn)
    chunks = max(1, triton.cdiv(N, n_per_chunk))
    bias_t = bias if bias is not None else y  # a dummy: never dereferenced without HAS_BIAS
    with _on_device(x.device):
        _lora_fwd_band_kernel[(triton.cdiv(M, bm), chunks)](
            x, lora_A, lora_B, bias_t, y, xa, seed_t,
            M, N, K, R, n_per_chunk,
            x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
            y.stride(0), y.stride(1), xa.stride(0), xa.stride(1),
            float(scaling), float(drop_scale), threshold,
            DROP=drop is not None, HAS_BIAS=bias is not None, X_TO_F32=x.dtype != lora_A.dtype,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br,
            DOT_PRECISION=_dot_precision(lora_A.dtype), INTERPRET=_INTERPRET,
            num_warps=num_warps, num_stages=num_stages,
        )
    return y, xa


def _backward_band(grad_y, x, lora_A, lora_B, xa, scaling, drop, grad_x, plan):
    """(grad_A, grad_B), and grad_x (the cuBLAS dY @ W, or None) updated in place; plan from
    _band_plan(..., backward=True)."""
    M, N = grad_y.shape
    K, R = x.shape[1], lora_A.shape[0]
    dev, ad = grad_y.device, lora_A.dtype
    if M == 0:  # sums over no rows
        return torch.zeros((R, K), dtype=ad, device=dev), torch.zeros((N, R), dtype=ad, device=dev)
    grad_A = torch.empty((R, K), dtype=ad, device=dev)
    grad_B = torch.empty((N, R), dtype=ad, device=dev)
    seed_t, threshold, drop_scale = _dropout_args(*drop, dev) if drop is not None else (x, 0, 1.0)
    bm, bn, bk, br, chunks, num_warps, num_stages = plan
    n_per_chunk, k_per_chunk = _chunk(N, chunks, bn), _chunk(K, chunks, bk)
    chunks = max(1, triton.cdiv(N, n_per_chunk), triton.cdiv(K, k_per_chunk))
    bands = triton.cdiv(M, bm)
    if bands == 1:
        # One band: its sums are the gradients.
        ga, gb, stride_band, part = grad_A, grad_B, 0, None
    else:
        part = torch.empty((bands, R * K + N * R), dtype=torch.float32, device=dev)
        ga, gb, stride_band = part, part[:, R * K:], part.stride(0)
    dx = grad_x if grad_x is not None else grad_y  # a dummy: never dereferenced without NEED_DX
    with _on_device(dev):
        _lora_bwd_band_kernel[(bands, chunks)](
            grad_y, x, lora_A, lora_B, xa, dx, ga, gb, seed_t,
            M, N, K, R, n_per_chunk, k_per_chunk,
            grad_y.stride(0), grad_y.stride(1), x.stride(0), x.stride(1),
            lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
            xa.stride(0), xa.stride(1), dx.stride(0), dx.stride(1), stride_band,
            float(scaling), float(drop_scale), threshold,
            DROP=drop is not None, NEED_DX=grad_x is not None, HALF_TO_F32=x.dtype != ad,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br,
            DOT_PRECISION=_dot_precision(ad), INTERPRET=_INTERPRET,
            num_warps=num_warps, num_stages=num_stages,
        )
        if part is not None:
            total, block = part.shape[1], 1024
            _band_sum_kernel[(triton.cdiv(total, block),)](
                part, grad_A, grad_B, bands, R * K, total, part.stride(0),
                BLOCK=block, INTERPRET=_INTERPRET, num_warps=4, num_stages=1)
    return grad_A, grad_B

# ----------------------------------------------------------------------------------------------
# public launchers (2-D tensors; shapes and devices validated by the caller)
# ----------------------------------------------------------------------------------------------
_HALF = (torch.float16, torch.bfloat16)


def _check_dtypes(base: dict, adapters: dict, bias=None) -> None:
    """The dtype combinations the launchers take: every tensor in one dtype, or PEFT's mixed
    precision (base tensors float16/bfloat16, adapter-side tensors float32). bias may be in
    the base dtype or float32 (it is added in fp32). ``base`` / ``adapters``: name -> tensor."""
    _check_dtype(*base.values(), *adapters.values(), bias)
    xd = next(iter(base.values())).dtype
    ad = next(iter(adapters.values())).dtype
    ok = (all(t.dtype == xd for t in base.values())
          and all(t.dtype == ad for t in adapters.values())
          and (ad == xd or (xd in _HALF and ad == torch.float32))
          and (bias is None or bias.dtype in (xd, torch.float32)))
    if not ok:
        got = ", ".join(f"{n}={t.dtype}" for n, t in (*base.items(), *adapters.items(),
                                                      *((("bias", bias),) if bias is not None else ())))
        raise TypeError(
            f"fastlora Triton LoRA kernels take {', '.join(base)} in one dtype and "
            f"{', '.join(adapters)} either in that dtype or in float32 when it is float16 or "
            f"bfloat16 (PEFT's mixed precision); bias, if any, in the first dtype or float32. "
            f"Got {got}")


def lora_shrink(x: torch.Tensor, lora_A: torch.Tensor, dropout_p: float, seed) -> torch.Tensor:
    """xa (M, r) = dropout(x.to(lora_A.dtype)) @ lora_A.T, the dropout mask generated in-kernel.

    x (M, K), lora_A (r, K); output in lora_A.dtype (x's dtype, or float32 for float32
    adapters under a half-precision x), fp32 accumulation."""
    _check_dtypes({"x": x}, {"lora_A": lora_A})
    out = torch.empty((x.shape[0], lora_A.shape[0]), dtype=lora_A.dtype, device=x.device)
    drop = (float(dropout_p), seed) if dropout_p > 0.0 else None
    return _gemm(x, lora_A.t(), out, drop_a=drop)


def lora_forward(x: torch.Tensor, weight: torch.Tensor, bias, xa: torch.Tensor,
                 lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """y (M, N) = x @ weight.T + bias + scaling * (xa @ lora_B.T).

    x (M, K), weight (N, K), bias (N,) or None, xa (M, r), lora_B (N, r). The base product in
    cuBLAS, then the LoRA expand and the bias added to it in fp32 by the add kernel (one more
    rounding); y is in x's dtype. xa and lora_B may be float32 under a half-precision x (then
    the expand is a float32 dot), bias may be float32."""
    _check_dtypes({"x": x, "weight": weight}, {"xa": xa, "lora_B": lora_B}, bias)
    y = torch.mm(x, weight.t())
    return _add_lora(y, xa, lora_B.t(), float(scaling), bias=bias)


def lora_linear_forward(x: torch.Tensor, weight: torch.Tensor, bias, lora_A: torch.Tensor,
                        lora_B: torch.Tensor, scaling: float, dropout_p: float, seed):
    """(y, xa) of the LoRA forward: xa = dropout(x) @ lora_A.T and y = x @ weight.T + bias +
    scaling * xa @ lora_B.T, what lora_shrink then lora_forward give, in two launches: the
    cuBLAS base product and one band kernel for the whole LoRA branch (ranks up to
    BAND_MAX_RANK; above it the separate shrink and add kernels)."""
    _check_dtypes({"x": x, "weight": weight}, {"lora_A": lora_A, "lora_B": lora_B}, bias)
    if _pow2(lora_A.shape[0], 16, 1 << 30) > BAND_MAX_RANK:
        xa = lora_shrink(x, lora_A, dropout_p, seed)
        return lora_forward(x, weight, bias, xa, lora_B, scaling), xa
    return _forward_band(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


def lora_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                  lora_A: torch.Tensor, lora_B: torch.Tensor, xa: torch.Tensor,
                  scaling: float, dropout_p: float, seed,
                  need_grad_x: bool, need_grad_weight: bool, need_grad_bias: bool):
    """(grad_x, grad_weight, grad_bias, grad_A, grad_B) of lora_forward with the dropout of
    lora_shrink; entries not requested are ``grad_y.new_empty(0)`` (grad_A and grad_B are
    always computed). Semantics of ``fastlora.reference.lora_linear_backward``.

    With float32 adapters (lora_A, lora_B, xa) under a float16/bfloat16 grad_y, x, weight:
    g, grad_A and grad_B are float32 (grad_y and x tiles upcast before the dot and the
    dropout), grad_x, grad_weight and grad_bias are in x's dtype."""
    _check_dtypes({"grad_y": grad_y, "x": x, "weight": weight},
                  {"lora_A": lora_A, "lora_B": lora_B, "xa": xa})
    M, N = grad_y.shape
    K = x.shape[1]
    r = lora_A.shape[0]
    dev, ad = grad_y.device, lora_A.dtype
    drop = (float(dropout_p), seed) if dropout_p > 0.0 else None

    empty = grad_y.new_empty(0)
    grad_w = torch.mm(grad_y.t(), x) if need_grad_weight else empty
    grad_b = grad_y.sum(0) if need_grad_bias else empty
    plan = _band_plan(M, N, K, r, ad, dev, backward=True) if _pow2(r, 16, 1 << 30) <= BAND_MAX_RANK else None
    if plan is not None:
        # Three launches with grad_x: cuBLAS dY @ W, the band kernel, the band sum.
        grad_x = torch.mm(grad_y, weight) if need_grad_x else None
        grad_A, grad_B = _backward_band(grad_y, x, lora_A, lora_B, xa, scaling, drop, grad_x, plan)
        return (empty if grad_x is None else grad_x), grad_w, grad_b, grad_A, grad_B

    # Ranks above BAND_MAX_RANK (or bands whose partials would outgrow dY): the rank-r GEMMs one
    # by one.
    # g = scaling * grad_y @ lora_B (M, r): computed once, rounded to the adapters' dtype (as
    # the reference does; it is an operand of the two kernels below).
    g = _gemm(grad_y, lora_B, torch.empty((M, r), dtype=ad, device=dev), alpha=scaling)
    # grad_A (r, K) = g.T @ dropout(x): the mask is regenerated on the x tiles.
    grad_A = _gemm(g.t(), x, torch.empty((r, K), dtype=ad, device=dev), drop_b=drop)
    # grad_B (N, r) = scaling * grad_y.T @ xa.
    grad_B = _gemm(grad_y.t(), xa, torch.empty((N, r), dtype=ad, device=dev), alpha=scaling)

    grad_x = empty
    if need_grad_x:
        # grad_x (M, K) = grad_y @ weight (cuBLAS) + dropout(g @ lora_A) (the add kernel, the
        # mask at the output index (m, k), which is x's index, with the same 1/(1-p) scale).
        grad_x = _add_lora(torch.mm(grad_y, weight), g, lora_A, 1.0, drop=drop)
    return grad_x, grad_w, grad_b, grad_A, grad_B
