"""fastlora.quantize (bitsandbytes' NF4 / FP4 / int8 layouts) and fastlora.lora_quantized_linear
(CPU C++ kernel) against fastlora.reference."""
import importlib

import pytest
import torch

import fastlora
from fastlora import reference as ref
from tolerance import assert_close_to_truth

quant = importlib.import_module("fastlora.quantize")  # the module, not the function
F = pytest.importorskip("bitsandbytes.functional")  # the test extra installs it: compared bit for bit

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FORMATS = ["nf4", "fp4", "int8"]
# (leading dims, in, out, r): 1 row, odd sizes (flat blocks straddle rows, odd nibble starts),
# leading batch dims, no rows, rows enough for several panels per thread, x and dY over 1 MiB in
# float32 (the wider panels, with a short last one).
SHAPES = [((1,), 6, 42, 1), ((42,), 123, 431, 8), ((2, 3), 42, 6, 8), ((0,), 64, 16, 4), ((300,), 130, 70, 16),
          ((1100,), 260, 600, 8)]


# --- the formats, bit for bit against bitsandbytes ----------------------------------------------

@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(64, 128), (33, 70), (5, 7), (1, 1), (30, 257)], ids=str)
@pytest.mark.parametrize("blocksize", [64, 256])
def test_4bit_quantize_matches_bitsandbytes(fmt, shape, blocksize):
    w = torch.randn(*shape) * 0.3
    for nested in (False, True):
        qw = fastlora.quantize(w, fmt, blocksize=blocksize, double_quant=nested)
        packed, qs = F.quantize_4bit(w, blocksize=blocksize, quant_type=fmt, compress_statistics=nested)
        assert torch.equal(qw.data, packed.reshape(-1))
        assert qw.nested == nested
        if nested:
            assert torch.equal(qw.nested_absmax, qs.state2.absmax) and qw.offset == float(qs.offset)
            assert torch.equal(qw.nested_code, qs.state2.code)
            _check_nested_codes(qw, qs, fastlora.quantize(w, fmt, blocksize=blocksize, double_quant=False).absmax)
        else:
            assert torch.equal(qw.absmax, qs.absmax)
        # bitsandbytes' stored weight, read as it is: its scales and weight, exactly (the float32
        # products code[q] * absmax)
        theirs = quant.QuantizedWeight.from_bnb(_Stored(packed, qs))
        assert torch.equal(theirs.scales(), _bnb_scales(qs))
        expected = _decode(packed, _bnb_scales(qs), F.get_4bit_type(fmt, device="cpu"), blocksize, shape)
        assert torch.equal(theirs.dequantize(torch.float32), expected)
        if shape[1] % blocksize == 0:
            # bitsandbytes' CPU dequantize (a C kernel) agrees where no block straddles two rows;
            # where one does (in_features not a multiple of blocksize) it mis-decodes the blocks
            # (its error vs the weight was 2.6x the quantization error at 64 x 128, blocksize 256).
            assert torch.equal(expected, F.dequantize_4bit(packed, qs))
        if not nested:
            assert torch.equal(qw.dequantize(torch.float32), expected)


