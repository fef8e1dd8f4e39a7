"""fastlora.sparse_aggregate (C++ CPU kernel) against densify-and-sum in float64 and against
fastlora.reference.sparse_aggregate_ (bitwise)."""
import numpy as np
import pytest
import torch

import fastlora
from fastlora import codec
from fastlora import reference as ref
from fastlora.sparse_delta import Layout, SparseDelta

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def random_delta(layout, nnz, dtype=torch.float32, gen=None, support=None):
    n = layout.numel
    idx = support if support is not None else torch.randperm(n, generator=gen)[:nnz]
    idx = torch.sort(idx).values
    return SparseDelta(idx, torch.randn(idx.numel(), generator=gen).to(dtype), layout)


def dense64(sd):
    out = torch.zeros(sd.numel, dtype=torch.float64)
    out[sd.indices] = sd.values.double()
    return out


def flat(x):
    if isinstance(x, dict):
        return torch.cat([v.reshape(-1) for v in x.values()])
    return x.reshape(-1)


@pytest.mark.parametrize("n_clients", [1, 2, 7, 64, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_densify_and_sum(n_clients, dtype):
    g = torch.Generator().manual_seed(n_clients)
    layout = Layout.of({"a": torch.zeros(300, 7), "b": torch.zeros(1000), "c": torch.zeros(0), "d": torch.zeros(5)})
    deltas = []
    for i in range(n_clients):
        kind = i % 4
        if kind == 0:
            deltas.append(random_delta(layout, 0, dtype, g))                      # empty client
        elif kind == 1:
            deltas.append(random_delta(layout, layout.numel, dtype, g))           # full density
        else:
            deltas.append(random_delta(layout, 50 + 17 * i, dtype, g))            # overlapping supports
    w = torch.rand(n_clients, generator=g)
    out = fastlora.sparse_aggregate(deltas, w)
    assert list(out) == ["a", "b", "c", "d"] and out["a"].shape == (300, 7)
    truth = sum(w[i].double() * dense64(d) for i, d in enumerate(deltas))
    # bitwise equal to the reference's documented float32 order
    acc = [torch.zeros(s.shape) for s in layout.specs]
    ref.sparse_aggregate_(acc, [d.indices for d in deltas], [d.values for d in deltas], w)
    assert torch.equal(flat(out), torch.cat([a.reshape(-1) for a in acc]))
    # and close to the float64 truth: float32 accumulation error bound n * eps * sum |terms|
    bound = n_clients * torch.finfo(torch.float32).eps * sum(w[i].double() * dense64(d).abs() for i, d in enumerate(deltas))
    assert bool(((flat(out).double() - truth).abs() <= bound + 1e-30).all())


def test_disjoint_supports_are_exact():
    layout = Layout.of(torch.zeros(10_000))
    perm = torch.randperm(10_000)
    deltas = [SparseDelta(torch.sort(perm[i * 1000:(i + 1) * 1000]).values, torch.randn(1000), layout) for i in range(10)]
    out = fastlora.sparse_aggregate(deltas, [1.0] * 10)
    assert torch.equal(out, sum(d.to_dense() for d in deltas))


def test_default_weights_are_mean():
    layout = Layout.of(torch.zeros(100))
    deltas = [SparseDelta(torch.arange(100), torch.full((100,), float(i)), layout) for i in range(4)]
    assert torch.allclose(fastlora.sparse_aggregate(deltas), torch.full((100,), 1.5))


def test_streaming_into_fp32_out_is_bitwise_one_call():
    layout = Layout.of({"x": torch.zeros(5000), "y": torch.zeros(30, 30)})
    deltas = [random_delta(layout, 700) for _ in range(20)]
    w = torch.rand(20)
    base = {"x": torch.randn(5000), "y": torch.randn(30, 30)}
    one = {k: v.clone() for k, v in base.items()}
    fastlora.sparse_aggregate(deltas, w, out=one)
    streamed = {k: v.clone() for k, v in base.items()}
    for d, wi in zip(deltas, w):
        fastlora.sparse_aggregate([d], [wi], out=streamed)
    chunks = {k: v.clone() for k, v in base.items()}
    for s in range(0, 20, 6):
        fastlora.sparse_aggregate(deltas[s:s + 6], w[s:s + 6], out=chunks)
    for k in base:
        assert torch.equal(one[k], streamed[k]) and torch.equal(one[k], chunks[k])


def test_payloads_decoded_on_the_fly():
    from fastlora import codec
    layout = Layout.of({"A": torch.zeros(16, 64), "B": torch.zeros(64, 16)})
    deltas = [random_delta(layout, 100) for _ in range(40)]  # more than one decode group
    payloads = [codec.encode(d, values="fp32", layout="fingerprint") for d in deltas]
    w = torch.rand(40)
    from_bytes = fastlora.sparse_aggregate(payloads, w, layout=layout)
    direct = fastlora.sparse_aggregate(deltas, w)
    for k in direct:
        assert torch.equal(from_bytes[k], direct[k])
    with pytest.raises(ValueError, match="client 3: cannot decode"):
        fastlora.sparse_aggregate(payloads[:3] + [payloads[3][:-5]], layout=layout)


@pytest.mark.parametrize("bad", ["truncated payload", "other layout", "nan value", "topk without k",
                                 "density 2", "union int8"])
def test_out_untouched_when_any_client_or_argument_is_bad(bad):
    """All or nothing: a bad client after whole decode groups of good ones, or a bad sparse-mode
    argument, raises and leaves out bitwise as it was."""
    from fastlora import codec
    layout = Layout.of({"A": torch.zeros(16, 64), "B": torch.zeros(64, 16)})
    good = [codec.encode(random_delta(layout, 100), values="fp32", layout="fingerprint") for _ in range(17)]
    deltas, kw = list(good), {}
    if bad == "truncated payload":
        deltas.append(good[0][:-5])
    elif bad == "other layout":
        deltas.append(random_delta(Layout.of({"A": torch.zeros(16, 64)}), 10))
    elif bad == "nan value":
        sd = random_delta(layout, 100)
        deltas.append(SparseDelta(sd.indices, torch.full_like(sd.values, float("nan")), layout, validate=False))
    elif bad == "topk without k":
        kw = dict(sparse="topk")
    elif bad == "density 2":
        kw = dict(sparse="topk", density=2.0)
    else:
        kw = dict(sparse="union", value_dtype=torch.int8)
    out = {"A": torch.randn(16, 64), "B": torch.randn(64, 16)}
    before = {k: v.clone() for k, v in out.items()}
    with pytest.raises((ValueError, TypeError)):
        fastlora.sparse_aggregate(deltas, out=out, layout=layout, **kw)
    assert all(torch.equal(out[k], before[k]) for k in out)


def test_out_in_other_dtype_rounds_once():
    layout = Layout.of(torch.zeros(1000, dtype=torch.bfloat16))
    deltas = [random_delta(layout, 300, torch.bfloat16) for _ in range(8)]
    out = torch.randn(1000).bfloat16()
    expected = out.float().clone()
    ref.sparse_aggregate_([expected], [d.indices for d in deltas], [d.values for d in deltas], torch.full((8,), 0.125))
    fastlora.sparse_aggregate(deltas, out=out)
    assert torch.equal(out, expected.bfloat16())
    assert fastlora.sparse_aggregate(deltas).dtype == torch.bfloat16  # layout's dtype


def test_thread_count_independent():
    layout = Layout.of(torch.zeros(1 << 20))
    deltas = [random_delta(layout, 20_000) for _ in range(16)]
    w = torch.rand(16)
    prev = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(fastlora.sparse_aggregate(deltas, w))
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(outs[0], outs[1])


def test_sparse_download_modes():
    layout = Layout.of({"a": torch.zeros(2000), "b": torch.zeros(40, 50)})
    deltas = [random_delta(layout, 200) for _ in range(5)]
    w = torch.rand(5)
    dense = fastlora.sparse_aggregate(deltas, w)
    union = fastlora.sparse_aggregate(deltas, w, sparse="union")
    expected_support = torch.unique(torch.cat([d.indices for d in deltas]))
    assert torch.equal(union.indices, expected_support)
    for k in dense:
        assert torch.equal(union.to_dense()[k], dense[k])
    top = fastlora.sparse_aggregate(deltas, w, sparse="topk", k=100, value_dtype=torch.float16)
    assert top.nnz == 100 and top.values.dtype == torch.float16 and top.layout == layout
    flat_dense = flat(dense)
    assert torch.equal(top.indices, fastlora.topk_sparsify(flat_dense, k=100).indices)


class TestErrors:
    def setup_method(self):
        self.layout = Layout.of(torch.zeros(100))
        self.good = SparseDelta(torch.tensor([1, 5, 9]), torch.tensor([1.0, 2.0, 3.0]), self.layout)

    def bad(self, idx, val):
        return SparseDelta(torch.tensor(idx), torch.tensor(val), self.layout, validate=False)

    @pytest.mark.parametrize("idx, val, match", [
        ([1, 200], [1.0, 2.0], "client 1: index 200 at position 1 is out of range"),
        ([5, 3], [1.0, 2.0], "client 1: indices must be sorted"),
        ([3, 3], [1.0, 2.0], "client 1: indices must be sorted ascending and unique"),
        ([-1, 3], [1.0, 2.0], "client 1: index -1"),
        ([1, 3], [1.0, float("nan")], "client 1: non-finite value"),
        ([1, 3], [float("inf"), 1.0], "client 1: non-finite value"),
    ])
    def test_bad_client_names_index_and_leaves_out_untouched(self, idx, val, match):
        out = torch.randn(100)
        before = out.clone()
        with pytest.raises(ValueError, match=match):
            fastlora.sparse_aggregate([self.good, self.bad(idx, val)], out=out)
        assert torch.equal(out, before)

    def test_layout_mismatch(self):
        other = SparseDelta(torch.tensor([1]), torch.tensor([1.0]), Layout.of(torch.zeros(101)))
        with pytest.raises(ValueError, match="client 1: layout"):
            fastlora.sparse_aggregate([self.good, other])

    def test_weights(self):
        with pytest.raises(ValueError, match="3 weights for 2 clients"):
            fastlora.sparse_aggregate([self.good, self.good], [1, 2, 3])
        with pytest.raises(ValueError, match="client 0: weight is not finite"):
            fastlora.sparse_aggregate([self.good], [float("nan")])

    def test_out_shape(self):
        with pytest.raises(ValueError, match="has shape"):
            fastlora.sparse_aggregate([self.good], out=torch.zeros(99))

    def test_sparse_mode_args(self):
        with pytest.raises(ValueError, match="sparse must be"):
            fastlora.sparse_aggregate([self.good], sparse="dense")
        with pytest.raises(ValueError, match="only apply"):
            fastlora.sparse_aggregate([self.good], k=3)


def test_opcheck():
    out = [torch.randn(40), torch.randn(3, 4)]
    idx = [torch.tensor([0, 5, 41, 51]), torch.tensor([], dtype=torch.int64), torch.arange(52)]
    val = [torch.randn(4), torch.randn(0), torch.randn(52).half()]
    torch.library.opcheck(torch.ops.fastlora.sparse_aggregate_.default, (out, idx, val, torch.rand(3), True))
    torch.library.opcheck(torch.ops.fastlora.sparse_aggregate_.default, (out, idx, val, torch.rand(3), False))


def test_torch_compile_fullgraph():
    def server_step(acc, i0, v0, i1, v1, w):
        torch.ops.fastlora.sparse_aggregate_([acc], [i0, i1], [v0, v1], w)
        return acc * 0.5

    acc1, acc2 = torch.randn(1000), None
    acc2 = acc1.clone()
    args = (torch.tensor([3, 10, 999]), torch.randn(3), torch.arange(0, 1000, 7), torch.randn(143), torch.rand(2))
    r1 = torch.compile(server_step, fullgraph=True, backend="aot_eager")(acc1, *args)
    r2 = server_step(acc2, *args)
    assert torch.equal(r1, r2) and torch.equal(acc1, acc2)


# --- numpy: payloads, out, weights, results ------------------------------------------------------

def _payloads(layout, n=5, values="fp32"):
    from fastlora import codec
    g = torch.Generator().manual_seed(7)
    deltas = [random_delta(layout, 60, gen=g) for _ in range(n)]
    return deltas, [codec.encode(d, values=values, layout="fingerprint") for d in deltas]


def test_numpy_and_buffer_payloads_weights_and_as_numpy():
    layout = Layout.of({"A": torch.zeros(16, 24), "B": torch.zeros(24, 16)})
    _, payloads = _payloads(layout)
    w = [0.1, 0.2, 0.3, 0.15, 0.25]
    expected = fastlora.sparse_aggregate(payloads, w, layout=layout)
    strided = np.zeros(2 * len(payloads[4]), dtype=np.uint8)
    strided[1::2] = np.frombuffer(payloads[4], dtype=np.uint8)
    forms = [np.frombuffer(payloads[0], dtype=np.uint8), bytearray(payloads[1]), memoryview(payloads[2]),
             np.frombuffer(payloads[3], dtype=np.uint8).copy(), strided[1::2]]
    for weights in (w, np.array(w), np.array(w, dtype=">f8"), torch.tensor(w)):
        got = fastlora.sparse_aggregate(forms, weights, layout=layout)
        assert all(isinstance(v, torch.Tensor) for v in got.values())      # no dense input: tensors
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    as_np = fastlora.sparse_aggregate(forms, w, layout=layout, as_numpy=True)
    assert all(isinstance(v, np.ndarray) and np.array_equal(v, expected[k].numpy()) for k, v in as_np.items())
    with pytest.raises(TypeError, match="client 1: decode: data: .*1-D uint8"):
        fastlora.sparse_aggregate([forms[0], np.frombuffer(payloads[1], dtype=np.uint8).astype(np.uint16)], layout=layout)
    with pytest.raises(ValueError, match="as_numpy applies to a new dense result"):
        fastlora.sparse_aggregate(forms, w, layout=layout, out={k: torch.zeros_like(v) for k, v in expected.items()},
                                  as_numpy=True)


@pytest.mark.parametrize("np_dtype", [np.float32, np.float16, np.float64], ids=str)
def test_numpy_out_updated_in_place(np_dtype):
    layout = Layout.of({"A": torch.zeros(16, 24), "B": torch.zeros(24, 16)})
    deltas, payloads = _payloads(layout)
    rng = np.random.default_rng(0)
    base = {"A": rng.standard_normal((16, 24)).astype(np_dtype), "B": rng.standard_normal((24, 16)).astype(np_dtype)}
    out = {k: v.copy() for k, v in base.items()}
    ref_out = {k: torch.from_numpy(v.copy()) for k, v in base.items()}
    fastlora.sparse_aggregate(deltas, out=ref_out)
    for ds in (payloads, deltas):                                   # both the copy and the in-place path
        out = {k: v.copy() for k, v in base.items()}
        assert fastlora.sparse_aggregate(ds, out=out, layout=layout) is out
        assert all(isinstance(v, np.ndarray) and np.array_equal(v, ref_out[k].numpy()) for k, v in out.items())


def test_numpy_out_that_cannot_be_written_is_refused_untouched():
    layout = Layout.of({"A": torch.zeros(16, 24), "B": torch.zeros(24, 16)})
    _, payloads = _payloads(layout)
    ro = np.ones((16, 24), dtype=np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"out\['A'\] is a read-only numpy array"):
        fastlora.sparse_aggregate(payloads, out={"A": ro, "B": np.zeros((24, 16), np.float32)}, layout=layout)
    assert (ro == 1).all()
    with pytest.raises(ValueError, match=r"out\['B'\] is a numpy array in non-native byte order"):
        fastlora.sparse_aggregate(payloads, out={"A": np.zeros((16, 24), np.float32),
                                                 "B": np.zeros((24, 16), ">f4")}, layout=layout)
    with pytest.raises(TypeError, match=r"out\['B'\] is a numpy array of dtype int64"):
        fastlora.sparse_aggregate(payloads, out={"A": np.zeros((16, 24), np.float32),
                                                 "B": np.zeros((24, 16), np.int64)}, layout=layout)


def test_a_payloads_declared_layout_cannot_allocate_gigabytes():
    """Without layout=, the first payload's declared layout is untrusted: a 71-byte payload
    declaring 2**31 entries is refused before anything is allocated from it; with the layout
    given (trusted) or a larger max_numel, the caller decides."""
    from fastlora.ops.aggregate import UNTRUSTED_LAYOUT_MAX_NUMEL

    huge = Layout([("w", (2 ** 31,), torch.float32)], True)
    p = codec.encode(SparseDelta(torch.tensor([5]), torch.tensor([1.0]), huge), layout="full", values="fp32")
    assert len(p) < 100
    with pytest.raises(ValueError, match=f"max_numel={UNTRUSTED_LAYOUT_MAX_NUMEL}"):
        fastlora.sparse_aggregate([p])
    small = Layout([("w", (1000,), torch.float32)], True)
    q = codec.encode(SparseDelta(torch.tensor([5]), torch.tensor([1.0]), small), layout="full", values="fp32")
    assert fastlora.sparse_aggregate([q])["w"][5] == 1.0
    with pytest.raises(ValueError, match="max_numel=100"):
        fastlora.sparse_aggregate([q], max_numel=100)


# --- overflow: an error naming the client (or the output), never a silent inf -----------------
# Checked once in the wrapper (fastlora/ops/aggregate.py) for every kernel: these cases run on
# the C++ kernel and the reference here, on the Triton kernel in tests/test_aggregate_triton.py.

from fastlora.ops import aggregate as agg_ops  # noqa: E402

OVF_LAYOUT = Layout.of({"a": torch.zeros(4, 5), "b": torch.zeros(7)})
BIG = 3e38   # float32's largest finite is 3.4028e38


def _sd(idx, val, dtype=torch.float32, validate=True, device="cpu"):
    return SparseDelta(torch.tensor(idx, device=device), torch.tensor(val, dtype=dtype, device=device), OVF_LAYOUT,
                       validate=validate)


def ovf_out(device="cpu"):
    g = torch.Generator().manual_seed(11)
    return {"a": (torch.randn(4, 5, generator=g) * 100).to(device), "b": torch.randn(7, generator=g).to(device)}


def overflow_cases(device="cpu"):
    """id -> (deltas, weights, out or None (then a default out, or none), needs_out, match)."""
    good = _sd([0, 3, 21], [1.0, -2.0, 0.5], device=device)
    near_max = ovf_out(device)
    near_max["a"][0, 3] = 3.3e38
    payloads = [codec.encode(_sd([7, 9], [BIG if i in (0, 18) else 1.0, 2.0]), values="fp32", layout="fingerprint")
                for i in range(20)]
    return {
        "f64 beyond float32, validated": (
            [good, _sd([2, 5], [1.0, 1e300], torch.float64, device=device)], [0.5, 1e-300], None, False,
            r"client 1: value 1e\+300 at position 1 does not fit float32"),
        "f64 beyond float32, unvalidated": (
            [good, _sd([2, 5], [1e300, 1.0], torch.float64, validate=False, device=device)], [0.5, 0.5], None, False,
            r"client 1: value 1e\+300 at position 0 does not fit float32"),
        "nan unvalidated": (
            [good, _sd([2, 5], [1.0, float("nan")], validate=False, device=device)], [0.5, 0.5], None, False,
            r"client 1: non-finite value at position 1"),
        "weight x value": (
            [good, _sd([4, 20], [1.0, BIG], device=device)], [1.0, 10.0], None, False,
            r"client 1: the sum overflows float32 at flat index 20 \(tensor 'b', element 0\)"),
        "two clients add up": (
            [good, _sd([5], [BIG], device=device), _sd([5, 6], [BIG, BIG], device=device),
             _sd([5, 6], [BIG, BIG], device=device)], [1.0, 1.0, 1.0, 1.0], None, False,
            r"client 2: the sum overflows float32 at flat index 5 \(tensor 'a', element 5\)"),
        "negative": (
            [_sd([1], [-BIG], device=device), good, _sd([1], [-2e38], torch.bfloat16, device=device)], [1.0, 1.0, 1.0],
            None, False, r"client 2: the sum overflows float32 at flat index 1"),
        "out near the top": (
            [good, _sd([3], [1.0], device=device), _sd([3], [1e38], device=device)], [1.0, 1.0, 1.0], near_max, True,
            r"client 2: the sum overflows float32 at flat index 3"),
        "payloads, second decode group": (
            payloads, [1.0] * 20, None, False, r"client 18: the sum overflows float32 at flat index 7"),
    }


def overflow_case_params():
    """(case id, with_out) pairs: into an out and into a new result (unless the case needs out)."""
    return [(c, o) for c, case in overflow_cases().items() for o in (True, False) if o or not case[3]]


def check_overflow_case(case, with_out, device="cpu"):
    deltas, w, out0, needs_out, match = case
    out = ({k: v.clone() for k, v in (out0 if out0 is not None else ovf_out(device)).items()} if with_out else None)
    before = {k: v.clone() for k, v in out.items()} if out is not None else None
    with pytest.raises(ValueError, match=match):
        fastlora.sparse_aggregate(deltas, w, out=out, layout=OVF_LAYOUT)
    if out is not None:   # all or nothing, bit for bit
        assert all(torch.equal(out[k].view(torch.int32), before[k].view(torch.int32)) for k in out)


@pytest.fixture(params=["cpu", "reference"])
def backend(request, monkeypatch):
    """The wrapper over the C++ kernel, or over fastlora.reference (the kernel of other devices)."""
    if request.param == "reference":
        monkeypatch.setattr(agg_ops, "_kernel", ref.sparse_aggregate_)
    return request.param


@pytest.mark.parametrize("case, with_out", overflow_case_params())
def test_overflow_raises_naming_the_client(backend, case, with_out):
    check_overflow_case(overflow_cases()[case], with_out)


def test_large_values_that_do_not_overflow_are_summed(backend, monkeypatch):
    """Clients past the bound (|w * v| >= 2**103) whose sums stay finite, out entries that
    already were inf / NaN (kept, no error), a float64 value near float32's top that still
    fits: the result is the reference's, bit for bit."""
    deltas = [_sd([1, 2, 10], [BIG, 1.0, 2e38]), _sd([1, 10], [-BIG, 1e38]), _sd([2, 3], [1e300, 2.0], torch.float64),
              _sd([4], [3.4e38], torch.float64)]
    w = torch.tensor([1.0, 1.0, 1e-300, 1.0])   # 1e-300 is 0 in float32: 0 x float32(1e300) would be nan
    deltas[2] = _sd([2, 3], [1e30, 2.0], torch.float64)
    out = ovf_out()
    out["b"][0], out["b"][1] = float("inf"), float("nan")
    out["a"][0, 1] = -3.3e38
    expected = [out["a"].clone(), out["b"].clone()]
    ref.sparse_aggregate_(expected, [d.indices for d in deltas], [d.values for d in deltas], w)
    got = {k: v.clone() for k, v in out.items()}
    fastlora.sparse_aggregate(deltas, w, out=got)
    assert torch.equal(flat(got).view(torch.int32), torch.cat([e.reshape(-1) for e in expected]).view(torch.int32))
    assert torch.isinf(got["b"][0]) and torch.isnan(got["b"][1])


def test_in_place_path_kept_when_no_client_can_overflow(monkeypatch):
    """The bound keeps the fast path (the kernel adds straight into a float32 out) for every
    client below it; a client above it sends the sum to the working copy."""
    seen = []
    real = agg_ops._kernel

    def spy(acc, *a):
        seen.append(acc[0])
        return real(acc, *a)

    monkeypatch.setattr(agg_ops, "_kernel", spy)
    out = ovf_out()
    usual = [_sd([1, 2], [1e30, -1e30]), _sd([2, 3], [5.0, 6.0], torch.float64)]
    fastlora.sparse_aggregate(usual, [1.0, 1.0], out=out)
    assert seen[-1] is out["a"]
    fastlora.sparse_aggregate(usual + [_sd([4], [2e31])], [1.0, 1.0, 1.0], out=out)   # 2e31 > 2**103
    assert seen[-1] is not out["a"]
    fastlora.sparse_aggregate(usual + [_sd([4], [2e31])], [1.0, 1.0, 0.25], out=out)   # 5e30: below the bound
    assert seen[-1] is out["a"]


@pytest.mark.parametrize("case", ["fp16 out", "bf16 out", "fp16 layout", "f64 out beyond float32", "union fp16",
                                  "topk fp16", "topk bf16"])
def test_conversion_overflow_names_the_output(backend, case):
    """The float32 sum converted to a narrower output dtype: an entry that becomes inf is a
    ValueError naming the output, raised before anything is written (every entry of a dict
    out converted and checked first)."""
    d = _sd([2, 21], [1.0, 7e4])
    layout, out, kw = OVF_LAYOUT, None, {}
    if case == "fp16 out":
        out = {"a": torch.ones(4, 5), "b": torch.ones(7, dtype=torch.float16)}
        match = r"out\['b'\], element 1: the sum 70001 overflows float16 \(largest finite 65504\)"
    elif case == "bf16 out":
        out = {"a": torch.ones(4, 5, dtype=torch.bfloat16), "b": torch.full((7,), 3.3e38).bfloat16()}
        d = _sd([2, 21], [1.0, 1e37])   # bfloat16's largest finite is 3.3895e38
        match = r"out\['b'\], element 1: the sum .* overflows bfloat16"
    elif case == "fp16 layout":
        layout = Layout.of({"a": torch.zeros(4, 5), "b": torch.zeros(7, dtype=torch.float16)})
        d = SparseDelta(d.indices, d.values, layout)
        match = r"the result's tensor 'b' \(float16, the layout's dtype\), element 1: the sum 70000 overflows float16"
    elif case == "f64 out beyond float32":
        out = {"a": torch.ones(4, 5), "b": torch.ones(7, dtype=torch.float64)}
        out["b"][4] = 1e39
        match = r"out\['b'\] holds 1e\+39 at element 4, which does not fit float32"
    else:
        out = ovf_out()
        kw = dict(sparse=case.split()[0], value_dtype=torch.float16 if "fp16" in case else torch.bfloat16)
        if kw["sparse"] == "topk":
            kw["k"] = 3
        if "bf16" in case:
            d = _sd([2, 21], [1.0, 3.4e38])
            out["b"][0] = 1e37
        match = (rf"sparse='{kw['sparse']}': the aggregate at flat index 21 \(tensor 'b', element 1\): "
                 r"the sum .* overflows")
    before = {k: v.clone() for k, v in out.items()} if out is not None else None
    with pytest.raises(ValueError, match=match):
        fastlora.sparse_aggregate([d], [1.0], out=out, layout=layout, **kw)
    if out is not None:
        assert all(torch.equal(out[k], before[k]) for k in out)
