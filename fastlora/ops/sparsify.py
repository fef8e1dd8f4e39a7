"""Top-k delta sparsification with error feedback.

Op (schema in csrc/sparsify.cpp): ``fastlora::topk_sparsify(Tensor[] deltas, Tensor(a!)[]
residuals, int k, bool approx, ScalarType value_dtype) -> (indices, values)``.
Dispatch: CPU -> C++ (csrc/cpu/sparsify_cpu.cpp); CUDA -> Triton (kernels/sparsify.py);
anything else -> fastlora.reference.topk_sparsify. No autograd: updates are data, not
activations (inputs may be Parameters; the result never carries history).
"""
from __future__ import annotations

from typing import Mapping, Optional, Union

import numpy as np
import torch

from fastlora import _arrays
from fastlora import _library  # noqa: F401  (registers the C++ schemas and CPU kernels)
from fastlora import reference
from fastlora.sparse_delta import Layout, SparseDelta

_OP = "fastlora::topk_sparsify"
VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DELTA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# numpy dtypes (kind + itemsize, any byte order) as the tensors torch.from_numpy gives
_NUMPY_DTYPES = {"f2": torch.float16, "f4": torch.float32, "f8": torch.float64, "i8": torch.int64, "i4": torch.int32,
                 "i2": torch.int16, "i1": torch.int8, "u1": torch.uint8, "b1": torch.bool}

Delta = Union[torch.Tensor, Mapping[str, torch.Tensor]]


def k_from_density(density: float, numel: int) -> int:
    """k = floor(density * numel + 0.5): the documented rounding of a density to a count."""
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"density must be a number, got {type(density).__name__}")
    if not (0.0 <= float(density) <= 1.0):
        raise ValueError(f"density must be in [0, 1], got {density}")
    return int(float(density) * numel + 0.5)


def new_residual(delta: Delta, *, as_numpy: Optional[bool] = None) -> Delta:
    """Zero float32 error-feedback state shaped like ``delta`` (a tensor or a dict; numpy
    arrays too).

    ``delta`` must be what :func:`topk_sparsify` accepts (float16 / bfloat16 / float32 /
    float64 tensors or numpy arrays, str keys): anything else raises the same TypeError as
    ``topk_sparsify`` would, naming the entry. ``as_numpy`` (the package's numpy rule, see
    ``fastlora._arrays``): None gives numpy float32 arrays when ``delta`` holds numpy arrays,
    tensors otherwise; True / False force numpy / tensors. A numpy residual is updated in
    place by ``topk_sparsify`` like a tensor one."""
    as_numpy = _arrays.check_as_numpy(as_numpy)
    if as_numpy is None:
        as_numpy = _arrays.has_numpy(delta)
    layout = _check_delta("new_residual", delta)
    items = [delta] if not layout.is_dict else [delta[n] for n in layout.names]
    out = {}
    for spec, t in zip(layout.specs, items):
        if as_numpy:
            out[spec.name] = np.zeros(spec.shape, dtype=np.float32)
        else:
            dev = t.device if isinstance(t, torch.Tensor) else torch.device("cpu")
            out[spec.name] = torch.zeros(spec.shape, dtype=torch.float32, device=dev)
    return out if layout.is_dict else out[""]


def _check_delta(fn: str, delta) -> Layout:
    """The layout of ``delta`` (tensors or numpy arrays), after checking that every entry has
    a dtype the sparsifier takes: one TypeError, shared by new_residual and topk_sparsify."""
    if isinstance(delta, (torch.Tensor, np.ndarray)):
        items, is_dict = [("", delta)], False
    elif isinstance(delta, Mapping):
        items, is_dict = list(delta.items()), True
    else:
        raise TypeError(f"{fn}: delta must be a tensor, a numpy array or a dict of them, got {type(delta).__name__}")
    for name, t in items:
        label = f"delta[{name!r}]" if is_dict else "delta"
        if not isinstance(t, (torch.Tensor, np.ndarray)):
            raise TypeError(f"{fn}: {label} is a {type(t).__name__}, not a tensor or numpy array")
        dt = t.dtype if isinstance(t, torch.Tensor) else _NUMPY_DTYPES.get(t.dtype.kind + str(t.dtype.itemsize))
        if dt not in _DELTA_DTYPES:
            raise TypeError(f"{fn}: {label} has unsupported dtype {dt if dt is not None else t.dtype}; expected a "
                            "floating-point tensor (float16, bfloat16, float32 or float64)")
    try:
        return Layout.of(delta)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{fn}: delta: {e}") from None


