"""A seeded fuzzer of ``fastlora.codec.decode``.

The decoder's contract on *any* input: it returns a valid SparseDelta (sorted unique in-range
int64 indices, finite float32 / float16 / bfloat16 values, the layout asked for) or raises
``fastlora.codec.DecodeError``; never another exception, never a hang. This module checks
that contract on a stream of inputs derived from one seed:

* a corpus of valid payloads: bare and dict layouts (scalar, empty, odd shapes, mixed
  dtypes, unicode names, ~50 tensors, 2**20 entries, random ones), every value format (fp32,
  fp16, bf16, int8 with block sizes 1..16383), every index coding (raw, bitmap, rice, all:
  densities 0 .. 1), both layout modes (full JSON, fingerprint), values from subnormal to
  the format's largest;
* mutations of it, most with the CRC recomputed (an attacker recomputes it, so the parsers
  behind it must hold on their own): every byte of the small payloads flipped in turn (first
  phase), then at random: bits flipped, bytes set, truncations, extensions, insertions,
  deletions, absurd counts (nnz, JSON length, int8 block size, Rice k: huge, off by one,
  over-long or non-canonical varints), other flags over the same body, hostile JSON layouts
  (huge / negative / float / bool dims, deep nesting, huge totals, duplicate names, random
  JSON), foreign fingerprints, special float values in the value section, random index
  sections, headers spliced onto other bodies, random bytes. Each input is passed as bytes,
  bytearray, memoryview or a (sometimes strided) uint8 array, with the known layout and
  without, sometimes with a small ``max_numel``.

Each decode runs under a time limit (``input_seconds``; SIGALRM where available, and the
elapsed time is checked afterwards in any case). A broken contract raises ``FuzzFailure``
with the seed, the input's number, the mutations and the bytes (written to ``crash_dir``).

    .venv/bin/python tests/fuzz_codec.py --seconds 300 --seed 0     # or: make fuzz FUZZ_SECONDS=300

tests/test_codec.py::test_fuzz_decoder_seeded runs a fixed number of inputs (~3 s).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import struct
import sys
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from fastlora import codec
from fastlora.codec import DecodeError
from fastlora.sparse_delta import Layout, SparseDelta

FORMATS = ("fp32", "bf16", "fp16", "int8")
MODES = ("full", "fingerprint")
_LIMITS = {"fp32": 3.0e38, "bf16": 3.0e38, "fp16": 65504.0, "int8": 3.0e38}
#: Largest payload whose every byte is flipped in turn in the first phase.
SYSTEMATIC_MAX_BYTES = 600
#: Layouts at most this large are also densified (``to_dense``) after a successful decode.
DENSIFY_MAX_NUMEL = 1 << 20


class FuzzFailure(AssertionError):
    """decode broke its contract on an input (the message says how and how to reproduce)."""


class _InputTimeout(BaseException):
    """Raised by the per-input alarm (a BaseException: the decoder must not swallow it)."""


# ---------------------------------------------------------------------------------------------
# wire helpers (written here, independent of the decoder under test)
# ---------------------------------------------------------------------------------------------
def varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def read_varint(b: bytes, pos: int) -> Tuple[int, int]:
    n = shift = 0
    while True:
        byte = b[pos]
        n |= (byte & 0x7F) << shift
        pos += 1
        shift += 7
        if not byte & 0x80:
            return n, pos


def recrc(body: bytes) -> bytes:
    """``body`` followed by its CRC32 (what an attacker sends)."""
    return bytes(body) + struct.pack("<I", zlib.crc32(body))


@dataclass
class Fields:
    """Where the fields of a valid payload are (byte offsets; end exclusive)."""
    mode: str
    json: Tuple[int, int]            # JSON text (full mode), else (4, 4)
    json_len: Tuple[int, int]        # its varint (full mode)
    nnz: Tuple[int, int]             # the nnz varint
    k: Optional[int]                 # the Rice parameter byte
    block: Optional[Tuple[int, int]]  # the int8 block size varint
    values: Tuple[int, int]
    indices: Tuple[int, int]


def fields_of(data: bytes, layout: Layout) -> Fields:
    info = codec.inspect(data, layout=layout)
    mode = info["layout_mode"]
    if mode == "fingerprint":
        json_len, js, pos = (4, 4), (4, 4), 4 + 16
    else:
        n, p = read_varint(data, 4)
        json_len, js, pos = (4, p), (p, p + n), p + n
    _, p = read_varint(data, pos)
    nnz, pos = (pos, p), p
    k = None
    if info["index_coding"] == "rice":
        k, pos = pos, pos + 1
    block = None
    if info["values"] == "int8":
        _, p = read_varint(data, pos)
        block, pos = (pos, p), p
    assert pos == info["header_bytes"], (pos, info)
    v_end = pos + info["value_bytes"]
    return Fields(mode, js, json_len, nnz, k, block, (pos, v_end), (v_end, v_end + info["index_bytes"]))


# ---------------------------------------------------------------------------------------------
# corpus: valid payloads
# ---------------------------------------------------------------------------------------------
@dataclass
class Seed:
    data: bytes
    layout: Layout
    fmt: str
    coding: str
    mode: str
    fields: Fields = field(repr=False)
    indices: np.ndarray = field(repr=False, default=None)   # what it decodes to
    origin: str = "encode"                                   # or "recoded" (our own index section)


_NAMES = ["w", "a.lora_A", "b.lora_B", "émoji 🙂", 'quote"d', "back\\slash", "", " ", "x" * 200, "\u0000nul"]
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _random_layout(rng: random.Random) -> Layout:
    if rng.random() < 0.3:
        ndim = rng.randint(0, 4)
        dims = [rng.choice([0, 1, 2, 3, 7, 13] + ([40, 123] if ndim <= 2 else [])) for _ in range(ndim)]
        return Layout([("", dims, rng.choice(_DTYPES))], is_dict=False)
    names = rng.sample(_NAMES, rng.randint(1, 5))
    return Layout([(nm, [rng.choice([0, 1, 3, 5, 16, 33]) for _ in range(rng.randint(0, 3))], rng.choice(_DTYPES))
                   for nm in names], is_dict=True)


def _fixed_layouts() -> List[Layout]:
    return [
        Layout.of(torch.zeros(1)),
        Layout.of(torch.zeros(0)),
        Layout.of(torch.tensor(0.5)),
        Layout.of(torch.zeros(3, 5, 7)),
        Layout.of(torch.zeros(1000, dtype=torch.float16)),
        Layout.of({"a.lora_A": torch.zeros(4, 13), "empty": torch.zeros(0, 3),
                   "b.lora_B": torch.zeros(13, 4, dtype=torch.bfloat16),
                   "c": torch.zeros(2, 3, 1, dtype=torch.float64), "d": torch.zeros(777)}),
        Layout([(f"layers.{i}.{p}", (8, 3) if p == "A" else (3, 8), torch.float32)
                for i in range(25) for p in ("A", "B")], is_dict=True),        # 50 tensors
        Layout.of({"é 🙂": torch.zeros(3, 3), 'q"\\': torch.zeros(2)}),
        Layout([("", (5000,), torch.float32)], is_dict=False),
        Layout([("big", (1 << 20,), torch.float32)], is_dict=True),
    ]


def _values(rng: np.random.Generator, n: int, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    kind = rng.integers(5)
    if kind == 0:      # subnormal to large, across many binades
        v = rng.standard_normal(n) * np.exp2(rng.integers(-140, 120, n).astype(np.float64))
    elif kind == 1:    # the format's edge
        v = rng.choice([-1.0, 1.0], n) * _LIMITS[fmt] * rng.uniform(0.5, 1.0, n)
    elif kind == 2:    # zeros and signed zeros
        v = rng.choice([0.0, -0.0, 1.0], n)
    else:
        v = rng.standard_normal(n) * 10.0 ** rng.integers(-6, 4)
    lim = min(_LIMITS[fmt], float(torch.finfo(dtype).max) * 0.99)
    v = np.clip(v, -lim, lim)
    t = torch.from_numpy(v).to(dtype)
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t))


def _nnz_choices(numel: int) -> List[int]:
    if numel == 0:
        return [0]
    return sorted({0, 1, min(numel, 2), min(numel, 5), numel // 100, numel // 10, numel // 2,
                   (9 * numel) // 10, numel})


def index_section(idx: np.ndarray, numel: int, coding: str, k: int = 0) -> bytes:
    """The index section of ``idx`` in any coding (the encoder only writes the smallest; a
    decoder must take every valid one), written here from the documented format."""
    if coding == "all":
        return b""
    if coding == "raw":
        return idx.astype("<u4" if numel <= 1 << 32 else "<u8").tobytes()
    if coding == "bitmap":
        bits = np.zeros(numel, dtype=np.uint8)
        bits[idx] = 1
        return np.packbits(bits, bitorder="little").tobytes()
    if idx.size == 0:
        return b""
    g = np.diff(idx, prepend=np.int64(-1)) - 1
    rem = (g[:, None] >> np.arange(k)) & 1                   # k bits per gap, LSB first
    ends = np.cumsum((g >> k) + 1) - 1                       # each quotient's terminating 1
    unary = np.zeros(int(ends[-1]) + 1, dtype=np.uint8)
    unary[ends] = 1
    return (np.packbits(rem.astype(np.uint8).reshape(-1), bitorder="little").tobytes()
            + np.packbits(unary, bitorder="little").tobytes())


def recode(seed: Seed, coding: str, k: int = 0) -> Seed:
    """``seed`` with its index section in another coding (Rice: parameter k)."""
    lay, f, idx = seed.layout, seed.fields, seed.indices
    flags = FORMATS.index(seed.fmt) | (("raw", "bitmap", "rice", "all").index(coding) << 2) | \
        (MODES.index(seed.mode) << 4)
    body = bytearray(b"FL\x01" + bytes((flags,)))
    if seed.mode == "fingerprint":
        body += lay.fingerprint()
    else:
        js = lay.to_json().encode()
        body += varint(len(js)) + js
    body += varint(idx.size)
    if coding == "rice":
        body.append(k)
    if f.block is not None:
        body += seed.data[f.block[0]:f.block[1]]
    body += seed.data[f.values[0]:f.values[1]] + index_section(idx, lay.numel, coding, k)
    data = recrc(bytes(body))
    return Seed(data, lay, seed.fmt, coding, seed.mode, fields_of(data, lay), idx, "recoded")


def build_corpus(seed: int) -> List[Seed]:
    """Valid payloads, deterministic in ``seed``: the encoder's, and the same re-coded in the
    index codings it did not pick (raw with many entries, bitmap, Rice with any k). Every value
    format x index coding x layout mode occurs (checked by the tests)."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    layouts = _fixed_layouts() + [_random_layout(rng) for _ in range(8)]
    out: List[Seed] = []
    for lay in layouts:
        choices = _nnz_choices(lay.numel)
        # the 2**20-entry layout: sparse only (raw / rice), to stay fast
        if lay.numel >= 1 << 20:
            choices = [0, 1, 3, 1000, 20000]
        # the 5000-entry layout gets every value format x layout mode at every density (which
        # covers every index coding); the others one random combination per density
        combos = [(f, m) for f in FORMATS for m in MODES] if lay.numel == 5000 else [None]
        for nnz, combo in ((nnz, c) for nnz in choices for c in combos):
            fmt, mode = combo or (rng.choice(FORMATS), rng.choice(MODES))
            idx = np.sort(nrng.choice(lay.numel, size=nnz, replace=False)).astype(np.int64)
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(fmt, torch.float32)
            if rng.random() < 0.3:
                dtype = rng.choice([torch.float32, torch.float64])
            sd = SparseDelta(torch.from_numpy(idx), _values(nrng, nnz, fmt, dtype), lay)
            block = rng.choice([1, 2, 3, 16, 256, codec.MAX_INT8_BLOCK])
            data = codec.encode(sd, values=fmt, layout=mode, int8_block=block)
            info = codec.inspect(data, layout=lay)
            s = Seed(data, lay, fmt, info["index_coding"], mode, fields_of(data, lay), idx)
            out.append(s)
            if lay.numel > 5000 or combo is not None and rng.random() < 0.75:
                continue
            # other codings of the same entries
            if nnz >= 2 and s.coding != "raw":
                out.append(recode(s, "raw"))
            if s.coding != "bitmap" and rng.random() < 0.5:
                out.append(recode(s, "bitmap"))
            if s.coding != "rice" or rng.random() < 0.5:
                out.append(recode(s, "rice", rng.randint(0, max(0, lay.numel - nnz).bit_length())))
    return out


