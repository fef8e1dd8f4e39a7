"""numpy at fastlora's edges: turn caller arrays into tensors (and back), safely.

The rule every public function follows (documented once here, referred to by the docstrings):

* **Inputs.** Wherever a function takes a tensor or a dict of tensors it also takes numpy
  arrays (float16 / float32 / float64 for data) or dicts mixing both; wherever it takes payload
  ``bytes`` it also takes ``bytearray``, ``memoryview`` and 1-D uint8 numpy arrays. An input
  array is read zero-copy (``torch.from_numpy``) when that is safe: native byte order, no
  negative strides, writeable. Otherwise (big-endian, negative strides, read-only) it is copied
  first, so fastlora never holds a tensor aliasing a buffer the caller marked read-only.
* **Arrays updated in place** (``residual=``, ``out=``) stay the caller's arrays: they must be
  writeable and native-endian (a residual also float32 and C-contiguous); anything else is a
  ValueError / TypeError naming the argument, raised before any work. They are written through
  ``torch.from_numpy`` (shared memory), and returned as themselves.
* **Results.** ``SparseDelta`` and payload ``bytes`` are the same whatever the input (torch
  tensors inside). A function returning *new dense arrays* takes ``as_numpy=None``: ``None``
  gives numpy arrays when the dense input it mirrors was numpy (``new_residual(delta)``), torch
  tensors when it has none (``sparse_aggregate`` of payloads, ``SparseDelta.to_dense``,
  ``ErrorFeedback.state_dict``); ``True`` / ``False`` force numpy / torch.
"""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import torch

# numpy dtypes accepted for dense data (by kind 'f' and size; any byte order).
_FLOAT_ITEMSIZES = (2, 4, 8)
BYTES_TYPES = (bytes, bytearray, memoryview, np.ndarray)


def is_numpy(x) -> bool:
    return isinstance(x, np.ndarray)


def has_numpy(x) -> bool:
    """A numpy array, or a mapping holding at least one."""
    if isinstance(x, np.ndarray):
        return True
    return isinstance(x, Mapping) and any(isinstance(v, np.ndarray) for v in x.values())


def input_tensor(x, what: str, *, any_dtype: bool = False):
    """A numpy array -> a CPU tensor safe to read (zero-copy when safe, else a copy); anything
    else is returned unchanged (the caller's own checks apply). Float arrays only (any dtype
    torch can hold with ``any_dtype``, left to the caller's checks): else a TypeError naming
    ``what``."""
    if not isinstance(x, np.ndarray):
        return x
    if not any_dtype and not (x.dtype.kind == "f" and x.dtype.itemsize in _FLOAT_ITEMSIZES):
        raise TypeError(f"{what} is a numpy array of dtype {x.dtype}; expected float16, float32 or float64")
    if not x.dtype.isnative or not x.flags.writeable or any(s < 0 for s in x.strides) or not x.flags.aligned:
        x = np.array(x, dtype=x.dtype.newbyteorder("="), order="C", copy=True)   # private, writeable, native
    try:
        return torch.from_numpy(x)
    except TypeError as e:
        raise TypeError(f"{what} is a numpy array of dtype {x.dtype}, which torch cannot hold ({e})") from None


def inplace_tensor(x, what: str):
    """A numpy array the caller asked fastlora to update in place -> a tensor sharing its
    memory; raises (naming ``what``) when writing through it is impossible or unsafe."""
    if not isinstance(x, np.ndarray):
        return x
    if not x.flags.writeable:
        raise ValueError(f"{what} is a read-only numpy array; it is updated in place, pass a writeable one")
    if not x.dtype.isnative:
        raise ValueError(f"{what} is a numpy array in non-native byte order ({x.dtype}); it is updated in place, "
                         f"pass a native-endian one (e.g. arr.astype(arr.dtype.newbyteorder('=')))")
    if x.dtype.kind != "f" or x.dtype.itemsize not in _FLOAT_ITEMSIZES:
        raise TypeError(f"{what} is a numpy array of dtype {x.dtype}; expected float16, float32 or float64")
    if any(s < 0 for s in x.strides) or not x.flags.aligned:
        raise ValueError(f"{what} is a numpy array with negative strides or unaligned data; it is updated in "
                         f"place, pass a contiguous one")
    return torch.from_numpy(x)


def input_dense(x, what: str):
    """A tensor / array, or a mapping of them -> the same with every numpy array converted by
    :func:`input_tensor` (a new dict for mappings; insertion order kept)."""
    if isinstance(x, np.ndarray):
        return input_tensor(x, what)
    if isinstance(x, Mapping) and not isinstance(x, torch.Tensor):
        if not any(isinstance(v, np.ndarray) for v in x.values()):
            return x
        return {k: input_tensor(v, f"{what}[{k!r}]") for k, v in x.items()}
    return x


def inplace_dense(x, what: str):
    """Like :func:`input_dense` for arguments updated in place (see :func:`inplace_tensor`)."""
    if isinstance(x, np.ndarray):
        return inplace_tensor(x, what)
    if isinstance(x, Mapping) and not isinstance(x, torch.Tensor):
        if not any(isinstance(v, np.ndarray) for v in x.values()):
            return x
        return {k: inplace_tensor(v, f"{what}[{k!r}]") for k, v in x.items()}
    return x


def check_as_numpy(as_numpy, what: str = "as_numpy") -> Optional[bool]:
    if as_numpy is not None and not isinstance(as_numpy, bool):
        raise TypeError(f"{what} must be None, True or False, got {as_numpy!r}")
    return as_numpy


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor -> a numpy array (CPU; bfloat16 becomes float32, numpy has no bfloat16)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.to(torch.float32)
    return t.cpu().numpy()


def dense_out(x, as_numpy: bool):
    """A tensor or a dict of tensors, as numpy when ``as_numpy``."""
    if not as_numpy:
        return x
    if isinstance(x, torch.Tensor):
        return to_numpy(x)
    return {k: to_numpy(v) for k, v in x.items()}


def payload_view(data, what: str = "data") -> memoryview:
    """Payload bytes (bytes, bytearray, memoryview or a 1-D uint8 numpy array) -> a contiguous
    1-D memoryview of unsigned bytes (copied only when the input is not contiguous)."""
    if isinstance(data, np.ndarray):
        if data.ndim != 1 or data.dtype not in (np.uint8, np.int8):
            raise TypeError(f"{what}: a payload given as a numpy array must be 1-D uint8, got "
                            f"{data.ndim}-D {data.dtype}")
        if not data.flags.c_contiguous:
            data = np.ascontiguousarray(data)
        return memoryview(data).cast("B")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what}: expected payload bytes (bytes, bytearray, memoryview or a 1-D uint8 numpy array), "
                        f"got {type(data).__name__}")
    mv = memoryview(data)
    if mv.ndim != 1 or mv.format not in ("B", "b", "c") or not mv.contiguous:
        mv = memoryview(mv.tobytes())
    return mv.cast("B") if mv.format != "B" else mv
