"""``torch.nn.functional.linear`` for half-precision layers on CPUs without native half GEMMs.

A bfloat16 model's layers that no LoRA adapter targets (PEFT's default targets only some
projections; ``lm_head`` never) are plain ``nn.Linear`` layers, and on a CPU without AVX512-BF16
/ AMX ATen emulates their bfloat16 GEMMs, and those were nearly all of a Llama-style training
step (docs/cpu.md). ``linear``
computes such a layer as the LoRA kernels compute their half-precision base products there: x
converted to float32 (exact), the weight's float32 copy kept across calls (the weight cache of
fastlora.cpu), the float32 GEMM, the result rounded once to x's dtype.

Ops (CPU kernel in csrc/cpu/weight_cache.cpp):
  fastlora::float32_weight  the kept float32 copy of a bfloat16 / float16 weight (read-only:
                            it can be the cached tensor itself); elsewhere weight.to(float32).

Autograd is ATen's: the float32 route is ``F.linear(x.float(), W32, b.float()).to(dtype)``, so
backward runs float32 GEMMs too, saves nothing but the weight copy for a frozen weight, and a
weight that requires grad takes a per-call ``weight.float()`` (differentiable) instead of the
kept copy. Everything else (float32 / float64, GPUs, CPUs with native half GEMMs) is
``F.linear`` itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlora import _library  # noqa: F401  (registers torch.ops.fastlora.float32_weight)
from fastlora import cpu

_HALF = (torch.bfloat16, torch.float16)


@torch.library.register_fake("fastlora::float32_weight")
def _float32_weight_fake(weight):
    if weight.dtype not in _HALF:
        raise TypeError(f"fastlora.float32_weight: weight must be bfloat16 or float16, got {weight.dtype}")
    return torch.empty_like(weight, dtype=torch.float32)  # .to(float32) keeps the strides


def _float32_weight_reference(weight):
    if weight.dtype not in _HALF:
        raise TypeError(f"fastlora.float32_weight: weight must be bfloat16 or float16, got {weight.dtype}")
    return weight.to(torch.float32)


torch.library.register_kernel("fastlora::float32_weight", None, _float32_weight_reference)


# A constant under torch.compile (a compiled graph keeps the route it was traced with; the
# answer changes only through fastlora.use_cpu_isa).
@torch.compiler.assume_constant_result
def half_via_float32(dtype: torch.dtype) -> bool:
    """Whether a CPU ``dtype`` GEMM is better done in float32 here: bfloat16 without native
    bf16 GEMMs (:func:`fastlora.cpu.native_bf16_matmul`), float16 without native fp16 GEMMs
    (:func:`fastlora.cpu.native_fp16_matmul`)."""
    if dtype == torch.bfloat16:
        return not cpu.native_bf16_matmul()
    if dtype == torch.float16:
        return not cpu.native_fp16_matmul()
    return False


def linear(x, weight, bias=None):
    """``F.linear(x, weight, bias)``; on the CPU, a bfloat16 / float16 layer where that dtype's
    GEMMs are not native (:func:`half_via_float32`) runs in float32 on x's float32 values and
    the weight's kept float32 copy, its result rounded once to x's dtype (ATen's emulated GEMMs
    also accumulate in float32 and round once; only the summation order differs).

    Under ``torch.autocast`` on the CPU, float32 / half inputs are first cast to the autocast
    dtype, as ``nn.Linear`` does; a cast weight is a new tensor per call, so it is converted per
    call (no kept copy). A single row without gradients stays in ``F.linear``: ATen's
    half-precision GEMV reads half the bytes (0.34 vs 0.43 ms at 2048^2, AVX2).
    """
    if x.device.type != "cpu" or x.dim() == 0:  # (a 0-d x gets F.linear's own error)
        return F.linear(x, weight, bias)
    dtype = x.dtype
    original_weight = weight
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        if dtype not in _HALF or not half_via_float32(dtype):
            return F.linear(x, weight, bias)
        x, weight = _autocast_cast(x, dtype), _autocast_cast(weight, dtype)
        bias = _autocast_cast(bias, dtype) if bias is not None else None
    if (dtype not in _HALF or x.dtype != dtype or weight.dtype != dtype or weight.device.type != "cpu"
            or (bias is not None and bias.dtype != dtype) or not half_via_float32(dtype)):
        with torch.autocast("cpu", enabled=False):
            return F.linear(x, weight, bias)
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))
    if not grad and x.numel() <= x.shape[-1]:  # one row (or none)
        with torch.autocast("cpu", enabled=False):
            return F.linear(x, weight, bias)
    if weight is not original_weight or weight.requires_grad:
        w32 = weight.to(torch.float32)
    else:
        w32 = torch.ops.fastlora.float32_weight(weight)
    with torch.autocast("cpu", enabled=False):
        y = F.linear(x.to(torch.float32), w32, bias.to(torch.float32) if bias is not None else None)
    return y.to(dtype)


def _autocast_cast(t, dtype):
    # What autocast casts: floating tensors other than float64 (see fastlora.ops._autocast).
    if t.is_floating_point() and t.dtype != torch.float64 and t.device.type == "cpu":
        return t.to(dtype)
    return t