# ---------------------------------------------------------------------------------------------
# mutations: (payload, its Seed, rng) -> (a body to which the caller appends its CRC, True)
# or (the input as it is, False)
# ---------------------------------------------------------------------------------------------
def _body(data: bytes) -> bytes:
    return data[:-4]


def m_flip_bit(d, s, r):
    b = bytearray(_body(d))
    if not b:
        return d, False
    p = r.randrange(len(b))
    b[p] ^= 1 << r.randrange(8)
    return bytes(b), True


def m_set_byte(d, s, r):
    b = bytearray(d)
    p = r.randrange(len(b))
    b[p] = r.randrange(256)
    if r.random() < 0.5 and p < len(b) - 4:
        return bytes(b[:-4]), True
    return bytes(b), False


def m_truncate(d, s, r):
    cut = r.randrange(len(d))
    if r.random() < 0.5:
        return d[:cut], False
    return _body(d)[:max(0, cut - 4)], True


def m_extend(d, s, r):
    extra = bytes(r.randrange(256) for _ in range(r.choice([1, 2, 3, 4, 8, 64])))
    if r.random() < 0.5:
        return d + extra, False
    return _body(d) + extra, True


def m_insert_delete(d, s, r):
    body = _body(d)
    p = r.randrange(len(body) + 1)
    n = r.choice([1, 2, 3, 4, 8, 16])
    if r.random() < 0.5:
        return body[:p] + bytes(r.randrange(256) for _ in range(n)) + body[p:], True
    return body[:p] + body[p + n:], True


