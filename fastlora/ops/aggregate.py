"""Sparse aggregation of many clients' sparse updates (the server's hot loop).

Op (schema in csrc/aggregate.cpp): ``fastlora::sparse_aggregate_(Tensor(a!)[] out, Tensor[]
indices, Tensor[] values, Tensor weights) -> ()``. Dispatch: CPU -> C++
(csrc/cpu/aggregate_cpu.cpp); CUDA -> Triton (kernels/aggregate.py); anything else ->
fastlora.reference.sparse_aggregate_.

Summation order (documented, bitwise reproducible): every output element starts from ``out``
(or zero) and receives ``float32(weight_i) * float32(value_i)`` from each client i in list
order, each product and each sum rounded in float32. Folding clients one call at a time into
a float32 ``out`` therefore gives the same bits as one call over all of them.
"""
from __future__ import annotations

from typing import List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from fastlora import _arrays
from fastlora import _library  # noqa: F401  (registers the C++ schemas and CPU kernels)
from fastlora import reference
from fastlora.sparse_delta import Layout, SparseDelta

_OP = "fastlora::sparse_aggregate_"
# Payloads are decoded this many at a time: bounds memory to a group of decoded updates while
# the kernel still sees many clients per pass over the output (cache-friendly).
DECODE_GROUP = 16

Dense = Union[torch.Tensor, Mapping[str, torch.Tensor]]


