"""Sparse aggregation of many clients' sparse updates (the server's hot loop).

Op (schema in csrc/aggregate.cpp): ``fastlora::sparse_aggregate_(Tensor(a!)[] out, Tensor[]
indices, Tensor[] values, Tensor weights) -> ()``. Dispatch: CPU -> C++
(csrc/cpu/aggregate_cpu.cpp); CUDA -> Triton (kernels/aggregate.py); anything else ->
fastlora.reference.sparse_aggregate_.

Summation order (documented, bitwise reproducible): every output element starts from ``out``
(or zero) and receives ``float32(weight_i) * float32(value_i)`` from each client i in list
order, each product and each sum rounded in float32. Folding clients one call at a time into
a float32 ``out`` therefore gives the same bits as one call over all of them.

Overflow (checked here, in the wrapper, so that every kernel benefits: C++, Triton, reference).
The op itself adds as IEEE float32 does (an overflow gives +-inf); ``sparse_aggregate`` never
lets such an infinity out. A float32 addition ``s + p`` with ``s`` finite overflows only when
``|p| >= 2**103`` (half an ulp of float32's top binade), so a client whose every product
``|w_i| * max|v_i|`` stays below that (with a margin for the roundings) and whose values fit
float32 cannot turn a finite entry non-finite, whatever ``out`` holds: ``_may_overflow`` is
that bound, two reductions per client (no pass over ``out``). Clients that pass it keep the
in-place path; otherwise the sum goes into the working copy, is checked for entries that
became non-finite after that client's decode group, and only then (the error case) the
entries concerned are recomputed client by client to name the first client whose addition
made one of them non-finite. Conversions of the float32 sum to a narrower output dtype
(float16 / bfloat16 ``out``, layout or ``value_dtype``) are checked before anything is written.
"""
from __future__ import annotations

import math
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

F32_MAX = float(torch.finfo(torch.float32).max)
# |s + p| rounds to a finite float32 whenever |s| <= F32_MAX and |p| < 2**103 (the midpoint
# between F32_MAX and 2**128 is F32_MAX + 2**103). A product fl(w * fl(v)) is at most
# |w| * |v| * (1 + 2**-24)**2 < |w| * |v| * (1 + 2**-20).
_PRODUCT_LIMIT = 2.0 ** 103
_ROUNDING_MARGIN = 1.0 + 2.0 ** -20
# Output dtypes a finite float32 sum may overflow when converted to.
_NARROW = (torch.float16, torch.bfloat16)

Dense = Union[torch.Tensor, Mapping[str, torch.Tensor]]


