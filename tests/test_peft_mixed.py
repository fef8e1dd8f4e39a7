"""fastlora.peft on mixed-adapter batches (PEFT's ``adapter_names=[...]``): one grouped
``fastlora.lora_grouped_linear`` call per layer instead of PEFT's per-adapter loop, on the tiny
Llama with three adapters of different ranks."""
import copy
import warnings

import pytest
import torch


from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import Linear as PeftLinear  # noqa: E402

import fastlora  # noqa: E402
import fastlora.peft as fp  # noqa: E402
from tiny_llama import N_LAYERS, VOCAB, base_model  # noqa: E402
from tolerance import assert_close_to_truth  # noqa: E402

# Three adapters of different ranks (one with rsLoRA scaling).
ADAPTERS = {"default": dict(r=4, lora_alpha=8), "b": dict(r=8, lora_alpha=32),
            "c": dict(r=16, lora_alpha=16, use_rslora=True)}
NAMES = ["b", "__base__", "default", "c", "b"]


def config(**kw):
    return LoraConfig(**{"lora_dropout": 0.0, "target_modules": "all-linear", **kw})


def make_stock(dtype=torch.float64, adapters=ADAPTERS, **extra):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        items = list(adapters.items())
        model = get_peft_model(base_model(dtype), config(**items[0][1], **extra))
        for name, kw in items[1:]:
            model.add_adapter(name, config(**kw, **extra))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # PEFT initialises lora_B to zero: make every branch non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1)
    model.to(dtype)  # PEFT keeps adapters in float32 on a half-precision base model
    model.eval()  # PEFT refuses adapter_names in training mode
    return model


def make_pair(dtype=torch.float64, **kw):
    stock = make_stock(dtype, **kw)
    fast = copy.deepcopy(stock)
    assert fp.patch(fast) == N_LAYERS
    return stock, fast


def ids(batch=len(NAMES), seq=7, seed=5):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model, x, **kw):
    with torch.no_grad():
        return model(x, **kw).logits


def first_layer(model):
    return next(m for m in model.modules() if isinstance(m, PeftLinear))


def test_matches_peft_float64_and_counts_fast_path():
    stock, fast = make_pair()
    x = ids()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback anywhere
        out = logits(fast, x, adapter_names=NAMES)
    torch.testing.assert_close(out, logits(stock, x, adapter_names=NAMES), rtol=1e-12, atol=1e-12)
    assert fp.fast_path_calls(fast) == N_LAYERS
    # Per sample, the mixed batch equals running that sample with its adapter alone.
    for i, name in enumerate(NAMES):
        if name == "__base__":
            with stock.disable_adapter():
                expect = logits(stock, x[i:i + 1])
        else:
            stock.set_adapter(name)
            expect = logits(stock, x[i:i + 1])
        torch.testing.assert_close(out[i:i + 1], expect, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_peft_low_precision(dtype):
    stock64, _ = make_pair(torch.float64)
    stock, fast = make_pair(dtype)
    x = ids()
    truth = logits(stock64, x, adapter_names=NAMES)
    assert_close_to_truth(logits(fast, x, adapter_names=NAMES), logits(stock, x, adapter_names=NAMES), truth,
                          "logits")
    assert fp.fast_path_calls(fast) == N_LAYERS


def test_subsets_unknown_names_and_all_base():
    stock, fast = make_pair()
    x = ids(batch=3)
    for names in (["c", "c", "c"], ["__base__", "default", "__base__"], ["b", "default", "b"]):
        torch.testing.assert_close(logits(fast, x, adapter_names=names), logits(stock, x, adapter_names=names))
    assert fp.fast_path_calls(fast) == 3 * N_LAYERS
    # All base: nothing LoRA to compute, PEFT's forward (the base layer), silently.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(logits(fast, x, adapter_names=["__base__"] * 3),
                                   logits(stock, x, adapter_names=["__base__"] * 3))
    assert fp.fast_path_calls(fast) == 3 * N_LAYERS
    # A name this layer does not hold adds nothing (as in PEFT); PEFT's own errors are kept.
    layer = first_layer(fast)
    h = torch.randn(3, 4, layer.in_features, dtype=torch.float64)
    torch.testing.assert_close(layer(h, adapter_names=["nope", "b", "__base__"]),
                               PeftLinear.forward(layer, h, adapter_names=["nope", "b", "__base__"]))
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        layer(h, adapter_names=["b"])
    calls = layer.fastlora_calls
    h2 = h[:, 0]  # 2-D input: one row per sample
    torch.testing.assert_close(layer(h2, adapter_names=["c", "b", "__base__"]),
                               PeftLinear.forward(layer, h2, adapter_names=["c", "b", "__base__"]))
    assert layer.fastlora_calls == calls + 1


