"""SparseDelta: a sparse update of one tensor or of a whole dict of tensors (a LoRA state
dict), as produced by ``fastlora.topk_sparsify``, carried by ``fastlora.codec`` and summed by
the aggregation ops.

Flat indexing: the tensors of a layout are laid end to end in their order (a dict's insertion
order), each in row-major order; ``indices`` are positions in that flat space, int64, sorted
ascending and unique. ``values`` are the kept entries in that order.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from fastlora import _arrays

# dtypes a layout may name, by their canonical string (also the wire-format spelling).
DTYPES_BY_NAME: Dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
NAMES_BY_DTYPE = {v: k for k, v in DTYPES_BY_NAME.items()}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a layout: its name ("" for a bare tensor), shape, dtype and the position
    of its first element in the flat index space."""
    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Layout:
    """The names, shapes, dtypes and flat offsets of the tensors a SparseDelta covers."""

    __slots__ = ("specs", "is_dict", "numel", "_fingerprint")

    def __init__(self, entries: Sequence[Tuple[str, Sequence[int], torch.dtype]], is_dict: bool):
        specs, offset = [], 0
        names = set()
        for name, shape, dtype in entries:
            label = f"tensor {name!r}" if is_dict else "the tensor"
            shape = tuple(int(s) for s in shape)
            if any(s < 0 for s in shape):
                raise ValueError(f"layout: {label} has a negative dimension in {shape}")
            if dtype not in NAMES_BY_DTYPE:
                raise TypeError(f"layout: {label} has unsupported dtype {dtype} "
                                f"(supported: {', '.join(DTYPES_BY_NAME)})")
            if name in names:
                raise ValueError(f"layout: duplicate tensor name {name!r}")
            names.add(name)
            spec = TensorSpec(str(name), shape, dtype, offset)
            specs.append(spec)
            offset += spec.numel
        if not is_dict and len(specs) != 1:
            raise ValueError("layout: a bare-tensor layout has exactly one entry")
        # to_dense/split key a bare tensor by "": a named bare entry (e.g. from an untrusted JSON
        # layout) would pass validate() and then fail in to_dense with a KeyError.
        if not is_dict and specs[0].name != "":
            raise ValueError(f"layout: a bare-tensor layout's entry has the name '', got {specs[0].name!r}")
        self.specs: Tuple[TensorSpec, ...] = tuple(specs)
        self.is_dict = bool(is_dict)
        self.numel = offset
        self._fingerprint = None

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def of(cls, delta: Union[torch.Tensor, np.ndarray, Mapping[str, Union[torch.Tensor, np.ndarray]]]) -> "Layout":
        """The layout of a tensor or of a dict name -> tensor (insertion order). numpy arrays
        count as the tensors ``torch.from_numpy`` would give (float16/32/64)."""
        if isinstance(delta, (torch.Tensor, np.ndarray)):
            return cls([("", delta.shape, _dtype_of(delta, "the tensor"))], is_dict=False)
        if isinstance(delta, Mapping):
            for k, v in delta.items():
                if not isinstance(k, str):
                    raise TypeError(f"layout: dict keys must be str, got {type(k).__name__}")
                if not isinstance(v, (torch.Tensor, np.ndarray)):
                    raise TypeError(f"layout: entry {k!r} is a {type(v).__name__}, not a tensor")
            return cls([(k, v.shape, _dtype_of(v, f"tensor {k!r}")) for k, v in delta.items()], is_dict=True)
        raise TypeError(f"expected a tensor or a dict of tensors, got {type(delta).__name__}")

    # -- serialisation (the codec's JSON layout) --------------------------------------------
    def to_json_obj(self) -> dict:
        return {"dict": self.is_dict,
                "tensors": [[s.name, list(s.shape), NAMES_BY_DTYPE[s.dtype]] for s in self.specs]}

    def to_json(self) -> str:
        return json.dumps(self.to_json_obj(), separators=(",", ":"), ensure_ascii=True)

    @classmethod
    def from_json_obj(cls, obj) -> "Layout":
        """Parses and validates an untrusted JSON layout (raises ValueError/TypeError)."""
        if not isinstance(obj, dict) or set(obj) != {"dict", "tensors"}:
            raise ValueError("layout JSON must be an object with keys 'dict' and 'tensors'")
        if not isinstance(obj["dict"], bool) or not isinstance(obj["tensors"], list):
            raise ValueError("layout JSON: 'dict' must be a bool and 'tensors' a list")
        entries = []
        for t in obj["tensors"]:
            if (not isinstance(t, list) or len(t) != 3 or not isinstance(t[0], str)
                    or not isinstance(t[1], list) or not isinstance(t[2], str)):
                raise ValueError("layout JSON: each tensor must be [name, shape, dtype]")
            if not all(isinstance(s, int) and not isinstance(s, bool) for s in t[1]):
                raise ValueError(f"layout JSON: shape of {t[0]!r} must be a list of ints")
            if t[2] not in DTYPES_BY_NAME:
                raise ValueError(f"layout JSON: unknown dtype {t[2]!r} for {t[0]!r}")
            entries.append((t[0], t[1], DTYPES_BY_NAME[t[2]]))
        return cls(entries, is_dict=obj["dict"])

    def fingerprint(self) -> bytes:
        """16-byte BLAKE2b digest of the canonical JSON layout: identifies a layout on the wire
        when both sides already know it."""
        if self._fingerprint is None:
            self._fingerprint = hashlib.blake2b(self.to_json().encode(), digest_size=16).digest()
        return self._fingerprint

    # -- helpers ----------------------------------------------------------------------------
    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(s.name for s in self.specs)

    def offsets(self) -> torch.Tensor:
        """int64 tensor of each tensor's first flat index, plus the total at the end."""
        return torch.tensor([s.offset for s in self.specs] + [self.numel], dtype=torch.int64)

    def tensor_of(self, flat_index: int) -> str:
        """Name of the tensor holding a flat index (for error messages)."""
        for s in self.specs:
            if s.offset <= flat_index < s.offset + s.numel:
                return s.name
        raise IndexError(f"flat index {flat_index} outside layout of {self.numel} entries")

    def describe(self, name: str) -> str:
        return "the tensor" if not self.is_dict else f"tensor {name!r}"

    def __eq__(self, other) -> bool:
        return isinstance(other, Layout) and self.is_dict == other.is_dict and self.specs == other.specs

    def __hash__(self):
        return hash((self.is_dict, self.specs))

    def __repr__(self):
        if not self.is_dict:
            s = self.specs[0]
            return f"Layout(tensor {tuple(s.shape)} {NAMES_BY_DTYPE[s.dtype]})"
        inner = ", ".join(f"{s.name}: {tuple(s.shape)} {NAMES_BY_DTYPE[s.dtype]}" for s in self.specs[:4])
        more = f", ... ({len(self.specs)} tensors)" if len(self.specs) > 4 else ""
        return f"Layout({{{inner}{more}}})"