def _span(span: Tuple[int, int], n: int) -> Tuple[int, int]:
    """A field's span clamped to an input of n bytes (stacked mutations shift or cut fields)."""
    return min(span[0], n), min(span[1], n)


def _replace(d: bytes, span: Tuple[int, int], new: bytes) -> bytes:
    return _body(d)[:span[0]] + new + _body(d)[span[1]:]


_ABSURD = [0, 1, 2, 127, 128, 255, 2 ** 14, 2 ** 16, 2 ** 20, 2 ** 31 - 1, 2 ** 31, 2 ** 32, 2 ** 35, 2 ** 62,
           2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1]


def _absurd_varint(n_ref: int, r: random.Random) -> bytes:
    kind = r.randrange(5)
    if kind == 0:
        return varint(max(0, n_ref + r.choice([-2, -1, 1, 2])))
    if kind == 1:
        return b"\x80\x00" if r.random() < 0.5 else b"\xff" * r.randint(10, 12) + b"\x01"  # non-canonical / too long
    if kind == 2:
        return b"\x80"          # unterminated
    return varint(r.choice(_ABSURD))


def m_absurd_count(d, s, r):
    f = s.fields
    choices = ["nnz"] + (["json_len"] if f.mode == "full" else []) + (["k"] if f.k is not None else []) + \
        (["block"] if f.block is not None else [])
    what = r.choice(choices)
    if what == "nnz":
        return _replace(d, f.nnz, _absurd_varint(s.layout.numel, r)), True
    if what == "json_len":
        return _replace(d, f.json_len, _absurd_varint(f.json[1] - f.json[0], r)), True
    if what == "k":
        return _replace(d, (f.k, f.k + 1), bytes((r.randrange(256),))), True
    return _replace(d, f.block, _absurd_varint(codec.MAX_INT8_BLOCK, r)), True


