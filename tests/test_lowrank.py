"""fastlora low-rank family (rsvd, svd_factored, squeeze, aggregate_lora) against
torch.linalg.svd and fastlora.reference, in the style of PyTorch's test_svd_lowrank: matrices
with known spectra, reconstruction error against the optimal rank-k error."""
import os

import pytest
import torch

import fastlora
from fastlora import reference as ref
from fastlora.ops.lowrank import _sketch_dtype_for, gaussian_test_matrix
from fastlora.sparse_delta import Layout, SparseDelta

# rsvd's documented accuracy at the defaults (n_iter=1, oversample=max(10, k // 2), the sketch
# precision of "auto"): Frobenius error within
# (1 + RSVD_EPS) of the optimal rank-k error, plus rounding (ATOL_ULPS ulps of ||A||_F).
RSVD_EPS = 0.05
ATOL_ULPS = 50

SPECTRA = {
    "fast": lambda i: 0.5 ** i,
    "slow": lambda i: 1.0 / (i + 1),
    "flat": lambda i: (i + 1) ** -0.25,
    "rank8": lambda i: 1.0 / (i + 1) if i < 8 else 0.0,       # exactly low rank
    "rank3": lambda i: 3.0 - i if i < 3 else 0.0,             # rank-deficient for k > 3
}
SHAPES = {"square": (120, 120), "tall": (300, 60), "wide": (50, 200), "row": (1, 77), "col": (40, 1)}


def known(m, n, spectrum, g, dtype=torch.float64, batch=()):
    """A (..., m, n) = U diag(s) V^T with random orthonormal U, V and s_i = spectrum(i)."""
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(*batch, m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(*batch, n, k, generator=g, dtype=torch.float64)).Q
    s = torch.tensor([spectrum(i) for i in range(k)], dtype=torch.float64)
    return ((U * s) @ V.mT).to(dtype)


def optimal_error(A, k):
    s = torch.linalg.svdvals(A.double())
    return s[..., k:].norm(dim=-1)


def check_svd(U, S, Vh, m, n, k, dtype, tol):
    assert U.shape[-2:] == (m, k) and S.shape[-1] == k and Vh.shape[-2:] == (k, n)
    assert U.dtype == S.dtype == Vh.dtype == dtype
    assert (S >= 0).all() and (S[..., :-1] >= S[..., 1:]).all(), S
    eye = torch.eye(k, dtype=dtype)
    assert (U.mT @ U - eye).abs().max() < tol, "U not orthonormal"
    assert (Vh @ Vh.mT - eye).abs().max() < tol, "V not orthonormal"


def rel_tol(dtype):
    return 1e-4 if dtype == torch.float32 else 1e-10


# --- rsvd --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("spectrum", list(SPECTRA))
def test_rsvd_known_spectra(spectrum, shape, dtype):
    m, n = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    A = known(m, n, SPECTRA[spectrum], g, dtype)
    for k in sorted({1, min(5, m, n), min(12, m, n)}):
        U, S, Vh = fastlora.rsvd(A, k, generator=torch.Generator().manual_seed(k))
        check_svd(U, S, Vh, m, n, k, dtype, rel_tol(dtype))
        err = (A.double() - (U * S).double() @ Vh.double()).norm()
        atol = ATOL_ULPS * torch.finfo(dtype).eps * A.double().norm()
        assert err <= (1 + RSVD_EPS) * optimal_error(A, k) + atol, (k, err, optimal_error(A, k))
        # The singular values themselves: at least as close as the reconstruction allows.
        s_true = torch.linalg.svdvals(A.double())[:k]
        assert (S.double() - s_true).abs().max() <= RSVD_EPS * s_true[0] + atol