def sparse_aggregate(deltas: Sequence[Union[SparseDelta, bytes, bytearray, memoryview, np.ndarray]],
                     weights=None, *, out: Optional[Dense] = None, layout: Optional[Layout] = None,
                     sparse: Optional[str] = None, k: Optional[int] = None,
                     density: Optional[float] = None, value_dtype: torch.dtype = torch.float32,
                     max_numel: Optional[int] = None, as_numpy: Optional[bool] = None):
    """Weighted sum of clients' sparse updates: ``sum_i weights[i] * dense(deltas[i])``.

    Args:
        deltas: SparseDelta objects or encoded payloads (``fastlora.codec``: bytes,
            bytearray, memoryview or 1-D uint8 numpy arrays), all of one layout. Payloads are
            decoded on the fly, a group at a time, never all at once.
        weights: one per client, used as given (NOT normalised: for FedAvg pass
            ``n_i / sum(n)``); a list, a tensor or a numpy array. Default: ``1 / N`` each.
        out: optional tensor / dict in the layout's shapes to **add** into in place (e.g. the
            global adapter). With a float32 ``out`` a server can fold clients in one by one
            as payloads arrive and get the bits of one call over all of them (same order).
            A non-float32 ``out`` is accumulated in float32 and rounded once per call. numpy
            arrays work too (writeable and native-endian, else ValueError naming the entry):
            they are updated in place and ``out`` itself is returned.
        layout: the expected layout; required to decode fingerprint-only payloads, otherwise
            taken from the first delta. Every delta must match it.
        sparse: None (dense result), ``"topk"`` (the top-k of the aggregate, with ``k`` or
            ``density``) or ``"union"`` (the aggregate on the union of the clients' supports),
            returned as a SparseDelta with values in ``value_dtype`` (FLASC's sparse download).
        max_numel: passed to ``fastlora.codec.decode`` for payloads. Without ``layout=`` the
            first payload's declared layout is untrusted and caps at ``max_numel`` (default
            ``UNTRUSTED_LAYOUT_MAX_NUMEL`` = 2**28 entries, 1 GiB of float32) before anything
            is allocated from it.
        as_numpy: the numpy rule (``fastlora._arrays``) for a new dense result: None / False
            give tensors (the inputs are payloads / SparseDeltas, not dense arrays), True
            numpy arrays (bfloat16 layouts come back as float32). Only for a new dense result:
            with ``out`` (returned as itself) or ``sparse`` (a SparseDelta) it must stay None.

    Returns ``out`` (updated), or a new dense tensor / dict in the layout's dtypes, or a
    SparseDelta in sparse mode. Bad input (different layouts, corrupt payloads, unsorted or
    out-of-range indices, NaN/Inf values, wrong number of weights, bad sparse-mode arguments)
    raises ValueError naming the client index. All or nothing: an error leaves ``out``
    untouched. When nothing can fail once the arguments are checked (every delta an already
    validated SparseDelta of the layout) the sum goes straight into a float32 ``out``;
    otherwise (payloads, unvalidated deltas) into a float32 working copy of ``out`` (same
    additions in the same order, so the same bits), written back once every client went in.
    """
    deltas = list(deltas)
    n = len(deltas)
    _arrays.check_as_numpy(as_numpy)
    if as_numpy is not None and (out is not None or sparse is not None):
        raise ValueError("sparse_aggregate: as_numpy applies to a new dense result; with out= the result is out "
                         "itself, with sparse= a SparseDelta")
    if weights is None:
        w = torch.full((n,), 1.0 / n if n else 0.0, dtype=torch.float32)
    else:
        if isinstance(weights, np.ndarray):   # any byte order / dtype numpy can cast to float32
            try:
                weights = np.asarray(weights, dtype=np.float32)
            except (TypeError, ValueError) as e:
                raise TypeError(f"sparse_aggregate: weights: cannot convert a {weights.dtype} array to float32 "
                                f"({e})") from None
        w = torch.as_tensor(weights, dtype=torch.float32).detach().cpu().reshape(-1)
        if w.numel() != n:
            raise ValueError(f"sparse_aggregate: {w.numel()} weights for {n} clients")
        bad = (~torch.isfinite(w)).nonzero()
        if bad.numel():
            raise ValueError(f"sparse_aggregate: client {int(bad[0])}: weight is not finite")
    if sparse not in (None, "topk", "union"):
        raise ValueError(f"sparse_aggregate: sparse must be None, 'topk' or 'union', got {sparse!r}")
    if sparse != "topk" and (k is not None or density is not None):
        raise ValueError("sparse_aggregate: k / density only apply with sparse='topk'")
    if sparse is not None:
        # checked before any work, so that a bad argument cannot surface after out was written
        from fastlora.ops.sparsify import VALUE_DTYPES, k_from_density
        if value_dtype not in VALUE_DTYPES:
            raise TypeError(f"sparse_aggregate: value_dtype must be one of {VALUE_DTYPES}, got {value_dtype}")
        if sparse == "topk":
            if (k is None) == (density is None):
                raise ValueError("sparse_aggregate: sparse='topk' needs exactly one of k or density")
            if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
                raise ValueError(f"sparse_aggregate: k must be an int >= 0, got {k!r}")
            if density is not None:
                k_from_density(density, 0)  # raises on a density outside [0, 1]

    if layout is None:
        if not deltas:
            raise ValueError("sparse_aggregate: no deltas and no layout given")
        # The first delta defines the layout; a decoded payload replaces its bytes so that it
        # is not decoded a second time below. A layout declared by a payload is untrusted and
        # the dense result is allocated from it: cap it (UNTRUSTED_LAYOUT_MAX_NUMEL by default).
        from_payload = not isinstance(deltas[0], SparseDelta)
        cap = max_numel if max_numel is not None else (UNTRUSTED_LAYOUT_MAX_NUMEL if from_payload else None)
        deltas[0] = _materialise(deltas[0], None, 0, cap)
        layout = deltas[0].layout
        if from_payload and out is None and cap is not None and layout.numel > cap:
            raise ValueError(f"sparse_aggregate: client 0: the payload declares a layout of {layout.numel} entries, "
                             f"more than max_numel={cap}; pass layout= (the layout you expect) or a larger max_numel")

    if out is not None:
        target = _as_list(_arrays.inplace_dense(out, "sparse_aggregate: out"), layout, "out")
    else:
        target = None
    device = target[0].device if target else _device_of(deltas)
    # All or nothing: in place only when no client can fail any more (validated SparseDeltas of
    # this layout: the kernel skips validation for them); otherwise a working copy of out,
    # written back at the end. A non-float32 out is accumulated in float32 either way.
    cannot_fail = all(isinstance(d, SparseDelta) and d.validated and d.layout == layout for d in deltas)
    if target:
        acc = [t if cannot_fail and t.dtype == torch.float32 and t.is_contiguous()
               else t.detach().to(torch.float32, copy=True).contiguous() for t in target]
    else:
        acc = [torch.zeros(s.shape, dtype=torch.float32, device=device) for s in layout.specs]
    union: List[torch.Tensor] = []
    for start in range(0, n, DECODE_GROUP):
        group = [_materialise(d, layout, start + j, max_numel) for j, d in enumerate(deltas[start:start + DECODE_GROUP])]
        with torch.no_grad():
            # Updates already validated (decoded, sparsified, or checked at construction) skip
            # the kernel's validation pass, a full extra read of every client's entries.
            checked = all(g.validated for g in group)
            torch.ops.fastlora.sparse_aggregate_(acc, [g.indices.to(device) for g in group],
                                                 [g.values.to(device) for g in group], w[start:start + len(group)],
                                                 not checked)
        if sparse == "union":
            union.extend(g.indices for g in group)

    result_sparse = None
    if sparse is not None:
        flat = torch.cat([a.reshape(-1) for a in acc]) if acc else torch.zeros(0)
        if sparse == "union":
            idx = torch.unique(torch.cat(union).to(flat.device)) if union else torch.zeros(0, dtype=torch.int64)
            result_sparse = SparseDelta(idx, flat[idx].to(value_dtype), layout)
        else:
            from fastlora.ops.sparsify import topk_sparsify

            sd = topk_sparsify(flat, k=k, density=density, value_dtype=value_dtype)
            result_sparse = SparseDelta._trusted(sd.indices, sd.values, layout)

    if target is not None:  # every client went in: now out changes
        with torch.no_grad():
            for t, a in zip(target, acc):
                if t is not a:
                    t.copy_(a)
        result_dense = out
    else:
        pieces = {s.name: a.to(s.dtype) if s.dtype != torch.float32 else a for s, a in zip(layout.specs, acc)}
        result_dense = _arrays.dense_out(pieces if layout.is_dict else pieces[""], bool(as_numpy))
    return result_dense if result_sparse is None else result_sparse


