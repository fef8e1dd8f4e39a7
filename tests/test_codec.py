"""fastlora.codec: round trips, size targets, value ranges and hostile input.

Malformed payloads are built by hand (``_payload`` below writes the documented byte layout
and a valid CRC) so each test reaches the parser it targets: an attacker can recompute the
CRC, so the CRC must never be what stops a bad field.
"""
import json
import math
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastlora.codec import (DEFAULT_MAX_NUMEL, MAX_FINGERPRINT_OVERHEAD, MAX_JSON_BYTES, DecodeError,
                            EncodeError, decode, encode, index_entropy_bound, inspect, payload_overhead)
from fastlora.sparse_delta import Layout, SparseDelta

FORMATS = ["fp32", "bf16", "fp16", "int8"]
MODES = ["full", "fingerprint"]
FLAG = {"fp32": 0, "bf16": 1, "fp16": 2, "int8": 3, "raw": 0, "bitmap": 4, "rice": 8, "all": 12,
        "full": 0, "fingerprint": 16}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _layouts():
    return {
        "t1": Layout.of(torch.zeros(1)),
        "t0": Layout.of(torch.zeros(0)),
        "scalar": Layout.of(torch.tensor(0.5)),
        "t3x5x7": Layout.of(torch.zeros(3, 5, 7)),
        "t1000": Layout.of(torch.zeros(1000, dtype=torch.float16)),
        "dict": Layout.of({"a.lora_A": torch.zeros(4, 13), "empty": torch.zeros(0, 3),
                           "b.lora_B": torch.zeros(13, 4, dtype=torch.bfloat16),
                           "c": torch.zeros(2, 3, 1, dtype=torch.float64), "d": torch.zeros(777)}),
    }


LAYOUTS = _layouts()