def _kernel(out, indices, values, weights, validate):
    """The op call (tests monkeypatch this to run the wrapper over the Triton kernel under the
    interpreter, or over the reference, on CPU tensors)."""
    torch.ops.fastlora.sparse_aggregate_(out, indices, values, weights, validate)


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
    validated SparseDelta of the layout, none able to overflow, see below) the sum goes
    straight into a float32 ``out``; otherwise (payloads, unvalidated deltas) into a float32
    working copy of ``out`` (same additions in the same order, so the same bits), written back
    once every client went in.

    Overflow is an error, never a silent infinity: a float64 value that does not fit float32
    (the accumulator) raises ValueError naming its client; so does a sum that overflows
    float32, naming the first client whose addition turns an entry non-finite (``out``
    entries that already were inf / NaN stay so and are no error); a sum that does not fit a
    float16 / bfloat16 ``out``, layout dtype or ``value_dtype`` raises ValueError naming that
    tensor; all before ``out`` changes. A client whose products ``|w_i * v|`` all stay below
    2**103 (~1e31) cannot overflow anything: only larger ones cost a check.
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
    # this layout: the kernel skips validation for them; none able to overflow float32; no
    # conversion to a narrower dtype left that could overflow: a float16 / bfloat16 sparse
    # result or entry of out); otherwise a working copy of out, written back at the end. A
    # non-float32 out is accumulated in float32 either way.
    cannot_fail = all(isinstance(d, SparseDelta) and d.validated and d.layout == layout for d in deltas)
    cannot_fail = cannot_fail and (sparse is None or value_dtype == torch.float32)
    cannot_fail = cannot_fail and not (target and any(t.dtype in _NARROW for t in target))
    risky: Optional[List[bool]] = None   # per client: may its additions overflow float32?
    if cannot_fail and target and any(t.dtype == torch.float32 and t.is_contiguous() for t in target):
        risky = _may_overflow([d.values for d in deltas], w, device)
        cannot_fail = not any(risky)
    if target:
        acc = [t if cannot_fail and t.dtype == torch.float32 and t.is_contiguous()
               else _working_copy(t, layout, spec) for t, spec in zip(target, layout.specs)]
    else:
        acc = [torch.zeros(s.shape, dtype=torch.float32, device=device) for s in layout.specs]
    union: List[torch.Tensor] = []
    for start in range(0, n, DECODE_GROUP):
        group = [_materialise(d, layout, start + j, max_numel) for j, d in enumerate(deltas[start:start + DECODE_GROUP])]
        indices = [g.indices.to(device) for g in group]
        values = [g.values.to(device) for g in group]
        wg = w[start:start + len(group)]
        may = risky[start:start + len(group)] if risky is not None else _may_overflow(values, wg, device)
        with torch.no_grad():
            # Updates already validated (decoded, sparsified, or checked at construction) skip
            # the kernel's validation pass, a full extra read of every client's entries.
            checked = all(g.validated for g in group)
            _kernel(acc, indices, values, wg, not checked)
            if any(may):   # (only ever on the working copy: risky clients never go in place)
                bad = _newly_nonfinite(acc, target, layout)
                if bad is not None:
                    _raise_first_overflow(deltas, w, layout, target, bad, start + len(group), device, max_numel)
        if sparse == "union":
            union.extend(g.indices for g in group)

    result_sparse = None
    if sparse is not None:
        flat = torch.cat([a.reshape(-1) for a in acc]) if acc else torch.zeros(0)
        if sparse == "union":
            idx = torch.unique(torch.cat(union).to(flat.device)) if union else torch.zeros(0, dtype=torch.int64)
            vals = flat[idx]
        else:
            from fastlora.ops.sparsify import topk_sparsify

            # Selected in float32 and rounded here (the same rounding topk_sparsify would do),
            # so that an overflow of value_dtype gets this function's error.
            sd = topk_sparsify(flat, k=k, density=density)
            idx, vals = sd.indices, sd.values
        vals = _convert(vals, value_dtype, lambda j: f"sparse={sparse!r}: the aggregate at flat index {int(idx[j])} "
                        f"({_where(layout, int(idx[j]))})")
        result_sparse = (SparseDelta(idx, vals, layout) if sparse == "union"
                         else SparseDelta.from_valid(idx, vals, layout))

    if target is not None:  # every client went in: now out changes
        with torch.no_grad():
            # float16 / bfloat16 entries converted (and checked) first, all before any is written;
            # copy_ converts the others
            new = [None if t is a else _convert(a, t.dtype, _out_label(layout, spec)) if t.dtype in _NARROW else a
                   for t, a, spec in zip(target, acc, layout.specs)]
            for t, c in zip(target, new):
                if c is not None:
                    t.copy_(c)
        result_dense = out
    else:
        pieces = {s.name: _convert(a, s.dtype, _result_label(layout, s)) for s, a in zip(layout.specs, acc)}
        result_dense = _arrays.dense_out(pieces if layout.is_dict else pieces[""], bool(as_numpy))
    return result_dense if result_sparse is None else result_sparse


# --- overflow ---------------------------------------------------------------------------------

def _may_overflow(values: Sequence[torch.Tensor], w: torch.Tensor, device) -> List[bool]:
    """Per client: True unless its additions provably cannot turn a finite float32 entry
    non-finite (every |w_i * v| below 2**103 with the rounding margin, every value within
    float32's range). NaN / inf values (unvalidated input) count as True. One pass over each
    client's values (aminmax; NaN propagates), one host sync."""
    peak = torch.zeros(len(values), dtype=torch.float64)
    live = [j for j, v in enumerate(values) if v.numel()]
    if live:
        lo, hi = [], []
        for j in live:
            a, b = torch.aminmax(values[j])
            lo.append(a.to(device=device, dtype=torch.float64))
            hi.append(b.to(device=device, dtype=torch.float64))
        peak[live] = torch.maximum(torch.stack(hi), -torch.stack(lo)).cpu()
    ok = (peak <= F32_MAX) & (w.to(torch.float64).abs() * peak * _ROUNDING_MARGIN < _PRODUCT_LIMIT)
    return (~ok).tolist()


def _working_copy(t: torch.Tensor, layout: Layout, spec) -> torch.Tensor:
    """float32 copy of one out tensor; a float64 entry beyond float32's range is an error."""
    a = t.detach().to(torch.float32, copy=True).contiguous()
    if t.dtype == torch.float64 and not bool(torch.isfinite(a).all()):
        bad = (torch.isfinite(t.detach()).reshape(-1) & ~torch.isfinite(a).reshape(-1)).nonzero()
        if bad.numel():
            j = int(bad[0])
            raise ValueError(f"sparse_aggregate: {_out_label(layout, spec)} holds {float(t.reshape(-1)[j]):g} at "
                             f"element {j}, which does not fit float32 (the accumulator); nothing was changed")
    return a


def _newly_nonfinite(acc, target, layout: Layout) -> Optional[torch.Tensor]:
    """Sorted flat positions of the entries that are non-finite in ``acc`` (the working copy)
    but were finite in ``target`` (zero when None); None when there are none."""
    found = []
    for p, (a, s) in enumerate(zip(acc, layout.specs)):
        if bool(torch.isfinite(a).all()):
            continue
        bad = ~torch.isfinite(a.reshape(-1))
        if target is not None:
            bad &= torch.isfinite(target[p].detach().reshape(-1)).to(bad.device)
        pos = bad.nonzero().reshape(-1)
        if pos.numel():
            found.append(pos + s.offset)
    return torch.cat(found) if found else None