def topk_sparsify(delta: Delta, *, k: Optional[int] = None, density: Optional[float] = None,
                  residual: Optional[Delta] = None, approx: bool = False,
                  value_dtype: torch.dtype = torch.float32) -> SparseDelta:
    """Keep the k largest-magnitude entries of ``delta + residual``; the rest goes into the
    residual (error feedback), which is updated in place.

    Args:
        delta: a tensor, or a dict name -> tensor (e.g. a LoRA state dict); float16, bfloat16,
            float32 or float64 (anything else, int64 included, is a TypeError, as in
            ``new_residual``). numpy arrays are accepted too (see the numpy rule in
            ``fastlora._arrays``: read zero-copy when safe, copied when read-only, big-endian
            or negatively strided). For a dict the top-k is global over all entries (one
            budget for the whole adapter); the flat order is the dict's insertion order, each
            tensor row-major.
        k / density: exactly one. ``k = floor(density * numel + 0.5)``. ``k = 0`` keeps
            nothing, ``k >= numel`` keeps everything.
        residual: float32 error-feedback state with the same keys and shapes (see
            ``new_residual``), updated in place so that, bitwise in float32,
            ``result.to_dense(torch.float32) + residual_new == delta + residual_old``. May be
            numpy float32 arrays: they must then be writeable, native-endian and C-contiguous
            (ValueError naming the entry otherwise) and are updated in place.
        approx: DGC-style sampled threshold: one pass and no selection when the sampled
            threshold keeps within +-5% of k entries (``result.nnz`` reports the count);
            otherwise it falls back to the exact selection.
        value_dtype: dtype the values travel in (float32, float16, bfloat16). Kept values are
            rounded to it *before* the residual is updated, so the rounding error stays in
            the residual and the encoder can send them exactly: ``fastlora.codec.encode(sd)``
            with its default ``values=None`` sends the values in this dtype, unrounded. An
            explicit coarser ``encode(sd, values="fp16" / "int8")`` of float32 values rounds
            *after* the residual was updated: that rounding is lost to error feedback. To
            choose fp16 / bf16 / int8 travel with error feedback in one call, use
            ``fastlora.ErrorFeedback`` (int8 exists only in the codec).

    Exact mode: exactly min(k, numel) entries, every kept |v| >= every dropped |v|, ties to the
    lowest flat index, identical whatever the thread count. NaN/Inf in delta or residual raise
    ValueError naming the tensor, before anything is modified. Returns a SparseDelta (torch
    tensors, also for numpy input).
    """
    layout = _check_delta("topk_sparsify", delta)
    delta = _arrays.input_dense(delta, "topk_sparsify: delta")
    if residual is not None:
        residual = _arrays.inplace_dense(residual, "topk_sparsify: residual")
    names = layout.names
    tensors = [delta] if isinstance(delta, torch.Tensor) else [delta[n] for n in names]
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"topk_sparsify: all delta tensors must be on one device, got {sorted(map(str, devices))}")

    if (k is None) == (density is None):
        raise ValueError("topk_sparsify: give exactly one of k or density")
    if density is not None:
        k = k_from_density(density, layout.numel)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"topk_sparsify: k must be an int, got {type(k).__name__}")
    if k < 0:
        raise ValueError(f"topk_sparsify: k must be >= 0, got {k}")
    if value_dtype not in VALUE_DTYPES:
        raise TypeError(f"topk_sparsify: value_dtype must be one of {VALUE_DTYPES}, got {value_dtype}")

    residuals = _check_residual(residual, layout, tensors)
    with torch.no_grad():
        deltas = [t.detach() for t in tensors]
        try:
            indices, values = torch.ops.fastlora.topk_sparsify(deltas, residuals, min(k, layout.numel),
                                                               bool(approx), value_dtype)
        except ValueError as e:
            raise ValueError(_nonfinite_message(names, layout, deltas, residuals) or str(e)) from None
    return SparseDelta.from_valid(indices, values, layout)


