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
scaling, ``lora_bias=True`` and dropout included), DoRA adapters, dropout included (one
active adapter, dense base, no lora_bias: see ``_fastlora_dora_forward``), not merged, adapters enabled, a base layer
that is exactly ``torch.nn.Linear`` without hooks, ``fan_in_fan_out=False``, x and the base
layer of one dtype and device, the LoRA weights in that dtype or, on a float16 / bfloat16
model, in float32 (PEFT's default, ``autocast_adapter_dtype=True``: the LoRA branch then runs
in float32 on x cast to it, as in PEFT, and the adapters get float32 gradients). Under ``torch.autocast`` (e.g. ``transformers.Trainer``
with ``bf16=True``) the fused ops run in the autocast dtype, as PEFT's modules do (nn.Linear
autocasts; float32 adapters keep float32 gradients). One active adapter is a single
``fastlora.lora_linear`` call with the adapter's dropout; several active adapters are
concatenated into one call (``A = cat(A_i)``, ``B = cat(scaling_i * B_i)``, scaling 1, lora_B
biases summed with their scalings) when none of them applies dropout (dropout p = 0 or the
dropout module in eval mode). ``layer.fastlora_calls`` counts fast-path calls;
``fast_path_calls(model)`` sums them.

Mixed-adapter batches (``model(x, adapter_names=["a", "b", "__base__", ...])``, PEFT's
per-sample adapters) run as one ``fastlora.lora_grouped_linear`` call per layer (grouped,
punica SGMV-style) instead of PEFT's Python loop over adapters with boolean-mask gathers, when
every adapter used in the batch is plain LoRA (no DoRA / variants, no ``lora_bias``), its
dropout is inactive (p = 0 or eval mode: PEFT applies dropout in mixed batches too), and the
base layer / dtype / device / hook conditions above hold (float32 adapters on a half-precision
model are stacked rounded to the model's dtype once, where PEFT rounds each adapter's output to
it). Names are mapped to ids
per call (``"__base__"`` and adapters this layer does not hold -> base only, as in PEFT) and
expanded over the sequence dims. The adapters' weights are stacked once and cached per
(adapter set, Parameter objects, their ``_version``, scalings), so repeated inference calls do
not re-stack; any in-place update of a LoRA parameter (optimizer step, ``load_state_dict``,
``copy_`` under ``no_grad``) bumps its version and invalidates the cache, and so does a new
storage (``param.data = ...``, ``module.to(...)``). In-place writes through ``param.data``
bypass version counting: call ``clear_stacked_cache(model)`` after those. Under
grad mode with parameters requiring grad the stack is rebuilt each call (differentiable).

Fallback to PEFT's own ``forward`` (identical results, a ``UserWarning`` once per layer and
reason naming the layer's class, adapter and reason):

- LoRA variants: DoRA (``use_dora=True``) with lora_bias, over a quantized base or with other
  adapters active; PEFT's other variants (aLoRA, ...);
- mixed-adapter batches using DoRA / variants, ``lora_bias=True`` or active dropout (see
  above), and any other extra forward argument;
- a base layer that is not exactly ``torch.nn.Linear``, or any module of the layer with hooks
  (PEFT's bitsandbytes LoRA layers are other classes, swapped by ``patch`` to
  ``fastlora.peft.bnb``'s, which run ``fastlora.lora_quantized_linear``);
- ``fan_in_fan_out=True``;
- dtypes or devices that differ between x, the base layer and the adapters other than the
  float32 adapters above;
- several active adapters where at least one applies dropout.

Without any warning, because there is nothing LoRA to compute: adapters disabled
(``disable_adapter()`` context), merged adapters (``merge_adapter()``) and layers with no
active adapter. The base layer alone is the computation: ``fastlora.linear`` on its weight
(bfloat16 / float16 in float32 where the CPU emulates those GEMMs) when it is a plain
``nn.Linear`` without hooks, else PEFT's forward (also for disabled adapters that are still
merged: PEFT unmerges first). Not counted in ``fastlora_calls``.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict

import torch
from torch import nn