def _dtype_of(t, label: str) -> torch.dtype:
    if isinstance(t, torch.Tensor):
        return t.dtype
    try:
        return torch.from_numpy(np.empty(0, dtype=t.dtype.newbyteorder("="))).dtype
    except (TypeError, ValueError):
        raise TypeError(f"layout: {label} is a numpy array of unsupported dtype {t.dtype} "
                        f"(supported: float16, float32, float64)") from None


class SparseDelta:
    """A sparse update: ``indices`` (int64, flat, sorted ascending, unique), ``values`` (same
    length; their dtype is the travel dtype, e.g. float32 or float16) and the ``layout`` that
    ``to_dense`` rebuilds. Tensors live on one device (the CPU after decoding). The constructor
    also takes numpy arrays (int64 indices, float values; read zero-copy when safe, else
    copied: see ``fastlora._arrays``); they are kept as tensors."""

    __slots__ = ("indices", "values", "layout", "validated")

    def __init__(self, indices: torch.Tensor, values: torch.Tensor, layout: Layout, *,
                 validate: bool = True):
        self.indices = _arrays.input_tensor(indices, "SparseDelta indices", any_dtype=True)
        self.values = _arrays.input_tensor(values, "SparseDelta values")
        self.layout = layout
        # True once the invariants are known to hold (checked here, or produced by a fastlora
        # kernel that guarantees them); consumers may then skip re-checking.
        self.validated = False
        if validate:
            self.validate()

    @classmethod
    def from_valid(cls, indices: torch.Tensor, values: torch.Tensor, layout: Layout) -> "SparseDelta":
        """A SparseDelta from indices and values that already satisfy its invariants (sorted,
        unique, in range, finite), without checking them again: what fastlora's kernels and
        its decoder produce (each validates its input once). Anything else should use the
        constructor, which checks."""
        sd = cls(indices, values, layout, validate=False)
        sd.validated = True
        return sd

    @property
    def numel(self) -> int:
        return self.layout.numel

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    @property
    def density(self) -> float:
        return self.nnz / self.numel if self.numel else 0.0

    @property
    def device(self) -> torch.device:
        return self.values.device

    def validate(self, check_values: bool = True) -> "SparseDelta":
        """Checks the invariants; raises ValueError naming what is wrong."""
        idx, val = self.indices, self.values
        if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64 or idx.dim() != 1:
            raise ValueError("SparseDelta.indices must be a 1-D int64 tensor")
        if not isinstance(val, torch.Tensor) or val.dim() != 1 or val.shape != idx.shape:
            raise ValueError(f"SparseDelta.values must be 1-D with the same length as indices "
                             f"({idx.numel()}), got shape {tuple(val.shape)}")
        if not val.is_floating_point():
            raise ValueError(f"SparseDelta.values must be floating point, got {val.dtype}")
        if idx.numel():
            if int(idx[0]) < 0 or int(idx[-1]) >= self.numel:
                bad = int(idx[0]) if int(idx[0]) < 0 else int(idx[-1])
                raise ValueError(f"SparseDelta index {bad} out of range [0, {self.numel})")
            if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise ValueError("SparseDelta.indices must be sorted ascending and unique")
            if check_values and not bool(torch.isfinite(val).all()):
                pos = int((~torch.isfinite(val)).nonzero()[0])
                name = self.layout.tensor_of(int(idx[pos]))
                raise ValueError(f"SparseDelta has a non-finite value in {self.layout.describe(name)}")
        self.validated = check_values
        return self

    def to_dense(self, dtype: Optional[torch.dtype] = None, device=None, *, as_numpy: Optional[bool] = None):
        """The dense tensor (or dict of tensors) in the layout's dtypes (or ``dtype``).
        ``as_numpy=True``: numpy arrays instead (on the CPU; bfloat16 comes back as float32,
        numpy has none); None / False: tensors."""
        if _arrays.check_as_numpy(as_numpy):
            return _arrays.dense_out(self.to_dense(dtype, device), True)
        device = device if device is not None else self.values.device
        out = {}
        idx = self.indices.to(device)
        val = self.values.to(device)
        bounds = torch.searchsorted(idx, self.layout.offsets().to(device)).tolist()
        for i, s in enumerate(self.layout.specs):
            t = torch.zeros(s.numel, dtype=dtype or s.dtype, device=device)
            lo, hi = bounds[i], bounds[i + 1]
            if hi > lo:
                t[idx[lo:hi] - s.offset] = val[lo:hi].to(t.dtype)
            out[s.name] = t.view(s.shape)
        return out if self.layout.is_dict else out[""]

    def split(self) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """{name: (local flat indices, values)} per tensor of the layout."""
        bounds = torch.searchsorted(self.indices, self.layout.offsets().to(self.indices.device)).tolist()
        return {s.name: (self.indices[bounds[i]:bounds[i + 1]] - s.offset, self.values[bounds[i]:bounds[i + 1]])
                for i, s in enumerate(self.layout.specs)}

    def __repr__(self):
        return (f"SparseDelta(nnz={self.nnz}, numel={self.numel}, density={self.density:.3g}, "
                f"values={self.values.dtype}, layout={self.layout!r})")
