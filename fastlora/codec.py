"""Wire format of a :class:`~fastlora.sparse_delta.SparseDelta`: ``encode`` -> bytes -> ``decode``.

A federated client sends one payload per round: the kept entries of its LoRA update (flat
indices + values) and enough about the layout for the server to rebuild the tensors. The
format is built so that (1) the index cost is close to the information-theoretic minimum,
(2) the fixed cost per payload is small (many small clients, many rounds), and (3) a server
can decode bytes from untrusted clients safely: every field is validated, whatever the CRC
says, before anything is allocated from it.

Byte layout (version 1). Integers are little-endian fixed-width (``struct`` ``<``) or
unsigned LEB128 varints (7 bits per byte, low group first, high bit = "more"; canonical:
no trailing zero group, at most 10 bytes).

=========  ===========  ========================================================================
offset     size         field
=========  ===========  ========================================================================
0          2            magic ``b"FL"``
2          1            format version (``VERSION`` = 1); a newer version is refused
3          1            flags: bits 0-1 value format (0 fp32, 1 bf16, 2 fp16, 3 int8);
                        bits 2-3 index coding (0 raw, 1 bitmap, 2 rice, 3 all);
                        bit 4 layout mode (0 full JSON, 1 fingerprint); bits 5-7 zero
4          16           fingerprint mode: ``Layout.fingerprint()`` (BLAKE2b-128 of the JSON)
4          varint + n   full mode: JSON length n (<= ``MAX_JSON_BYTES``), then n bytes of UTF-8
                        JSON ``{"dict": bool, "tensors": [[name, [dims...], dtype], ...]}``
.          varint       nnz, the number of kept entries (<= numel <= ``max_numel``)
.          1            Rice parameter k (only when index coding = rice)
.          varint       int8 block size B, 1..16383 (only when values = int8)
---------  -----------  ------------------------------------------------------------------------
.          values       fp32: nnz x ``<f4``; bf16: nnz x ``<u2`` (bf16 bits); fp16: nnz x
                        ``<f2``; int8: ceil(nnz/B) x ``<f4`` block scales, then nnz x int8
.          indices      raw: nnz x ``<u4`` (``<u8`` if numel > 2**32); bitmap: ceil(numel/8)
                        bytes, bit i (LSB first) = entry i kept; all: nothing (nnz == numel);
                        rice: ceil(nnz*k/8) bytes of k-bit remainders (LSB first), then the
                        unary quotient stream up to the CRC (its length is what is left)
end-4      4            CRC32 (``zlib.crc32``) of every preceding byte, ``<I``
=========  ===========  ========================================================================

Every section length follows from the header and the layout, so a payload whose length
disagrees is refused (truncated / trailing bytes). The Rice unary stream is the only
variable-length section; it sits last so that it needs no length field.

Design choices, and why:

* **Fingerprint mode** is for the steady state (server and clients share the adapter
  layout): the layout costs 16 bytes instead of a JSON document. Fixed overhead per payload
  is 2 + 1 + 1 + 16 + varint(nnz) + 4, plus 1 for a Rice parameter and 1-2 for an int8 block
  size: at most ``MAX_FINGERPRINT_OVERHEAD`` = 32 bytes (nnz < 2**35). Full mode sends the
  layout as JSON (never pickle: decoding must not execute anything).
* **Index coding per payload**, the smallest of: *raw* positions (best for a handful of
  entries in a large layout; ``<u4`` covers every index below 2**32, as wide as int32 and
  twice the range), *bitmap* (best from about half density up), *Golomb-Rice* coding of the gaps between
  sorted indices (best in between: for a uniformly random support the gaps are ~geometric,
  for which Rice codes are within a few % of the entropy ``log2 C(n, k)``), and *all* (density
  1 costs no index bytes). k is chosen to minimise the exact bit count (the cost is convex in
  k, so a short walk from the geometric estimate finds the exact minimum). Quotients go
  to one unary bit stream and remainders to a fixed-width one, so both directions are a
  handful of vectorised numpy passes (packbits/unpackbits/cumsum), no per-entry Python.
* **Values**: fp32 is exact; fp16/bf16 round to nearest even (``Tensor.to``); int8 is
  symmetric per block of B values with an fp32 scale ``max|v|/127`` (rounded up so that no
  value clips): error <= scale/2 per entry (plus half an fp32 ulp from rounding the decoded
  code*scale to float32); the scales cost 32/B bits per entry. A value that
  does not fit the chosen format (non-finite, |v| > 65504 for fp16, overflow to inf for
  bf16/fp32) is an :class:`EncodeError` naming the tensor: it is never sent as inf.
* **Untrusted input**: :func:`decode` raises :class:`DecodeError` (a ``ValueError``) for
  anything malformed, and only allocates what the validated sizes imply: every section
  length is checked against ``len(data)`` first, the declared sizes against ``max_numel``,
  the JSON length against ``MAX_JSON_BYTES`` (ints of at most 19 digits, no floats), and the
  unary stream against the longest stream a valid payload of that nnz/numel/k can have.
  A CRC is checked too, but an attacker can recompute it, so nothing relies on it.
  The JSON need not be byte-identical to ``Layout.to_json()`` (any JSON with the same
  content decodes); the fingerprint is always that of the canonical ``to_json()``.
"""
from __future__ import annotations

