"""Triton kernels of fastlora's LoRA Linear (forward and backward).

A leaf module: it imports only torch, triton and math, never fastlora, so that it can be
loaded (and tested under ``TRITON_INTERPRET=1``) on its own. Semantics are those of
``fastlora.reference``; in particular the dropout keep-mask is fastlora's counter-based hash
(MurmurHash3 fmix32 of the (row, column) index and the seed), regenerated inside every kernel
that needs it, so the dropped input is never materialised and forward and backward agree bit
for bit with the reference and with the C++ kernels.

The two base products (``x @ weight.T``, ``grad_y @ weight``) are cuBLAS GEMMs (torch.mm): an
untuned Triton GEMM runs them at an estimated 65-85% of cuBLAS, which alone would cost more
than the whole LoRA branch. The rank-r work runs in two Triton kernels. ``_lora_gemm_kernel``,
for the products with a short output side:

    C[m, n] = alpha * sum_k A'[m, k] * B'[k, n]

where A' (B') is A (B) passed through fastlora's dropout when DROP_A (DROP_B) is set, using
the operand's own (row, column) index for the mask. ``_lora_add_kernel``, the light kernel that
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
from ._common import load_seed as _load_seed, pow2 as _pow2
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
@triton.jit(do_not_specialize=["threshold"])
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


@triton.jit(do_not_specialize=["threshold"])
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

    # g = scaling * grad_y @ lora_B (M, r): computed once, rounded to the adapters' dtype (as
    # the reference does; it is an operand of the two kernels below).
    g = _gemm(grad_y, lora_B, torch.empty((M, r), dtype=ad, device=dev), alpha=scaling)
    # grad_A (r, K) = g.T @ dropout(x): the mask is regenerated on the x tiles.
    grad_A = _gemm(g.t(), x, torch.empty((r, K), dtype=ad, device=dev), drop_b=drop)
    # grad_B (N, r) = scaling * grad_y.T @ xa.
    grad_B = _gemm(grad_y.t(), xa, torch.empty((N, r), dtype=ad, device=dev), alpha=scaling)

    empty = grad_y.new_empty(0)
    grad_x = empty
    if need_grad_x:
        # grad_x (M, K) = grad_y @ weight (cuBLAS) + dropout(g @ lora_A) (the add kernel, the
        # mask at the output index (m, k), which is x's index, with the same 1/(1-p) scale).
        grad_x = _add_lora(torch.mm(grad_y, weight), g, lora_A, 1.0, drop=drop)
    grad_w = torch.mm(grad_y.t(), x) if need_grad_weight else empty
    grad_b = grad_y.sum(0) if need_grad_bias else empty
    return grad_x, grad_w, grad_b, grad_A, grad_B
