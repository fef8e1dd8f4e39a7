"""PEFT's bitsandbytes LoRA layers (QLoRA) on ``fastlora.lora_quantized_linear``.

``LoraLinear4bit`` / ``LoraLinear8bitLt`` subclass PEFT's ``peft.tuners.lora.bnb.Linear4bit`` /
``Linear8bitLt`` and change only ``forward``: the base product runs on bitsandbytes' stored
codes and scales as they are (``fastlora.QuantizedWeight.from_bnb``: no copy, no dequantized
weight) in the same fused op as the LoRA branch, forward and backward. ``fastlora.peft.patch``
swaps them in (it also swaps ``LoraLinear``); state-dict keys, ``save_pretrained``, merge
(bitsandbytes' dequantize / requantize) and the rest of PEFT's API are PEFT's own.

Numerics: the base product and the LoRA branch are computed in float32 on x (float32 copies
of a half-precision x) and the dequantized weight, and rounded once to x's dtype, which is
bitsandbytes' output dtype. bitsandbytes computes the base product in its ``compute_dtype``
(often bfloat16) and, for 8-bit layers, on int8-quantized activations (LLM.int8()): fastlora's
result is at least as close to the exact product. The 8-bit layers' outlier threshold is
therefore irrelevant here (it keeps activation outliers out of int8, and activations are never
quantized).

Fast path: the conditions of ``fastlora.peft.LoraLinear`` (plain LoRA adapters, not merged,
no hooks, adapters in x's dtype or float32 on a half-precision x, one adapter or several
without dropout), with a base layer that is exactly ``bnb.nn.Linear4bit`` (or its
``LinearNF4`` / ``LinearFP4``) holding an NF4 / FP4 weight, or exactly ``bnb.nn.Linear8bitLt``
holding int8 codes (``has_fp16_weights=False``), on x's device. Falls back to PEFT's forward,
with a warning naming the reason, otherwise: weights not quantized yet, mixed-adapter batches (``adapter_names``), DoRA and other variants. PEFT's plain
``lora.Linear`` over a bitsandbytes layer (what ``get_peft_model`` builds on a hand-made model
that transformers did not load in 4 / 8 bits) takes the same path through
``fastlora.peft.LoraLinear``. A 4-bit weight that bitsandbytes repacked for its CPU
inference kernel (its own forward does so in eval mode without gradients) is restored to the
storage layout in place first, as bitsandbytes does before saving.
"""
from __future__ import annotations

import sys

import torch

import fastlora
from fastlora.peft.layer import FastLoraLayerMixin
from fastlora.quantize import QuantizedWeight
from fastlora.quantized_linear import QuantizedLinear

__all__ = ["LoraLinear4bit", "LoraLinear8bitLt", "available", "patch_classes"]


def _bnb():
    """bitsandbytes, if the program imported it; else None. fastlora never imports it itself: a
    model with bitsandbytes layers has imported it already, and importing it costs a second or
    more and prints backend messages on machines without its optional kernels."""
    return sys.modules.get("bitsandbytes")


def available() -> bool:
    """Whether bitsandbytes is imported and PEFT has its bitsandbytes LoRA layers."""
    return bool(_classes())


_CLASSES = None


def _classes() -> dict:
    """{"PeftLinear4bit", "LoraLinear4bit", ...}: PEFT's bitsandbytes LoRA classes and fastlora's
    subclasses, built once bitsandbytes is imported (empty until then)."""
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    if _bnb() is None:
        return {}
    try:
        from peft.tuners.lora import bnb as peft_bnb
    except ImportError:  # pragma: no cover - a PEFT without bitsandbytes support
        _CLASSES = {}
        return _CLASSES
    found = {}
    for kind, what in (("Linear4bit", "QLoRA over an NF4 / FP4 base"), ("Linear8bitLt", "LoRA over an LLM.int8() base")):
        peft_class = getattr(peft_bnb, kind, None)
        if peft_class is None:
            continue
        found[f"Peft{kind}"] = peft_class
        found[f"Lora{kind}"] = type(f"Lora{kind}", (_QuantizedBaseForward, peft_class), {
            "__doc__": f"PEFT's ``lora.bnb.{kind}`` ({what}) on ``fastlora.lora_quantized_linear``; see the "
                       "module docstring.",
            "__module__": __name__, "_fastlora_public_name": f"fastlora.peft.Lora{kind}", "_peft_class": peft_class})
    _CLASSES = found
    return _CLASSES