import json
import math
import struct
import zlib
from typing import List, Optional, Tuple, Union

import numpy as np
import torch

from fastlora import _arrays
from fastlora.sparse_delta import Layout, SparseDelta

__all__ = [
    "DecodeError", "EncodeError", "encode", "decode", "inspect", "payload_overhead",
    "index_entropy_bound", "DEFAULT_MAX_NUMEL", "MAX_FINGERPRINT_OVERHEAD", "MAX_JSON_BYTES",
    "VALUE_FORMATS", "LAYOUT_MODES", "INDEX_CODINGS", "MAGIC", "VERSION",
]


class DecodeError(ValueError):
    """The bytes are not a valid fastlora payload (truncated, corrupted or malicious)."""


class EncodeError(ValueError):
    """The SparseDelta cannot be encoded as asked (e.g. a value does not fit fp16)."""


MAGIC = b"FL"
VERSION = 1
VALUE_FORMATS = ("fp32", "bf16", "fp16", "int8")      # flag code = position
INDEX_CODINGS = ("raw", "bitmap", "rice", "all")      # flag code = position
LAYOUT_MODES = ("full", "fingerprint")                # flag code = position

#: Largest layout (total entries) :func:`decode` accepts unless told otherwise: 2**31 entries,
#: i.e. 8 GiB of fp32 when densified, far above any LoRA adapter, low enough that a hostile
#: header cannot make the server allocate absurd buffers. Raise it per call for bigger models.
DEFAULT_MAX_NUMEL = 1 << 31
#: Hard ceiling on ``max_numel``: keeps every offset/gap computation far from int64 overflow.
_MAX_NUMEL_CEILING = 1 << 62
#: Fixed bytes per payload in fingerprint mode (header, fingerprint, coding params, CRC), at
#: most: 2 magic + 1 version + 1 flags + 16 fingerprint + 5 nnz + 1 Rice k + 2 int8 block + 4 CRC.
MAX_FINGERPRINT_OVERHEAD = 32
#: Longest JSON layout accepted (4 MiB: ~40k tensors with long names).
MAX_JSON_BYTES = 1 << 22
MAX_INT8_BLOCK = (1 << 14) - 1           # varint of at most 2 bytes
_MAX_NDIM = 64
_FINGERPRINT_BYTES = 16
_CRC_BYTES = 4
_MIN_PAYLOAD = len(MAGIC) + 2 + 1 + _CRC_BYTES   # magic, version, flags, 1-byte nnz, CRC
_VALUE_WIDTH = {"fp32": 4, "bf16": 2, "fp16": 2}
_FP16_MAX = 65504.0
_F32_MAX = float(np.finfo(np.float32).max)
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(buf: memoryview, pos: int, end: int, what: str) -> Tuple[int, int]:
    value = shift = 0
    for i in range(10):
        if pos >= end:
            raise DecodeError(f"truncated payload: {what} runs past the end of the header")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            if b == 0 and i > 0:
                raise DecodeError(f"malformed {what}: non-canonical varint (trailing zero group)")
            return value, pos
        shift += 7
    raise DecodeError(f"malformed {what}: varint longer than 10 bytes")


def _ceil8(bits: int) -> int:
    return (bits + 7) >> 3


def _raw_width(numel: int) -> int:
    return 4 if numel <= (1 << 32) else 8


def _rice_kmax(numel: int, nnz: int) -> int:
    # No gap exceeds numel - nnz, and the cost only grows once 2**k is above every gap, so the
    # optimal k never exceeds bit_length(numel - nnz); anything larger is refused on decode.
    return max(0, numel - nnz).bit_length()


def index_entropy_bound(numel: int, nnz: int) -> float:
    """Bits per kept entry needed, at least, to name which ``nnz`` of ``numel`` positions are
    kept: ``log2 C(numel, nnz) / nnz`` (0 when nnz is 0 or numel)."""
    if nnz <= 0 or nnz >= numel:
        return 0.0
    lg = math.lgamma(numel + 1) - math.lgamma(nnz + 1) - math.lgamma(numel - nnz + 1)
    return lg / math.log(2) / nnz


# ---------------------------------------------------------------------------------------------
# index coding
# ---------------------------------------------------------------------------------------------
def _rice_bits(g: np.ndarray, k: int) -> int:
    """Exact Rice-coded size in bits of the gaps ``g`` with parameter k."""
    return g.size * (k + 1) + int((g >> k).sum())


def _rice_param(g: np.ndarray, kmax: int) -> Tuple[int, int]:
    """The k minimising the exact bit count, and that count.

    cost(k+1) - cost(k) = nnz - sum(ceil((g >> k) / 2)) is non-decreasing in k, so the cost is
    convex: walking downhill from the geometric-distribution estimate finds the minimum in a
    few vectorised passes instead of trying every k.
    """
    mean = float(g.mean())
    k = min(kmax, max(0, int(math.floor(math.log2(mean * math.log(2)))) if mean * math.log(2) >= 1 else 0))
    cost = _rice_bits(g, k)
    for step in (-1, 1):
        while 0 <= k + step <= kmax:
            c = _rice_bits(g, k + step)
            if c >= cost:
                break
            k, cost = k + step, c
    return k, cost