from peft.tuners.lora.layer import Linear as PeftLinear

import fastlora
from fastlora.quantized_linear import QuantizedLinear

__all__ = ["LoraLinear", "patch", "unpatch", "register", "from_pretrained", "fast_path_calls", "clear_stacked_cache"]

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Under autocast: the dtypes the ops cast to the autocast dtype (float64 is left alone).
_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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


def dora_weight_norm(weight, lora_A, lora_B, scaling):
    """DoRA's ||W + scaling * B @ A|| over each output row (W: out x in), in float32 (float64 for
    float64), from ||W_n||^2 + 2 s B_n . (A W_n^T) + s^2 B_n (A A^T) B_n^T: O(out x in x r) work
    and out x r memory, never the out x in matrix B @ A."""
    ct = torch.float64 if weight.dtype == torch.float64 else torch.float32
    A, B = lora_A.to(ct), lora_B.to(ct)
    WAt = (weight @ lora_A.to(weight.dtype).t()).to(ct)  # out x r, in W's dtype (the BLAS accumulates in float32)
    sq = torch.linalg.vector_norm(weight, dim=1, dtype=ct).square()
    sq = sq + 2.0 * scaling * (B * WAt).sum(1) + scaling * scaling * ((B @ (A @ A.t())) * B).sum(1)
    return sq.clamp_min(0).sqrt()


def _dtype_reason(x, base_tensors, adapter_tensors, float32_adapters=True):
    """Why the fused ops cannot take these tensors (None if they can): one supported dtype and
    one device for the input and the base layer; the adapters in that dtype or, with
    float32_adapters, all float32 on a float16 / bfloat16 input (PEFT's default for
    half-precision models; lora_linear computes the branch in float32 as PEFT does). Under
    autocast, any mix of float32 / float16 / bfloat16: the ops cast them all to the autocast
    dtype themselves, as PEFT's nn.Linear modules do (an input already in bfloat16 from an
    autocast layer before included)."""
    tensors = [t for t in (x, *base_tensors, *adapter_tensors) if t is not None]
    adapters = [t for t in adapter_tensors if t is not None]
    if torch.is_autocast_enabled(x.device.type):
        ok = all(t.dtype in _AUTOCAST_DTYPES for t in tensors)
    else:
        adapter_dtypes = {t.dtype for t in adapters}
        ok = (all(t.dtype == x.dtype for t in base_tensors if t is not None)
              and (adapter_dtypes <= {x.dtype} or (float32_adapters and adapter_dtypes == {torch.float32}
                                                   and x.dtype in (torch.float16, torch.bfloat16))))
    if x.dtype not in _SUPPORTED_DTYPES or not ok or any(t.device != x.device for t in tensors):
        kinds = sorted({f"{t.dtype}/{t.device}" for t in tensors})
        return f"mixed dtypes/devices between input, base layer and adapters ({', '.join(kinds)})"
    return None