# Largest layout a payload may declare when no layout= is given (1 GiB of float32 results).
UNTRUSTED_LAYOUT_MAX_NUMEL = 2 ** 28


def _max(max_numel):
    return {} if max_numel is None else {"max_numel": max_numel}


def _materialise(d, layout: Optional[Layout], client: int, max_numel) -> SparseDelta:
    """A SparseDelta of the given layout (None: any) from a SparseDelta or a payload."""
    if isinstance(d, SparseDelta):
        if layout is not None and d.layout != layout:
            raise ValueError(f"sparse_aggregate: client {client}: layout {d.layout!r} differs from {layout!r}")
        return d
    if isinstance(d, (bytes, bytearray, memoryview, np.ndarray)):
        from fastlora import codec

        try:
            return codec.decode(d, layout=layout, **_max(max_numel))
        except codec.DecodeError as e:
            raise ValueError(f"sparse_aggregate: client {client}: cannot decode payload: {e}") from None
        except TypeError as e:    # e.g. a numpy payload that is not 1-D uint8
            raise TypeError(f"sparse_aggregate: client {client}: {e}") from None
    raise TypeError(f"sparse_aggregate: client {client}: expected a SparseDelta or payload bytes (bytes, bytearray, "
                    f"memoryview, 1-D uint8 numpy array), got {type(d).__name__}")


def _device_of(deltas):
    for d in deltas:
        if isinstance(d, SparseDelta):
            return d.values.device
    return torch.device("cpu")


def _as_list(out, layout: Layout, what: str) -> List[torch.Tensor]:
    if layout.is_dict:
        if not isinstance(out, Mapping) or list(out.keys()) != list(layout.names):
            raise ValueError(f"sparse_aggregate: {what} must be a dict with the layout's keys in order {list(layout.names)}")
        ts = [out[n] for n in layout.names]
    else:
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"sparse_aggregate: {what} must be a tensor for a single-tensor layout")
        ts = [out]
    for s, t in zip(layout.specs, ts):
        if tuple(t.shape) != s.shape:
            raise ValueError(f"sparse_aggregate: {what} {layout.describe(s.name)} has shape {tuple(t.shape)}, "
                             f"layout says {s.shape}")
        if not t.is_floating_point():
            raise TypeError(f"sparse_aggregate: {what} {layout.describe(s.name)} must be floating point")
    return ts


@torch.library.register_fake(_OP)
def _fake(out, indices, values, weights, validate=True):
    return None


torch.library.impl(_OP, "default", reference.sparse_aggregate_)


def _cuda_kernel(out, indices, values, weights, validate=True):
    from fastlora.kernels import aggregate as tka

    return tka.sparse_aggregate_(out, indices, values, weights, validate)


torch.library.register_kernel(_OP, "cuda", _cuda_kernel)