def _gather(target, layout: Layout, flat_pos: torch.Tensor) -> torch.Tensor:
    """float32 values of target (zeros when None) at sorted flat positions."""
    out = torch.zeros(flat_pos.numel(), dtype=torch.float32, device=flat_pos.device)
    if target is None:
        return out
    bounds = torch.searchsorted(flat_pos, layout.offsets().to(flat_pos.device)).tolist()
    for p, s in enumerate(layout.specs):
        lo, hi = bounds[p], bounds[p + 1]
        if hi > lo:
            out[lo:hi] = target[p].detach().reshape(-1)[flat_pos[lo:hi] - s.offset].to(torch.float32)
    return out


def _raise_first_overflow(deltas, w, layout: Layout, target, flat_pos, upto: int, device, max_numel):
    """The error case: the entries at ``flat_pos`` became non-finite among clients [0, upto).
    Recomputes just those entries client by client, in the kernels' order and float32
    arithmetic, and raises the ValueError naming the first client that made one non-finite."""
    acc = _gather(target, layout, flat_pos)
    finite0 = torch.isfinite(acc)
    wd = w.to(device)
    for i in range(upto):
        d = _materialise(deltas[i], layout, i, max_numel)
        idx, val = d.indices.to(device), d.values.to(device)
        if idx.numel() == 0:
            continue
        pos = torch.searchsorted(idx, flat_pos)
        posc = pos.clamp(max=idx.numel() - 1)
        hit = (pos < idx.numel()) & (idx[posc] == flat_pos)
        if not bool(hit.any()):
            continue
        v = val[posc[hit]]
        new = acc.clone()
        new[hit] = acc[hit] + wd[i] * v.to(torch.float32)
        grew = (finite0 & ~torch.isfinite(new)).nonzero()
        if grew.numel():
            e = int(grew[0])
            g, j = int(flat_pos[e]), int(posc[e])
            x = float(val[j])
            if not math.isfinite(x):
                raise ValueError(f"sparse_aggregate: client {i}: non-finite value at position {j}")
            if not math.isfinite(float(val[j].to(torch.float32))):
                raise ValueError(f"sparse_aggregate: client {i}: value {x:g} at position {j} does not fit float32 "
                                 f"(the accumulator)")
            raise ValueError(f"sparse_aggregate: client {i}: the sum overflows float32 at flat index {g} "
                             f"({_where(layout, g)}): {float(acc[e]):g} + {float(wd[i]):g} x {x:g} (value at position "
                             f"{j}); nothing was changed")
        acc = new
    # Not reached (the recomputation repeats the kernels' arithmetic); never let an inf through.
    g = int(flat_pos[0])
    raise ValueError(f"sparse_aggregate: the sum overflows float32 at flat index {g} ({_where(layout, g)}) among "
                     f"clients 0..{upto - 1}; nothing was changed")


def _convert(a: torch.Tensor, dtype: torch.dtype, what) -> torch.Tensor:
    """``a`` (float32) in ``dtype``; a finite entry that becomes +-inf is a ValueError naming
    ``what`` (a string, or a function of the flat position giving one)."""
    if dtype == a.dtype:
        return a
    c = a.to(dtype)
    if dtype in _NARROW and not bool(torch.isfinite(c).all()):
        bad = (torch.isfinite(a.reshape(-1)) & ~torch.isfinite(c.reshape(-1))).nonzero()
        if bad.numel():
            j = int(bad[0])
            label = what(j) if callable(what) else f"{what}, element {j}"
            raise ValueError(f"sparse_aggregate: {label}: the sum {float(a.reshape(-1)[j]):g} overflows "
                             f"{str(dtype).replace('torch.', '')} (largest finite {torch.finfo(dtype).max:g}); "
                             f"nothing was changed")
    return c


def _out_label(layout: Layout, spec) -> str:
    return "out" if not layout.is_dict else f"out[{spec.name!r}]"


def _result_label(layout: Layout, spec) -> str:
    what = "the result" if not layout.is_dict else f"the result's tensor {spec.name!r}"
    return f"{what} ({str(spec.dtype).replace('torch.', '')}, the layout's dtype)"


def _where(layout: Layout, g: int) -> str:
    name = layout.tensor_of(g)
    spec = layout.specs[layout.names.index(name)]
    return f"{layout.describe(name)}, element {g - spec.offset}"


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


torch.library.register_kernel(_OP, None, reference.sparse_aggregate_)


def _cuda_kernel(out, indices, values, weights, validate=True):
    from fastlora.kernels import aggregate as tka

    return tka.sparse_aggregate_(out, indices, values, weights, validate)


torch.library.register_kernel(_OP, "cuda", _cuda_kernel)
