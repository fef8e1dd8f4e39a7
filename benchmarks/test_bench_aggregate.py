"""Sparse aggregation: fastlora.sparse_aggregate vs index_add_, scatter_add_ and
densify-and-sum, and clone() of the output as the memory-bandwidth limit.

    .venv/bin/python -m pytest benchmarks/test_bench_aggregate.py --benchmark-columns=median,iqr,rounds

Clients each send 1% of the entries (random supports, fp32 values), weights 1/N, into a
float32 output that is zeroed (or, for fastlora, added into) every call. Target (CPU, 2
threads), asserted as a ratio to clone() measured interleaved in the same fresh process:
64 clients x 160k entries into 16M <= 2x clone.
"""
import os

import pytest
import torch

import fastlora
from fastlora.sparse_delta import Layout, SparseDelta
from bench_targets import interleaved_medians_in_fresh_process

SIZES = {"1M": 1 << 20, "16M": 1 << 24}
CLIENTS = [8, 64, 256]
if os.environ.get("FASTLORA_BENCH_QUICK"):
    SIZES, CLIENTS = {"1M": 1 << 20}, [8, 64]


def make_clients(n, n_clients, density=0.01, device="cpu"):
    g = torch.Generator().manual_seed(n_clients)
    layout = Layout.of(torch.zeros(n))
    nnz = int(density * n)
    out = []
    for _ in range(n_clients):
        idx = torch.sort(torch.randperm(n, generator=g)[:nnz]).values
        out.append(SparseDelta(idx.to(device), torch.randn(nnz, generator=g).to(device), layout))
    return layout, out


def contenders(n, deltas, device="cpu"):
    w = 1.0 / len(deltas)
    out = torch.zeros(n, device=device)

    def index_add():
        o = torch.zeros(n, device=device)
        for d in deltas:
            o.index_add_(0, d.indices, d.values, alpha=w)
        return o

    def scatter_add():
        o = torch.zeros(n, device=device)
        for d in deltas:
            o.scatter_add_(0, d.indices, d.values * w)
        return o

    def densify_and_sum():
        o = torch.zeros(n, device=device)
        for d in deltas:
            o += d.to_dense() * w
        return o

    return {
        "clone": lambda: out.clone(),
        "fastlora": lambda: fastlora.sparse_aggregate(deltas, out=out),
        "index_add_": index_add,
        "scatter_add_": scatter_add,
        "densify_and_sum": densify_and_sum,
    }


@pytest.fixture(scope="module", params=[(s, c) for s in SIZES for c in CLIENTS],
                ids=[f"{s}-{c}clients" for s in SIZES for c in CLIENTS])
def case(request, device):
    size, n_clients = request.param
    n = SIZES[size]
    _, deltas = make_clients(n, n_clients, device=device)
    return f"{size} x {n_clients} clients", contenders(n, deltas, device)


@pytest.mark.parametrize("impl", ["clone", "fastlora", "index_add_", "scatter_add_", "densify_and_sum"])
def test_time(benchmark, case, impl):
    name, fns = case
    benchmark.group = f"aggregate {name} (1% each)"
    benchmark.pedantic(fns[impl], rounds=3, warmup_rounds=1, iterations=1)


def test_target_64_clients_16M(record_property):
    # CPU target, so this runs on CPU tensors on any machine; in a fresh process, for clone()'s
    # sake (see interleaved_medians_in_fresh_process). copy_into (a copy into a buffer that
    # exists, no page faults) is recorded as well.
    t = interleaved_medians_in_fresh_process(
        "from test_bench_aggregate import contenders, make_clients; n = 1 << 24; "
        "_, deltas = make_clients(n, 64); fns = contenders(n, deltas); src, dst = torch.zeros(n), torch.empty(n); "
        "fns['copy_into'] = lambda: dst.copy_(src)",
        ("clone", "copy_into", "fastlora", "index_add_"))
    ratios = {k: v / t["clone"] for k, v in t.items()}
    for k, r in ratios.items():
        record_property(f"{k}_over_clone", round(r, 3))
    print({k: round(v * 1e3, 2) for k, v in t.items()}, ratios)
    assert ratios["fastlora"] <= 2.0, ratios
