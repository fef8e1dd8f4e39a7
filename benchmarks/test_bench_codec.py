"""fastlora.codec: encode / decode throughput and payload size of top-k sparse updates.

    .venv/bin/python -m pytest benchmarks/test_bench_codec.py --benchmark-columns=median,iqr,rounds
    .venv/bin/python -m pytest benchmarks/test_bench_codec.py -k "1M" ...     # the small cases only

Cases: 1M and 16M fp32 entries, a uniformly random support at densities 0.1%, 1% and 10%,
fingerprint mode (the steady-state wire format), fp16 and fp32 values. Each benchmark records
in ``extra_info`` what the bytes buy: payload bytes per kept entry against the 8 bytes of raw
int32 index + fp32 value, and index bits per kept entry against the entropy bound
log2 C(n, k) / k. Times are CPU times of the codec (numpy), whatever device the suite targets.
"""
import functools

import numpy as np
import pytest
import torch

from fastlora.codec import decode, encode, inspect
from fastlora.sparse_delta import Layout, SparseDelta

SIZES = {"1M": 1 << 20, "16M": 1 << 24}
DENSITIES = [0.001, 0.01, 0.1]
RAW_BYTES_PER_ENTRY = 8          # int32 index + fp32 value


@functools.lru_cache(maxsize=2)
def _delta(size: str, density: float) -> SparseDelta:
    n = SIZES[size]
    rng = np.random.default_rng(0)
    idx = np.flatnonzero(rng.random(n) < density)            # ~Bernoulli support, sorted
    val = torch.from_numpy(rng.standard_normal(idx.size).astype(np.float32) * 1e-3)
    layout = Layout([("", (n,), torch.float32)], is_dict=False)
    return SparseDelta(torch.from_numpy(idx), val, layout)


def _record(benchmark, sd, data):
    info = inspect(data, layout=sd.layout)
    benchmark.extra_info.update({
        "numel": sd.numel, "nnz": sd.nnz, "payload_bytes": len(data),
        "index_coding": info["index_coding"], "rice_k": info["rice_k"],
        "bytes_per_entry": round(info["bytes_per_entry"], 4),
        "bytes_per_entry_raw_int32_fp32": RAW_BYTES_PER_ENTRY,
        "size_vs_raw": round(info["bytes_per_entry"] / RAW_BYTES_PER_ENTRY, 4),
        "index_bits_per_entry": round(info["index_bits_per_entry"], 4),
        "entropy_bits_per_entry": round(info["entropy_bits_per_entry"], 4),
        "index_bits_vs_bound": round(info["index_bits_per_entry"] / info["entropy_bits_per_entry"], 4),
    })


@pytest.mark.parametrize("values", ["fp16", "fp32"])
@pytest.mark.parametrize("density", DENSITIES, ids=[f"d{d:g}" for d in DENSITIES])
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("op", ["encode", "decode"])
def test_codec(benchmark, op, size, density, values):
    sd = _delta(size, density)
    benchmark.group = f"codec {op} {size} density={density:g}"
    data = encode(sd, values=values, layout="fingerprint")
    if op == "encode":
        out = benchmark.pedantic(encode, args=(sd,), kwargs={"values": values, "layout": "fingerprint"},
                                 rounds=3, warmup_rounds=1, iterations=1)
        assert out == data
    else:
        out = benchmark.pedantic(decode, args=(data,), kwargs={"layout": sd.layout},
                                 rounds=3, warmup_rounds=1, iterations=1)
        assert torch.equal(out.indices, sd.indices)
    _record(benchmark, sd, data)