class FastLoraLayerMixin:
    """The fast-path decision shared by fastlora's PEFT layers (``LoraLinear`` here, the
    bitsandbytes layers in ``fastlora.peft.bnb``): which adapters run, with which dropout, or
    why the layer falls back. A layer class supplies ``_fastlora_base_reason`` (can its base
    layer run on the fused op at all) and ``_fastlora_base_tensors`` (the base tensors that must
    match x's dtype and device)."""

    _fastlora_public_name = "fastlora.peft layer"  # how warnings name the class
    _fastlora_dora_ok = False  # whether forward() runs DoRA adapters (LoraLinear does)

    def _fastlora_plan(self, x, args, kwargs):
        """[(adapter, dropout_p, training), ...] for the fast path, a reason string for a
        warned fallback, or None for a silent one (nothing LoRA to compute)."""
        if self.disable_adapters:
            return None
        if args or any(v is not None for v in kwargs.values()):
            return f"extra forward arguments {sorted(kwargs)}" if kwargs else "extra positional forward arguments"
        if self.merged:
            return None  # the base layer alone (on the merged weight) is the computation
        reason = self._fastlora_base_reason()
        if reason:
            return reason
        names = [a for a in self.active_adapters if a in self.lora_A]
        if not names:
            return None
        plan = []
        for name in names:
            dropout = self._fastlora_adapter_check(name, allow_dora=self._fastlora_dora_ok and len(names) == 1)
            if isinstance(dropout, str):
                return dropout
            plan.append((name, *dropout))
        if _has_hooks(self.base_layer) or _global_hooks():
            return "module hooks on the base layer (or global module hooks)"
        if len(plan) > 1 and any(p > 0 and training for _, p, training in plan):
            return "several active adapters with dropout in training mode"
        adapters = []
        for name in names:
            adapters += [self.lora_A[name].weight, self.lora_B[name].weight, self.lora_B[name].bias]
            if name in getattr(self, "lora_variant", {}):
                adapters.append(self.lora_magnitude_vector[name].weight)
        return _dtype_reason(x, self._fastlora_base_tensors(), adapters) or plan

    def _fastlora_base_tensors(self):
        return [self.base_layer.weight, self.base_layer.bias]

    def _fastlora_adapters(self, plan):
        """(lora_A, lora_B, scaling, dropout_p, training, lora_B_bias) of the fused call: the
        adapter itself, or several without dropout concatenated: sum_i s_i (x A_i^T B_i^T + b_i)
        = x A^T B^T + sum_i s_i b_i with A = cat(A_i) and B = cat(s_i B_i); autograd flows back
        to every adapter."""
        if len(plan) == 1:
            name, p, training = plan[0]
            lora_B = self.lora_B[name]
            return self.lora_A[name].weight, lora_B.weight, self.scaling[name], p, training, lora_B.bias
        names = [name for name, _, _ in plan]
        lora_A = torch.cat([self.lora_A[n].weight for n in names], dim=0)
        lora_B = torch.cat([self.lora_B[n].weight * self.scaling[n] for n in names], dim=1)
        lora_B_bias = None
        for n in names:
            b = self.lora_B[n].bias
            if b is not None:
                lora_B_bias = b * self.scaling[n] if lora_B_bias is None else lora_B_bias + b * self.scaling[n]
        return lora_A, lora_B, 1.0, 0.0, False, lora_B_bias

    def _fastlora_adapter_check(self, name, allow_dora=False):
        """(dropout_p, training) of adapter ``name`` if its modules suit the fused ops (plain
        LoRA, standard modules, no hooks; with ``allow_dora``, also DoRA as
        ``_fastlora_dora_reason`` allows), else the reason it does not, as a string."""
        variants = getattr(self, "lora_variant", {})
        if name in variants:
            if self._fastlora_is_dora(name):
                if not allow_dora:
                    return f"adapter {name!r} uses DoRA (use_dora=True)"
                reason = self._fastlora_dora_reason(name)
                if reason:
                    return reason
            else:
                return f"adapter {name!r} uses LoRA variant {type(variants[name]).__name__}"
        A, B, drop = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        dropout = _dropout_of(drop)
        if type(A) is not nn.Linear or type(B) is not nn.Linear or A.bias is not None or dropout is None:
            return f"adapter {name!r} has non-standard lora_A / lora_B / lora_dropout modules"
        if any(_has_hooks(m) for m in (A, B, drop)):
            return f"adapter {name!r} has hooks on its lora_A / lora_B / lora_dropout modules"
        return dropout

    def _fastlora_is_dora(self, name) -> bool:
        return bool(getattr(self, "use_dora", {}).get(name, False)) and \
            type(self.lora_variant[name]).__name__ == "DoraLinearVariant"

    def _fastlora_dora_reason(self, name):
        """Why adapter ``name``'s DoRA cannot take the fused path (None if it can): it needs a
        dense ``nn.Linear`` base (the weight norm reads W) and no lora_bias."""
        if type(self.base_layer) is not nn.Linear:
            return f"adapter {name!r} uses DoRA over a {type(self.base_layer).__name__} base"
        if self.lora_B[name].bias is not None:
            return f"adapter {name!r} uses DoRA with lora_bias=True"
        magnitude = self.lora_magnitude_vector[name]
        if _has_hooks(magnitude):
            return f"adapter {name!r} has hooks on its DoRA magnitude module"
        return None

    def _fastlora_warn(self, reason: str) -> None:
        warned = self.__dict__.setdefault("_fastlora_warned", set())
        if reason in warned:
            return
        warned.add(reason)
        warnings.warn(f"{self._fastlora_public_name} (adapters {list(self.active_adapters)}, "
                      f"{self.in_features}->{self.out_features}): falling back to PEFT's forward: "
                      f"{reason}", UserWarning, stacklevel=3)


