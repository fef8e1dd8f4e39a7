"""fastlora.topk_sparsify (C++ CPU kernel) against fastlora.reference.topk_sparsify."""
import numpy as np
import pytest
import torch

import fastlora
from fastlora import reference as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def run_both(deltas, k, residuals=None, value_dtype=torch.float32, approx=False):
    """Runs the kernel and the reference on copies; returns both results and residuals."""
    layout_is_dict = isinstance(deltas, dict)
    items = list(deltas.values()) if layout_is_dict else [deltas]
    res_k = res_r = None
    if residuals is not None:
        res_list = list(residuals.values()) if layout_is_dict else [residuals]
        res_r = [r.clone() for r in res_list]
        res_k = ({n: r.clone() for n, r in residuals.items()} if layout_is_dict else residuals.clone())
    sd = fastlora.topk_sparsify(deltas, k=k, residual=res_k, value_dtype=value_dtype, approx=approx)
    idx, vals, new_res = ref.topk_sparsify(items, res_r, k, value_dtype=value_dtype)
    out_res = (list(res_k.values()) if layout_is_dict else [res_k]) if res_k is not None else None
    return sd, (idx, vals, new_res), out_res


def assert_same_as_reference(sd, expected, out_res):
    idx, vals, new_res = expected
    assert sd.indices.dtype == torch.int64
    assert torch.equal(sd.indices, idx)
    assert sd.values.dtype == vals.dtype and torch.equal(sd.values, vals)
    if out_res is not None:
        for a, b in zip(out_res, new_res):
            assert torch.equal(a, b)


SIZES = [0, 1, 7, 1000, 100_003, (1 << 20) + 3]
DENSITIES = [1e-4, 1e-3, 1e-2, 0.1, 0.5]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("density", DENSITIES)
def test_matches_reference_fp32_with_residual(n, density):
    d = torch.randn(n)
    r = torch.randn(n) * 0.3
    k = fastlora.ops.sparsify.k_from_density(density, n)
    sd, expected, out_res = run_both(d, k, residuals=r)
    assert sd.nnz == k
    assert_same_as_reference(sd, expected, out_res)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_residual", [False, True])
def test_matches_reference_dtypes(dtype, value_dtype, with_residual):
    d = torch.randn(50_000).to(dtype)
    r = torch.randn(50_000) * 0.1 if with_residual else None
    sd, expected, out_res = run_both(d, 513, residuals=r, value_dtype=value_dtype)
    assert_same_as_reference(sd, expected, out_res)


@pytest.mark.parametrize("k", [0, 1, 9, 10, 11, 10 ** 6])
def test_k_edges(k):
    d = torch.randn(10)
    r = torch.randn(10)
    sd, expected, out_res = run_both(d, k, residuals=r)
    assert sd.nnz == min(k, 10)
    assert_same_as_reference(sd, expected, out_res)


