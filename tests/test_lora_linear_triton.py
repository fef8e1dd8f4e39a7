"""Triton LoRA Linear kernels vs fastlora.reference, under the Triton interpreter on CPU.

tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton kernels. Tolerances
follow flash-attention: truth is the reference in float64, and a kernel may be off by at most
twice the reference's own error in the test dtype plus a floor of a few ulps of the output's
scale. The dropout keep-mask must match the reference exactly.
"""
import importlib
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fastlora import reference as ref
from fastlora.kernels import lora_linear as tk
from tolerance import assert_close_to_truth

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# FASTLORA_TEST_GPU=1 runs the same tests on a real GPU instead of the interpreter.
DEVICE = "cuda" if os.environ.get("FASTLORA_TEST_GPU") else "cpu"


def _rand(rows, cols, dtype, layout="contig", scale=1.0):
    """A (rows, cols) random tensor in the given memory layout: contiguous, a column-strided
    view of a wider tensor, or a transposed view."""
    v = (torch.randn(rows, cols) * scale).to(dtype).to(DEVICE)
    if layout == "strided":
        return torch.zeros(rows, 2 * cols + 1, dtype=dtype, device=DEVICE)[:, 1::2].copy_(v)
    if layout == "transposed":
        return v.t().contiguous().t()
    return v


SEED = 0x5EED_1234_ABCD  # exercises both 32-bit halves of the seed


# --------------------------------------------------------------------------- dropout mask
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p,seed", [(0.25, SEED), (0.5, -3), (0.9, 2**63 - 1), (1.0, 7)])
def test_keep_mask_exact(dtype, p, seed):
    # lora_shrink with lora_A = I (r = K) returns dropout(x) itself: every entry is a single
    # product by 1, so values and the keep-mask must match the reference bit for bit.
    M, K = 42, 123
    x = _rand(M, K, dtype, "strided")
    x[x == 0] = 1.0
    out = tk.lora_shrink(x, torch.eye(K, dtype=dtype, device=DEVICE), p, seed)
    assert torch.equal(out != 0, ref.dropout_keep_mask(M, K, p, seed, device=DEVICE))
    assert torch.equal(out, ref.dropout(x, p, seed))


def test_seed_is_read_from_its_tensor():
    # The kernels read the dropout seed from its one-element tensor, not from a launch argument,
    # so that a captured CUDA graph, replaying the same launches, uses the seed the op draws on
    # the device at each replay. Here: the same tensor rewritten in place between two calls of
    # the shrink (operand dropout) and of the backward's add kernel (dropout at the output index).
    M, K, r, p = 6, 42, 8, 0.5
    x, W, gy = _rand(M, K, torch.float32, "contig"), _rand(5, K, torch.float32, "contig"), _rand(M, 5, torch.float32)
    A, B = _rand(r, K, torch.float32, "contig"), _rand(5, r, torch.float32, "contig")
    seed = torch.tensor([7], dtype=torch.int64, device=DEVICE)
    runs = []
    for value in (7, 2**40 + 3):
        seed.fill_(value)
        xa = tk.lora_shrink(x, A, p, seed)
        grad_x = tk.lora_backward(gy, x, W, A, B, xa, 1.0, p, seed, True, False, False)[0]
        assert torch.equal(xa, tk.lora_shrink(x, A, p, value))
        assert torch.equal(grad_x, tk.lora_backward(gy, x, W, A, B, xa, 1.0, p, value, True, False, False)[0])
        runs.append((xa, grad_x))
    assert not torch.equal(runs[0][0], runs[1][0])