def m_flags(d, s, r):
    b = bytearray(_body(d))
    if len(b) < 4:
        return m_random_bytes(d, s, r)
    b[3] = r.randrange(256) if r.random() < 0.3 else (b[3] & ~0x0F) | r.randrange(16)   # other format / coding
    return bytes(b), True


def _hostile_json(r: random.Random) -> str:
    big = r.choice([2 ** 31, 2 ** 40, 10 ** 18, 10 ** 19, 2 ** 63, 10 ** 30])
    t = [
        lambda: {"dict": False, "tensors": [["", [big, big], "float32"]]},
        lambda: {"dict": True, "tensors": [[str(i), [2 ** 28], "float32"] for i in range(r.randint(2, 40))]},
        lambda: {"dict": False, "tensors": [["", [3, -1], "float32"]]},
        lambda: {"dict": False, "tensors": [["", [0, big], "float32"]]},
        lambda: {"dict": False, "tensors": [["", [1] * r.choice([64, 65, 1000]), "float32"]]},
        lambda: {"dict": True, "tensors": [["a", [3], "float32"], ["a", [3], "float32"]]},
        lambda: {"dict": False, "tensors": [["", [3], "float32"], ["b", [3], "float32"]]},
        lambda: {"dict": False, "tensors": [["x", [3], "float32"]]},
        lambda: {"dict": "yes", "tensors": []},
        lambda: {"dict": True, "tensors": [["a", [True], "float32"]]},
        lambda: {"dict": True, "tensors": [["a", ["3"], "float32"]]},
        lambda: {"dict": True, "tensors": [["a", [3], "int64"]]},
        lambda: {"dict": True, "tensors": [[1, [3], "float32"]]},
        lambda: {"dict": True, "tensors": [["a", 3, "float32"]]},
        lambda: {"dict": True, "tensors": []},
        lambda: {"dict": True, "tensors": [], "extra": 1},
        lambda: {"tensors": []},
        lambda: [],
        lambda: None,
        lambda: "string",
        lambda: {"dict": True, "tensors": [[f"t{i}", [1], "float32"] for i in range(r.randint(100, 3000))]},
    ]
    obj = r.choice(t)()
    text = json.dumps(obj)
    kind = r.randrange(8)
    if kind == 0:
        depth = r.choice([100, 1000, 100_000])
        text = "[" * depth + "]" * depth
    elif kind == 1:
        text = '{"dict":false,"tensors":[["",[' + "9" * r.choice([19, 20, 25, 5000]) + '],"float32"]]}'
    elif kind == 2:
        text = '{"dict":false,"tensors":[["",[' + r.choice(["1.5", "NaN", "Infinity", "-0", "1e3", "-1"]) + \
            '],"float32"]]}'
    elif kind == 3 and len(text) > 2:
        p = r.randrange(len(text))
        text = text[:p] + r.choice(["\\", '"', "{", "]", "\udcff", "\x00", ","]) + text[p + 1:]
    return text


