"""fastlora.peft.squeeze_model / RankAnnealing on a tiny Llama (no download)."""
import json
import math
import warnings

import pytest
import torch


from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import Linear as PeftLinear  # noqa: E402

import fastlora.peft as fp  # noqa: E402
from tiny_llama import N_LAYERS, VOCAB, base_model  # noqa: E402



def peft_model(dtype=torch.float64, **kw):
    kw = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear", **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base_model(dtype), LoraConfig(**kw))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1)
    return model


def decay_lora_B(model, factor=0.3):
    """Scale lora_B's k-th column by factor**k: a LoRA term with a decaying spectrum, so that
    a lower rank is a good approximation (random factors have a flat one)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and name.endswith("weight"):
                p.mul_(factor ** torch.arange(p.shape[1], dtype=p.dtype))


def inputs(batch=2, seq=16, seed=5):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, PeftLinear)}


def deltas(model, adapter="default"):
    """Each layer's dense LoRA term scaling * B @ A (+ the scaled lora_B bias), in float64."""
    out = {}
    for n, m in layers(model).items():
        A, B = m.lora_A[adapter], m.lora_B[adapter]
        d = m.scaling[adapter] * (B.weight.double() @ A.weight.double())
        b = None if B.bias is None else m.scaling[adapter] * B.bias.double()
        out[n] = (d, b)
    return out


FEATURES = {
    "plain": {},
    "rslora": {"use_rslora": True, "r": 8, "lora_alpha": 4},
    "lora_bias": {"lora_bias": True},
    "patterns": {"rank_pattern": {"q_proj": 4}, "alpha_pattern": {"down_proj": 3}},
}


@pytest.mark.parametrize("patched", [False, True], ids=["peft", "fastlora"])
@pytest.mark.parametrize("feature", FEATURES)
def test_squeeze_lower_rank(feature, patched):
    model = peft_model(**FEATURES[feature])
    if patched:
        assert fp.patch(model) == N_LAYERS
    decay_lora_B(model)
    ids = inputs()
    y0 = logits(model, ids)
    with model.disable_adapter():
        y_base = logits(model, ids)
    before = deltas(model)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    errors = fp.squeeze_model(model, 3)
    assert set(errors) == set(before) and len(errors) == N_LAYERS
    rslora = FEATURES[feature].get("use_rslora", False)
    after = deltas(model)
    for n, m in layers(model).items():
        A, B = m.lora_A["default"], m.lora_B["default"]
        assert A.weight.shape == (3, m.in_features) and B.weight.shape == (m.out_features, 3)
        assert A.out_features == 3 and B.in_features == 3
        assert A.weight.dtype == B.weight.dtype == torch.float64
        assert m.r["default"] == 3
        assert m.lora_alpha["default"] == (math.sqrt(3) if rslora else 3)
        assert m.scaling["default"] == 1.0
        d0, b0 = before[n]
        d1, b1 = after[n]
        rel = ((d1 - d0).norm() / d0.norm()).item()
        assert errors[n] == pytest.approx(rel, rel=1e-9, abs=1e-12)
        assert 0 < errors[n] < 1
        # best rank-3 approximation: the optimal error from the singular values
        s = torch.linalg.svdvals(d0)
        assert rel == pytest.approx((s[3:].norm() / s.norm()).item(), rel=1e-9)
        if b0 is not None:
            torch.testing.assert_close(b1, b0, rtol=1e-15, atol=0)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    cfg = model.peft_config["default"]
    assert cfg.r == 3 and cfg.lora_alpha == (math.sqrt(3) if rslora else 3)
    assert not cfg.rank_pattern and not cfg.alpha_pattern
    y1 = logits(model, ids)
    # closer to the adapted model than the base model is
    assert (y1 - y0).norm() < 0.2 * (y0 - y_base).norm()


