"""fastlora.peft over bitsandbytes-quantized bases (QLoRA): a tiny Llama loaded in 4 bits (NF4,
double-quantized scales) or 8 bits by transformers, LoRA by PEFT, patched by fastlora."""
import warnings

import pytest
import torch

import fastlora
import fastlora.peft

bnb = pytest.importorskip("bitsandbytes")  # the test extra installs it
peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import BitsAndBytesConfig, LlamaForCausalLM  # noqa: E402

from fastlora.peft import bnb as fl_bnb  # noqa: E402
from tiny_llama import N_LAYERS, VOCAB, base_model  # noqa: E402
from tolerance import assert_close_to_truth  # noqa: E402

F = bnb.functional

CONFIGS = {
    "nf4-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                     bnb_4bit_compute_dtype=torch.bfloat16),
    "fp4-fp32": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    base_model(torch.float32).save_pretrained(d)
    return d


def quantized_peft_model(model_dir, config, dtype=torch.float32, dropout=0.0, seed=0):
    model = LlamaForCausalLM.from_pretrained(model_dir, quantization_config=BitsAndBytesConfig(**CONFIGS[config]),
                                             device_map="cpu", dtype=dtype)
    torch.manual_seed(seed)
    pm = get_peft_model(model, LoraConfig(target_modules="all-linear", r=4, lora_alpha=8, lora_dropout=dropout))
    for m in pm.modules():  # non-zero B, so the LoRA branch shows in every comparison
        if hasattr(m, "lora_B") and "default" in m.lora_B:
            torch.nn.init.normal_(m.lora_B["default"].weight, std=0.1)
    return pm


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, fastlora.peft.FastLoraLayerMixin)]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_layer_takes_the_fused_quantized_op(model_dir, config):
    pm = quantized_peft_model(model_dir, config)
    assert fastlora.peft.patch(pm) == N_LAYERS
    kind = fl_bnb.LoraLinear8bitLt if config == "int8" else fl_bnb.LoraLinear4bit
    assert all(type(m) is kind for m in lora_layers(pm)) and len(lora_layers(pm)) == N_LAYERS
    ids = torch.randint(0, VOCAB, (2, 9))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*falling back")
        out = pm(input_ids=ids, labels=ids)
        out.loss.backward()
    assert fastlora.peft.fast_path_calls(pm) == N_LAYERS
    # repr and state-dict keys are PEFT's
    assert repr(lora_layers(pm)[0]).startswith("lora.Linear8bitLt(" if config == "int8" else "lora.Linear4bit(")
    fastlora.peft.unpatch(pm)
    assert not lora_layers(pm)


def _truth(layer, x):
    """The layer's exact output (float64) on its dequantized weight."""
    w = fastlora.QuantizedWeight.from_bnb(layer.base_layer).dequantize(torch.float64)
    x64 = x.double()
    y = x64 @ w.T
    if layer.base_layer.bias is not None:
        y = y + layer.base_layer.bias.double()
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    return y + (x64 @ A.T @ B.T) * layer.scaling["default"]


@pytest.mark.parametrize("config, dtype", [("nf4-bf16", torch.bfloat16), ("nf4-bf16", torch.float32),
                                           ("fp4-fp32", torch.float32), ("int8", torch.float32),
                                           ("int8", torch.float16)], ids=str)
def test_layer_matches_peft_within_the_tolerance_rule(model_dir, config, dtype):
    """Each layer's output and LoRA gradients vs the float64 truth: within 2x the error of
    PEFT + bitsandbytes in the same configuration (model dtype, compute dtype, PEFT's float32
    adapters)."""
    pm = quantized_peft_model(model_dir, config, dtype=dtype)
    fastlora.peft.patch(pm)
    for layer in lora_layers(pm)[:4]:
        # x requires grad, as in training: bitsandbytes' own forward (PEFT's path) then keeps its
        # storage layout (test_weight_repacked_by_bitsandbytes_inference covers the other case)
        x = torch.randn(3, 5, layer.in_features).to(dtype).requires_grad_()
        peft_cls = layer._peft_class
        outs, grads = {}, {}
        for who in ("fastlora", "peft", "truth"):
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            if who == "truth":
                A64 = A.detach().double().requires_grad_()
                B64 = B.detach().double().requires_grad_()
                w = fastlora.QuantizedWeight.from_bnb(layer.base_layer).dequantize(torch.float64)
                bias = layer.base_layer.bias
                y = x.double() @ w.T + (0 if bias is None else bias.double()) + \
                    (x.double() @ A64.T @ B64.T) * layer.scaling["default"]
                params = (A64, B64)
            else:
                y = layer(x) if who == "fastlora" else peft_cls.forward(layer, x)
                params = (A, B)
            g = torch.autograd.grad(y.double().square().sum() / y.numel(), params)
            outs[who], grads[who] = y, g
        assert outs["fastlora"].dtype == outs["peft"].dtype == dtype
        assert_close_to_truth(outs["fastlora"], outs["peft"], outs["truth"], "y")
        for i, name in enumerate(("lora_A", "lora_B")):
            # the gradients' truth is the float64 loss on the float64 output
            assert_close_to_truth(grads["fastlora"][i], grads["peft"][i], grads["truth"][i], f"grad {name}")
    assert fastlora.peft.fast_path_calls(pm) == 4


