"""Triton kernels of fastlora's LoRA Linear (forward and backward).

A leaf module: it imports only torch, triton and math, never fastlora, so that it can be
loaded (and tested under ``TRITON_INTERPRET=1``) on its own. Semantics are those of
``fastlora.reference``; in particular the dropout keep-mask is fastlora's counter-based hash
(MurmurHash3 fmix32 of the (row, column) index and the seed), regenerated inside every kernel
that needs it, so the dropped input is never materialised and forward and backward agree bit
for bit with the reference and with the C++ kernels.

Every GEMM here is one generic kernel, ``_lora_gemm_kernel``:

    C[m, n] = alpha * sum_k A'[m, k] * B'[k, n]
              (+ bias[n])
              (+ dropE(lora_scale * sum_j E[m, j] * F[j, n]))

where A' (B') is A (B) passed through fastlora's dropout when DROP_A (DROP_B) is set, using
the operand's own (row, column) index for the mask, and dropE applies the mask at the output
index (m, n). Operands are strided 2-D views, so transposes (``weight.t()``) cost nothing.
The launchers map the LoRA ops onto it:

    lora_shrink    xa     = dropA(x) @ lora_A.T
    lora_forward   y      = x @ weight.T + bias + scaling * (xa @ lora_B.T)
    lora_backward  g      = scaling * grad_y @ lora_B                 (M, r), once, reused
                   grad_A = g.T @ dropB(x)                            (mask regenerated)
                   grad_B = scaling * grad_y.T @ xa
                   grad_x = grad_y @ weight + dropE(g @ lora_A)        (LoRA in the epilogue)

grad_weight (grad_y.T @ x) and grad_bias (grad_y.sum(0)) are plain cuBLAS / ATen work.

Numerics: operands are fed to tl.dot in their own dtype (fp16/bf16 tensor cores; fp32 uses
IEEE fp32 unless torch allows TF32 for matmuls), accumulation is always fp32 and each output is
rounded once. Dropped operands are rounded to the input dtype before the dot exactly as the
reference's ``dropout`` rounds them. float64 is not supported (use the reference path).

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
fp16/bf16 value is exact in TF32). The base GEMMs keep their half-precision tensor
core main loop; the epilogue's E @ F runs in its own (float32) dtype with its own precision
(EPI_PRECISION), and the sum is rounded once to x's dtype. bias may be in x's dtype or
float32 (an effective bias ``bias + lora_B_bias * scaling`` with a float32 lora_B_bias is
float32); it is added in fp32 either way. Any other mix of dtypes is a TypeError.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET as _INTERPRET, check_dtype as _check_dtype, choose_split as _choose_split
from ._common import dot_precision as _dot_precision, dropout_args as _dropout_args, grouped_tile as _grouped_tile
from ._common import keep_mask as _keep_mask, mma as _mma, on_device as _on_device, pow2 as _pow2
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
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "threshold"])
def _lora_gemm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, e_ptr, f_ptr,
    M, N, K, R, k_per_split,
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_cs, stride_cm, stride_cn,
    stride_em, stride_er, stride_fr, stride_fn,
    alpha, lora_scale, drop_scale, seed_lo, seed_hi, threshold,
    DROP_A: tl.constexpr, DROP_B: tl.constexpr, DROP_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
    A_TO_F32: tl.constexpr, B_TO_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EPI_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
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

    # Epilogue: the rank-r LoRA expand (E @ F, r <= 256 so a short loop of BLOCK_R chunks),
    # its optional dropout at the output index, then the bias; all in fp32 before one rounding.
    # E and F share a dtype that may differ from the main loop's (float32 adapters under a
    # half-precision base), hence EPI_PRECISION.
    if HAS_LORA:
        e_rows = e_ptr + offs_m.to(tl.int64)[:, None] * stride_em
        f_cols = f_ptr + offs_n.to(tl.int64)[None, :] * stride_fn
        lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            e = tl.load(e_rows + offs_r.to(tl.int64)[None, :] * stride_er,
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            f = tl.load(f_cols + offs_r.to(tl.int64)[:, None] * stride_fr,
                        mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            lora = _mma(e, f, lora, EPI_PRECISION, INTERPRET)
        lora = lora * lora_scale
        if DROP_LORA:
            keep = _keep_mask(offs_m, offs_n, seed_lo, seed_hi, threshold)
            lora = lora * keep.to(tl.float32) * drop_scale
        acc += lora
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += bias[None, :]

    c_ptrs = (c_ptr + pid_s.to(tl.int64) * stride_cs + offs_m.to(tl.int64)[:, None] * stride_cm
              + offs_n.to(tl.int64)[None, :] * stride_cn)
    tl.store(c_ptrs, _round_to(acc, c_ptr.dtype.element_ty, INTERPRET),
             mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
def _blocks(M: int, N: int, K: int, R: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, num_warps, num_stages) for a main loop in ``dtype``
    (float32 when either operand is float32, the other then being upcast in registers).

    GPU (H100): 128x128x64 tiles for fp16/bf16 (the usual tensor-core sweet spot: 32 KiB of
    operands per pipeline stage, 3 stages, 8 warps); fp32 runs as IEEE FMA or TF32 with half
    the tile edges so registers and shared memory stay bounded. Dims smaller than a tile
    (r-sized outputs, tiny M at decode time) shrink to the next power of two, never below 16
    (tl.dot's minimum on the tensor cores); ragged edges are handled by masks.
    Interpreter: one large tile per program so that the small test shapes run in one program
    and one loop trip (the interpreter costs milliseconds per program per loop iteration)."""
    if _INTERPRET:
        return _pow2(M, 16, 128), _pow2(N, 16, 128), _pow2(K, 16, 128), _pow2(R, 16, 256), 4, 1
    if dtype == torch.float32:
        cap_mn, cap_k = 64, 32
    else:
        cap_mn, cap_k = 128, 64
    bm, bn, bk = _pow2(M, 16, cap_mn), _pow2(N, 16, cap_mn), _pow2(K, 16, cap_k)
    br = _pow2(R, 16, 64)  # epilogue chunk of the rank (r <= 256 -> at most 4 trips)
    num_warps = 8 if bm * bn >= 128 * 128 else 4
    return bm, bn, bk, br, num_warps, 3


