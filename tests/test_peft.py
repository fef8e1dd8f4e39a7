"""fastlora.peft: PEFT's LoRA Linear running fastlora.lora_linear, on a tiny Llama (no download).

Numerics (fp32) are compared against a float64 PEFT run with tolerances derived from PEFT's own
fp32 error (tests/tolerance.py); API behaviour (merge, adapters, save/load, ...) is compared
in float64, where both implementations agree to ~1e-15.
"""
import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file


from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import Linear as PeftLinear  # noqa: E402

import fastlora.peft as fp  # noqa: E402
from tiny_llama import N_LAYERS, VOCAB, base_model  # noqa: E402
from fastlora.peft import LoraLinear  # noqa: E402
from tolerance import assert_close_to_truth  # noqa: E402



def lora_config(**kw):
    kw = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear", **kw}
    return LoraConfig(**kw)


def randomize_lora_B(model, seed=1, std=0.1):
    """PEFT initialises lora_B (and its bias) to zero; make every adapter's branch non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)


def peft_model(dtype=torch.float64, adapters=(), seed=0, **kw):
    """A PEFT model with adapter "default" (and `adapters`: [(name, config kwargs)])."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lora_bias on bias-free layers, transformers deprecations
        model = get_peft_model(base_model(dtype, seed), lora_config(**kw))
        for name, akw in adapters:
            model.add_adapter(name, lora_config(**akw))
    randomize_lora_B(model)
    return model


def patched_copy(model):
    fast = copy.deepcopy(model)
    assert fp.patch(fast) == N_LAYERS
    return fast