def _delta(layout, nnz, seed=0, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(layout.numel, generator=g)[:nnz].sort().values
    val = (torch.randn(nnz, generator=g, dtype=torch.float64) * scale).to(dtype)
    return SparseDelta(idx, val, layout)


# Malicious payloads are assembled field by field with the codec's own varint writer (the
# decoder under test never sees it).
from fastlora.codec import _varint  # noqa: E402


def _recrc(data):
    body = bytes(data[:-4])
    return body + struct.pack("<I", zlib.crc32(body))


def _payload(*, values="fp32", coding="raw", layout=None, json_text=None, nnz=0, k=None, block=None,
             sections=b"", version=1, flags=None, magic=b"FL"):
    """A payload per the documented layout, with a valid CRC."""
    if flags is None:
        flags = FLAG[values] | FLAG[coding] | (FLAG["full"] if json_text is not None else FLAG["fingerprint"])
    head = magic + bytes((version, flags))
    if json_text is not None:
        js = json_text.encode() if isinstance(json_text, str) else json_text
        head += _varint(len(js)) + js
    else:
        head += layout.fingerprint()
    head += _varint(nnz)
    if k is not None:
        head += bytes((k,))
    if block is not None:
        head += _varint(block)
    body = head + sections
    return body + struct.pack("<I", zlib.crc32(body))


def _check_values(orig, dec, fmt, block=256):
    v = orig.values
    if fmt == "fp32":
        assert dec.values.dtype == torch.float32
        if v.dtype == torch.float32:
            assert torch.equal(dec.values.view(torch.int32), v.view(torch.int32))   # bitwise
        else:
            assert torch.equal(dec.values, v.to(torch.float32))
    elif fmt == "fp16":
        assert dec.values.dtype == torch.float16
        assert torch.equal(dec.values.view(torch.int16), v.to(torch.float16).view(torch.int16))
    elif fmt == "bf16":
        assert dec.values.dtype == torch.bfloat16
        assert torch.equal(dec.values.view(torch.int16), v.to(torch.bfloat16).view(torch.int16))
    else:
        assert dec.values.dtype == torch.float32
        _check_int8_bound(v.double(), dec.values.double(), block)


def _check_int8_bound(v, d, block):
    n = v.numel()
    for b in range(0, n, block):
        blk = v[b:b + block]
        amax = float(blk.abs().max())
        scale = amax / 127
        err = float((d[b:b + block] - blk).abs().max())
        # scale/2 (the stored fp32 scale is rounded up by at most 2**-23 relative), plus half an
        # fp32 ulp where the decoded code*scale is rounded to float32 (3e-45: subnormals)
        assert err <= scale / 2 * (1 + 2 ** -22) + amax * 2 ** -24 + 3e-45, (b, err, scale)


def _roundtrip(sd, fmt, mode, **kw):
    data = encode(sd, values=fmt, layout=mode, **kw)
    dec = decode(data, layout=sd.layout if mode == "fingerprint" else None)
    dec.validate()
    assert dec.layout == sd.layout
    assert torch.equal(dec.indices, sd.indices.cpu())
    _check_values(sd, dec, fmt, kw.get("int8_block", 256))
    return data, dec


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("which", ["none", "one", "some", "all"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_round_trip_small(name, which, fmt, mode):
    lay = LAYOUTS[name]
    nnz = {"none": 0, "one": min(1, lay.numel), "some": lay.numel // 3, "all": lay.numel}[which]
    sd = _delta(lay, nnz, seed=zlib.crc32(f"{name}/{which}".encode()) % 1000)
    data, dec = _roundtrip(sd, fmt, mode)
    # to_dense rebuilds the same tensors (the layout's dtypes)
    want, got = sd.to_dense(), dec.to_dense()
    if lay.is_dict:
        assert list(want) == list(got)
        for key in want:
            assert got[key].shape == want[key].shape and got[key].dtype == want[key].dtype
    else:
        assert got.shape == want.shape


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("density", [1e-4, 1e-3, 1e-2, 0.1, 0.3, 0.5, 0.9, 1.0])
def test_round_trip_densities(density, fmt):
    lay = Layout.of({"x": torch.zeros(200, 300), "y": torch.zeros(40_001)})
    sd = _delta(lay, max(1, round(density * lay.numel)), seed=int(density * 1e4))
    data, _ = _roundtrip(sd, fmt, "fingerprint")
    info = inspect(data, layout=lay)
    # never worse than raw or a bitmap; Rice below ~30% density; nothing at density 1
    assert info["index_bytes"] <= min(4 * sd.nnz, math.ceil(lay.numel / 8))
    if density == 1.0:
        assert info["index_coding"] == "all"
    elif 1e-3 <= density <= 0.1:
        assert info["index_coding"] == "rice"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_source_dtypes(dtype, fmt):
    sd = _delta(LAYOUTS["dict"], 300, seed=3, dtype=dtype)
    _roundtrip(sd, fmt, "full")


def test_fp32_exact_bitwise():
    specials = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1.17e-38, 3.4028235e38, -3.4028235e38,
                             1 / 3, math.pi, 2.0 ** -140], dtype=torch.float32)
    lay = Layout.of(torch.zeros(50))
    sd = SparseDelta(torch.arange(0, 50, 5), specials, lay)
    for mode in MODES:
        data = encode(sd, values="fp32", layout=mode)
        dec = decode(data, layout=lay)
        assert torch.equal(dec.values.view(torch.int32), specials.view(torch.int32))


def test_fp16_input_sent_exactly():
    v = torch.tensor([65504.0, -65504.0, 6e-8, -0.0, 0.1], dtype=torch.float16)
    lay = Layout.of(torch.zeros(9, dtype=torch.float16))
    sd = SparseDelta(torch.tensor([0, 2, 3, 7, 8]), v, lay)
    dec = decode(encode(sd, values="fp16"))
    assert torch.equal(dec.values.view(torch.int16), v.view(torch.int16))


def test_accepts_bytearray_and_memoryview():
    sd = _delta(LAYOUTS["dict"], 100)
    data = encode(sd)
    for form in (bytearray(data), memoryview(data), memoryview(b"xx" + data + b"yy")[2:-2]):
        dec = decode(form)
        assert torch.equal(dec.indices, sd.indices)


def test_large_round_trip_rice():
    n = 2_000_000
    lay = Layout.of(torch.zeros(n))
    idx = torch.from_numpy(np.sort(np.random.default_rng(1).choice(n, 20_000, replace=False)))
    sd = SparseDelta(idx, torch.randn(20_000), lay)
    data, _ = _roundtrip(sd, "fp16", "fingerprint")
    assert inspect(data, layout=lay)["index_coding"] == "rice"


# ---------------------------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------------------------
def test_density_one_costs_no_index_bytes():
    for lay in LAYOUTS.values():
        sd = _delta(lay, lay.numel)
        for fmt in FORMATS:
            info = inspect(encode(sd, values=fmt, layout="fingerprint"), layout=lay)
            assert info["index_coding"] == "all" and info["index_bytes"] == 0


def test_fixed_overhead_fingerprint_mode():
    lay = Layout.of({"a": torch.zeros(1000, 64), "b": torch.zeros(64, 1000)})
    empty = SparseDelta(torch.zeros(0, dtype=torch.int64), torch.zeros(0), lay)
    one = SparseDelta(torch.tensor([12345]), torch.tensor([0.5]), lay)
    for fmt in FORMATS:
        e = encode(empty, values=fmt, layout="fingerprint")
        o = encode(one, values=fmt, layout="fingerprint")
        info = inspect(o, layout=lay)
        print(fmt, "empty payload", len(e), "bytes; 1-entry payload", len(o), info)
        assert len(e) <= MAX_FINGERPRINT_OVERHEAD == 32
        assert len(o) - info["index_bytes"] - info["value_bytes"] == info["overhead_bytes"] <= 32
    # Worst case the format allows: 5-byte nnz varint, Rice parameter, 2-byte int8 block.
    assert payload_overhead(2 ** 35 - 1, values="int8", index_coding="rice", int8_block=16383) == 32
    # payload_overhead agrees with what is measured, for many shapes of payload
    for density in (0.0, 1e-3, 0.1, 0.6, 1.0):
        sd = _delta(lay, round(density * lay.numel), seed=5)
        for fmt in FORMATS:
            for mode in MODES:
                info = inspect(encode(sd, values=fmt, layout=mode, int8_block=100), layout=lay)
                assert info["overhead_bytes"] + info["json_bytes"] == payload_overhead(
                    sd.nnz, values=fmt, index_coding=info["index_coding"], layout_mode=mode,
                    int8_block=100, layout=lay)
                assert info["total_bytes"] == info["header_bytes"] + info["value_bytes"] + info["index_bytes"] + 4


@pytest.mark.parametrize("density", [0.001, 0.01, 0.1])
def test_index_bits_near_entropy_bound(density):
    n = 1_000_000
    k = int(n * density)
    lay = Layout.of(torch.zeros(n))
    idx = np.sort(np.random.default_rng(int(density * 1000)).choice(n, k, replace=False))
    sd = SparseDelta(torch.from_numpy(idx), torch.zeros(k, dtype=torch.float16), lay)
    info = inspect(encode(sd, layout="fingerprint"), layout=lay)
    bound = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
    bound = bound / math.log(2) / k
    assert info["entropy_bits_per_entry"] == pytest.approx(bound)
    print(f"density {density}: {info['index_bits_per_entry']:.3f} bits/entry ({info['index_coding']}, "
          f"k={info['rice_k']}), bound {bound:.3f}")
    assert info["index_bits_per_entry"] <= 1.10 * bound
    # The Rice parameter minimises the exact bit count over every k, and the chosen coding is
    # never larger than raw or bitmap.
    g = np.diff(idx, prepend=-1) - 1
    bits = [k * (r + 1) + int((g >> r).sum()) for r in range(0, 25)]
    r = info["rice_k"]
    assert bits[r] == min(bits)
    # (the Rice parameter byte is counted as header overhead, not index bytes)
    assert info["index_bytes"] == math.ceil(k * r / 8) + math.ceil((k + int((g >> r).sum())) / 8)
    assert info["index_bytes"] <= min(4 * k, math.ceil(n / 8))


def test_index_entropy_bound_helper():
    assert index_entropy_bound(10, 0) == 0 and index_entropy_bound(10, 10) == 0
    assert index_entropy_bound(4, 2) == pytest.approx(math.log2(6) / 2)


# ---------------------------------------------------------------------------------------------
# values that do not fit
# ---------------------------------------------------------------------------------------------
def _dict_delta_with(value, dtype=torch.float32):
    lay = LAYOUTS["dict"]
    nnz = 60
    sd = _delta(lay, nnz, seed=9, dtype=dtype, scale=0.01)
    # put the bad value on the first entry that lands in tensor "d"
    pos = int((sd.indices >= [s for s in lay.specs if s.name == "d"][0].offset).nonzero()[0])
    vals = sd.values.clone()
    vals[pos] = value
    return SparseDelta(sd.indices, vals, lay, validate=False)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_value_names_tensor(fmt, bad):
    with pytest.raises(EncodeError, match=r"tensor 'd'.*not finite"):
        encode(_dict_delta_with(bad), values=fmt)


def test_fp16_range_error_names_tensor():
    with pytest.raises(EncodeError, match=r"tensor 'd'.*float16"):
        encode(_dict_delta_with(70000.0), values="fp16")
    with pytest.raises(EncodeError, match=r"tensor 'd'.*float16"):
        encode(_dict_delta_with(-65505.0, dtype=torch.float64), values="fp16")
    with pytest.raises(EncodeError, match=r"tensor 'd'.*float16"):
        encode(_dict_delta_with(1e6, dtype=torch.bfloat16), values="fp16")
    encode(_dict_delta_with(65504.0), values="fp16")             # the largest half is fine
    lay = Layout.of(torch.zeros(3))
    with pytest.raises(EncodeError, match=r"the tensor"):
        encode(SparseDelta(torch.tensor([1]), torch.tensor([1e5]), lay), values="fp16")


def test_bf16_and_fp32_overflow_errors():
    with pytest.raises(EncodeError, match=r"tensor 'd'.*bfloat16"):
        encode(_dict_delta_with(3.4e38), values="bf16")
    with pytest.raises(EncodeError, match=r"tensor 'd'.*float32"):
        encode(_dict_delta_with(1e39, dtype=torch.float64), values="fp32")
    with pytest.raises(EncodeError, match=r"tensor 'd'.*float32"):
        encode(_dict_delta_with(1e39, dtype=torch.float64), values="int8")


def test_encode_rejects_bad_arguments():
    sd = _delta(LAYOUTS["dict"], 10)
    with pytest.raises(EncodeError, match="values"):
        encode(sd, values="fp8")
    with pytest.raises(EncodeError, match="layout"):
        encode(sd, layout="hash")
    for block in (0, 16384, 2.5, True):
        with pytest.raises(EncodeError, match="int8_block"):
            encode(sd, values="int8", int8_block=block)
    with pytest.raises(TypeError):
        encode({"a": torch.zeros(3)})
    unsorted = SparseDelta(torch.tensor([3, 1]), torch.ones(2), Layout.of(torch.zeros(5)), validate=False)
    with pytest.raises(EncodeError, match="sorted"):
        encode(unsorted)


@pytest.mark.parametrize("block", [1, 7, 256, 1000])
def test_int8_error_bound(block):
    g = torch.Generator().manual_seed(block)
    n = 3000                                                    # not a multiple of most blocks
    # magnitudes varying across blocks, a zero block, and fp32 subnormals
    mag = torch.logspace(-30, 3, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    v = (torch.randn(n, generator=g, dtype=torch.float64) * mag).float()
    v[:block] = 0.0
    v[-5:] = torch.tensor([1e-45, -3e-45, 1e-44, 0.0, 2e-40])
    lay = Layout.of(torch.zeros(2 * n))
    sd = SparseDelta(torch.arange(0, 2 * n, 2), v, lay)
    data = encode(sd, values="int8", int8_block=block, layout="fingerprint")
    dec = decode(data, layout=lay)
    assert torch.equal(dec.values[:block], torch.zeros(block))
    _check_int8_bound(v.double(), dec.values.double(), block)
    err = (dec.values.double() - v.double()).abs().max().item()
    print(f"int8 block {block}: max abs error {err:.3g}, bytes/entry {len(data) / n:.3f}")


# ---------------------------------------------------------------------------------------------
# layout handling
# ---------------------------------------------------------------------------------------------
def test_fingerprint_needs_matching_layout():
    sd = _delta(LAYOUTS["dict"], 30)
    data = encode(sd, layout="fingerprint")
    with pytest.raises(DecodeError, match="fingerprint.*pass the known layout"):
        decode(data)
    with pytest.raises(DecodeError, match="fingerprint mismatch"):
        decode(data, layout=LAYOUTS["t1000"])
    other = Layout.of({"a.lora_A": torch.zeros(4, 13)})
    with pytest.raises(DecodeError, match="fingerprint mismatch"):
        decode(data, layout=other)
    with pytest.raises(TypeError):
        decode(data, layout="dict")


def test_full_layout_must_equal_given_layout():
    sd = _delta(LAYOUTS["dict"], 30)
    data = encode(sd, layout="full")
    assert decode(data, layout=LAYOUTS["dict"]).layout == LAYOUTS["dict"]
    with pytest.raises(DecodeError, match="differs from the expected"):
        decode(data, layout=LAYOUTS["t1000"])


def test_max_numel():
    lay = Layout.of(torch.zeros(1000))
    sd = _delta(lay, 10)
    for mode in MODES:
        data = encode(sd, layout=mode)
        assert decode(data, layout=lay, max_numel=1000).nnz == 10
        with pytest.raises(DecodeError, match="max_numel"):
            decode(data, layout=lay, max_numel=999)
    assert DEFAULT_MAX_NUMEL == 2 ** 31


# ---------------------------------------------------------------------------------------------
# malformed input, one class at a time
# ---------------------------------------------------------------------------------------------
L10 = Layout.of(torch.zeros(10))
J10 = L10.to_json()


def _flip_last(data):
    return data[:-1] + bytes((data[-1] ^ 0xFF,))


def _f32(*xs):
    return struct.pack(f"<{len(xs)}f", *xs)


def _u32(*xs):
    return struct.pack(f"<{len(xs)}I", *xs)


MALFORMED = {
    "empty": (b"", "truncated"),
    "short": (b"FL\x01", "truncated"),
    "wrong magic": (b"PK\x03\x04" + bytes(40), "not a fastlora payload"),
    "future version": (_payload(layout=L10, version=2), "newer than this decoder"),
    "version 0": (_payload(layout=L10, version=0), "unknown payload format version"),
    "reserved flags": (_payload(layout=L10, flags=0x30), "reserved flag bits"),
    "stale crc": (_flip_last(_payload(layout=L10, nnz=1, sections=_f32(1) + _u32(3))), "CRC32 mismatch"),
    "nnz > numel": (_payload(layout=L10, nnz=11, sections=_f32(*[1] * 11) + _u32(*range(11))), "exceeds"),
    "huge nnz": (_payload(layout=L10, nnz=2 ** 62), "exceeds"),
    "varint too long": (_recrc(_payload(layout=L10)[:20] + b"\xff" * 11 + b"\0" * 4), "varint longer"),
    "non-canonical varint": (_recrc(_payload(layout=L10)[:20] + b"\x80\x00" + b"\0" * 4), "non-canonical"),
    "values truncated": (_payload(layout=L10, nnz=2, sections=_f32(1)), "truncated"),
    "raw truncated": (_payload(layout=L10, nnz=2, sections=_f32(1, 2) + _u32(1)), "truncated"),
    "raw trailing": (_payload(layout=L10, nnz=1, sections=_f32(1) + _u32(1) + b"x"), "trailing"),
    "raw unsorted": (_payload(layout=L10, nnz=2, sections=_f32(1, 2) + _u32(5, 2)), "sorted"),
    "raw duplicate": (_payload(layout=L10, nnz=2, sections=_f32(1, 2) + _u32(5, 5)), "unique"),
    "raw out of range": (_payload(layout=L10, nnz=2, sections=_f32(1, 2) + _u32(5, 10)), "out of range"),
    "non-finite fp32": (_payload(layout=L10, nnz=1, sections=_f32(float("inf")) + _u32(4)), "non-finite"),
    "nan fp16": (_payload(layout=L10, values="fp16", nnz=1, sections=b"\x00\x7e" + _u32(4)), "non-finite"),
    "inf bf16": (_payload(layout=L10, values="bf16", nnz=1, sections=b"\x80\x7f" + _u32(4)), "non-finite"),
    "all with nnz < numel": (_payload(layout=L10, coding="all", nnz=9, sections=_f32(*[1] * 9)), "'all'"),
    "bitmap bit past end": (_payload(layout=L10, coding="bitmap", nnz=1, sections=_f32(1) + b"\0\x04"), "past the end"),
    "bitmap count": (_payload(layout=L10, coding="bitmap", nnz=2, sections=_f32(1, 1) + b"\x01\0"), "bits set"),
    "bitmap truncated": (_payload(layout=L10, coding="bitmap", nnz=1, sections=_f32(1) + b"\x01"), "truncated"),
    "bad rice k": (_payload(layout=L10, coding="rice", nnz=1, k=5, sections=_f32(1) + b"\0\x01"), "Rice parameter"),
    "rice k missing": (_payload(layout=L10, coding="rice", nnz=1), "truncated"),
    "rice unary too long": (_payload(layout=L10, coding="rice", nnz=1, k=0, sections=_f32(1) + b"\0\0\x01"),
                            "longer than any valid"),
    "rice terminators": (_payload(layout=L10, coding="rice", nnz=2, k=0, sections=_f32(1, 1) + b"\x01"), "terminators"),
    "rice past end": (_payload(layout=L10, coding="rice", nnz=1, k=0, sections=_f32(1) + b"\x00\x04"), "past the end"),
    "rice remainder padding": (_payload(layout=L10, coding="rice", nnz=1, k=2, sections=_f32(1) + b"\xf0\x01"),
                               "padding bits"),
    "rice trailing": (_payload(layout=L10, coding="rice", nnz=1, k=0, sections=_f32(1) + b"\x01\x00"), "trailing"),
    "int8 block 0": (_payload(layout=L10, values="int8", nnz=1, block=0, sections=b""), "block size"),
    "int8 block huge": (_payload(layout=L10, values="int8", nnz=1, block=1 << 20), "block size"),
    "int8 negative scale": (_payload(layout=L10, values="int8", nnz=1, block=4, sections=_f32(-1) + b"\x05" + _u32(1)),
                            "negative"),
    "int8 nan scale": (_payload(layout=L10, values="int8", nnz=1, block=4, sections=_f32(float("nan")) + b"\x05"
                                + _u32(1)), "not finite"),
    "int8 code -128": (_payload(layout=L10, values="int8", nnz=1, block=4, sections=_f32(1) + b"\x80" + _u32(1)),
                       "-128"),
    "int8 overflow": (_payload(layout=L10, values="int8", nnz=1, block=4, sections=_f32(3e38) + b"\x7f" + _u32(1)),
                      "non-finite"),
    # JSON layouts that lie
    "json length huge": (_recrc(_payload(json_text=b"")[:4] + _varint(2 ** 40) + b"{}" + b"\0" * 4), "MAX_JSON_BYTES"),
    "json truncated": (_recrc(_payload(json_text=b"")[:4] + _varint(200) + b"{}" + b"\0" * 4), "runs past the end"),
    "json not json": (_payload(json_text="{not json"), "malformed JSON"),
    "json not utf-8": (_payload(json_text=b"\xff\xfe"), "malformed JSON"),
    "json deep": (_payload(json_text="[" * 100_000 + "]" * 100_000), "malformed JSON"),
    "json huge int": (_payload(json_text='{"dict":false,"tensors":[["",[' + "9" * 5000 + '],"float32"]]}'),
                      "malformed JSON"),
    "json float dim": (_payload(json_text='{"dict":false,"tensors":[["",[1.5],"float32"]]}'), "malformed JSON"),
    "json nan dim": (_payload(json_text='{"dict":false,"tensors":[["",[NaN],"float32"]]}'), "malformed JSON"),
    "json bool dim": (_payload(json_text='{"dict":false,"tensors":[["",[true],"float32"]]}'), "list of ints"),
    "json bad dtype": (_payload(json_text='{"dict":false,"tensors":[["",[3],"float99"]]}'), "unknown dtype"),
    "json negative dim": (_payload(json_text='{"dict":false,"tensors":[["",[3,-1],"float32"]]}'), "negative"),
    "json huge shape": (_payload(json_text='{"dict":false,"tensors":[["",[1000000000000000000,1000000000000000000],'
                                           '"float32"]]}'), "max_numel"),
    "json huge total": (_payload(json_text=json.dumps({"dict": True, "tensors": [[str(i), [2 ** 30], "float32"]
                                                                                   for i in range(3)]})), "max_numel"),
    "json zero-size huge dim": (_payload(json_text='{"dict":false,"tensors":[["",[0,1000000000000000],"float32"]]}'),
                                "max_numel"),
    "json too many dims": (_payload(json_text='{"dict":false,"tensors":[["",[' + ",".join(["1"] * 65) + '],'
                                              '"float32"]]}'), "dims"),
    "json missing keys": (_payload(json_text='{"tensors":[]}'), "invalid JSON layout"),
    "json wrong types": (_payload(json_text='{"dict":"yes","tensors":[]}'), "invalid JSON layout"),
    "json bad entry": (_payload(json_text='{"dict":true,"tensors":[["a",[3]]]}'), "invalid JSON layout"),
    "json duplicate names": (_payload(json_text='{"dict":true,"tensors":[["a",[3],"float32"],["a",[3],"float32"]]}'),
                             "duplicate"),
    "json two bare tensors": (_payload(json_text='{"dict":false,"tensors":[["",[3],"float32"],["b",[3],"float32"]]}'),
                              "exactly one"),
    "json named bare tensor": (_payload(json_text='{"dict":false,"tensors":[["x",[3],"float32"]]}'), "name"),
    "json nnz > numel": (_payload(json_text=J10, nnz=11, sections=_f32(*[1] * 11) + _u32(*range(11))), "exceeds"),
    "json trailing": (_payload(json_text=J10, nnz=1, sections=_f32(1) + _u32(3) + b"\0\0"), "trailing"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_input(case):
    data, message = MALFORMED[case]
    with pytest.raises(DecodeError, match=message):
        decode(data, layout=L10)


def test_handmade_payloads_are_valid():
    """The builder used above writes what encode writes (so the malformed cases differ from a
    valid payload only in the field they target)."""
    big = Layout([("", (2 ** 24,), torch.float32)], is_dict=False)     # raw: 4 bytes < Rice's 5
    sd = SparseDelta(torch.tensor([2 ** 23 + 5]), torch.tensor([1.0]), big)
    raw = _f32(1) + _u32(2 ** 23 + 5)
    assert encode(sd, values="fp32", layout="fingerprint") == _payload(layout=big, nnz=1, sections=raw)
    assert encode(sd, values="fp32", layout="full") == _payload(json_text=big.to_json(), nnz=1, sections=raw)
    sd = SparseDelta(torch.tensor([3]), torch.tensor([1.0]), L10)                  # bitmap
    assert encode(sd, values="fp32") == _payload(json_text=J10, coding="bitmap", nnz=1, sections=_f32(1) + b"\x08\0")
    sd = SparseDelta(torch.tensor([3, 9]), torch.tensor([1.0, 1.0]), L10)
    ok = decode(_payload(layout=L10, coding="rice", nnz=2, k=1, sections=_f32(1, 1) + b"\x03\x12"), layout=L10)
    assert ok.indices.tolist() == [3, 9]


def _peak_alloc(fn):
    tracemalloc.start()
    try:
        fn()
    except DecodeError:
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_declared_sizes_do_not_drive_allocation():
    big = Layout([("", (2 ** 31,), torch.float32)], is_dict=False)
    # a tiny payload claiming 2**31 raw-coded entries / a 256 MiB bitmap
    for coding in ("raw", "bitmap", "rice"):
        data = _payload(layout=big, coding=coding, nnz=2 ** 30, k=0 if coding == "rice" else None)
        with pytest.raises(DecodeError, match="truncated"):
            decode(data, layout=big)
        assert _peak_alloc(lambda: decode(data, layout=big)) < 100_000
    # a 1 MiB unary stream for one entry of a 16-entry layout: refused before unpacking (8 MiB)
    l16 = Layout.of(torch.zeros(16))
    data = _payload(layout=l16, coding="rice", nnz=1, k=0, sections=_f32(1) + bytes(2 ** 20) + b"\x01")
    with pytest.raises(DecodeError, match="longer than any valid"):
        decode(data, layout=l16)
    assert _peak_alloc(lambda: decode(data, layout=l16)) < 200_000
    # a 4 MiB - 1 JSON document of nested lists is refused without recursing to death
    data = _payload(json_text="[" * (MAX_JSON_BYTES // 2) + "]" * (MAX_JSON_BYTES // 2 - 1))
    with pytest.raises(DecodeError):
        decode(data)


# ---------------------------------------------------------------------------------------------
# fuzzing
# ---------------------------------------------------------------------------------------------
def _corpus():
    """Valid payloads covering every value format, index coding and layout mode."""
    lay = Layout.of({"w.A": torch.zeros(6, 5), "w.B": torch.zeros(5, 7, dtype=torch.float16), "z": torch.zeros(3)})
    out = []
    for nnz, fmt, mode in [(0, "fp32", "full"), (1, "fp16", "fingerprint"), (3, "bf16", "full"),
                           (8, "int8", "fingerprint"), (20, "fp32", "fingerprint"), (20, "int8", "full"),
                           (40, "fp16", "full"), (lay.numel, "bf16", "fingerprint"), (2, "fp32", "full")]:
        sd = _delta(lay, nnz, seed=nnz, scale=0.5)
        out.append((encode(sd, values=fmt, layout=mode, int8_block=3), lay))
    sparse = Layout.of(torch.zeros(5000))
    sd = _delta(sparse, 60, seed=1)
    for fmt in FORMATS:
        out.append((encode(sd, values=fmt, layout="fingerprint", int8_block=16), sparse))
    return out


CORPUS = _corpus()
assert {inspect(d, layout=lay)["index_coding"] for d, lay in CORPUS} == {"raw", "bitmap", "rice", "all"}


def _decode_or_error(data, layout):
    """The decoder's contract on any input: DecodeError, or a SparseDelta that is valid."""
    for lay in (layout, None):
        try:
            sd = decode(data, layout=lay)
        except DecodeError:
            continue
        sd.validate()
        if sd.numel <= 10 ** 6:
            sd.to_dense()


FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(data):
    _decode_or_error(data, CORPUS[0][1])


@FUZZ
@given(st.integers(0, 255), st.binary(max_size=300))
def test_fuzz_arbitrary_fields_after_valid_prefix(flags, body):
    # Valid magic, version, (for fingerprint flags) fingerprint and a recomputed CRC, so random
    # bytes reach the field and section parsers.
    lay = CORPUS[0][1]
    head = b"FL\x01" + bytes((flags,)) + (lay.fingerprint() if flags & 0x10 else b"")
    _decode_or_error(_recrc(head + body + b"\0\0\0\0"), lay)


def test_truncations_of_valid_payloads():
    for data, lay in CORPUS:
        for cut in range(len(data)):
            with pytest.raises(DecodeError):
                decode(data[:cut], layout=lay)
            if cut >= 4:       # the same prefix with a recomputed CRC reaches the parsers
                _decode_or_error(_recrc(data[:cut]), lay)


@FUZZ
@given(st.integers(0, len(CORPUS) - 1), st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)),
                                                  min_size=1, max_size=4), st.booleans())
def test_fuzz_mutations(which, mutations, fix_crc):
    data, lay = CORPUS[which]
    buf = bytearray(data)
    for pos, byte in mutations:
        buf[pos % len(buf)] = byte
    if fix_crc:
        buf = _recrc(buf)
    elif bytes(buf) != data:
        with pytest.raises(DecodeError):
            decode(bytes(buf), layout=lay)
        return
    _decode_or_error(bytes(buf), lay)


@FUZZ
@given(st.integers(0, len(CORPUS) - 1), st.integers(0, 10 ** 6), st.binary(min_size=1, max_size=8),
       st.booleans())
def test_fuzz_insertions_and_deletions(which, pos, chunk, insert):
    data, lay = CORPUS[which]
    body = data[:-4]
    pos %= len(body)
    body = body[:pos] + chunk + body[pos:] if insert else body[:pos] + body[pos + len(chunk):]
    _decode_or_error(_recrc(body + b"\0\0\0\0"), lay)


# ---------------------------------------------------------------------------------------------
# default value format, numpy
# ---------------------------------------------------------------------------------------------
def test_default_values_format_is_the_values_own_dtype():
    """encode(sd) never rounds: the travel precision is chosen where the residual sees it
    (topk_sparsify's value_dtype), so topk_sparsify + encode with defaults lose nothing."""
    lay = LAYOUTS["dict"]
    for dtype, fmt in [(torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")]:
        sd = _delta(lay, 50, dtype=dtype)
        data = encode(sd, layout="fingerprint")
        assert inspect(data, layout=lay)["values"] == fmt
        dec = decode(data, layout=lay)
        assert dec.values.dtype == dtype and torch.equal(dec.values, sd.values)
    with pytest.raises(EncodeError, match="float64 values have no exact wire format"):
        encode(_delta(lay, 5, dtype=torch.float64))
    assert inspect(encode(_delta(lay, 5, dtype=torch.float64), values="fp32"))["values"] == "fp32"
    # with error feedback: topk_sparsify(value_dtype=fp16) + encode() is exact
    d = {"a": torch.randn(300), "b": torch.randn(4, 5)}
    res = {n: torch.full_like(t, 0.01) for n, t in d.items()}
    old = {n: r.clone() for n, r in res.items()}
    import fastlora
    sd = fastlora.topk_sparsify(d, density=0.1, residual=res, value_dtype=torch.float16)
    sent = decode(encode(sd)).to_dense(torch.float32)
    for n in d:
        assert torch.equal(sent[n] + res[n], d[n] + old[n])


def test_decode_takes_numpy_uint8_payloads():
    sd = _delta(LAYOUTS["dict"], 100)
    data = encode(sd, values="fp16", layout="fingerprint")
    arr = np.frombuffer(data, dtype=np.uint8)             # read-only, as numpy hands out bytes
    assert not arr.flags.writeable
    strided = np.zeros(2 * len(data), dtype=np.uint8)
    strided[::2] = arr
    for form in (arr, arr.copy(), strided[::2], bytearray(data), memoryview(data)):
        dec = decode(form, layout=sd.layout)
        assert torch.equal(dec.indices, sd.indices)
        assert torch.equal(dec.values, sd.values.to(torch.float16))
        assert inspect(form, layout=sd.layout)["nnz"] == 100
    assert bytes(arr) == data                             # never written
    for bad in (arr.astype(np.int16), arr.reshape(1, -1), arr.astype(np.float32)):
        with pytest.raises(TypeError, match="decode: data: .*1-D uint8"):
            decode(bad, layout=sd.layout)
    with pytest.raises(TypeError, match="decode: data: expected payload bytes"):
        decode([1, 2, 3])


def test_sparse_delta_from_numpy_and_dense_as_numpy():
    lay = Layout.of({"a": np.zeros((3, 4), dtype=np.float32), "b": np.zeros(5, dtype=np.float16)})
    assert lay == Layout.of({"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.float16)})
    idx = np.array([1, 7, 13], dtype=np.int64)
    val = np.array([0.5, -2.0, 3.0], dtype=">f4")         # big-endian values: copied to native
    sd = SparseDelta(idx, val, lay)
    assert isinstance(sd.indices, torch.Tensor) and sd.values.dtype == torch.float32
    dec = decode(encode(sd, layout="fingerprint"), layout=lay)
    assert torch.equal(dec.indices, torch.from_numpy(idx))
    dense = dec.to_dense(as_numpy=True)
    assert isinstance(dense["a"], np.ndarray) and dense["a"].dtype == np.float32 and dense["b"].dtype == np.float16
    assert dense["a"].reshape(-1)[7] == -2.0 and dense["b"][13 - 12] == 3.0
    with pytest.raises(ValueError, match="int64"):
        SparseDelta(idx.astype(np.int32), val, lay)
    with pytest.raises(TypeError, match="numpy array of unsupported dtype"):
        Layout.of({"a": np.zeros(3, dtype=object)})


# ---------------------------------------------------------------------------------------------
# the seeded fuzzer (tests/fuzz_codec.py; `make fuzz` runs it for minutes)
# ---------------------------------------------------------------------------------------------
import fuzz_codec  # noqa: E402

FUZZ_INPUTS = 20_000      # ~3 s here, with the corpus (~1 s)


def test_fuzz_corpus_covers_formats_codings_modes_and_decodes_exactly():
    corpus = fuzz_codec.build_corpus(0)
    combos = {(s.fmt, s.coding, s.mode) for s in corpus}
    assert combos == {(f, c, m) for f in FORMATS for c in ("raw", "bitmap", "rice", "all") for m in MODES}
    # codings the encoder never picks for these entries, written by the fuzzer itself
    assert any(s.origin == "recoded" and s.coding == "raw" and s.indices.size > 100 for s in corpus)
    assert {s.origin for s in corpus if s.coding == "rice"} == {"encode", "recoded"}
    for s in corpus:
        sd = decode(s.data, layout=s.layout)
        assert np.array_equal(sd.indices.numpy(), s.indices), (s.origin, s.coding, s.fmt)


def test_fuzz_decoder_seeded():
    """decode returns a valid SparseDelta or raises DecodeError on every input of the seeded
    stream (every byte of the small payloads flipped, then random stacked mutations), each
    under a time limit."""
    stats = fuzz_codec.fuzz(seed=0, max_inputs=FUZZ_INPUTS)
    assert stats.inputs == FUZZ_INPUTS
    assert stats.decoded > 100 and stats.refused > FUZZ_INPUTS
    assert set(stats.by_mutation) == set(fuzz_codec.MUTATORS) | {"every_byte"}


def test_fuzzer_catches_broken_contracts(monkeypatch):
    """The fuzzer's own oracle: a decoder that lets a non-finite value through, raises
    something else than DecodeError, or hangs, is caught (and the input reported)."""
    import fastlora.codec as codec_mod

    real_values, real_decode = codec_mod._decode_values, codec_mod.decode

    def lax_values(buf, h, off, idx):      # the finiteness check dropped
        if h.fmt == "fp32":
            return torch.from_numpy(np.frombuffer(buf, dtype="<f4", count=h.nnz, offset=off).astype(np.float32))
        return real_values(buf, h, off, idx)

    monkeypatch.setattr(codec_mod, "_decode_values", lax_values)
    with pytest.raises(fuzz_codec.FuzzFailure, match=r"invalid SparseDelta: .*non-finite(.|\n)*seed 3, input \d+"):
        fuzz_codec.fuzz(seed=3, max_inputs=5000)
    monkeypatch.setattr(codec_mod, "_decode_values", real_values)

    def flaky(data, **kw):
        if len(data) % 7 == 3:
            raise IndexError("planted")
        return real_decode(data, **kw)

    monkeypatch.setattr(codec_mod, "decode", flaky)
    with pytest.raises(fuzz_codec.FuzzFailure, match="decode raised IndexError: planted"):
        fuzz_codec.fuzz(seed=3, max_inputs=5000)

    def slow(data, **kw):
        if len(data) % 7 == 3:
            import time
            time.sleep(0.5)
        return real_decode(data, **kw)

    monkeypatch.setattr(codec_mod, "decode", slow)
    with pytest.raises(fuzz_codec.FuzzFailure, match=r"ran past the 0.1 s limit"):
        fuzz_codec.fuzz(seed=3, max_inputs=5000, input_seconds=0.1)