def _gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, alpha: float = 1.0,
          drop_a=None, drop_b=None, bias=None, lora=None) -> torch.Tensor:
    """out (M, N) = alpha * dropA(a) (M, K) @ dropB(b) (K, N) [+ bias] [+ LoRA epilogue].

    drop_a / drop_b: (p, seed) or None. lora: (e (M, R), f (R, N), lora_scale, drop) with drop
    (p, seed) or None. All operands are strided 2-D views; out is written in place.

    a and b may differ in dtype only if one of them is float32: the other one is then upcast
    tile by tile (before its dropout) and the main loop is a float32 GEMM. e and f share one
    dtype, which may differ from the main loop's."""
    if a.dtype != b.dtype and torch.float32 not in (a.dtype, b.dtype):
        raise TypeError(f"operands {a.dtype} and {b.dtype}: a mixed GEMM needs one float32 side")
    a_to_f32 = a.dtype != b.dtype and a.dtype != torch.float32
    b_to_f32 = a.dtype != b.dtype and b.dtype != torch.float32
    main_dtype = torch.float32 if (a_to_f32 or b_to_f32) else a.dtype
    M, K = a.shape
    N = b.shape[1]
    if out.numel() == 0:
        return out
    drop_a = _dropout_args(*drop_a) if drop_a is not None else None
    drop_b = _dropout_args(*drop_b) if drop_b is not None else None
    e = f = None
    lora_scale, drop_e, R = 1.0, None, 1
    if lora is not None:
        e, f, lora_scale, drop_e = lora
        if e.dtype != f.dtype:
            raise TypeError(f"LoRA epilogue operands {e.dtype} and {f.dtype} must share a dtype")
        drop_e = _dropout_args(*drop_e) if drop_e is not None else None
        R = e.shape[1]
    dargs = [d for d in (drop_a, drop_b, drop_e) if d is not None]
    assert len(dargs) <= 1, "one dropout mask per launch"
    seed_lo, seed_hi, threshold, drop_scale = dargs[0] if dargs else (0, 0, 0, 1.0)

    bm, bn, bk, br, num_warps, num_stages = _blocks(M, N, K, R, main_dtype)
    if lora is not None and e.dtype == torch.float32 and main_dtype != torch.float32:
        # A float32 epilogue under a half-precision main loop's 128x128 tile: its pipelined
        # (bm + bn) x br float32 chunks would take twice the main loop's shared memory per
        # stage at br = 64 (192 KiB for TF32 on sm_90); 32 keeps them at the main loop's size.
        br = min(br, 32)
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    split = 1
    if bias is None and lora is None:  # the epilogue must run once per output element
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
    e_t = e if e is not None else a  # dummies: never dereferenced when the flag is off
    f_t = f if f is not None else a
    bias_t = bias if bias is not None else a

    with _on_device(a.device):
        _lora_gemm_kernel[(tiles, split)](
            a, b, c, bias_t, e_t, f_t,
            M, N, K, R, k_per_split,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            stride_cs, stride_cm, stride_cn,
            e_t.stride(0), e_t.stride(1), f_t.stride(0), f_t.stride(1),
            float(alpha), float(lora_scale), float(drop_scale), seed_lo, seed_hi, threshold,
            DROP_A=drop_a is not None, DROP_B=drop_b is not None, DROP_LORA=drop_e is not None,
            HAS_BIAS=bias is not None, HAS_LORA=lora is not None,
            A_TO_F32=a_to_f32, B_TO_F32=b_to_f32,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br, GROUP_M=8,
            DOT_PRECISION=_dot_precision(main_dtype),
            EPI_PRECISION=_dot_precision(e.dtype if e is not None else main_dtype),
            INTERPRET=_INTERPRET,
            num_warps=num_warps, num_stages=num_stages,
        )
    if split > 1:
        out.copy_(c.sum(0))
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