class LoraLinear(FastLoraLayerMixin, PeftLinear):
    """PEFT's LoRA ``Linear`` whose forward runs ``fastlora.lora_linear`` (see the module
    docstring for the fast path and the fallbacks). Constructed exactly like PEFT's class, or
    obtained from one with ``fastlora.peft.patch``."""

    _fastlora_public_name = "fastlora.peft.LoraLinear"
    _fastlora_dora_ok = True

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if kwargs.get("adapter_names") is not None:
            return self._fastlora_mixed_forward(x, args, kwargs)
        plan = self._fastlora_plan(x, args, kwargs)
        if plan is None and self._fastlora_base_alone_ok(args, kwargs):
            # Nothing LoRA to compute (adapters disabled, merged, none active): PEFT would call
            # the base layer; fastlora.linear is that product, in float32 where the CPU
            # emulates half-precision GEMMs.
            base = self.base_layer
            return fastlora.linear(x, base.weight, base.bias)
        if isinstance(plan, str) or plan is None:
            if plan is not None:
                self._fastlora_warn(plan)
            return super().forward(x, *args, **kwargs)
        self.fastlora_calls = getattr(self, "fastlora_calls", 0) + 1
        base = self.base_layer
        if type(base) is not nn.Linear:  # a quantized base (_fastlora_base_reason let it through)
            from fastlora.peft import bnb
            return bnb.quantized_forward(self, x, plan)
        if len(plan) == 1 and plan[0][0] in getattr(self, "lora_variant", {}):
            return self._fastlora_dora_forward(x, *plan[0])
        lora_A, lora_B, scaling, p, training, lora_B_bias = self._fastlora_adapters(plan)
        return fastlora.lora_linear(x, base.weight, base.bias, lora_A, lora_B, scaling, p, training,
                                    lora_B_bias=lora_B_bias)

    def _fastlora_base_alone_ok(self, args, kwargs) -> bool:
        """Whether the base layer alone may run as fastlora.linear: a plain ``nn.Linear`` base
        without hooks or extra arguments, and not PEFT's disabled-while-merged case (its forward
        unmerges first)."""
        return (not args and all(v is None for v in kwargs.values()) and type(self.base_layer) is nn.Linear
                and not self.fan_in_fan_out and not (self.disable_adapters and self.merged)
                and not _has_hooks(self.base_layer) and not _global_hooks())

    def _fastlora_dora_forward(self, x, name, dropout_p, training):
        """PEFT's DoRA on the fused op. With m the magnitude vector and the per-output-row norm
        ||W + s B A|| treated as a constant (DoRA's section 4.3, as PEFT does), PEFT computes
        ``result + (m / norm - 1) * x_d W^T + (m / norm) * s * x_d A^T B^T`` with x_d the
        dropped input (x itself without active dropout), which is

            (m / norm) * lora_linear(x_d, W, None, A, B, s) + (x - x_d) W^T + bias

        (without dropout the second product vanishes): the same two products with W as PEFT's
        with dropout, one without. x_d is drawn by the adapter's own dropout module (PEFT's mask
        for the same RNG state). The norm comes from W, A, B without building B @ A (see
        dora_weight_norm); PEFT builds it (out x in) every call."""
        base = self.base_layer
        A, B, s = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
        magnitude = self.lora_magnitude_vector[name].weight
        with torch.no_grad():
            norm = dora_weight_norm(base.weight, A, B, s)
        dropped = dropout_p > 0 and training
        x_d = self.lora_dropout[name](x) if dropped else x
        y = fastlora.lora_linear(x_d, base.weight, None, A, B, s, 0.0, False)
        ct = torch.float64 if y.dtype == torch.float64 else torch.float32
        out = y.to(ct) * (magnitude.to(ct) / norm.to(ct))
        if dropped:
            out = out + fastlora.linear(x - x_d, base.weight, base.bias).to(ct)
        elif base.bias is not None:
            out = out + base.bias.to(ct)
        return out.to(y.dtype)

    # -- mixed-adapter batches ---------------------------------------------------------------

    def _fastlora_mixed_forward(self, x, args, kwargs):
        plan = self._fastlora_mixed_plan(x, args, kwargs)
        if not isinstance(plan, tuple):
            if plan is not None:
                self._fastlora_warn(plan)
            return super().forward(x, *args, **kwargs)
        used, names = plan
        self.fastlora_calls = getattr(self, "fastlora_calls", 0) + 1
        base = self.base_layer
        lora_A, lora_B, ranks, scalings = self._fastlora_stacked(used, x.dtype)
        ids = {name: i for i, name in enumerate(used)}
        # One id per sample (PEFT indexes the batch dim); the wrapper expands it over the
        # sequence dims. A CPU tensor: the kernels schedule on the host.
        row_adapter = torch.tensor([ids.get(n, -1) for n in names], dtype=torch.int64)
        return fastlora.lora_grouped_linear(x, base.weight, base.bias, lora_A, lora_B, scalings, row_adapter,
                                            ranks=ranks)

    def _fastlora_mixed_plan(self, x, args, kwargs):
        """(adapters used, per-sample names) for the grouped fast path, a reason string for a
        warned fallback, or None for a silent one."""
        self._check_forward_args(x, *args, **kwargs)  # PEFT's own errors (length, merged, DoRA)
        if self.disable_adapters:
            return None
        extra = sorted(k for k, v in kwargs.items() if k != "adapter_names" and v is not None)
        if args or extra:
            return f"extra forward arguments {extra}" if extra else "extra positional forward arguments"
        reason = self._fastlora_base_reason()
        if reason:
            return reason
        if x.dim() < 2:
            return "mixed-adapter batch with a 1-D input"
        names = list(kwargs["adapter_names"])
        # As PEFT: "__base__" and adapters this layer does not hold add nothing.
        # Over the distinct names: a batch of one-row samples has thousands of entries, and each
        # self.lora_A lookup goes through nn.Module.__getattr__ (4 ms per call at 2048 rows).
        lora_A = self.lora_A
        used = sorted(n for n in set(names) if n != "__base__" and n in lora_A)
        if not used:
            return None
        for name in used:
            dropout = self._fastlora_adapter_check(name)
            if isinstance(dropout, str):
                return f"mixed-adapter batch: {dropout}"
            if self.lora_B[name].bias is not None:
                return f"mixed-adapter batch: adapter {name!r} has lora_bias=True"
            p, training = dropout
            if p > 0 and training:
                return f"mixed-adapter batch: adapter {name!r} applies dropout (training mode)"
        if _has_hooks(self.base_layer) or _global_hooks():
            return "module hooks on the base layer (or global module hooks)"
        base = self.base_layer
        adapters = []
        for name in used:
            adapters += [self.lora_A[name].weight, self.lora_B[name].weight]
        # The grouped op takes one dtype: float32 adapters on a half-precision model (PEFT's
        # default) are stacked in the model's dtype (_fastlora_stacked).
        return _dtype_reason(x, [base.weight, base.bias], adapters) or (used, names)

    _FASTLORA_STACK_CACHE = 4  # adapter sets kept per layer

    def _fastlora_stacked(self, used, dtype):
        """(lora_A (K, r_max, in), lora_B (K, out, r_max), ranks, scalings) of the adapters
        ``used`` in ``dtype`` (the model's: float32 adapters on a half-precision model are
        rounded to it once, where PEFT rounds each LoRA output to it), cached while the
        Parameter objects, their versions and the scalings stay the same. Under grad mode with
        trainable LoRA weights: rebuilt (differentiable), not cached."""
        As = [self.lora_A[n].weight for n in used]
        Bs = [self.lora_B[n].weight for n in used]
        sdt = torch.float64 if dtype == torch.float64 else torch.float32
        scal = tuple(float(self.scaling[n]) for n in used)

        def stack():
            A, B, ranks = fastlora.stack_lora_adapters(As, Bs)
            return A.to(dtype), B.to(dtype), ranks, torch.tensor(scal, dtype=sdt)

        if torch.is_grad_enabled() and any(p.requires_grad for p in As + Bs):
            return stack()
        cache = self.__dict__.setdefault("_fastlora_stack_cache", OrderedDict())
        key = (tuple(used), scal, dtype)
        # data_ptr / dtype / device: `.data = ...` and module.to() keep the Parameter object.
        versions = tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in As + Bs)
        hit = cache.get(key)
        # The entry holds the Parameter objects themselves: compared by identity (never a
        # recycled id or address), then by version.
        if hit is not None and hit[1] == versions and all(a is b for a, b in zip(hit[0], As + Bs)):
            cache.move_to_end(key)
            return hit[2]
        with torch.no_grad():
            value = stack()
        cache[key] = (tuple(As + Bs), versions, value)
        cache.move_to_end(key)
        while len(cache) > self._FASTLORA_STACK_CACHE:
            cache.popitem(last=False)
        return value

    # -- decision (the rest is FastLoraLayerMixin's) ----------------------------------------

    def _fastlora_base_reason(self):
        """Why the base layer rules the fused ops out (None if it does not)."""
        base = self.base_layer
        if self.fan_in_fan_out:
            return "fan_in_fan_out=True"
        if type(base) is nn.Linear or type(base) is QuantizedLinear:
            return None
        from fastlora.peft import bnb
        if bnb.is_quantized_base(base):
            return bnb.quantized_base_reason(base)
        return f"base layer is {type(base).__module__}.{type(base).__qualname__}, not torch.nn.Linear"

    def _fastlora_base_tensors(self):
        if type(self.base_layer) is not nn.Linear:
            return []  # a quantized base: its codes are uint8 / int8, its bias is cast to x's dtype
        return [self.base_layer.weight, self.base_layer.bias]

    def merge(self, *args, **kwargs):
        if isinstance(self.get_base_layer(), QuantizedLinear):
            raise ValueError("fastlora.peft.LoraLinear: merging an adapter into a fastlora.QuantizedLinear base "
                             "is not supported (its weight is codes); keep the adapter separate, or merge into "
                             "the unquantized model")
        try:
            return super().merge(*args, **kwargs)
        finally:
            # PEFT writes the merged weight through .data, which the version counter does not
            # see, and a small delta changes few bfloat16 values: drop the float32 copies.
            fastlora.cpu.clear_weight_cache()

    def unmerge(self, *args, **kwargs):
        try:
            return super().unmerge(*args, **kwargs)
        finally:
            fastlora.cpu.clear_weight_cache()  # as in merge

    def _get_name(self) -> str:
        # The name nn.Module's repr prints: a patched model prints exactly as PEFT's
        # ("lora.Linear(...)"); type(layer) and layer.fastlora_calls tell the layers apart.
        return PeftLinear.__name__


