"""Triton top-k sparsification kernels (kernels/sparsify.py) vs fastlora.reference.

Run under the Triton interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1
before anything imports the kernels); FASTLORA_TEST_GPU=1 runs the same tests on "cuda".
Exact mode must match the reference bit for bit: indices, values (compared as bit patterns,
so that -0 != +0) and the updated residuals. Sizes stay at a few 4096-element blocks because
the interpreter costs milliseconds per program; the small-block and small-sample tests
monkeypatch the block size and the sample size to reach many blocks and a strided sample.
"""
import os

import pytest
import torch

from fastlora import reference as ref
from fastlora.kernels import sparsify as tks

# FASTLORA_TEST_GPU=1 runs the same tests on a real GPU instead of the interpreter.
DEVICE = "cuda" if os.environ.get("FASTLORA_TEST_GPU") else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t):
    """Bit patterns (so that -0 != +0 and NaN == NaN compare as they should)."""
    return t.contiguous().view(_INT_OF[t.element_size()])


def _same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _dev(t):
    return t.to(DEVICE)


@pytest.fixture
def paths(monkeypatch):
    """Records how each call compacted: "cand" (sampled low bound) or "all" (lo = 0)."""
    seen = []
    orig = tks._compact

    def spy(*args, **kw):
        seen.append("all" if kw.get("all_") else "cand")
        return orig(*args, **kw)

    monkeypatch.setattr(tks, "_compact", spy)
    return seen


def run_both(deltas, residuals, k, value_dtype=torch.float32):
    """Kernel (exact mode) and reference on copies of the residuals; asserts bitwise equality
    and returns the kernel's (indices, values, residuals)."""
    res_k = [r.clone() for r in residuals]
    res_r = [r.clone() for r in residuals]
    idx, vals = tks.topk_sparsify(deltas, res_k, k, False, value_dtype)
    e_idx, e_vals, e_res = ref.topk_sparsify(deltas, res_r, k, False, value_dtype)
    assert idx.dtype == torch.int64 and idx.device == e_idx.device
    assert torch.equal(idx, e_idx)
    assert vals.dtype == value_dtype and _same_bits(vals, e_vals)
    for a, b in zip(res_k, e_res):
        assert _same_bits(a, b)
    return idx, vals, res_k