def lora_shrink(x: torch.Tensor, lora_A: torch.Tensor, dropout_p: float, seed: int) -> torch.Tensor:
    """xa (M, r) = dropout(x.to(lora_A.dtype)) @ lora_A.T, the dropout mask generated in-kernel.

    x (M, K), lora_A (r, K); output in lora_A.dtype (x's dtype, or float32 for float32
    adapters under a half-precision x), fp32 accumulation."""
    _check_dtypes({"x": x}, {"lora_A": lora_A})
    out = torch.empty((x.shape[0], lora_A.shape[0]), dtype=lora_A.dtype, device=x.device)
    drop = (float(dropout_p), int(seed)) if dropout_p > 0.0 else None
    return _gemm(x, lora_A.t(), out, drop_a=drop)


def lora_forward(x: torch.Tensor, weight: torch.Tensor, bias, xa: torch.Tensor,
                 lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """y (M, N) = x @ weight.T + bias + scaling * (xa @ lora_B.T) in one kernel.

    x (M, K), weight (N, K), bias (N,) or None, xa (M, r), lora_B (N, r). The LoRA expand
    and the bias run in the GEMM's epilogue on the fp32 accumulator (one rounding); y is in
    x's dtype. xa and lora_B may be float32 under a half-precision x (then the expand is a
    float32 dot), bias may be float32."""
    _check_dtypes({"x": x, "weight": weight}, {"xa": xa, "lora_B": lora_B}, bias)
    out = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    return _gemm(x, weight.t(), out, bias=bias, lora=(xa, lora_B.t(), float(scaling), None))


def lora_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                  lora_A: torch.Tensor, lora_B: torch.Tensor, xa: torch.Tensor,
                  scaling: float, dropout_p: float, seed: int,
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
    dev, dt, ad = grad_y.device, grad_y.dtype, lora_A.dtype
    drop = (float(dropout_p), int(seed)) if dropout_p > 0.0 else None

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
        # grad_x (M, K) = grad_y @ weight + dropout(g @ lora_A): LoRA term in the epilogue,
        # masked at the output index (m, k), which is x's index, with the same 1/(1-p) scale.
        grad_x = _gemm(grad_y, weight, torch.empty((M, K), dtype=dt, device=dev),
                       lora=(g, lora_A, 1.0, drop))
    grad_w = torch.mm(grad_y.t(), x) if need_grad_weight else empty
    grad_b = grad_y.sum(0) if need_grad_bias else empty
    return grad_x, grad_w, grad_b, grad_A, grad_B
