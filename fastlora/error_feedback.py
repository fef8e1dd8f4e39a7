"""Error-feedback compression for a federated client: :class:`ErrorFeedback`.

A client that sends only part of its update (the top-k entries, in a reduced precision) keeps
what it did not send in a *residual* and adds it to its next update (error feedback: Seide et
al. 2014, Stich et al. 2018). The guarantee that makes it converge is accounting: nothing is
lost, only delayed. :class:`ErrorFeedback` does the whole client step in one call, so that
guarantee holds for every travel format:

    payload = ef.encode(delta)      # top-k of delta + residual -> rounding -> fastlora.codec bytes

and afterwards, for every entry, in float32 arithmetic (bitwise):

    codec.decode(payload, layout=ef.layout).to_dense(torch.float32) + residual_new
        == float32(delta) + residual_old

whatever the payload does not carry exactly is in ``residual_new``: the dropped entries, the
float16 / bfloat16 rounding of the kept values, the int8 block quantisation, and the part of a
value above what the travel format can hold (see ``overflow``). The server side is the plain
codec: ``fastlora.codec.decode`` / ``fastlora.sparse_aggregate`` of the payloads.

This module sits above :mod:`fastlora.ops.sparsify` and :mod:`fastlora.codec` and below
:mod:`fastlora.fl` (whose ``client.sparsify_encode`` calls :func:`compress`, the shared core).
"""
from __future__ import annotations

import fnmatch

from typing import Dict, List, Mapping, Optional, Union

import numpy as np
import torch

from fastlora import _arrays, codec
from fastlora.ops.sparsify import _check_delta, _check_residual, k_from_density, topk_sparsify
from fastlora.sparse_delta import Layout, SparseDelta

__all__ = ["ErrorFeedback", "compress", "VALUE_FORMATS", "OVERFLOW_MODES"]

#: Travel formats (``fastlora.codec`` value formats).
VALUE_FORMATS = ("fp32", "fp16", "bf16", "int8")
#: What happens to a kept value the travel format cannot hold (see :class:`ErrorFeedback`).
OVERFLOW_MODES = ("clamp", "raise")

# The dtype topk_sparsify rounds kept values to, per format, when it can do the rounding itself
# (overflow="raise": it refuses an overflow before touching anything). int8 exists only in the
# codec: topk_sparsify keeps float32 values and the quantisation error is added afterwards.
_TOPK_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float32}
_FP16_MAX = 65504.0
_BF16_MAX = float(torch.finfo(torch.bfloat16).max)

Dense = Union[torch.Tensor, np.ndarray, Mapping[str, Union[torch.Tensor, np.ndarray]]]


def _check_format(values, overflow, int8_block, layout_mode, who: str):
    if values not in VALUE_FORMATS:
        raise ValueError(f"{who}: values must be one of {VALUE_FORMATS}, got {values!r}")
    if overflow not in OVERFLOW_MODES:
        raise ValueError(f"{who}: overflow must be one of {OVERFLOW_MODES}, got {overflow!r}")
    if layout_mode not in codec.LAYOUT_MODES:
        raise ValueError(f"{who}: layout_mode must be one of {codec.LAYOUT_MODES}, got {layout_mode!r}")
    if isinstance(int8_block, bool) or not isinstance(int8_block, int) or not 1 <= int8_block <= codec.MAX_INT8_BLOCK:
        raise ValueError(f"{who}: int8_block must be an int in [1, {codec.MAX_INT8_BLOCK}], got {int8_block!r}")


def _check_budget(k, density, per_tensor, who: str):
    if (k is None) == (density is None):
        raise ValueError(f"{who}: give exactly one of k or density")
    if isinstance(density, Mapping):
        if not density:
            raise ValueError(f"{who}: a per-tensor density needs at least one {{pattern: density}} entry")
        for pattern, d in density.items():
            if not isinstance(pattern, str):
                raise TypeError(f"{who}: density patterns must be strings (tensor names or fnmatch patterns), "
                                f"got {pattern!r}")
            try:
                k_from_density(d, 0)
            except (TypeError, ValueError) as e:
                raise type(e)(f"{who}: density[{pattern!r}]: {e}") from None
        return
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"{who}: k must be an int, got {type(k).__name__}")
        if k < 0:
            raise ValueError(f"{who}: k must be >= 0, got {k}")
        if per_tensor:
            raise ValueError(f"{who}: per_tensor selection takes density (each tensor keeps that fraction of its "
                             "entries), not k")
    else:
        try:
            k_from_density(density, 0)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{who}: {e}") from None


