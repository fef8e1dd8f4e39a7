"""Triton QLoRA kernels (kernels/lora_quantized_linear.py) vs fastlora.reference, under the Triton
interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1), or on a GPU with FASTLORA_TEST_GPU=1.

Tolerances follow flash-attention (tests/tolerance.py): truth is the reference in float64 on the
same inputs, and a kernel may be off by at most twice the reference's own error in the test dtype
plus a floor of a few ulps. The truth runs the reference on float64 copies (the exact
dequantized weight), the reference in the test dtype is fastlora.reference's own (for a float16 /
bfloat16 x: base products in x's dtype on the weight rounded to it), which the kernels follow.
The in-kernel dequantization, the half-precision base products on the rounded weight and the
dropout keep-mask are checked bit for bit.
"""
import importlib
import os

import pytest
import torch

import fastlora
from fastlora import reference as ref
from fastlora.kernels import lora_quantized_linear as tk
from tolerance import assert_close_to_truth

quant = importlib.import_module("fastlora.quantize")  # the module, not the function
ops = importlib.import_module("fastlora.ops.lora_quantized_linear")

DEVICE = "cuda" if os.environ.get("FASTLORA_TEST_GPU") else "cpu"
SEED = 0x5EED_1234_ABCD  # exercises both 32-bit halves of the seed
# (x dtype, adapter dtype): one dtype, and PEFT's float32 adapters on a half-precision x.
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
          (torch.bfloat16, torch.float32), (torch.float16, torch.float32)]
# nf4 / fp4: 4-bit codes; int8: per-row scales (blocksize = K); u8: 8-bit codes with the case's
# blocksize, so that 8-bit blocks straddle rows too.
FORMATS = ["nf4", "fp4", "int8", "u8"]


