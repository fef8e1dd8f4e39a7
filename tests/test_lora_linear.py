"""fastlora.lora_linear (CPU C++ kernel) against fastlora.reference."""
import importlib
import pytest
import torch

import fastlora
from fastlora import reference as ref
from tolerance import assert_close_to_truth
lora_ops = importlib.import_module("fastlora.ops.lora_linear")  # the module, not the function

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (leading dims, in, out, r): 1 row, odd sizes, leading batch dims, r in {1, 8, 64}; a few rows
# over wide in/out (the CPU kernel then splits columns across threads, several column chunks);
# 29 rows: on 2 threads, 8-row blocks (the CPU backward leaves dY @ W to the BLAS), while the
# 300- and 431-row shapes get blocks tall enough for its own fused base product.
SHAPES = [((1,), 6, 42, 1), ((42,), 123, 431, 8), ((2, 3), 42, 6, 8), ((431,), 64, 123, 64),
          ((300,), 123, 42, 8), ((5,), 600, 530, 16), ((29,), 50, 60, 4)]


def make_inputs(lead, k, n, r, dtype, bias=True, lora_B_bias=False, train_weight=False,
                noncontig=False, noncontig_weight=False):
    g = torch.Generator().manual_seed(1)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale)

    if noncontig:  # every other column of a wider tensor
        x = rnd(*lead, 2 * k)[..., ::2]
    else:
        x = rnd(*lead, k)
    weight = rnd(n, 2 * k, scale=k ** -0.5)[:, ::2] if noncontig_weight else rnd(n, k, scale=k ** -0.5)
    t = dict(x=x, weight=weight, bias=rnd(n) if bias else None,
             lora_A=rnd(r, k, scale=k ** -0.5), lora_B=rnd(n, r, scale=r ** -0.5),
             lora_B_bias=rnd(n) if lora_B_bias else None)
    grads = {"x", "lora_A", "lora_B", "bias", "lora_B_bias"} | ({"weight"} if train_weight else set())
    return t, grads


ADAPTERS = ("lora_A", "lora_B", "lora_B_bias")


def cast(t, dtype, grads, adapter_dtype=None):
    """The inputs in dtype; the adapters in adapter_dtype (default dtype)."""
    out = {}
    for key, v in t.items():
        if v is None:
            out[key] = None
            continue
        c = v.detach().to(adapter_dtype or dtype if key in ADAPTERS else dtype)
        if key in ("x", "weight") and not v.is_contiguous():  # keep the layout in every dtype
            c = torch.empty(*v.shape[:-1], 2 * v.shape[-1], dtype=dtype)[..., ::2].copy_(c)
        out[key] = c.requires_grad_(key in grads)
    return out


def run(fn, t, grad_out, scaling, p, seed):
    y = fn(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], scaling, p,
           seed=seed, lora_B_bias=t["lora_B_bias"])
    names = [k for k, v in t.items() if v is not None and v.requires_grad]
    grads = torch.autograd.grad(y, [t[k] for k in names], grad_out.to(y.dtype)) if y.numel() else []
    return y, dict(zip(names, grads))


def fused(x, weight, bias, lora_A, lora_B, scaling, p, seed, lora_B_bias):
    return fastlora.lora_linear(x, weight, bias, lora_A, lora_B, scaling, p, seed=seed,
                                lora_B_bias=lora_B_bias)


def reference(x, weight, bias, lora_A, lora_B, scaling, p, seed, lora_B_bias):
    return ref.lora_linear(x, weight, bias, lora_A, lora_B, scaling, p, seed, lora_B_bias)


