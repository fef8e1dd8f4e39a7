"""Triton kernels of fastlora's LoRA over a quantized, frozen base weight (QLoRA).

A leaf module: it imports only torch, triton and ``_common``, never fastlora. Semantics are
those of ``fastlora.reference.lora_quantized_linear_with_shrink`` / ``..._backward``: for a
float32 x every product in float32 on the dequantized weight; for a float16 / bfloat16 x the
base products (x @ W^T and grad_y @ W) in x's dtype on the weight rounded to it (bitsandbytes'
compute dtype), the LoRA products in float32; each output rounded once (y and grad_x to x's
dtype, xa and the adapters' gradients to the adapters' dtype). float64 is not taken here (the
op sends it to the reference).

The weight (layout in csrc/lora_quantized_linear.cpp) is codes plus one float32 scale per block
of ``blocksize`` consecutive elements of the row-major (N, K) weight:

    W[n, k] = code[q(f)] * absmax[f // blocksize],   f = n * K + k

q(f) is the high nibble of byte f // 2 for even f and the low nibble for odd f (16-entry code
book: nf4, fp4), or byte f (256 entries: int8 per row, or any 8-bit code). A block may
straddle rows (K % blocksize != 0) and, for an odd K, a row may start at an odd nibble: the
kernel never assumes a row starts at a byte or a block boundary, it decodes every element from
its flat index. The full-precision weight is never materialised: the W tile of each trip of a
GEMM's reduction loop is dequantized in registers (codes loaded, nibbles unpacked, code book
and scales gathered, one float32 multiply: exactly the reference's ``code[q] * absmax``) and fed
to the dot.

Every GEMM is one generic kernel, ``_qlora_gemm_kernel``, the LoRA-linear kernel's
(kernels/lora_linear.py) shape with a quantized B operand as an option:

    C[m, n] = alpha * sum_k A'[m, k] * B'[k, n]  (+ bias[n])  (+ dropE(lora_scale * E[m, :] @ F[:, n]))

B' is either a strided tensor or, with QUANT_B, the dequantized weight read at flat index
``k * stride_bk + n * stride_bn`` (forward: B'[k, n] = W[n, k], strides (1, K); grad_x:
B'[n', k'] = W[n', k'], strides (K, 1)). A' / B' may pass through fastlora's counter-hash
dropout (the mask of csrc/dropout_hash.h, at the operand's own (row, column) index) and dropE
masks the epilogue at the output index. The launchers map the op onto it:

    shrink    xa32   = dropA(x) @ lora_A.T                         float32 (M, r)
    forward   y      = x @ dequant(W).T + bias_eff + s * xa32 @ lora_B.T
              bias_eff = bias + s * lora_B_bias                    (float32, once, on the host)
    backward  g      = s * grad_y @ lora_B                         float32 (M, r), reused
              grad_A = g.T @ dropB(x)                              mask regenerated
              grad_B = s * grad_y.T @ xa
              grad_x = grad_y @ dequant(W) + dropE(g @ lora_A)     dequant over N, LoRA in the epilogue
              grad_bias = grad_y.sum(0)                            (ATen, float32 accumulation)

Numerics:
  * The base GEMMs (forward, grad_x) of a float16 / bfloat16 x (HALF_BASE): the x / grad_y
    tiles stay in their half dtype and each dequantized W tile (float32 products code * absmax,
    as always) is rounded to that dtype to nearest even, exactly the reference's
    ``dequantize(..., x.dtype)``; tl.dot then runs on half-precision tensor cores with a
    float32 accumulator (a float32 base GEMM would run on FMA units, or TF32 at best: several
    times slower than bitsandbytes' bfloat16 path). The float32 base accumulator is NOT
    rounded to x's dtype before the float32 LoRA / bias epilogue is added (the reference, like
    bitsandbytes, rounds the base product there): one rounding fewer, closer to the exact
    result; the tests' bound (2x the reference's own error) holds either way.
  * Everything else is float32: the base GEMMs of a float32 x, and every LoRA GEMM (shrink,
    g, grad_A, grad_B, the epilogue's expand) whatever the dtypes (adapters in x's dtype or
    float32): their tiles are upcast to float32 right after the load, so the dots are float32
    ones (IEEE, or TF32 when torch allows TF32 in float32 matmuls, as torch.mm on the
    reference's float32 tensors would), dropped values are the float32 products
    ``x * keep * scale``. Accumulation is always float32 and each output is rounded once. xa is
    kept in float32 between the shrink and the expand, as the reference does, and rounded to
    the adapters' dtype only as the returned activation.
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
# Weights whose flat indices (padded by a tile) reach this take int64 index arithmetic in the
# dequantization; below it int32 (cheaper). A module constant so tests can force the int64 path.
_FLAT32_LIMIT = 2 ** 31


# ----------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dropout_tile(t, rows, cols, drop_scale, seed_lo, seed_hi, threshold):
    """fastlora dropout of a float32 tile: t * keep * scale in float32, the reference's own
    products (x * 0 rather than a select, so that a dropped inf/nan gives nan like it)."""
    keep = _keep_mask(rows, cols, seed_lo, seed_hi, threshold)
    return t * keep.to(tl.float32) * drop_scale


@triton.jit
def _dequant_tile(q_ptr, absmax_ptr, code_ptr, offs_r, offs_c, stride_r, stride_c, blocksize, mask,
                  FOUR_BIT: tl.constexpr, BS_SHIFT: tl.constexpr, FLAT64: tl.constexpr):
    """The float32 tile W.flat[offs_r[i] * stride_r + offs_c[j] * stride_c] (masked entries 0).

    Each element is decoded from its own flat index f: nibble f & 1 of byte f >> 1 (even f in
    the high nibble) or byte f, the code book entry, times the scale of block f // blocksize
    (a shift when blocksize is a power of two). int32 flat indices unless the weight (padded
    by a tile) could reach 2**31 elements."""
    if FLAT64:
        flat = offs_r.to(tl.int64)[:, None] * stride_r + offs_c.to(tl.int64)[None, :] * stride_c
    else:
        flat = offs_r[:, None] * stride_r + offs_c[None, :] * stride_c
    if FOUR_BIT:
        byte = tl.load(q_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
        q = tl.where((flat & 1) == 0, byte >> 4, byte & 0xF)
    else:
        q = tl.load(q_ptr + flat, mask=mask, other=0).to(tl.int32)
    if BS_SHIFT >= 0:
        blk = flat >> BS_SHIFT
    else:
        blk = flat // blocksize
    # The code book (16 or 256 floats) and the scales are tiny, cached gathers.
    c = tl.load(code_ptr + q, mask=mask, other=0.0)
    s = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return c * s


# ----------------------------------------------------------------------------------------------
# the kernel
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["M", "threshold"])
def _qlora_gemm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, e_ptr, f_ptr, absmax_ptr, code_ptr, seed_ptr,
    M, N, K, R, k_per_split, blocksize,
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_cs, stride_cm, stride_cn,
    stride_em, stride_er, stride_fr, stride_fn,
    alpha, lora_scale, drop_scale, threshold,
    QUANT_B: tl.constexpr, FOUR_BIT: tl.constexpr, BS_SHIFT: tl.constexpr, FLAT64: tl.constexpr,
    HALF_BASE: tl.constexpr,
    DROP_A: tl.constexpr, DROP_B: tl.constexpr, DROP_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EPI_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    if DROP_A or DROP_B or DROP_LORA:
        seed_lo, seed_hi = _load_seed(seed_ptr)
    else:
        seed_lo, seed_hi = 0, 0
    # Split-K (epilogue-free GEMMs only): program_id(1) owns [k_lo, k_lo + k_per_split), a
    # multiple of BLOCK_K, and writes its own float32 partial plane of C.
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
        if not HALF_BASE:
            # A float32 GEMM (the reference's float32 products): upcast on load.
            a = a.to(tl.float32)
        if QUANT_B:
            b = _dequant_tile(b_ptr, absmax_ptr, code_ptr, offs_k, offs_n, stride_bk, stride_bn, blocksize,
                              mask_k[:, None] & mask_n[None, :], FOUR_BIT, BS_SHIFT, FLAT64)
            if HALF_BASE:
                # The float32 products code * absmax rounded to x's dtype to nearest even (the
                # reference's dequantize(..., x.dtype), bitsandbytes' compute-dtype weight), so
                # that the dot is a half-precision tensor-core one on a's own tile.
                b = _round_to(b, a_ptr.dtype.element_ty, INTERPRET)
        else:
            b = tl.load(b_cols + offs_k.to(tl.int64)[:, None] * stride_bk,
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        if DROP_A:
            a = _dropout_tile(a, offs_m, offs_k, drop_scale, seed_lo, seed_hi, threshold)
        if DROP_B:
            b = _dropout_tile(b, offs_k, offs_n, drop_scale, seed_lo, seed_hi, threshold)
        acc = _mma(a, b, acc, DOT_PRECISION, INTERPRET)
    acc = acc * alpha

    # Epilogue: the rank-r LoRA expand (E @ F in BLOCK_R chunks, float32, EPI_PRECISION: a
    # float32 dot even under a half-precision main loop), its optional dropout at the output
    # index, then the bias; all on the float32 accumulator before one rounding. Under HALF_BASE
    # the base accumulator is deliberately not rounded to x's dtype first (see the module doc).
    if HAS_LORA:
        acc += _lora_term(e_ptr, f_ptr, offs_m, offs_n, mask_m, mask_n, R, stride_em, stride_er, stride_fr,
                          stride_fn, lora_scale, drop_scale, seed_lo, seed_hi, threshold,
                          BLOCK_M, BLOCK_N, BLOCK_R, DROP_LORA, True, EPI_PRECISION, INTERPRET)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += bias[None, :]

    c_ptrs = (c_ptr + pid_s.to(tl.int64) * stride_cs + offs_m.to(tl.int64)[:, None] * stride_cm
              + offs_n.to(tl.int64)[None, :] * stride_cn)
    tl.store(c_ptrs, _round_to(acc, c_ptr.dtype.element_ty, INTERPRET),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _dequantize_kernel(q_ptr, absmax_ptr, code_ptr, out_ptr, N, K, blocksize,
                       FOUR_BIT: tl.constexpr, BS_SHIFT: tl.constexpr, FLAT64: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, INTERPRET: tl.constexpr):
    """out (N, K) = W, one BLOCK_R x BLOCK_C tile per program: the GEMMs' tile decoder, stored
    (rounded once from the float32 product to out's dtype)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_r < N)[:, None] & (offs_c < K)[None, :]
    w = _dequant_tile(q_ptr, absmax_ptr, code_ptr, offs_r, offs_c, K, 1, blocksize, mask, FOUR_BIT, BS_SHIFT,
                      FLAT64)
    out = out_ptr + offs_r.to(tl.int64)[:, None] * K + offs_c.to(tl.int64)[None, :]
    tl.store(out, _round_to(w, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
class _QuantB:
    """The dequantized weight as a GEMM's (K, N) B operand: B[k, n] = W.flat[k * sk + n * sn]."""

    def __init__(self, qweight, absmax, code, blocksize, weight_shape, sk, sn):
        self.qweight, self.absmax, self.code = qweight, absmax, code
        self.blocksize = int(blocksize)
        self.numel = int(weight_shape[0]) * int(weight_shape[1])
        self.sk, self.sn = int(sk), int(sn)


def _format_args(code: torch.Tensor, blocksize: int, flat_bound: int):
    """(FOUR_BIT, BS_SHIFT, FLAT64) of a weight: 16-entry code book = two codes per byte; the
    block index by a shift when blocksize is a power of two (-1: a division); int64 flat
    indices when a tile's (padded) flat indices, below ``flat_bound``, may reach 2**31."""
    bs_shift = blocksize.bit_length() - 1 if blocksize & (blocksize - 1) == 0 else -1
    return code.numel() == 16, bs_shift, flat_bound >= _FLAT32_LIMIT


def _blocks(M: int, N: int, K: int, R: int, quant: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, num_warps, num_stages); the same tiles whether the
    dequantizing GEMM's main loop is float32 or half precision (HALF_BASE).

    GPU (H100): the GEMMs over the quantized weight (the forward and grad_x, the heavy ones)
    take 128x128x32 tiles, 8 warps, 3 stages: the dequantization of a B tile is paid once per
    BLOCK_M rows, so tall tiles amortise it. The rank-sized GEMMs (shrink, g, grad_A, grad_B)
    take lora_linear's float32 tiles, 64x64x32, 4 warps. Dims smaller than a tile shrink to the
    next power of two, never below 16 (tl.dot's minimum). The epilogue's rank chunk is 32 wide
    under a 128x128 tile so its float32 (BLOCK_M + BLOCK_N) x BLOCK_R chunks stay the main
    loop's size per stage. Shared memory compiled for sm_90 (tests/test_triton_sm90_compile.py),
    of 227 KiB: the dequantizing GEMMs 96 KiB with a float32 x (TF32); with half-precision main
    loops 96 KiB for bfloat16 x and 4-bit codes (72 KiB at 16 rows), 64-80 KiB for 8-bit codes
    (float16 / bfloat16 x); 16-48 KiB for the rank-sized ones: two programs fit on an SM. A
    64-deep K tile for the half main loops (lora_linear's bf16 tile) took 192 KiB with 4-bit
    codes at 3 stages (the pipelined float32 code-book and scale gathers grow with it), 112 KiB
    at 2: not taken without a GPU measurement showing it faster.
    Interpreter: one large tile per program so that the small test shapes run in one program
    and one loop trip (the interpreter costs milliseconds per program per loop iteration)."""
    if _INTERPRET:
        return _pow2(M, 16, 128), _pow2(N, 16, 128), _pow2(K, 16, 128), _pow2(R, 16, 256), 4, 1
    cap_mn = 128 if quant else 64
    bm, bn, bk = _pow2(M, 16, cap_mn), _pow2(N, 16, cap_mn), _pow2(K, 16, 32)
    big = bm * bn >= 128 * 128
    br = _pow2(R, 16, 32 if big else 64)
    return bm, bn, bk, br, 8 if big else 4, 3


def _gemm(a: torch.Tensor, b, out: torch.Tensor, *, alpha: float = 1.0, drop_a=None, drop_b=None, bias=None,
          lora=None) -> torch.Tensor:
    """out (M, N) = alpha * dropA(a) (M, K) @ dropB(b) (K, N) [+ bias] [+ LoRA epilogue], float32
    accumulation, rounded once to out's dtype. The main loop is float32, except for a _QuantB b
    under a float16 / bfloat16 a (HALF_BASE: a's tiles as they are, W's rounded to a's dtype);
    the LoRA epilogue is float32.

    b: a strided (K, N) tensor or a _QuantB (then N = out.shape[1]). drop_a / drop_b: (p, seed)
    or None. lora: (e (M, R), f (R, N), lora_scale, drop) with drop (p, seed) or None. Operands
    are strided 2-D views in any supported dtype; out is written in place."""
    M, K = a.shape
    N = out.shape[1]
    if out.numel() == 0:
        return out
    quant = isinstance(b, _QuantB)
    drops = [(d, w) for d, w in ((drop_a, "a"), (drop_b, "b"), (lora[3] if lora is not None else None, "e"))
             if d is not None and d[0] > 0.0]
    assert len(drops) <= 1, "one dropout mask per launch"
    seed, threshold, drop_scale = _dropout_args(*drops[0][0], a.device) if drops else (a, 0, 1.0)
    drop_on = drops[0][1] if drops else None
    e = f = None
    lora_scale, R = 1.0, 1
    if lora is not None:
        e, f, lora_scale, _ = lora
        R = e.shape[1]

    # A dequantizing GEMM over a half-precision x / grad_y runs its main loop in that dtype (see
    # the module doc); the LoRA GEMMs (never QUANT_B) stay float32. Operand dropout belongs to
    # the LoRA GEMMs only: on a half tile its float32 products would be rounded to half.
    half_base = quant and a.dtype in _HALF
    assert not (half_base and drop_on in ("a", "b")), "operand dropout on a half-precision main loop"
    bm, bn, bk, br, num_warps, num_stages = _blocks(M, N, K, R, quant)
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    split = 1
    if bias is None and lora is None:  # the epilogue must run once per output element
        split = _choose_split(tiles, K, bk, a.device)
    k_per_split = triton.cdiv(triton.cdiv(max(K, 1), split), bk) * bk
    split = max(1, triton.cdiv(K, k_per_split))
    if split > 1:
        # Deterministic split-K: each split writes a float32 partial plane, summed afterwards.
        c = torch.empty((split, M, N), dtype=torch.float32, device=out.device)
        stride_cs, stride_cm, stride_cn = c.stride()
    else:
        c = out
        stride_cs, (stride_cm, stride_cn) = 0, out.stride()

    if quant:
        if b.numel == 0:
            # No element is ever read (the loop or the grid is empty), but an empty tensor's
            # data pointer may be null, which a launch rejects: pass one-element stand-ins.
            b_t = torch.zeros(1, dtype=torch.uint8, device=a.device)
            absmax_t = torch.zeros(1, dtype=torch.float32, device=a.device)
        else:
            b_t, absmax_t = b.qweight, b.absmax
        code_t = b.code
        stride_bk, stride_bn = b.sk, b.sn
        bs = b.blocksize
        # Flat indices of a tile may run a tile past the weight's last row and column (masked).
        four_bit, bs_shift, flat64 = _format_args(b.code, bs, b.numel + (bm + bn + bk) * (b.sk + b.sn))
    else:
        b_t, absmax_t, code_t = b, a, a  # dummies: never dereferenced when QUANT_B is off
        stride_bk, stride_bn = b.stride()
        four_bit, bs, bs_shift, flat64 = False, 1, 0, False
    e_t = e if e is not None else a
    f_t = f if f is not None else a
    bias_t = bias if bias is not None else a

    with _on_device(a.device):
        _qlora_gemm_kernel[(tiles, split)](
            a, b_t, c, bias_t, e_t, f_t, absmax_t, code_t, seed,
            M, N, K, R, k_per_split, bs,
            a.stride(0), a.stride(1), stride_bk, stride_bn,
            stride_cs, stride_cm, stride_cn,
            e_t.stride(0), e_t.stride(1), f_t.stride(0), f_t.stride(1),
            float(alpha), float(lora_scale), float(drop_scale), threshold,
            QUANT_B=quant, FOUR_BIT=four_bit, BS_SHIFT=bs_shift, FLAT64=flat64, HALF_BASE=half_base,
            DROP_A=drop_on == "a", DROP_B=drop_on == "b", DROP_LORA=drop_on == "e",
            HAS_BIAS=bias is not None, HAS_LORA=lora is not None,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br, GROUP_M=8,
            DOT_PRECISION=_dot_precision(a.dtype if half_base else torch.float32),
            EPI_PRECISION=_dot_precision(torch.float32), INTERPRET=_INTERPRET,
            num_warps=num_warps, num_stages=num_stages,
        )
    if split > 1:
        out.copy_(c.sum(0))
    return out


# ----------------------------------------------------------------------------------------------
# public launchers (2-D tensors; shapes, devices and the weight's sizes validated by the caller,
# the op's check, csrc/lora_quantized_linear.cpp)
# ----------------------------------------------------------------------------------------------
_HALF = (torch.float16, torch.bfloat16)


def _check_dtypes(x: torch.Tensor, same_as_x: dict, adapters: dict) -> None:
    """x float32 / float16 / bfloat16; ``same_as_x`` tensors in x's dtype; ``adapters`` in one
    dtype, x's or float32 when x is half precision (PEFT's default adapters)."""
    _check_dtype(x, *same_as_x.values(), *adapters.values())
    ad = next(iter(adapters.values())).dtype
    ok = (all(t.dtype == x.dtype for t in same_as_x.values() if t is not None)
          and all(t.dtype == ad for t in adapters.values() if t is not None)
          and (ad == x.dtype or (x.dtype in _HALF and ad == torch.float32)))
    if not ok:
        got = ", ".join(f"{n}={t.dtype}" for n, t in (("x", x), *same_as_x.items(), *adapters.items())
                        if t is not None)
        raise TypeError(f"fastlora Triton QLoRA kernels take {', '.join(['x', *same_as_x])} in one dtype and "
                        f"{', '.join(adapters)} in that dtype or in float32 when it is float16 or bfloat16 "
                        f"(PEFT's mixed precision). Got {got}")


def lora_quantized_forward(x, qweight, absmax, code, blocksize, weight_shape, bias, lora_A, lora_B, scaling,
                           dropout_p, seed, lora_B_bias=None):
    """(y, xa) of ``fastlora::lora_quantized_linear_fwd`` for 2-D x (M, K).

    y (M, N) in x's dtype = x @ dequant(W).T + bias + scaling * (xa @ lora_B.T + lora_B_bias);
    xa (M, r) = dropout(x) @ lora_A.T in the adapters' dtype. Two launches: the shrink (float32
    xa, dropout mask generated in-kernel) and the base GEMM over the codes with the LoRA expand
    and the effective bias (float32: bias + scaling * lora_B_bias) in its epilogue."""
    _check_dtypes(x, {"bias": bias}, {"lora_A": lora_A, "lora_B": lora_B, "lora_B_bias": lora_B_bias})
    M, K = x.shape
    N, r = int(weight_shape[0]), lora_A.shape[0]
    xa32 = torch.empty((M, r), dtype=torch.float32, device=x.device)
    drop = (float(dropout_p), seed) if dropout_p > 0.0 else None
    _gemm(x, lora_A.t(), xa32, drop_a=drop)
    bias_eff = None
    if lora_B_bias is not None:
        bias_eff = lora_B_bias.float() * float(scaling)
    if bias is not None:
        bias_eff = bias.float() if bias_eff is None else bias.float() + bias_eff
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    w = _QuantB(qweight, absmax, code, blocksize, weight_shape, 1, K)  # B[k, n] = W[n, k]
    _gemm(x, w, y, bias=bias_eff, lora=(xa32, lora_B.t(), float(scaling), None))
    return y, (xa32 if lora_A.dtype == torch.float32 else xa32.to(lora_A.dtype))


def lora_quantized_backward(grad_y, x, qweight, absmax, code, blocksize, weight_shape, lora_A, lora_B, xa, scaling,
                            dropout_p, seed, need_x=True, need_bias=False):
    """(grad_x, grad_bias, grad_lora_A, grad_lora_B) of ``fastlora::lora_quantized_linear_bwd``;
    grad_x / grad_bias are empty tensors when not requested. g = scaling * grad_y @ lora_B is
    computed once in float32 and shared by grad_A and grad_x; grad_x reads the codes again,
    reduced over N, with the dropped LoRA term g @ lora_A in the epilogue."""
    _check_dtypes(x, {"grad_y": grad_y}, {"lora_A": lora_A, "lora_B": lora_B, "xa": xa})
    M, N = grad_y.shape
    K = x.shape[1]
    r = lora_A.shape[0]
    dev, ad = x.device, lora_A.dtype
    drop = (float(dropout_p), seed) if dropout_p > 0.0 else None

    g = _gemm(grad_y, lora_B, torch.empty((M, r), dtype=torch.float32, device=dev), alpha=scaling)
    grad_A = _gemm(g.t(), x, torch.empty((r, K), dtype=ad, device=dev), drop_b=drop)
    grad_B = _gemm(grad_y.t(), xa, torch.empty((N, r), dtype=ad, device=dev), alpha=scaling)
    grad_x = x.new_empty(0)
    if need_x:
        w = _QuantB(qweight, absmax, code, blocksize, weight_shape, K, 1)  # B[n, k] = W[n, k]
        grad_x = _gemm(grad_y, w, torch.empty((M, K), dtype=x.dtype, device=dev), lora=(g, lora_A, 1.0, drop))
    grad_b = grad_y.sum(0, dtype=torch.float32).to(x.dtype) if need_bias else x.new_empty(0)
    return grad_x, grad_b, grad_A, grad_B


def dequantize(qweight, absmax, code, blocksize, weight_shape, dtype):
    """``fastlora::dequantize``: the (N, K) weight in ``dtype`` (float32, float16, bfloat16 or
    float64), each element the float32 product ``code[q] * absmax[block]`` rounded once, as the
    reference. One launch of 32 x 128 tiles (64 x 128 under the interpreter: fewer programs)."""
    N, K = int(weight_shape[0]), int(weight_shape[1])
    out = torch.empty((N, K), dtype=dtype, device=qweight.device)
    if out.numel() == 0:
        return out
    br, bc = (64, 128) if _INTERPRET else (32, 128)
    four_bit, bs_shift, flat64 = _format_args(code, int(blocksize), N * K + (br + bc) * (K + 1))
    with _on_device(qweight.device):
        _dequantize_kernel[(triton.cdiv(N, br), triton.cdiv(K, bc))](
            qweight, absmax, code, out, N, K, int(blocksize),
            FOUR_BIT=four_bit, BS_SHIFT=bs_shift, FLAT64=flat64, BLOCK_R=br, BLOCK_C=bc, INTERPRET=_INTERPRET,
            num_warps=4)
    return out