def _pack_fixed(r: np.ndarray, k: int) -> bytes:
    """k-bit unsigned ints (k >= 1), LSB first, packed end to end. One pass per bit column:
    k is small exactly when nnz is large (k ~ log2 of the mean gap)."""
    bits = np.empty((r.size, k), dtype=np.uint8)
    for j in range(k):
        bits[:, j] = (r >> j) & 1
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()


def _unpack_fixed(buf: np.ndarray, n: int, k: int) -> np.ndarray:
    allbits = np.unpackbits(buf, bitorder="little")
    if allbits[n * k:].any():
        raise DecodeError("malformed Rice remainders: padding bits after the last remainder are not zero")
    bits = allbits[:n * k].reshape(n, k)
    out = bits[:, 0].astype(np.int64)
    for j in range(1, k):
        out |= bits[:, j].astype(np.int64) << j
    return out


def _encode_indices(idx: np.ndarray, numel: int) -> Tuple[str, int, List[bytes]]:
    """(coding, rice k, byte sections) of the smallest index coding."""
    nnz = idx.size
    if nnz == numel:
        return "all", 0, []
    width = _raw_width(numel)
    sizes = {"raw": nnz * width, "bitmap": _ceil8(numel)}
    k = 0
    if nnz:
        g = np.diff(idx, prepend=np.int64(-1)) - 1            # gaps between kept entries, >= 0
        k, unary_bits = _rice_param(g, _rice_kmax(numel, nnz))
        # unary_bits counts quotients + terminators + remainders; sizes are in whole bytes.
        sizes["rice"] = 1 + _ceil8(nnz * k) + _ceil8(unary_bits - nnz * k)
    coding = min(sizes, key=lambda c: (sizes[c], INDEX_CODINGS.index(c)))
    if coding == "raw":
        return coding, 0, [idx.astype(f"<u{width}").tobytes()]
    if coding == "bitmap":
        bits = np.zeros(numel, dtype=np.bool_)
        bits[idx] = True
        return coding, 0, [np.packbits(bits, bitorder="little").tobytes()]
    q = g >> k
    ends = np.cumsum(q + 1) - 1                 # position of each entry's terminating 1 bit
    unary = np.zeros(int(ends[-1]) + 1, dtype=np.uint8)
    unary[ends] = 1
    parts = [_pack_fixed(g & ((1 << k) - 1), k)] if k else []
    parts.append(np.packbits(unary, bitorder="little").tobytes())
    return coding, k, parts


# ---------------------------------------------------------------------------------------------
# values
# ---------------------------------------------------------------------------------------------
def _value_error(layout: Layout, idx: np.ndarray, pos: int, value, why: str) -> EncodeError:
    name = layout.tensor_of(int(idx[pos]))
    return EncodeError(f"cannot encode {layout.describe(name)}: value {value!r} at flat index "
                       f"{int(idx[pos])} {why}")


def _first(mask: np.ndarray) -> Optional[int]:
    return int(np.flatnonzero(mask)[0]) if mask.any() else None


