"""fastlora.lora_grouped_linear (mixed-adapter batches; CPU C++ kernel) against fastlora.reference."""
import importlib
import pytest
import torch

import fastlora
from fastlora import reference as ref
from tolerance import assert_close_to_truth
lora_ops = importlib.import_module("fastlora.ops.lora_grouped_linear")  # the module, not the function

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rows, in, out, ranks, row pattern): M = 1 and K = 1, odd sizes, different ranks (1 .. 64),
# more rows per adapter than one CPU task (128), all rows base, adapters absent from the batch,
# an adapter of rank 0, an empty batch, and decode-sized groups (the CPU kernel's loop path).
CASES = [
    (1, 6, 42, [4], "all0"),
    (42, 123, 431, [1, 8, 64], "interleaved"),
    (300, 123, 42, [8, 4, 16], "random"),
    (37, 42, 6, [8, 8], "base"),
    (50, 42, 17, [4, 0, 8, 2], "sparse"),
    (0, 16, 8, [4, 8], "random"),
    (12, 42, 17, [4, 16, 2], "random"),  # decode-sized: every adapter task takes the loop path
    (90, 42, 17, [4, 8], "skewed"),  # one adapter with a few rows (loops), one with many (BLAS)
    (150, 42, 17, [4, 8], "blocks"),  # runs of 20 consecutive rows: in-place tasks, no gather
    (600, 64, 40, [8, 4], "random"),  # several tasks per adapter
]