def _ordered(x, layout: Layout, what: str, who: str) -> List[torch.Tensor]:
    """``x`` (a tensor or a dict) as a list in the layout's order, checked against it."""
    if not layout.is_dict:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{who}: {what} must be a tensor or numpy array for a single-tensor layout, "
                            f"got {type(x).__name__}")
        items = [x]
    else:
        if not isinstance(x, Mapping):
            raise TypeError(f"{who}: {what} must be a dict name -> tensor for this layout, got {type(x).__name__}")
        if set(x.keys()) != set(layout.names) or len(x) != len(layout.names):
            missing = sorted(set(layout.names) - set(x.keys()))
            extra = sorted(set(x.keys()) - set(layout.names), key=str)
            raise ValueError(f"{who}: {what} keys differ from the layout's (missing {missing}, extra {extra})")
        items = [x[n] for n in layout.names]
    for spec, t in zip(layout.specs, items):
        if tuple(t.shape) != spec.shape:
            label = what if not layout.is_dict else f"{what}[{spec.name!r}]"
            raise ValueError(f"{who}: {label} has shape {tuple(t.shape)}, the layout says {spec.shape}")
    return items


def _round_clamped(v: torch.Tensor, values: str) -> torch.Tensor:
    """float32 ``v`` -> the travel dtype, values beyond its range clamped so that ``v - sent``
    stays exact in float32 (see ErrorFeedback's ``overflow="clamp"``)."""
    if values == "bf16":
        # Anything at or above bfloat16's max rounds to it or to inf; v - max is exact (Sterbenz).
        return v.clamp(-_BF16_MAX, _BF16_MAX).to(torch.bfloat16)
    big = v.abs() > _FP16_MAX
    if not bool(big.any()):
        return v.to(torch.float16)
    vb = v[big]
    # ulp of |v| in float32 (a power of two >= 2**-7 here, since |v| > 65504 >= 2**15): v is a
    # multiple of it, so for any multiple c of it |v - c| < |v| is exact in float32. The largest
    # float16 that is such a multiple: 65504 while the ulp is <= 32 (|v| < 2**29), then 65472,
    # 65408, ... and 0 once the ulp passes 65504 (|v| >= 2**39, where nothing can be sent).
    ulp = ((vb.abs().view(torch.int32) & 0x7F800000) - (23 << 23)).view(torch.float32)
    cap = torch.floor(_FP16_MAX / ulp) * ulp
    clamped = v.clone()
    clamped[big] = torch.copysign(cap, vb)
    return clamped.to(torch.float16)


def _add_at(residuals: List[torch.Tensor], sd: SparseDelta, err: torch.Tensor):
    """``residuals[kept] += err`` (float32), per tensor of the layout."""
    parts = SparseDelta.from_valid(sd.indices, err, sd.layout).split()
    for r, spec in zip(residuals, sd.layout.specs):
        idx, e = parts[spec.name]
        if idx.numel():
            r.view(-1).index_add_(0, idx.to(r.device), e.to(device=r.device, dtype=torch.float32))


def _strip(e: Exception) -> str:
    return str(e).removeprefix("topk_sparsify: ")


def density_of(name: str, density: Mapping[str, float]) -> float:
    """The density of tensor ``name`` from a per-tensor ``{name_or_fnmatch_pattern: density}``
    mapping: the first entry (in the mapping's order) whose pattern matches."""
    for pattern, d in density.items():
        if fnmatch.fnmatchcase(name, pattern):
            return float(d)
    raise ValueError(f"tensor {name!r} matches no pattern of the per-tensor density {list(density)}; add a '*' "
                     "entry for the rest")