def _ks(n):
    return sorted({0, min(1, n), n // 3, n})


# --------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_residual", [False, True])
def test_matches_reference_dtypes(dtype, value_dtype, with_residual):
    # Several tensors of different sizes and shapes (including empty and one element), one of
    # them spanning blocks with a partial last one.
    deltas = [_dev(torch.randn(30, 233).to(dtype)), _dev(torch.randn(0, 5).to(dtype)),
              _dev(torch.randn(1).to(dtype)), _dev(torch.randn(2000).to(dtype) * 3)]
    residuals = [_dev(torch.randn(d.shape) * 0.1) for d in deltas] if with_residual else []
    n = sum(d.numel() for d in deltas)
    for k in _ks(n):
        run_both(deltas, residuals, k, value_dtype)


def test_float64_and_mixed_dtypes(paths):
    # One list mixing every delta dtype: one launch per dtype group over the shared block
    # table. float64 rounds to float32 like torch's .float() (including into the denormals).
    torch.manual_seed(1)
    deltas = [_dev(torch.randn(3000).double() * 1e-3), _dev(torch.randn(17, 5).bfloat16()),
              _dev(torch.randn(4100)), _dev(torch.randn(9).half()),
              _dev(torch.randn(300).double() * 1e-39), _dev(torch.randn(5000).bfloat16())]
    residuals = [_dev(torch.randn(d.shape) * 1e-3) for d in deltas]
    n = sum(d.numel() for d in deltas)
    for k in (1, 37, n // 5, n - 1, n):
        run_both(deltas, residuals, k, torch.bfloat16)
        run_both(deltas, [], k)
    assert "cand" in paths


@pytest.mark.parametrize("sizes", [[], [0], [0, 0], [1], [1, 0, 1], [5000], [4096, 1, 4097]])
def test_sizes_and_k(sizes):
    deltas = [_dev(torch.randn(s)) for s in sizes]
    residuals = [_dev(torch.randn(s)) for s in sizes]
    n = sum(sizes)
    for k in sorted({0, min(1, n), n // 2, max(n - 1, 0), n}):
        run_both(deltas, residuals, k)
        run_both(deltas, [], k, torch.float16)


def test_empty_list_device_and_dtypes():
    idx, vals = tks.topk_sparsify([], [], 0, False, torch.bfloat16)
    assert idx.dtype == torch.int64 and vals.dtype == torch.bfloat16 and idx.numel() == 0


# --------------------------------------------------------------------------- blocks and sample
def test_small_blocks_and_strided_sample(monkeypatch, paths):
    # Many blocks per tensor (partial last blocks, blocks of one element) and a strided,
    # jittered sample (stride > 1): the sampled-candidates path must be exact too.
    monkeypatch.setattr(tks, "_block_size", lambda: 256)
    monkeypatch.setattr(tks, "SAMPLE_TARGET", 256)
    torch.manual_seed(2)
    deltas = [_dev(torch.randn(3000)), _dev(torch.randn(257).bfloat16()), _dev(torch.randn(1)),
              _dev(torch.randn(40, 50))]
    residuals = [_dev(torch.randn(d.shape) * 0.5) for d in deltas]
    n = sum(d.numel() for d in deltas)
    assert tks._sample_stride(n, tks._plan(deltas, residuals, 256, deltas[0].device).nb, 256) > 1
    for k in (1, 10, 100, n // 10):
        run_both(deltas, residuals, k, torch.float16)
    assert paths == ["cand"] * 4  # the sample bounded the k-th largest every time


def test_sample_path_is_taken(paths):
    # Default block size: 20k random values, k = 1% -> few candidates, no fallback.
    d = [_dev(torch.randn(20_000))]
    run_both(d, [_dev(torch.randn(20_000))], 200)
    assert paths == ["cand"]


@pytest.mark.parametrize("lo_key", [0x7F000000, 0x40000000])  # above everything / |v| >= 2
def test_sample_miss_falls_back(monkeypatch, paths, lo_key):
    # A sample that misled us: lo above the k-th largest key leaves fewer than k candidates;
    # the exact fallback (every element a candidate) must still give the reference's answer.
    orig = tks._sample_bounds

    def misled(*args, **kw):
        bounds, ok = orig(*args, **kw)
        assert ok
        return torch.full_like(bounds, lo_key), ok

    monkeypatch.setattr(tks, "_sample_bounds", misled)
    d = [_dev(torch.randn(6000)), _dev(torch.randn(3, 1000).half())]
    r = [_dev(torch.randn(x.shape)) for x in d]
    run_both(d, r, 4000, torch.bfloat16)
    assert paths == ["all"]
    del paths[:]
    # approx mode with a misled sample falls back to exact as well
    res = [x.clone() for x in r]
    idx, vals = tks.topk_sparsify(d, res, 4000, True, torch.bfloat16)
    e_idx, e_vals, e_res = ref.topk_sparsify(d, [x.clone() for x in r], 4000, False, torch.bfloat16)
    assert torch.equal(idx, e_idx) and _same_bits(vals, e_vals)
    assert all(_same_bits(a, b) for a, b in zip(res, e_res))


# --------------------------------------------------------------------------- adversarial
def _adversarial(name, n, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    if name == "all_equal":
        return torch.full((n,), 0.75)
    if name == "many_ties":
        return torch.randint(-3, 4, (n,), generator=g).float() / 4
    if name == "all_zeros":
        return torch.zeros(n)
    if name == "signed_zeros":
        x = torch.where(torch.rand(n, generator=g) < 0.5, -0.0, 0.0)
        x[:: 97] = 1.0
        x[5] = -1.0
        return x
    if name == "one_huge":
        x = torch.randn(n, generator=g)
        x[n // 2] = torch.finfo(dtype).max  # the largest finite value of the delta dtype
        return x
    if name == "denormals":
        return torch.randn(n, generator=g) * 1e-40
    raise ValueError(name)


@pytest.mark.parametrize("name", ["all_equal", "many_ties", "all_zeros", "signed_zeros",
                                  "one_huge", "denormals"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adversarial(name, dtype):
    n = 9000
    x = _adversarial(name, n, dtype)
    if name == "denormals" and dtype == torch.float16:
        x = x * 1e33  # fp16 denormals are below 6.1e-5
    d = [_dev(x[:5000].to(dtype)), _dev(x[5000:].to(dtype).reshape(40, 100))]
    # float32's largest value does not fit bfloat16 (it rounds to inf): that is refused (see
    # test_value_overflowing_travel_dtype_raises_before_writing), so it travels in float32 here.
    travel = torch.float32 if name == "one_huge" and dtype == torch.float32 else torch.bfloat16
    for k in (1, 123, n // 2, n):
        run_both(d, [], k, travel)
    # Residuals that cancel the delta (v = +0 exactly, or -0 + -0 = -0) and signed-zero
    # residuals next to ties.
    r = [-t.float() for t in d]
    r[1][0, :50] = -0.0
    run_both(d, r, 123)
    run_both(d, r, n // 3, torch.float16)


def test_denormal_values_all_dtypes():
    # Denormal v in every value dtype: kept values flush/round exactly like torch's .to().
    x = torch.randn(5000) * 1e-38
    for vd in DTYPES:
        run_both([_dev(x)], [_dev(torch.randn(5000) * 1e-39)], 700, vd)
    h = (torch.randn(3000) * 1e-6).half()   # fp16 denormals in the delta
    b = (torch.randn(3000) * 1e-39).bfloat16()  # bf16 denormals in the delta
    run_both([_dev(h), _dev(b)], [], 1000)


# --------------------------------------------------------------------------- approx
@pytest.mark.parametrize("dist", ["randn", "rand", "cube"])
@pytest.mark.parametrize("density", [0.01, 0.1])
def test_approx(monkeypatch, paths, dist, density):
    monkeypatch.setattr(tks, "SAMPLE_TARGET", 2048)  # a real (strided) sample at this size
    g = torch.Generator().manual_seed(4)
    n = 20_000
    x = {"randn": torch.randn(n, generator=g), "rand": torch.rand(n, generator=g),
         "cube": torch.randn(n, generator=g) ** 3}[dist]
    d = [_dev(x[:12_000].bfloat16()), _dev(x[12_000:].reshape(80, 100))]
    r_old = [_dev(torch.randn(t.shape, generator=g) * 0.01) for t in d]
    r = [t.clone() for t in r_old]
    k = int(density * n + 0.5)
    idx, vals = tks.topk_sparsify(d, r, k, True, torch.float16)
    v = torch.cat([(t.float() + ro).reshape(-1) for t, ro in zip(d, r_old)])
    assert abs(idx.numel() - k) <= 0.05 * k + 1
    assert paths == ["cand"]  # everything >= the sampled threshold, no selection
    assert torch.equal(idx, torch.sort(idx).values) and idx.unique().numel() == idx.numel()
    kept = torch.zeros(n, dtype=torch.bool, device=idx.device)
    kept[idx] = True
    assert v[kept].abs().min() >= v[~kept].abs().max()  # a threshold cut
    assert _same_bits(vals, v[idx].half())
    # residual rule: v elsewhere, v - float32(value) at kept entries (bitwise)
    expected = v.clone()
    expected[idx] = v[idx] - vals.float()
    assert _same_bits(torch.cat([t.reshape(-1) for t in r]), expected)


def test_approx_out_of_tolerance_is_exact(paths):
    # Heavy ties at the threshold: "everything >= t" keeps far more than k, so approx mode
    # must give the exact answer.
    x = _dev(_adversarial("many_ties", 8000))
    idx, vals = tks.topk_sparsify([x], [], 1000, True, torch.float32)
    e_idx, e_vals, _ = ref.topk_sparsify([x], [], 1000)
    assert torch.equal(idx, e_idx) and _same_bits(vals, e_vals)


# --------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["delta", "residual"])
def test_nonfinite_raises_before_writing(bad, where):
    d = [_dev(torch.randn(5000)), _dev(torch.randn(70, 50).bfloat16()), _dev(torch.randn(10))]
    r = [_dev(torch.randn(t.shape)) for t in d]
    (d if where == "delta" else r)[1][24, 23] = bad   # flat position 24 * 50 + 23 = 1223
    (d if where == "delta" else r)[2][7] = bad         # a later one is not the one reported
    before = [t.clone() for t in r]
    n = sum(t.numel() for t in d)
    for approx in (False, True):
        for k in (0, 1, 50, n // 2, n):
            with pytest.raises(ValueError, match=rf"^topk_sparsify: non-finite value in "
                                                 rf"{where}\[1\] at flat position 1223$"):
                tks.topk_sparsify(d, r, k, approx, torch.float32)
            assert all(_same_bits(a, b) for a, b in zip(r, before))


@pytest.mark.parametrize("value_dtype, big", [(torch.float16, 7e4), (torch.bfloat16, 3.4e38)])
def test_value_overflowing_travel_dtype_raises_before_writing(value_dtype, big):
    d = [_dev(torch.tensor([big, 1.0, 2.0, 3.0]))]
    r = [_dev(torch.zeros(4))]
    with pytest.raises(ValueError, match=rf"overflows {value_dtype}.*nothing was changed"):
        tks.topk_sparsify(d, r, 2, False, value_dtype)
    assert _same_bits(r[0], _dev(torch.zeros(4)))


# numpy (under the interpreter) warns about the overflowing casts and adds made on purpose here.
@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_nonfinite_without_residuals_and_float64_overflow():
    d = [_dev(torch.randn(100)), _dev(torch.randn(300).double())]
    d[1][299] = 1e39  # finite in float64, inf in float32: reported as the delta's
    for k in (0, 3, 400):
        with pytest.raises(ValueError,
                           match=r"non-finite value in delta\[1\] at flat position 299"):
            tks.topk_sparsify(d, [], k, False, torch.float32)


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_nonfinite_sum_of_finite_values():
    # delta and residual both finite, their fp32 sum overflows: reported as the residual's.
    d = [_dev(torch.full((50,), 3e38))]
    r = [_dev(torch.zeros(50))]
    r[0][13] = 3e38
    before = r[0].clone()
    with pytest.raises(ValueError, match=r"non-finite value in residual\[0\] at flat position 13"):
        tks.topk_sparsify(d, r, 5, False, torch.float32)
    assert _same_bits(r[0], before)


# --------------------------------------------------------------------------- misc
def test_repeated_calls_reuse_plan():
    # The cached block table stays valid across calls on the same tensors (error feedback:
    # the residual carries over); results match the reference step by step.
    d = _dev(torch.randn(6000))
    r = [_dev(torch.zeros(6000))]
    r_ref = [r[0].clone()]
    for step in range(3):
        d.copy_(_dev(torch.randn(6000)))
        idx, vals = tks.topk_sparsify([d], r, 300, False, torch.bfloat16)
        e_idx, e_vals, e_res = ref.topk_sparsify([d], r_ref, 300, False, torch.bfloat16)
        r_ref = e_res
        assert torch.equal(idx, e_idx) and _same_bits(vals, e_vals) and _same_bits(r[0], e_res[0])


def test_bad_arguments():
    with pytest.raises(TypeError):
        tks.topk_sparsify([_dev(torch.ones(3, dtype=torch.int32))], [], 1, False, torch.float32)
    with pytest.raises(TypeError):
        tks.topk_sparsify([_dev(torch.ones(3))], [_dev(torch.ones(3).double())], 1, False,
                          torch.float32)
    with pytest.raises(TypeError):
        tks.topk_sparsify([_dev(torch.ones(3))], [], 1, False, torch.float64)
    with pytest.raises(ValueError):
        tks.topk_sparsify([_dev(torch.ones(3))], [_dev(torch.ones(4))], 1, False, torch.float32)
