"""Rank tools for PEFT LoRA models: LoRA-Squeeze of a whole model (``squeeze_model``), rank
annealing during training (``RankAnnealing``) and moving optimizer state to new Parameters
(``replace_parameters``). They work on PEFT's LoRA ``Linear`` layers and on
``fastlora.peft.LoraLinear`` alike (a subclass), through ``fastlora.squeeze``.
"""
from __future__ import annotations

import torch
from torch import nn

from peft.tuners.lora.layer import Linear as PeftLinear

import fastlora

__all__ = ["squeeze_model", "RankAnnealing", "replace_parameters"]


def _lora_layers(model: nn.Module, adapter_name: str):
    """[(qualified name, layer)] of the PEFT LoRA ``Linear`` layers (PEFT's class or a subclass,
    e.g. ``LoraLinear``) holding ``adapter_name``. Other LoRA layer types (Embedding, Conv, ...)
    holding the adapter raise ValueError: the adapter config could not describe them after
    squeezing the Linear layers only."""
    from peft.tuners.lora.layer import LoraLayer

    layers = []
    for name, module in model.named_modules():
        if isinstance(module, PeftLinear):
            if adapter_name in module.lora_A:
                layers.append((name, module))
        elif isinstance(module, LoraLayer) and adapter_name in getattr(module, "r", {}):
            raise ValueError(f"squeeze_model: layer {name!r} ({type(module).__name__}) holds adapter "
                             f"{adapter_name!r} but is not a LoRA Linear layer; only Linear layers are supported")
    return layers


def _new_scaling(rank: int, use_rslora: bool):
    """(lora_alpha, scaling) with PEFT's formula giving scaling exactly 1.0 at rank ``rank``."""
    import math

    alpha = math.sqrt(rank) if use_rslora else rank
    return alpha, (alpha / math.sqrt(rank) if use_rslora else alpha / rank)