def test_trains_and_saves_adapters_stock_peft_loads(model_dir, tmp_path):
    pm = quantized_peft_model(model_dir, "nf4-bf16", dtype=torch.bfloat16, dropout=0.1)
    fastlora.peft.patch(pm)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=3e-3)
    ids = torch.randint(0, VOCAB, (4, 12))
    losses = []
    for _ in range(8):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert fastlora.peft.fast_path_calls(pm) == 8 * N_LAYERS
    pm.save_pretrained(tmp_path / "adapter")
    trained = {k: v.clone() for k, v in pm.state_dict().items() if "lora_" in k}
    # stock PEFT, no fastlora layers: the same adapter weights, the same outputs in eval mode
    base = LlamaForCausalLM.from_pretrained(model_dir, quantization_config=BitsAndBytesConfig(**CONFIGS["nf4-bf16"]),
                                            device_map="cpu", dtype=torch.bfloat16)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert not lora_layers(loaded)
    got = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert got.keys() == trained.keys()
    assert all(torch.equal(got[k], trained[k]) for k in got)
    pm.eval()
    loaded.eval()
    with torch.no_grad():
        ours, theirs = pm(input_ids=ids).logits, loaded(input_ids=ids).logits
    # PEFT + bitsandbytes computes the base in bfloat16; fastlora in float32: close, not equal
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=0.05, atol=0.05)


def test_merge_and_fallbacks(model_dir):
    pm = quantized_peft_model(model_dir, "nf4-bf16")
    fastlora.peft.patch(pm)
    layer = lora_layers(pm)[0]
    x = torch.randn(2, layer.in_features)
    y = layer(x)
    layer.merge()  # PEFT's bitsandbytes merge: dequantize, add, requantize
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # merged: the base layer alone, nothing LoRA to compute
        y_merged = layer(x)
    torch.testing.assert_close(y_merged, y, rtol=0.1, atol=0.1)  # requantized: close only
    layer.unmerge()
    with pytest.warns(UserWarning, match="mixed-adapter batch"):
        layer(x, adapter_names=["default", "__base__"])
    calls = layer.fastlora_calls
    layer(x)
    assert layer.fastlora_calls == calls + 1


def test_plain_lora_linear_over_a_bitsandbytes_layer():
    """PEFT builds its plain lora.Linear around a bitsandbytes layer when the model was not loaded
    in 4 bits by transformers; fastlora.peft.LoraLinear runs it on the quantized op too."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = bnb.nn.Linear4bit(96, 40, quant_type="nf4", compute_dtype=torch.float32)

        def forward(self, x):
            return self.fc(x)

    torch.manual_seed(0)
    pm = get_peft_model(Net().to("cpu"), LoraConfig(target_modules=["fc"], r=4))
    layer = pm.base_model.model.fc
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(6, 96)
    y_peft = layer(x)
    assert fastlora.peft.patch(pm) == 1 and type(layer) is fastlora.peft.LoraLinear
    y = layer(x)
    assert layer.fastlora_calls == 1
    assert_close_to_truth(y, y_peft, _truth(layer, x), "y")


def test_weight_repacked_by_bitsandbytes_inference(model_dir):
    """bitsandbytes repacks a 4-bit weight for its CPU inference kernel when its own forward runs
    in eval mode without gradients (on CPUs with AVX512-BF16); the fastlora layer restores the
    storage layout (bitsandbytes' own inverse) and stays on the fast path."""
    pm = quantized_peft_model(model_dir, "nf4-bf16")
    fastlora.peft.patch(pm)
    pm.eval()
    layer = lora_layers(pm)[0]
    x = torch.randn(4, layer.in_features)
    with torch.no_grad():
        y_peft = layer._peft_class.forward(layer, x)  # bitsandbytes' forward: may repack
        y = layer(x)
    assert layer.fastlora_calls == 1
    assert not getattr(layer.base_layer.weight.quant_state, "packing_format_for_cpu", False)
    assert_close_to_truth(y, y_peft, _truth(layer, x), "y")