def test_rsvd_matches_reference_and_batches():
    g = torch.Generator().manual_seed(1)
    A = known(40, 30, SPECTRA["slow"], g, torch.float32, batch=(2, 3))
    omega = torch.randn(2, 3, 30, 15, generator=g)
    out = torch.ops.fastlora.rsvd(A, omega, 5, 2)
    exp = ref.rsvd(A, omega, 5, 2)
    torch.testing.assert_close(out[1], exp[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close((out[0] * out[1].unsqueeze(-2)) @ out[2], (exp[0] * exp[1].unsqueeze(-2)) @ exp[2],
                               rtol=1e-4, atol=1e-5)
    # Batched == one by one with the same test matrix slices.
    for i in range(2):
        for j in range(3):
            one = torch.ops.fastlora.rsvd(A[i, j], omega[i, j], 5, 2)
            torch.testing.assert_close(out[1][i, j], one[1], rtol=1e-5, atol=1e-6)
    U, S, Vh = fastlora.rsvd(A, 5)
    check_svd(U, S, Vh, 40, 30, 5, torch.float32, 1e-4)
    err = (A - (U * S.unsqueeze(-2)) @ Vh).norm(dim=(-2, -1))
    assert (err <= (1 + RSVD_EPS) * optimal_error(A, 5) + 1e-5).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rsvd_half_precision_computed_in_fp32(dtype):
    g = torch.Generator().manual_seed(2)
    A = known(64, 48, SPECTRA["slow"], g, dtype)
    U, S, Vh = fastlora.rsvd(A, 6, generator=torch.Generator().manual_seed(0))
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    U2, S2, Vh2 = fastlora.rsvd(A.float(), 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(S, S2) and torch.equal(U, U2) and torch.equal(Vh, Vh2)


def test_rsvd_generator_reproducible():
    A = known(80, 60, SPECTRA["flat"], torch.Generator().manual_seed(3), torch.float32)
    r1 = fastlora.rsvd(A, 4, generator=torch.Generator().manual_seed(7))
    r2 = fastlora.rsvd(A, 4, generator=torch.Generator().manual_seed(7))
    r3 = fastlora.rsvd(A, 4, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(a, b) for a, b in zip(r1, r2))
    assert not torch.equal(r1[0], r3[0])
    torch.manual_seed(5)
    r4 = fastlora.rsvd(A, 4)
    torch.manual_seed(5)
    r5 = fastlora.rsvd(A, 4)
    assert all(torch.equal(a, b) for a, b in zip(r4, r5))


def test_rsvd_more_iterations_do_not_hurt():
    A = known(150, 100, SPECTRA["flat"], torch.Generator().manual_seed(4), torch.float64)
    errs = []
    for it in (0, 2, 6):
        U, S, Vh = fastlora.rsvd(A, 10, n_iter=it, oversample=5, generator=torch.Generator().manual_seed(0))
        errs.append(((A - (U * S) @ Vh).norm() / optimal_error(A, 10)).item())
    assert errs[0] >= errs[1] >= errs[2] - 1e-9 and errs[2] < 1.01, errs


# --- mixed precision (sketch_dtype) ------------------------------------------------------------
# Documented accuracy: the randomized bound above plus the sketch dtype's rounding of A, at most
# eps(sketch_dtype) * ||A||_F (eps = 2 x the unit roundoff; measured worst on these spectra:
# 0.38 eps).

SKETCH_DTYPES = [torch.bfloat16, torch.float16]


def sketch_floor(A, sketch_dtype):
    return torch.finfo(sketch_dtype).eps * A.double().norm(dim=(-2, -1))


@pytest.mark.parametrize("sketch_dtype", SKETCH_DTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("spectrum", list(SPECTRA))
def test_rsvd_sketch_known_spectra(spectrum, shape, dtype, sketch_dtype):
    m, n = SHAPES[shape]
    A = known(m, n, SPECTRA[spectrum], torch.Generator().manual_seed(0), dtype)
    for k in sorted({1, min(5, m, n), min(12, m, n)}):
        U, S, Vh = fastlora.rsvd(A, k, generator=torch.Generator().manual_seed(k), sketch_dtype=sketch_dtype)
        # The bases are orthonormal to working precision (CholeskyQR2 or Householder).
        check_svd(U, S, Vh, m, n, k, dtype, rel_tol(dtype))
        err = (A.double() - (U * S).double() @ Vh.double()).norm()
        assert err <= (1 + RSVD_EPS) * optimal_error(A, k) + sketch_floor(A, sketch_dtype), (k, err)


@pytest.mark.parametrize("sketch_dtype", SKETCH_DTYPES)
def test_rsvd_sketch_matches_reference_and_batches(sketch_dtype):
    g = torch.Generator().manual_seed(1)
    A = known(40, 30, SPECTRA["slow"], g, torch.float32, batch=(2, 3))
    omega = torch.randn(2, 3, 30, 15, generator=g)
    out = torch.ops.fastlora.rsvd(A, omega, 5, 1, sketch_dtype)
    exp = ref.rsvd(A, omega, 5, 1, sketch_dtype)
    # Same spans, bases orthonormalised differently, each rounded to the sketch dtype: the two
    # agree to the sketch floor, not to float32.
    floor = sketch_floor(A, sketch_dtype)
    recon = lambda r: (r[0] * r[1].unsqueeze(-2)) @ r[2]  # noqa: E731
    assert ((recon(out) - recon(exp)).double().norm(dim=(-2, -1)) <= floor).all()
    for i in range(2):
        for j in range(3):
            one = torch.ops.fastlora.rsvd(A[i, j], omega[i, j], 5, 1, sketch_dtype)
            assert (recon(one) - recon(out)[i, j]).double().norm() <= floor[i, j]


def test_rsvd_sketch_large_copy_and_half_input():
    """A large float32 A (converted block by block where AVX512-BF16 runs the products,
    copied to bf16 elsewhere), a bf16 input (read in place) and a strided float32 one give the
    bits of the same computation on the same bf16 values."""
    g = torch.Generator().manual_seed(2)
    # Noisy enough that the sketch is kept (its rounding well under the error left).
    A = (torch.randn(1500, 8, generator=g) @ torch.randn(8, 1500, generator=g)
         + 0.5 * torch.randn(1500, 1500, generator=g)).bfloat16()
    # The op itself: fastlora.rsvd would run float32 products on CPUs without native bf16.
    omega = gaussian_test_matrix((), 1500, 18, torch.float32, A.device, torch.Generator().manual_seed(0))
    r_in = torch.ops.fastlora.rsvd(A, omega, 8, 2, torch.bfloat16)
    r_copy = torch.ops.fastlora.rsvd(A.float(), omega, 8, 2, torch.bfloat16)
    r_strided = torch.ops.fastlora.rsvd(A.float().mT.contiguous().mT, omega, 8, 2, torch.bfloat16)
    for x, y, z in zip(r_in, r_copy, r_strided):
        assert torch.equal(x, y) and torch.equal(x, z)
    U, S, Vh = r_in
    err = (A.double() - (U * S).double() @ Vh.double()).norm()
    assert err <= (1 + RSVD_EPS) * optimal_error(A, 8) + sketch_floor(A, torch.bfloat16)


@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("shape", [(301, 258), (300, 257)])
def test_rsvd_sketch_rounds_as_torch(batch, shape):
    """A float32 A's values reach the bf16 products (converted block by block where
    AVX512-BF16 runs them, copied elsewhere) as A.bfloat16() holds them, ties to even (huge
    values rounding to inf left aside: A is finite, the op checks): rsvd on A and on
    A.bfloat16() give the same bits, odd row and column counts (zero-padded pairs) and the
    floor check included (a nearly low-rank batch element makes the whole call run again in
    float32)."""
    m, n = shape
    g = torch.Generator().manual_seed(5)
    A = torch.randn(*batch, m, n, generator=g)
    # exact ties between two bfloat16 values (the 16 low bits 0x8000), both parities
    ties = (torch.randn(A.shape, generator=g).bfloat16().float().view(torch.int32) | 0x8000).view(torch.float32)
    A = torch.where(torch.rand(A.shape, generator=g) < 0.3, ties, A)
    A[..., 0, 1] = 0.0
    A[..., 2, 3] = -0.0
    A[..., 4, 5] = 1e-40  # subnormal
    omega = gaussian_test_matrix(batch, n, 12, torch.float32, A.device, torch.Generator().manual_seed(0))
    got = torch.ops.fastlora.rsvd(A, omega, 6, 1, torch.bfloat16)
    exp = torch.ops.fastlora.rsvd(A.bfloat16(), omega, 6, 1, torch.bfloat16)
    for x, y in zip(got, exp):
        assert torch.equal(x, y)
    # subnormal through and through (the AVX512-BF16 conversion flushes them to zero, as the bf16
    # products do with A.bfloat16()'s subnormals)
    tiny = torch.randn(*batch, m, n, generator=g) * 1e-39
    got = torch.ops.fastlora.rsvd(tiny, omega, 6, 1, torch.bfloat16)
    exp = torch.ops.fastlora.rsvd(tiny.bfloat16(), omega, 6, 1, torch.bfloat16)
    for x, y in zip(got, exp):
        assert torch.equal(x, y)
    low_rank = torch.randn(*batch, m, 3, generator=g) @ torch.randn(*batch, 3, n, generator=g)
    got = torch.ops.fastlora.rsvd(low_rank, omega, 6, 1, torch.bfloat16)
    exp = torch.ops.fastlora.rsvd(low_rank, omega, 6, 1, None)  # the float32 computation
    for x, y in zip(got, exp):
        assert torch.equal(x, y)


def test_rsvd_sketch_errors():
    A = torch.randn(10, 6)
    with pytest.raises(ValueError, match="sketch_dtype must be None, 'auto', torch.float32, torch.bfloat16 or "
                                         "torch.float16"):
        fastlora.rsvd(A, 2, sketch_dtype=torch.float64)
    op = fastlora.FactoredSum([(torch.randn(2, 6), torch.randn(10, 2))])
    with pytest.raises(ValueError, match="a half-precision sketch_dtype applies to a dense A"):
        fastlora.rsvd(op, 2, sketch_dtype=torch.bfloat16)
    fastlora.rsvd(op, 2, sketch_dtype=torch.float32)  # full precision: what a FactoredSum runs anyway
    with pytest.raises(ValueError, match="rsvd: sketch_dtype must be bfloat16 or float16"):
        torch.ops.fastlora.rsvd(A, torch.randn(6, 4), 2, 1, torch.float64)
    B = A.clone()
    B[1, 1] = float("nan")
    with pytest.raises(ValueError, match="rsvd: the input contains non-finite"):
        fastlora.rsvd(B, 2, sketch_dtype=torch.bfloat16)
    # float16 overflows above 65504: reported, not returned as garbage.
    with pytest.raises(ValueError, match="overflows"):
        torch.ops.fastlora.rsvd(torch.full((8, 8), 6e4), torch.randn(8, 4), 2, 1, torch.float16)


def test_rsvd_sketch_precision_follows_the_cpu():
    """A half-precision sketch runs only where its GEMMs are native; elsewhere rsvd computes the
    products in float32 (bitwise the float32 call). "auto" means bf16 where native, except on a
    CPU whose float32 GEMMs run MKL's AVX-512 kernels and whose bf16 ones are not AMX's. Checked
    under every CPU kernel build this machine can run (below AVX-512: never native), with either
    BLAS plan forced."""
    A = torch.randn(96, 80, generator=torch.Generator().manual_seed(3))

    def run(sketch):
        return fastlora.rsvd(A, 6, generator=torch.Generator().manual_seed(0), sketch_dtype=sketch)

    def same(xs, ys):
        return all(torch.equal(x, y) for x, y in zip(xs, ys))
    best = fastlora.use_cpu_isa("auto")
    previous = torch.ops.fastlora._set_blas_avx512_plan(-1)
    try:
        for isa in ("baseline", "avx2", "avx512", "amx"):
            if fastlora.use_cpu_isa(isa) != isa:
                continue
            for blas_avx512 in (0, 1):
                torch.ops.fastlora._set_blas_avx512_plan(blas_avx512)
                assert fastlora.cpu.blas_avx512_sgemm() == (blas_avx512 == 1 and isa in ("avx512", "amx"))
                assert fastlora.cpu.blas_mkl_on_intel() == (blas_avx512 == 1)
                native_bf16 = fastlora.cpu.native_bf16_matmul()
                assert native_bf16 == (isa in ("avx512", "amx") and (torch.cpu._is_avx512_bf16_supported()
                                                                     or torch.cpu._is_amx_tile_supported()))
                fp32, bf16, auto, default = run(torch.float32), run(torch.bfloat16), run("auto"), run(None)
                assert same(bf16, fp32) == (not native_bf16)
                assert same(auto, default)  # the default is "auto"
                assert same(auto, bf16 if native_bf16 and (isa == "amx" or blas_avx512 == 0) else fp32)
            torch.ops.fastlora._set_blas_avx512_plan(-1)
            # float64 input keeps its precision by default.
            A64 = A.double()
            r64 = fastlora.rsvd(A64, 6, generator=torch.Generator().manual_seed(0))
            r64_full = fastlora.rsvd(A64, 6, generator=torch.Generator().manual_seed(0), sketch_dtype=torch.float32)
            assert same(r64, r64_full)
            if not torch.cpu._is_amx_fp16_supported():
                # float16 GEMMs are emulated: float32 products, so 6e4 does not overflow either.
                big = torch.full((8, 8), 6e4) + torch.eye(8)
                U, S, Vh = fastlora.rsvd(big, 2, sketch_dtype=torch.float16)
                assert torch.isfinite(S).all() and S[0] > 4e5
    finally:
        fastlora.use_cpu_isa(best)
        torch.ops.fastlora._set_blas_avx512_plan(previous)


def test_rsvd_sketch_falls_back_where_its_rounding_dominates():
    """A half-precision sketch whose rounding of A (eps ||A||_F) exceeds an eighth of the error
    the result leaves is computed again in float32: a (nearly) low-rank A gets float32 accuracy,
    not bfloat16's floor; a noisy A keeps the sketch. Same decision in the reference."""
    g = torch.Generator().manual_seed(5)
    low = known(90, 70, SPECTRA["rank8"], g, torch.float32, batch=(2,))
    noisy = known(90, 70, SPECTRA["slow"], g, torch.float32, batch=(2,))
    omega = gaussian_test_matrix((2,), 70, 16, torch.float32, low.device, torch.Generator().manual_seed(0))
    for sketch in SKETCH_DTYPES:
        sketched, full = (torch.ops.fastlora.rsvd(low, omega, 8, 1, d) for d in (sketch, None))
        assert all(torch.equal(x, y) for x, y in zip(sketched, full))
        U, S, Vh = sketched
        err = (low.double() - (U * S.unsqueeze(-2)).double() @ Vh.double()).norm(dim=(-2, -1))
        assert (err <= ATOL_ULPS * torch.finfo(torch.float32).eps * low.double().norm(dim=(-2, -1))).all(), err
        exp = ref.rsvd(low, omega, 8, 1, sketch)
        torch.testing.assert_close(exp[1], S, rtol=1e-4, atol=1e-5)
        kept = torch.ops.fastlora.rsvd(noisy, omega, 8, 1, sketch)
        assert not torch.equal(kept[1], torch.ops.fastlora.rsvd(noisy, omega, 8, 1, None)[1])
        torch.testing.assert_close(kept[1], ref.rsvd(noisy, omega, 8, 1, sketch)[1], rtol=0,
                                   atol=float(sketch_floor(noisy, sketch).max()))
    # One batch element enough: the whole call runs in float32.
    mixed = torch.stack([noisy[0], low[1]])
    sketched, full = (torch.ops.fastlora.rsvd(mixed, omega, 8, 1, d) for d in (torch.bfloat16, None))
    assert all(torch.equal(x, y) for x, y in zip(sketched, full))


def test_rsvd_default_plan():
    """Dense A: oversample=max(10, rank // 2), the sketch precision of "auto", and the adaptive
    n_iter, decided by the sketch's sigma_l / sigma_rank estimate after one power iteration: up to
    0.62 nothing more; above it one more product with A^T and the projection on the row space it
    spans; above 0.76 a second power iteration; both on the sketch's leading rank + (l - rank) // 4
    directions, with an error between one full-width power iteration's and two's. As in the
    reference; the same for a FactoredSum."""
    g = torch.Generator().manual_seed(6)
    # The estimate (sigma_l / sigma_rank) also falls with the oversampling ratio l / rank: at rank
    # 4 (l = 14) it is 0.19 / 0.38 / 0.64 on these spectra, at rank 30 (l = 45) 0.50 / 0.72 / 0.84.
    for spectrum, plans in (("slow", (1, 1)), ("sqrt", (1, "projection")),
                            ("flat", ("projection", "narrowed iteration"))):
        A = known(400, 300, SPECTRA.get(spectrum, lambda i: (i + 1) ** -0.5), g, torch.float32)
        sketch = _sketch_dtype_for("auto", A.dtype, A.device)
        for rank, plan in zip((4, 30), plans):
            l = rank + max(10, rank // 2)
            got = fastlora.rsvd(A, rank, generator=torch.Generator().manual_seed(1))
            omega = gaussian_test_matrix((), 300, l, torch.float32, A.device, torch.Generator().manual_seed(1))
            run = lambda n_iter, sd=None: torch.ops.fastlora.rsvd(A, omega, rank, n_iter, sd)  # noqa: E731
            assert all(torch.equal(x, y) for x, y in zip(got, run(None, sketch)))
            full, exp = run(None), ref.rsvd(A, omega, rank, None)
            torch.testing.assert_close(full[1], exp[1], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close((full[0] * full[1]) @ full[2], (exp[0] * exp[1]) @ exp[2], rtol=1e-4,
                                       atol=1e-5)
            if plan not in ("projection", "narrowed iteration"):
                for sd in {sketch, None}:
                    assert all(torch.equal(x, y) for x, y in zip(run(None, sd), run(plan, sd))), (spectrum, rank)
                assert all(torch.equal(x, y) for x, y in zip(exp, ref.rsvd(A, omega, rank, plan)))
                continue
            err = [(A.double() - ((U * S) @ Vh).double()).norm().item() for U, S, Vh in (run(1), full, run(2))]
            assert err[0] > err[1] > err[2], (spectrum, rank, err)
    op = fastlora.FactoredSum([(torch.randn(3, 100), torch.randn(120, 3)), (torch.randn(5, 100), torch.randn(120, 5))])
    got = fastlora.rsvd(op, 4, generator=torch.Generator().manual_seed(1))
    want = fastlora.rsvd(op, 4, oversample=10, n_iter=None, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(got, want))
    with pytest.raises(TypeError, match="n_iter must be an int or None"):
        fastlora.rsvd(A, 2, n_iter=1.0)
    with pytest.raises(ValueError, match="n_iter must be >= 0"):
        fastlora.rsvd(A, 2, n_iter=-1)


@pytest.mark.parametrize("blas_avx512", [0, 1], ids=["small_gemm_plan", "mkl_avx512_plan"])
def test_rsvd_float32_products_match_the_blas(blas_avx512):
    """On the CPU the float32 products with a contiguous A run in small_gemm (A and A^T times a
    sketch whose width is padded to whole vectors), except where the BLAS is MKL on an Intel CPU
    (forced here both ways): there in MKL, A^T Y as (Y^T A)^T and, from the avx512 level, X
    column-major; a non-contiguous A and the baseline build take the BLAS. All give the same
    factorisation to float32 rounding, under every kernel build."""
    g = torch.Generator().manual_seed(8)
    A = known(300, 260, SPECTRA["slow"], g, torch.float32)
    strided = A.mT.contiguous().mT
    best = fastlora.use_cpu_isa("auto")
    previous = torch.ops.fastlora._set_blas_avx512_plan(blas_avx512)
    try:
        for isa in ("baseline", "avx2", "avx512"):
            if fastlora.use_cpu_isa(isa) != isa:
                continue
            for l in (7, 16, 21, 48):
                omega = torch.randn(260, l, generator=g)
                U, S, Vh = torch.ops.fastlora.rsvd(A, omega, 5, 1, None)
                U2, S2, Vh2 = torch.ops.fastlora.rsvd(strided, omega, 5, 1, None)
                torch.testing.assert_close(S, S2, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close((U * S) @ Vh, (U2 * S2) @ Vh2, rtol=1e-4, atol=1e-5)
                exp = ref.rsvd(A, omega, 5, 1)
                torch.testing.assert_close(S, exp[1], rtol=1e-5, atol=1e-6)
            # A batch: each matrix as on its own (to rounding: ATen's batched QR / SVD).
            Ab = torch.stack([A, 2 * A.flip(0)])
            omega = torch.randn(2, 260, 21, generator=g)
            out = torch.ops.fastlora.rsvd(Ab, omega, 5, 1, None)
            for i in range(2):
                one = torch.ops.fastlora.rsvd(Ab[i], omega[i], 5, 1, None)
                torch.testing.assert_close(out[1][i], one[1], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close((out[0][i] * out[1][i]) @ out[2][i], (one[0] * one[1]) @ one[2],
                                           rtol=1e-4, atol=1e-5)
    finally:
        fastlora.use_cpu_isa(best)
        torch.ops.fastlora._set_blas_avx512_plan(previous)


# --- implicit operator -------------------------------------------------------------------------

def clients(m, n, ranks, g, dtype=torch.float32):
    return [(torch.randn(r, n, generator=g, dtype=dtype) / n ** 0.5, torch.randn(m, r, generator=g, dtype=dtype))
            for r in ranks]


@pytest.mark.parametrize("with_sparse", [False, True])
def test_rsvd_implicit_matches_materialised(with_sparse):
    g = torch.Generator().manual_seed(5)
    m, n = 70, 50
    facs = clients(m, n, [2, 8, 4, 16], g)
    weights = [0.1, 0.4, 0.2, 0.3]
    sparse = None
    if with_sparse:
        idx = torch.randperm(m * n, generator=g)[:200].sort().values
        sparse = SparseDelta(idx, torch.randn(200, generator=g), Layout([("", (m, n), torch.float32)], False))
    op = fastlora.FactoredSum(facs, weights, sparse=sparse)
    dense = op.to_dense()
    for k in (1, 6, 30):
        imp = fastlora.rsvd(op, k, generator=torch.Generator().manual_seed(0))
        mat = fastlora.rsvd(dense, k, generator=torch.Generator().manual_seed(0), sketch_dtype=torch.float32)
        check_svd(*imp, m, n, k, torch.float32, 1e-4)
        torch.testing.assert_close(imp[1], mat[1], rtol=1e-4, atol=1e-5 * mat[1][0].item())
        err = (dense - (imp[0] * imp[1]) @ imp[2]).norm()
        assert err <= (1 + RSVD_EPS) * optimal_error(dense, k) + 1e-5 * dense.norm()
    # The raw op against its reference (same test matrix).
    Bs, As = [b for _, b in facs], [a for a, _ in facs]
    idx = sparse.indices if sparse else torch.zeros(0, dtype=torch.int64)
    val = sparse.values if sparse else torch.zeros(0)
    omega = torch.randn(n, 12, generator=g)
    out = torch.ops.fastlora.rsvd_implicit(Bs, As, torch.tensor(weights), idx, val, omega, m, 6, 2)
    exp = ref.rsvd_implicit(Bs, As, torch.tensor(weights), idx, val, omega, m, 6, 2)
    torch.testing.assert_close(out[1], exp[1], rtol=1e-4, atol=1e-5)


def test_rsvd_sparse_only_operator():
    m, n = 30, 20
    idx = torch.tensor([0, 21, 45, 599])
    sd = SparseDelta(idx, torch.tensor([3.0, -2.0, 1.0, 0.5]), Layout([("", (m, n), torch.float32)], False))
    U, S, Vh = fastlora.rsvd(fastlora.FactoredSum([], sparse=sd), 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(S, torch.linalg.svdvals(sd.to_dense())[:4], rtol=1e-5, atol=1e-6)


# --- svd_factored ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,n,r", [(200, 150, 8), (40, 300, 16), (6, 90, 8), (1, 50, 3), (64, 64, 64)])
def test_svd_factored_exact(m, n, r, dtype):
    g = torch.Generator().manual_seed(6)
    B = torch.randn(m, r, generator=g, dtype=torch.float64)
    A = known(r, n, SPECTRA["fast"], g)  # a product with a wide dynamic range of singular values
    U, S, Vh = fastlora.svd_factored(B.to(dtype), A.to(dtype))
    k = min(r, m, n)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    check_svd(U, S, Vh, m, n, k, dtype, 10 * tol)
    M = B @ A
    assert ((U.double() * S.double()) @ Vh.double() - M).norm() <= tol * M.norm()
    s_true = torch.linalg.svdvals(M)[:k]
    assert (S.double() - s_true).abs().max() <= tol * s_true[0]


def test_svd_factored_weighted_sum_matches_reference():
    g = torch.Generator().manual_seed(7)
    facs = clients(90, 60, [3, 16, 5], g, torch.float64)
    Bs, As, w = [b for _, b in facs], [a for a, _ in facs], [0.5, -1.5, 2.0]
    U, S, Vh = fastlora.svd_factored(Bs, As, w)
    assert S.shape == (24,)
    M = sum(wi * b @ a for wi, b, a in zip(w, Bs, As))
    torch.testing.assert_close((U * S) @ Vh, M, rtol=1e-10, atol=1e-10 * M.norm().item())
    eU, eS, eVh = ref.svd_factored(Bs, As, torch.tensor(w))
    torch.testing.assert_close(S, eS, rtol=1e-10, atol=1e-12)
    # Mixed dtypes: computed in float64 if any factor is float64, half precision upcast.
    U, S, Vh = fastlora.svd_factored([Bs[0].half(), Bs[1]], [As[0].bfloat16(), As[1].float()])
    assert S.dtype == torch.float64
    U, S, Vh = fastlora.svd_factored(Bs[0].bfloat16(), As[0].half())
    assert S.dtype == torch.float32


# --- squeeze -----------------------------------------------------------------------------------

def test_squeeze_properties():
    g = torch.Generator().manual_seed(8)
    lora_A, lora_B = torch.randn(32, 100, generator=g), torch.randn(80, 32, generator=g)
    BA = (lora_B @ lora_A).double()
    s = torch.linalg.svdvals(BA)
    for rank in (1, 8, 31):
        A2, B2, rel = fastlora.squeeze(lora_A, lora_B, rank)
        assert A2.shape == (rank, 100) and B2.shape == (80, rank) and rel.shape == ()
        actual = (BA - (B2 @ A2).double()).norm() / BA.norm()
        torch.testing.assert_close(rel.double(), actual, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(rel.double(), s[rank:].norm() / s.norm(), rtol=1e-4, atol=1e-6)
        # Balanced: B'^T B' = A' A'^T = diag(S).
        torch.testing.assert_close(B2.T @ B2, A2 @ A2.T, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(torch.diag(B2.T @ B2).double(), s[:rank], rtol=1e-4, atol=1e-3)
    # Full rank (and beyond: zero padding) reproduces the product.
    for rank in (32, 40):
        A2, B2, rel = fastlora.squeeze(lora_A, lora_B, rank)
        assert rel.item() < 1e-3 and A2.shape[0] == rank
        torch.testing.assert_close(B2 @ A2, lora_B @ lora_A, rtol=1e-4, atol=1e-3)
    # scaling is folded into the factors; rel_error does not depend on it.
    A2, B2, rel = fastlora.squeeze(lora_A, lora_B, 8, scaling=0.25)
    A3, B3, rel3 = fastlora.squeeze(lora_A, lora_B, 8)
    torch.testing.assert_close(B2 @ A2, 0.25 * (B3 @ A3), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rel, rel3)
    # Dtypes of the adapter are kept; a zero product has zero error.
    A2, B2, rel = fastlora.squeeze(lora_A.bfloat16(), lora_B.bfloat16(), 4)
    assert A2.dtype == B2.dtype == torch.bfloat16 and rel.dtype == torch.float32
    A2, B2, rel = fastlora.squeeze(lora_A, torch.zeros(80, 32), 4)
    assert rel.item() == 0 and not A2.any() and not B2.any()


# --- aggregate_lora ----------------------------------------------------------------------------

def test_aggregate_lora_best_rank_r_with_different_client_ranks():
    g = torch.Generator().manual_seed(9)
    facs = clients(64, 96, [4, 8, 16, 2], g, torch.float64)
    w = [0.1, 0.2, 0.3, 0.4]
    M = sum(wi * b @ a for wi, (a, b) in zip(w, facs))
    U, S, Vh = torch.linalg.svd(M)
    for rank in (1, 8, 30):
        A, B = fastlora.aggregate_lora(facs, w, rank)
        assert A.shape == (rank, 96) and B.shape == (64, rank) and A.dtype == torch.float64
        best = (U[:, :rank] * S[:rank]) @ Vh[:rank]
        torch.testing.assert_close(B @ A, best, rtol=1e-9, atol=1e-10 * M.norm().item())
    eA, eB, _ = ref.lowrank_truncate([b for _, b in facs], [a for a, _ in facs], torch.tensor(w, dtype=torch.float64), 8)
    A, B = fastlora.aggregate_lora(facs, w, 8)
    torch.testing.assert_close(B @ A, eB @ eA, rtol=1e-9, atol=1e-10)
    # Exact aggregation differs from averaging A and B separately (cross terms).
    same_rank = clients(64, 96, [8, 8], g, torch.float64)
    A, B = fastlora.aggregate_lora(same_rank, None, 16)   # default weights 1/N
    naive = (0.5 * (same_rank[0][1] + same_rank[1][1])) @ (0.5 * (same_rank[0][0] + same_rank[1][0]))
    exact = 0.5 * sum(b @ a for a, b in same_rank)
    torch.testing.assert_close(B @ A, exact, rtol=1e-9, atol=1e-10)
    assert (naive - exact).norm() > 0.1 * exact.norm()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lowrank_truncate_is_the_best_rank_r_factors(dtype):
    """The op's own Python function: the best rank-r factors of a weighted factored sum
    (clients of different ranks, a 1-row product, rank beyond the total rank), balanced, with
    rel_error from the singular values; squeeze / aggregate_lora are it in LoRA's terms."""
    g = torch.Generator().manual_seed(5)
    for m, n, ranks in ((64, 96, [4, 8, 2]), (1, 50, [3]), (33, 17, [5, 7])):
        facs = clients(m, n, ranks, g, dtype)
        w = [0.5, 0.3, 0.2][:len(facs)]
        Bs, As = [b for _, b in facs], [a for a, _ in facs]
        M = sum(wi * b.double() @ a.double() for wi, (a, b) in zip(w, facs))
        S = torch.linalg.svdvals(M)
        for rank in sorted({1, min(m, n, 4), min(m, n)}):
            A2, B2, rel = fastlora.lowrank_truncate(Bs, As, w, rank=rank)
            assert A2.shape == (rank, n) and B2.shape == (m, rank) and A2.dtype == dtype and rel.dtype == dtype
            eA, eB, erel = ref.lowrank_truncate(Bs, As, torch.tensor(w, dtype=torch.float64), rank)
            tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
            torch.testing.assert_close((B2 @ A2).double(), (eB @ eA).double(), **tol)
            torch.testing.assert_close(rel.double(), S[rank:].norm() / S.norm(), **tol)
            torch.testing.assert_close(B2.norm(dim=0), A2.norm(dim=1), **tol)   # sqrt(S) on each side
    a, b = torch.randn(4, 6, dtype=dtype, generator=g), torch.randn(10, 4, dtype=dtype, generator=g)
    A2, B2, _ = fastlora.lowrank_truncate(b, a, rank=3)
    A3, B3, _ = fastlora.squeeze(a, b, 3)
    assert torch.equal(A2, A3) and torch.equal(B2, B3)


def test_aggregate_lora_one_client_full_rank_reproduces_it():
    g = torch.Generator().manual_seed(10)
    a, b = torch.randn(16, 128, generator=g), torch.randn(256, 16, generator=g)
    A, B = fastlora.aggregate_lora([(a, b)], [1.0], 16)
    torch.testing.assert_close(B @ A, b @ a, rtol=1e-5, atol=1e-5 * (b @ a).abs().max().item())
    A, B = fastlora.aggregate_lora([(a.half(), b.half())], [1.0], 16)
    assert A.dtype == B.dtype == torch.float16


# --- device ------------------------------------------------------------------------------------
# The family is one ATen-only implementation registered for every device (cuBLAS / cuSOLVER on
# CUDA). FASTLORA_TEST_GPU=1 runs this on "cuda"; otherwise on CPU.
DEVICE = "cuda" if os.environ.get("FASTLORA_TEST_GPU") else "cpu"


@pytest.mark.parametrize("sketch_dtype", [torch.float32, None, torch.bfloat16])
def test_family_on_device(sketch_dtype):
    g = torch.Generator().manual_seed(13)
    A = known(96, 70, SPECTRA["slow"], g, torch.float32, batch=(2,)).to(DEVICE)
    U, S, Vh = fastlora.rsvd(A, 6, generator=torch.Generator().manual_seed(0), sketch_dtype=sketch_dtype)
    assert U.device == S.device == Vh.device == A.device
    # The default may sketch in bfloat16 (where native): its floor bounds it.
    floor = 0 if sketch_dtype is torch.float32 else sketch_floor(A.cpu(), torch.bfloat16)
    err = (A - (U * S.unsqueeze(-2)) @ Vh).double().norm(dim=(-2, -1)).cpu()
    assert (err <= (1 + RSVD_EPS) * optimal_error(A.cpu(), 6) + floor + 1e-5).all()
    pairs = [(a.to(DEVICE), b.to(DEVICE)) for a, b in clients(96, 70, [2, 5, 3], g)]
    lora_A, lora_B = fastlora.aggregate_lora(pairs, [0.2, 0.5, 0.3], 4)
    exact = sum(w * b.cpu().double() @ a.cpu().double() for w, (a, b) in zip([0.2, 0.5, 0.3], pairs))
    s = torch.linalg.svdvals(exact)
    assert lora_A.device == lora_B.device == A.device
    torch.testing.assert_close((exact - lora_B.cpu().double() @ lora_A.cpu().double()).norm(), s[4:].norm(),
                               rtol=1e-4, atol=1e-6)
    op = fastlora.FactoredSum(pairs, [0.2, 0.5, 0.3])
    u, s_, vh = fastlora.rsvd(op, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(s_.cpu().double(), s[:4], rtol=1e-4, atol=1e-6)


# --- errors ------------------------------------------------------------------------------------

def test_errors():
    A = torch.randn(10, 6)
    with pytest.raises(ValueError, match=r"rsvd: rank must be in \[1, min\(m, n\)\] = \[1, 6\], got 7"):
        fastlora.rsvd(A, 7)
    with pytest.raises(ValueError, match="rank must be in"):
        fastlora.rsvd(A, 0)
    with pytest.raises(ValueError, match="oversample"):
        fastlora.rsvd(A, 2, oversample=-1)
    with pytest.raises(ValueError, match="n_iter"):
        fastlora.rsvd(A, 2, n_iter=-1)
    with pytest.raises(ValueError, match="empty"):
        fastlora.rsvd(torch.zeros(0, 5), 1)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        fastlora.rsvd(torch.zeros(5), 1)
    with pytest.raises(TypeError, match="floating point"):
        fastlora.rsvd(torch.ones(4, 4, dtype=torch.int64), 1)
    for bad in (float("nan"), float("inf")):
        B = A.clone()
        B[3, 2] = bad
        with pytest.raises(ValueError, match="rsvd: the input contains non-finite"):
            fastlora.rsvd(B, 2)
    b, a = torch.randn(10, 4), torch.randn(4, 6)
    with pytest.raises(ValueError, match="columns must equal"):
        fastlora.svd_factored(b, torch.randn(3, 6))
    with pytest.raises(ValueError, match="must be 2-D"):
        fastlora.svd_factored(b, torch.randn(4))
    with pytest.raises(ValueError, match="empty"):
        fastlora.svd_factored([], [])
    with pytest.raises(ValueError, match="empty"):
        fastlora.svd_factored(torch.randn(0, 4), a)
    with pytest.raises(ValueError, match=r"2 weights for 1 products"):
        fastlora.svd_factored(b, a, [1.0, 2.0])
    with pytest.raises(ValueError, match="weights"):
        fastlora.svd_factored(b, a, [float("nan")])
    a_bad = a.clone()
    a_bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"svd_factored: B/A\[0\]: A contains non-finite"):
        fastlora.svd_factored(b, a_bad)
    with pytest.raises(ValueError, match=r"squeeze: rank must be in \[1, min\(out, in\)\] = \[1, 6\], got 7"):
        fastlora.squeeze(a, b, 7)
    with pytest.raises(ValueError, match="squeeze: rank must be"):
        fastlora.squeeze(a, b, 0)
    with pytest.raises(ValueError, match="lora_B's columns must equal lora_A's rows"):
        fastlora.squeeze(torch.randn(3, 6), b, 2)
    with pytest.raises(ValueError, match="scaling"):
        fastlora.squeeze(a, b, 2, scaling=float("inf"))
    with pytest.raises(ValueError, match="aggregate_lora: client 1: product is 10 x 7"):
        fastlora.aggregate_lora([(a, b), (torch.randn(4, 7), b)], None, 2)
    with pytest.raises(ValueError, match="aggregate_lora: client 1: lora_B contains non-finite"):
        fastlora.aggregate_lora([(a, b), (a, torch.full((10, 4), float("nan")))], None, 2)
    with pytest.raises(ValueError, match="aggregate_lora: factors must not be empty"):
        fastlora.aggregate_lora([], None, 2)
    with pytest.raises(ValueError, match="aggregate_lora: rank must be"):
        fastlora.aggregate_lora([(a, b)], None, 11)
    with pytest.raises(ValueError, match=r"lowrank_truncate: rank must be in \[1, min\(m, n\)\] = \[1, 6\], got 7"):
        fastlora.lowrank_truncate(b, a, rank=7)
    with pytest.raises(ValueError, match=r"lowrank_truncate: 2 B factors but 1 A factors"):
        fastlora.lowrank_truncate([b, b], [a], rank=2)
    with pytest.raises(ValueError, match=r"lowrank_truncate: B/A\[0\]: B contains non-finite"):
        fastlora.lowrank_truncate(torch.full((10, 4), float("inf")), a, rank=2)
    with pytest.raises(ValueError, match="aggregate_lora: weights contain non-finite"):
        fastlora.aggregate_lora([(a, b)], [float("nan")], 2)
    with pytest.raises(ValueError, match="squeeze: lora_A/lora_B: lora_A contains non-finite"):
        fastlora.squeeze(a_bad, b, 2)
    with pytest.raises(ValueError, match="sparse has shape"):
        fastlora.FactoredSum([(a, b)], sparse=SparseDelta(torch.tensor([0]), torch.ones(1),
                                                          Layout([("", (5, 5), torch.float32)], False)))


# --- op plumbing -------------------------------------------------------------------------------

def test_opcheck():
    g = torch.Generator().manual_seed(11)
    Bs = [torch.randn(12, 3, generator=g), torch.randn(12, 5, generator=g, dtype=torch.float64)]
    As = [torch.randn(3, 9, generator=g), torch.randn(5, 9, generator=g)]
    w = torch.tensor([0.5, 2.0])
    torch.library.opcheck(torch.ops.fastlora.svd_factored.default, (Bs, As, w))
    torch.library.opcheck(torch.ops.fastlora.svd_factored.default, ([Bs[0]], [As[0]], w[:1]))
    torch.library.opcheck(torch.ops.fastlora.lowrank_truncate.default, (Bs, As, w, 4))
    torch.library.opcheck(torch.ops.fastlora.lowrank_truncate.default, ([Bs[0]], [As[0]], w[:1], 5))
    A = torch.randn(2, 12, 9, generator=g)
    torch.library.opcheck(torch.ops.fastlora.rsvd.default, (A, torch.randn(2, 9, 6, generator=g), 4, 2))
    torch.library.opcheck(torch.ops.fastlora.rsvd.default, (A[0].half(), torch.randn(9, 6, generator=g), 4, 1))
    for sd in SKETCH_DTYPES:
        torch.library.opcheck(torch.ops.fastlora.rsvd.default, (A, torch.randn(2, 9, 6, generator=g), 4, 1, sd))
    idx, val = torch.tensor([1, 50, 107]), torch.randn(3, generator=g)
    torch.library.opcheck(torch.ops.fastlora.rsvd_implicit.default,
                          (Bs, As, w, idx, val, torch.randn(9, 6, generator=g), 12, 4, 2))
    torch.library.opcheck(torch.ops.fastlora.rsvd_implicit.default,
                          ([], [], torch.zeros(0), idx, val, torch.randn(9, 6, generator=g), 12, 4, 1))


def test_torch_compile_fullgraph():
    g = torch.Generator().manual_seed(12)
    a1, b1 = torch.randn(4, 30, generator=g), torch.randn(20, 4, generator=g)
    a2, b2 = torch.randn(8, 30, generator=g), torch.randn(20, 8, generator=g)
    M, omega = torch.randn(20, 30, generator=g), torch.randn(30, 9, generator=g)

    def server(a1, b1, a2, b2, M, omega):
        A, B = fastlora.aggregate_lora([(a1, b1), (a2, b2)], [0.5, 0.5], 6)
        A2, B2, rel = fastlora.squeeze(A, B, 3)
        U, S, Vh = fastlora.svd_factored([b1, b2], [a1, a2])
        u, s, vh = torch.ops.fastlora.rsvd(M, omega, 5, 2)
        u2, s2, vh2 = torch.ops.fastlora.rsvd(M, omega, 5, 1, torch.bfloat16)
        return B2 @ A2, rel, S, s, s2

    compiled = torch.compile(server, fullgraph=True, backend="aot_eager")
    for x, y in zip(compiled(a1, b1, a2, b2, M, omega), server(a1, b1, a2, b2, M, omega)):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("op", ["squeeze", "aggregate_lora", "svd_factored"])
def test_overflowing_product_raises_like_rsvd(op):
    """Finite factors whose product overflows float32 gave non-finite factors (and rel_error 0)
    silently; rsvd raises on such input, and so do these."""
    A, B = torch.full((2, 8), 1e20), torch.full((8, 2), 1e20)
    calls = {"squeeze": lambda: fastlora.squeeze(A, B, 1),
             "aggregate_lora": lambda: fastlora.aggregate_lora([(A, B)], rank=1),
             "svd_factored": lambda: fastlora.svd_factored(B, A)}
    with pytest.raises(ValueError, match=rf"^{op}: .* overflows torch.float32"):
        calls[op]()
    # the same factors scaled down are fine
    A, B = A * 1e-18, B * 1e-18
    assert all(torch.isfinite(t).all() for t in fastlora.squeeze(A, B, 1)[:2])
