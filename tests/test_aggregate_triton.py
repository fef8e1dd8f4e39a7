"""Triton sparse_aggregate_ (kernels/aggregate.py) vs fastlora.reference.sparse_aggregate_,
bit for bit, under the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports the kernels); FASTLORA_TEST_GPU=1 runs the same
tests on a GPU (the reference then runs on CPU copies: IEEE float32 without FMA gives the same
bits on both).

The op's order is documented (clients in list order, product then sum each rounded in
float32), so every comparison is exact: bits of the float32 outputs, -0.0 included. Values
and weights span many binades so that the products and sums actually round.
"""
import os

import pytest
import torch

from fastlora import reference as ref
from fastlora.kernels import aggregate as tka

# FASTLORA_TEST_GPU=1 runs the same tests on a real GPU instead of the interpreter.
DEVICE = "cuda" if os.environ.get("FASTLORA_TEST_GPU") else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# A dict layout's tensors laid end to end, a zero-size one included (numel 3105).
SIZES = [(300, 7), (0,), (1000,), (5,)]
# Smaller, for the many-program runs (the interpreter pays per program).
SMALL = [(13, 5), (0,), (40,), (3,)]
KINDS = ["sparse", "empty", "full", "sparse", "part"]


def _numel(sizes):
    return sum(torch.Size(s).numel() for s in sizes)


def _outs(sizes, gen):
    """Initial accumulators (non-zero, so that every sum rounds)."""
    return [(torch.randn(s, generator=gen) * 4).to(DEVICE) for s in sizes]


def _values(k, dtype, gen):
    # Magnitudes over ~16 binades; an exact zero and a negative zero included when k allows.
    v = torch.randn(k, generator=gen) * torch.exp2(torch.randint(-8, 8, (k,), generator=gen).float())
    if k > 2:
        v[1], v[2] = 0.0, -0.0
    return v.to(dtype)


