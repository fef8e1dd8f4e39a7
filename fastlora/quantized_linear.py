"""``fastlora.QuantizedLinear``: a frozen linear layer with an NF4 / FP4 / int8 weight, without
bitsandbytes, and ``fastlora.quantize_model`` to swap a model's linear layers for it.

The layer is an ``nn.Linear`` subclass whose ``weight`` is the uint8 codes (frozen), so PEFT
wraps it as it wraps any linear layer (``get_peft_model`` builds its ``lora.Linear`` around it)
and ``fastlora.peft.patch`` runs those LoRA layers on ``fastlora.lora_quantized_linear``. Its
state dict holds the codes, the scales and the format, so a quantized model saves and loads as
usual (``load_state_dict`` into a model quantized the same way).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import nn

from fastlora.ops.lora_quantized_linear import lora_quantized_linear
from fastlora.float32_compute import Float32ComputeLinear
from fastlora.quantize import FORMATS, QuantizedWeight, quantize

__all__ = ["QuantizedLinear", "quantize_model"]


class QuantizedLinear(nn.Linear):
    """``y = x @ dequant(W)^T + bias`` with W stored quantized (see ``fastlora.quantize``); the
    full-precision weight is never built. Frozen: the codes get no gradient (the bias may train).
    Build with :meth:`from_linear` or :func:`quantize_model`."""

    def __init__(self, weight: QuantizedWeight, bias: Optional[torch.Tensor] = None):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.format, self.blocksize, self.compute_dtype = weight.format, weight.blocksize, weight.dtype
        # The codes as the weight (uint8, frozen): what PEFT and the optimizer see.
        self.weight = nn.Parameter(weight.data, requires_grad=False)
        self.register_buffer("absmax", weight.absmax)
        self.nested = weight.nested
        self.register_buffer("nested_absmax", weight.nested_absmax if weight.nested else None)
        self.register_buffer("nested_code", weight.nested_code if weight.nested else None)
        self.register_buffer("offset", torch.as_tensor(weight.offset if weight.nested else 0.0, dtype=torch.float32,
                                                       device=weight.device).clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str = "nf4", **kwargs) -> "QuantizedLinear":
        """Quantizes ``linear.weight`` (``fastlora.quantize(weight, fmt, **kwargs)``); the bias
        is kept in full precision."""
        if not isinstance(linear, nn.Linear) or isinstance(linear, QuantizedLinear):
            raise TypeError(f"QuantizedLinear.from_linear: expected a torch.nn.Linear, got {type(linear).__name__}")
        return cls(quantize(linear.weight, fmt, **kwargs), linear.bias)

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.format, self.weight.data, self.absmax, self.blocksize,
                               (self.out_features, self.in_features), self.compute_dtype,
                               nested_absmax=self.nested_absmax, nested_code=self.nested_code,
                               offset=self.offset if self.nested else None)

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return self.quantized_weight().dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # rank-0 adapters: the fused op's base product alone
        no_a = x.new_zeros(0, self.in_features)
        no_b = x.new_zeros(self.out_features, 0)
        bias = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        return lora_quantized_linear(x, self.quantized_weight(), bias, no_a, no_b, 1.0, 0.0, False)

    def get_extra_state(self):
        return {"format": self.format, "blocksize": self.blocksize, "nested": self.nested,
                "compute_dtype": str(self.compute_dtype).removeprefix("torch.")}

    def set_extra_state(self, state):
        if state["format"] != self.format or state["blocksize"] != self.blocksize or state["nested"] != self.nested:
            raise ValueError(f"QuantizedLinear: the state dict holds a {state['format']} weight (blocksize "
                             f"{state['blocksize']}, nested={state['nested']}) but this layer is {self.format} "
                             f"(blocksize {self.blocksize}, nested={self.nested}); quantize the model the same way")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.format}, blocksize={self.blocksize}, nested={self.nested}")


def quantize_model(model: nn.Module, fmt: str = "nf4", *, modules: Optional[Iterable[str]] = None,
                   skip: Optional[Callable[[str, nn.Linear], bool]] = None, **kwargs) -> int:
    """Replaces ``model``'s ``nn.Linear`` layers (also those ``patch_linears`` swapped to
    ``Float32ComputeLinear``) in place with :class:`QuantizedLinear` (the frozen base of QLoRA;
    call it before ``get_peft_model``). ``modules``: names (or name
    suffixes, as PEFT's target_modules) to quantize, default every linear layer; ``skip(name,
    layer)`` excludes layers (e.g. a classification head that will be trained). Returns the
    number of layers replaced."""
    if fmt not in FORMATS:
        raise ValueError(f"fastlora.quantize_model: unknown format {fmt!r}; expected one of {FORMATS}")
    wanted = None if modules is None else list(modules)
    targets = []
    for name, module in model.named_modules():
        if type(module) not in (nn.Linear, Float32ComputeLinear):
            continue
        if wanted is not None and not any(name == w or name.endswith("." + w) for w in wanted):
            continue
        if skip is not None and skip(name, module):
            continue
        targets.append(name)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantizedLinear.from_linear(getattr(parent, child), fmt, **kwargs))
    return len(targets)