def row_pattern(m, k, kind, g):
    if kind == "all0":
        return torch.zeros(m, dtype=torch.int64)
    if kind == "interleaved":  # i % (K + 1) - 1: base rows between every adapter's rows
        return torch.arange(m) % (k + 1) - 1
    if kind == "base":
        return torch.full((m,), -1, dtype=torch.int64)
    if kind == "blocks":  # runs of 20 rows per adapter, like samples of a sequence batch
        return (torch.arange(m) // 20) % (k + 1) - 1
    if kind == "skewed":  # adapter 1 on rows 3, 10, 40 only; adapter 0 or base elsewhere
        ra = torch.randint(-1, 1, (m,), generator=g)
        ra[[3, 10, 40]] = 1
        return ra
    if kind == "sparse":  # only adapters 1 (rank 0) and 3 and base rows; 0 and 2 absent
        return torch.tensor([-1, 1, 3])[torch.randint(0, 3, (m,), generator=g)]
    return torch.randint(-1, k, (m,), generator=g)


def make_inputs(m, k_in, n, ranks, kind, bias=True, pad_value=float("nan")):
    """float64 inputs; the stacked weights' padding past each rank holds pad_value (NaN: any
    kernel that reads the padding fails the comparison)."""
    g = torch.Generator().manual_seed(1)
    K, r_max = len(ranks), max(ranks)
    x = torch.randn(m, k_in, generator=g, dtype=torch.float64)
    A = torch.full((K, r_max, k_in), pad_value, dtype=torch.float64)
    B = torch.full((K, n, r_max), pad_value, dtype=torch.float64)
    for a, r in enumerate(ranks):
        A[a, :r] = torch.randn(r, k_in, generator=g, dtype=torch.float64) * k_in ** -0.5
        B[a, :, :r] = torch.randn(n, r, generator=g, dtype=torch.float64) * max(r, 1) ** -0.5
    return dict(x=x, weight=torch.randn(n, k_in, generator=g, dtype=torch.float64) * k_in ** -0.5,
                bias=torch.randn(n, generator=g, dtype=torch.float64) if bias else None, lora_A=A, lora_B=B,
                scalings=torch.linspace(0.5, 2.0, K, dtype=torch.float32),
                ranks=torch.tensor(ranks, dtype=torch.int64), row_adapter=row_pattern(m, K, kind, g))


FLOAT_KEYS = ("x", "weight", "bias", "lora_A", "lora_B")
ARG_ORDER = FLOAT_KEYS + ("scalings", "ranks", "row_adapter")


def cast(t, dtype):
    return {k: (v.to(dtype) if k in FLOAT_KEYS and v is not None else v) for k, v in t.items()}


def args(t):
    return [t[k] for k in ARG_ORDER]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(dtype, case):
    t = make_inputs(*case)
    truth = ref.lora_grouped_linear(*args(t))
    ref_y = ref.lora_grouped_linear(*args(cast(t, dtype)))
    y = torch.ops.fastlora.lora_grouped_linear(*args(cast(t, dtype)))
    assert y.dtype == dtype and not y.isnan().any()
    assert_close_to_truth(y, ref_y, truth, "y")


def test_float64_and_no_bias():
    t = make_inputs(90, 42, 17, [3, 16, 5], "random", bias=False)
    torch.testing.assert_close(torch.ops.fastlora.lora_grouped_linear(*args(t)), ref.lora_grouped_linear(*args(t)))


def test_base_rows_equal_base_layer_and_rows_are_independent():
    t = cast(make_inputs(70, 32, 24, [4, 8], "random", pad_value=0.0), torch.float32)
    y = torch.ops.fastlora.lora_grouped_linear(*args(t))
    base = torch.nn.functional.linear(t["x"], t["weight"], t["bias"])
    is_base = t["row_adapter"] == -1
    assert torch.equal(y[is_base], base[is_base])
    # Each adapter's rows equal the single-adapter fused op on those rows.
    for a in range(2):
        rows = t["row_adapter"] == a
        one = fastlora.lora_linear(t["x"][rows], t["weight"], t["bias"], t["lora_A"][a], t["lora_B"][a],
                                   float(t["scalings"][a]))
        torch.testing.assert_close(y[rows], one)


def test_noncontiguous_x():
    t = make_inputs(77, 40, 30, [8, 2, 16], "interleaved")
    wide = torch.zeros(77, 81, dtype=torch.float64)
    t_nc = dict(t, x=wide[:, 1::2].copy_(t["x"]))
    assert not t_nc["x"].is_contiguous()
    torch.testing.assert_close(torch.ops.fastlora.lora_grouped_linear(*args(t_nc)), ref.lora_grouped_linear(*args(t)))
    t_tr = dict(t, x=t["x"].t().contiguous().t())  # column-major
    torch.testing.assert_close(torch.ops.fastlora.lora_grouped_linear(*args(t_tr)), ref.lora_grouped_linear(*args(t)))


def test_wrapper_lists_leading_dims_and_per_sample_ids():
    g = torch.Generator().manual_seed(3)
    k_in, n = 24, 20
    x = torch.randn(3, 5, k_in, generator=g, dtype=torch.float64)
    W, b = torch.randn(n, k_in, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    As = [torch.randn(r, k_in, generator=g, dtype=torch.float64) for r in (2, 6)]
    Bs = [torch.randn(n, r, generator=g, dtype=torch.float64) for r in (2, 6)]
    scalings = [0.5, 3.0]
    # One id per sample, expanded over the sequence dim.
    y = fastlora.lora_grouped_linear(x, W, b, As, Bs, scalings, [1, -1, 0])
    assert y.shape == (3, 5, n)
    for i, a in enumerate([1, -1, 0]):
        expect = torch.nn.functional.linear(x[i], W, b)
        if a >= 0:
            expect = expect + scalings[a] * (x[i] @ As[a].t()) @ Bs[a].t()
        torch.testing.assert_close(y[i], expect)
    # One id per row (shape x.shape[:-1]) and pre-stacked weights give the same.
    A, B, ranks = fastlora.stack_lora_adapters(As, Bs)
    assert A.shape == (2, 6, k_in) and B.shape == (2, n, 6) and ranks.tolist() == [2, 6]
    per_row = torch.tensor([1, -1, 0]).repeat_interleave(5).view(3, 5)
    y2 = fastlora.lora_grouped_linear(x, W, b, A, B, torch.tensor(scalings), per_row, ranks=ranks)
    torch.testing.assert_close(y2, y)
    # Pre-stacked without ranks: all adapters at r_max (the zero padding contributes nothing).
    y3 = fastlora.lora_grouped_linear(x, W, b, A, B, scalings, per_row)
    torch.testing.assert_close(y3, y)
    with pytest.raises(ValueError, match="row_adapter must have shape"):
        fastlora.lora_grouped_linear(x, W, b, As, Bs, scalings, [0, 1])


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_fp64(bias):
    t = make_inputs(13, 7, 5, [3, 1, 2], "random", bias=bias, pad_value=0.0)
    names = [k for k in FLOAT_KEYS if t[k] is not None]
    leaves = {k: t[k].clone().requires_grad_() for k in names}

    def f(*tensors):
        kw = dict(t, **dict(zip(names, tensors)))
        return torch.ops.fastlora.lora_grouped_linear(*args(kw))

    assert torch.autograd.gradcheck(f, tuple(leaves[k] for k in names))


def test_backward_matches_reference_and_ignores_padding():
    t = make_inputs(100, 33, 21, [4, 9, 2], "random", pad_value=0.0)
    leaves = {k: t[k].clone().float().requires_grad_() for k in FLOAT_KEYS}
    y = torch.ops.fastlora.lora_grouped_linear(*args(dict(t, **leaves)))
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [leaves[k] for k in FLOAT_KEYS], gy)
    # Autograd through the reference itself (plain torch ops) is the truth.
    leaves64 = {k: t[k].clone().requires_grad_() for k in FLOAT_KEYS}
    y64 = ref.lora_grouped_linear(*args(dict(t, **leaves64)))
    truth = torch.autograd.grad(y64, [leaves64[k] for k in FLOAT_KEYS], gy.double())
    for name, g, tr in zip(FLOAT_KEYS, grads, truth):
        torch.testing.assert_close(g.double(), tr, rtol=1e-4, atol=1e-4, msg=name)
    for a, r in enumerate([4, 9, 2]):  # no gradient into the padding
        assert not grads[3][a, r:].any() and not grads[4][a, :, r:].any()


def test_opcheck():
    for dtype in (torch.float32, torch.float64):
        for case in [(9, 12, 10, [4, 2], "random"), (5, 8, 6, [3], "all0")]:
            t = cast(make_inputs(*case, pad_value=0.0), dtype)
            for k in ("x", "lora_A", "lora_B"):
                t[k] = t[k].requires_grad_()
            torch.library.opcheck(torch.ops.fastlora.lora_grouped_linear.default, args(t))
            torch.library.opcheck(torch.ops.fastlora.lora_grouped_linear_fwd.default, args(t))
            d = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
            gy = torch.randn(case[0], case[2], dtype=dtype)
            for mask in ([True, False, False], [True, True, True], [False, False, False]):
                torch.library.opcheck(torch.ops.fastlora.lora_grouped_linear_bwd.default,
                                      (gy, d["x"], d["weight"], d["lora_A"], d["lora_B"], d["scalings"], d["ranks"],
                                       d["row_adapter"], mask))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    t = cast(make_inputs(20, 24, 16, [4, 8], "random", pad_value=0.0), torch.float32)

    def layer(x, weight, bias, lora_A, lora_B, scalings, ranks, row_adapter):
        y = fastlora.lora_grouped_linear(x.view(4, 5, 24), weight, bias, lora_A, lora_B, scalings,
                                         row_adapter.view(4, 5), ranks=ranks)
        return torch.relu(y) * 3

    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(*args(t)), layer(*args(t)))
    x = t["x"].clone().requires_grad_()
    g_c = torch.autograd.grad(compiled(*args(dict(t, x=x))).sum(), x)
    g_e = torch.autograd.grad(layer(*args(dict(t, x=x))).sum(), x)
    torch.testing.assert_close(g_c, g_e)


