"""fastlora.linear (F.linear whose bfloat16 / float16 CPU products run in float32 where those
GEMMs are emulated), its op fastlora::float32_weight, and the PEFT drop-in's
Float32ComputeLinear that patch() swaps in for a model's other nn.Linear layers."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

import fastlora
import fastlora.peft
from fastlora import cpu
from fastlora.ops.linear import half_via_float32
from tolerance import assert_close_to_truth

HALF = [torch.bfloat16, torch.float16]


@pytest.fixture
def emulating_cpu():
    """The avx2 build: bfloat16 and float16 GEMMs count as emulated (as on an AVX2 CPU), so the
    float32 route is taken whatever this machine has."""
    previous = cpu.use_cpu_isa("avx2")
    cpu.clear_weight_cache()
    yield
    cpu.use_cpu_isa(previous)
    cpu.clear_weight_cache()


def tensors(dtype, m=37, k=29, n=19, lead=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return mk(*lead, m, k), mk(n, k), mk(n)


def float32_route(x, w, b):
    """The route's specification: float32 GEMM on the exact float32 values, rounded once."""
    return F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)


def error_bound(x, w, b, dtype):
    """|float32 result rounded to dtype - exact| <= half an ulp of dtype at |y| (the rounding)
    + K * 2^-24 * (|x| @ |w|^T + |b|) (float32 accumulation), plus a float32 ulp of slack per
    the 2x rounding of the bound's own terms."""
    k = x.shape[-1]
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    mag = F.linear(x.double().abs(), w.double().abs(), None if b is None else b.double().abs())
    half_ulp = exact.abs() * torch.finfo(dtype).eps / 2
    return exact, half_ulp + (k + 2) * 2.0 ** -24 * mag


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_float32_weight_op(dtype, emulating_cpu):
    _, w, _ = tensors(dtype)
    w32 = torch.ops.fastlora.float32_weight(w)
    assert w32.dtype == torch.float32 and torch.equal(w32, w.float())
    assert torch.ops.fastlora.float32_weight(w).data_ptr() == w32.data_ptr()  # the kept copy
    torch.library.opcheck(torch.ops.fastlora.float32_weight.default, (w,))
    torch.library.opcheck(torch.ops.fastlora.float32_weight.default, (w.t(),))  # not contiguous: converted
    torch.library.opcheck(torch.ops.fastlora.float32_weight.default, (w[:0],))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int32], ids=str)
