"""Autocast behaviour of the mixed-adapter LoRA family (lora_grouped_linear); lora_linear's and
lora_quantized_linear's follow the same rule in C++ (csrc/lora_linear.cpp,
csrc/lora_quantized_linear.cpp).

Under torch.autocast the forward ops run in the autocast dtype, as nn.Linear does (and so
PEFT's LoRA modules, whose lora_A / lora_B are nn.Linear): float32 / float16 / bfloat16 tensors
on the autocast device are cast to torch.get_autocast_dtype (float64 stays), then the op runs
with autocast off. The kernel sits above autograd, so the casts are recorded and float32
parameters get float32 gradients; the backward ops see the cast dtype.
"""
from __future__ import annotations

import torch

_AUTOCAST_LIB = torch.library.Library("fastlora", "FRAGMENT")


def register_autocast(op_name: str, cast_positions) -> None:
    """Registers fastlora::<op_name>'s AutocastCPU and AutocastCUDA kernels: the tensor
    arguments at ``cast_positions`` that autocast would cast (see the module docstring) are cast
    to the autocast dtype, then the op runs with autocast off."""
    op = getattr(torch.ops.fastlora, op_name).default
    for device_type, key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
        def kernel(_keyset, *args, _device_type=device_type):
            dtype = torch.get_autocast_dtype(_device_type)
            args = [a.to(dtype) if i in cast_positions and _autocast_eligible(a, _device_type) else a
                    for i, a in enumerate(args)]
            with torch.autocast(_device_type, enabled=False):
                return op(*args)
        _AUTOCAST_LIB.impl(op_name, kernel, key, with_keyset=True)


def _autocast_eligible(t, device_type: str) -> bool:
    return (isinstance(t, torch.Tensor) and t.device.type == device_type and t.is_floating_point()
            and t.dtype != torch.float64)