def check_against_reference(dtype, lead, k, n, r, p, adapter_dtype=None, **kw):
    """The op's outputs and gradients against the float64 truth, within twice the error of the
    reference in the same dtypes (with adapter_dtype: PEFT's mixed computation, see
    fastlora.reference.lora_linear)."""
    t64, grads = make_inputs(lead, k, n, r, torch.float64, **kw)
    grad_out = torch.randn(*lead, n, dtype=torch.float64)
    scaling, seed = 2.0, 987654321
    truth_y, truth_g = run(reference, cast(t64, torch.float64, grads), grad_out, scaling, p, seed)
    ref_y, ref_g = run(reference, cast(t64, dtype, grads, adapter_dtype), grad_out, scaling, p, seed)
    out_y, out_g = run(fused, cast(t64, dtype, grads, adapter_dtype), grad_out, scaling, p, seed)
    assert_close_to_truth(out_y, ref_y, truth_y, "y")
    assert out_g.keys() == truth_g.keys()
    for name in truth_g:
        assert_close_to_truth(out_g[name], ref_g[name], truth_g[name], f"grad {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_matches_reference(dtype, shape, p):
    check_against_reference(dtype, *shape, p)


# The float32 backward computes dY @ W fused with the LoRA terms in small_gemm (AVX-512 build)
# or leaves it to the BLAS (other builds, and CPUs whose MKL runs AVX-512 kernels: Intel). Both
# plans, forced, on shapes with row blocks of >= 16 rows (the fused product's) and without.
@pytest.mark.parametrize("blas_avx512", [0, 1], ids=["fused_plan", "mkl_avx512_plan"])
@pytest.mark.parametrize("shape", [((300,), 124, 42, 5), ((431,), 64, 123, 64), ((5,), 40, 66, 3)], ids=str)
def test_float32_backward_plans(blas_avx512, shape):
    previous = torch.ops.fastlora._set_blas_avx512_plan(blas_avx512)
    try:
        check_against_reference(torch.float32, *shape, 0.25, train_weight=True)
    finally:
        torch.ops.fastlora._set_blas_avx512_plan(previous)


def test_blas_plan_override_rejects_bad_modes():
    with pytest.raises(RuntimeError, match="mode must be -1, 0 or 1"):
        torch.ops.fastlora._set_blas_avx512_plan(2)


# bfloat16 shapes with even in / out features (on a CPU with AVX512-BF16 the rank-r products run
# in the project's bf16 kernel, which reads x and dY in pairs): row blocks on every thread, odd
# ranks, odd row counts, a decode-sized batch, trainable weight and lora_B bias.
@pytest.mark.parametrize("shape", [((300,), 124, 42, 5), ((431,), 64, 122, 64), ((3, 3), 40, 66, 3),
                                   ((8,), 512, 256, 16)], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_bfloat16_even_features(shape, p):
    check_against_reference(torch.bfloat16, *shape, p, lora_B_bias=True, train_weight=True)


def test_bfloat16_rows_at_odd_strides_match_contiguous():
    """x and dY whose rows start at odd element offsets (a narrowed wider tensor): the same bits
    as contiguous copies (the bf16 kernel's pair loads do not assume alignment)."""
    g = torch.Generator().manual_seed(3)
    mk = lambda *s: torch.randn(*s, generator=g).bfloat16()  # noqa: E731
    M, K, N, r = 70, 48, 34, 6
    x_wide, dy_wide = mk(M, K + 1), mk(M, N + 1)
    x, dy = x_wide[:, 1:], dy_wide[:, :N]
    W, b, A, B = mk(N, K), mk(N), mk(r, K), mk(N, r)
    seed = torch.tensor(5)
    ops = torch.ops.fastlora
    outs = []
    for xi, dyi in ((x, dy), (x.contiguous(), dy.contiguous())):
        y, xa = ops.lora_linear_fwd(xi, W, b, A, B, 0.5, 0.2, seed, None)
        grads = ops.lora_linear_bwd(dyi, xi, W, A, B, xa, 0.5, 0.2, seed, [True, False, False])
        outs.append((y, xa, grads[0], grads[3], grads[4]))
    for got, want in zip(*outs):
        assert torch.equal(got, want)


# Batches of at most 32 rows: on AVX-512 CPUs with native bf16 GEMMs the bfloat16 LoRA part runs
# its decode kernels (broadcast FMAs on the operands in place, groups of up to 8 rows), for
# bfloat16 adapters and PEFT's default float32 ones: every group size from 1 to 8, several groups
# (d lora_A / d lora_B summed across them), odd ranks and ranks over 16 with a tail, in / out
# features across the kernels' column chunks (256 / 512) with tails, odd in / out features,
# dropout, and a lora_B bias and trainable weight.
@pytest.mark.parametrize("shape", [((1,), 40, 66, 3), ((2,), 522, 1030, 40), ((3,), 34, 520, 17),
                                   ((2, 2), 64, 34, 16), ((5,), 258, 18, 1), ((2, 3), 44, 516, 33),
                                   ((7,), 30, 40, 8), ((8,), 512, 256, 64), ((3, 4), 522, 1030, 17),
                                   ((29,), 258, 66, 40), ((32,), 64, 34, 16), ((3,), 41, 67, 5),
                                   ((11,), 257, 515, 17)], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("adapter_dtype", [None, torch.float32], ids=["bf16_adapters", "fp32_adapters"])
def test_bfloat16_decode_sized_batches(shape, p, adapter_dtype):
    check_against_reference(torch.bfloat16, *shape, p, adapter_dtype=adapter_dtype, lora_B_bias=True,
                            train_weight=True)


# float16 batches of 9 to 128 rows: on CPUs with native float16 GEMMs (AVX512-FP16) their base
# products run in ATen's float16 GEMMs and the LoRA products in float32 (fp16_native_plan in
# csrc/cpu/lora_linear_blocks.h); 8 and 129 rows are the plans on either side. float16 and
# PEFT's default float32 adapters, odd sizes, a trainable weight and lora_B's bias.
@pytest.mark.parametrize("shape", [((9,), 40, 66, 3), ((16,), 123, 431, 8), ((33,), 64, 123, 64),
                                   ((2, 32), 96, 40, 16), ((128,), 42, 100, 5), ((8,), 64, 77, 4),
                                   ((129,), 48, 36, 4)], ids=str)
@pytest.mark.parametrize("adapter_dtype", [None, torch.float32], ids=["float16_adapters", "float32_adapters"])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_float16_batches_of_9_to_128_rows(shape, adapter_dtype, p):
    check_against_reference(torch.float16, *shape, p, adapter_dtype=adapter_dtype, lora_B_bias=True,
                            train_weight=True)


# Without native bf16 GEMMs the batch runs through MKL's float32 GEMMs instead, whose bits
# depend on the thread count (and, under MKL's AVX2 code, on the buffers' alignment).
@pytest.mark.skipif(not fastlora.cpu.native_bf16_matmul(),
                    reason="the bf16 decode kernels run only where bf16 GEMMs are native")
@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_bfloat16_decode_same_bits_on_any_thread_count(adapter_dtype):
    """Decode-sized bfloat16 batches split their columns over the threads and add partial sums
    in a fixed order: the same bits on 1, 2 and 3 threads, forward and backward, and the same
    adapter gradients whether or not dX is asked for."""
    g = torch.Generator().manual_seed(4)
    mk = lambda *s: torch.randn(*s, generator=g).bfloat16()  # noqa: E731
    M, K, N, r = 21, 522, 1030, 17  # three row groups
    x, dy, W, b = mk(M, K), mk(M, N), mk(N, K), mk(N)
    A, B = mk(r, K).to(adapter_dtype), mk(N, r).to(adapter_dtype)
    seed = torch.tensor(11)
    ops = torch.ops.fastlora
    prev = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            y, xa = ops.lora_linear_fwd(x, W, b, A, B, 0.5, 0.3, seed, None)
            for need_x in (True, False):
                grads = ops.lora_linear_bwd(dy, x, W, A, B, xa, 0.5, 0.3, seed, [need_x, False, False])
                outs.append((y, xa, grads[0] if need_x else None, grads[3], grads[4]))
    finally:
        torch.set_num_threads(prev)
    for got in outs[1:]:
        for a, b in zip(got, outs[0]):
            assert a is None or torch.equal(a, b)


# Ranks above 64 on batches of at least 64 rows: the float32 shrink and the backward's rank-r
# products go to whole-batch BLAS GEMMs (dropout(x) materialised, the mask applied to dX's LoRA
# term in the same pass); bfloat16 without native bf16 GEMMs and float16 reach them through
# their float32 copies. Rank 80 (not a multiple of the vector width) and 64 (the last small_gemm
# rank); 210 rows, 64 (the first BLAS row count) and 63; strided x and weight rows, a trainable
# weight and a lora_B bias; 1 and 2 threads.
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("lead", [(3, 70), (64,), (63,)], ids=str)
@pytest.mark.parametrize("r", [64, 80])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ranks_above_small_gemm_through_the_blas(threads, lead, r, p, dtype):
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_against_reference(dtype, lead, 150, 130, r, p, lora_B_bias=True, noncontig=True,
                                noncontig_weight=True, train_weight=True)
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noncontiguous_x_trainable_weight_lora_bias(dtype):
    check_against_reference(dtype, (5, 7), 42, 123, 8, 0.1, noncontig=True, train_weight=True,
                            lora_B_bias=True)


# PEFT's default on a half-precision model: float32 adapters (autocast_adapter_dtype=True).
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_float32_adapters_on_half_input_match_reference(dtype, shape, p):
    check_against_reference(dtype, *shape, p, adapter_dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_float32_adapters_noncontiguous_trainable_weight_lora_bias(dtype):
    check_against_reference(dtype, (5, 7), 42, 123, 8, 0.1, adapter_dtype=torch.float32, noncontig=True,
                            train_weight=True, lora_B_bias=True)
    check_against_reference(dtype, (0, 3), 42, 12, 8, 0.1, adapter_dtype=torch.float32, lora_B_bias=True)
    # rows for every thread: a bfloat16 x is converted block by block inside the kernels
    check_against_reference(dtype, (20, 15), 41, 70, 5, 0.1, adapter_dtype=torch.float32, noncontig=True,
                            train_weight=True, lora_B_bias=True)


def test_float32_adapters_dtypes_and_saved_activations():
    """Outputs in x's dtype, xa and the adapters' gradients in float32, the base gradients in
    the base's dtype; saved for backward: x itself (no float32 copy) and the M x r xa."""
    m, k, n, r = 64, 48, 40, 4
    x = torch.randn(m, k).bfloat16().requires_grad_()
    w = torch.randn(n, k).bfloat16().requires_grad_()
    b = torch.randn(n).bfloat16().requires_grad_()
    A, B = torch.randn(r, k, requires_grad=True), torch.randn(n, r, requires_grad=True)
    Bb = torch.randn(n, requires_grad=True)
    y, xa = torch.ops.fastlora.lora_linear_fwd(x.detach(), w.detach(), b.detach(), A.detach(), B.detach(), 0.5,
                                               0.1, torch.tensor(3), Bb.detach())
    assert y.dtype == torch.bfloat16 and xa.dtype == torch.float32
    saved = saved_activation_bytes(lambda: fastlora.lora_linear(x, w, b, A, B, 0.5, 0.1, lora_B_bias=Bb)
                                   .float().sum().backward())
    leaves = {id(t) for t in (w, A, B)}
    acts = [t for t in saved if id(t) not in leaves and t.numel() > 1]
    assert sorted((tuple(t.shape), t.dtype) for t in acts) == sorted(
        [((m, k), torch.bfloat16), ((m, r), torch.float32)])
    assert any(t.data_ptr() == x.data_ptr() for t in acts)
    assert [t.grad.dtype for t in (x, w, b, A, B, Bb)] == [torch.bfloat16] * 3 + [torch.float32] * 3


@pytest.mark.parametrize("x_dtype, adapter_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16),
                                                    (torch.float16, torch.float64), (torch.float64, torch.float32)])
def test_other_adapter_dtypes_are_refused(x_dtype, adapter_dtype):
    x, w = torch.randn(3, 8, dtype=x_dtype), torch.randn(6, 8, dtype=x_dtype)
    A, B = torch.randn(2, 8, dtype=adapter_dtype), torch.randn(6, 2, dtype=adapter_dtype)
    with pytest.raises(TypeError, match="lora_A has dtype .* float32 when x is float16 / bfloat16"):
        fastlora.lora_linear(x, w, None, A, B, 1.0)
    with pytest.raises(TypeError, match="lora_B has dtype .* share one dtype"):
        fastlora.lora_linear(x, w, None, torch.randn(2, 8, dtype=x_dtype), B, 1.0)


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_no_bias(p):
    check_against_reference(torch.float32, (33,), 42, 17, 4, p, bias=False, lora_B_bias=True)


# in / out features whose rows are a multiple of 1 KiB (256 / 512 float32, 128 float64): the
# backward's row blocks read lora_A and the dropped x block at a padded row stride, and the dY
# block too (float32 dY copied into it from rank 32 with AVX2; bfloat16 dY converted into it
# where bf16 GEMMs are native, elsewhere bfloat16 runs the float32 path on float32 copies); with
# dropout and without, and bfloat16 x under float32 adapters.
@pytest.mark.parametrize("case", [(torch.float32, None, (300,), 256, 40, 8), (torch.float32, None, (160,), 512, 24, 16),
                                  (torch.float32, None, (200,), 40, 256, 32), (torch.float32, None, (130,), 256, 512, 33),
                                  (torch.bfloat16, torch.float32, (300,), 256, 40, 8),
                                  (torch.bfloat16, torch.float32, (300,), 40, 256, 8)], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_backward_blocks_at_1kib_row_multiples(case, p):
    dtype, adapter_dtype, lead, k, n, r = case
    check_against_reference(dtype, lead, k, n, r, p, adapter_dtype=adapter_dtype)


def test_gradcheck_fp64_blocks_at_1kib_row_multiples():
    # The same padded stride in float64 (128 features: 1 KiB rows), row blocks, dropout.
    t, grads = make_inputs((300,), 128, 10, 5, torch.float64)
    t = cast(t, torch.float64, grads)
    seed = torch.tensor(11)

    def f(x, lora_A, lora_B):
        return fastlora.lora_linear(x, t["weight"], t["bias"], lora_A, lora_B, 0.7, 0.25, seed=seed)

    assert torch.autograd.gradcheck(f, tuple(t[k] for k in ("x", "lora_A", "lora_B")), fast_mode=True)


def test_large_rows_span_several_blocks():
    # More rows than one CPU row block, so block boundaries and the mask's row offsets matter.
    check_against_reference(torch.float32, (1100,), 300, 40, 8, 0.3)


@pytest.mark.parametrize("threads", [2, 3])
def test_row_blocks_rebalanced_between_threads(threads):
    # 1000-1024 rows of 390 features make 7 L2-sized row blocks; the blocks are made smaller so
    # that they split evenly between the threads (1024 rows: 8 of 128 on 2 threads, 9 of 120 on
    # 3 with a short last one), in the forward's shrink and in the backward's pass.
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_against_reference(torch.float32, (1024,), 390, 390, 8, 0.1)
        check_against_reference(torch.float32, (1000,), 390, 200, 16, 0.0, bias=False)
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("threads", [1, 2])
def test_backward_with_fused_base_product(threads):
    # Row blocks of >= 16 rows: the CPU backward then computes dY @ W itself, on top of the
    # masked LoRA term of each block, from a transposed copy of the dY block (tail block of 95
    # rows, not a multiple of the 4-row transpose groups); a weight whose rows are strided.
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_against_reference(torch.float32, (431,), 77, 130, 8, 0.2, noncontig_weight=True)
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_decode_sized_batch(p):
    # Few rows for 2 threads (20: x^T padded to two float32 vectors): the CPU forward computes
    # y^T = W @ x^T over tasks of W's rows with the expand and the bias in each task, and the
    # backward splits W's rows across the threads for dY @ W (per-thread partials); strided
    # weight rows, no base bias but a lora_B bias, odd in / out (not multiples of the 8-row
    # tasks).
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        check_against_reference(torch.float32, (4, 5), 201, 99, 8, p, bias=False, lora_B_bias=True,
                                noncontig_weight=True)
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [((100,), 600, 530, 16), ((3, 11), 257, 70, 64), ((128,), 48, 300, 5),
                                   ((4, 8), 300, 70, 8)], ids=str)
def test_backward_column_split_for_batches_of_up_to_128_rows(threads, shape):
    # Batches of up to 128 rows split the backward's columns between the threads (tasks of 256
    # columns, tails included) and compute g = s dY @ B in chunks of 16 rows (tails of 4 and 1);
    # dY @ W comes from the split-k product or the BLAS depending on the rows and the build
    # (33 rows: just past the AVX-512 split-k limit of 32). 32 rows with row blocks for every
    # thread: the AVX-512 forward streams W's rows (base_few_rows) there too.
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_against_reference(torch.float32, *shape, 0.3, lora_B_bias=True, noncontig_weight=True)
    finally:
        torch.set_num_threads(prev)


def test_gradcheck_fp64_fused_base_product():
    # The same path in float64 (x needs a gradient and the row blocks are >= 16 rows on one
    # thread): fast-mode gradcheck keeps the 257-row input cheap.
    t, grads = make_inputs((257,), 9, 7, 2, torch.float64, train_weight=True, noncontig_weight=True)
    t = cast(t, torch.float64, grads)
    seed = torch.tensor(3)

    def f(x, weight, lora_A, lora_B):
        return fastlora.lora_linear(x, weight, t["bias"], lora_A, lora_B, 0.7, 0.25, seed=seed)

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.autograd.gradcheck(f, tuple(t[k] for k in ("x", "weight", "lora_A", "lora_B")),
                                        fast_mode=True)
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("isa", ["auto", "avx512", "avx2", "baseline"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_in_features(isa, dtype):
    # in_features = 0 (an empty weight): y is the bias, on every build's small-batch plans (the
    # float16 / bfloat16 ones must not take the float32-only paths that empty weights skip to).
    best = fastlora.use_cpu_isa("auto")
    try:
        fastlora.use_cpu_isa(isa)
        for rows in (3, 40):
            x = torch.randn(rows, 0, dtype=dtype, requires_grad=True)
            W, b = torch.randn(5, 0, dtype=dtype), torch.randn(5, dtype=dtype)
            A, B = torch.randn(2, 0, dtype=dtype, requires_grad=True), torch.randn(5, 2, dtype=dtype, requires_grad=True)
            y = fastlora.lora_linear(x, W, b, A, B, 0.5, 0.0)
            assert y.dtype == dtype and torch.equal(y, b.expand(rows, 5))
            y.sum().backward()
            assert x.grad.shape == (rows, 0) and torch.equal(B.grad, torch.zeros_like(B))
    finally:
        fastlora.use_cpu_isa(best)


def test_empty_input():
    t, _ = make_inputs((0,), 16, 8, 4, torch.float32)
    x = t["x"].float().requires_grad_()
    A = t["lora_A"].float().requires_grad_()
    y = fastlora.lora_linear(x, t["weight"].float(), None, A, t["lora_B"].float(), 1.0, 0.1)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 16) and torch.equal(A.grad, torch.zeros_like(A))


def test_dropout_mask_is_the_reference_mask_bit_for_bit():
    # With A = B = I and W = 0, the op returns dropout(x) exactly.
    m, k = 700, 37
    x = torch.randn(m, k)
    eye = torch.eye(k)
    for p, seed in [(0.1, 1), (0.5, 2 ** 40 + 3), (0.9, 123)]:
        y = fastlora.lora_linear(x, torch.zeros(k, k), None, eye, eye, 1.0, p, seed=seed)
        assert torch.equal(y, ref.dropout(x, p, seed))


def test_dropout_mask_statistics():
    m, k, p = 512, 1024, 0.3
    keep = ref.dropout_keep_mask(m, k, p, seed=42)
    n = keep.numel()
    frac = keep.double().mean().item()
    assert abs(frac - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    # Rows and columns are independent: neighbouring entries are uncorrelated.
    kf = keep.double() - keep.double().mean()
    for a, b in [(kf[:, 1:], kf[:, :-1]), (kf[1:], kf[:-1])]:
        corr = (a * b).mean() / kf.var()
        assert abs(corr.item()) < 5 / n ** 0.5
    # Different seeds give different masks, and dropout preserves the mean.
    assert (keep != ref.dropout_keep_mask(m, k, p, seed=43)).double().mean() > 0.3
    x = torch.ones(m, k)
    y = fastlora.lora_linear(x, torch.zeros(k, k), None, torch.eye(k), torch.eye(k), 1.0, p, seed=5)
    assert abs(y.mean().item() - 1.0) < 0.01


def test_seed_reproducibility_and_modes():
    t, _ = make_inputs((64,), 32, 16, 4, torch.float32)
    args = [t[k].float() for k in ("x", "weight", "bias", "lora_A", "lora_B")]
    torch.manual_seed(3)
    a = fastlora.lora_linear(*args, 1.0, 0.5)
    torch.manual_seed(3)
    b = fastlora.lora_linear(*args, 1.0, 0.5)
    c = fastlora.lora_linear(*args, 1.0, 0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    no_drop = fastlora.lora_linear(*args, 1.0, 0.0)
    assert torch.equal(fastlora.lora_linear(*args, 1.0, 0.5, training=False), no_drop)
    base = torch.nn.functional.linear(args[0], args[1], args[2])
    assert torch.allclose(fastlora.lora_linear(*args, 1.0, 1.0), base)


def test_same_mask_in_forward_and_backward():
    # grad of lora_A is g^T @ dropout(x): compare with the reference using the same seed.
    t, grads = make_inputs((50,), 20, 10, 3, torch.float64)
    out, g = run(fused, cast(t, torch.float64, grads), torch.ones(50, 10, dtype=torch.float64), 1.0, 0.5, 77)
    ref_out, rg = run(reference, cast(t, torch.float64, grads), torch.ones(50, 10, dtype=torch.float64), 1.0, 0.5, 77)
    torch.testing.assert_close(g["lora_A"], rg["lora_A"])
    torch.testing.assert_close(g["x"], rg["x"])


def saved_activation_bytes(fn):
    """Bytes of tensors autograd saves for backward, excluding leaves (parameters, inputs)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def test_saves_only_x_and_shrink():
    m, k, n, r = 256, 128, 96, 8
    x = torch.randn(m, k, requires_grad=True)
    w, A, B = torch.randn(n, k), torch.randn(r, k, requires_grad=True), torch.randn(n, r, requires_grad=True)
    saved = saved_activation_bytes(lambda: fastlora.lora_linear(x, w, None, A, B, 1.0, 0.1))
    params = {id(w), id(A), id(B)}
    acts = [t for t in saved if id(t) not in params and t.numel() > 1]
    assert sorted(tuple(t.shape) for t in acts) == sorted([(m, k), (m, r)])
    assert any(t.data_ptr() == x.data_ptr() for t in acts)  # x itself, not a copy


def test_frozen_weight_skips_dW_gemm():
    m, k, n, r = 64, 48, 40, 4
    x = torch.randn(m, k, requires_grad=True)
    w = torch.randn(n, k)
    A, B = torch.randn(r, k, requires_grad=True), torch.randn(n, r, requires_grad=True)
    for trainable in (False, True):
        w.requires_grad_(trainable)
        y = fastlora.lora_linear(x, w, None, A, B, 1.0, 0.0)
        with torch.profiler.profile(record_shapes=True) as prof:
            y.sum().backward()
        dW_gemms = [e for e in prof.events() if e.name == "aten::mm" and e.input_shapes == [[n, m], [m, k]]]
        assert bool(dW_gemms) == trainable
        if trainable:
            assert w.grad.shape == (n, k)
        else:
            assert w.grad is None


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_fp64(p):
    t, grads = make_inputs((3, 2), 7, 5, 3, torch.float64, lora_B_bias=True, train_weight=True)
    t = cast(t, torch.float64, grads)
    seed = torch.tensor(11)

    def f(x, weight, bias, lora_A, lora_B, lora_B_bias):
        return fastlora.lora_linear(x, weight, bias, lora_A, lora_B, 0.7, p, seed=seed,
                                    lora_B_bias=lora_B_bias)

    assert torch.autograd.gradcheck(f, tuple(t[k] for k in ("x", "weight", "bias", "lora_A", "lora_B", "lora_B_bias")))


def op_samples():
    for p in (0.0, 0.2):
        for dtype, adapter_dtype in ((torch.float32, None), (torch.float64, None), (torch.bfloat16, torch.float32),
                                     (torch.float16, torch.float32)):
            t, grads = make_inputs((9,), 12, 10, 4, dtype, lora_B_bias=True)
            t = cast(t, dtype, grads, adapter_dtype)
            yield t, p


def test_opcheck_all_ops():
    for t, p in op_samples():
        seed = torch.tensor(5)
        args = (t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 1.5, p, True, t["lora_B_bias"], seed)
        torch.library.opcheck(torch.ops.fastlora.lora_linear.default, args)
        fwd_args = (t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 1.5, p, seed, t["lora_B_bias"])
        torch.library.opcheck(torch.ops.fastlora.lora_linear_fwd.default, fwd_args)
        detached = {k: (v.detach() if v is not None else None) for k, v in t.items()}
        _, xa = torch.ops.fastlora.lora_linear_fwd(*[detached[k] if isinstance(k, str) else k for k in
                                                     ("x", "weight", "bias", "lora_A", "lora_B")], 1.5, p, seed,
                                                   detached["lora_B_bias"])
        gy = torch.randn(9, 10, dtype=t["x"].dtype)
        for mask in ([True, False, False], [True, True, True], [False, False, False]):
            torch.library.opcheck(torch.ops.fastlora.lora_linear_bwd.default,
                                  (gy, detached["x"], detached["weight"], detached["lora_A"], detached["lora_B"],
                                   xa, 1.5, p, seed, mask))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("dtypes", [(torch.float32, None), (torch.bfloat16, torch.float32)], ids=str)
def test_torch_compile_fullgraph(backend, dtypes):
    t, grads = make_inputs((4, 5), 24, 16, 4, torch.float32)
    t = cast(t, *dtypes[:1], grads, dtypes[1])
    seed = torch.tensor(3)

    def layer(x, weight, bias, lora_A, lora_B):
        return torch.relu(fastlora.lora_linear(x, weight, bias, lora_A, lora_B, 2.0, 0.1, seed=seed)) * 3

    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    args = [t[k] for k in ("x", "weight", "bias", "lora_A", "lora_B")]
    y_c = compiled(*args)
    y_e = layer(*args)
    torch.testing.assert_close(y_c, y_e)
    g_c = torch.autograd.grad(y_c.sum(), [t["x"], t["lora_A"]])
    g_e = torch.autograd.grad(y_e.sum(), [t["x"], t["lora_A"]])
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)


def test_torch_compile_draws_seed_from_generator():
    t, grads = make_inputs((32,), 24, 16, 4, torch.float32)
    t = cast(t, torch.float32, grads)
    f = torch.compile(lambda *a: fastlora.lora_linear(*a, 1.0, 0.5), fullgraph=True, backend="aot_eager")
    args = [t[k] for k in ("x", "weight", "bias", "lora_A", "lora_B")]
    a, b = f(*args), f(*args)
    assert not torch.equal(a, b)  # a fresh mask per call, not a seed baked into the graph


class TestErrors:
    def args(self, **over):
        k, n, r = 8, 6, 2
        a = dict(x=torch.randn(3, k), weight=torch.randn(n, k), bias=torch.randn(n),
                 lora_A=torch.randn(r, k), lora_B=torch.randn(n, r), scaling=1.0)
        a.update(over)
        return a

    @pytest.mark.parametrize("over, exc, match", [
        (dict(x=torch.randn(3, 9)), ValueError, "in_features=8"),
        (dict(weight=torch.randn(6)), ValueError, "weight must be 2-D"),
        (dict(lora_A=torch.randn(2, 7)), ValueError, "lora_A must have shape"),
        (dict(lora_B=torch.randn(6, 3)), ValueError, "lora_B must have shape"),
        (dict(bias=torch.randn(5)), ValueError, "bias must have shape"),
        (dict(lora_A=torch.randn(2, 8, dtype=torch.float64)), TypeError, "lora_A has dtype"),
        (dict(x=torch.randn(3, 8).half()), TypeError, "weight has dtype"),
        (dict(x=torch.randint(0, 3, (3, 8))), TypeError, "x must be float"),
        (dict(scaling=float("nan")), ValueError, "scaling must be finite"),
        (dict(x=torch.tensor(1.0)), ValueError, "at least 1 dim"),
    ])
    def test_bad_arguments(self, over, exc, match):
        with pytest.raises(exc, match=match):
            fastlora.lora_linear(**self.args(**over))

    @pytest.mark.parametrize("p", [-0.1, 1.5])
    def test_bad_dropout(self, p):
        with pytest.raises(ValueError, match="dropout_p"):
            fastlora.lora_linear(**self.args(), dropout_p=p)

    def test_bad_seed(self):
        with pytest.raises(ValueError, match="seed"):
            fastlora.lora_linear(**self.args(), dropout_p=0.1, seed=torch.tensor([1.0, 2.0]))
        with pytest.raises(TypeError, match="seed must be an int or a one-element int64 tensor, got float"):
            fastlora.lora_linear(**self.args(), dropout_p=0.1, seed=1.5)
        with pytest.raises(ValueError, match="seed must fit in int64"):
            fastlora.lora_linear(**self.args(), dropout_p=0.1, seed=2 ** 64)
        with pytest.raises(ValueError, match="on the CPU or on x's device"):
            fastlora.lora_linear(**self.args(), dropout_p=0.1, seed=torch.tensor(1, device="meta"))

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
    def test_zero_in_features_is_the_bias(self, dtype):
        # x (..., 0): an empty sum; y is the bias, and the gradients are empty or zero.
        x = torch.randn(2, 3, 0, dtype=dtype, requires_grad=True)
        A = torch.randn(2, 0, dtype=dtype, requires_grad=True)
        B = torch.randn(4, 2, dtype=dtype, requires_grad=True)
        b = torch.randn(4, dtype=dtype)
        y = fastlora.lora_linear(x, torch.randn(4, 0, dtype=dtype), b, A, B, 1.0, 0.1)
        assert torch.equal(y, b.expand(2, 3, 4))
        y.sum().backward()
        assert x.grad.shape == x.shape and A.grad.shape == A.shape and not B.grad.any()

    # The raw kernel ops check what they are given too (a raw call with mismatched shapes must
    # be an error, never a read past a tensor's end), on CPU (C++) and through the kernels
    # registered from Python (the reference serves any other device; CUDA shares the check).
    SEED = torch.tensor(1)

    def fwd_args(self, **over):
        a = self.args(**over)
        return [a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], a["scaling"], 0.0, self.SEED,
                over.get("lora_B_bias")]

    def bwd_args(self, grad_y=None, xa=None, **over):
        a = self.args(**over)
        m, n, r = a["x"].shape[0], a["weight"].shape[0], a["lora_A"].shape[0]
        grad_y = torch.randn(m, n) if grad_y is None else grad_y
        xa = torch.randn(m, r) if xa is None else xa
        return [grad_y, a["x"], a["weight"], a["lora_A"], a["lora_B"], xa, 1.0, 0.0, self.SEED]

    def test_check_ops_pass_opcheck(self):
        # the kernels' argument checks are ops too (metadata only: they run under fake tensors)
        torch.library.opcheck(torch.ops.fastlora._lora_linear_fwd_check.default, self.fwd_args())
        torch.library.opcheck(torch.ops.fastlora._lora_linear_bwd_check.default, self.bwd_args())

    @pytest.mark.parametrize("kernel", ["cpu", "reference"])
    @pytest.mark.parametrize("over, match", [
        (dict(lora_B=torch.randn(6, 1)), "lora_B must have shape"),
        (dict(lora_A=torch.randn(2, 5)), "lora_A must have shape"),
        (dict(x=torch.randn(3, 5)), "in_features=8"),
        (dict(x=torch.randn(2, 3, 8)), "x must be 2-D"),
        (dict(bias=torch.randn(9)), "bias must have shape"),
        (dict(lora_B_bias=torch.randn(2)), "lora_B_bias must have shape"),
    ])
    def test_raw_forward_checks_shapes(self, kernel, over, match):
        args = self.fwd_args(**over)
        call = torch.ops.fastlora.lora_linear_fwd if kernel == "cpu" else lora_ops._fwd_reference
        with pytest.raises(ValueError, match=match):
            call(*args)

    @pytest.mark.parametrize("kernel", ["cpu", "reference"])
    @pytest.mark.parametrize("over, match", [
        (dict(grad_y=torch.randn(3, 5)), "grad_y must have shape"),
        (dict(grad_y=torch.randn(4, 6)), "grad_y must have shape"),
        (dict(xa=torch.randn(3, 7)), "xa must have shape"),
        (dict(lora_B=torch.randn(6, 1)), "lora_B must have shape"),
        (dict(xa=torch.randn(3, 2).double()), "xa has dtype"),
    ])
    def test_raw_backward_checks_shapes(self, kernel, over, match):
        args = self.bwd_args(**over)
        if kernel == "cpu":
            call = lambda *a: torch.ops.fastlora.lora_linear_bwd(*a, [True, True, True])  # noqa: E731
        else:
            call = lambda *a: lora_ops._bwd_reference(*a, [True, True, True])  # noqa: E731
        with pytest.raises((ValueError, TypeError), match=match):
            call(*args)


def test_decode_sized_float16_at_the_native_level():
    """At the machine's own kernel level too, a decode-sized float16 step reads the float16
    weight as it is (from AVX2 up in the row kernels, csrc/cpu/rows_dot.cpp): outputs within one
    float16 rounding of the float32 op's, gradients of the adapters exactly its rounded ones."""
    g = torch.Generator().manual_seed(7)
    mk = lambda *s: torch.randn(*s, generator=g).half()  # noqa: E731
    x, W, b, gy, A, B = mk(8, 300), mk(77, 300), mk(77), mk(8, 77), mk(4, 300), mk(77, 4)
    seed = torch.tensor(5)
    f32 = lambda *ts: [t.float() for t in ts]  # noqa: E731
    fwd, bwd = torch.ops.fastlora.lora_linear_fwd, torch.ops.fastlora.lora_linear_bwd
    y, xa = fwd(x, W, b, A, B, 0.5, 0.3, seed, None)
    y32, xa32 = fwd(*f32(x, W, b, A, B), 0.5, 0.3, seed, None)
    assert y.dtype == torch.float16
    # Float32 sums in another order than the float32 op's (AVX2 row kernels against AVX-512
    # small_gemm), rounded once: at most one float16 ulp apart, i.e. eps relative, or the
    # smallest subnormal (tiny * eps) near zero.
    fp16 = torch.finfo(torch.float16)
    one_ulp = dict(rtol=fp16.eps, atol=fp16.tiny * fp16.eps)
    torch.testing.assert_close(y.float(), y32, **one_ulp)
    assert torch.equal(xa, xa32.half())
    grads = bwd(gy, x, W, A, B, xa, 0.5, 0.3, seed, [True, False, False])
    grads32 = bwd(*f32(gy, x, W, A, B, xa), 0.5, 0.3, seed, [True, False, False])
    torch.testing.assert_close(grads[0].float(), grads32[0], **one_ulp)
    for got, full in zip(grads[3:], grads32[3:]):
        assert torch.equal(got, full.half())


def test_bfloat16_without_native_gemms_runs_float32_rounded_once():
    """Where bf16 GEMMs are emulated (no AVX512-BF16 / AMX, or kernels capped below AVX-512) the
    ops run their float32 kernels on float32 copies: each output is the float32 op's on the
    same bf16 values, rounded once to bfloat16 (bitwise), not seconds-long emulated GEMMs."""
    g = torch.Generator().manual_seed(4)
    mk = lambda *s: torch.randn(*s, generator=g).bfloat16()  # noqa: E731
    x, W, b, A, B, gy = mk(40, 48), mk(36, 48), mk(36), mk(4, 48), mk(36, 4), mk(40, 36)
    seed = torch.tensor(11)
    f32 = lambda *ts: [t.float() for t in ts]  # noqa: E731
    best = fastlora.use_cpu_isa("auto")
    try:
        assert fastlora.use_cpu_isa("avx2") in ("avx2", "baseline")
        assert not fastlora.cpu.native_bf16_matmul()
        fwd = torch.ops.fastlora.lora_linear_fwd
        y, xa = fwd(x, W, b, A, B, 0.5, 0.2, seed, None)
        y32, xa32 = fwd(*f32(x, W, b, A, B), 0.5, 0.2, seed, None)
        bwd = torch.ops.fastlora.lora_linear_bwd
        grads = bwd(gy, x, W, A, B, xa, 0.5, 0.2, seed, [True, True, True])
        grads32 = bwd(*f32(gy, x, W, A, B, xa), 0.5, 0.2, seed, [True, True, True])
        for half, full in zip([y, xa, *grads], [y32, xa32, *grads32]):
            assert half.dtype == torch.bfloat16
            assert torch.equal(half, full.bfloat16())
    finally:
        fastlora.use_cpu_isa(best)


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                 (torch.float16, torch.float16), (torch.float16, torch.float32)],
                         ids=str)
def test_decode_sized_half_precision_streams_the_16_bit_weight(isa, dtype, adapter_dtype):
    """A decode-sized float16 batch, or bfloat16 on a CPU without native bf16 GEMMs, runs the
    float32 decode kernels on float32 copies of its few rows, reading the 16-bit weight as it is
    (no float32 copy of the weight): every output is the float32 op's on the same values,
    rounded once (grad_x up to the float32 summation order of its base term)."""
    g = torch.Generator().manual_seed(6)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    x, W, b, gy = mk(8, 300), mk(77, 300), mk(77), mk(8, 77)
    A, B, Bb = mk(4, 300).to(adapter_dtype), mk(77, 4).to(adapter_dtype), mk(77).to(adapter_dtype)
    seed = torch.tensor(13)
    f32 = lambda *ts: [t.float() for t in ts]  # noqa: E731
    best = fastlora.use_cpu_isa("auto")
    prev = torch.get_num_threads()
    torch.set_num_threads(2)  # W's rows split across threads in the backward
    try:
        fastlora.use_cpu_isa(isa)
        assert not fastlora.cpu.native_bf16_matmul()
        fwd, bwd = torch.ops.fastlora.lora_linear_fwd, torch.ops.fastlora.lora_linear_bwd
        for p in (0.0, 0.3):
            y, xa = fwd(x, W, b, A, B, 0.5, p, seed, Bb)
            y32, xa32 = fwd(*f32(x, W, b, A, B), 0.5, p, seed, Bb.float())
            assert y.dtype == dtype and xa.dtype == adapter_dtype
            assert torch.equal(y, y32.to(dtype)) and torch.equal(xa, xa32.to(adapter_dtype))
            grads = bwd(gy, x, W, A, B, xa, 0.5, p, seed, [True, True, True])
            grads32 = bwd(*f32(gy, x, W, A, B, xa), 0.5, p, seed, [True, True, True])
            # grad_x: the float32 op's and this path's base terms are float32 sums in different
            # orders, each rounded once to dtype: at most one ulp of dtype apart, i.e. within
            # finfo(dtype).eps relative (float16: 2**-10). bfloat16 keeps its tighter 2**-8.
            ulp = 2 ** -8 if dtype == torch.bfloat16 else torch.finfo(dtype).eps
            torch.testing.assert_close(grads[0].float(), grads32[0], rtol=ulp, atol=0)
            for got, full, dt in zip(grads[1:], grads32[1:], (dtype, dtype, adapter_dtype, adapter_dtype)):
                assert got.dtype == dt and torch.equal(got, full.to(dt))
    finally:
        fastlora.use_cpu_isa(best)
        torch.set_num_threads(prev)


def test_autocast_casts_like_nn_linear():
    """Under torch.autocast the op runs in the autocast dtype on cast inputs (as nn.Linear does):
    bitwise the call on bf16 copies, float32 leaves get float32 gradients (the cast's backward),
    float64 is left alone."""
    g = torch.Generator().manual_seed(5)
    x, W, b, A, B = (torch.randn(*s, generator=g) for s in ((3, 7, 24), (20, 24), (20,), (4, 24), (20, 4)))
    leaves = [t.clone().requires_grad_() for t in (x, A, B)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastlora.lora_linear(leaves[0], W, b, leaves[1], leaves[2], 0.5, 0.2, seed=9)
    y.float().sum().backward()
    half = [t.bfloat16().requires_grad_() for t in (x, A, B)]
    y_half = fastlora.lora_linear(half[0], W.bfloat16(), b.bfloat16(), half[1], half[2], 0.5, 0.2, seed=9)
    y_half.float().sum().backward()
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_half)
    for leaf, h in zip(leaves, half):
        assert leaf.grad.dtype == torch.float32 and torch.equal(leaf.grad, h.grad.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y64 = fastlora.lora_linear(*(t.double() for t in (x, W, b, A, B)), 0.5)
    assert y64.dtype == torch.float64

    def autocast_layer(x_):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fastlora.lora_linear(x_, W, b, A, B, 0.5, 0.2, seed=torch.tensor(9))
    compiled = torch.compile(autocast_layer, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), autocast_layer(x))
