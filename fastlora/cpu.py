"""What fastlora's CPU kernels run on, and what the CPU does fast.

The C++ kernels' register-tiled GEMM (small_gemm) has one build per x86-64 level: ``avx512``
(x86-64-v4), ``avx2`` (x86-64-v3: AVX2 + FMA) and ``baseline``, and ``amx`` (``avx512`` with the
bfloat16 LoRA and sketch products in AMX tiles, on CPUs with AMX-BF16); the machine's best is
used. The environment variable ``FASTLORA_CPU_ISA=amx|avx512|avx2|baseline|auto``, read when
fastlora is imported, caps it, so that a machine with AVX-512 can run, test and benchmark exactly
what AVX2 and older machines run; :func:`use_cpu_isa` switches at run time.

:func:`native_bf16_matmul` says whether bfloat16 matrix products are fast here (AVX512-BF16 or
AMX, and the kernels not capped below AVX-512): choices such as rsvd's sketch precision follow it.
"""
from __future__ import annotations

import os
import warnings

import torch

from fastlora import _library  # noqa: F401  (registers torch.ops.fastlora.*)

ENV_VAR = "FASTLORA_CPU_ISA"
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


def check_environment() -> None:
    """Rejects a misspelt FASTLORA_CPU_ISA; warns when it asks for more than the CPU has."""
    value = os.environ.get(ENV_VAR)
    if value is None or value in ("", "auto"):
        return
    if value not in ISA_LEVELS:
        raise ValueError(f"{ENV_VAR}={value!r}: expected one of {', '.join(ISA_LEVELS)} or auto")
    if ISA_LEVELS[value] > torch.ops.fastlora.cpu_isa_level():
        warnings.warn(f"{ENV_VAR}={value}: this CPU does not have it; fastlora's CPU kernels run "
                      f"their {cpu_isa()} build", RuntimeWarning, stacklevel=2)