# --------------------------------------------------------------------------- shrink
SHRINK_CASES = [  # M, K, r, p, layout
    (1, 6, 1, 0.25, "contig"),
    (6, 123, 8, 0.0, "strided"),
    (42, 42, 8, 0.25, "transposed"),
    (42, 123, 1, 0.25, "contig"),
    (0, 42, 8, 0.25, "contig"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,r,p,layout", SHRINK_CASES)
def test_shrink(dtype, M, K, r, p, layout):
    x = _rand(M, K, dtype, layout)
    A = _rand(r, K, dtype, "transposed" if layout == "strided" else "contig", K ** -0.5)
    out = tk.lora_shrink(x, A, p, SEED)
    ref_out = F.linear(ref.dropout(x, p, SEED), A)
    truth = F.linear(ref.dropout(x.double(), p, SEED), A.double())
    assert_close_to_truth(out, ref_out, truth, "xa")


# --------------------------------------------------------------------------- forward
FORWARD_CASES = [  # M, K, N, r, bias, layout
    (1, 6, 42, 1, True, "contig"),
    (6, 123, 6, 8, False, "strided"),
    (42, 42, 123, 8, True, "transposed"),
    (42, 123, 42, 1, True, "strided"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N,r,has_bias,layout", FORWARD_CASES)
def test_forward(dtype, M, K, N, r, has_bias, layout):
    p, scaling = 0.25, 1.7
    x = _rand(M, K, dtype, layout)
    W = _rand(N, K, dtype, "transposed" if layout == "strided" else layout, K ** -0.5)
    b = _rand(1, N, dtype)[0] if has_bias else None
    A = _rand(r, K, dtype, "contig", K ** -0.5)
    B = _rand(N, r, dtype, layout, r ** -0.5)
    xa = F.linear(ref.dropout(x, p, SEED), A)  # the saved activation, in the test dtype
    out = tk.lora_forward(x, W, b, xa, B, scaling)
    ref_out = ref.lora_linear(x, W, b, A, B, scaling, p, SEED)
    d = lambda t: None if t is None else t.double()
    truth = F.linear(d(x), d(W), d(b)) + scaling * F.linear(d(xa), d(B))
    assert_close_to_truth(out, ref_out, truth, "y")
    _check_fused_forward(x, W, b, A, B, scaling, p)


def _check_fused_forward(x, W, b, A, B, scaling, p):
    """lora_linear_forward (the base product and one band kernel for shrink and expand; the
    shrink and add kernels above BAND_MAX_RANK) against the reference: xa and y."""
    y, xa = tk.lora_linear_forward(x, W, b, A, B, scaling, p, SEED)
    d = lambda t: None if t is None else t.double()
    assert_close_to_truth(xa, F.linear(ref.dropout(x, p, SEED), A), F.linear(ref.dropout(d(x), p, SEED), d(A)), "xa")
    truth = F.linear(d(x), d(W), d(b)) + scaling * F.linear(d(xa), d(B))
    assert_close_to_truth(y, ref.lora_linear(x, W, b, A, B, scaling, p, SEED), truth, "y")


# --------------------------------------------------------------------------- backward
BACKWARD_CASES = [  # M, K, N, r, p, layout, (need_x, need_w, need_b)
    (1, 42, 6, 1, 0.25, "contig", (True, True, True)),
    (6, 123, 42, 8, 0.0, "strided", (True, False, True)),
    (42, 6, 123, 8, 0.25, "transposed", (True, True, False)),
    (42, 123, 42, 1, 0.25, "strided", (False, False, False)),
]


def _check_backward(dtype, M, K, N, r, p, layout, needs, scaling=1.7):
    gy = _rand(M, N, dtype, layout)
    x = _rand(M, K, dtype, "transposed" if layout == "strided" else layout)
    W = _rand(N, K, dtype, layout, K ** -0.5)
    A = _rand(r, K, dtype, "contig", K ** -0.5)
    B = _rand(N, r, dtype, layout, r ** -0.5)
    xa = F.linear(ref.dropout(x, p, SEED), A)
    args = (scaling, p, SEED) + tuple(needs)
    out = tk.lora_backward(gy, x, W, A, B, xa, *args)
    ref_out = ref.lora_linear_backward(gy, x, W, A, B, xa, *args)
    truth = ref.lora_linear_backward(*(t.double() for t in (gy, x, W, A, B, xa)), *args)
    for name, o, ro, t in zip(("grad_x", "grad_weight", "grad_bias", "grad_A", "grad_B"),
                              out, ref_out, truth):
        assert_close_to_truth(o, ro, t, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N,r,p,layout,needs", BACKWARD_CASES)
def test_backward(dtype, M, K, N, r, p, layout, needs):
    _check_backward(dtype, M, K, N, r, p, layout, needs)


def test_backward_empty_batch():
    # M = 0: grad_A and grad_B are zero sums over no rows, grad_x is (0, K).
    _check_backward(torch.float32, 0, 42, 6, 8, 0.25, "contig", (True, True, True))


# --------------------------------------------------------------------------- tiling paths
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_tiles_and_split_k(dtype, monkeypatch):
    # Under the interpreter the launchers pick one big tile; force the GPU-style multi-tile
    # paths instead: 16-wide tiles (grouped program order, many K trips, several rank chunks in
    # the add kernel with r = 40) and a 3-way split-K with its fp32 partial planes.
    monkeypatch.setattr(tk, "_blocks", lambda M, N, K, dtype: (16, 16, 16, 4, 1))
    monkeypatch.setattr(tk, "_choose_split", lambda tiles, K, block_k, device: 3)
    M, K, N, r, p, scaling = 42, 123, 42, 40, 0.25, 0.5
    x = _rand(M, K, dtype, "strided")
    W = _rand(N, K, dtype, "contig", K ** -0.5)
    b = _rand(1, N, dtype)[0]
    A = _rand(r, K, dtype, "contig", K ** -0.5)
    B = _rand(N, r, dtype, "contig", r ** -0.5)

    xa = tk.lora_shrink(x, A, p, SEED)
    assert_close_to_truth(xa, F.linear(ref.dropout(x, p, SEED), A),
                          F.linear(ref.dropout(x.double(), p, SEED), A.double()), "xa")
    y = tk.lora_forward(x, W, b, xa, B, scaling)
    assert_close_to_truth(y, ref.lora_linear(x, W, b, A, B, scaling, p, SEED),
                          F.linear(x.double(), W.double(), b.double())
                          + scaling * F.linear(xa.double(), B.double()), "y")
    _check_backward(dtype, M, K, N, r, p, "strided", (True, False, False), scaling)


def _small_bands(chunks):
    """A _band_plan with 16-wide tiles and `chunks` column chunks (GPU-style): several bands
    (so the band sum runs), several N and K trips per chunk, and with many chunks some that
    own no column tile."""
    return lambda M, N, K, R, dtype, device, backward=False: (16, 16, 16, tk._pow2(R, 16, tk.BAND_MAX_RANK),
                                                               chunks, 4, 1)


def test_backward_band_partials_never_outgrow_grad_y():
    # The band sums' float32 partials (bands x R x (K + N) values) stay within dY's M x N values
    # at any token count: taller bands where needed, else (None) the split-K GEMMs.
    for M in (8, 2048, 65536, 1 << 20):
        for K, N, R in ((4096, 4096, 16), (4096, 4096, 64), (4096, 4096, 128), (1024, 4096, 16), (4096, 11008, 64)):
            bm = tk.backward_band_rows(M, N, K, R, 64, 128)
            if bm is None:
                assert R > 64, (M, K, N, R)
                continue
            bands = -(-M // bm)
            assert bm in (64, 128) and (bands == 1 or bands * R * (K + N) <= M * N), (M, K, N, R, bm)
    assert tk.backward_band_rows(2048, 4096, 4096, 16, 64, 128) == 64   # 32 bands: partials = dY / 2
    assert tk.backward_band_rows(2048, 4096, 4096, 64, 64, 128) == 128  # 64-row bands would double dY
    assert tk.backward_band_rows(2048, 4096, 4096, 64, 32, 32) is None  # float32: split-K instead
    assert tk.backward_band_rows(100, 4096, 4096, 128, 128, 128) == 128  # one band: no partials
    assert tk.backward_band_rows(2048, 4096, 4096, 128, 64, 128) is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunks", [1, 3, 9])
def test_band_kernels_small_tiles_and_chunks(dtype, chunks, monkeypatch):
    monkeypatch.setattr(tk, "_band_plan", _small_bands(chunks))
    M, K, N, r, p, scaling = 42, 123, 37, 20, 0.25, 0.5
    x = _rand(M, K, dtype, "strided")
    W = _rand(N, K, dtype, "contig", K ** -0.5)
    b = _rand(1, N, dtype)[0]
    A = _rand(r, K, dtype, "transposed", K ** -0.5)
    B = _rand(N, r, dtype, "contig", r ** -0.5)
    _check_fused_forward(x, W, b, A, B, scaling, p)
    _check_backward(dtype, M, K, N, r, p, "strided", (True, False, False), scaling)
    _check_backward(dtype, M, K, N, r, 0.0, "transposed", (False, True, True), scaling)


def test_mixed_precision_band_kernels_small_tiles(monkeypatch):
    # float32 adapters under bf16: upcast dY / x tiles on every trip, several bands and chunks.
    monkeypatch.setattr(tk, "_band_plan", _small_bands(3))
    _check_mixed(torch.bfloat16, 42, 123, 42, 20, 0.25, "strided", "fp32", (True, False, False), 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ranks_above_the_band_limit(dtype):
    # Padded ranks above BAND_MAX_RANK take the separate rank-r GEMMs and the add kernel.
    M, K, N, r, p, scaling = 6, 42, 23, tk.BAND_MAX_RANK + 2, 0.25, 0.5
    assert tk._pow2(r, 16, 1 << 30) > tk.BAND_MAX_RANK
    x, W, b = _rand(M, K, dtype), _rand(N, K, dtype, scale=K ** -0.5), _rand(1, N, dtype)[0]
    A, B = _rand(r, K, dtype, scale=K ** -0.5), _rand(N, r, dtype, scale=r ** -0.5)
    _check_fused_forward(x, W, b, A, B, scaling, p)
    _check_backward(dtype, M, K, N, r, p, "contig", (True, False, True), scaling)


class _LaunchCounter(TorchDispatchMode):
    """Counts what a GPU would launch for a LoRA step run through the Triton launchers on CPU
    tensors: every Triton kernel launch, and every ATen op other than allocations and views
    (each a kernel on a GPU); and the host syncs (a tensor read back to the host). The
    interpreter's own tensor traffic during a Triton launch is not counted."""

    FREE = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "view", "_unsafe_view",
            "t", "transpose", "as_strided", "slice", "select", "detach", "alias", "expand", "unsqueeze",
            "squeeze", "permute", "reshape"}
    SYNCS = {"_local_scalar_dense", "item", "nonzero", "to_dense"}

    def __init__(self, monkeypatch):
        super().__init__()
        self.launches, self.syncs, self.inside = [], [], False
        for name in ("_lora_fwd_band_kernel", "_lora_bwd_band_kernel", "_band_sum_kernel",
                     "_lora_gemm_kernel", "_lora_add_kernel"):
            monkeypatch.setattr(tk, name, self._wrap(name, getattr(tk, name)))

    def _wrap(self, name, kernel):
        counter = self

        class Counted:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    counter.launches.append(name)
                    counter.inside = True
                    try:
                        return kernel[grid](*args, **kwargs)
                    finally:
                        counter.inside = False
                return launch
        return Counted()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = func.overloadpacket.__name__
        if not self.inside:
            if op in self.SYNCS:
                self.syncs.append(op)
            elif op not in self.FREE:
                self.launches.append(op)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_lora_step_launches_at_most_six_kernels_without_host_sync(adapter_dtype, p, monkeypatch):
    # The CUDA registrations of the forward and backward ops, run on CPU tensors: the forward
    # is the cuBLAS base product and one band kernel, the backward cuBLAS dX = dY @ W, the band
    # kernel and the band sum (several bands here); the op's seed draw (with dropout) is the
    # sixth launch of a LoRA step. No call reads a tensor back to the host.
    lora_ops = importlib.import_module("fastlora.ops.lora_linear")
    monkeypatch.setattr(tk, "_band_plan", _small_bands(2))
    M, K, N, r = 40, 48, 36, 8
    x, W, b = _rand(M, K, torch.bfloat16), _rand(N, K, torch.bfloat16), _rand(1, N, torch.bfloat16)[0]
    A, B = _rand(r, K, adapter_dtype), _rand(N, r, adapter_dtype)
    gy = _rand(M, N, torch.bfloat16)
    seed = torch.tensor(SEED, device=DEVICE)  # what the op draws on the device
    counter = _LaunchCounter(monkeypatch)
    with counter:
        y, xa = lora_ops._fwd_cuda(x, W, b, A, B, 2.0, p, seed, None)
    fwd = list(counter.launches)
    counter.launches.clear()
    with counter:
        grads = lora_ops._bwd_cuda(gy, x, W, A, B, xa, 2.0, p, seed, [True, False, False])
    bwd = list(counter.launches)
    assert fwd == ["mm", "_lora_fwd_band_kernel"], fwd
    assert bwd == ["mm", "_lora_bwd_band_kernel", "_band_sum_kernel"], bwd
    assert counter.syncs == []
    assert_close_to_truth(grads[3], ref.lora_linear_backward(gy, x, W, A, B, xa, 2.0, p, SEED, True, False, False)[3],
                          ref.lora_linear_backward(*(t.double() for t in (gy, x, W, A, B, xa)), 2.0, p, SEED,
                                                   True, False, False)[3], "grad_A")


def test_rejects_float64():
    x = torch.randn(4, 8, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        tk.lora_shrink(x, torch.randn(2, 8, dtype=torch.float64, device=DEVICE), 0.0, 0)


# --------------------------------------------------------------------------- op dispatch
@pytest.mark.parametrize("dtype, adapter_dtype", [(torch.float32, None), (torch.float16, None),
                                                   (torch.bfloat16, torch.float32), (torch.float16, torch.float32)],
                         ids=str)
@pytest.mark.parametrize("bias,lora_B_bias", [(True, True), (False, True), (False, False)])
def test_cuda_dispatch_matches_cpu_kernel(dtype, adapter_dtype, bias, lora_B_bias):
    # The functions registered for CUDA (fastlora/ops/lora_linear.py) run here on CPU tensors through
    # the interpreter: their glue (effective bias, seed, output mask, float32 adapters on a
    # half-precision x) must give what the C++ CPU kernel gives.
    lora_ops = importlib.import_module("fastlora.ops.lora_linear")  # the module, not the function

    adt = adapter_dtype or dtype
    M, K, N, r, p, s = 33, 42, 23, 4, 0.25, 1.5
    x, W = _rand(M, K, dtype), _rand(N, K, dtype, scale=K ** -0.5)
    A, B = _rand(r, K, adt, scale=K ** -0.5), _rand(N, r, adt, scale=r ** -0.5)
    b = _rand(1, N, dtype)[0] if bias else None
    bb = _rand(1, N, adt)[0] if lora_B_bias else None
    seed = torch.tensor(SEED)
    y, xa = lora_ops._fwd_cuda(x, W, b, A, B, s, p, seed, bb)
    y_cpu, xa_cpu = torch.ops.fastlora.lora_linear_fwd(*(t if t is None else t.cpu() for t in (x, W, b, A, B)),
                                                       s, p, seed, None if bb is None else bb.cpu())
    y_ref = ref.lora_linear(x, W, b, A, B, s, p, SEED, bb)
    y_truth = ref.lora_linear(*(t if t is None else t.double() for t in (x, W, b, A, B)), s, p, SEED,
                              None if bb is None else bb.double())
    assert_close_to_truth(y, y_ref, y_truth, "y")
    assert_close_to_truth(y_cpu.to(DEVICE), y_ref, y_truth, "y (C++)")
    gy = _rand(M, N, dtype)
    mask = [True, False, True]
    grads = lora_ops._bwd_cuda(gy, x, W, A, B, xa, s, p, seed, mask)
    ref_grads = ref.lora_linear_backward(gy, x, W, A, B, xa, s, p, SEED, *mask)
    truth = ref.lora_linear_backward(*(t.double() for t in (gy, x, W, A, B, xa)), s, p, SEED, *mask)
    for name, o, ro, t in zip(("grad_x", "grad_weight", "grad_bias", "grad_A", "grad_B"), grads, ref_grads, truth):
        assert_close_to_truth(o, ro, t, name)


# --------------------------------------------------------------------------- TF32 switch
@pytest.mark.parametrize("api", ["new", "legacy"])
def test_fp32_follows_torch_tf32_switch_through_either_api(api):
    """The float32 dot precision follows torch's TF32 switch, set through torch's new
    fp32_precision API (after which reading the legacy allow_tf32 raises) or the legacy one."""
    from fastlora.kernels import _common
    matmul = torch.backends.cuda.matmul
    if api == "new" and not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    before = (matmul.fp32_precision, torch.backends.fp32_precision) if api == "new" else matmul.allow_tf32
    try:
        for on in (True, False):
            if api == "new":
                matmul.fp32_precision = "tf32" if on else "ieee"
            else:
                matmul.allow_tf32 = on
            assert _common.dot_precision(torch.float32) == ("tf32" if on else "ieee")
            assert _common.dot_precision(torch.bfloat16) == "ieee"
            x, W, B = _rand(20, 32, torch.float32), _rand(24, 32, torch.float32), _rand(24, 4, torch.float32)
            xa = x @ _rand(4, 32, torch.float32).t()
            y = tk.lora_forward(x, W, None, xa, B, 0.5)  # every float32 call goes through the switch
            assert y.shape == (20, 24) and torch.isfinite(y).all()
        if api == "new":
            # the global setting is inherited by matmul's when matmul's says "none"
            matmul.fp32_precision = "none"
            torch.backends.fp32_precision = "tf32"
            assert _common.dot_precision(torch.float32) == "tf32"
    finally:
        if api == "new":
            torch.backends.fp32_precision = before[1]
            matmul.fp32_precision = before[0]
        else:
            matmul.allow_tf32 = before


# --------------------------------------------------------------------------- mixed precision
# PEFT's default on a half-precision model: x, weight, grad_y (and bias) in float16/bfloat16,
# lora_A, lora_B (and so xa) in float32, the LoRA branch run in float32 on x.to(float32). The
# reference below is independent of fastlora.reference's arithmetic (only its keep-mask and
# scale are shared): PEFT's way in torch (base in x's dtype, LoRA branch in float32, one cast
# back), and the same formulas in float64 for truth.
MIXED_DTYPES = [torch.bfloat16, torch.float16]


def _mixed_drop(t, p, dt):
    """fastlora dropout of t in dt: dt(t) * keep * dt(float32(1 / (1 - p))); one rounding in
    float32, exact in float64."""
    t = t.to(dt)
    if p <= 0.0:
        return t
    keep = ref.dropout_keep_mask(t.shape[0], t.shape[1], p, SEED, device=t.device).to(dt)
    scale = torch.tensor(ref.dropout_scale(p), dtype=torch.float32).to(dt)
    return t * keep * scale


def _peft_mixed(x, W, b, A, B, xa, gy, scaling, p, exact=False):
    """(xa, y, grad_x, grad_weight, grad_bias, grad_A, grad_B) PEFT's way, or in float64.

    An x-dtype bias belongs to the base layer; a float32 one is an effective bias carried by
    the float32 LoRA branch (bias + lora_B_bias * scaling). grad_x sums the base layer's
    gradient and the float32 branch's (cast back) in x's dtype, as autograd does for PEFT."""
    xd = torch.float64 if exact else x.dtype
    ad = torch.float64 if exact else torch.float32
    base_bias = b is not None and b.dtype == x.dtype
    xa_out = F.linear(_mixed_drop(x, p, ad), A.to(ad))
    base = F.linear(x.to(xd), W.to(xd), b.to(xd) if base_bias else None)
    lora = scaling * F.linear(xa.to(ad), B.to(ad))
    if b is not None and not base_bias:
        lora = lora + b.to(ad)
    y = (base.to(ad) + lora).to(xd)
    gy_a = gy.to(ad)
    g = scaling * (gy_a @ B.to(ad))
    grad_A = g.t() @ _mixed_drop(x, p, ad)
    grad_B = scaling * (gy_a.t() @ xa.to(ad))
    grad_x = gy.to(xd) @ W.to(xd) + _mixed_drop(g @ A.to(ad), p, ad).to(xd)
    return xa_out, y, grad_x, gy.to(xd).t() @ x.to(xd), gy.to(xd).sum(0), grad_A, grad_B


def _check_mixed(dtype, M, K, N, r, p, layout, bias, needs=(True, True, True), scaling=1.7):
    x = _rand(M, K, dtype, layout)
    W = _rand(N, K, dtype, "transposed" if layout == "strided" else "contig", K ** -0.5)
    b = None if bias is None else _rand(1, N, dtype if bias == "x" else torch.float32)[0]
    A = _rand(r, K, torch.float32, "contig", K ** -0.5)
    B = _rand(N, r, torch.float32, layout, r ** -0.5)
    gy = _rand(M, N, dtype, "strided" if layout == "contig" else "contig")
    xa = F.linear(_mixed_drop(x, p, torch.float32), A)  # the saved activation, float32

    out = (tk.lora_shrink(x, A, p, SEED), tk.lora_forward(x, W, b, xa, B, scaling),
           *tk.lora_backward(gy, x, W, A, B, xa, scaling, p, SEED, *needs))
    ref_out = _peft_mixed(x, W, b, A, B, xa, gy, scaling, p)
    truth = _peft_mixed(x, W, b, A, B, xa, gy, scaling, p, exact=True)
    # the fused forward (one band kernel for shrink and expand) gives the same xa and y
    y_fused, xa_fused = tk.lora_linear_forward(x, W, b, A, B, scaling, p, SEED)
    assert xa_fused.dtype == torch.float32 and y_fused.dtype == dtype
    assert_close_to_truth(xa_fused, ref_out[0], truth[0], "xa (fused forward)")
    assert_close_to_truth(y_fused, ref_out[1], truth[1], "y (fused forward)")
    names = ("xa", "y", "grad_x", "grad_weight", "grad_bias", "grad_A", "grad_B")
    f32 = torch.float32
    for name, o, ro, t, want, needed in zip(names, out, ref_out, truth,
                                            (f32, dtype, dtype, dtype, dtype, f32, f32),
                                            (True, True, *needs, True, True)):
        if not needed:
            assert o.numel() == 0, name
            continue
        assert o.dtype == want, f"{name}: {o.dtype}, want {want}"
        assert_close_to_truth(o, ro, t, name)


MIXED_CASES = [  # M, K, N, r, p, layout, bias ("x": in x's dtype, "fp32", None), needs
    (1, 42, 6, 3, 0.1, "contig", "x", (True, True, True)),
    (37, 123, 42, 8, 0.0, "transposed", None, (True, False, False)),
    (37, 6, 123, 3, 0.1, "strided", "fp32", (True, True, True)),
    (6, 123, 37, 8, 0.1, "transposed", "fp32", (False, False, True)),
]


@pytest.mark.parametrize("dtype", MIXED_DTYPES)
@pytest.mark.parametrize("M,K,N,r,p,layout,bias,needs", MIXED_CASES)
def test_mixed_precision(dtype, M, K, N, r, p, layout, bias, needs):
    _check_mixed(dtype, M, K, N, r, p, layout, bias, needs)


@pytest.mark.parametrize("dtype", MIXED_DTYPES)
def test_mixed_precision_empty_batch(dtype):
    # M = 0: xa (0, r) float32, y (0, N), grad_A / grad_B float32 zeros, grad_x (0, K).
    _check_mixed(dtype, 0, 42, 6, 8, 0.1, "contig", "x")


def test_mixed_precision_small_tiles_and_split_k(monkeypatch):
    # The GPU-style paths with float32 adapters: bf16 operand tiles upcast on every K trip,
    # several float32 rank chunks in the add kernel (r = 40), split-K planes of a float32 output.
    monkeypatch.setattr(tk, "_blocks", lambda M, N, K, dtype: (16, 16, 16, 4, 1))
    monkeypatch.setattr(tk, "_choose_split", lambda tiles, K, block_k, device: 3)
    _check_mixed(torch.bfloat16, 42, 123, 42, 40, 0.25, "strided", "fp32", (True, False, False), 0.5)


def test_mixed_precision_keeps_dropped_x_in_float32():
    # lora_A = I: xa is dropout(x.to(float32)) itself, so its scaled kept values must be the
    # float32 products (not rounded back to bfloat16) and the keep-mask fastlora's.
    M, K, p = 37, 42, 0.1
    x = _rand(M, K, torch.bfloat16, "strided")
    x[x == 0] = 1.0
    out = tk.lora_shrink(x, torch.eye(K, device=DEVICE), p, SEED)
    assert out.dtype == torch.float32
    assert torch.equal(out != 0, ref.dropout_keep_mask(M, K, p, SEED, device=DEVICE))
    assert torch.equal(out, _mixed_drop(x, p, torch.float32))
    assert not torch.equal(out, _mixed_drop(x, p, torch.float32).to(torch.bfloat16).float())


@pytest.mark.parametrize("dtype", MIXED_DTYPES)
def test_mixed_precision_lora_term_stays_float32_until_the_final_rounding(dtype):
    # A base term that cancels the LoRA term's leading part leaves 2**-12 (y) and 2**-16
    # (grad_x), exact in the output dtype but only if the LoRA operands (xa, lora_B, g) are
    # float32 and the sum is rounded once: any rounding of them to x's dtype gives 0. (PEFT
    # itself, rounding both parts of grad_x to x's dtype before adding them, gets 0 there.)
    M, K, N, r = 2, 16, 16, 2
    x = torch.ones(M, K, dtype=dtype, device=DEVICE)
    W = torch.full((N, K), -1 / 16, dtype=dtype, device=DEVICE)          # x @ W.T = -1
    xa = torch.ones(M, r, device=DEVICE)
    B = torch.full((N, r), 0.5 + 2 ** -13, device=DEVICE)               # xa @ B.T = 1 + 2**-12
    A = torch.full((r, K), 1 / 16, device=DEVICE)
    y = tk.lora_forward(x, W, None, xa, B, 1.0)
    assert y.dtype == dtype and torch.equal(y, torch.full_like(y, 2 ** -12))
    gy = torch.full((M, N), 1 / 16, dtype=dtype, device=DEVICE)          # g = 0.5 + 2**-13
    grad_x, _, _, grad_A, _ = tk.lora_backward(gy, x, W, A, B, xa, 1.0, 0.0, SEED, True, False, False)
    assert grad_x.dtype == dtype and torch.equal(grad_x, torch.full_like(grad_x, 2 ** -16))
    assert grad_A.dtype == torch.float32 and torch.equal(grad_A, torch.full_like(grad_A, 1 + 2 ** -12))


@pytest.mark.parametrize("xd,ad", [(torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16),
                                   (torch.bfloat16, torch.float16), (torch.float32, torch.float16)])
def test_mixed_precision_rejects_other_combinations(xd, ad):
    # Only float32 adapters under a float16/bfloat16 base mix; anything else is a TypeError.
    M, K, N, r = 4, 8, 6, 2
    x, W, gy = (torch.randn(*s, device=DEVICE).to(xd) for s in ((M, K), (N, K), (M, N)))
    A, B, xa = (torch.randn(*s, device=DEVICE).to(ad) for s in ((r, K), (N, r), (M, r)))
    with pytest.raises(TypeError, match="mixed precision"):
        tk.lora_shrink(x, A, 0.1, SEED)
    with pytest.raises(TypeError, match="mixed precision"):
        tk.lora_forward(x, W, None, xa, B, 1.0)
    with pytest.raises(TypeError, match="mixed precision"):
        tk.lora_backward(gy, x, W, A, B, xa, 1.0, 0.1, SEED, True, True, True)


@pytest.mark.parametrize("odd", ["weight", "xa", "lora_B", "grad_y", "bias"])
def test_mixed_precision_rejects_a_tensor_off_its_side(odd):
    # bf16 x with float32 adapters is allowed, but every base-side tensor must be bf16, every
    # adapter-side tensor float32, and the bias bf16 or float32.
    M, K, N, r = 4, 8, 6, 2
    bf, f32 = torch.bfloat16, torch.float32
    t = lambda *s, dt: torch.randn(*s, device=DEVICE).to(dt)
    x, A = t(M, K, dt=bf), t(r, K, dt=f32)
    W = t(N, K, dt=torch.float16 if odd == "weight" else bf)
    xa = t(M, r, dt=bf if odd == "xa" else f32)
    B = t(N, r, dt=bf if odd == "lora_B" else f32)
    gy = t(M, N, dt=torch.float16 if odd == "grad_y" else bf)
    b = t(N, dt=torch.float16) if odd == "bias" else None
    with pytest.raises(TypeError, match=odd):
        if odd in ("weight", "xa", "lora_B", "bias"):
            tk.lora_forward(x, W, b, xa, B, 1.0)
        else:
            tk.lora_backward(gy, x, W, A, B, xa, 1.0, 0.0, SEED, True, False, False)
    if odd in ("xa", "lora_B"):
        with pytest.raises(TypeError, match=odd):
            tk.lora_backward(t(M, N, dt=bf), x, W, A, B, xa, 1.0, 0.0, SEED, True, False, False)