def _weight(fmt, N, K, blocksize):
    """(qweight, absmax, code, blocksize, weight_shape) of a random N x K weight."""
    w = torch.randn(N, K) * max(K, 1) ** -0.5
    if fmt == "u8":
        q = torch.randint(0, 256, (N * K,), dtype=torch.uint8)
        scales = torch.rand(-(-N * K // blocksize)) * 0.05 + 0.01
        args = (q, scales, quant.code("int8"), blocksize)
    else:
        qw = fastlora.quantize(w, fmt, **({} if fmt == "int8" else {"blocksize": blocksize}))
        args = (qw.data, qw.scales(), qw.code, qw.blocksize)
    return tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args) + ([N, K],)


def _rand(*shape, dtype, scale=1.0, strided=False):
    v = (torch.randn(*shape) * scale).to(dtype).to(DEVICE)
    if strided:  # a column-strided view of a wider tensor
        return torch.zeros(shape[0], 2 * shape[1] + 1, dtype=dtype, device=DEVICE)[:, 1::2].copy_(v)
    return v


def _d(t):
    return None if t is None else t.double()


def _check(fmt, dtype, adtype, M, K, N, r, blocksize, p, bias, lora_B_bias, strided=False, scaling=1.7):
    """Forward (y, xa) and backward (grad_x, grad_bias, grad_A, grad_B) of the launchers against
    the reference and the float64 truth."""
    qa = _weight(fmt, N, K, blocksize)
    x = _rand(M, K, dtype=dtype, strided=strided)
    b = _rand(N, dtype=dtype) if bias else None
    A = _rand(r, K, dtype=adtype, scale=K ** -0.5)
    B = _rand(N, r, dtype=adtype, scale=r ** -0.5)
    Bb = _rand(N, dtype=adtype) if lora_B_bias else None
    out = tk.lora_quantized_forward(x, *qa, b, A, B, scaling, p, SEED, Bb)
    ref_out = ref.lora_quantized_linear_with_shrink(x, *qa, b, A, B, scaling, p, SEED, Bb)
    truth = ref.lora_quantized_linear_with_shrink(_d(x), *qa, _d(b), _d(A), _d(B), scaling, p, SEED, _d(Bb))
    for name, o, ro, t in zip(("y", "xa"), out, ref_out, truth):
        assert_close_to_truth(o, ro, t, name)

    gy = _rand(M, N, dtype=dtype)
    xa = ref_out[1]  # the saved activation, in the adapters' dtype
    out = tk.lora_quantized_backward(gy, x, *qa, A, B, xa, scaling, p, SEED, True, True)
    ref_out = ref.lora_quantized_linear_backward(gy, x, *qa, A, B, xa, scaling, p, SEED, True, True)
    truth = ref.lora_quantized_linear_backward(_d(gy), _d(x), *qa, _d(A), _d(B), _d(xa), scaling, p, SEED,
                                               True, True)
    for name, o, ro, t in zip(("grad_x", "grad_bias", "grad_A", "grad_B"), out, ref_out, truth):
        assert_close_to_truth(o, ro, t, name)


CASES = [  # M, K, N, r, blocksize, p, bias, lora_B_bias
    (1, 6, 42, 1, 64, 0.25, True, False),     # one row; rows much shorter than a block
    (37, 123, 42, 8, 64, 0.25, True, True),   # odd K: rows start at odd nibbles, blocks straddle rows
    (6, 42, 123, 8, 16, 0.0, False, False),   # K not a multiple of the blocksize, no dropout, no bias
    (20, 130, 70, 16, 64, 0.1, False, True),  # two K trips (tiles of 128) in the forward
    (0, 42, 6, 4, 64, 0.25, True, True),      # no rows
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype,adtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("M,K,N,r,blocksize,p,bias,lora_B_bias", CASES[:3])
def test_matches_reference(fmt, dtype, adtype, M, K, N, r, blocksize, p, bias, lora_B_bias):
    _check(fmt, dtype, adtype, M, K, N, r, blocksize, p, bias, lora_B_bias)


@pytest.mark.parametrize("fmt", ["nf4", "u8"])
@pytest.mark.parametrize("dtype,adtype", DTYPES[1:4], ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("M,K,N,r,blocksize,p,bias,lora_B_bias", CASES[3:])
def test_matches_reference_more_shapes(fmt, dtype, adtype, M, K, N, r, blocksize, p, bias, lora_B_bias):
    _check(fmt, dtype, adtype, M, K, N, r, blocksize, p, bias, lora_B_bias)


def _small_tiles(monkeypatch, split=3):
    # Under the interpreter the launchers pick one big tile; force the GPU-style paths instead:
    # 16-wide tiles (tile edges at odd flat offsets, many K trips, grouped program order, several
    # rank chunks in the epilogue) and a split-K with float32 partial planes.
    monkeypatch.setattr(tk, "_blocks", lambda M, N, K, R, quant: (16, 16, 16, 16, 4, 1))
    monkeypatch.setattr(tk, "_choose_split", lambda tiles, K, block_k, device: split)


@pytest.mark.parametrize("fmt,dtype,adtype", [("nf4", torch.bfloat16, torch.float32),
                                              ("u8", torch.float32, torch.float32),
                                              ("fp4", torch.float16, torch.float16)], ids=str)
def test_small_tiles_and_split_k(monkeypatch, fmt, dtype, adtype):
    _small_tiles(monkeypatch)
    # r = 20: two rank chunks of 16 in the epilogues.
    _check(fmt, dtype, adtype, 20, 123, 42, 20, 50 if fmt == "u8" else 64, 0.25, True, True, strided=True, scaling=0.5)


# --------------------------------------------------------------------------- bit for bit
@pytest.mark.parametrize("fmt,blocksize", [("nf4", 64), ("fp4", 16), ("int8", None), ("u8", 50)])
@pytest.mark.parametrize("tiles", ["big", "small", "int64"])
def test_in_kernel_dequantization_is_exact(monkeypatch, fmt, blocksize, tiles):
    # x = I gives y = dequant(W).T and grad_y = I gives grad_x = dequant(W): each entry a single
    # product by 1, so the in-kernel dequantization must equal the reference's float32 products
    # code[q] * absmax bit for bit, at every nibble parity and block straddle (odd K = 75),
    # and, with 16-wide tiles, at tile edges that fall mid-byte and mid-block; "int64": the flat
    # index arithmetic of weights with 2**31 elements or more.
    if tiles == "small":
        _small_tiles(monkeypatch, split=1)
    if tiles == "int64":
        monkeypatch.setattr(tk, "_FLAT32_LIMIT", 0)
    N, K = 42, 75
    qa = _weight(fmt, N, K, blocksize)
    w = ref.dequantize(*qa, torch.float32)
    A, B = torch.zeros(1, K, device=DEVICE), torch.zeros(N, 1, device=DEVICE)
    y, _ = tk.lora_quantized_forward(torch.eye(K, device=DEVICE), *qa, None, A, B, 1.0, 0.0, 0)
    assert torch.equal(y, w.t())
    xa = torch.zeros(N, 1, device=DEVICE)
    gx, _, _, _ = tk.lora_quantized_backward(torch.eye(N, device=DEVICE), torch.zeros(N, K, device=DEVICE), *qa,
                                             A, B, xa, 1.0, 0.0, 0, True, False)
    assert torch.equal(gx, w)


def _half_weight(fmt, N, K, blocksize, dtype):
    """(qweight, absmax, code, blocksize, weight_shape) whose float32 dequantized values are
    not representable in ``dtype``, half of the code book exactly halfway between two ``dtype``
    neighbours (ties, kept as ties by every other block's scale of 1), magnitudes in [0.25, 1]."""
    n_codes = 16 if fmt == "nf4" else 256
    ulp = 2.0 ** -(8 if dtype == torch.bfloat16 else 11)  # dtype's spacing in [0.5, 1)
    mag = 0.5 + torch.rand(n_codes, dtype=torch.float64) * 0.5
    ties = 0.5 + (2 * torch.randint(0, int(0.5 / ulp), (n_codes,), dtype=torch.float64) + 1) * (ulp / 2)
    mag = torch.where(torch.arange(n_codes) % 2 == 0, ties, mag)
    sign = torch.where(torch.rand(n_codes) < 0.5, -1.0, 1.0).double()
    code = (mag * sign).float()
    nblocks = -(-N * K // blocksize)
    absmax = torch.rand(nblocks) * 0.5 + 0.5
    absmax[::2] = 1.0
    q = torch.randint(0, 256, ((N * K + 1) // 2 if n_codes == 16 else N * K,), dtype=torch.uint8)
    return tuple(t.to(DEVICE) for t in (q, absmax, code)) + (blocksize, [N, K])


@pytest.mark.parametrize("fmt,blocksize", [("nf4", 64), ("u8", 50)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("tiles", ["big", "small"])
def test_half_base_products_use_the_half_rounded_weight(monkeypatch, fmt, blocksize, dtype, tiles):
    # A float16 / bfloat16 x runs the base GEMMs (forward and grad_x) in its own dtype on the
    # weight rounded to it to nearest even (fastlora.reference's and bitsandbytes' semantics),
    # not in float32 on the float32 dequantized weight. x and grad_y in {-1, 0, 1} and weights
    # of magnitude in [0.25, 1] make every product and every sum (K, N < 128 terms) exact in
    # float32, so both outputs are the exact x @ W_half^T / grad_y @ W_half rounded once: bit
    # for bit, whatever the summation order, and different from the float32 path's results.
    # The LoRA branch is zero (the kernel adds it to the unrounded base accumulator, the
    # reference to the rounded base product: equal only when it is zero). The reference runs on
    # CPU copies (a GPU's half GEMM may reduce in half precision: cuBLAS's reduced-precision
    # reductions).
    if tiles == "small":
        _small_tiles(monkeypatch, split=1)
    M, N, K = 37, 42, 75
    qa = _half_weight(fmt, N, K, blocksize, dtype)
    w32 = ref.dequantize(*qa, torch.float32)
    w_half = ref.dequantize(*qa, dtype)
    assert (w_half.float() != w32).float().mean() > 0.9  # the rounding matters
    ternary = lambda *shape: torch.randint(-1, 2, shape).to(dtype).to(DEVICE)  # noqa: E731
    cpu = lambda *ts: [t.cpu() if isinstance(t, torch.Tensor) else t for t in ts]  # noqa: E731
    A, B, xa = torch.zeros(1, K, device=DEVICE), torch.zeros(N, 1, device=DEVICE), torch.zeros(M, 1, device=DEVICE)

    x = ternary(M, K)
    y, _ = tk.lora_quantized_forward(x, *qa, None, A, B, 1.0, 0.0, 0)
    expected = (x.double() @ w_half.double().t()).to(dtype)
    ref_y, _ = ref.lora_quantized_linear_with_shrink(*cpu(x, *qa, None, A, B), 1.0, 0.0, 0)
    assert torch.equal(ref_y, expected.cpu())  # the reference's semantics, computed exactly
    assert ((x.double() @ w32.double().t()).to(dtype) != expected).sum() >= 20, "float32 products give the same"
    assert y.dtype == dtype and torch.equal(y, expected)

    gy = ternary(M, N)
    gx, _, _, _ = tk.lora_quantized_backward(gy, x, *qa, A, B, xa, 1.0, 0.0, 0, True, False)
    expected = (gy.double() @ w_half.double()).to(dtype)
    ref_gx = ref.lora_quantized_linear_backward(*cpu(gy, x, *qa, A, B, xa), 1.0, 0.0, 0, True, False)[0]
    assert torch.equal(ref_gx, expected.cpu())
    assert ((gy.double() @ w32.double()).to(dtype) != expected).sum() >= 20, "float32 products give the same"
    assert gx.dtype == dtype and torch.equal(gx, expected)


@pytest.mark.parametrize("dtype,adtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                          (torch.bfloat16, torch.bfloat16)], ids=str)
def test_keep_mask_exact(dtype, adtype):
    # lora_A = I: xa = dropout(x.to(float32)) rounded once to the adapters' dtype, bit for bit,
    # with fastlora's keep-mask.
    M, K, p = 37, 42, 0.25
    x = _rand(M, K, dtype=dtype, strided=True)
    x[x == 0] = 1.0
    qa = _weight("nf4", 6, K, 64)
    _, xa = tk.lora_quantized_forward(x, *qa, None, torch.eye(K, dtype=adtype, device=DEVICE),
                                      torch.zeros(6, K, dtype=adtype, device=DEVICE), 1.0, p, SEED)
    assert xa.dtype == adtype
    assert torch.equal(xa != 0, ref.dropout_keep_mask(M, K, p, SEED, device=DEVICE))
    assert torch.equal(xa, ref.dropout(x.float(), p, SEED).to(adtype))


# --------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("xd,ad", [(torch.float64, torch.float64), (torch.float32, torch.bfloat16),
                                   (torch.bfloat16, torch.float16)], ids=str)
def test_rejects_other_dtypes(xd, ad):
    # float64 goes to the reference (the op's CUDA glue does that); adapters are x's dtype or
    # float32 under a half-precision x.
    qa = _weight("nf4", 6, 8, 64)
    x, A, B = (torch.randn(*s, device=DEVICE).to(dt) for s, dt in (((4, 8), xd), ((2, 8), ad), ((6, 2), ad)))
    with pytest.raises(TypeError):
        tk.lora_quantized_forward(x, *qa, None, A, B, 1.0, 0.0, 0)


# --------------------------------------------------------------------------- op dispatch
@pytest.mark.parametrize("dtype,adtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_cuda_dispatch_glue(dtype, adtype, fmt):
    # The functions registered for CUDA (fastlora/ops/lora_quantized_linear.py) run here on CPU
    # tensors through the interpreter: the check op, the seed tensor, the output mask, a
    # non-contiguous x, bias and lora_B_bias, against the reference and the C++ CPU kernel.
    M, K, N, r, p, s = 33, 43, 23, 4, 0.25, 1.5
    qa = _weight(fmt, N, K, 64)
    x = _rand(M, K, dtype=dtype, strided=True)
    b, A = _rand(N, dtype=dtype), _rand(r, K, dtype=adtype, scale=K ** -0.5)
    B, Bb = _rand(N, r, dtype=adtype, scale=r ** -0.5), _rand(N, dtype=adtype)
    seed = torch.tensor(SEED)
    y, xa = ops._fwd_cuda(x, *qa, b, A, B, s, p, seed, Bb)
    ref_y, ref_xa = ref.lora_quantized_linear_with_shrink(x, *qa, b, A, B, s, p, SEED, Bb)
    truth = ref.lora_quantized_linear_with_shrink(_d(x), *qa, _d(b), _d(A), _d(B), s, p, SEED, _d(Bb))
    assert_close_to_truth(y, ref_y, truth[0], "y")
    assert_close_to_truth(xa, ref_xa, truth[1], "xa")
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    y_cpu, _ = torch.ops.fastlora.lora_quantized_linear_fwd(*(cpu(t) if isinstance(t, torch.Tensor) else t
                                                              for t in (x, *qa, b, A, B)), s, p, seed, cpu(Bb))
    assert_close_to_truth(y_cpu.to(DEVICE), ref_y, truth[0], "y (C++)")

    gy = _rand(M, N, dtype=dtype)
    for mask in ([True, True], [False, False]):
        grads = ops._bwd_cuda(gy, x, *qa, A, B, ref_xa, s, p, seed, mask)
        ref_g = ref.lora_quantized_linear_backward(gy, x, *qa, A, B, ref_xa, s, p, SEED, *mask)
        truth_g = ref.lora_quantized_linear_backward(_d(gy), _d(x), *qa, _d(A), _d(B), _d(ref_xa), s, p, SEED,
                                                     *mask)
        for name, o, ro, t in zip(("grad_x", "grad_bias", "grad_A", "grad_B"), grads, ref_g, truth_g):
            assert_close_to_truth(o, ro, t, name)


@pytest.mark.parametrize("N,K", [(0, 8), (6, 0)])
def test_empty_weight(N, K):
    # No output features, or no input features (y = bias + the LoRA branch's bias): the codes
    # and scales are empty and never read.
    qa = _weight("nf4", N, K, 64)
    M, r, s, seed = 5, 3, 1.5, torch.tensor(9)
    x, A, B, b, gy = (torch.randn(*sh, device=DEVICE) for sh in ((M, K), (r, K), (N, r), (N,), (M, N)))
    out = ops._fwd_cuda(x, *qa, b, A, B, s, 0.2, seed, b)
    out += ops._bwd_cuda(gy, x, *qa, A, B, out[1], s, 0.2, seed, [True, True])
    ref_out = ref.lora_quantized_linear_with_shrink(x, *qa, b, A, B, s, 0.2, 9, b)
    ref_out += ref.lora_quantized_linear_backward(gy, x, *qa, A, B, out[1], s, 0.2, 9, True, True)
    for o, ro in zip(out, ref_out):
        torch.testing.assert_close(o, ro)


def test_cuda_dispatch_glue_float64_and_checks():
    # float64 runs the reference; bad arguments fail in the C++ check before any launch.
    qa = _weight("nf4", 6, 8, 64)
    x, A, B = (torch.randn(*s, dtype=torch.float64, device=DEVICE) for s in ((4, 8), (2, 8), (6, 2)))
    seed = torch.tensor(3)
    y, xa = ops._fwd_cuda(x, *qa, None, A, B, 1.0, 0.5, seed, None)
    ref_y, ref_xa = ref.lora_quantized_linear_with_shrink(x, *qa, None, A, B, 1.0, 0.5, 3)
    assert torch.equal(y, ref_y) and torch.equal(xa, ref_xa)
    with pytest.raises(ValueError, match="qweight has 23 bytes"):
        ops._fwd_cuda(x.float(), qa[0][:-1], *qa[1:], None, A.float(), B.float(), 1.0, 0.0, seed, None)
    with pytest.raises(ValueError, match="xa must have shape"):
        ops._bwd_cuda(torch.randn(4, 6, device=DEVICE), x.float(), *qa, A.float(), B.float(),
                      torch.randn(3, 2, device=DEVICE), 1.0, 0.0, seed, [True, True])


@pytest.mark.skipif(DEVICE != "cuda", reason="the op dispatches to these kernels on CUDA tensors only")
@pytest.mark.parametrize("dtype,adtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32)], ids=str)
def test_op_runs_the_kernels_on_cuda(dtype, adtype):
    # End to end through fastlora.lora_quantized_linear and autograd on the GPU, against the
    # reference on the same inputs.
    qw = fastlora.quantize(torch.randn(48, 40), "nf4").to(DEVICE)
    x = torch.randn(2, 5, 40, device=DEVICE).to(dtype).requires_grad_()
    A = (torch.randn(4, 40, device=DEVICE) * 0.2).to(adtype).requires_grad_()
    B = torch.randn(48, 4, device=DEVICE).to(adtype).requires_grad_()
    y = fastlora.lora_quantized_linear(x, qw, None, A, B, 2.0, 0.1, seed=7)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, A, B), gy)
    qa = (qw.data, qw.scales(), qw.code, qw.blocksize, list(qw.shape))
    x2 = x.detach().reshape(-1, 40)
    ref_y, ref_xa = ref.lora_quantized_linear_with_shrink(x2, *qa, None, A.detach(), B.detach(), 2.0, 0.1, 7)
    truth_y, _ = ref.lora_quantized_linear_with_shrink(x2.double(), *qa, None, _d(A.detach()), _d(B.detach()),
                                                       2.0, 0.1, 7)
    assert_close_to_truth(y.reshape(-1, 48), ref_y, truth_y, "y")
    ref_g = ref.lora_quantized_linear_backward(gy.reshape(-1, 48), x2, *qa, A.detach(), B.detach(), ref_xa, 2.0,
                                               0.1, 7, True, False)
    truth_g = ref.lora_quantized_linear_backward(_d(gy.reshape(-1, 48)), _d(x2), *qa, _d(A.detach()),
                                                 _d(B.detach()), _d(ref_xa), 2.0, 0.1, 7, True, False)
    for name, o, i in (("grad_x", grads[0].reshape(-1, 40), 0), ("grad_A", grads[1], 2), ("grad_B", grads[2], 3)):
        assert_close_to_truth(o, ref_g[i], truth_g[i], name)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("N,K,blocksize", [(1, 6, 64), (37, 123, 64), (70, 130, 16), (5, 300, 256), (0, 7, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_dequantize_kernel_is_exact(fmt, N, K, blocksize, dtype):
    """``fastlora::dequantize``'s GPU kernel: every element the reference's float32 product
    code[q] * absmax rounded once to dtype, bit for bit (odd K: rows at odd nibbles, blocks
    straddling rows and tiles, one row, no rows); through the op's CUDA glue (checks first)."""
    qa = _weight(fmt, N, K, blocksize)
    got = ops._dequantize_cuda(*qa, dtype)
    want = ref.dequantize(*qa, dtype)
    assert got.shape == (N, K) and got.dtype == dtype
    assert torch.equal(got, want)


def test_dequantize_kernel_int64_indices_and_checks(monkeypatch):
    # The int64 flat-index path (taken by weights near 2**31 elements), forced on a small one.
    monkeypatch.setattr(tk, "_FLAT32_LIMIT", 0)
    qa = _weight("nf4", 9, 77, 64)
    assert torch.equal(tk.dequantize(*qa, torch.bfloat16), ref.dequantize(*qa, torch.bfloat16))
    with pytest.raises(ValueError, match="qweight has"):
        ops._dequantize_cuda(qa[0][:-1], *qa[1:], torch.float32)
    with pytest.raises(TypeError, match="dtype must be float32, float64, float16 or bfloat16"):
        ops._dequantize_cuda(*qa, torch.int32)