def test_stacked_weights_cached_and_invalidated(monkeypatch):
    stock, fast = make_pair()
    x = ids()
    stacks = []
    real = fastlora.stack_lora_adapters
    monkeypatch.setattr(fastlora, "stack_lora_adapters", lambda *a: stacks.append(1) or real(*a))
    logits(fast, x, adapter_names=NAMES)
    assert len(stacks) == N_LAYERS
    logits(fast, x, adapter_names=NAMES)
    logits(fast, x, adapter_names=list(reversed(NAMES)))  # same adapter set, other order
    assert len(stacks) == N_LAYERS  # cache hits: no re-stacking
    # An in-place update of one adapter (as an optimizer step does) invalidates that layer only.
    with torch.no_grad():
        for model in (stock, fast):
            first_layer(model).lora_B["b"].weight.mul_(-3.0)
    torch.testing.assert_close(logits(fast, x, adapter_names=NAMES), logits(stock, x, adapter_names=NAMES))
    assert len(stacks) == N_LAYERS + 1
    # A new scaling (PEFT's set_scale) and a new adapter set are new cache entries.
    for model in (stock, fast):
        first_layer(model).set_scale("c", 3.0)
    torch.testing.assert_close(logits(fast, x, adapter_names=NAMES), logits(stock, x, adapter_names=NAMES))
    assert len(stacks) == N_LAYERS + 2
    logits(fast, x, adapter_names=["b", "c", "b", "c", "__base__"])
    assert len(stacks) == 2 * N_LAYERS + 2
    # Writes through .data bypass version counting: clear_stacked_cache forces a re-stack.
    for model in (stock, fast):
        first_layer(model).lora_A["default"].weight.data.mul_(2.0)
    fp.clear_stacked_cache(fast)
    torch.testing.assert_close(logits(fast, x, adapter_names=NAMES), logits(stock, x, adapter_names=NAMES))
    assert fp.unpatch(fast) == N_LAYERS and not any("_fastlora_stack_cache" in m.__dict__ for m in fast.modules())


def test_gradients_through_mixed_batch_match_peft():
    # PEFT's model refuses adapter_names in training mode; under grad mode in eval mode (or on a
    # layer directly) gradients flow through the grouped op to every adapter and to x.
    stock, fast = make_pair()
    sl, fl = first_layer(stock), first_layer(fast)
    h = torch.randn(5, 3, sl.in_features, dtype=torch.float64)
    grads = []
    for layer in (sl, fl):
        hx = h.clone().requires_grad_()
        params = [layer.lora_A[n].weight for n in ADAPTERS] + [layer.lora_B[n].weight for n in ADAPTERS]
        for p in params:  # PEFT freezes the adapters that are not active
            p.requires_grad_(True)
        y = layer(hx, adapter_names=NAMES)
        grads.append(torch.autograd.grad(y.square().sum(), [hx] + params))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert fl.fastlora_calls == 1