def _decode(packed, scales, book, blocksize, shape):
    """The format's definition, element by element: W.flat[f] = code[q(f)] * absmax[f // blocksize]."""
    q = packed.reshape(-1).tolist()
    n = shape[0] * shape[1]
    out = torch.empty(n)
    for f in range(n):
        nibble = q[f // 2] >> 4 if f % 2 == 0 else q[f // 2] & 0xF
        out[f] = book[nibble] * scales[f // blocksize]
    return out.view(shape)


class _Stored:
    """What bitsandbytes' Params4bit holds: the packed codes and the quant_state."""
    def __init__(self, data, quant_state):
        self.data, self.quant_state = data, quant_state


def _check_nested_codes(qw, qs, plain_absmax):
    """The 8-bit codes of the scales: fastlora takes the nearest code (bitsandbytes' PyTorch
    reference rule); bitsandbytes' CPU C kernel takes a neighbouring one for a few near-ties.
    Where they differ, fastlora's is at least as close; a block of 256 scales that all equal
    their mean (scale 0) is coded 0 by the C kernel (0 / 0) and 0.0 by fastlora, and both decode
    to the mean."""
    per = qs.state2.absmax.repeat_interleave(quant.NESTED_BLOCKSIZE)[:qs.absmax.numel()]
    live = per != 0
    target = (plain_absmax - qs.offset) / per
    book = qs.state2.code
    ours, theirs = book[qw.absmax.long()], book[qs.absmax.long()]
    differ = live & (qw.absmax != qs.absmax)
    assert differ.float().mean() <= 0.01
    assert ((ours - target).abs() <= (theirs - target).abs() + 1e-7)[differ].all()


def _bnb_scales(qs):
    if not qs.nested:
        return qs.absmax
    return F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset


def test_dynamic_code_is_bitsandbytes():
    assert torch.equal(quant.dynamic_code(), F.create_dynamic_map(signed=True))


def test_int8_quantize_matches_bitsandbytes():
    w = torch.randn(37, 91)
    qw = fastlora.quantize(w, "int8")
    cb, scb, _ = F.int8_vectorwise_quant(w.half())
    assert torch.equal(qw.data.view(torch.int8).view(37, 91), cb) and torch.equal(qw.absmax, scb)
    assert torch.allclose(qw.dequantize(torch.float32), cb.float() * scb[:, None] / 127, rtol=1e-6, atol=0)


def test_from_bnb_linear4bit_uses_the_stored_weight():
    bnb = pytest.importorskip("bitsandbytes")
    for fmt, k in (("nf4", 128), ("fp4", 128), ("nf4", 96)):
        layer = bnb.nn.Linear4bit(k, 40, quant_type=fmt, compute_dtype=torch.float32).to("cpu")
        w, qs = layer.weight, layer.weight.quant_state
        qw = quant.QuantizedWeight.from_bnb(w)
        assert qw.data.data_ptr() == w.data.data_ptr()  # no copy of the codes
        assert qw.nested and qw.shape == (40, k)
        # The nested scales' offset stays a tensor on the weight's device: reading it as a
        # Python float would be a device-to-host sync in every forward on a GPU.
        assert isinstance(qw.offset, torch.Tensor) and qw.offset.device == w.device
        expected = _decode(w.data, _bnb_scales(qs), F.get_4bit_type(fmt, device="cpu"), 64, (40, k))
        assert torch.equal(qw.dequantize(torch.float32), expected)
        if k % 64 == 0:  # see test_4bit_quantize_matches_bitsandbytes
            assert torch.equal(expected, F.dequantize_4bit(w.data, qs))


def test_from_bnb_rejects_what_it_cannot_read():
    with pytest.raises(ValueError, match="not a quantized bitsandbytes weight"):
        quant.QuantizedWeight.from_bnb(torch.nn.Parameter(torch.randn(4, 4)))


def test_memory_targets():
    """Base-weight memory with its scales: NF4 with double quantization ~1/7.75 of float32,
    without ~1/7.1; int8 ~1/4."""
    w = torch.randn(4096, 4096)
    assert quant.weight_bytes_ratio(fastlora.quantize(w, "nf4")) < 1 / 7.7
    assert quant.weight_bytes_ratio(fastlora.quantize(w, "nf4", double_quant=False)) < 1 / 7
    assert quant.weight_bytes_ratio(fastlora.quantize(w, "int8")) < 1 / 3.99


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        fastlora.quantize(torch.randn(3), "nf4")
    with pytest.raises(ValueError, match="unknown format"):
        fastlora.quantize(torch.randn(3, 4), "nf3")
    with pytest.raises(ValueError, match="NaN or Inf"):
        fastlora.quantize(torch.tensor([[1.0, float("nan")]]), "nf4")
    with pytest.raises(ValueError, match="blocksize"):
        fastlora.quantize(torch.randn(3, 4), "nf4", blocksize=63)
    with pytest.raises(TypeError, match="floating-point"):
        fastlora.quantize(torch.ones(3, 4, dtype=torch.int32), "nf4")


# --- dequantize: the C++ kernel against the reference -------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_dequantize_kernel_matches_reference(fmt, dtype):
    for shape in [(13, 27), (64, 64), (1, 3), (0, 5), (4, 0)]:
        qw = fastlora.quantize(torch.randn(*shape), fmt, **({} if fmt == "int8" else {"blocksize": 64}))
        args = (qw.data, qw.scales(), qw.code, qw.blocksize, list(qw.shape))
        assert torch.equal(torch.ops.fastlora.dequantize(*args, dtype), ref.dequantize(*args, dtype))


# --- the LoRA op against the reference ------------------------------------------------------------

def make_inputs(lead, k, n, r, fmt, bias=True, lora_B_bias=False, noncontig=False):
    g = torch.Generator().manual_seed(1)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    x = rnd(*lead, 2 * k)[..., ::2] if noncontig else rnd(*lead, k)
    qw = fastlora.quantize(rnd(n, k, scale=k ** -0.5).float(), fmt)
    t = dict(x=x, bias=rnd(n) if bias else None, lora_A=rnd(r, k, scale=k ** -0.5),
             lora_B=rnd(n, r, scale=r ** -0.5), lora_B_bias=rnd(n) if lora_B_bias else None)
    return qw, t


ADAPTERS = ("lora_A", "lora_B", "lora_B_bias")


def cast(t, dtype, adapter_dtype=None):
    out = {}
    for key, v in t.items():
        if v is None:
            out[key] = None
            continue
        c = v.detach().to(adapter_dtype or dtype if key in ADAPTERS else dtype)
        if key == "x" and not v.is_contiguous():  # keep the layout in every dtype
            c = torch.empty(*v.shape[:-1], 2 * v.shape[-1], dtype=dtype)[..., ::2].copy_(c)
        out[key] = c.requires_grad_()
    return out


def run(fn, qw, t, grad_out, scaling, p, seed):
    y = fn(t["x"], qw, t["bias"], t["lora_A"], t["lora_B"], scaling, p, seed, t["lora_B_bias"])
    names = [k for k, v in t.items() if v is not None]
    grads = torch.autograd.grad(y, [t[k] for k in names], grad_out.to(y.dtype)) if y.numel() else []
    return y, dict(zip(names, grads))


def fused(x, qw, bias, lora_A, lora_B, scaling, p, seed, lora_B_bias):
    return fastlora.lora_quantized_linear(x, qw, bias, lora_A, lora_B, scaling, p, seed=seed, lora_B_bias=lora_B_bias)


def reference(x, qw, bias, lora_A, lora_B, scaling, p, seed, lora_B_bias):
    """The reference, differentiable: dropout and the products on the dequantized weight, in
    float32 (float64 for float64), rounded once."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = ref.dequantize(qw.data, qw.scales(), qw.code, qw.blocksize, qw.shape, ct)
    c = lambda v: None if v is None else v.to(ct)  # noqa: E731
    y = ref.lora_linear(c(x), w, c(bias), c(lora_A), c(lora_B), scaling, p, seed, c(lora_B_bias))
    return y.to(x.dtype)


def check_against_reference(dtype, lead, k, n, r, p, fmt, adapter_dtype=None, **kw):
    qw, t64 = make_inputs(lead, k, n, r, fmt, **kw)
    grad_out = torch.randn(*lead, n, dtype=torch.float64)
    scaling, seed = 2.0, 987654321
    truth_y, truth_g = run(reference, qw, cast(t64, torch.float64), grad_out, scaling, p, seed)
    ref_y, ref_g = run(reference, qw, cast(t64, dtype, adapter_dtype), grad_out, scaling, p, seed)
    out_y, out_g = run(fused, qw, cast(t64, dtype, adapter_dtype), grad_out, scaling, p, seed)
    assert_close_to_truth(out_y, ref_y, truth_y, "y")
    assert out_g.keys() == truth_g.keys()
    for name in truth_g:
        assert out_g[name].dtype == ref_g[name].dtype, name
        assert_close_to_truth(out_g[name], ref_g[name], truth_g[name], f"grad {name}")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(fmt, dtype, shape):
    check_against_reference(dtype, *shape, 0.25 if shape[1] % 2 else 0.0, fmt)


# Ranks above 64 on at least 64 rows: the float32 LoRA products as whole-batch BLAS GEMMs (as
# lora_linear there); bfloat16 / float16 inputs reach them through their float32 values on a CPU
# without native half-precision GEMMs.
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ranks_above_small_gemm(dtype, p):
    check_against_reference(dtype, (3, 70), 150, 130, 80, p, "nf4", noncontig=True, lora_B_bias=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_float32_adapters_on_half_input(dtype):
    """PEFT's default on a half-precision (QLoRA) model: float32 adapters."""
    for shape in SHAPES[:3]:
        check_against_reference(dtype, *shape, 0.1, "nf4", adapter_dtype=torch.float32, lora_B_bias=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noncontiguous_x_lora_bias_no_bias(dtype):
    check_against_reference(dtype, (5, 7), 42, 123, 8, 0.1, "nf4", noncontig=True, lora_B_bias=True, bias=False)


def test_float64_gradcheck():
    qw = fastlora.quantize(torch.randn(7, 11), "nf4", blocksize=64)
    x = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, 11, dtype=torch.float64, requires_grad=True)
    B = torch.randn(7, 2, dtype=torch.float64, requires_grad=True)
    Bb = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, b, A, B, Bb: fastlora.lora_quantized_linear(x, qw, b, A, B, 1.5, 0.3, seed=5, lora_B_bias=Bb),
        (x, b, A, B, Bb))


def test_dropout_mask_matches_lora_linear():
    """The quantized op and lora_linear on the dequantized weight draw the same dropout mask."""
    qw = fastlora.quantize(torch.randn(20, 30), "nf4")
    x, A, B = torch.randn(9, 30), torch.randn(4, 30), torch.randn(20, 4)
    y = fastlora.lora_quantized_linear(x, qw, None, A, B, 1.0, 0.5, seed=11)
    y_ref = fastlora.lora_linear(x, qw.dequantize(torch.float32), None, A, B, 1.0, 0.5, seed=11)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


def _op_args(qw, x, bias, A, B, Bb=None, seed=None):
    return (x, qw.data, qw.scales(), qw.code, qw.blocksize, list(qw.shape), bias, A, B, 0.5, 0.1, True, Bb, seed)


@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck(fmt):
    qw = fastlora.quantize(torch.randn(10, 12), fmt)
    x = torch.randn(2, 3, 12, requires_grad=True)
    A = torch.randn(4, 12, requires_grad=True)
    B = torch.randn(10, 4, requires_grad=True)
    b = torch.randn(10, requires_grad=True)
    torch.library.opcheck(torch.ops.fastlora.lora_quantized_linear, _op_args(qw, x, b, A, B, seed=torch.tensor(3)))
    x2 = x.detach().reshape(6, 12)
    fwd = (x2, qw.data, qw.scales(), qw.code, qw.blocksize, list(qw.shape), b, A, B, 0.5, 0.1, torch.tensor(3), None)
    torch.library.opcheck(torch.ops.fastlora.lora_quantized_linear_fwd, fwd)
    y, xa = torch.ops.fastlora.lora_quantized_linear_fwd(*[a.detach() if isinstance(a, torch.Tensor) else a
                                                           for a in fwd])
    torch.library.opcheck(torch.ops.fastlora.lora_quantized_linear_bwd,
                          (torch.randn_like(y), x2, qw.data, qw.scales(), qw.code, qw.blocksize, list(qw.shape),
                           A.detach(), B.detach(), xa, 0.5, 0.1, torch.tensor(3), [True, True]))
    torch.library.opcheck(torch.ops.fastlora.dequantize,
                          (qw.data, qw.scales(), qw.code, qw.blocksize, list(qw.shape), torch.bfloat16))


def test_torch_compile_matches_eager():
    qw = fastlora.quantize(torch.randn(24, 40), "nf4")
    A, B, b = torch.randn(4, 40), torch.randn(24, 4), torch.randn(24)

    def f(x):
        return fastlora.lora_quantized_linear(x, qw, b, A, B, 2.0, 0.0).relu().sum()

    x = torch.randn(5, 40)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


def test_autocast_runs_fast_path_in_autocast_dtype():
    qw = fastlora.quantize(torch.randn(24, 40), "nf4")
    A, B = torch.randn(4, 40, requires_grad=True), torch.randn(24, 4, requires_grad=True)
    x = torch.randn(5, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastlora.lora_quantized_linear(x, qw, None, A, B, 2.0)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32


def test_saves_only_x_and_the_shrink():
    """Activations saved for backward: x and xa (M x r); the codes and scales are the weight."""
    qw = fastlora.quantize(torch.randn(64, 48), "nf4")
    x = torch.randn(32, 48, requires_grad=True)
    A, B = torch.randn(4, 48, requires_grad=True), torch.randn(64, 4, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fastlora.lora_quantized_linear(x, qw, None, A, B, 1.0, 0.1)
    float_acts = [t for t in saved if t.is_floating_point() and t.numel() > 1 and t.data_ptr() not in
                  (A.data_ptr(), B.data_ptr(), qw.code.data_ptr())]
    scales = qw.scales()
    assert sorted(tuple(t.shape) for t in float_acts) == sorted([(32, 48), (32, 4), tuple(scales.shape)])
    y.sum().backward()


# --- bad input: clear errors -----------------------------------------------------------------------

def test_bad_input_errors():
    qw = fastlora.quantize(torch.randn(10, 12), "nf4")
    x, A, B = torch.randn(3, 12), torch.randn(4, 12), torch.randn(10, 4)
    op = torch.ops.fastlora.lora_quantized_linear
    base = list(_op_args(qw, x, None, A, B))
    with pytest.raises(TypeError, match="must be a fastlora.QuantizedWeight"):
        fastlora.lora_quantized_linear(x, torch.randn(10, 12), None, A, B, 1.0)
    cases = [
        (1, qw.data[:-1], ValueError, "qweight has 59 bytes but a 4-bit 10 x 12 weight needs 60"),
        (2, qw.scales()[:-1], ValueError, "absmax must be a contiguous 1-D tensor of 2 scales"),
        (2, qw.scales().double(), TypeError, "absmax must be float32"),
        (3, torch.zeros(17), ValueError, "code must be 1-D with 16 entries"),
        (4, 0, ValueError, "blocksize must be >= 1"),
        (0, torch.randn(3, 13), ValueError, "x has 13 features in its last dim but the weight expects in_features=12"),
        (5, [10, 13], ValueError, "qweight has 60 bytes but a 4-bit 10 x 13 weight needs 65"),
        (5, [-1, 12], ValueError, r"weight_shape must be two sizes in \[0, 2\^31\)"),
        (5, [2 ** 40, 12], ValueError, r"weight_shape must be two sizes"),
        (1, qw.data.view(torch.int8), TypeError, "qweight must be uint8"),
        (7, torch.randn(4, 13), ValueError, "lora_A must have shape"),
        (0, x.to(torch.int32), TypeError, "x must be float32"),
        (10, -0.5, ValueError, r"dropout_p must be in \[0, 1\]"),
    ]
    for pos, value, exc, msg in cases:
        args = list(base)
        args[pos] = value
        with pytest.raises(exc, match=msg):
            op(*args)


# --- fastlora.QuantizedLinear / quantize_model (no bitsandbytes) ----------------------------------

def test_quantized_linear_module():
    lin = torch.nn.Linear(40, 24)
    q = fastlora.QuantizedLinear.from_linear(lin, "nf4")
    x = torch.randn(3, 5, 40)
    w = q.dequantized_weight(torch.float64)
    truth = x.double() @ w.T + lin.bias.double()
    torch.testing.assert_close(q(x).double(), truth, rtol=1e-5, atol=1e-5)
    assert not q.weight.requires_grad and q.weight.dtype == torch.uint8
    assert q.quantized_weight().offset is q.offset  # the buffer itself: no host read per forward
    q(x).sum().backward()
    assert q.bias.grad is not None and q.weight.grad is None
    # state dict round trip into a layer quantized the same way; a different format is refused
    other = fastlora.QuantizedLinear.from_linear(torch.nn.Linear(40, 24), "nf4")
    other.load_state_dict(q.state_dict())
    torch.testing.assert_close(other(x), q(x))
    with pytest.raises(ValueError, match="quantize the model the same way"):
        fastlora.QuantizedLinear.from_linear(torch.nn.Linear(40, 24), "fp4").load_state_dict(q.state_dict())
    with pytest.raises(TypeError, match="expected a torch.nn.Linear"):
        fastlora.QuantizedLinear.from_linear(q)


def test_quantize_model_then_peft_runs_the_fused_op():
    peft = pytest.importorskip("peft")
    import fastlora.peft
    from tiny_llama import N_LAYERS, VOCAB, base_model

    model = base_model(torch.float32)
    assert fastlora.quantize_model(model, "nf4", skip=lambda name, layer: name == "lm_head") == N_LAYERS
    pm = peft.get_peft_model(model, peft.LoraConfig(target_modules="all-linear", r=4))
    assert fastlora.peft.patch(pm) == N_LAYERS
    ids = torch.randint(0, VOCAB, (2, 7))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert fastlora.peft.fast_path_calls(pm) == 5 * N_LAYERS
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match="merging an adapter into a fastlora.QuantizedLinear"):
        layer.merge()