def _select(tensors, res, layout: Layout, k, density, per_tensor, vdt, as_layout):
    """The top-k (one global budget, or per tensor) with the residual update; returns the
    selection and the residual list it updated (``res`` itself, or working copies)."""
    with torch.no_grad():
        if isinstance(density, Mapping) or (per_tensor and layout.is_dict and len(layout.specs) > 1):
            # One top-k per tensor, each on a working copy of its residual: a failure in a later
            # tensor (NaN, overflow) must not leave the earlier ones updated.
            work = None if res is None else [r.clone() for r in res]
            idx, val = [], []
            for i, spec in enumerate(layout.specs):
                d = density_of(spec.name, density) if isinstance(density, Mapping) else density
                part = topk_sparsify(tensors[i], density=d, value_dtype=vdt,
                                     residual=None if work is None else work[i])
                idx.append(part.indices + spec.offset)
                val.append(part.values)
            return SparseDelta.from_valid(torch.cat(idx), torch.cat(val), layout), work
        if k is None:
            k = k_from_density(density, layout.numel)
        sd = topk_sparsify(as_layout(tensors), k=k, value_dtype=vdt, residual=None if res is None else as_layout(res))
        return SparseDelta.from_valid(sd.indices, sd.values, layout), res


def compress(delta: Dense, layout: Layout, *, k: Optional[int] = None, density: Optional[float] = None,
             values: str = "fp16", residual: Optional[Dense] = None, per_tensor: bool = False,
             overflow: str = "clamp", int8_block: int = 256, layout_mode: str = "fingerprint",
             who: str = "compress") -> bytes:
    """The functional core of :class:`ErrorFeedback` (and of ``fastlora.fl.client.sparsify_encode``):
    top-k of ``delta + residual`` -> travel format -> ``fastlora.codec`` payload bytes, with the
    ``residual`` (a dict / tensor of float32 in ``layout``'s names and shapes, or None for no
    error feedback) updated in place to keep everything the payload does not carry exactly.
    Arguments as in :class:`ErrorFeedback`; ``layout`` is the one the payload is encoded for.
    All or nothing: every error is raised before the residual changes.
    """
    if not isinstance(layout, Layout):
        raise TypeError(f"{who}: layout must be a fastlora Layout, got {type(layout).__name__}")
    _check_format(values, overflow, int8_block, layout_mode, who)
    _check_budget(k, density, per_tensor, who)
    if layout_mode == "full" and len(layout.to_json().encode()) > codec.MAX_JSON_BYTES:
        raise ValueError(f"{who}: the JSON layout is above codec.MAX_JSON_BYTES; use layout_mode='fingerprint'")
    _check_delta(who, delta)
    delta = _arrays.input_dense(delta, f"{who}: delta")
    tensors = _ordered(delta, layout, "delta", who)

    def as_layout(items):
        return dict(zip(layout.names, items)) if layout.is_dict else items[0]

    res = None
    if residual is not None:
        residual = _arrays.inplace_dense(residual, f"{who}: residual")
        res = _ordered(residual, layout, "residual", who)
        # dtype / device / contiguity / grad: the sparsifier's own checks, before any work
        try:
            _check_residual(as_layout(res), Layout.of(as_layout(tensors)), tensors)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{who}: {_strip(e)}") from None

    # overflow="raise": topk_sparsify rounds to the travel dtype itself and refuses a value it
    # cannot hold before touching anything. "clamp": it keeps float32 values (nothing can
    # overflow) and the clamped rounding below puts the difference into the residual.
    vdt = _TOPK_DTYPE[values] if overflow == "raise" else torch.float32
    try:
        sd, work = _select(tensors, res, layout, k, density, per_tensor, vdt, as_layout)
    except (TypeError, ValueError) as e:   # NaN / Inf, an overflow with overflow="raise"
        raise type(e)(f"{who}: {_strip(e)}") from None
    with torch.no_grad():
        # From here on nothing can fail: the values are finite and fit the travel format.
        if values == "int8":
            payload = codec.encode(sd, values="int8", layout=layout_mode, int8_block=int8_block)
            if work is not None:
                # int8 is coarser than the float32 values topk_sparsify kept: keep the difference.
                sent = codec.decode(payload, layout=layout)
                _add_at(work, sd, sd.values.to(torch.float32) - sent.values.to(torch.float32))
        elif values in ("fp16", "bf16") and overflow == "clamp":
            sent = _round_clamped(sd.values, values)
            payload = codec.encode(SparseDelta.from_valid(sd.indices, sent, layout), values=values, layout=layout_mode)
            if work is not None:
                _add_at(work, sd, sd.values - sent.to(torch.float32))
        else:   # fp32, or fp16 / bf16 already rounded (and range-checked) by topk_sparsify
            payload = codec.encode(sd, values=values, layout=layout_mode)
        if res is not None and work is not res:
            for r, w in zip(res, work):
                r.copy_(w)
    return payload