class TestErrors:
    def args(self, **over):
        t = cast(make_inputs(6, 8, 5, [2, 3], "random", pad_value=0.0), torch.float32)
        t.update(over)
        return args(t)

    @pytest.mark.parametrize("over, exc, match", [
        (dict(x=torch.randn(6, 9)), ValueError, "in_features=8"),
        (dict(x=torch.randn(2, 3, 8)), ValueError, "x must be 2-D"),
        (dict(weight=torch.randn(5)), ValueError, "weight must be 2-D"),
        (dict(lora_A=torch.randn(2, 3, 7)), ValueError, "lora_A must have shape"),
        (dict(lora_B=torch.randn(2, 5, 4)), ValueError, "lora_B must have shape"),
        (dict(lora_B=torch.randn(3, 5, 3)), ValueError, "lora_B must have shape"),
        (dict(bias=torch.randn(4)), ValueError, "bias must have shape"),
        (dict(scalings=torch.ones(3)), ValueError, "scalings must have shape"),
        (dict(scalings=torch.ones(2, dtype=torch.int64)), TypeError, "scalings must be float32"),
        (dict(ranks=torch.tensor([2, 3, 1])), ValueError, "ranks must have shape"),
        (dict(ranks=torch.tensor([2.0, 3.0])), TypeError, "ranks must be int64"),
        (dict(ranks=torch.tensor([2, 4])), ValueError, r"ranks\[1\] = 4 is out of range \[0, r_max=3\]"),
        (dict(ranks=torch.tensor([-1, 2])), ValueError, r"ranks\[0\] = -1 is out of range"),
        (dict(row_adapter=torch.zeros(5, dtype=torch.int64)), ValueError, "row_adapter must have shape"),
        (dict(row_adapter=torch.zeros(6, dtype=torch.int32)), TypeError, "row_adapter must be int64"),
        (dict(row_adapter=torch.tensor([0, 1, 2, 0, 0, 0])), ValueError, r"row_adapter\[2\] = 2 is out of range"),
        (dict(row_adapter=torch.tensor([0, -2, 1, 0, 0, 0])), ValueError, r"row_adapter\[1\] = -2 is out of range"),
        (dict(lora_A=torch.randn(2, 3, 8, dtype=torch.float64)), TypeError, "lora_A has dtype"),
        (dict(x=torch.randn(6, 8).half()), TypeError, "weight has dtype"),
        (dict(x=torch.randint(0, 3, (6, 8))), TypeError, "x must be float"),
        (dict(weight=torch.randn(5, 8, device="meta")), ValueError, "weight is on meta"),
    ])
    def test_bad_arguments(self, over, exc, match):
        with pytest.raises(exc, match=match):
            torch.ops.fastlora.lora_grouped_linear(*self.args(**over))

    # The raw kernel ops check shapes too (a lora_B narrower than lora_A's r_max was read past
    # its end): on CPU (C++), through the reference (any other device; CUDA shares the check)
    # and in the backward.
    @pytest.mark.parametrize("kernel", ["cpu", "reference"])
    @pytest.mark.parametrize("over, match", [
        (dict(lora_B=torch.randn(2, 5, 1)), "lora_B must have shape"),
        (dict(lora_A=torch.randn(1, 3, 8)), "lora_B must have shape"),
        (dict(x=torch.randn(6, 9)), "in_features=8"),
        (dict(row_adapter=torch.zeros(5, dtype=torch.int64)), "row_adapter must have shape"),
    ])
    def test_raw_forward_checks_shapes(self, kernel, over, match):
        call = torch.ops.fastlora.lora_grouped_linear_fwd if kernel == "cpu" else lora_ops._grouped_reference
        with pytest.raises(ValueError, match=match):
            call(*self.args(**over))

    def test_check_ops_pass_opcheck(self):
        a = self.args()
        torch.library.opcheck(torch.ops.fastlora._lora_grouped_linear_fwd_check.default, a)
        grad_y = torch.randn(a[0].shape[0], a[1].shape[0])
        torch.library.opcheck(torch.ops.fastlora._lora_grouped_linear_bwd_check.default,
                              [grad_y, a[0], a[1], *a[3:]])

    @pytest.mark.parametrize("grad_y, match", [
        (torch.randn(6, 4), "grad_y must have shape"),
        (torch.randn(5, 5), "grad_y must have shape"),
        (torch.randn(6, 5, dtype=torch.float64), "grad_y has dtype"),
    ])
    def test_raw_backward_checks_shapes(self, grad_y, match):
        x, weight, bias, lora_A, lora_B, scalings, ranks, row_adapter = self.args()
        with pytest.raises((ValueError, TypeError), match=match):
            torch.ops.fastlora.lora_grouped_linear_bwd(grad_y, x, weight, lora_A, lora_B, scalings, ranks,
                                                       row_adapter, [True, True, True])

    def test_reference_checks_values_too(self):
        a = self.args(row_adapter=torch.tensor([0, 1, 2, 0, 0, 0]))
        with pytest.raises(ValueError, match=r"row_adapter\[2\] = 2 is out of range"):
            ref.lora_grouped_linear(*a)


