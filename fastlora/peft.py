"""PEFT drop-in: run PEFT's LoRA ``Linear`` layers through ``fastlora.lora_linear``.

``LoraLinear`` subclasses ``peft.tuners.lora.layer.Linear`` and adds no parameters, buffers
or config fields, so adapter files, ``state_dict`` keys, ``adapter_config.json`` and the whole
PEFT API (merge / unmerge / safe_merge, ``disable_adapter()``, ``set_adapter``,
``delete_adapter``, ``add_weighted_adapter``, ...) are PEFT's own. Only ``forward`` changes.

Three ways in:

1. Patch an existing model in place (same Parameter objects, no copies)::

       model = get_peft_model(base, LoraConfig(...))     # or PeftModel.from_pretrained(...)
       n = fastlora.peft.patch(model)                    # number of layers swapped
       fastlora.peft.unpatch(model)                      # back to PEFT's class

2. Build fastlora layers directly, via PEFT's (experimental) custom-module mapping::

       model = get_peft_model(base, fastlora.peft.register(LoraConfig(...)))

   PEFT does not save that mapping with the adapter, so to load use::

       model = fastlora.peft.from_pretrained(base, "path/or/hub-id")   # PeftModel.from_pretrained + patch

3. Nothing else changes: ``save_pretrained`` writes PEFT's files (stock PEFT loads them
   without fastlora) and PEFT-saved adapters load into fastlora layers. Layers that a later
   ``load_adapter`` / ``add_adapter`` creates on modules that had no LoRA layer yet are PEFT's
   class (unless the config went through ``register``): call ``patch`` again.

Fast path (one fused op per layer call, forward and backward): plain LoRA adapters (rsLoRA
scaling, ``lora_bias=True`` and dropout included), not merged, adapters enabled, a base layer
that is exactly ``torch.nn.Linear`` without hooks, ``fan_in_fan_out=False``, x / base weight /
LoRA weights of one dtype and device, autocast off. One active adapter is a single
``fastlora.lora_linear`` call with the adapter's dropout; several active adapters are
concatenated into one call (``A = cat(A_i)``, ``B = cat(scaling_i * B_i)``, scaling 1, lora_B
biases summed with their scalings) when none of them applies dropout (dropout p = 0 or the
dropout module in eval mode). ``layer.fastlora_calls`` counts fast-path calls;
``fast_path_calls(model)`` sums them.

Fallback to PEFT's own ``forward`` (identical results, a ``UserWarning`` once per layer and
reason naming the layer's class, adapter and reason):

- LoRA variants: DoRA (``use_dora=True``) and PEFT's other variants (aLoRA, ...);
- merged adapters (``merge_adapter()``: the base layer alone is the right computation);
- mixed-adapter batches (``adapter_names=[...]``), and any other extra forward argument;
- a base layer that is not exactly ``torch.nn.Linear`` (bitsandbytes ``Linear4bit`` /
  ``Linear8bitLt`` and other subclasses), or any module of the layer with hooks;
- ``fan_in_fan_out=True``;
- dtypes or devices that differ between x, the base layer and the adapters (e.g. PEFT's
  float32 adapters on a bfloat16 base model), or autocast enabled;
- several active adapters where at least one applies dropout.

Without any warning, because there is nothing LoRA to compute: adapters disabled
(``disable_adapter()`` context) and layers with no active adapter; they run PEFT's forward,
i.e. the base layer alone.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from peft.tuners.lora.layer import Linear as PeftLinear

import fastlora

__all__ = ["LoraLinear", "patch", "unpatch", "register", "from_pretrained", "fast_path_calls"]

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _has_hooks(module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _global_hooks() -> bool:
    m = nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
                or m._global_backward_pre_hooks)


def _dropout_of(module):
    """(p, training) of a LoRA dropout module, or None if it is not nn.Dropout / nn.Identity."""
    if type(module) is nn.Identity:
        return 0.0, False
    if type(module) is nn.Dropout:
        return float(module.p), bool(module.training)
    return None


class LoraLinear(PeftLinear):
    """PEFT's LoRA ``Linear`` whose forward runs ``fastlora.lora_linear`` (see the module
    docstring for the fast path and the fallbacks). Constructed exactly like PEFT's class, or
    obtained from one with ``fastlora.peft.patch``."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        plan = self._fastlora_plan(x, args, kwargs)
        if isinstance(plan, str) or plan is None:
            if plan is not None:
                self._fastlora_warn(plan)
            return super().forward(x, *args, **kwargs)
        self.fastlora_calls = getattr(self, "fastlora_calls", 0) + 1
        base = self.base_layer
        if len(plan) == 1:
            name, p, training = plan[0]
            lora_B = self.lora_B[name]
            return fastlora.lora_linear(x, base.weight, base.bias, self.lora_A[name].weight,
                                        lora_B.weight, self.scaling[name], p, training,
                                        lora_B_bias=lora_B.bias)
        # Several adapters, no dropout: sum_i s_i (x A_i^T B_i^T + b_i) = x A^T B^T + sum_i s_i b_i
        # with A = cat(A_i) and B = cat(s_i B_i); autograd flows back to every adapter.
        names = [name for name, _, _ in plan]
        lora_A = torch.cat([self.lora_A[n].weight for n in names], dim=0)
        lora_B = torch.cat([self.lora_B[n].weight * self.scaling[n] for n in names], dim=1)
        lora_B_bias = None
        for n in names:
            b = self.lora_B[n].bias
            if b is not None:
                lora_B_bias = b * self.scaling[n] if lora_B_bias is None else lora_B_bias + b * self.scaling[n]
        return fastlora.lora_linear(x, base.weight, base.bias, lora_A, lora_B, 1.0, 0.0, False,
                                    lora_B_bias=lora_B_bias)

    # -- decision ---------------------------------------------------------------------------

    def _fastlora_plan(self, x, args, kwargs):
        """[(adapter, dropout_p, training), ...] for the fast path, a reason string for a
        warned fallback, or None for a silent one (nothing LoRA to compute)."""
        if self.disable_adapters:
            return None
        if kwargs.get("adapter_names") is not None:
            return ("mixed-adapter batch (adapter_names=...) is not fused yet; "
                    "running PEFT's per-adapter loop")
        if args or any(v is not None for v in kwargs.values()):
            return f"extra forward arguments {sorted(kwargs)}" if kwargs else "extra positional forward arguments"
        if self.merged:
            return "adapters are merged into the base weight (the base layer alone is computed)"
        base = self.base_layer
        if type(base) is not nn.Linear:
            return f"base layer is {type(base).__module__}.{type(base).__qualname__}, not torch.nn.Linear"
        if self.fan_in_fan_out:
            return "fan_in_fan_out=True"
        names = [a for a in self.active_adapters if a in self.lora_A]
        if not names:
            return None
        variants = getattr(self, "lora_variant", {})
        plan = []
        for name in names:
            if name in variants:
                what = "DoRA (use_dora=True)" if self.use_dora.get(name, False) else \
                    f"LoRA variant {type(variants[name]).__name__}"
                return f"adapter {name!r} uses {what}"
            A, B, drop = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
            dropout = _dropout_of(drop)
            if type(A) is not nn.Linear or type(B) is not nn.Linear or A.bias is not None or dropout is None:
                return f"adapter {name!r} has non-standard lora_A / lora_B / lora_dropout modules"
            if any(_has_hooks(m) for m in (A, B, drop)):
                return f"adapter {name!r} has hooks on its lora_A / lora_B / lora_dropout modules"
            plan.append((name, *dropout))
        if _has_hooks(base) or _global_hooks():
            return "module hooks on the base layer (or global module hooks)"
        if len(plan) > 1 and any(p > 0 and training for _, p, training in plan):
            return "several active adapters with dropout in training mode"
        tensors = [x, base.weight, base.bias]
        for name in names:
            tensors += [self.lora_A[name].weight, self.lora_B[name].weight, self.lora_B[name].bias]
        if x.dtype not in _SUPPORTED_DTYPES or any(
                t is not None and (t.dtype != x.dtype or t.device != x.device) for t in tensors):
            kinds = sorted({f"{t.dtype}/{t.device}" for t in tensors if t is not None})
            return f"mixed dtypes/devices between input, base layer and adapters ({', '.join(kinds)})"
        if torch.is_autocast_enabled(x.device.type):
            return "autocast is enabled"
        return plan

    def _fastlora_warn(self, reason: str) -> None:
        warned = self.__dict__.setdefault("_fastlora_warned", set())
        if reason in warned:
            return
        warned.add(reason)
        warnings.warn(f"fastlora.peft.LoraLinear (adapters {list(self.active_adapters)}, "
                      f"{self.in_features}->{self.out_features}): falling back to PEFT's forward: "
                      f"{reason}", UserWarning, stacklevel=3)

    def __repr__(self) -> str:
        return "fastlora." + super().__repr__()


