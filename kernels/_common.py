"""Pieces shared by the Triton kernel modules (still leaves: torch and triton only)."""
import contextlib
import os
import struct
from collections import OrderedDict

import torch
import triton
import triton.language as tl  # noqa: F401  (Triton requires tl in scope of a jit function)


@triton.jit
def fmix32(h):
    # MurmurHash3's 32-bit finaliser on uint32 tensors: >> is a logical shift and * wraps mod
    # 2**32 because h is unsigned (the constants are > 2**31 so they are typed uint32 too).
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def keep_mask(rows, cols, seed_lo, seed_hi, threshold):
    """fastlora's dropout keep-mask for the tile rows x cols (1-D global int32 indices): the
    hash of csrc/dropout_hash.h, so that every backend drops the same entries."""
    # The row hash depends on the row only: one fmix32 per row, one per element.
    h = fmix32(rows.to(tl.uint32) ^ seed_lo.to(tl.uint32))
    u = fmix32((h[:, None] + cols.to(tl.uint32)[None, :] * 0x9E3779B9) ^ seed_hi.to(tl.uint32))
    return (u >> 8) >= threshold.to(tl.uint32)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in GROUP_M-tall column bands, so that consecutive
    programs reuse the same B tiles from L2 (the standard grouped ordering)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


def dropout_args(p: float, seed, device: torch.device):
    """(seed, threshold, scale): a dropout (p > 0) as kernel arguments.

    The seed goes to the kernels as a one-element int64 tensor on the device, which they read
    (load_seed), not as a launch argument: on a GPU no call reads it back to the host, and a
    captured CUDA graph replays with the seed the op draws on the device at each replay. An int
    or a CPU tensor is copied there."""
    if isinstance(seed, torch.Tensor):
        seed = seed.reshape(1).to(device=device, dtype=torch.int64)
    else:
        seed = torch.tensor([int(seed)], dtype=torch.int64, device=device)
    threshold = min(int(p * 16777216.0 + 0.5), 1 << 24)
    # 1 / (1 - p) computed in float64 and rounded once to float32 (as the reference does);
    # a Python float kernel argument is passed as fp32, which is then exact.
    scale = 0.0 if p >= 1.0 else struct.unpack("f", struct.pack("f", 1.0 / (1.0 - p)))[0]
    return seed, threshold, scale


@triton.jit
def load_seed(seed_ptr):
    """The dropout seed's (low, high) 32-bit halves, from its one-element int64 tensor."""
    s = tl.load(seed_ptr)
    return s.to(tl.uint32), (s >> 32).to(tl.uint32)


def choose_split(tiles: int, K: int, block_k: int, device: torch.device) -> int:
    """Split-K factor for epilogue-free GEMMs with few output tiles and a long reduction
    (LoRA's grad_A: r x K output reduced over all M tokens; grad_B: N x r; g: M x r over N):
    ~2 waves of programs on the GPU, >= 4 K-blocks per split. 1 under the interpreter (tests
    force other values by monkeypatching the kernel module's ``_choose_split``)."""
    if INTERPRET or device.type != "cuda":
        return 1
    target = 2 * num_sms(device)
    if tiles >= target:
        return 1
    return max(1, min(triton.cdiv(target, tiles), triton.cdiv(K, 4 * block_k)))


def on_device(device: torch.device):
    """Context to launch on the tensors' GPU even if it is not the current one (no-op on CPU,
    where the interpreter runs)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


_SM_COUNT: dict = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached); 1 elsewhere (the interpreter)."""
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def lru_get(cache: OrderedDict, key, make, size: int):
    """cache[key], built by make() on a miss; keeps the `size` most recently used entries.
    Used for the per-tensor-list tables the launchers build (block / chunk tables)."""
    value = cache.get(key)
    if value is None:
        value = make()
        cache[key] = value
        if len(cache) > size:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return value

# The Triton CPU interpreter (tests) has gaps that the kernels work around when INTERPRET is
# set; on a GPU the branches compile away:
#   * bf16 arithmetic and bf16 tl.dot are wrong (bf16 is stored as raw uint16 there), so every
#     tile is upcast to fp32 right after its load and dots run on fp32 tiles;
#   * fp32 -> bf16 conversion truncates instead of rounding to nearest even, so bf16 rounding
#     is done by hand on the fp32 bit pattern (see round_to).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# What the kernels take; float64 goes to the reference (Triton has no fast fp64 dot).
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def round_to(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """Round an fp32 tile to ``dtype`` to nearest even (what torch's .to(dtype) does)."""
    if INTERPRET and dtype == tl.bfloat16:
        # The interpreter truncates fp32 -> bf16; round the bit pattern to nearest even on the
        # top 16 bits by hand (the truncating cast is then exact). NaNs are kept as they are.
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(dtype)


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    if INTERPRET:
        # The interpreter's dot is numpy matmul on the raw storage: bf16 would be multiplied as
        # uint16, so feed it exact fp32 upcasts (same products, fp32 accumulation).
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        # Native dtype on the tensor cores, fp32 accumulator.
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


def check_dtype(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"fastlora Triton kernels support float32, float16 and bfloat16 only, got "
                f"{t.dtype}; use the reference (or C++) path for this dtype")


def pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def fp32_matmul_uses_tf32() -> bool:
    """torch's switch for TF32 in float32 matmuls, read the way the running torch sets it.

    torch >= 2.9 has ``fp32_precision`` (the matmul value inherits ``torch.backends.
    fp32_precision``); once it was set, reading the legacy ``allow_tf32`` raises, so the new
    API is read first and ``allow_tf32`` only when the new one says nothing ("none")."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", "none")
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    return bool(matmul.allow_tf32)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's own switch so that results match torch.mm on the same machine.
    if dtype == torch.float32 and fp32_matmul_uses_tf32():
        return "tf32"
    return "ieee"


@triton.jit
def lora_term(e_ptr, f_ptr, offs_m, offs_n, mask_m, mask_n, R, stride_em, stride_er, stride_fr, stride_fn,
              lora_scale, drop_scale, seed_lo, seed_hi, threshold,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, DROP: tl.constexpr,
              TO_F32: tl.constexpr, EPI_PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """The LoRA term of an output tile in fp32: lora_scale * E[offs_m, :R] @ F[:R, offs_n] in
    BLOCK_R chunks (the dot in E's and F's dtype, or upcast first with TO_F32, at
    EPI_PRECISION), and with DROP fastlora's dropout mask at the output index (m, n)."""
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
        if TO_F32:
            e = e.to(tl.float32)
            f = f.to(tl.float32)
        lora = mma(e, f, lora, EPI_PRECISION, INTERPRET)
    lora = lora * lora_scale
    if DROP:
        keep = keep_mask(offs_m, offs_n, seed_lo, seed_hi, threshold)
        lora = lora * keep.to(tl.float32) * drop_scale
    return lora


@triton.jit
def is_nonfinite(v):
    """inf or nan, by the exponent bits of float32 ``v``: a ``v != v`` test can be folded
    away by LLVM's no-NaNs assumption on some Triton versions, an integer test cannot."""
    return (v.to(tl.int32, bitcast=True) & 0x7FFFFFFF) >= 0x7F800000