def _squeeze_model(model: nn.Module, rank: int, adapter_name: str):
    """squeeze_model's work; also returns [(old Parameter, new Parameter)] for optimizers."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"squeeze_model: rank must be an int, got {type(rank).__name__}")
    layers = _lora_layers(model, adapter_name)
    if not layers:
        raise ValueError(f"squeeze_model: no LoRA Linear layer holds adapter {adapter_name!r}")
    # Validate every layer before changing any (all or nothing).
    for name, layer in layers:
        A, B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        lim = min(A.weight.shape[1], B.weight.shape[0])
        if not 1 <= rank <= lim:
            raise ValueError(f"squeeze_model: rank must be in [1, min(in, out)] = [1, {lim}] for layer "
                             f"{name!r}, got {rank}")
        if layer.use_dora.get(adapter_name, False):
            raise ValueError(f"squeeze_model: layer {name!r}, adapter {adapter_name!r} uses DoRA "
                             "(use_dora=True), which squeeze_model does not support")
        if adapter_name in getattr(layer, "lora_variant", {}):
            raise ValueError(f"squeeze_model: layer {name!r}, adapter {adapter_name!r} uses the LoRA variant "
                             f"{type(layer.lora_variant[adapter_name]).__name__}, which squeeze_model does not support")
        if adapter_name in getattr(layer, "merged_adapters", []):
            raise ValueError(f"squeeze_model: layer {name!r}, adapter {adapter_name!r} is merged into the base "
                             "weight; unmerge it first")
        if type(A) is not nn.Linear or type(B) is not nn.Linear or A.bias is not None:
            raise ValueError(f"squeeze_model: layer {name!r}, adapter {adapter_name!r} has non-standard "
                             "lora_A / lora_B modules")
    use_rslora = None
    errors, replaced = {}, []
    for name, layer in layers:
        A, B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        rslora = bool(layer.use_rslora.get(adapter_name, False))
        use_rslora = rslora if use_rslora is None else use_rslora
        alpha, scaling = _new_scaling(rank, rslora)
        old_scaling = float(layer.scaling[adapter_name])
        A2, B2, rel = fastlora.squeeze(A.weight, B.weight, rank, scaling=old_scaling / scaling)
        with torch.no_grad():
            new_A = nn.Parameter(A2.to(device=A.weight.device, dtype=A.weight.dtype).contiguous(),
                                 requires_grad=A.weight.requires_grad)
            new_B = nn.Parameter(B2.to(device=B.weight.device, dtype=B.weight.dtype).contiguous(),
                                 requires_grad=B.weight.requires_grad)
            replaced += [(A.weight, new_A), (B.weight, new_B)]
            A.weight, A.out_features = new_A, rank
            B.weight, B.in_features = new_B, rank
            if B.bias is not None:  # lora_bias: the term is old_scaling * b, keep it under scaling 1
                new_b = nn.Parameter(B.bias.detach() * (old_scaling / scaling), requires_grad=B.bias.requires_grad)
                replaced.append((B.bias, new_b))
                B.bias = new_b
        layer.r[adapter_name] = rank
        layer.lora_alpha[adapter_name] = alpha
        layer.scaling[adapter_name] = scaling
        errors[name] = float(rel)
    config = getattr(model, "peft_config", None)
    if isinstance(config, dict) and adapter_name in config:
        cfg = config[adapter_name]
        cfg.r = rank
        cfg.lora_alpha = _new_scaling(rank, bool(getattr(cfg, "use_rslora", use_rslora)))[0]
        # Every layer of the adapter now has the same r and lora_alpha: no pattern may override them.
        if getattr(cfg, "rank_pattern", None):
            cfg.rank_pattern = {}
        if getattr(cfg, "alpha_pattern", None):
            cfg.alpha_pattern = {}
    return errors, replaced


def squeeze_model(model: nn.Module, rank: int, *, adapter_name: str = "default") -> dict:
    """LoRA-Squeeze every LoRA ``Linear`` layer of ``model`` (a ``PeftModel``, its
    ``LoraModel``, or any module holding PEFT LoRA Linear layers) to rank ``rank``.

    For each layer holding ``adapter_name`` (PEFT's ``Linear`` or ``LoraLinear``), the LoRA term
    ``scaling * lora_B @ lora_A`` is replaced by its best rank-``rank`` approximation (exact
    factored SVD, ``fastlora.squeeze``, sqrt(S) on each side) with the old scaling folded into
    the new factors. The new scaling is exactly 1: ``r = rank`` and ``lora_alpha = rank``
    (``lora_alpha = sqrt(rank)``, a float, with ``use_rslora``), so PEFT's ``alpha / r`` (or
    ``alpha / sqrt(r)``) recomputes 1.0 when the adapter is loaded. ``lora_bias`` is handled
    exactly (the bias is multiplied by the old scaling).

    The layers' ``lora_A`` / ``lora_B`` modules stay the same objects; their ``weight`` (and
    ``bias``) become NEW Parameters of the new shapes, same dtype, device and requires_grad
    (an optimizer built before still holds the old ones: see ``RankAnnealing.step(optimizer)``).
    If ``model`` has a ``peft_config`` (PeftModel / LoraModel), the adapter's config gets the
    new ``r`` / ``lora_alpha`` and its ``rank_pattern`` / ``alpha_pattern`` are cleared, so
    ``save_pretrained`` writes an adapter that stock PEFT loads into the same outputs.

    ``rank`` must be in [1, min(in, out)] of every layer; a rank >= the current r is allowed
    (the product is kept exactly; the extra rows of lora_A / columns of lora_B are zero, and
    stay zero under gradient descent since their gradients are zero too).

    Returns ``{layer name: rel_error}`` with ``rel_error = ||dW - dW'||_F / ||dW||_F`` of the
    layer's LoRA term (0 for a zero term). Raises ValueError (naming the layer) for a rank out
    of range, DoRA or another LoRA variant, a merged adapter, non-Linear LoRA layers holding the
    adapter, or when no layer holds it; nothing is modified then.
    """
    return _squeeze_model(model, rank, adapter_name)[0]


class RankAnnealing:
    """Lower the LoRA rank step by step during training (in-tuning LoRA-Squeeze).

    Schedule: after the t-th call of ``step()`` (t = 1, 2, ...), the target rank is
    ``start_rank - floor((start_rank - end_rank) * min(t, total_steps) / total_steps)``
    (linear in steps, non-increasing, ``end_rank`` at ``t = total_steps``); it is applied, by
    ``squeeze_model``, when t is a multiple of ``every`` or ``t == total_steps``, and only if
    it differs from the current rank. Calls after ``total_steps`` do nothing. The constructor
    does not touch the model: squeeze to ``start_rank`` first if the adapter's rank differs.

    Usage in a plain loop::

        anneal = RankAnnealing(model, 16, 4, total_steps=1000, every=100)
        for batch in loader:
            loss = model(**batch).loss; loss.backward()
            optimizer.step(); optimizer.zero_grad()
            anneal.step(optimizer)

    Squeezing replaces the LoRA Parameters by new ones (new shapes). With ``step(optimizer)``
    the new Parameters take the old ones' places in ``optimizer.param_groups`` and the old ones'
    state (e.g. AdamW's moments and step count) is dropped: the new factors start with fresh
    optimizer state. Without ``optimizer``, rebuild the optimizer yourself after a squeeze.

    Attributes: ``t`` (calls so far), ``rank`` (current rank, None until known),
    ``history`` (list of ``(t, rank, {layer: rel_error})`` per squeeze).
    """

    def __init__(self, model: nn.Module, start_rank: int, end_rank: int, total_steps: int, *,
                 every: int = 1, adapter_name: str = "default"):
        for n, v in (("start_rank", start_rank), ("end_rank", end_rank), ("total_steps", total_steps),
                     ("every", every)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"RankAnnealing: {n} must be an int, got {type(v).__name__}")
        if not 1 <= end_rank <= start_rank:
            raise ValueError(f"RankAnnealing: need 1 <= end_rank <= start_rank, got start_rank={start_rank}, "
                             f"end_rank={end_rank}")
        if total_steps < 1 or every < 1:
            raise ValueError(f"RankAnnealing: total_steps and every must be >= 1, got {total_steps}, {every}")
        layers = _lora_layers(model, adapter_name)
        if not layers:
            raise ValueError(f"RankAnnealing: no LoRA Linear layer holds adapter {adapter_name!r}")
        self.model, self.start_rank, self.end_rank = model, start_rank, end_rank
        self.total_steps, self.every, self.adapter_name = total_steps, every, adapter_name
        ranks = {layer.r[adapter_name] for _, layer in layers}
        self.rank = ranks.pop() if len(ranks) == 1 else None
        self.t = 0
        self.history = []

    def rank_at(self, t: int) -> int:
        """The scheduled rank after ``t`` calls of ``step()``."""
        t = min(max(t, 0), self.total_steps)
        return self.start_rank - ((self.start_rank - self.end_rank) * t) // self.total_steps

    def step(self, optimizer: "torch.optim.Optimizer | None" = None):
        """Advance the schedule by one step (call after ``optimizer.step()``); squeeze when due.
        Returns ``{layer: rel_error}`` if the model was squeezed, else None. With ``optimizer``,
        the replaced Parameters are swapped in its param_groups and their state dropped."""
        if self.t >= self.total_steps:
            return None
        self.t += 1
        if self.t % self.every and self.t != self.total_steps:
            return None
        target = self.rank_at(self.t)
        if target == self.rank:
            return None
        errors, replaced = _squeeze_model(self.model, target, self.adapter_name)
        self.rank = target
        self.history.append((self.t, target, errors))
        if optimizer is not None:
            replace_parameters(optimizer, replaced)
        return errors


def replace_parameters(optimizer: torch.optim.Optimizer, pairs) -> int:
    """Put new Parameters in place of old ones in ``optimizer.param_groups`` (``pairs``: iterable
    of ``(old, new)``), dropping the old ones' state (the new ones start fresh). Returns the
    number of Parameters replaced (old ones the optimizer does not hold are ignored)."""
    mapping = {id(old): new for old, new in pairs}
    n = 0
    for group in optimizer.param_groups:
        params = group["params"]
        for i, p in enumerate(params):
            new = mapping.get(id(p))
            if new is not None:
                optimizer.state.pop(p, None)
                params[i] = new
                n += 1
    return n
