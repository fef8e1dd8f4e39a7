"""A model's plain linear layers on ``fastlora.linear``: bfloat16 / float16 in float32 where
the CPU emulates those GEMMs.

In a bfloat16 model on a CPU without native bf16 GEMMs (AVX2 laptops and VMs) ATen emulates
every ``nn.Linear``'s products, and those are nearly all of a training step: a 4-layer
Llama-style model with LoRA on q_proj / v_proj (PEFT's default targets) took 1353 ms per step
with only its LoRA layers on fastlora's ops and 76.7 ms with its other layers here too (65.9
ms in float32; benchmarks/test_bench_peft.py -k default_targets, AVX2 caps; docs/cpu.md). ``patch_linears`` swaps a model's ``nn.Linear`` layers (exact class) to
``Float32ComputeLinear`` by ``__class__`` reassignment: same module, same Parameters, same
``state_dict`` and repr; its forward is ``fastlora.linear``, which is ``F.linear`` itself except
for bfloat16 / float16 on CPUs that emulate those GEMMs. ``fastlora.peft.patch`` does this for
the layers outside PEFT's LoRA layers.
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from fastlora.ops.linear import linear


class Float32ComputeLinear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`fastlora.linear` (no parameters, buffers or
    arguments added; prints as ``Linear``)."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)

    def _get_name(self):
        return nn.Linear.__name__


def patch_linears(model: nn.Module, skip: Optional[Callable[[str, nn.Linear], bool]] = None) -> int:
    """Swaps every ``nn.Linear`` (exact class) in ``model`` to :class:`Float32ComputeLinear` in
    place, except those for which ``skip(name, layer)`` is true. Returns the number swapped."""
    targets = [m for name, m in model.named_modules()
               if type(m) is nn.Linear and not (skip is not None and skip(name, m))]
    for module in targets:
        module.__class__ = Float32ComputeLinear
    return len(targets)


def unpatch_linears(model: nn.Module) -> int:
    """Undoes :func:`patch_linears`; returns the number of layers swapped back."""
    targets = [m for m in model.modules() if type(m) is Float32ComputeLinear]
    for module in targets:
        module.__class__ = nn.Linear
    return len(targets)
