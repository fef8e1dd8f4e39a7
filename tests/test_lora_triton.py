"""Triton LoRA Linear kernels vs fastlora.reference, under the Triton interpreter on CPU.

tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton kernels. Tolerances
follow flash-attention: truth is the reference in float64, and a kernel may be off by at most
twice the reference's own error in the test dtype plus a floor of a few ulps of the output's
scale. The dropout keep-mask must match the reference exactly.
"""
import os

import pytest
import torch
import torch.nn.functional as F

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
    # the epilogue with r = 40) and a 3-way split-K with its fp32 partial planes.
    monkeypatch.setattr(tk, "_blocks", lambda M, N, K, R, dtype: (16, 16, 16, 16, 4, 1))
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


def test_rejects_float64():
    x = torch.randn(4, 8, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        tk.lora_shrink(x, torch.randn(2, 8, dtype=torch.float64, device=DEVICE), 0.0, 0)


# --------------------------------------------------------------------------- op dispatch
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias,lora_B_bias", [(True, True), (False, True), (False, False)])
def test_cuda_dispatch_matches_cpu_kernel(dtype, bias, lora_B_bias):
    # The functions registered for CUDA (fastlora/ops/lora.py) run here on CPU tensors through
    # the interpreter: their glue (effective bias, seed, output mask) must give what the C++
    # CPU kernel gives.
    from fastlora.ops import lora as lora_ops

    M, K, N, r, p, s = 33, 42, 23, 4, 0.25, 1.5
    x, W = _rand(M, K, dtype), _rand(N, K, dtype, scale=K ** -0.5)
    A, B = _rand(r, K, dtype, scale=K ** -0.5), _rand(N, r, dtype, scale=r ** -0.5)
    b = _rand(1, N, dtype)[0] if bias else None
    bb = _rand(1, N, dtype)[0] if lora_B_bias else None
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
