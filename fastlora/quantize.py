"""Quantized base weights for LoRA (QLoRA): NF4 / FP4 (4-bit) and int8, in bitsandbytes' layout.

A :class:`QuantizedWeight` is what ``fastlora.lora_quantized_linear`` multiplies by: codes plus
one float32 scale (``absmax``) per block of ``blocksize`` consecutive elements of the row-major
``(out_features, in_features)`` weight, ``W.flat[f] = code[q(f)] * absmax[f // blocksize]``.

* ``nf4`` / ``fp4``: bitsandbytes' 4-bit formats exactly (two codes per byte, the even element
  in the high nibble; blocksize 64 by default; optionally the scales themselves quantized to
  8 bits in blocks of 256 around their mean, bitsandbytes' "double quantization"). Weights of a
  bitsandbytes-quantized model are used as they are (:meth:`QuantizedWeight.from_bnb`), and
  :func:`quantize` reproduces bitsandbytes' quantization bit for bit without it.
* ``int8``: one int8 per element and one scale per row (``W = q * absmax_row / 127``),
  bitsandbytes' LLM.int8() weight layout. Its outlier split (activation columns above a
  threshold kept in 16 bits) exists because LLM.int8() also quantizes the activations;
  fastlora multiplies full-precision activations by the dequantized weight, so there is no
  activation outlier to keep and the split is not needed.

Nothing here needs bitsandbytes; ``from_bnb`` reads its objects when it is installed.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

FORMATS = ("nf4", "fp4", "int8")

# bitsandbytes' 4-bit code books (float32 values; index = the stored 4-bit code).
_NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0)
_FP4 = (0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
        0.0, -0.0052083334885537624, -0.6666666865348816, -1.0, -0.3333333432674408, -0.5, -0.1666666716337204,
        -0.25)

# Double quantization of the 4-bit scales: blocks of 256 scales, 8-bit "dynamic" codes.
NESTED_BLOCKSIZE = 256


_CODE_CACHE = {}


def code(fmt: str, device=None) -> torch.Tensor:
    """The float32 code book of a format: 16 entries (nf4, fp4) or 256 (int8: ``int8(u) / 127``).
    One tensor per (format, device), shared: every layer call wraps its weight anew
    (``QuantizedWeight.from_bnb``), so building it each time would sit on the hot path."""
    key = (fmt, torch.device(device) if device is not None else torch.device("cpu"))
    cached = _CODE_CACHE.get(key)
    if cached is None:
        cached = _CODE_CACHE[key] = _make_code(fmt, key[1])
    return cached


def _make_code(fmt: str, device) -> torch.Tensor:
    if fmt == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32, device=device)
    if fmt == "fp4":
        return torch.tensor(_FP4, dtype=torch.float32, device=device)
    if fmt == "int8":
        return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.int8).to(
            device=device, dtype=torch.float32) / 127.0
    raise ValueError(f"unknown quantization format {fmt!r}; expected one of {FORMATS}")


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" code book (its ``create_dynamic_map()``), which its
    double quantization stores the 4-bit scales in: for each decimal exponent e = -6 .. 0, the
    midpoints of 2^e + 1 linearly spaced fractions in [0.1, 1] times 10^e, with both signs,
    then 0 and 1; sorted. Built with the same float32 operations, so the values are identical."""
    values = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (i - 6)
        values += (scale * mids).tolist() + (-scale * mids).tolist()
    values += [0, 1.0]
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = flat.numel()
    pad = (-n) % blocksize
    padded = torch.nn.functional.pad(flat.abs(), (0, pad)) if pad else flat.abs()
    return padded.view(-1, blocksize).amax(dim=1)