def _client(numel, kind, dtype, gen, i, n_parts=3):
    """(indices, values) of one client: empty, full density, a random support (overlapping
    the others'), or the i-th part of a partition of the index space (disjoint)."""
    if kind == "empty":
        idx = torch.zeros(0, dtype=torch.int64)
    elif kind == "full":
        idx = torch.arange(numel)
    elif kind == "part":
        idx = torch.arange(i % n_parts, numel, n_parts)
    else:
        k = min(numel, numel // 10 + 13 * i + 1)
        idx = torch.sort(torch.randperm(numel, generator=gen)[:k]).values
    return idx.to(DEVICE), _values(idx.numel(), dtype, gen).to(DEVICE)


def _clients(numel, n, dtypes, gen, kinds=KINDS):
    pairs = [_client(numel, kinds[i % len(kinds)], dtypes[i % len(dtypes)], gen, i) for i in range(n)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _weights(n, gen):
    # On the CPU, as the op's wrapper passes them; not powers of two, so products round.
    return torch.rand(n, generator=gen) * torch.exp2(torch.randint(-4, 4, (n,), generator=gen).float())


def _bits(ts):
    if not ts:
        return torch.zeros(0, dtype=torch.int32)
    return torch.cat([t.detach().reshape(-1).cpu() for t in ts]).view(torch.int32)


def _expected(outs, idx, val, w):
    exp = [o.detach().cpu().clone() for o in outs]
    ref.sparse_aggregate_(exp, [i.cpu() for i in idx], [v.cpu() for v in val], w.cpu())
    return exp


def _check(outs, idx, val, w, validate=True):
    exp = _expected(outs, idx, val, w)
    got = [o.clone() for o in outs]
    assert tka.sparse_aggregate_(got, idx, val, w, validate) is None
    assert torch.equal(_bits(got), _bits(exp))
    return got


# --------------------------------------------------------------------------- bitwise results
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_clients", [1, 2, 7, 40])
def test_matches_reference(n_clients, dtype):
    # Multi-tensor out with a zero-size piece; empty, full-density, overlapping and disjoint
    # clients.
    g = torch.Generator().manual_seed(n_clients)
    outs = _outs(SIZES, g)
    idx, val = _clients(_numel(SIZES), n_clients, [dtype], g)
    _check(outs, idx, val, _weights(n_clients, g))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unvalidated_matches_reference(dtype):
    g = torch.Generator().manual_seed(1)
    outs = _outs(SIZES, g)
    idx, val = _clients(_numel(SIZES), 7, [dtype], g)
    _check(outs, idx, val, _weights(7, g), validate=False)


@pytest.mark.parametrize("validate", [True, False])
def test_mixed_value_dtypes(validate):
    # Clients of different dtypes in one call (the per-client runtime dtype path), float64
    # included (rounded to float32 like torch's .to(float32)).
    g = torch.Generator().manual_seed(2)
    outs = _outs(SIZES, g)
    idx, val = _clients(_numel(SIZES), 8, [torch.float64, torch.bfloat16, torch.float32, torch.float16], g)
    _check(outs, idx, val, _weights(8, g), validate)


def test_disjoint_supports():
    # A partition of the index space plus one client covering all of it.
    g = torch.Generator().manual_seed(3)
    outs = _outs(SIZES, g)
    idx, val = _clients(_numel(SIZES), 4, [torch.float32], g, kinds=["part", "part", "part", "full"])
    assert torch.equal(torch.sort(torch.cat(idx[:3])).values.cpu(), torch.arange(_numel(SIZES)))
    _check(outs, idx, val, _weights(4, g))


def test_single_tensor_out():
    g = torch.Generator().manual_seed(4)
    outs = _outs([(37, 19)], g)
    idx, val = _clients(37 * 19, 5, [torch.bfloat16, torch.float32], g)
    _check(outs, idx, val, _weights(5, g))


@pytest.mark.parametrize("chunk,block", [(1, 1), (7, 4), (64, 16)])
@pytest.mark.parametrize("validate", [True, False])
def test_many_programs(monkeypatch, chunk, block, validate):
    # Tiny chunks (many programs, chunks cut at every tensor's end, windows of one entry) and
    # short entry blocks (many inner-loop trips, bounds falling mid-block): same bits.
    monkeypatch.setattr(tka, "_chunk_size", lambda numel, device: chunk)
    monkeypatch.setattr(tka, "_entry_block", lambda total, n, chunks: block)
    monkeypatch.setattr(tka, "_validate_block", lambda: 8)
    built = []
    real = tka._Chunks

    class Spy(real):
        def __init__(self, *a):
            super().__init__(*a)
            built.append(self.n)

    monkeypatch.setattr(tka, "_Chunks", Spy)
    tka._CHUNKS.clear()
    g = torch.Generator().manual_seed(5)
    outs = _outs(SMALL, g)
    idx, val = _clients(_numel(SMALL), 7, [torch.float32, torch.bfloat16], g)
    _check(outs, idx, val, _weights(7, g), validate)
    assert built == [sum(-(-torch.Size(s).numel() // chunk) for s in SMALL)]
    tka._CHUNKS.clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_denormals_survive(dtype):
    # Subnormal values and products that underflow to subnormals, into zeros: nothing may be
    # flushed (the interpreter's bf16 -> fp32 conversion would flush; the kernel widens bf16
    # by bits).
    tiny = torch.tensor([3e-39, -1e-40, 1e-45, 1e-38, -2e-38, 5.0], dtype=torch.float32).to(dtype)
    outs = [torch.zeros(4, device=DEVICE), torch.zeros(6, device=DEVICE)]
    idx = [torch.tensor([0, 2, 3, 5, 7, 9], device=DEVICE), torch.tensor([1, 2, 4, 6, 8, 9], device=DEVICE)]
    val = [tiny.to(DEVICE), tiny.flip(0).to(DEVICE)]
    got = _check(outs, idx, val, torch.tensor([0.75, 0.01]))
    b = _bits(got)
    assert bool((((b & 0x7F800000) == 0) & ((b & 0x7FFFFF) != 0)).any())  # subnormal results


def test_fold_one_by_one_equals_one_call():
    # The documented order makes folding clients call by call give the bits of one call.
    g = torch.Generator().manual_seed(6)
    outs = _outs(SIZES, g)
    idx, val = _clients(_numel(SIZES), 5, [torch.float16], g)
    w = _weights(5, g)
    once = _check(outs, idx, val, w)
    folded = [o.clone() for o in outs]
    for i in range(5):
        tka.sparse_aggregate_(folded, idx[i:i + 1], val[i:i + 1], w[i:i + 1])
    assert torch.equal(_bits(folded), _bits(once))


@pytest.mark.parametrize("validate", [True, False])
def test_empty_inputs(validate):
    g = torch.Generator().manual_seed(7)
    outs = _outs(SIZES, g)
    before = _bits(outs)
    # zero clients
    tka.sparse_aggregate_(outs, [], [], torch.zeros(0), validate)
    # only empty clients
    e_i, e_v = torch.zeros(0, dtype=torch.int64, device=DEVICE), torch.zeros(0, device=DEVICE)
    tka.sparse_aggregate_(outs, [e_i, e_i], [e_v, e_v.half()], torch.ones(2), validate)
    assert torch.equal(_bits(outs), before)
    # zero numel: no tensors, or only a zero-size one
    tka.sparse_aggregate_([], [e_i], [e_v], torch.ones(1), validate)
    z = torch.zeros(0, device=DEVICE)
    tka.sparse_aggregate_([z], [e_i], [e_v], torch.ones(1), validate)
    # ... where any index is out of range (checked when validating, else nothing to write)
    one_i, one_v = torch.zeros(1, dtype=torch.int64, device=DEVICE), torch.ones(1, device=DEVICE)
    if validate:
        with pytest.raises(ValueError, match=r"client 0: index 0 at position 0 is out of range \[0, 0\)"):
            tka.sparse_aggregate_([z], [one_i], [one_v], torch.ones(1), validate)
    else:
        tka.sparse_aggregate_([z], [one_i], [one_v], torch.ones(1), validate)
    # a zero-size first tensor in front of the data
    outs = [torch.zeros(0, device=DEVICE)] + _outs([(11,)], g)
    _check(outs, [torch.tensor([0, 10], device=DEVICE)], [torch.ones(2, device=DEVICE)], torch.tensor([0.3]), validate)


def test_weights_dtype_and_device():
    # weights are rounded to float32 first (the reference's float32(weights[i])), and may
    # live on the CPU or on the output's device.
    g = torch.Generator().manual_seed(8)
    outs = _outs(SIZES, g)
    idx, val = _clients(_numel(SIZES), 3, [torch.float32], g)
    w64 = torch.rand(3, generator=g, dtype=torch.float64) / 3
    exp = _check(outs, idx, val, w64.float())
    for w in (w64, w64.to(DEVICE), w64.float().to(DEVICE)):
        got = [o.clone() for o in outs]
        tka.sparse_aggregate_(got, idx, val, w)
        assert torch.equal(_bits(got), _bits(exp))


def test_indices_on_another_device_and_strided():
    # Index / value tensors are moved to out's device and made contiguous by the launcher.
    g = torch.Generator().manual_seed(9)
    outs = _outs(SIZES, g)
    n = _numel(SIZES)
    idx = torch.arange(0, n, 2)
    val = torch.randn(2 * idx.numel(), generator=g)[::2]
    assert not val.is_contiguous()
    _check(outs, [idx.cpu()], [val.to(DEVICE)], torch.tensor([0.7]))


# --------------------------------------------------------------------------- validation
def _bad_case(case, numel, g):
    """Three clients of 40 sorted entries each; client 1 (and 2 in 'lowest_client') made bad.
    Returns (indices, values, message regex)."""
    idx = [torch.sort(torch.randperm(numel, generator=g)[:40]).values for _ in range(3)]
    val = [torch.randn(40, generator=g) for _ in range(3)]
    if case == "too_large":
        idx[1][-1] = numel + 3
        msg = rf"client 1: index {numel + 3} at position 39 is out of range \[0, {numel}\)"
    elif case == "negative":
        idx[1][0] = -1
        msg = rf"client 1: index -1 at position 0 is out of range \[0, {numel}\)"
    elif case == "unsorted":
        idx[1][[20, 21]] = idx[1][[21, 20]]
        msg = r"client 1: indices must be sorted ascending and unique \(position 21\)"
    elif case == "duplicate":
        idx[1][30] = idx[1][29]
        msg = r"client 1: indices must be sorted ascending and unique \(position 30\)"
    elif case == "nan":
        val[1][17] = float("nan")
        msg = r"client 1: non-finite value at position 17"
    elif case == "inf_half":
        val[1] = val[1].half()
        val[1][33] = float("-inf")
        msg = r"client 1: non-finite value at position 33"
    elif case == "fp64_overflow":
        # finite in float64, inf once rounded to float32 (the C++ check is on float32(v)); the
        # message tells it from a NaN / inf
        val[1] = val[1].double()
        val[1][5] = 1e300
        msg = r"client 1: value 1e\+300 at position 5 does not fit float32 \(the accumulator\)"
    elif case == "first_position_wins":
        val[1][3] = float("inf")
        idx[1][-1] = numel
        msg = r"client 1: non-finite value at position 3"
    elif case == "range_before_value":
        val[1][12] = float("nan")
        idx[1][12] = numel + 100
        msg = rf"client 1: index {numel + 100} at position 12 is out of range"
    elif case == "lowest_client":
        idx[2][0] = -5
        val[1][25] = float("nan")
        msg = r"client 1: non-finite value at position 25"
    else:
        raise AssertionError(case)
    return [i.to(DEVICE) for i in idx], [v.to(DEVICE) for v in val], "sparse_aggregate: " + msg


BAD_CASES = ["too_large", "negative", "unsorted", "duplicate", "nan", "inf_half", "fp64_overflow",
             "first_position_wins", "range_before_value", "lowest_client"]


@pytest.mark.parametrize("case", BAD_CASES)
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # fp64 -> fp32 inf
def test_validation_errors(case):
    g = torch.Generator().manual_seed(10)
    outs = _outs(SIZES, g)
    before = _bits(outs)
    idx, val, msg = _bad_case(case, _numel(SIZES), g)
    with pytest.raises(ValueError, match=msg):
        tka.sparse_aggregate_(outs, idx, val, torch.ones(3))
    assert torch.equal(_bits(outs), before)  # nothing written


@pytest.mark.parametrize("case", ["too_large", "duplicate", "nan", "first_position_wins"])
def test_validation_errors_small_blocks(monkeypatch, case):
    # The first bad position must win across validation blocks (8 entries each here).
    monkeypatch.setattr(tka, "_validate_block", lambda: 8)
    test_validation_errors(case)


def test_argument_errors():
    g = torch.Generator().manual_seed(11)
    outs = _outs(SIZES, g)
    before = _bits(outs)
    i1, v1 = torch.tensor([1, 5], device=DEVICE), torch.ones(2, device=DEVICE)
    w1 = torch.ones(1)
    cases = [
        (ValueError, r"1 index tensors but 2 value tensors", (outs, [i1], [v1, v1], w1)),
        (ValueError, r"weights must have one entry per client \(1\), got shape \[2\]", (outs, [i1], [v1], torch.ones(2))),
        (ValueError, r"weights must have one entry per client \(1\), got shape \[1, 1\]", (outs, [i1], [v1], torch.ones(1, 1))),
        (TypeError, r"out\[1\] must be float32", (outs[:1] + [torch.zeros(3, dtype=torch.float64, device=DEVICE)], [i1], [v1], w1)),
        (ValueError, r"out\[0\] must be contiguous", ([outs[0].t()], [i1], [v1], w1)),
        (ValueError, r"client 0: indices must be a 1-D int64 tensor", (outs, [i1.int()], [v1], w1)),
        (ValueError, r"client 0: indices must be a 1-D int64 tensor", (outs, [i1[None]], [v1], w1)),
        (ValueError, r"client 0: values must be 1-D with as many entries as indices", (outs, [i1], [v1[:1]], w1)),
        (ValueError, r"client 1: weight is not finite", (outs, [i1, i1], [v1, v1], torch.tensor([1.0, float("nan")]))),
        (ValueError, r"client 0: weight is not finite", (outs, [i1], [v1], torch.tensor([1e300], dtype=torch.float64))),
        (TypeError, r"values must be floating point", (outs, [i1], [v1.int()], w1)),
    ]
    for validate in (True, False):
        for exc, msg, args in cases:
            with pytest.raises(exc, match="sparse_aggregate: " + msg):
                tka.sparse_aggregate_(*args, validate)
    assert torch.equal(_bits(outs), before)


# --------------------------------------------------------------------------- validate=False safety
def _guarded(sizes, guard=16):
    """out tensors as views of one buffer, each preceded and followed by a guard of 7.0s that
    a stray write would change."""
    total = _numel(sizes) + guard * (len(sizes) + 1)
    buf = torch.full((total,), 7.0, device=DEVICE)
    outs, pos, guards = [], guard, [slice(0, guard)]
    for s in sizes:
        k = torch.Size(s).numel()
        outs.append(buf[pos:pos + k].view(s))
        guards.append(slice(pos + k, pos + k + guard))
        pos += k + guard
    return buf, outs, guards


UNCHECKED = ["too_large", "negative", "unsorted", "duplicate", "spike", "lowest_client_index"]


@pytest.mark.parametrize("chunk", [None, 7])
@pytest.mark.parametrize("case", UNCHECKED)
def test_unvalidated_bad_indices_never_write_outside(monkeypatch, case, chunk):
    if chunk is not None:
        monkeypatch.setattr(tka, "_chunk_size", lambda numel, device: chunk)
        monkeypatch.setattr(tka, "_entry_block", lambda total, n, chunks: 4)
    buf, outs, guards = _guarded(SMALL)
    numel = _numel(SMALL)
    idx = [torch.arange(0, numel, 3), torch.arange(1, numel, 2), torch.arange(0, numel, 5)]
    bad = 1
    if case == "too_large":
        idx[1][-1] = numel + 2           # lands in a guard if written
    elif case == "negative":
        idx[1][0] = -3
    elif case == "unsorted":
        idx[1] = idx[1].flip(0)
    elif case == "duplicate":
        idx[1][10] = idx[1][9]
    elif case == "spike":
        # A valid flat index (in the (40,) tensor) amid the first tensor's entries: the binary
        # search puts it in a first-tensor chunk's window, where applying it would write
        # past that tensor's end, into the guard.
        idx[1][10] = _numel(SMALL[:1]) + 3
    else:  # the lowest bad client is reported
        idx[2][-1] = numel + 40
        idx[1][0] = -1
    val = [torch.ones(i.numel(), device=DEVICE) for i in idx]
    with pytest.raises(ValueError, match=rf"sparse_aggregate: client {bad}: indices are unsorted or out of range"):
        tka.sparse_aggregate_(outs, [i.to(DEVICE) for i in idx], val, torch.ones(3), False)
    for s in guards:
        assert bool((buf[s] == 7.0).all())
    tka._CHUNKS.clear()


# --------------------------------------------------------------------------- overflow
# fastlora.sparse_aggregate checks overflow once, in the wrapper, for every kernel: the cases of
# tests/test_aggregate.py (C++ and reference there) through this kernel (under the interpreter
# the wrapper's op call is pointed at it; on a GPU the op dispatches to it by itself).
import fastlora  # noqa: E402
from fastlora.ops import aggregate as agg_ops  # noqa: E402
from test_aggregate import OVF_LAYOUT, check_overflow_case, overflow_case_params, overflow_cases, ovf_out  # noqa: E402


@pytest.fixture
def triton_wrapper(monkeypatch):
    calls = []
    if DEVICE == "cpu":
        def kernel(*a):
            calls.append(1)
            tka.sparse_aggregate_(*a)

        monkeypatch.setattr(agg_ops, "_kernel", kernel)
    return calls


@pytest.mark.parametrize("case, with_out", overflow_case_params())
# the interpreter computes with numpy, which warns where the kernel's float32 sums overflow
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_overflow_through_the_wrapper(triton_wrapper, case, with_out):
    check_overflow_case(overflow_cases(DEVICE)[case], with_out, DEVICE)
    assert triton_wrapper or DEVICE != "cpu"


def test_large_sums_that_stay_finite_through_the_wrapper(triton_wrapper):
    # past the bound (checked), no overflow: the reference's bits; inf / NaN already in out kept
    d = [torch.tensor([1, 2, 10], device=DEVICE), torch.tensor([1, 10], device=DEVICE)]
    v = [torch.tensor([3e38, 1.0, 2e38], device=DEVICE), torch.tensor([-3e38, 1e38], device=DEVICE)]
    w = torch.tensor([1.0, 1.0])
    out = ovf_out(DEVICE)
    out["b"][0], out["b"][1] = float("inf"), float("nan")
    exp = _expected([out["a"], out["b"]], d, v, w)
    from fastlora.sparse_delta import SparseDelta
    fastlora.sparse_aggregate([SparseDelta(i, x, OVF_LAYOUT) for i, x in zip(d, v)], w, out=out)
    assert torch.equal(_bits([out["a"], out["b"]]), _bits(exp))