def _label(kind: str, name: str, layout: Layout) -> str:
    return kind if not layout.is_dict else f"{kind}[{name!r}]"


def _nonfinite_message(names, layout: Layout, deltas, residuals) -> str:
    """The error for non-finite input, naming the tensor by its key, or "" when every entry is
    finite (the op raised for another reason). The kernels find non-finite values inside their
    selection pass for free but know tensors only by position; this second scan runs only on
    the error path."""
    for kind, tensors in (("delta", deltas), ("residual", residuals)):
        for name, t in zip(names, tensors):
            bad = (~torch.isfinite(t.reshape(-1))).nonzero()
            if bad.numel():
                return (f"topk_sparsify: non-finite value in {_label(kind, name, layout)} at flat position "
                        f"{int(bad[0])}")
    return ""


def _check_residual(residual, layout: Layout, tensors):
    if residual is None:
        return []
    if isinstance(residual, torch.Tensor) != (not layout.is_dict) or (
            layout.is_dict and not isinstance(residual, Mapping)):
        raise TypeError(f"topk_sparsify: residual must be of the same kind as delta (tensor or dict), got "
                        f"{type(residual).__name__}")
    if layout.is_dict:
        if list(residual.keys()) != list(layout.names):
            if set(residual.keys()) != set(layout.names):
                missing = set(layout.names) - set(residual.keys())
                extra = set(residual.keys()) - set(layout.names)
                raise ValueError(f"topk_sparsify: residual keys differ from delta's "
                                 f"(missing {sorted(missing)}, extra {sorted(extra)})")
        res = [residual[n] for n in layout.names]
    else:
        res = [residual]
    for name, r, d in zip(layout.names, res, tensors):
        label = _label("residual", name, layout)
        if not isinstance(r, torch.Tensor):
            raise TypeError(f"topk_sparsify: {label} is not a tensor")
        if r.dtype != torch.float32:
            raise TypeError(f"topk_sparsify: {label} must be float32, got {r.dtype}")
        if r.shape != d.shape:
            raise ValueError(f"topk_sparsify: {label} has shape {tuple(r.shape)}, delta has {tuple(d.shape)}")
        if r.device != d.device:
            raise ValueError(f"topk_sparsify: {label} is on {r.device}, delta on {d.device}")
        if not r.is_contiguous():
            raise ValueError(f"topk_sparsify: {label} must be contiguous (it is updated in place)")
        if r.requires_grad:
            raise ValueError(f"topk_sparsify: {label} must not require grad (it is state, updated in place)")
    return res


# --- fake: exact mode has k outputs; approximate mode a data-dependent count -----------------

@torch.library.register_fake(_OP)
def _fake(deltas, residuals, k, approx, value_dtype):
    n = sum(d.numel() for d in deltas)
    size = torch.library.get_ctx().new_dynamic_size() if approx else min(k, n)
    device = deltas[0].device if deltas else torch.device("cpu")
    return (torch.empty(size, dtype=torch.int64, device=device),
            torch.empty(size, dtype=value_dtype, device=device))


def _reference_kernel(deltas, residuals, k, approx, value_dtype):
    idx, values, new_res = reference.topk_sparsify(deltas, residuals, k, approx, value_dtype)
    for r, nr in zip(residuals, new_res):
        r.copy_(nr)
    return idx.to(deltas[0].device if deltas else "cpu"), values


torch.library.register_kernel(_OP, None, _reference_kernel)


def _cuda_kernel(deltas, residuals, k, approx, value_dtype):
    from fastlora.kernels import sparsify as tks

    return tks.topk_sparsify(deltas, residuals, k, approx, value_dtype)


torch.library.register_kernel(_OP, "cuda", _cuda_kernel)
