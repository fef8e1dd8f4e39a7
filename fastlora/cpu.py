"""What fastlora's CPU kernels run on, and what the CPU does fast.

The C++ kernels' register-tiled GEMM (small_gemm) has one build per x86-64 level: ``avx512``
(x86-64-v4), ``avx2`` (x86-64-v3: AVX2 + FMA) and ``baseline``, and ``amx`` (``avx512`` with the
bfloat16 LoRA and sketch products in AMX tiles, on CPUs with AMX-BF16); the machine's best is
used. The environment variable ``FASTLORA_CPU_ISA=amx|avx512|avx2|baseline|auto``, read when
fastlora is imported, caps it, so that a machine with AVX-512 can run, test and benchmark exactly
what AVX2 and older machines run; :func:`use_cpu_isa` switches at run time.

:func:`native_bf16_matmul` says whether bfloat16 matrix products are fast here (AVX512-BF16 or
AMX, and the kernels not capped below AVX-512): choices such as rsvd's sketch precision follow it;
:func:`native_fp16_matmul` says the same of float16 (``fastlora.linear`` follows both).
:func:`blas_avx512_sgemm` says whether ATen's float32 GEMMs run MKL's AVX-512 kernels here,
:func:`blas_mkl_on_intel` whether they are MKL's on an Intel CPU (tuned for its vector level).

Where the LoRA kernels run a bfloat16 / float16 layer on float32 copies (float16 always; bfloat16
without native bf16 GEMMs), the base weight's float32 copy is kept across calls, up to a byte
limit: a quarter of the machine's (or container's) memory by default,
``FASTLORA_WEIGHT_CACHE_MB`` (read at import; ``0`` turns it off) or
:func:`set_weight_cache_limit`. A copy is reused only while its weight is the same tensor,
unchanged: same storage, shape and version counter (any in-place write to it or a view of it),
and the same values at 64 sampled places (writes through ``.data``, which the version counter
misses). Copies of freed weights are dropped at the next call. After writing only a few elements
through ``.data``, call :func:`clear_weight_cache`.
"""
from __future__ import annotations

import os
import warnings

import torch

from fastlora import _library  # noqa: F401  (registers torch.ops.fastlora.*)

ENV_VAR = "FASTLORA_CPU_ISA"
CACHE_ENV_VAR = "FASTLORA_WEIGHT_CACHE_MB"
ISA_LEVELS = {"amx": 5, "avx512": 4, "avx2": 3, "baseline": 1}
_ISA_NAMES = {level: name for name, level in ISA_LEVELS.items()}


def cpu_isa() -> str:
    """The instruction-set build the CPU kernels run now: "amx", "avx512", "avx2" or "baseline"."""
    return _ISA_NAMES[torch.ops.fastlora.cpu_isa_level()]


def use_cpu_isa(isa: str) -> str:
    """Runs the CPU kernels' ``isa`` build ("amx", "avx512", "avx2", "baseline", or "auto" for
    the machine's best), capped at what this CPU has; returns the build now in use. Process-wide."""
    if isa == "auto":
        level = ISA_LEVELS["amx"]
    elif isa in ISA_LEVELS:
        level = ISA_LEVELS[isa]
    else:
        raise ValueError(f"unknown CPU instruction set {isa!r}: expected one of "
                         f"{', '.join(ISA_LEVELS)} or auto")
    return _ISA_NAMES[torch.ops.fastlora.use_cpu_isa_level(level)]


def native_bf16_matmul() -> bool:
    """True where bfloat16 GEMMs run natively (AVX512-BF16 or AMX) and the kernels are not
    capped below AVX-512. Elsewhere ATen's bfloat16 GEMMs are emulated and 100x or more slower
    than float32 ones, so bfloat16 work is better done in float32."""
    return torch.ops.fastlora.native_bf16_gemm()  # the C++ kernels' own answer: one source of truth


def blas_avx512_sgemm() -> bool:
    """True where ATen's float32 GEMMs run MKL's AVX-512 kernels: an Intel CPU with AVX-512 and
    the kernels not capped below it (on AMD CPUs MKL runs its AVX2 kernels). There float32
    products through the BLAS are as fast as fastlora's own, and beat AVX512-BF16's (not AMX's)
    bfloat16 ones on rsvd's shapes."""
    return torch.ops.fastlora.blas_avx512_sgemm()


def blas_mkl_on_intel() -> bool:
    """True where ATen's float32 GEMMs are MKL's on an Intel CPU, which picks kernels tuned for
    the CPU's vector level (on AMD CPUs it runs slower code). There ``rsvd``'s float32 products
    go through the BLAS rather than fastlora's own ``small_gemm``."""
    return torch.ops.fastlora.blas_mkl_on_intel()


def native_fp16_matmul() -> bool:
    """True where ATen's float16 GEMMs run natively (oneDNN with AVX512-FP16, as on Xeons since
    Sapphire Rapids) and the kernels are not capped below AVX-512. Elsewhere they are emulated:
    a 2048^2 layer's fwd+bwd took 242 ms at 8 rows against 4.3 ms in float32 (AVX2 build)."""
    return torch.ops.fastlora.native_fp16_gemm()  # the C++ kernels' own answer: one source of truth


def weight_cache_limit() -> int:
    """The byte limit of the float32 weight copies kept across calls (0: none are kept)."""
    return torch.ops.fastlora.weight_cache_limit()


def set_weight_cache_limit(nbytes: int) -> int:
    """Sets the limit (bytes, >= 0; 0 turns the cache off and frees it); copies over a lower
    limit are dropped. Returns the previous limit. Process-wide."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"weight cache limit must be an int >= 0 (bytes), got {nbytes!r}")
    return torch.ops.fastlora.set_weight_cache_limit(nbytes)


def weight_cache_usage() -> tuple[int, int]:
    """(copies, bytes) held now, including copies of weights freed since the last call (the
    next call, or :func:`clear_weight_cache`, drops those)."""
    entries, nbytes = torch.ops.fastlora.weight_cache_usage()
    return entries, nbytes


def clear_weight_cache() -> None:
    """Drops every float32 weight copy (they are made again on the next calls)."""
    torch.ops.fastlora.clear_weight_cache()


def check_environment() -> None:
    """Rejects a misspelt FASTLORA_CPU_ISA or FASTLORA_WEIGHT_CACHE_MB; warns when the former
    asks for more than the CPU has."""
    cache_mb = os.environ.get(CACHE_ENV_VAR)
    if cache_mb not in (None, "") and not (cache_mb.isascii() and cache_mb.isdigit()):
        raise ValueError(f"{CACHE_ENV_VAR}={cache_mb!r}: expected a whole number of MiB (0 turns the "
                         f"float32 weight cache off)")
    value = os.environ.get(ENV_VAR)
    if value is None or value in ("", "auto"):
        return
    if value not in ISA_LEVELS:
        raise ValueError(f"{ENV_VAR}={value!r}: expected one of {', '.join(ISA_LEVELS)} or auto")
    if ISA_LEVELS[value] > torch.ops.fastlora.cpu_isa_level():
        warnings.warn(f"{ENV_VAR}={value}: this CPU does not have it; fastlora's CPU kernels run "
                      f"their {cpu_isa()} build", RuntimeWarning, stacklevel=2)