def test_dropout_in_training_mode_falls_back_eval_does_not():
    stock, fast = make_pair(adapters={"default": dict(r=4, lora_alpha=8, lora_dropout=0.1),
                                      "b": dict(r=8, lora_alpha=16, lora_dropout=0.1)})
    sl, fl = first_layer(stock), first_layer(fast)
    h = torch.randn(3, 2, sl.in_features, dtype=torch.float64)
    names = ["b", "default", "__base__"]
    sl.train()
    fl.train()
    with pytest.warns(UserWarning, match="applies dropout"):
        torch.manual_seed(0)
        out = fl(h, adapter_names=names)
    torch.manual_seed(0)
    torch.testing.assert_close(out, sl(h, adapter_names=names))
    assert fl.fastlora_calls == 0
    sl.eval()
    fl.eval()
    with torch.no_grad():
        torch.testing.assert_close(fl(h, adapter_names=names), sl(h, adapter_names=names))
    assert fl.fastlora_calls == 1


def test_lora_bias_and_dora_fall_back_like_peft():
    stock, fast = make_pair(adapters={"default": dict(r=4, lora_alpha=8), "b": dict(r=8, lora_alpha=8)},
                            lora_bias=True)
    x = ids(batch=3)
    names = ["b", "__base__", "default"]
    with pytest.warns(UserWarning, match="lora_bias=True"):
        torch.testing.assert_close(logits(fast, x, adapter_names=names), logits(stock, x, adapter_names=names))
    assert fp.fast_path_calls(fast) == 0
    # DoRA: PEFT itself refuses adapter_names; the patched layers raise the same error.
    stock, fast = make_pair(adapters={"default": dict(r=4, lora_alpha=8, use_dora=True)})
    for model in (stock, fast):
        with pytest.raises(ValueError, match="DoRA"):
            logits(model, x, adapter_names=["default", "__base__", "default"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_model_with_float32_adapters_runs_grouped_path_like_peft(dtype):
    """PEFT's default on a half-precision model keeps the adapters in float32: the mixed batch
    runs the grouped op on the adapters stacked in the model's dtype (once, cached), within the
    tolerance rule of PEFT's own error in that configuration (it rounds each LoRA output)."""
    truth_model = make_stock(torch.float64)
    stock = copy.deepcopy(truth_model).to(dtype)
    with torch.no_grad():
        for (name, p), t in zip(stock.named_parameters(), truth_model.parameters()):
            if "lora_" in name:
                p.data = t.detach().float()
    assert {p.dtype for n, p in stock.named_parameters() if "lora_" in n} == {torch.float32}
    fast = copy.deepcopy(stock)
    assert fp.patch(fast) == N_LAYERS
    x = ids()
    truth = logits(truth_model, x, adapter_names=NAMES)
    ref = logits(stock, x, adapter_names=NAMES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback anywhere
        out = logits(fast, x, adapter_names=NAMES)
        assert torch.equal(logits(fast, x, adapter_names=NAMES), out)  # from the cached stack
    assert fp.fast_path_calls(fast) == 2 * N_LAYERS
    assert out.dtype == ref.dtype == dtype
    assert_close_to_truth(out, ref, truth, "logits")


def test_mixed_dtype_falls_back():
    stock, fast = make_pair()
    layer = first_layer(fast)
    h = torch.randn(3, 5, layer.in_features, dtype=torch.float32)
    layer.base_layer.float()
    with pytest.warns(UserWarning, match="mixed dtypes"):
        out = layer(h, adapter_names=["b", "c", "__base__"])
    torch.testing.assert_close(out, PeftLinear.forward(layer, h, adapter_names=["b", "c", "__base__"]))
    assert layer.fastlora_calls == 0


def test_autocast_mixed_batch_runs_grouped_path_like_peft():
    """Under bfloat16 autocast a float32 model's mixed batch runs the grouped op in bfloat16
    (PEFT's modules autocast alike), within the tolerance rule of PEFT's own autocast error."""
    truth_model = make_stock(torch.float64)
    stock = copy.deepcopy(truth_model).float()
    fast = copy.deepcopy(stock)
    assert fp.patch(fast) == N_LAYERS
    x = ids()
    truth = logits(truth_model, x, adapter_names=NAMES)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = logits(stock, x, adapter_names=NAMES)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback anywhere
            out = logits(fast, x, adapter_names=NAMES)
    assert fp.fast_path_calls(fast) == N_LAYERS
    assert_close_to_truth(out, ref, truth, "logits")