def _encode_values(val: torch.Tensor, idx: np.ndarray, layout: Layout, fmt: str, block: int) -> List[bytes]:
    # Range checks run in numpy: for 1e5-1e6 values torch's elementwise ops (dispatch, thread
    # pool wake-ups) cost several times more than numpy's single pass.
    if val.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        val = val.to(torch.float32)            # e.g. float8: exact in float32
    if val.dtype == torch.bfloat16:            # numpy has no bfloat16: test the exponent bits
        pos = _first((val.view(torch.int16).numpy() & 0x7F80) == 0x7F80)
    else:
        pos = _first(~np.isfinite(val.numpy()))
    if pos is not None:
        raise _value_error(layout, idx, pos, float(val[pos]), "is not finite")
    if fmt == "fp32":
        out = val if val.dtype == torch.float32 else val.to(torch.float32)
        if val.dtype == torch.float64:         # the only source dtype that can overflow fp32
            pos = _first(np.isinf(out.numpy()))
            if pos is not None:
                raise _value_error(layout, idx, pos, float(val[pos]), "overflows float32")
        return [out.numpy().astype("<f4", copy=False).tobytes()]
    if fmt == "fp16":
        if val.dtype != torch.float16:
            # Strict: anything above the largest half (not just what would round to inf) is
            # refused, so fp16 never silently saturates a large update.
            wide = (val.to(torch.float32) if val.dtype == torch.bfloat16 else val).numpy()
            pos = _first(np.abs(wide) > _FP16_MAX)
            if pos is not None:
                raise _value_error(layout, idx, pos, float(val[pos]), f"does not fit float16 (|v| > {_FP16_MAX:g})")
            val = val.to(torch.float16)        # round to nearest even
        return [val.numpy().astype("<f2", copy=False).tobytes()]
    if fmt == "bf16":
        out = val if val.dtype == torch.bfloat16 else val.to(torch.bfloat16)
        bits = out.view(torch.int16).numpy()
        if val.dtype != torch.bfloat16:
            pos = _first((bits & 0x7FFF) == 0x7F80)   # finite input rounded to +-inf
            if pos is not None:
                raise _value_error(layout, idx, pos, float(val[pos]), "overflows bfloat16")
        return [bits.astype("<i2", copy=False).tobytes()]
    # int8: symmetric per block, fp32 scale. Work in float64 so the scale and codes are exact
    # functions of the input whatever its dtype.
    v = val.to(torch.float64).numpy()
    n = v.size
    big = np.abs(v) > _F32_MAX                  # only float64 input: decoded values are float32
    if big.any():
        pos = int(np.flatnonzero(big)[0])
        raise _value_error(layout, idx, pos, float(v[pos]), "overflows float32 (int8 decodes to float32)")
    nblocks = -(-n // block)
    blocks = np.zeros((nblocks, block), dtype=np.float64)
    blocks.reshape(-1)[:n] = v
    amax = np.abs(blocks).max(axis=1) if n else np.zeros(0)
    exact = amax / 127.0
    s = exact.astype(np.float32)
    # Round the scale up to an fp32 so |v|/s <= 127 (no clipping: error <= s/2) and a tiny
    # nonzero block never gets a zero scale; round down only where 127*s would overflow fp32
    # (a block whose max is within an ulp of the fp32 maximum).
    s = np.where(s.astype(np.float64) < exact, np.nextafter(s, np.float32(np.inf)), s)
    s = np.where(s.astype(np.float64) * 127.0 > _F32_MAX, np.nextafter(s, np.float32(0)), s)
    s64 = s.astype(np.float64)
    # A zero scale means an all-zero block: divide by 1 instead (the codes are 0 either way).
    q = np.rint(blocks / np.where(s64 > 0, s64, 1.0)[:, None])
    q = np.clip(q, -127, 127).astype(np.int8).reshape(-1)[:n]
    return [s.astype("<f4").tobytes(), q.tobytes()]


def _natural_format(val) -> str:
    """The wire format that carries ``val``'s dtype exactly (encode's default)."""
    if not isinstance(val, torch.Tensor) or not val.is_floating_point():
        raise EncodeError("invalid SparseDelta: values must be a 1-D floating tensor as long as indices")
    if val.dtype == torch.float64:
        raise EncodeError("encode: float64 values have no exact wire format; pass values='fp32' (rounds them to "
                          "float32) or another format explicitly")
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(val.dtype, "fp32")


def _value_section_len(fmt: str, nnz: int, block: int) -> int:
    if fmt == "int8":
        return -(-nnz // block) * 4 + nnz
    return nnz * _VALUE_WIDTH[fmt]


# ---------------------------------------------------------------------------------------------
# encode
# ---------------------------------------------------------------------------------------------
def encode(sparse: SparseDelta, *, values: Optional[str] = None, layout: str = "full",
           int8_block: int = 256) -> bytes:
    """Serialises ``sparse`` (see the module docstring for the format).

    values: None (default: the format of the values' own dtype, so nothing is rounded here:
    float32 -> "fp32", float16 -> "fp16", bfloat16 -> "bf16", float8 -> "fp32"; float64, which
    has no exact wire format, is an EncodeError asking for an explicit format), "fp32"
    (exact), "bf16", "fp16" (round to nearest even; fp16 input is sent as is) or "int8" (per
    block of ``int8_block`` values, fp32 scale, error <= scale/2).
    Error feedback: choose the travel precision where the residual can see it, i.e.
    ``topk_sparsify(..., value_dtype=torch.float16)`` then ``encode(sd)``, or use
    ``fastlora.ErrorFeedback`` (which also keeps int8's quantisation error). An explicit
    ``values`` coarser than the values (e.g. "fp16" or "int8" for float32 values) rounds them
    here, after the residual was updated, and that rounding is lost to error feedback.
    (The default used to be "fp16", which silently did exactly that to float32 values.)
    layout: "full" (the JSON layout travels) or "fingerprint" (16-byte hash only; the receiver
    passes the layout to :func:`decode`).
    Raises EncodeError, naming the tensor, for a value the format cannot carry.
    """
    if values is not None and values not in VALUE_FORMATS:
        raise EncodeError(f"values must be None or one of {VALUE_FORMATS}, got {values!r}")
    if layout not in LAYOUT_MODES:
        raise EncodeError(f"layout must be one of {LAYOUT_MODES}, got {layout!r}")
    if not isinstance(sparse, SparseDelta):
        raise TypeError(f"encode expects a SparseDelta, got {type(sparse).__name__}")
    if values is None:
        values = _natural_format(sparse.values)
    if values == "int8" and (isinstance(int8_block, bool) or not isinstance(int8_block, int)
                             or not 1 <= int8_block <= MAX_INT8_BLOCK):
        raise EncodeError(f"int8_block must be an int in [1, {MAX_INT8_BLOCK}], got {int8_block!r}")
    lay = sparse.layout
    idx_t, val_t = sparse.indices, sparse.values
    # The SparseDelta invariants, checked in numpy (see _encode_values) rather than validate().
    if not isinstance(idx_t, torch.Tensor) or idx_t.dtype != torch.int64 or idx_t.dim() != 1:
        raise EncodeError("invalid SparseDelta: indices must be a 1-D int64 tensor")
    if (not isinstance(val_t, torch.Tensor) or val_t.dim() != 1 or val_t.shape != idx_t.shape
            or not val_t.is_floating_point()):
        raise EncodeError("invalid SparseDelta: values must be a 1-D floating tensor as long as indices")
    idx = idx_t.detach().cpu().numpy()
    val = val_t.detach().cpu()
    nnz, numel = idx.size, lay.numel
    if nnz:
        if idx[0] < 0 or idx[-1] >= numel:
            raise EncodeError(f"invalid SparseDelta: index out of range [0, {numel})")
        if nnz > 1 and (idx[1:] <= idx[:-1]).any():
            raise EncodeError("invalid SparseDelta: indices must be sorted ascending and unique")

    value_parts = _encode_values(val, idx, lay, values, int8_block)
    coding, k, index_parts = _encode_indices(idx, numel)

    flags = VALUE_FORMATS.index(values) | (INDEX_CODINGS.index(coding) << 2) | (LAYOUT_MODES.index(layout) << 4)
    head = bytearray(MAGIC)
    head += bytes((VERSION, flags))
    if layout == "fingerprint":
        head += lay.fingerprint()
    else:
        js = lay.to_json().encode("utf-8")
        if len(js) > MAX_JSON_BYTES:
            raise EncodeError(f"JSON layout is {len(js)} bytes, above MAX_JSON_BYTES={MAX_JSON_BYTES}; "
                              f"use layout='fingerprint'")
        head += _varint(len(js)) + js
    head += _varint(nnz)
    if coding == "rice":
        head.append(k)
    if values == "int8":
        head += _varint(int8_block)
    parts = [bytes(head), *value_parts, *index_parts]
    crc = 0
    for p in parts:
        crc = zlib.crc32(p, crc)
    parts.append(struct.pack("<I", crc))
    return b"".join(parts)


# ---------------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------------
class _Header:
    __slots__ = ("fmt", "coding", "mode", "layout", "nnz", "k", "block", "header_end",
                 "value_len", "index_len", "body_end")


def _as_bytes_view(data) -> memoryview:
    return _arrays.payload_view(data, "decode: data")


def _parse_int(s: str) -> int:
    # Bounded: CPython's int() is quadratic in the digit count, and no honest dim needs > 19.
    if len(s.lstrip("-")) > 19:
        raise ValueError(f"integer literal of {len(s)} characters")
    return int(s)


def _reject_float(s: str):
    raise ValueError(f"non-integer number {s[:20]!r}")


def _parse_layout_json(raw: memoryview, max_numel: int) -> Layout:
    try:
        obj = json.loads(bytes(raw).decode("utf-8"), parse_int=_parse_int, parse_float=_reject_float,
                         parse_constant=_reject_float)
    except (ValueError, RecursionError, TypeError) as e:        # JSONDecodeError, UnicodeDecodeError
        raise DecodeError(f"malformed JSON layout: {e}") from None
    # Check sizes before Layout() multiplies dims: a lying shape must not make us compute or
    # allocate anything large.
    if isinstance(obj, dict) and isinstance(obj.get("tensors"), list):
        total = 0
        for t in obj["tensors"]:
            if isinstance(t, list) and len(t) == 3 and isinstance(t[1], list):
                name, shape = t[0], t[1]
                if len(shape) > _MAX_NDIM:
                    raise DecodeError(f"JSON layout: tensor {name!r} has {len(shape)} dims (max {_MAX_NDIM})")
                numel = 1
                for d in shape:
                    if isinstance(d, int) and not isinstance(d, bool):
                        if d < 0:
                            raise DecodeError(f"JSON layout: tensor {name!r} has a negative dimension {d}")
                        if d > max_numel:
                            raise DecodeError(f"JSON layout: tensor {name!r} has dimension {d} above "
                                              f"max_numel={max_numel}")
                        numel = min(numel * d, max_numel + 1)
                total += numel
                if total > max_numel:
                    raise DecodeError(f"JSON layout declares more than max_numel={max_numel} entries")
    try:
        return Layout.from_json_obj(obj)
    except (ValueError, TypeError) as e:
        raise DecodeError(f"invalid JSON layout: {e}") from None


def _parse_header(data, layout: Optional[Layout], max_numel: int) -> Tuple[memoryview, _Header]:
    if layout is not None and not isinstance(layout, Layout):
        raise TypeError(f"layout must be a fastlora Layout or None, got {type(layout).__name__}")
    if isinstance(max_numel, bool) or not isinstance(max_numel, int) or not 0 <= max_numel <= _MAX_NUMEL_CEILING:
        raise ValueError(f"max_numel must be an int in [0, 2**62], got {max_numel!r}")
    buf = _as_bytes_view(data)
    n = len(buf)
    if n >= len(MAGIC) and bytes(buf[:len(MAGIC)]) != MAGIC:
        raise DecodeError(f"not a fastlora payload: magic {bytes(buf[:len(MAGIC)])!r}, expected {MAGIC!r}")
    if n < _MIN_PAYLOAD:
        raise DecodeError(f"truncated payload: {n} bytes, a payload has at least {_MIN_PAYLOAD}")
    version = buf[2]
    if version > VERSION:
        raise DecodeError(f"payload format version {version} is newer than this decoder (version {VERSION}); "
                          f"upgrade fastlora")
    if version != VERSION:
        raise DecodeError(f"unknown payload format version {version}")
    body_end = n - _CRC_BYTES
    stored_crc = struct.unpack_from("<I", buf, body_end)[0]
    if zlib.crc32(buf[:body_end]) != stored_crc:
        raise DecodeError("CRC32 mismatch: the payload is corrupted or truncated")
    flags = buf[3]
    if flags >> 5:
        raise DecodeError(f"reserved flag bits set (flags=0x{flags:02x})")
    h = _Header()
    h.fmt = VALUE_FORMATS[flags & 3]
    h.coding = INDEX_CODINGS[(flags >> 2) & 3]
    h.mode = LAYOUT_MODES[(flags >> 4) & 1]
    pos = 4
    if h.mode == "fingerprint":
        if pos + _FINGERPRINT_BYTES > body_end:
            raise DecodeError("truncated payload: layout fingerprint runs past the end")
        fp = bytes(buf[pos:pos + _FINGERPRINT_BYTES])
        pos += _FINGERPRINT_BYTES
        if layout is None:
            raise DecodeError("payload carries only a layout fingerprint: pass the known layout "
                              "(decode(data, layout=...))")
        if fp != layout.fingerprint():
            raise DecodeError(f"layout fingerprint mismatch: the payload was encoded for another layout "
                              f"than {layout!r}")
        lay = layout
        if lay.numel > max_numel:
            raise DecodeError(f"layout has {lay.numel} entries, above max_numel={max_numel}")
    else:
        jlen, pos = _read_varint(buf, pos, body_end, "JSON layout length")
        if jlen > MAX_JSON_BYTES:
            raise DecodeError(f"JSON layout length {jlen} above MAX_JSON_BYTES={MAX_JSON_BYTES}")
        if pos + jlen > body_end:
            raise DecodeError(f"truncated payload: JSON layout of {jlen} bytes runs past the end")
        lay = _parse_layout_json(buf[pos:pos + jlen], max_numel)
        pos += jlen
        if lay.numel > max_numel:     # unreachable after the pre-check; kept as the invariant
            raise DecodeError(f"layout has {lay.numel} entries, above max_numel={max_numel}")
        if layout is not None:
            if lay != layout:
                raise DecodeError(f"the payload's layout {lay!r} differs from the expected {layout!r}")
            lay = layout                      # hand back the caller's object (cached fingerprint)
    h.layout = lay
    numel = lay.numel
    h.nnz, pos = _read_varint(buf, pos, body_end, "nnz")
    if h.nnz > numel:
        raise DecodeError(f"declared nnz {h.nnz} exceeds the layout's {numel} entries")
    h.k = 0
    if h.coding == "rice":
        if pos >= body_end:
            raise DecodeError("truncated payload: Rice parameter missing")
        h.k = buf[pos]
        pos += 1
        if h.k > _rice_kmax(numel, h.nnz):
            raise DecodeError(f"bad Rice parameter k={h.k} for nnz={h.nnz} of {numel} "
                              f"(at most {_rice_kmax(numel, h.nnz)})")
    h.block = 0
    if h.fmt == "int8":
        h.block, pos = _read_varint(buf, pos, body_end, "int8 block size")
        if not 1 <= h.block <= MAX_INT8_BLOCK:
            raise DecodeError(f"bad int8 block size {h.block} (must be in [1, {MAX_INT8_BLOCK}])")
    if h.coding == "all" and h.nnz != numel:
        raise DecodeError(f"index coding 'all' but nnz {h.nnz} != numel {numel}")
    h.header_end = pos
    h.body_end = body_end
    h.value_len = _value_section_len(h.fmt, h.nnz, h.block)
    left = body_end - pos - h.value_len
    if left < 0:
        raise DecodeError(f"truncated payload: {h.fmt} values of {h.nnz} entries need {h.value_len} bytes, "
                          f"{body_end - pos} left")
    if h.coding == "rice":
        rem = _ceil8(h.nnz * h.k)
        # Valid gaps sum to at most numel - nnz, so the quotients to at most (numel - nnz) >> k:
        # a longer unary stream is malformed, and is refused before it is unpacked.
        unary_max = _ceil8(h.nnz + ((numel - h.nnz) >> h.k))
        unary_min = _ceil8(h.nnz)
        unary = left - rem
        if unary < unary_min:
            raise DecodeError(f"truncated payload: Rice index streams need at least {rem + unary_min} bytes, "
                              f"{left} left")
        if unary > unary_max:
            raise DecodeError(f"Rice unary stream of {unary} bytes is longer than any valid one "
                              f"({unary_max}) for nnz={h.nnz}, numel={numel}, k={h.k}")
        h.index_len = left
    else:
        expect = {"raw": h.nnz * _raw_width(numel), "bitmap": _ceil8(numel), "all": 0}[h.coding]
        if left < expect:
            raise DecodeError(f"truncated payload: {h.coding} indices need {expect} bytes, {left} left")
        if left > expect:
            raise DecodeError(f"{left - expect} trailing bytes after the {h.coding} indices")
        h.index_len = expect
    return buf, h


def _decode_indices(buf: memoryview, h: _Header, off: int) -> np.ndarray:
    numel, nnz = h.layout.numel, h.nnz
    if h.coding == "all":
        return np.arange(numel, dtype=np.int64)
    sec = np.frombuffer(buf, dtype=np.uint8, count=h.index_len, offset=off)
    if h.coding == "raw":
        idx = sec.view(f"<u{_raw_width(numel)}").astype(np.int64)
        if nnz:
            if nnz > 1 and not (idx[1:] > idx[:-1]).all():
                raise DecodeError("raw indices are not sorted ascending and unique")
            if idx[0] < 0 or idx[-1] >= numel:     # < 0: a u8 above 2**63 wrapped
                raise DecodeError(f"raw index out of range [0, {numel})")
        return idx
    if h.coding == "bitmap":
        bits = np.unpackbits(sec, bitorder="little")
        if bits[numel:].any():
            raise DecodeError("bitmap has bits set past the end of the layout (index out of range)")
        got = int(_POPCOUNT[sec].sum())
        if got != nnz:
            raise DecodeError(f"bitmap has {got} bits set, the header declares nnz={nnz}")
        return np.flatnonzero(bits[:numel]).astype(np.int64, copy=False)
    # rice
    if nnz == 0:
        if h.index_len:
            raise DecodeError(f"{h.index_len} trailing bytes after an empty Rice index stream")
        return np.zeros(0, dtype=np.int64)
    k = h.k
    rem_len = _ceil8(nnz * k)
    unary = sec[rem_len:]
    ones = int(_POPCOUNT[unary].sum())
    if ones != nnz:
        raise DecodeError(f"Rice unary stream has {ones} terminators, the header declares nnz={nnz}")
    ends = np.flatnonzero(np.unpackbits(unary, bitorder="little"))
    if int(ends[-1]) >> 3 != unary.size - 1:
        raise DecodeError("Rice unary stream has trailing bytes after its last terminator")
    q = np.diff(ends, prepend=np.int64(-1)) - 1
    if int(q.sum()) > (numel - nnz) >> k:
        raise DecodeError("Rice gaps add up past the end of the layout (index out of range)")
    g = q << k
    if k:
        g |= _unpack_fixed(sec[:rem_len], nnz, k)
    # sum(q) << k <= numel, and each remainder < 2**k <= 2*numel, so the float64 total below is
    # accurate enough to refuse anything that could overflow int64 in the cumsum.
    if float(g.sum(dtype=np.float64)) + nnz > numel * (1 + 1e-9) + 1:
        raise DecodeError("Rice gaps add up past the end of the layout (index out of range)")
    idx = np.cumsum(g + 1) - 1
    if idx[-1] >= numel:
        raise DecodeError(f"Rice-coded index {int(idx[-1])} out of range [0, {numel})")
    return idx


def _decode_values(buf: memoryview, h: _Header, off: int, idx: np.ndarray) -> torch.Tensor:
    nnz = h.nnz
    if h.fmt == "fp32":
        arr = np.frombuffer(buf, dtype="<f4", count=nnz, offset=off).astype(np.float32)
        finite = np.isfinite(arr)
        out = torch.from_numpy(arr)
    elif h.fmt == "fp16":
        arr = np.frombuffer(buf, dtype="<f2", count=nnz, offset=off).astype(np.float16)
        finite = np.isfinite(arr)
        out = torch.from_numpy(arr)
    elif h.fmt == "bf16":
        bits = np.frombuffer(buf, dtype="<u2", count=nnz, offset=off).astype(np.uint16)
        finite = (bits & 0x7F80) != 0x7F80            # exponent all ones = inf / nan
        out = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
    else:
        nblocks = -(-nnz // h.block)
        s = np.frombuffer(buf, dtype="<f4", count=nblocks, offset=off).astype(np.float32)
        q = np.frombuffer(buf, dtype=np.int8, count=nnz, offset=off + 4 * nblocks)
        if not (np.isfinite(s) & (s >= 0)).all():
            raise DecodeError("int8 block scale is negative or not finite")
        if nnz and (q == -128).any():
            raise DecodeError("int8 code -128 (the encoder is symmetric: codes are in [-127, 127])")
        arr = q.astype(np.float32)
        full = nnz // h.block                  # whole blocks, then the partial last one
        with np.errstate(over="ignore"):       # an overflow to inf is refused just below
            arr[:full * h.block].reshape(full, h.block)[:] *= s[:full, None]
            if full < nblocks:
                arr[full * h.block:] *= s[full]
        finite = np.isfinite(arr)
        out = torch.from_numpy(arr)
    if nnz and not finite.all():
        pos = int(np.flatnonzero(~finite)[0])
        name = h.layout.tensor_of(int(idx[pos]))
        raise DecodeError(f"non-finite {h.fmt} value for {h.layout.describe(name)} at flat index {int(idx[pos])}")
    return out


def decode(data: Union[bytes, bytearray, memoryview, np.ndarray], *, layout: Optional[Layout] = None,
           max_numel: int = DEFAULT_MAX_NUMEL) -> SparseDelta:
    """Parses a payload from :func:`encode` into a CPU :class:`SparseDelta`.

    data: ``bytes``, ``bytearray``, ``memoryview`` or a 1-D uint8 numpy array (e.g. what a
    Flower ``Array`` holds); read without a copy when contiguous, never written. Anything
    else is a TypeError. The result is a SparseDelta of torch tensors whatever ``data`` was
    (``result.to_dense(as_numpy=True)`` for numpy arrays).

    layout: required for fingerprint payloads (must match the fingerprint); for full payloads,
    if given, the payload's JSON layout must equal it. max_numel: largest layout accepted
    (``DEFAULT_MAX_NUMEL`` = 2**31 entries). Values come back as float32 (fp32 and int8
    payloads), float16 or bfloat16. Anything malformed raises :class:`DecodeError`.
    """
    buf, h = _parse_header(data, layout, max_numel)
    voff = h.header_end
    idx = _decode_indices(buf, h, voff + h.value_len)
    val = _decode_values(buf, h, voff, idx)
    # Every invariant was checked while parsing (sorted unique in-range indices, finite values).
    return SparseDelta.from_valid(torch.from_numpy(idx), val, h.layout)


# ---------------------------------------------------------------------------------------------
# stats
# ---------------------------------------------------------------------------------------------
def inspect(data: Union[bytes, bytearray, memoryview, np.ndarray], *, layout: Optional[Layout] = None,
            max_numel: int = DEFAULT_MAX_NUMEL) -> dict:
    """What a payload spends its bytes on (header and section lengths are validated; the
    sections themselves are not decoded). Keys: version, layout_mode, values, index_coding,
    rice_k, int8_block, nnz, numel, total_bytes, header_bytes (everything before the values:
    magic ... coding params), crc_bytes, overhead_bytes (header + CRC, minus the JSON layout in
    full mode), json_bytes, value_bytes, index_bytes, index_bits_per_entry,
    entropy_bits_per_entry (``index_entropy_bound``), bytes_per_entry."""
    buf, h = _parse_header(data, layout, max_numel)
    json_bytes = 0
    if h.mode == "full":
        jlen, p = _read_varint(buf, 4, h.body_end, "JSON layout length")
        json_bytes = (p - 4) + jlen
    nnz, numel = h.nnz, h.layout.numel
    return {
        "version": VERSION, "layout_mode": h.mode, "values": h.fmt, "index_coding": h.coding,
        "rice_k": h.k if h.coding == "rice" else None, "int8_block": h.block or None,
        "nnz": nnz, "numel": numel, "total_bytes": len(buf),
        "header_bytes": h.header_end, "crc_bytes": _CRC_BYTES, "json_bytes": json_bytes,
        "overhead_bytes": h.header_end - json_bytes + _CRC_BYTES,
        "value_bytes": h.value_len, "index_bytes": h.index_len,
        "index_bits_per_entry": 8 * h.index_len / nnz if nnz else 0.0,
        "entropy_bits_per_entry": index_entropy_bound(numel, nnz),
        "bytes_per_entry": len(buf) / nnz if nnz else float(len(buf)),
    }


def payload_overhead(nnz: int, *, values: str = "fp16", index_coding: str = "rice",
                     layout_mode: str = "fingerprint", int8_block: int = 256,
                     layout: Optional[Layout] = None) -> int:
    """Fixed bytes of a payload besides its value and index sections: magic, version, flags,
    fingerprint (or, in full mode, the JSON layout with its length: pass ``layout``), nnz,
    coding params and CRC. In fingerprint mode this is at most ``MAX_FINGERPRINT_OVERHEAD``."""
    if layout_mode == "fingerprint":
        lay = _FINGERPRINT_BYTES
    elif layout_mode == "full":
        if layout is None:
            raise ValueError("payload_overhead(layout_mode='full') needs the layout (its JSON travels)")
        js = len(layout.to_json().encode("utf-8"))
        lay = len(_varint(js)) + js
    else:
        raise ValueError(f"layout_mode must be one of {LAYOUT_MODES}, got {layout_mode!r}")
    return (len(MAGIC) + 2 + lay + len(_varint(nnz)) + (1 if index_coding == "rice" else 0)
            + (len(_varint(int8_block)) if values == "int8" else 0) + _CRC_BYTES)