ADVERSARIAL = {
    "all_equal": lambda n: torch.full((n,), 0.5),
    "all_zero": lambda n: torch.zeros(n),
    "signed_zeros": lambda n: torch.where(torch.rand(n) < 0.5, torch.tensor(-0.0), torch.tensor(0.0)),
    "many_ties": lambda n: torch.randint(-3, 4, (n,)).float(),
    "one_huge": lambda n: torch.randn(n).index_fill_(0, torch.tensor([n // 3]), 3e38),
    "denormals": lambda n: torch.randn(n) * 1e-40,
    "mixed_denormal_zero": lambda n: torch.where(torch.rand(n) < 0.9, torch.randn(n) * 1e-44, torch.tensor(0.0)),
    "sorted_ascending": lambda n: torch.linspace(-1, 1, n),
}


@pytest.mark.parametrize("kind", list(ADVERSARIAL))
@pytest.mark.parametrize("density", [1e-3, 0.1, 0.5])
def test_adversarial_inputs(kind, density):
    n = 200_001
    d = ADVERSARIAL[kind](n)
    k = fastlora.ops.sparsify.k_from_density(density, n)
    sd, expected, _ = run_both(d, k)
    assert sd.nnz == k
    assert_same_as_reference(sd, expected, None)


@pytest.mark.parametrize("with_residual", [False, True])
def test_many_ties_among_many_candidates(with_residual):
    # Over 65536 candidates the exact threshold comes from a histogram of their keys' top bits:
    # normal values rounded to bfloat16 (8 bits of mantissa) put thousands of exact ties in the
    # threshold's bin, of which the first in flat order are kept.
    n = (1 << 20) + 5
    d = torch.randn(n, generator=torch.Generator().manual_seed(5)).bfloat16().float()
    r = torch.zeros(n) if with_residual else None
    for k in (70_000, 100_003):
        sd, expected, out_res = run_both(d, k, residuals=r)
        assert sd.nnz == k
        assert_same_as_reference(sd, expected, out_res)


def test_exact_invariants_and_tie_break():
    d = torch.randint(-5, 6, (300_000,)).float()
    sd = fastlora.topk_sparsify(d, k=12_345)
    kept = torch.zeros(d.numel(), dtype=torch.bool)
    kept[sd.indices] = True
    assert sd.nnz == 12_345
    assert d[kept].abs().min() >= d[~kept].abs().max()
    # among entries at the threshold, the kept ones are the lowest flat indices
    t = d[kept].abs().min()
    at_t = (d.abs() == t).nonzero().flatten()
    kept_at_t = at_t[kept[at_t]]
    assert torch.equal(kept_at_t, at_t[:kept_at_t.numel()])


def test_dict_is_global_topk_in_insertion_order():
    delta = {"b.lora_A": torch.randn(8, 300), "a.lora_B": torch.randn(500, 8) * 3, "c": torch.randn(77)}
    residual = fastlora.new_residual(delta)
    for v in residual.values():
        v.normal_()
    before = {n: v.clone() for n, v in residual.items()}
    sd, expected, out_res = run_both(delta, 1000, residuals=residual)
    assert_same_as_reference(sd, expected, out_res)
    # most kept entries come from the larger-magnitude tensor: the budget is global
    dense = sd.to_dense()
    assert list(dense) == list(delta)
    assert (dense["a.lora_B"] != 0).sum() > (dense["b.lora_A"] != 0).sum()
    res = fastlora.new_residual(delta)
    for n in res:
        res[n].copy_(before[n])
    sd2 = fastlora.topk_sparsify(delta, k=1000, residual=res)
    dense2 = sd2.to_dense(torch.float32)
    for n in delta:  # mass conservation, bitwise, per tensor
        assert torch.equal(dense2[n] + res[n], delta[n] + before[n])


@pytest.mark.parametrize("value_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_mass_conservation_bitwise(value_dtype):
    d = torch.randn(100_000) * torch.logspace(-6, 3, 100_000)[torch.randperm(100_000)]
    r_old = torch.randn(100_000) * 1e-3
    r = r_old.clone()
    sd = fastlora.topk_sparsify(d, density=0.02, residual=r, value_dtype=value_dtype)
    assert sd.values.dtype == value_dtype
    assert torch.equal(sd.to_dense(torch.float32) + r, d + r_old)


def test_error_feedback_over_rounds_sends_everything_eventually():
    # With fp32 values nothing is ever rounded: 20 rounds at 5% density of zero new updates
    # drain the residual completely, each entry sent once, with its exact value.
    d = torch.randn(10_000)
    r = fastlora.new_residual(d)
    zero = torch.zeros(10_000)
    sent = fastlora.topk_sparsify(d, density=0.05, residual=r).to_dense()
    times_sent = (sent != 0).int()
    for _ in range(19):
        sd = fastlora.topk_sparsify(zero, density=0.05, residual=r)
        sent += sd.to_dense()
        times_sent[sd.indices] += 1
    assert torch.equal(r, torch.zeros_like(r))
    assert torch.equal(sent, d) and torch.equal(times_sent, torch.ones_like(times_sent))


def test_thread_count_independent():
    d = torch.randint(-50, 50, (1 << 20,)).float() / 7
    prev = torch.get_num_threads()
    try:
        results = []
        for t in (1, 2):
            torch.set_num_threads(t)
            for approx in (False, True):
                sd = fastlora.topk_sparsify(d, density=0.01, approx=approx)
                results.append((t, approx, sd.indices, sd.values))
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(results[0][2], results[2][2]) and torch.equal(results[0][3], results[2][3])
    assert torch.equal(results[1][2], results[3][2])


@pytest.mark.parametrize("density", [1e-3, 1e-2, 0.1])
def test_approx_count_within_5_percent(density):
    for dist in (torch.randn, torch.rand, lambda n: torch.randn(n) ** 3):
        d = dist(1 << 20)
        k = fastlora.ops.sparsify.k_from_density(density, d.numel())
        sd = fastlora.topk_sparsify(d, k=k, approx=True)
        assert abs(sd.nnz - k) <= 0.05 * k + 1
        kept = torch.zeros(d.numel(), dtype=torch.bool)
        kept[sd.indices] = True
        assert d[kept].abs().min() >= d[~kept].abs().max()  # still a threshold cut
        assert torch.equal(sd.values, d[sd.indices])


def test_approx_with_residual_conserves_mass():
    d, r_old = torch.randn(300_000), torch.randn(300_000)
    r = r_old.clone()
    sd = fastlora.topk_sparsify(d, density=0.01, residual=r, approx=True)
    assert torch.equal(sd.to_dense() + r, d + r_old)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["delta", "residual"])
def test_nonfinite_raises_and_loses_nothing(bad, where):
    delta = {"x": torch.randn(70_000), "y.lora_A": torch.randn(40_000)}
    residual = fastlora.new_residual(delta)
    (delta if where == "delta" else residual)["y.lora_A"][12_345] = bad
    before = {n: r.clone() for n, r in residual.items()}
    for approx in (False, True):
        for k in (0, 50, 110_000):
            with pytest.raises(ValueError, match=rf"non-finite value in {where}\['y.lora_A'\]"):
                fastlora.topk_sparsify(delta, k=k, residual=residual, approx=approx)
            for n in residual:
                assert torch.equal(residual[n], before[n], ) or torch.equal(
                    residual[n].nan_to_num(), before[n].nan_to_num())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("with_residual", [False, True])
def test_nonfinite_position_in_a_converted_delta(dtype, with_residual):
    # Deltas that are not float32 are scanned a block of a few thousand values at a time: the
    # first non-finite value is reported at its own position when it sits in the second work
    # item, past its first blocks, with a later one that must not be the one reported.
    delta = {"x": torch.randn(5), "y": torch.randn(70_000).to(dtype)}
    delta["y"][46_149] = float("nan")
    delta["y"][60_000] = float("inf")
    residual = fastlora.new_residual(delta) if with_residual else None
    for k in (0, 10, 70_005):
        with pytest.raises(ValueError, match=r"non-finite value in delta\['y'\] at flat position 46149$"):
            fastlora.topk_sparsify(delta, k=k, residual=residual)


def test_first_overflowing_value_in_flat_order_is_reported():
    # The kept values are rounded to the travel dtype by the threads in parallel, in chunks of
    # the selection: two overflowing values in different chunks, the first in flat order named.
    d = torch.randn(200_000)
    d[70_000], d[150_000] = 9e4, 8e4
    r = torch.zeros(200_000)
    for k in (2, 100_000):
        with pytest.raises(ValueError, match=r"kept value 90000.* \(flat index 70000\) overflows torch.float16"):
            fastlora.topk_sparsify(d, k=k, residual=r, value_dtype=torch.float16)
        assert torch.equal(r, torch.zeros(200_000))


@pytest.mark.parametrize("value_dtype, big", [(torch.float16, 7e4), (torch.bfloat16, 3.4e38)])
@pytest.mark.parametrize("kernel", ["cpu", "reference"])
def test_value_overflowing_travel_dtype_raises_and_changes_nothing(value_dtype, big, kernel):
    """A kept value the travel dtype cannot hold would travel as inf and poison the residual with
    -inf for every later round: refused before the residual is written."""
    delta = torch.tensor([big, 1.0, 2.0, 3.0])
    residual = torch.zeros(4)
    if kernel == "cpu":
        call = lambda: fastlora.topk_sparsify(delta, residual=residual, k=2, value_dtype=value_dtype)  # noqa: E731
    else:
        call = lambda: ref.topk_sparsify([delta], [residual], 2, False, value_dtype)  # noqa: E731
    with pytest.raises(ValueError, match=rf"overflows {value_dtype}.*nothing was changed"):
        call()
    assert torch.equal(residual, torch.zeros(4))
    # what fits still goes: the largest finite value of the dtype, and float32 values always
    ok = torch.tensor([torch.finfo(value_dtype).max, 1.0, 2.0, 3.0])
    sd = fastlora.topk_sparsify(ok, residual=residual, k=2, value_dtype=value_dtype)
    assert torch.isfinite(sd.values).all() and torch.isfinite(residual).all()
    sd = fastlora.topk_sparsify(delta, residual=torch.zeros(4), k=2)
    assert sd.values.dtype == torch.float32 and float(sd.values.max()) == float(torch.tensor(big))


def test_residual_of_the_wrong_kind_is_a_type_error():
    with pytest.raises(TypeError, match="residual must be of the same kind as delta .* got list"):
        fastlora.topk_sparsify({"a": torch.randn(4)}, k=1, residual=[torch.zeros(4)])
    with pytest.raises(TypeError, match="residual must be of the same kind as delta .* got dict"):
        fastlora.topk_sparsify(torch.randn(4), k=1, residual={"a": torch.zeros(4)})


def test_parameters_give_no_autograd_history():
    p = torch.nn.Parameter(torch.randn(100, 10))
    sd = fastlora.topk_sparsify({"w": p}, k=10)
    assert not sd.values.requires_grad and sd.values.grad_fn is None


def test_noncontiguous_delta_uses_logical_row_major_order():
    base = torch.randn(300, 200)
    d = base.t()  # (200, 300) view
    sd = fastlora.topk_sparsify(d, k=500)
    idx, vals, _ = ref.topk_sparsify([d.contiguous()], None, 500)
    assert torch.equal(sd.indices, idx) and torch.equal(sd.values, vals)
    assert torch.equal(sd.to_dense()[sd.to_dense() != 0], d[sd.to_dense() != 0])


class TestErrors:
    def test_k_and_density(self):
        d = torch.randn(10)
        with pytest.raises(ValueError, match="exactly one"):
            fastlora.topk_sparsify(d, k=1, density=0.1)
        with pytest.raises(ValueError, match="exactly one"):
            fastlora.topk_sparsify(d)
        with pytest.raises(ValueError, match="density must be in"):
            fastlora.topk_sparsify(d, density=1.5)
        with pytest.raises(ValueError, match="k must be >= 0"):
            fastlora.topk_sparsify(d, k=-1)
        with pytest.raises(TypeError, match="k must be an int"):
            fastlora.topk_sparsify(d, k=2.5)

    def test_density_rounding(self):
        assert fastlora.topk_sparsify(torch.randn(10), density=0.25).nnz == 3  # floor(2.5 + 0.5)
        assert fastlora.topk_sparsify(torch.randn(10), density=0.24).nnz == 2

    def test_bad_residuals(self):
        d = {"a": torch.randn(4, 4), "b": torch.randn(3)}
        with pytest.raises(TypeError, match=r"residual\['a'\] must be float32"):
            fastlora.topk_sparsify(d, k=1, residual={"a": torch.zeros(4, 4, dtype=torch.float64), "b": torch.zeros(3)})
        with pytest.raises(ValueError, match=r"residual\['b'\] has shape"):
            fastlora.topk_sparsify(d, k=1, residual={"a": torch.zeros(4, 4), "b": torch.zeros(4)})
        with pytest.raises(ValueError, match="missing"):
            fastlora.topk_sparsify(d, k=1, residual={"a": torch.zeros(4, 4)})
        with pytest.raises(TypeError, match="same kind"):
            fastlora.topk_sparsify(d, k=1, residual=torch.zeros(19))
        with pytest.raises(ValueError, match="contiguous"):
            fastlora.topk_sparsify(torch.randn(4, 4), k=1, residual=torch.zeros(4, 4).t())

    def test_bad_dtypes(self):
        with pytest.raises(TypeError, match="unsupported dtype torch.int64"):
            fastlora.topk_sparsify(torch.arange(10), k=1)
        with pytest.raises(TypeError, match="value_dtype"):
            fastlora.topk_sparsify(torch.randn(10), k=1, value_dtype=torch.int8)


def test_opcheck():
    d = [torch.randn(50), torch.randn(7, 3)]
    r = [torch.randn(50), torch.randn(7, 3)]
    torch.library.opcheck(torch.ops.fastlora.topk_sparsify.default, (d, r, 9, False, torch.float16))
    torch.library.opcheck(torch.ops.fastlora.topk_sparsify.default, (d, [], 9, False, torch.float32))
    torch.library.opcheck(torch.ops.fastlora.topk_sparsify.default, (d, r, 9, True, torch.float32),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_torch_compile_fullgraph():
    def step(d, r):
        idx, vals = torch.ops.fastlora.topk_sparsify([d], [r], 100, False, torch.float32)
        return idx, vals * 2

    d = torch.randn(5000)
    r1, r2 = torch.randn(5000), None
    r2 = r1.clone()
    idx_c, vals_c = torch.compile(step, fullgraph=True, backend="aot_eager")(d, r1)
    idx_e, vals_e = step(d, r2)
    assert torch.equal(idx_c, idx_e) and torch.equal(vals_c, vals_e) and torch.equal(r1, r2)


# --- numpy in, and new_residual agreeing with topk_sparsify ------------------------------------

class TestNumpy:
    def _forms(self, a):
        ro = a.copy()
        ro.flags.writeable = False
        return {"plain": a, "read-only": ro, "big-endian": a.astype(a.dtype.newbyteorder(">")),
                "fortran": np.asfortranarray(a), "negative strides": a[::-1, ::-1]}

    @pytest.mark.parametrize("np_dtype", [np.float16, np.float32, np.float64], ids=str)
    def test_numpy_delta_same_result_as_tensor(self, np_dtype):
        import warnings

        a = np.random.default_rng(0).standard_normal((30, 21)).astype(np_dtype)
        for name, x in self._forms(a).items():
            snapshot = x.copy()
            t = torch.from_numpy(np.ascontiguousarray(x.astype(x.dtype.newbyteorder("="))))
            res_t, res_n = fastlora.new_residual(t), fastlora.new_residual(x)
            assert isinstance(res_n, np.ndarray) and res_n.dtype == np.float32 and res_n.shape == x.shape
            res_n += 0.01
            res_t += 0.01
            with warnings.catch_warnings():
                warnings.simplefilter("error")       # no "non-writable NumPy array" warning: copied
                sd = fastlora.topk_sparsify(x, k=50, residual=res_n, value_dtype=torch.float16)
            ref = fastlora.topk_sparsify(t, k=50, residual=res_t, value_dtype=torch.float16)
            assert torch.equal(sd.indices, ref.indices) and torch.equal(sd.values, ref.values), name
            assert np.array_equal(res_n, res_t.numpy()), name     # the numpy residual, updated in place
            assert np.array_equal(x, snapshot), name              # the delta untouched

    def test_dict_of_numpy_and_tensors(self):
        rng = np.random.default_rng(1)
        d = {"a": rng.standard_normal((5, 6)).astype(np.float32), "b": torch.randn(7)}
        res = fastlora.new_residual(d)            # has numpy: numpy out (as_numpy=None)
        assert all(isinstance(r, np.ndarray) for r in res.values())
        assert all(isinstance(r, torch.Tensor) for r in fastlora.new_residual(d, as_numpy=False).values())
        assert isinstance(fastlora.new_residual(torch.zeros(3), as_numpy=True), np.ndarray)
        sd = fastlora.topk_sparsify(d, k=9, residual=res)
        dense = sd.to_dense(torch.float32, as_numpy=True)
        for n in d:
            assert isinstance(dense[n], np.ndarray)
            assert np.array_equal(dense[n] + res[n], np.asarray(d[n], dtype=np.float32))

    def test_inplace_residual_must_be_writable_native_float32(self):
        d = np.ones((4, 4), dtype=np.float32)
        ro = np.zeros((4, 4), dtype=np.float32)
        ro.flags.writeable = False
        with pytest.raises(ValueError, match="residual is a read-only numpy array"):
            fastlora.topk_sparsify(d, k=1, residual=ro)
        assert not ro.any()
        with pytest.raises(ValueError, match="residual is a numpy array in non-native byte order"):
            fastlora.topk_sparsify(d, k=1, residual=np.zeros((4, 4), dtype=">f4"))
        with pytest.raises(TypeError, match="residual must be float32"):
            fastlora.topk_sparsify(d, k=1, residual=np.zeros((4, 4), dtype=np.float64))
        with pytest.raises(ValueError, match="contiguous"):
            fastlora.topk_sparsify(d, k=1, residual=np.zeros((4, 4), dtype=np.float32).T)
        with pytest.raises(ValueError, match=r"residual\['a'\] is a read-only"):
            fastlora.topk_sparsify({"a": d}, k=1, residual={"a": ro})

    def test_new_residual_and_topk_reject_the_same_dtypes(self):
        for bad in (torch.arange(10), np.arange(10), torch.zeros(3, dtype=torch.bool), np.zeros(3, dtype=np.int32)):
            msgs = []
            for fn in (lambda x: fastlora.new_residual(x), lambda x: fastlora.topk_sparsify(x, k=1)):
                with pytest.raises(TypeError, match="unsupported dtype .*expected a floating-point") as e:
                    fn(bad)
                msgs.append(str(e.value).split(": ", 1)[1])
            assert msgs[0] == msgs[1]
        with pytest.raises(TypeError, match=r"new_residual: delta\['x'\] has unsupported dtype torch.int64"):
            fastlora.new_residual({"x": torch.arange(3), "y": torch.zeros(2)})
        with pytest.raises(TypeError, match=r"delta\['y'\] is a list"):
            fastlora.new_residual({"y": [1.0]})
        with pytest.raises(TypeError, match="as_numpy"):
            fastlora.new_residual(torch.zeros(2), as_numpy="yes")