@pytest.mark.parametrize("dtype,isa", [(torch.bfloat16, "avx2"), (torch.bfloat16, "baseline"),
                                       (torch.float16, "auto"), (torch.float16, "avx2")], ids=str)
def test_half_precision_through_float32_copies(dtype, isa):
    """float16 from 32 rows, and bfloat16 where its GEMMs are emulated (no AVX512-BF16 / AMX, or
    kernels capped below AVX-512), run the float32 kernels on float32 copies instead of ATen's
    slow half-precision GEMMs: the forward is the float32 op's on the same values rounded once,
    the gradients the float32 backward's rounded once (bitwise). Native bfloat16 keeps its own
    GEMMs (the reference comparisons above)."""
    t = cast(make_inputs(300, 123, 42, [8, 4, 16], "random", pad_value=0.0), dtype)
    gy = torch.randn(300, 42, generator=torch.Generator().manual_seed(3)).to(dtype)
    best = fastlora.use_cpu_isa("auto")
    try:
        fastlora.use_cpu_isa(isa)
        assert dtype == torch.float16 or not fastlora.cpu.native_bf16_matmul()
        y = torch.ops.fastlora.lora_grouped_linear_fwd(*args(t))
        y32 = torch.ops.fastlora.lora_grouped_linear_fwd(*args(cast(t, torch.float32)))
        bwd = torch.ops.fastlora.lora_grouped_linear_bwd
        grads = bwd(gy, *args(t)[:2], *args(t)[3:], [True, True, True])
        t32 = args(cast(t, torch.float32))
        grads32 = bwd(gy.float(), *t32[:2], *t32[3:], [True, True, True])
        assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
        assert torch.equal(y, y32.to(dtype))
        for g, g32 in zip(grads, grads32):
            assert torch.equal(g, g32.to(dtype))
    finally:
        fastlora.use_cpu_isa(best)