def __getattr__(name):
    # LoraLinear4bit / LoraLinear8bitLt / PeftLinear4bit / PeftLinear8bitLt: None until bitsandbytes is imported
    if name in ("LoraLinear4bit", "LoraLinear8bitLt", "PeftLinear4bit", "PeftLinear8bitLt"):
        return _classes().get(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _unpack_for_cpu():
    """bitsandbytes' inverse of its CPU inference repacking (private; absent in older versions)."""
    return getattr(getattr(_bnb(), "functional", None), "_convert_weight_packed_for_cpu_inverse", None)


def is_quantized_base(base) -> bool:
    """Whether ``base`` is a bitsandbytes quantized linear layer (4-bit or 8-bit)."""
    bnb = _bnb()
    return bnb is not None and type(base) in (bnb.nn.Linear4bit, bnb.nn.LinearNF4, bnb.nn.LinearFP4,
                                              bnb.nn.Linear8bitLt)


def quantized_base_reason(base):
    """Why ``fastlora.lora_quantized_linear`` cannot run on this bitsandbytes layer's stored
    weight (None if it can)."""
    w = base.weight
    if type(base) is _bnb().nn.Linear8bitLt:
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = getattr(base.state, "SCB", None)  # after the layer's first forward
        if getattr(base.state, "has_fp16_weights", False) or w.dtype != torch.int8 or scb is None:
            return "the 8-bit layer holds no int8 codes (has_fp16_weights=True, or not quantized yet)"
    else:
        qs = getattr(w, "quant_state", None)
        if qs is None:
            return "the 4-bit weight is not quantized yet (bitsandbytes quantizes when the layer moves to a device)"
        if getattr(qs, "packing_format_for_cpu", False) and _unpack_for_cpu() is None:
            return ("the 4-bit weight is repacked for bitsandbytes' CPU inference kernel "
                    "(packing_format_for_cpu; bitsandbytes does this in eval mode without gradients)")
        if qs.quant_type not in ("nf4", "fp4") or len(qs.shape) != 2:
            return f"unsupported 4-bit weight ({qs.quant_type}, shape {tuple(qs.shape)})"
    if w.device.type not in ("cpu", "cuda"):
        return f"the quantized weight is on {w.device}"
    return None


def quantized_forward(layer, x, plan):
    """The fused call of a LoRA layer over a quantized base (bitsandbytes' or a
    ``fastlora.QuantizedLinear``), for the fast-path plan."""
    base = layer.base_layer
    if isinstance(base, QuantizedLinear):
        return _fused(layer, x, plan, base.quantized_weight(), base.bias)
    w = base.weight
    if getattr(getattr(w, "quant_state", None), "packing_format_for_cpu", False):
        # bitsandbytes repacked the weight for its CPU inference kernel (its forward does this
        # in eval mode without gradients, e.g. in one of PEFT's fallbacks): back to its storage
        # layout, in place, as bitsandbytes itself does before saving.
        w.data, w.quant_state = _unpack_for_cpu()(w.data, w.quant_state)
    return _fused(layer, x, plan, QuantizedWeight.from_bnb(base), base.bias)


def _fused(layer, x, plan, weight, bias):
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)  # bitsandbytes casts its bias to the compute dtype as well
    lora_A, lora_B, scaling, p, training, lora_B_bias = layer._fastlora_adapters(plan)
    return fastlora.lora_quantized_linear(x, weight, bias, lora_A, lora_B, scaling, p, training,
                                          lora_B_bias=lora_B_bias)


class _QuantizedBaseForward(FastLoraLayerMixin):
    """forward() of the bitsandbytes LoRA layers."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if kwargs.get("adapter_names") is not None:
            plan = "mixed-adapter batch (adapter_names)" if not self.disable_adapters else None
        else:
            plan = self._fastlora_plan(x, args, kwargs)
        if isinstance(plan, str) or plan is None:
            if plan is not None:
                self._fastlora_warn(plan)
            return super().forward(x, *args, **kwargs)
        self.fastlora_calls = getattr(self, "fastlora_calls", 0) + 1
        return quantized_forward(self, x, plan)

    def _fastlora_base_reason(self):
        base = self.base_layer
        if not is_quantized_base(base):
            return f"base layer is {type(base).__module__}.{type(base).__qualname__}, not a bitsandbytes layer"
        return quantized_base_reason(base)

    def _fastlora_base_tensors(self):
        # The codes are uint8 / int8 by design; bias is cast to x's dtype (quantized_forward).
        return []

    def _get_name(self) -> str:
        # nn.Module's repr: print exactly as PEFT's class (PEFT prefixes "lora.").
        return self._peft_class.__name__


def patch_classes():
    """{PEFT's class: fastlora's} for the bitsandbytes layers (empty until bitsandbytes is imported)."""
    c = _classes()
    return {c[f"Peft{k}"]: c[f"Lora{k}"] for k in ("Linear4bit", "Linear8bitLt") if f"Lora{k}" in c}