def test_squeeze_same_rank_reproduces_fp32():
    model = peft_model(torch.float32)
    ids = inputs()
    y0 = logits(model, ids)
    errors = fp.squeeze_model(model, 8)
    assert max(errors.values()) < 1e-5
    y1 = logits(model, ids)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5 * y0.abs().max().item())
    # more than the current rank: still exact, extra factors zero
    errors = fp.squeeze_model(model, 12)
    assert max(errors.values()) < 1e-5
    torch.testing.assert_close(logits(model, ids), y0, rtol=1e-5, atol=1e-5 * y0.abs().max().item())
    m = next(iter(layers(model).values()))
    assert m.lora_A["default"].weight.shape[0] == 12
    assert m.lora_A["default"].weight[8:].abs().max() == 0


@pytest.mark.parametrize("feature", ["plain", "rslora", "patterns"])
def test_save_and_stock_load(tmp_path, feature):
    model = peft_model(torch.float32, **FEATURES[feature])
    fp.patch(model)
    fp.squeeze_model(model, 5)
    ids = inputs()
    y = logits(model, ids)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    rslora = FEATURES[feature].get("use_rslora", False)
    assert cfg["r"] == 5 and cfg["lora_alpha"] == (math.sqrt(5) if rslora else 5)
    assert not cfg.get("rank_pattern") and not cfg.get("alpha_pattern")
    loaded = PeftModel.from_pretrained(base_model(torch.float32), tmp_path)
    assert not any(isinstance(m, fp.LoraLinear) for m in loaded.modules())
    for m in layers(loaded).values():
        assert m.r["default"] == 5 and m.scaling["default"] == 1.0
    fp.unpatch(model)  # same computation path (PEFT's forward) on both sides: bit-for-bit
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=0)
    torch.testing.assert_close(logits(loaded, ids), y, rtol=1e-5, atol=1e-5 * y.abs().max().item())


def test_rank_annealing_adamw():
    model = peft_model(torch.float32)
    fp.patch(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    anneal = fp.RankAnnealing(model, 8, 2, total_steps=6, every=2)
    assert [anneal.rank_at(t) for t in range(7)] == [8, 7, 6, 5, 4, 3, 2]
    ids = inputs()
    ranks = []
    for t in range(8):
        loss = model(ids, labels=ids).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
        res = anneal.step(opt)
        assert (res is not None) == (t + 1 in (2, 4, 6))
        ranks.append({m.r["default"] for m in layers(model).values()})
        trainable = [p for p in model.parameters() if p.requires_grad]
        held = [p for g in opt.param_groups for p in g["params"]]
        assert {id(p) for p in held} == {id(p) for p in trainable} and len(held) == len(trainable)
        assert all(id(p) in {id(q) for q in trainable} for p in opt.state)
        if res is not None:  # the new factors are trained from here on
            snap = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        elif t > 1:
            changed = [n for n, p in model.named_parameters() if "lora_" in n and not torch.equal(p, snap[n])]
            assert len(changed) == 2 * N_LAYERS
    assert ranks == [{8}, {6}, {6}, {4}, {4}, {2}, {2}, {2}]
    assert [(t, r) for t, r, _ in anneal.history] == [(2, 6), (4, 4), (6, 2)]
    assert model.peft_config["default"].r == 2
    assert torch.isfinite(model(ids, labels=ids).loss)


def test_errors_are_clear():
    model = peft_model()
    A0 = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    with pytest.raises(ValueError, match=r"\[1, 64\] for layer '.*layers\.0\.self_attn\.q_proj', got 0"):
        fp.squeeze_model(model, 0)
    with pytest.raises(ValueError, match=r"layer '.*layers\.0\.self_attn\.q_proj'.*got 65"):
        fp.squeeze_model(model, 65)
    with pytest.raises(ValueError, match="no LoRA Linear layer holds adapter 'nope'"):
        fp.squeeze_model(model, 2, adapter_name="nope")
    with pytest.raises(TypeError):
        fp.squeeze_model(model, 2.0)
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight is A0
    assert model.peft_config["default"].r == 8
    dora = peft_model(use_dora=True)
    with pytest.raises(ValueError, match="q_proj.*DoRA"):
        fp.squeeze_model(dora, 2)
    with pytest.raises(ValueError, match="end_rank <= start_rank"):
        fp.RankAnnealing(model, 2, 4, 10)