def _random_json(r: random.Random, depth=0):
    k = r.randrange(7 if depth < 4 else 4)
    if k == 0:
        return r.choice([0, -1, 2 ** 40, 1.5, True, None])
    if k == 1:
        return r.choice(["", "float32", "x" * 50])
    if k == 2:
        return r.choice(_ABSURD)
    if k == 3:
        return []
    if k == 4:
        return [_random_json(r, depth + 1) for _ in range(r.randint(0, 4))]
    return {r.choice(["dict", "tensors", "x"]): _random_json(r, depth + 1) for _ in range(r.randint(0, 3))}


def m_hostile_layout(d, s, r):
    f = s.fields
    if r.random() < 0.15:
        text = json.dumps(_random_json(r))
    elif r.random() < 0.3:
        other = _random_layout(r)     # a valid layout, not the one the sections were made for
        text = other.to_json()
    else:
        text = _hostile_json(r)
    js = text.encode("utf-8", "surrogatepass")
    head = _body(d)[:3] + bytes((_body(d)[3] & ~0x10,)) + varint(len(js)) + js       # full mode
    rest_start = f.json[1] if f.mode == "full" else 4 + 16
    return head + _body(d)[rest_start:], True


def m_fingerprint(d, s, r):
    f = s.fields
    fp = os.urandom(16) if r.random() < 0.5 else _random_layout(r).fingerprint()
    rest_start = f.json[1] if f.mode == "full" else 20
    body = _body(d)
    return body[:3] + bytes((body[3] | 0x10,)) + fp + body[rest_start:], True