def inputs(batch=2, seq=16, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def lora_params(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad}


def fwd_bwd(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.detach().clone() for n, p in lora_params(model).items()}


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


# --- numerics: forward logits and every LoRA gradient -------------------------------------------

def truth_peft_fastlora(truth_model, ref_model):
    """(logits, LoRA gradients) of the float64 truth, of PEFT's ``ref_model`` and of its patched
    copy, on the same batch; every layer of the copy must take the fused path, without a
    fallback warning."""
    fast_model = patched_copy(ref_model)
    ids = inputs()
    results = [fwd_bwd(truth_model, ids), fwd_bwd(ref_model, ids)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fast path must not fall back
        results.append(fwd_bwd(fast_model, ids))
    assert fp.fast_path_calls(fast_model) == N_LAYERS
    return results


FEATURES = {
    "plain": dict(kw={}),
    "rslora": dict(kw={"use_rslora": True, "r": 16, "lora_alpha": 8}),
    "lora_bias": dict(kw={"lora_bias": True}),
    "two_adapters": dict(kw={"lora_bias": True},
                         adapters=[("other", {"r": 4, "lora_alpha": 4, "use_rslora": True, "lora_bias": True})]),
    "dora": dict(kw={"use_dora": True}),
}


@pytest.mark.parametrize("feature", FEATURES)
def test_forward_and_gradients_match_peft(feature):
    spec = FEATURES[feature]
    truth_model = peft_model(torch.float64, spec.get("adapters", ()), **spec["kw"])
    if spec.get("adapters"):
        names = ["default"] + [n for n, _ in spec["adapters"]]
        truth_model.base_model.set_adapter(names)
    (truth_y, truth_g), (ref_y, ref_g), (out_y, out_g) = truth_peft_fastlora(
        truth_model, copy.deepcopy(truth_model).float())
    assert_close_to_truth(out_y, ref_y, truth_y, "logits")
    n_adapters = 1 + len(spec.get("adapters", ()))
    n_lora_bias = n_adapters if spec["kw"].get("lora_bias") else 0
    n_magnitude = n_adapters if spec["kw"].get("use_dora") else 0  # DoRA's magnitude vectors
    assert len(truth_g) == N_LAYERS * (2 * n_adapters + n_lora_bias + n_magnitude)
    assert out_g.keys() == truth_g.keys()
    assert_grads_close_to_truth(out_g, ref_g, truth_g)


def test_autocast_runs_the_fast_path_like_peft():
    """A float32 model trained under bfloat16 autocast (what transformers.Trainer(bf16=True)
    does): every LoRA layer takes the fused path, in bfloat16 like PEFT's autocast nn.Linear
    modules, with float32 gradients for the float32 adapters; logits and gradients within the
    tolerance rule of PEFT's own autocast error against the float64 truth."""
    truth_model = peft_model(torch.float64, lora_bias=True)
    ref_model = copy.deepcopy(truth_model).float()
    fast_model = patched_copy(ref_model)
    ids = inputs()
    truth_y, truth_g = fwd_bwd(truth_model, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_y, ref_g = fwd_bwd(ref_model, ids)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the fast path must not fall back
            out_y, out_g = fwd_bwd(fast_model, ids)
    assert fp.fast_path_calls(fast_model) == N_LAYERS
    assert out_y.dtype == ref_y.dtype
    assert all(g.dtype == torch.float32 for g in out_g.values())
    assert_close_to_truth(out_y, ref_y, truth_y, "logits")
    assert_grads_close_to_truth(out_g, ref_g, truth_g)


def half_model_with_float32_adapters(truth_model, dtype):
    """truth_model's copy as PEFT builds it on a half-precision model: base in dtype, LoRA
    weights float32 (autocast_adapter_dtype=True), the adapters rounded once from float64."""
    model = copy.deepcopy(truth_model).to(dtype)
    truth = dict(truth_model.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = truth[name].detach().float()
    return model


def test_peft_keeps_float32_adapters_on_a_bfloat16_model():
    model = get_peft_model(base_model(torch.bfloat16, 0), lora_config(lora_bias=True))
    dtypes = {n.split(".lora_")[1].split(".")[0]: p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert set(dtypes.values()) == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {torch.bfloat16}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("feature", ["plain", "lora_bias", "two_adapters", "dora"])
def test_half_model_with_float32_adapters_runs_the_fast_path_like_peft(dtype, feature):
    """PEFT's defaults on a half-precision model (float32 adapters): every layer takes the fused
    path, computing the LoRA branch in float32 as PEFT does; logits and float32 gradients
    within the tolerance rule of PEFT's own error in the same configuration."""
    spec = FEATURES[feature]
    truth_model = peft_model(torch.float64, spec.get("adapters", ()), **spec["kw"])
    if spec.get("adapters"):
        truth_model.base_model.set_adapter(["default"] + [n for n, _ in spec["adapters"]])
    (truth_y, truth_g), (ref_y, ref_g), (out_y, out_g) = truth_peft_fastlora(
        truth_model, half_model_with_float32_adapters(truth_model, dtype))
    assert out_y.dtype == ref_y.dtype == dtype
    assert all(g.dtype == torch.float32 for g in out_g.values())
    assert_close_to_truth(out_y, ref_y, truth_y, "logits")
    assert_grads_close_to_truth(out_g, ref_g, truth_g)


def assert_grads_close_to_truth(out_g, ref_g, truth_g, per_tensor_factor=4):
    """tolerance.py's rule, in L2, for gradients of a whole network.

    Through a network, the gradient error of a layer is dominated by rounding differences
    of the layers above, amplified (e.g. by the softmax backward of attention) -- fastlora and
    PEFT sum in different but equally accurate orders, so per tensor the ratio of their errors
    is a ratio of two random quantities with a heavy tail. So: over all LoRA gradients
    together, fastlora's error <= 2 x PEFT's + floor; per tensor, <= 4 x PEFT's + floor."""
    def l2(d, name=None):
        keys = [name] if name else list(truth_g)
        return torch.cat([d[k].double().flatten() for k in keys])

    for name in [None, *truth_g]:
        truth = l2(truth_g, name)
        err = (l2(out_g, name) - truth).norm().item()
        ref_err = (l2(ref_g, name) - truth).norm().item()
        floor = 4 * torch.finfo(torch.float32).eps * truth.norm().item()
        factor = 2 if name is None else per_tensor_factor
        assert err <= factor * ref_err + floor, (
            f"{name or 'all LoRA grads'}: L2 error {err:.3g} vs float64 truth exceeds {factor} x "
            f"PEFT's {ref_err:.3g} + floor {floor:.3g}")


def adamw_losses(model, steps=4, seed=0, one_batch=False, lr=1e-2):
    """Losses of `steps` AdamW steps, on a new batch each step or (one_batch) always the same
    one, which a model can learn: the tokens are random, so only memorising lowers the loss."""
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for i in range(steps):
        ids = inputs(seed=100 if one_batch else 100 + i)
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_adamw_steps_match_peft_without_dropout():
    ref = peft_model(torch.float32, lora_bias=True)
    fast = patched_copy(ref)
    ref_losses, fast_losses = adamw_losses(ref), adamw_losses(fast)
    assert fp.fast_path_calls(fast) == 4 * N_LAYERS
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    assert fast_losses[-1] < fast_losses[0]
    # (Parameters are not compared: Adam normalises gradients, so parameters whose true
    # gradient is zero -- e.g. k_proj's lora_B bias, invisible to softmax -- move by +-lr on
    # rounding noise in either implementation.)


def test_dropout_statistics_match_peft():
    """Different random streams: compare the distribution of the training loss over seeds."""
    ref = peft_model(torch.float32, lora_dropout=0.3)
    for name, p in lora_params(ref).items():  # a large LoRA branch, so dropout matters
        if "lora_B" in name:
            p.data.mul_(10)
    fast = patched_copy(ref)
    ids = inputs(batch=4, seq=32)

    def losses(model):
        model.train()
        out = []
        with torch.no_grad():
            for seed in range(12):
                torch.manual_seed(seed)
                out.append(model(ids, labels=ids).loss.item())
        return torch.tensor(out, dtype=torch.float64)

    ref_l, fast_l = losses(ref), losses(fast)
    ref.eval()
    fast.eval()
    eval_ref = logits(ref, ids)
    assert_eval = logits(fast, ids)
    torch.testing.assert_close(assert_eval, eval_ref, rtol=1e-4, atol=1e-4)  # eval: dropout off
    assert fp.fast_path_calls(fast) == 13 * N_LAYERS
    # Dropout is really applied (losses vary with the seed) and with the same spread ...
    assert fast_l.std() > 0 and 0.5 < fast_l.std() / ref_l.std() < 2
    # ... and the same mean, within 4 standard errors of the difference (fixed seeds: deterministic).
    se = (ref_l.var() / len(ref_l) + fast_l.var() / len(fast_l)).sqrt()
    assert (fast_l.mean() - ref_l.mean()).abs() < 4 * se
    # Training with dropout on one batch, over several dropout streams: both lower the loss (by
    # more than 4 standard errors of the mean decrease), and the losses after training have the
    # same mean, by the same 4-standard-error test as above (one run per model would compare
    # two single draws, whose spread nothing bounds).
    runs = 8
    first, final = {"ref": [], "fast": []}, {"ref": [], "fast": []}
    for seed in range(runs):
        for name, model in (("ref", ref), ("fast", fast)):
            losses_ = adamw_losses(copy.deepcopy(model), steps=20, seed=seed, one_batch=True, lr=2e-2)
            first[name].append(losses_[0])
            final[name].append(losses_[-1])
    for name in ("ref", "fast"):
        decrease = torch.tensor(first[name], dtype=torch.float64) - torch.tensor(final[name], dtype=torch.float64)
        assert decrease.mean() > 4 * decrease.std() / runs ** 0.5, (name, decrease)
    ref_final = torch.tensor(final["ref"], dtype=torch.float64)
    fast_final = torch.tensor(final["fast"], dtype=torch.float64)
    se_final = (ref_final.var() / runs + fast_final.var() / runs).sqrt()
    assert (fast_final.mean() - ref_final.mean()).abs() < 4 * se_final


# --- patch / unpatch / register ----------------------------------------------------------------

def test_patch_unpatch_keep_parameter_objects():
    model = peft_model()
    params = list(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert fp.patch(model) == N_LAYERS
    assert fp.patch(model) == 0  # already patched
    layers = [m for m in model.modules() if isinstance(m, PeftLinear)]
    assert len(layers) == N_LAYERS and all(type(m) is LoraLinear for m in layers)
    assert all(a is b and na == nb for (na, a), (nb, b) in zip(params, model.named_parameters()))
    assert model.state_dict().keys() == state.keys()
    model(inputs())
    assert fp.fast_path_calls(model) == N_LAYERS
    assert fp.unpatch(model) == N_LAYERS
    assert fp.unpatch(model) == 0
    assert all(type(m) is PeftLinear for m in layers)
    assert not any(hasattr(m, "fastlora_calls") for m in layers)
    assert all(a is b for (_, a), (_, b) in zip(params, model.named_parameters()))
    assert fp.fast_path_calls(model) == 0


def test_register_builds_lora_linear_layers():
    base = base_model()
    config = fp.register(lora_config())
    model = get_peft_model(base, config)
    layers = [m for m in model.modules() if isinstance(m, PeftLinear)]
    assert len(layers) == N_LAYERS and all(type(m) is LoraLinear for m in layers)
    randomize_lora_B(model)
    stock = peft_model()
    torch.testing.assert_close(logits(model, inputs()), logits(stock, inputs()))
    assert fp.fast_path_calls(model) == N_LAYERS
    assert fp.unpatch(model) == N_LAYERS


def test_register_leaves_target_parameters_to_peft():
    # target_parameters wrap a parameter (PEFT's ParamWrapper), also on an nn.Linear; a second
    # adapter on the same parameters then finds the wrapper it expects, as in stock PEFT.
    from peft.tuners.lora.layer import ParamWrapper

    def build(configure):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.ReLU(), torch.nn.Linear(10, 6))
        model = get_peft_model(model, configure(LoraConfig(target_modules=[], target_parameters=["0.weight"])))
        model.add_adapter("other", configure(LoraConfig(target_modules=[], target_parameters=["0.weight"])))
        randomize_lora_B(model)
        return model

    stock, registered = build(lambda c: c), build(fp.register)
    wrappers = [m for m in registered.modules() if isinstance(m, ParamWrapper)]
    assert wrappers and not any(isinstance(m, LoraLinear) for m in registered.modules())
    assert registered.state_dict().keys() == stock.state_dict().keys()
    x = torch.randn(3, 12)
    torch.testing.assert_close(registered(x), stock(x), rtol=0, atol=0)


# --- save / load ----------------------------------------------------------------------------------

def saved(path):
    tensors = load_file(str(path / "adapter_model.safetensors"))
    config = json.loads((path / "adapter_config.json").read_text())
    # PEFT expands "all-linear" through a set: the list order follows string hashing, even
    # between two stock PEFT models in one process.
    config["target_modules"] = sorted(config["target_modules"])
    return tensors, config


def test_save_pretrained_same_files_both_ways(tmp_path):
    stock = peft_model(lora_bias=True)
    fast = patched_copy(stock)
    registered = get_peft_model(base_model(), fp.register(lora_config(lora_bias=True)))
    registered.load_state_dict(stock.state_dict())
    stock.save_pretrained(tmp_path / "stock")
    fast.save_pretrained(tmp_path / "fast")
    registered.save_pretrained(tmp_path / "registered")
    st_t, st_c = saved(tmp_path / "stock")
    for name in ("fast", "registered"):
        t, c = saved(tmp_path / name)
        assert c == st_c
        assert t.keys() == st_t.keys() and all(torch.equal(t[k], st_t[k]) for k in t)
    assert all(".lora_A.weight" in k or ".lora_B." in k for k in st_t) and len(st_t) == 3 * N_LAYERS

    ids = inputs()
    # fastlora-saved -> stock PEFT (no patching): identical weights, identical outputs.
    loaded = PeftModel.from_pretrained(base_model(), tmp_path / "fast")
    assert not any(type(m) is LoraLinear for m in loaded.modules())
    assert torch.equal(logits(loaded, ids), logits(stock, ids))
    # PEFT-saved -> fastlora.
    fast_loaded = fp.from_pretrained(base_model(), tmp_path / "stock")
    assert sum(type(m) is LoraLinear for m in fast_loaded.modules()) == N_LAYERS
    torch.testing.assert_close(logits(fast_loaded, ids), logits(stock, ids))
    assert fp.fast_path_calls(fast_loaded) == N_LAYERS


# --- PEFT API on patched models (float64) ------------------------------------------------------

def two_adapter_pair():
    # No lora_bias here: PEFT cannot merge it into Llama's bias-free linear layers.
    stock = peft_model(adapters=[("other", {"r": 4, "lora_alpha": 8, "use_rslora": True})])
    stock.eval()  # PEFT refuses adapter_names in training mode
    return stock, patched_copy(stock)


def assert_same(stock, fast, ids=None, **kw):
    ids = inputs() if ids is None else ids
    torch.testing.assert_close(logits(fast, ids, **kw), logits(stock, ids, **kw))


def test_merge_unmerge_and_merge_and_unload():
    stock, fast = two_adapter_pair()
    stock_base = base_model()
    assert_same(stock, fast)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # merged: silent, the base layer alone (fastlora.linear)
        for m in (stock, fast):
            m.merge_adapter()
        calls = fp.fast_path_calls(fast)
        assert_same(stock, fast)
    assert fp.fast_path_calls(fast) == calls  # not a fused LoRA call: not counted
    for m in (stock, fast):
        m.unmerge_adapter()
    assert_same(stock, fast)
    assert fp.fast_path_calls(fast) == calls + N_LAYERS
    unloaded = {}
    for name, m in (("stock", stock), ("fast", fast)):
        unloaded[name] = copy.deepcopy(m).merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, PeftLinear) for m in unloaded["fast"].modules())
    torch.testing.assert_close(logits(unloaded["fast"], inputs()), logits(stock, inputs()))
    torch.testing.assert_close(logits(unloaded["fast"], inputs()), logits(unloaded["stock"], inputs()))
    assert not torch.allclose(logits(stock_base, inputs()), logits(stock, inputs()))


def test_disable_adapter_set_adapter_delete_and_weighted():
    stock, fast = two_adapter_pair()
    base = base_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # disabled adapters: silent (nothing to fuse)
        with fast.disable_adapter():
            calls = fp.fast_path_calls(fast)
            torch.testing.assert_close(logits(fast, inputs()), logits(base, inputs()))
            assert fp.fast_path_calls(fast) == calls
    for name in ("other", "default"):
        for m in (stock, fast):
            m.set_adapter(name)
        assert_same(stock, fast)
    for m in (stock, fast):
        m.add_weighted_adapter(["default", "other"], [0.7, 0.4], "combo", combination_type="cat")
        m.set_adapter("combo")
    assert sum(type(m) is LoraLinear and "combo" in m.lora_A for m in fast.modules()) == N_LAYERS
    before = fp.fast_path_calls(fast)
    assert_same(stock, fast)
    assert fp.fast_path_calls(fast) == before + N_LAYERS
    for m in (stock, fast):
        m.delete_adapter("other")
    assert not any("other" in m.lora_A for m in fast.modules() if isinstance(m, PeftLinear))
    assert_same(stock, fast)


# --- fallbacks -----------------------------------------------------------------------------------

def test_dora_weight_norm_is_the_norm_of_w_plus_sba():
    g = torch.Generator().manual_seed(0)
    W, A, B = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((37, 50), (6, 50), (37, 6)))
    expected = torch.linalg.norm(W + 0.7 * B @ A, dim=1)
    torch.testing.assert_close(fp.layer.dora_weight_norm(W, A, B, 0.7), expected, rtol=1e-12, atol=0)
    got32 = fp.layer.dora_weight_norm(W.float(), A.float(), B.float(), 0.7)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("config", ["float32", "bfloat16 model, float32 adapters", "bfloat16 autocast"])
def test_dora_with_active_dropout_runs_the_fast_path_like_peft(config):
    """DoRA with dropout in training mode: PEFT's mask (the adapter's own dropout module, same
    RNG state), logits and every LoRA / magnitude gradient within the tolerance rule of PEFT's
    own error against the float64 truth on the same masks."""
    truth_model = peft_model(torch.float64, use_dora=True, lora_dropout=0.1)
    if config == "bfloat16 model, float32 adapters":
        ref_model = half_model_with_float32_adapters(truth_model, torch.bfloat16)
    else:
        ref_model = copy.deepcopy(truth_model).float()
    fast_model = patched_copy(ref_model)
    for m in (truth_model, ref_model, fast_model):
        m.train()
    ids = inputs()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=config == "bfloat16 autocast")
    results = []
    for m in (truth_model, ref_model, fast_model):
        torch.manual_seed(3)  # the same dropout masks in all three
        with autocast, warnings.catch_warnings():
            warnings.simplefilter("error")  # the fast path must not fall back
            results.append(fwd_bwd(m, ids))
    (truth_y, truth_g), (ref_y, ref_g), (out_y, out_g) = results
    assert fp.fast_path_calls(fast_model) == N_LAYERS
    assert out_y.dtype == ref_y.dtype and out_g.keys() == ref_g.keys()
    assert all(g.dtype == torch.float32 for g in out_g.values())
    assert_close_to_truth(out_y, ref_y, truth_y, "logits")
    assert_grads_close_to_truth(out_g, ref_g, truth_g)
    # Without dropout (eval mode) the second product with W vanishes: the same fused path.
    fast_model.eval()
    ref_model.eval()
    with autocast:
        assert_close_to_truth(logits(fast_model, ids), logits(ref_model, ids), logits(truth_model.eval(), ids),
                              "eval logits")
    assert fp.fast_path_calls(fast_model) == 2 * N_LAYERS


def test_mixed_batch_adapter_names_runs_grouped_fast_path():
    # Mixed-adapter batches: one fastlora.lora_grouped_linear per layer (tests/test_peft_mixed.py).
    stock, fast = two_adapter_pair()
    ids = inputs(batch=3)
    names = ["default", "other", "__base__"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same(stock, fast, ids, adapter_names=names)
    assert fp.fast_path_calls(fast) == N_LAYERS
    assert_same(stock, fast, ids)  # and the single-adapter fast path afterwards
    assert fp.fast_path_calls(fast) == 2 * N_LAYERS


def test_several_adapters_with_dropout_fall_back_single_adapter_does_not():
    stock = peft_model(torch.float32, adapters=[("other", {"lora_dropout": 0.1})], lora_dropout=0.1)
    fast = patched_copy(stock)
    stock.base_model.set_adapter(["default", "other"])
    fast.base_model.set_adapter(["default", "other"])
    fast.train()
    with pytest.warns(UserWarning, match="dropout in training mode"):
        fast(inputs())
    assert fp.fast_path_calls(fast) == 0
    stock.eval()
    fast.eval()  # dropout modules in eval mode: concatenated fast path
    torch.testing.assert_close(logits(fast, inputs()), logits(stock, inputs()), rtol=1e-4, atol=1e-5)
    assert fp.fast_path_calls(fast) == N_LAYERS


def test_mixed_dtype_and_non_linear_base_fall_back():
    layer = PeftLinear(torch.nn.Linear(16, 8), "default", config=lora_config(r=2), r=2, lora_alpha=4)
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    fp.patch(layer)
    x = torch.randn(3, 16)
    layer.lora_A["default"].double()
    layer.lora_B["default"].double()
    ref = PeftLinear.forward(layer, x)
    with pytest.warns(UserWarning, match="mixed dtypes"):
        out = layer(x)
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    assert layer.fastlora_calls == 0

    class MyLinear(torch.nn.Linear):  # stands in for bitsandbytes Linear4bit (an nn.Linear subclass)
        pass

    sub = PeftLinear(MyLinear(16, 8), "default", config=lora_config(r=2), r=2, lora_alpha=4)
    fp.patch(sub)
    with pytest.warns(UserWarning, match="not torch.nn.Linear"):
        torch.testing.assert_close(sub(x), PeftLinear.forward(sub, x))


# --- torch.compile ----------------------------------------------------------------------------------

def test_torch_compile_single_layer_fullgraph():
    torch._dynamo.reset()
    layer = PeftLinear(torch.nn.Linear(32, 48), "default", config=lora_config(r=4, lora_bias=True),
                       r=4, lora_alpha=8, lora_bias=True)
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    fp.patch(layer)
    layer.eval()
    x = torch.randn(2, 5, 32, requires_grad=True)
    eager = layer(x)
    gx_eager = torch.autograd.grad(eager.sum(), x)[0]
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    gx = torch.autograd.grad(out.sum(), x)[0]
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(gx, gx_eager)
    assert layer.fastlora_calls == 2


def test_torch_compile_whole_model():
    torch._dynamo.reset()
    stock = peft_model(torch.float32, lora_bias=True)
    fast = patched_copy(stock)
    ids = inputs()
    eager = logits(fast, ids)
    compiled = torch.compile(fast, backend="aot_eager")
    torch.testing.assert_close(logits(compiled, ids), eager)
    torch.testing.assert_close(eager, logits(stock, ids), rtol=1e-4, atol=1e-5)
    assert fp.fast_path_calls(fast) == 2 * N_LAYERS


def test_patched_model_prints_like_peft():
    ref = peft_model(torch.float32)
    fast = patched_copy(ref)
    assert repr(fast) == repr(ref)
    layer = next(m for m in fast.modules() if isinstance(m, PeftLinear))
    assert type(layer) is LoraLinear and repr(layer).startswith("lora.Linear(")