class ErrorFeedback:
    """Client-side error-feedback compressor: one object per client, kept across rounds.

    ``encode(delta)`` sparsifies ``delta + residual`` (top-k by ``k`` or ``density``, one global
    budget or ``per_tensor``), rounds the kept values to the travel format, encodes them with
    ``fastlora.codec`` and returns the payload bytes; everything the payload does not carry
    exactly (dropped entries, fp16 / bf16 rounding, int8 quantisation, clamped overflow) goes
    into the residual, so that bitwise in float32
    ``decode(payload).to_dense(float32) + residual_new == float32(delta) + residual_old``.

    Args:
        layout: the adapter's layout: a :class:`~fastlora.Layout`, or a template (a tensor,
            numpy array, or dict of them, e.g. the global adapter) whose layout is taken, or
            None to take it from the first ``delta``. Its fingerprint identifies the payloads,
            so the server must decode with the same layout (same names, shapes **and dtypes**:
            pass ``Layout.of(global_adapter)`` when the delta's dtype may differ from it).
        density / k: the default budget for ``encode`` (exactly one; or neither here, and one
            per ``encode`` call). ``k = floor(density * numel + 0.5)``, as in ``topk_sparsify``.
        values: the travel format: ``"fp16"`` (default, as the library's sparse strategies
            upload), ``"bf16"``, ``"fp32"`` (exact) or ``"int8"`` (per-block scales,
            ``int8_block`` values a block).
        per_tensor: every tensor keeps its own top-``density`` instead of one global top-k
            (for tensors on different scales, e.g. an adapter itself); takes ``density``.
            ``density`` may also be a per-tensor mapping ``{name_or_fnmatch_pattern: density}``
            (first matching entry wins, e.g. ``{"*.lora_B.*": 1 / 4, "head.*": 1.0, "*": 1 / 32}``),
            which implies per-tensor selection; a tensor that matches no entry is an error.
        overflow: a kept value the travel format cannot hold (|v| > 65504 in fp16, beyond
            bfloat16's max in bf16; fp32 and int8 hold every finite float32):
            ``"clamp"`` (default) sends the largest finite value of its sign (fp16: 65504;
            for |v| >= 2**29 the largest float16 c with v - c exact in float32, reaching 0
            for |v| >= 2**39; bf16: its max) and keeps the rest in the residual, so the
            accounting above stays exact and the excess goes out in later rounds;
            ``"raise"``: ValueError naming the value, before anything changes.
        int8_block: int8 block size (values per fp32 scale).
        layout_mode: ``"fingerprint"`` (default: 16 bytes identify the layout; the server
            passes it to ``decode``) or ``"full"`` (the JSON layout travels).
        device: where the residual lives (default: the template's device, or the first
            delta's; a :class:`Layout` alone means the CPU).

    State: the residual is float32, one tensor per layout entry (``residual``), created at
    construction when the layout is known, else at the first ``encode``. ``state_dict()`` /
    ``load_state_dict()`` carry it between rounds as a dict of tensors (no pickle; e.g.
    ``context.state["ef"] = ArrayRecord(ef.state_dict())`` in a Flower ClientApp).

    Errors: a bad argument, a delta that does not match the layout (names, shapes), a non-float
    dtype (TypeError, as ``topk_sparsify``), NaN / Inf in delta or residual, or an overflow
    with ``overflow="raise"`` raise before the residual changes: nothing is lost.

    numpy: ``delta`` may be numpy arrays (or a dict mixing them with tensors; see the rule in
    ``fastlora._arrays``); the residual is torch, ``state_dict(as_numpy=True)`` gives numpy.
    """

    def __init__(self, layout: Union[Layout, Dense, None] = None, *, density: Optional[float] = None,
                 k: Optional[int] = None, values: str = "fp16", per_tensor: bool = False,
                 overflow: str = "clamp", int8_block: int = 256, layout_mode: str = "fingerprint",
                 device: Union[str, torch.device, None] = None):
        who = "ErrorFeedback"
        _check_format(values, overflow, int8_block, layout_mode, who)
        if not isinstance(per_tensor, bool):
            raise TypeError(f"{who}: per_tensor must be a bool, got {per_tensor!r}")
        if k is not None or density is not None:
            _check_budget(k, density, per_tensor, who)
        self.k, self.density = k, density
        self.values, self.per_tensor, self.overflow = values, per_tensor, overflow
        self.int8_block, self.layout_mode = int8_block, layout_mode
        self._device = torch.device(device) if device is not None else None
        self._layout: Optional[Layout] = None
        self._residual: Optional[Dict[str, torch.Tensor]] = None
        if layout is not None:
            if isinstance(layout, Layout):
                self._layout = layout
            else:
                try:
                    self._layout = Layout.of(layout)
                except TypeError as e:
                    raise TypeError(f"{who}: layout must be a Layout, a tensor / numpy array or a dict of them: {e}") \
                        from None
                if self._device is None:
                    first = layout if not isinstance(layout, Mapping) else next(iter(layout.values()), None)
                    if isinstance(first, torch.Tensor):
                        self._device = first.device
            self._residual = self._zeros(self._layout)

    # -- state ----------------------------------------------------------------------------
    @property
    def layout(self) -> Optional[Layout]:
        """The layout the payloads are encoded for (None until known)."""
        return self._layout

    @property
    def residual(self):
        """The live float32 residual: a dict name -> tensor (a tensor for a single-tensor
        layout), or None before the first ``encode`` when no layout was given. Updated in
        place by ``encode``."""
        if self._residual is None:
            return None
        return self._residual if self._layout is None or self._layout.is_dict else self._residual[""]

    def _zeros(self, layout: Layout) -> Dict[str, torch.Tensor]:
        dev = self._device or torch.device("cpu")
        return {s.name: torch.zeros(s.shape, dtype=torch.float32, device=dev) for s in layout.specs}

    def reset(self) -> None:
        """Forgets what was not sent (zero residual)."""
        if self._residual is not None:
            for r in self._residual.values():
                r.zero_()

    def state_dict(self, *, as_numpy: Optional[bool] = None) -> Dict[str, Union[torch.Tensor, np.ndarray]]:
        """A copy of the residual: {layout name: float32 tensor} (the key of a single-tensor
        layout is ``""``); ``{}`` before the residual exists. Tensors only, no pickle:
        ``flwr.app.ArrayRecord(ef.state_dict())`` stores it. ``as_numpy=True``: numpy float32
        arrays (None / False: tensors; the numpy rule of ``fastlora._arrays``)."""
        as_numpy = _arrays.check_as_numpy(as_numpy)
        if self._residual is None:
            return {}
        if as_numpy:
            return {n: _arrays.to_numpy(r).copy() for n, r in self._residual.items()}
        return {n: r.detach().clone() for n, r in self._residual.items()}

    def load_state_dict(self, state) -> None:
        """Restores a residual from ``state_dict()`` (tensors or numpy arrays), or from an object
        with ``to_torch_state_dict()`` (a Flower ``ArrayRecord``). Keys and shapes must match
        the layout when it is known; values must be float32 and finite. The data is copied.
        An empty mapping forgets the residual (zero, or created at the next ``encode``).
        All or nothing: on any error the current residual is kept."""
        who = "ErrorFeedback.load_state_dict"
        if hasattr(state, "to_torch_state_dict"):      # a Flower ArrayRecord
            state = state.to_torch_state_dict()
        if not isinstance(state, Mapping):
            raise TypeError(f"{who}: expected a dict name -> tensor / numpy array, got {type(state).__name__}")
        if not state:
            self._residual = None if self._layout is None else self._zeros(self._layout)
            return
        lay = self._layout
        if lay is not None:
            if set(state.keys()) != set(lay.names) or len(state) != len(lay.names):
                missing = sorted(set(lay.names) - set(state.keys()))
                extra = sorted(set(state.keys()) - set(lay.names), key=str)
                raise ValueError(f"{who}: keys differ from the layout's (missing {missing}, extra {extra})")
            names = list(lay.names)
        else:
            names = list(state.keys())
        new = {}
        for i, n in enumerate(names):
            if not isinstance(n, str):
                raise TypeError(f"{who}: keys must be str, got {type(n).__name__}")
            v = state[n]
            if isinstance(v, np.ndarray):
                if v.dtype.kind != "f" or v.dtype.itemsize != 4:
                    raise TypeError(f"{who}: entry {n!r} has dtype {v.dtype}; a residual is float32")
                v = torch.from_numpy(np.array(v, dtype=np.float32, order="C", copy=True))   # native, private
            elif isinstance(v, torch.Tensor):
                if v.dtype != torch.float32:
                    raise TypeError(f"{who}: entry {n!r} has dtype {v.dtype}; a residual is float32")
            else:
                raise TypeError(f"{who}: entry {n!r} is a {type(v).__name__}, not a tensor or numpy array")
            if lay is not None and tuple(v.shape) != lay.specs[i].shape:
                raise ValueError(f"{who}: entry {n!r} has shape {tuple(v.shape)}, the layout says {lay.specs[i].shape}")
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"{who}: entry {n!r} holds NaN or Inf")
            dev = self._device or (v.device if isinstance(state[n], torch.Tensor) else torch.device("cpu"))
            new[n] = v.detach().to(device=dev, dtype=torch.float32, copy=True).contiguous()
        self._residual = new

    # -- the client step -----------------------------------------------------------------
    def encode(self, delta: Dense, *, k: Optional[int] = None, density: Optional[float] = None) -> bytes:
        """Payload bytes for ``delta`` (+ the residual, updated in place; see the class
        docstring). ``k`` / ``density`` override the constructor's budget for this call.
        ``delta``: a tensor / numpy array, or a dict of them with the layout's names (any
        order) and shapes; float16 / bfloat16 / float32 / float64 (taken in float32)."""
        who = "ErrorFeedback.encode"
        if k is None and density is None:
            k, density = self.k, self.density
            if k is None and density is None:
                raise ValueError(f"{who}: no budget: give k or density here or to the constructor")
        lay = self._layout
        if lay is None:
            lay = _check_delta(who, delta)
            if self._residual is not None:      # loaded before the layout was known: must fit
                if set(self._residual) != set(lay.names):
                    raise ValueError(f"{who}: delta's names {list(lay.names)} differ from the loaded residual's "
                                     f"{list(self._residual)}")
                for s in lay.specs:
                    if tuple(self._residual[s.name].shape) != s.shape:
                        raise ValueError(f"{who}: delta {lay.describe(s.name)} has shape {s.shape}, the loaded "
                                         f"residual {tuple(self._residual[s.name].shape)}")
        residual = self._residual
        if residual is None:
            first = delta if not isinstance(delta, Mapping) else next(iter(delta.values()), None)
            dev = self._device or (first.device if isinstance(first, torch.Tensor) else torch.device("cpu"))
            residual = {s.name: torch.zeros(s.shape, dtype=torch.float32, device=dev) for s in lay.specs}
        payload = compress(delta, lay, k=k, density=density, values=self.values,
                           residual=residual if lay.is_dict else residual[""], per_tensor=self.per_tensor,
                           overflow=self.overflow, int8_block=self.int8_block, layout_mode=self.layout_mode,
                           who=who)
        self._layout, self._residual = lay, residual    # committed only once the call succeeded
        return payload

    def __repr__(self):
        budget = f"k={self.k}" if self.k is not None else f"density={self.density}"
        return (f"ErrorFeedback({budget}, values={self.values!r}, per_tensor={self.per_tensor}, "
                f"overflow={self.overflow!r}, layout={self._layout!r})")