def _nearest_code(scaled: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of `book` for each value (ties to the larger entry, as
    bitsandbytes' bucketize against the midpoints of the sorted book does)."""
    order = torch.argsort(book)
    s = book[order]
    mids = (s[:-1] + s[1:]) / 2
    return order[torch.bucketize(scaled, mids, out_int32=True)]


def _quantize_blockwise(flat: torch.Tensor, book: torch.Tensor, blocksize: int, pad_to_even: bool = False):
    """(codes as int64, float32 absmax per block): bitsandbytes' blockwise absmax quantization."""
    n = flat.numel()
    full = n - n % blocksize
    absmax = _blockwise_absmax(flat, blocksize)
    inv = 1.0 / absmax.clamp(min=1e-38)
    # Full blocks multiply by the reciprocal, a last partial block divides: bitsandbytes' exact
    # float32 operations, so the codes match bit for bit.
    scaled = flat[:full].view(-1, blocksize) * inv[:full // blocksize, None]
    if full < n:
        scaled = torch.cat([scaled.reshape(-1), flat[full:] / absmax[-1].clamp(min=1e-38)])
    scaled = scaled.reshape(-1).clamp(-1, 1)
    if pad_to_even and n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # the unused last nibble codes 0.0
    return _nearest_code(scaled, book.to(flat.device)).long(), absmax


class QuantizedWeight:
    """A frozen base weight in one of :data:`FORMATS` (see the module docstring for the layout).

    Attributes: ``format``, ``data`` (uint8 codes: ``ceil(N*K/2)`` bytes for 4-bit, ``N*K`` for
    int8), ``absmax`` (float32 scales, or uint8 when ``nested``), ``blocksize``, ``shape``
    ``(N, K)``, ``dtype`` (the dtype :meth:`dequantize` returns by default) and, when
    ``nested``: ``nested_absmax`` (float32, one per 256 scales), ``nested_code`` (the dynamic
    code book) and ``offset`` (the scales' mean, added back: a float, or a float32 0-dim tensor
    kept on the weight's device, as bitsandbytes and ``QuantizedLinear`` hold it, so that no call
    reads it back to the host)."""

    def __init__(self, fmt: str, data: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                 shape: Tuple[int, int], dtype: torch.dtype = torch.float32,
                 nested_absmax: Optional[torch.Tensor] = None, nested_code: Optional[torch.Tensor] = None,
                 offset=None):
        if fmt not in FORMATS:
            raise ValueError(f"unknown quantization format {fmt!r}; expected one of {FORMATS}")
        self.format = fmt
        self.data = data.reshape(-1) if data.dtype == torch.uint8 else data.reshape(-1).view(torch.uint8)
        self.absmax = absmax.reshape(-1)
        self.blocksize = int(blocksize)
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = dtype
        self.nested = nested_absmax is not None
        self.nested_absmax = nested_absmax
        self.nested_code = nested_code
        self.offset = offset if offset is None or isinstance(offset, torch.Tensor) else float(offset)
        self._code = code(fmt, self.data.device)

    @property
    def code(self) -> torch.Tensor:
        return self._code

    @property
    def device(self) -> torch.device:
        return self.data.device

    def scales(self) -> torch.Tensor:
        """The float32 scale of each block (decoding the double-quantized scales: bitsandbytes'
        ``code2[q] * absmax2 + offset``, in float32)."""
        if not self.nested:
            return self.absmax
        n = self.absmax.numel()
        per = self.nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[:n]
        return self.nested_code.to(self.absmax.device)[self.absmax.long()] * per + self.offset

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The full-precision ``(N, K)`` weight (merging, export; the ops never build it)."""
        return torch.ops.fastlora.dequantize(self.data, self.scales(), self.code, self.blocksize,
                                             list(self.shape), dtype or self.dtype)

    def nbytes(self) -> int:
        """Bytes held: codes, scales and the nested scales' state."""
        total = self.data.numel() * self.data.element_size() + self.absmax.numel() * self.absmax.element_size()
        if self.nested:
            total += self.nested_absmax.numel() * 4 + self.nested_code.numel() * 4 + 4
        return total

    def to(self, device) -> "QuantizedWeight":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedWeight(self.format, mv(self.data), mv(self.absmax), self.blocksize, self.shape, self.dtype,
                               mv(self.nested_absmax), mv(self.nested_code),
                               mv(self.offset) if isinstance(self.offset, torch.Tensor) else self.offset)

    def __repr__(self):
        return (f"QuantizedWeight({self.format}, shape={self.shape}, blocksize={self.blocksize}, "
                f"nested={self.nested}, {self.nbytes()} bytes)")

    @classmethod
    def from_bnb(cls, layer_or_weight) -> "QuantizedWeight":
        """Wraps a bitsandbytes layer's weight as it is stored (no copy of the codes): a
        ``Linear4bit`` / ``Params4bit`` (nf4 / fp4, nested or not, any quant_storage) or a
        ``Linear8bitLt`` / ``Int8Params`` holding int8 codes (its row scales live on the weight
        until the layer's first forward, then in ``layer.state``: pass the layer). Raises
        ValueError for what it cannot read."""
        weight, state = layer_or_weight, None
        if isinstance(layer_or_weight, torch.nn.Module):
            weight, state = layer_or_weight.weight, getattr(layer_or_weight, "state", None)
        qs = getattr(weight, "quant_state", None)
        if qs is not None:
            if getattr(qs, "packing_format_for_cpu", False):
                raise ValueError("this bitsandbytes weight is repacked for bitsandbytes' CPU inference kernel "
                                 "(packing_format_for_cpu); run the model in training mode or save and reload it")
            if qs.quant_type not in ("nf4", "fp4"):
                raise ValueError(f"unsupported bitsandbytes 4-bit quant_type {qs.quant_type!r}")
            shape = tuple(qs.shape)
            if len(shape) != 2:
                raise ValueError(f"expected a 2-D quantized weight, got shape {shape}")
            data = weight.data.reshape(-1).view(torch.uint8)
            if qs.nested:
                s2 = qs.state2
                if s2.blocksize != NESTED_BLOCKSIZE:
                    raise ValueError(f"nested scales in blocks of {s2.blocksize}; expected {NESTED_BLOCKSIZE}")
                return cls(qs.quant_type, data, qs.absmax, qs.blocksize, shape, qs.dtype,
                           nested_absmax=s2.absmax.float(), nested_code=s2.code.float(),
                           offset=torch.as_tensor(qs.offset, dtype=torch.float32))
            return cls(qs.quant_type, data, qs.absmax.float(), qs.blocksize, shape, qs.dtype)
        cb, scb = getattr(weight, "CB", None), getattr(weight, "SCB", None)
        if scb is None and state is not None:
            scb = getattr(state, "SCB", None)
        if cb is None and isinstance(weight, torch.Tensor) and weight.dtype == torch.int8:
            cb = weight.data
        if cb is None or scb is None:
            raise ValueError("not a quantized bitsandbytes weight (no quant_state, and no int8 CB / SCB): "
                             "move the bitsandbytes layer to its device first, which quantizes it")
        if cb.dim() != 2:
            raise ValueError(f"expected 2-D int8 codes, got shape {tuple(cb.shape)}")
        n, k = cb.shape
        return cls("int8", cb.contiguous().view(torch.uint8), scb.float(), max(k, 1), (n, k), torch.float16)


def quantize(weight: torch.Tensor, fmt: str = "nf4", *, blocksize: Optional[int] = None,
             double_quant: bool = True) -> QuantizedWeight:
    """Quantizes a 2-D ``(out_features, in_features)`` weight.

    ``nf4`` / ``fp4``: blocks of ``blocksize`` (default 64) elements, bitsandbytes' 4-bit
    quantization bit for bit (with ``double_quant``, also its 8-bit quantization of the scales:
    base-weight memory ~4.13 bits per element, 1/7.75 of float32). ``int8``: per-row scales
    (``blocksize`` must be None), as bitsandbytes' ``int8_vectorwise_quant`` on the float16
    weight. The weight is not modified; its dtype is what :meth:`QuantizedWeight.dequantize`
    returns by default."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"fastlora.quantize: expected a 2-D weight (out_features, in_features), got "
                         f"{getattr(weight, 'shape', type(weight).__name__)}")
    if not weight.is_floating_point():
        raise TypeError(f"fastlora.quantize: expected a floating-point weight, got {weight.dtype}")
    if not torch.isfinite(weight).all():
        raise ValueError("fastlora.quantize: the weight has NaN or Inf entries")
    n, k = weight.shape
    w = weight.detach()
    if fmt == "int8":
        if blocksize is not None:
            raise ValueError("fastlora.quantize: int8 uses one scale per row; blocksize must be None")
        # bitsandbytes quantizes the float16 weight: scales = row absmax, codes = round(w * 127 / absmax).
        w16 = w.to(torch.float16).float()
        if k == 0:  # no elements: no codes and no scales (blocksize 1: zero blocks)
            return QuantizedWeight("int8", torch.zeros(0, dtype=torch.uint8, device=w.device),
                                   torch.zeros(0, device=w.device), 1, (n, k), weight.dtype)
        absmax = w16.abs().amax(dim=1)
        q = torch.round(w16 * (127.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-127, 127)
        q = torch.where(absmax[:, None] == 0, torch.zeros_like(q), q)
        return QuantizedWeight("int8", q.to(torch.int8).view(torch.uint8).reshape(-1), absmax, k, (n, k),
                               weight.dtype)
    if fmt not in ("nf4", "fp4"):
        raise ValueError(f"fastlora.quantize: unknown format {fmt!r}; expected one of {FORMATS}")
    blocksize = 64 if blocksize is None else int(blocksize)
    if blocksize < 2 or blocksize % 2 or blocksize > 4096:
        raise ValueError(f"fastlora.quantize: blocksize must be an even number in [2, 4096], got {blocksize}")
    flat = w.reshape(-1).float()
    q, absmax = _quantize_blockwise(flat, code(fmt, flat.device), blocksize, pad_to_even=True)
    q8 = q.to(torch.uint8)
    packed = (q8[0::2] << 4) | q8[1::2]
    if not double_quant or absmax.numel() == 0:
        return QuantizedWeight(fmt, packed, absmax, blocksize, (n, k), weight.dtype)
    offset = absmax.mean()
    book = dynamic_code().to(flat.device)
    q2, absmax2 = _quantize_blockwise(absmax - offset, book, NESTED_BLOCKSIZE)
    return QuantizedWeight(fmt, packed, q2.to(torch.uint8), blocksize, (n, k), weight.dtype,
                           nested_absmax=absmax2, nested_code=book, offset=float(offset))


def weight_bytes_ratio(qw: QuantizedWeight) -> float:
    """Bytes of the quantized weight over those of its float32 original."""
    return qw.nbytes() / max(1, 4 * math.prod(qw.shape))