_SPECIAL32 = [float("nan"), float("inf"), float("-inf"), -0.0, 1e-45, 3.4028235e38, -3.4028235e38]


def m_special_values(d, s, r):
    f = s.fields
    b = bytearray(_body(d))
    lo, hi = _span(f.values, len(b))
    if hi <= lo:
        return m_set_byte(d, s, r)
    for _ in range(r.randint(1, 3)):
        if s.fmt in ("fp32", "int8") and hi - lo >= 4:
            p = lo + 4 * r.randrange((hi - lo) // 4)
            struct.pack_into("<f", b, p, r.choice(_SPECIAL32 + [r.uniform(-1e38, 1e38)]))
        else:
            p = lo + 2 * r.randrange(max(1, (hi - lo) // 2))
            if p + 2 <= hi:
                b[p:p + 2] = r.choice([b"\x00\x7c", b"\x00\xfc", b"\x01\x7c", b"\x80\x7f", b"\xc1\xff", b"\xff\x7b",
                                       b"\x80\x00", b"\x00\x80", b"\x7f\x7f"])
            if s.fmt == "int8":
                b[r.randrange(lo, hi)] = r.choice([0x80, 0x7F, 0x81, 0x00])
    return bytes(b), True


def m_random_indices(d, s, r):
    f = s.fields
    b = bytearray(_body(d))
    lo, hi = _span(f.indices, len(b))
    if hi <= lo:
        return bytes(b) + bytes(r.randrange(256) for _ in range(r.randint(1, 8))), True
    kind = r.randrange(3)
    if kind == 0:       # random bytes
        for p in range(lo, hi):
            if r.random() < 0.3:
                b[p] = r.randrange(256)
    elif kind == 1:     # all ones / all zeros
        b[lo:hi] = (b"\xff" if r.random() < 0.5 else b"\x00") * (hi - lo)
    else:               # swap two chunks (unsorted raw indices)
        if hi - lo >= 8:
            p = lo + 4 * r.randrange((hi - lo) // 4 - 1)
            b[p:p + 4], b[p + 4:p + 8] = b[p + 4:p + 8], b[p:p + 4]
    return bytes(b), True


def m_splice(d, s, r, corpus=None):
    other = r.choice(corpus) if corpus else s
    f, g = s.fields, other.fields
    head = _body(d)[:f.values[0]]
    return head + _body(other.data)[g.values[0]:], True


def m_random_bytes(d, s, r):
    n = r.choice([0, 1, 3, 8, 9, 12, 20, 40, 100, 300])
    rnd = bytes(r.randrange(256) for _ in range(n))
    if r.random() < 0.5:
        return rnd, False
    return b"FL\x01" + bytes((r.randrange(256),)) + rnd, True


MUTATORS: Dict[str, Tuple[Callable, int]] = {
    "flip_bit": (m_flip_bit, 10), "set_byte": (m_set_byte, 8), "truncate": (m_truncate, 6),
    "extend": (m_extend, 4), "insert_delete": (m_insert_delete, 5), "absurd_count": (m_absurd_count, 8),
    "flags": (m_flags, 4), "hostile_layout": (m_hostile_layout, 6), "fingerprint": (m_fingerprint, 2),
    "special_values": (m_special_values, 6), "random_indices": (m_random_indices, 6), "splice": (m_splice, 3),
    "random_bytes": (m_random_bytes, 3),
}


# ---------------------------------------------------------------------------------------------
# the contract
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _time_limit(seconds: float):
    use_alarm = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not use_alarm:
        yield
        return

    def on_alarm(signum, frame):
        raise _InputTimeout()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _container(data: bytes, r: random.Random):
    k = r.randrange(6)
    if k == 0:
        return bytearray(data)
    if k == 1:
        return memoryview(data)
    if k == 2:
        return np.frombuffer(data, dtype=np.uint8)
    if k == 3:   # a strided uint8 view (decode copies it)
        a = np.zeros(2 * len(data), dtype=np.uint8)
        a[::2] = np.frombuffer(data, dtype=np.uint8)
        return a[::2]
    return data


_VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_contract(data: bytes, layout: Optional[Layout], *, input_seconds: float, r: random.Random,
                   max_numel: Optional[int] = None) -> str:
    """Decodes ``data`` (given ``layout``, or none); returns "ok" or "error" (a DecodeError).
    Anything else raises FuzzFailure."""
    kw = {} if max_numel is None else {"max_numel": max_numel}
    t0 = time.perf_counter()
    try:
        with _time_limit(input_seconds):
            try:
                sd = codec.decode(_container(data, r), layout=layout, **kw)
            except DecodeError:
                sd = None
    except _InputTimeout:
        raise FuzzFailure(f"decode ran past the {input_seconds} s limit") from None
    except Exception as e:    # noqa: BLE001 - the point: anything but DecodeError is a bug
        raise FuzzFailure(f"decode raised {type(e).__name__}: {e}") from e
    elapsed = time.perf_counter() - t0
    if elapsed > input_seconds:
        raise FuzzFailure(f"decode took {elapsed:.2f} s (limit {input_seconds} s)")
    if sd is None:
        return "error"
    try:
        if not isinstance(sd, SparseDelta):
            raise FuzzFailure(f"decode returned a {type(sd).__name__}")
        if layout is not None and sd.layout != layout:
            raise FuzzFailure(f"decoded layout {sd.layout!r} differs from the one given {layout!r}")
        if sd.numel > (max_numel if max_numel is not None else codec.DEFAULT_MAX_NUMEL):
            raise FuzzFailure(f"decoded a layout of {sd.numel} entries, above max_numel")
        if sd.values.dtype not in _VALUE_DTYPES or sd.indices.device.type != "cpu":
            raise FuzzFailure(f"decoded values of dtype {sd.values.dtype} on {sd.indices.device}")
        if not sd.validated:
            raise FuzzFailure("decoded SparseDelta is not marked validated")
        sd.validate()       # sorted unique in-range int64 indices, finite values (ValueError)
        if sd.numel <= DENSIFY_MAX_NUMEL:
            sd.to_dense()
    except FuzzFailure:
        raise
    except Exception as e:    # noqa: BLE001
        raise FuzzFailure(f"decode returned an invalid SparseDelta: {type(e).__name__}: {e}") from e
    return "ok"


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
@dataclass
class Stats:
    seed: int
    inputs: int = 0            # inputs decoded (each with and without the layout)
    decoded: int = 0           # decode calls that returned a (valid) SparseDelta
    refused: int = 0           # decode calls that raised DecodeError
    seconds: float = 0.0
    by_mutation: Counter = field(default_factory=Counter)
    corpus: int = 0

    def summary(self) -> str:
        top = ", ".join(f"{k} {v}" for k, v in self.by_mutation.most_common())
        return (f"fuzz_codec: survived {self.inputs} inputs in {self.seconds:.0f} s (seed {self.seed}, "
                f"{self.corpus} valid payloads in the corpus): {self.decoded} decodes returned a valid "
                f"SparseDelta, {self.refused} raised DecodeError, nothing else.\n  inputs by mutation: {top}")


def _systematic(corpus: List[Seed], r: random.Random):
    """Every byte of the small payloads flipped in turn (xor a random non-zero mask), CRC
    recomputed (and, for one byte in 8, left stale)."""
    for s in corpus:
        if len(s.data) > SYSTEMATIC_MAX_BYTES:
            continue
        for p in range(len(s.data) - 4):
            b = bytearray(s.data)
            b[p] ^= r.randrange(1, 256)
            yield s, "every_byte", (bytes(b) if r.random() < 0.125 else recrc(bytes(b[:-4])))


def _random_inputs(corpus: List[Seed], r: random.Random):
    names = list(MUTATORS)
    weights = [MUTATORS[n][1] for n in names]
    while True:
        s = r.choice(corpus)
        data, applied, fix = s.data, [], False
        for _ in range(r.choice([1, 1, 1, 2, 3])):
            name = r.choices(names, weights)[0]
            fn = MUTATORS[name][0]
            data, fix = (fn(data, s, r, corpus) if name == "splice" else fn(data, s, r))
            applied.append(name)
            if len(data) < 8:      # later field mutations assume a payload-sized input
                break
            if fix:
                data = recrc(data)   # keep a well-formed tail for the next mutation
                fix = False
        if fix:
            data = recrc(data)
        yield s, "+".join(applied), data


def _interleave(first, second):
    """Alternates the two streams while the first lasts, then the second alone."""
    for item in first:
        yield item
        yield next(second)
    yield from second


def fuzz(*, seed: int = 0, seconds: Optional[float] = None, max_inputs: Optional[int] = None,
         input_seconds: float = 2.0, crash_dir: Optional[str] = None, progress: Optional[Callable] = None) -> Stats:
    """Runs the fuzzer until ``seconds`` elapsed or ``max_inputs`` inputs (whichever first; at
    least one of them must be given). Raises FuzzFailure on a broken contract."""
    if seconds is None and max_inputs is None:
        raise ValueError("give seconds or max_inputs")
    r = random.Random(seed)
    corpus = build_corpus(seed)
    stats = Stats(seed=seed, corpus=len(corpus))
    t0 = time.perf_counter()
    next_report = 30.0

    for s, how, data in _interleave(_systematic(corpus, r), _random_inputs(corpus, r)):
        if max_inputs is not None and stats.inputs >= max_inputs:
            break
        elapsed = time.perf_counter() - t0
        if seconds is not None and elapsed >= seconds:
            break
        if progress is not None and elapsed >= next_report:
            progress(stats, elapsed)
            next_report += 30.0
        stats.inputs += 1
        stats.by_mutation[how.split("+")[0]] += 1
        # sometimes a max_numel just below (or at) the payload's layout
        max_numel = None
        if r.random() < 0.05:
            max_numel = r.choice([0, 1, max(0, s.layout.numel - 1), s.layout.numel])
        for lay in (s.layout, None):
            try:
                outcome = check_contract(data, lay, input_seconds=input_seconds, r=r, max_numel=max_numel)
            except FuzzFailure as e:
                where = ""
                if crash_dir:
                    os.makedirs(crash_dir, exist_ok=True)
                    where = os.path.join(crash_dir, f"crash-seed{seed}-input{stats.inputs}.bin")
                    with open(where, "wb") as fh:
                        fh.write(data)
                    where = f"; input written to {where}"
                raise FuzzFailure(f"{e}\n  seed {seed}, input {stats.inputs} ({how}), layout given: {lay is not None}, "
                                  f"max_numel={max_numel}, {len(data)} bytes: {data[:120].hex()}"
                                  f"{'...' if len(data) > 120 else ''}{where}") from e.__cause__
            if outcome == "ok":
                stats.decoded += 1
            else:
                stats.refused += 1
    stats.seconds = time.perf_counter() - t0
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("FUZZ_SECONDS", 60)))
    ap.add_argument("--seed", type=int, default=int(os.environ.get("FUZZ_SEED", 0)))
    ap.add_argument("--input-seconds", type=float, default=2.0, help="time limit per decode")
    ap.add_argument("--crash-dir", default="build/fuzz-crashes")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"fuzz_codec: seed {args.seed}, {args.seconds:.0f} s", flush=True)

    def progress(stats, elapsed):
        print(f"  {elapsed:5.0f} s: {stats.inputs} inputs survived", flush=True)

    try:
        stats = fuzz(seed=args.seed, seconds=args.seconds, input_seconds=args.input_seconds,
                     crash_dir=args.crash_dir, progress=progress)
    except FuzzFailure as e:
        print(f"fuzz_codec: FAILED: {e}", file=sys.stderr, flush=True)
        return 1
    print(stats.summary(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