# --- ways in ------------------------------------------------------------------------------------

def patch(model: nn.Module) -> int:
    """Swap every PEFT LoRA ``Linear`` (exact class) in ``model`` to ``LoraLinear`` in place, by
    reassigning ``__class__``: same module objects, same Parameter objects, no copies. Returns
    the number of layers swapped (already patched layers are not counted)."""
    n = 0
    for module in model.modules():
        if type(module) is PeftLinear:
            module.__class__ = LoraLinear
            module.fastlora_calls = 0
            n += 1
    return n


def unpatch(model: nn.Module) -> int:
    """Undo ``patch``: every ``LoraLinear`` in ``model`` becomes PEFT's ``Linear`` again (also
    layers built through ``register``). Returns the number of layers swapped back."""
    n = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.__class__ = PeftLinear
            module.__dict__.pop("fastlora_calls", None)
            module.__dict__.pop("_fastlora_warned", None)
            n += 1
    return n


def register(config):
    """Register ``LoraLinear`` as PEFT's custom LoRA module for ``torch.nn.Linear`` on a
    ``LoraConfig`` and return it, so ``get_peft_model(model, config)`` builds fastlora layers.
    The mapping is not saved with the adapter: load with ``fastlora.peft.from_pretrained``."""
    config._register_custom_module({nn.Linear: LoraLinear})
    return config


def from_pretrained(model: nn.Module, model_id, **kwargs):
    """``peft.PeftModel.from_pretrained(model, model_id, **kwargs)`` followed by ``patch``."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, model_id, **kwargs)
    patch(peft_model)
    return peft_model


def fast_path_calls(model: nn.Module) -> int:
    """Total number of fast-path forward calls of the ``LoraLinear`` layers in ``model``."""
    return sum(getattr(m, "fastlora_calls", 0) for m in model.modules() if isinstance(m, LoraLinear))