def test_float32_weight_rejects_other_dtypes(dtype):
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        torch.ops.fastlora.float32_weight(torch.zeros(3, 2, dtype=dtype))
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        torch.ops.fastlora.float32_weight(torch.zeros(3, 2, dtype=dtype, device="meta"))


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("shape", [dict(m=37), dict(m=1), dict(m=0), dict(m=5, lead=(2, 3)), dict(m=64, k=1, n=1)],
                         ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_half_route_forward_and_backward(dtype, shape, bias, emulating_cpu):
    x, w, b = tensors(dtype, **shape)
    b = b if bias else None
    x.requires_grad_(True)
    y = fastlora.linear(x, w, b)
    want = float32_route(x.detach(), w, b)
    assert y.dtype == dtype and torch.equal(y, want)
    exact, bound = error_bound(x.detach(), w, b, dtype)
    assert ((y.double() - exact).abs() <= bound).all()
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    (gx,) = torch.autograd.grad(y, [x], gy)
    # dX = dY @ W in float32, rounded once
    assert torch.equal(gx, (gy.float() @ w.float()).to(dtype))


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_route_matches_atens_emulated_gemm(dtype, emulating_cpu):
    # ATen's own half-precision GEMM on this CPU (native or emulated) against the route, both
    # within the derived bound of the exact product.
    x, w, b = tensors(dtype, m=48, k=96, n=40)
    exact, bound = error_bound(x, w, b, dtype)
    for y in (fastlora.linear(x, w, b), F.linear(x, w, b)):
        assert ((y.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_trainable_weight_and_bias_get_gradients(dtype, emulating_cpu):
    x, w, b = tensors(dtype)
    w.requires_grad_(True)
    b.requires_grad_(True)
    y = fastlora.linear(x, w, b)
    assert torch.equal(y, float32_route(x, w.detach(), b.detach()))
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    gw, gb = torch.autograd.grad(y, [w, b], gy)
    assert torch.equal(gw, (gy.float().t() @ x.float()).to(dtype))
    assert torch.equal(gb, gy.float().sum(0).to(dtype))
    assert cpu.weight_cache_usage()[0] == 0  # a trainable weight is converted per call, not kept


def test_frozen_weight_is_kept_and_only_it_is_saved(emulating_cpu):
    x, w, b = tensors(torch.bfloat16, m=64, k=128, n=96)
    x.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fastlora.linear(x, w, b)
    assert cpu.weight_cache_usage()[0] == 1
    # the float32 copy of x is not saved: no activation memory beyond the (kept) weight copy
    assert len(saved) == 1 and saved[0].data_ptr() == torch.ops.fastlora.float32_weight(w).data_ptr()
    w.data[0, 0] += 1  # a write through .data: the sampled fingerprint sees element 0
    torch.testing.assert_close(fastlora.linear(x, w, b), float32_route(x.detach(), w, b), rtol=0, atol=0)


def test_copy_kept_under_inference_mode_serves_training(emulating_cpu):
    # generate under inference_mode, then train: the kept copy must be a normal tensor, which
    # autograd can save for backward
    x, w, b = tensors(torch.bfloat16, m=16)
    with torch.inference_mode():
        y0 = fastlora.linear(x, w, b)
    assert cpu.weight_cache_usage()[0] == 1
    xg = x.clone().requires_grad_(True)
    y = fastlora.linear(xg, w, b)
    assert torch.equal(y, y0)
    y.float().sum().backward()
    assert torch.equal(xg.grad, torch.ones(16, w.shape[0]).matmul(w.float()).bfloat16())


def test_non_contiguous_inputs(emulating_cpu):
    x, w, b = tensors(torch.bfloat16, m=30, k=22, n=26)
    xt = x.t().contiguous().t()
    wt = w.t().contiguous().t()
    assert not xt.is_contiguous() and not wt.is_contiguous()
    assert torch.equal(fastlora.linear(xt, wt, b[::1]), float32_route(x, w, b))
    assert torch.equal(fastlora.linear(x[:, ::2], w[:, ::2], b), float32_route(x[:, ::2], w[:, ::2], b))


def test_single_row_without_grad_stays_in_aten(emulating_cpu):
    x, w, b = tensors(torch.bfloat16, m=1)
    assert torch.equal(fastlora.linear(x, w, b), F.linear(x, w, b))
    assert cpu.weight_cache_usage()[0] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_other_dtypes_are_f_linear(dtype, emulating_cpu):
    x, w, b = tensors(dtype)
    assert torch.equal(fastlora.linear(x, w, b), F.linear(x, w, b))
    x64 = x.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, c, d: fastlora.linear(a, c, d),
                                    (x64[:4, :5].detach().requires_grad_(True), w.double()[:3, :5].requires_grad_(True),
                                     b.double()[:3].requires_grad_(True)))


def test_native_half_gemms_are_f_linear():
    # At the machine's own level: where its half GEMMs are native, the route is ATen's.
    for dtype in HALF:
        x, w, b = tensors(dtype)
        if not half_via_float32(dtype):
            assert torch.equal(fastlora.linear(x, w, b), F.linear(x, w, b))
        else:
            assert torch.equal(fastlora.linear(x, w, b), float32_route(x, w, b))


def test_mismatched_dtypes_raise_as_f_linear(emulating_cpu):
    x, w, b = tensors(torch.bfloat16)
    with pytest.raises(RuntimeError):
        fastlora.linear(x.float(), w, b)
    with pytest.raises(RuntimeError):
        fastlora.linear(x, w[:, :-1], b)
    with pytest.raises(RuntimeError):
        fastlora.linear(x[0, 0], w, b)  # 0-d


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_autocast_casts_as_nn_linear(weight_dtype, emulating_cpu):
    x, w, b = tensors(torch.float32)
    w, b = w.to(weight_dtype), b.to(weight_dtype)
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastlora.linear(x, w, b)
        stock = F.linear(x, w, b)
    assert y.dtype == stock.dtype == torch.bfloat16
    assert torch.equal(y, float32_route(x.detach().bfloat16(), w.bfloat16(), b.bfloat16()))
    (gx,) = torch.autograd.grad(y.float().sum(), [x])
    assert gx.dtype == torch.float32
    assert cpu.weight_cache_usage()[0] == (1 if weight_dtype == torch.bfloat16 else 0)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, emulating_cpu):
    x, w, b = tensors(torch.bfloat16, m=8, k=16, n=12)
    x.requires_grad_(True)

    def layer(x, w, b):
        return torch.relu(fastlora.linear(x, w, b)) * 3

    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    y_c, y_e = compiled(x, w, b), layer(x, w, b)
    torch.testing.assert_close(y_c, y_e)
    torch.testing.assert_close(torch.autograd.grad(y_c.float().sum(), [x])[0],
                               torch.autograd.grad(y_e.float().sum(), [x])[0])


# --- the PEFT drop-in ---------------------------------------------------------------------------

def llama(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=64)
    return LlamaForCausalLM(cfg).to(dtype)


def test_patch_swaps_the_other_linears(emulating_cpu):
    from peft import LoraConfig, get_peft_model
    from torch import nn

    model = get_peft_model(llama(torch.bfloat16), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    reference = copy.deepcopy(model)
    keys, text = list(model.state_dict()), repr(model)
    assert fastlora.peft.patch(model) == 4  # LoRA layers
    plain = [n for n, m in model.named_modules() if type(m) is fastlora.Float32ComputeLinear]
    assert sorted({n.split(".")[-1] for n in plain}) == ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj",
                                                          "up_proj"]
    # LoRA layers' own linears are untouched (the fused op computes them)
    assert all(type(m.base_layer) is nn.Linear for m in model.modules() if isinstance(m, fastlora.peft.LoraLinear))
    assert list(model.state_dict()) == keys and repr(model) == text
    truth = copy.deepcopy(reference).double()
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(2))
    results = []
    for m in (truth, reference, model):
        out = m(ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
        results.append((out.logits, grads))
    (truth_y, truth_g), (ref_y, ref_g), (out_y, out_g) = results
    # every bfloat16 weight went through a float32 copy: the 11 plain layers' and the 4 LoRA bases'
    assert cpu.weight_cache_usage()[0] == len(plain) + 4 == 15
    assert_close_to_truth(out_y, ref_y, truth_y, "logits")
    for n in truth_g:
        assert_close_to_truth(out_g[n], ref_g[n], truth_g[n], n)
    pickle.loads(pickle.dumps(model))
    fastlora.peft.unpatch(model)
    assert not any(type(m) is fastlora.Float32ComputeLinear for m in model.modules())


def test_lora_layers_base_alone_takes_the_route(emulating_cpu):
    # adapters disabled, merged, or none active: the base layer alone, as fastlora.linear
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(llama(torch.bfloat16), LoraConfig(r=4, target_modules=["q_proj"]))
    fastlora.peft.patch(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    base = layer.base_layer
    x = torch.randn(6, 32).bfloat16()
    want = float32_route(x, base.weight, base.bias)
    with model.disable_adapter():
        assert torch.equal(layer(x), want)
    layer.set_adapter([])
    assert torch.equal(layer(x), want)
    layer.set_adapter("default")
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    model.merge_adapter()
    assert torch.equal(layer(x), float32_route(x, base.weight, base.bias))
    model.unmerge_adapter()
    assert fastlora.peft.fast_path_calls(model) == 0


def test_adapter_added_after_patch_takes_the_fused_path(emulating_cpu):
    # PEFT wraps the (already swapped) k_proj layers; patching again gives the LoRA layers a plain
    # nn.Linear base, so they run the fused op without a fallback warning
    import warnings

    from peft import LoraConfig, get_peft_model

    model = get_peft_model(llama(torch.bfloat16), LoraConfig(r=4, target_modules=["q_proj"]))
    fastlora.peft.patch(model)
    model.add_adapter("second", LoraConfig(r=4, target_modules=["k_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.k_proj
    assert type(layer.base_layer) is fastlora.Float32ComputeLinear
    assert fastlora.peft.patch(model) == 2  # the two new k_proj LoRA layers
    assert type(layer.base_layer) is torch.nn.Linear
    model.set_adapter("second")
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(ids)
    assert layer.fastlora_calls == 1


def test_patch_linears_false_leaves_them():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(llama(torch.float32), LoraConfig(r=4, target_modules=["q_proj"]))
    fastlora.peft.patch(model, linears=False)
    assert not any(type(m) is fastlora.Float32ComputeLinear for m in model.modules())


def test_patch_linears_on_any_model(emulating_cpu):
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4)).to(torch.bfloat16)
    x = torch.randn(40, 12).bfloat16()
    stock = model(x)
    assert fastlora.patch_linears(model, skip=lambda name, m: name == "2") == 1
    assert type(model[0]) is fastlora.Float32ComputeLinear and type(model[2]) is nn.Linear
    assert repr(model[0]) == "Linear(in_features=12, out_features=16, bias=True)"
    y = model(x)
    assert torch.equal(model[0](x), float32_route(x, model[0].weight, model[0].bias))
    truth = nn.Sequential(*[copy.deepcopy(m).double() for m in model])(x.double())
    assert_close_to_truth(y, stock, truth, "two layers")
    # a patched layer is still a plain linear layer to quantize_model
    assert fastlora.quantize_model(model, "nf4") == 2
    assert fastlora.unpatch_linears(model) == 0
    model = nn.Sequential(nn.Linear(3, 3))
    fastlora.patch_linears(model)
    assert fastlora.unpatch_linears(model) == 1 and type(model[0]) is nn.Linear
