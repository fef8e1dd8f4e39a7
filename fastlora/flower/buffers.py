"""Non-trainable buffers on Flower (BatchNorm's running statistics and step count, ...): which
buffers of a model federate, the dense ArrayRecord they travel in, and the server's strict check
and FedAvg mean of them (as Flower's FedAvg treats every entry of a ``state_dict``)."""
from __future__ import annotations

from typing import Dict, Mapping, Sequence, Tuple

import torch

from flwr.app import ArrayRecord

from fastlora.quantized_linear import QuantizedLinear

Buffers = Dict[str, torch.Tensor]
BufferSpec = Tuple[Tuple[str, Tuple[int, ...], torch.dtype], ...]


def model_buffers(model: torch.nn.Module) -> Buffers:
    """The buffers of ``model`` that federate (the live tensors, ``state_dict`` order): its
    persistent buffers, i.e. the ``state_dict`` entries registered with ``register_buffer``,
    except those of ``fastlora.QuantizedLinear`` layers (a 4-bit base's scales are part of the
    frozen weight, the same on every node, like the weight's codes)."""
    persistent = model.state_dict(keep_vars=True)
    out: Buffers = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, QuantizedLinear):
            continue
        for name, buf in module.named_buffers(prefix=prefix, recurse=False):
            if name in persistent:
                out[name] = buf
    return out


def wire_tensor(t: torch.Tensor) -> torch.Tensor:
    """A buffer as it travels and as the server keeps it: on the CPU in its own dtype, except
    bfloat16 as float32 (exact), since Flower's Array goes through numpy, which has no bfloat16."""
    t = t.detach().cpu()
    return t.to(torch.float32) if t.dtype == torch.bfloat16 else t


def buffers_record(buffers: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """The dense ArrayRecord of ``buffers`` (one Array per buffer, see :func:`wire_tensor`)."""
    return ArrayRecord({n: wire_tensor(t) for n, t in buffers.items()})


def spec_of(buffers: Mapping[str, torch.Tensor]) -> BufferSpec:
    return tuple((n, tuple(t.shape), t.dtype) for n, t in buffers.items())


def record_buffers(record) -> Buffers:
    """The tensors of a buffers record (raises ValueError for anything Flower cannot read)."""
    if not isinstance(record, ArrayRecord):
        raise ValueError(f"the buffers must be an ArrayRecord, got {type(record).__name__}")
    try:
        return dict(record.to_torch_state_dict())
    except Exception as e:  # noqa: BLE001  Flower raises several types for a malformed Array
        raise ValueError(f"unreadable buffers record ({type(e).__name__}: {e})") from None


def check_buffers(buffers: Mapping[str, torch.Tensor], spec: BufferSpec) -> None:
    """Raises ValueError unless ``buffers`` have exactly the names, shapes and dtypes of
    ``spec`` and every floating buffer is finite (a NaN running mean would poison the mean)."""
    expected = {n: (shape, dtype) for n, shape, dtype in spec}
    missing, extra = sorted(set(expected) - set(buffers)), sorted(set(buffers) - set(expected))
    if missing or extra:
        raise ValueError(f"the buffers do not match this run's ({len(expected)} buffers): missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    for n, t in buffers.items():
        shape, dtype = expected[n]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"buffer {n!r} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}")
        if t.is_complex():
            raise ValueError(f"buffer {n!r} has dtype {t.dtype}: complex buffers are not averaged")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"buffer {n!r} holds NaN or Inf values")


def weighted_mean(sets: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> Buffers:
    """FedAvg of buffers: ``sum_i w_i b_i`` accumulated in float64, cast back to each buffer's
    dtype; integer (and bool) buffers, e.g. ``num_batches_tracked``, rounded to the nearest."""
    out: Buffers = {}
    for name, first in sets[0].items():
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for buffers, w in zip(sets, weights):
            acc.add_(buffers[name].to(torch.float64), alpha=w)
        out[name] = acc.to(first.dtype) if first.is_floating_point() else acc.round().to(first.dtype)
    return out


def load_buffers(model: torch.nn.Module, buffers: Mapping[str, torch.Tensor]) -> None:
    """Copies ``buffers`` into ``model``'s federated buffers (:func:`model_buffers`): the names
    and shapes must be exactly the model's."""
    own = model_buffers(model)
    missing, extra = sorted(set(own) - set(buffers)), sorted(set(buffers) - set(own))
    if missing or extra:
        raise ValueError(f"fastlora client: the server's buffers do not match this model's ({len(own)} buffers): "
                         f"missing {missing[:3]}, unexpected {extra[:3]}")
    for n, t in own.items():   # every check before the first copy: a bad message changes nothing
        if tuple(buffers[n].shape) != tuple(t.shape):
            raise ValueError(f"fastlora client: the server's buffer {n!r} has shape {tuple(buffers[n].shape)}, "
                             f"the model's {tuple(t.shape)}")
    with torch.no_grad():
        for n, t in own.items():
            t.copy_(buffers[n])