# --- ways in ------------------------------------------------------------------------------------

def _swaps():
    """{PEFT's LoRA class: fastlora's}: Linear, and the bitsandbytes layers when installed."""
    from fastlora.peft import bnb

    return {PeftLinear: LoraLinear, **bnb.patch_classes()}


def patch(model: nn.Module, linears: bool = True) -> int:
    """Swap every PEFT LoRA ``Linear`` (exact class) in ``model`` to ``LoraLinear``, and PEFT's
    bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` LoRA layers to ``fastlora.peft.bnb``'s, in
    place, by reassigning ``__class__``: same module objects, same Parameter objects, no copies.
    With ``linears`` (the default), also every other plain ``nn.Linear`` (not inside a LoRA
    layer) to ``fastlora.Float32ComputeLinear`` (``fastlora.patch_linears``), whose bfloat16 /
    float16 products run in float32 on CPUs that emulate them (``fastlora.linear``; elsewhere it
    is ``F.linear``). Returns the number of LoRA layers swapped (already patched layers are not
    counted)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    swaps = _swaps()
    # A LoRA layer's own linears (base layer, lora_A / lora_B) stay plain nn.Linear: the fused ops
    # compute them. One that a later add_adapter / load_adapter wrapped after an earlier patch
    # swapped it (PEFT takes any nn.Linear subclass as a base) goes back.
    inside = {id(m) for layer in model.modules() if isinstance(layer, BaseTunerLayer) for m in layer.modules()}
    for module in model.modules():
        if id(module) in inside and type(module) is fastlora.Float32ComputeLinear:
            module.__class__ = nn.Linear
    n = 0
    for module in model.modules():
        new_class = swaps.get(type(module))
        if new_class is not None:
            module.__class__ = new_class
            module.fastlora_calls = 0
            n += 1
    if linears:
        fastlora.patch_linears(model, skip=lambda name, m: id(m) in inside)
    return n


def unpatch(model: nn.Module) -> int:
    """Undo ``patch``: every fastlora layer in ``model`` becomes PEFT's class again (also
    layers built through ``register``), and every ``fastlora.Float32ComputeLinear`` an
    ``nn.Linear``. Returns the number of LoRA layers swapped back."""
    fastlora.unpatch_linears(model)
    back = {new: old for old, new in _swaps().items()}
    n = 0
    for module in model.modules():
        old_class = back.get(type(module))
        if old_class is not None:
            module.__class__ = old_class
            module.__dict__.pop("fastlora_calls", None)
            module.__dict__.pop("_fastlora_warned", None)
            module.__dict__.pop("_fastlora_stack_cache", None)
            n += 1
    return n


def clear_stacked_cache(model: nn.Module) -> None:
    """Drop the stacked adapter weights that ``LoraLinear`` layers cache for mixed-adapter
    batches (needed only after writing LoRA weights through ``param.data``, which does not bump
    the version counter the cache checks)."""
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.__dict__.pop("_fastlora_stack_cache", None)


def register(config):
    """Register ``LoraLinear`` as PEFT's custom LoRA module for ``torch.nn.Linear`` on a
    ``LoraConfig`` and return it, so ``get_peft_model(model, config)`` builds fastlora layers.
    The mapping is not saved with the adapter: load with ``fastlora.peft.from_pretrained``.
    Parameters named by ``target_parameters`` keep PEFT's own ``ParamWrapper``."""
    config._register_custom_module({nn.Linear: _lora_linear_or_param_wrapper})
    return config


def _lora_linear_or_param_wrapper(target, adapter_name, config, **kwargs):
    # PEFT's custom-module dispatch runs for target_parameters too (kwargs then name the
    # parameter): those stay PEFT's ParamWrapper, which wraps the parameter on its own (and
    # nests one wrapper per targeted parameter), so a later adapter finds the wrapper it expects.
    if kwargs.get("parameter_name") is not None:
        from peft.tuners.lora.layer import dispatch_default

        return dispatch_default(target, adapter_name, config=config, **kwargs)
    return LoraLinear(target, adapter_name, config=config, **kwargs)


def from_pretrained(model: nn.Module, model_id, **kwargs):
    """``peft.PeftModel.from_pretrained(model, model_id, **kwargs)`` followed by ``patch``."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, model_id, **kwargs)
    patch(peft_model)
    return peft_model


def fast_path_calls(model: nn.Module) -> int:
    """Total number of fast-path forward calls of fastlora's layers in ``model`` (``LoraLinear``
    and the bitsandbytes layers of ``fastlora.peft.bnb``)."""
    return sum(getattr(m, "fastlora_calls", 0) for m in model.modules() if isinstance(m, FastLoraLayerMixin))
