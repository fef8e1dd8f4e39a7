"""LoRA over a 4-bit NF4 base (QLoRA): fastlora.lora_quantized_linear vs PEFT + bitsandbytes, and
vs the float32 LoRA op on the unquantized weight.

    .venv/bin/python -m pytest benchmarks/test_bench_lora_quantized_linear.py -s --benchmark-columns=median,iqr,rounds

Layer level (the LoRA benchmark's shapes, fwd + bwd with x requiring grad, interleaved medians
in the same run): "peft+bnb" is PEFT's lora.bnb.Linear4bit over bitsandbytes' Linear4bit
(compute dtype float32), "fastlora" the same layer patched by fastlora.peft (the fused op on
bitsandbytes' stored weight), "dense" fastlora.lora_linear on the float32 weight. Model level:
a training step (fwd + bwd + AdamW) of a Llama-style model loaded in NF4 by transformers
(bitsandbytes' double-quantized scales, compute dtype bfloat16, PEFT's float32 adapters).
Memory: the base weight's bytes (codes + scales) against float32, and the peak memory a
fwd + bwd adds (a fresh process per implementation, ru_maxrss).

Targets: base-weight memory <= 1/7 of float32; training step >= 1.3x PEFT + bitsandbytes;
fwd + bwd within 1.3x of the float32 LoRA op at M >= 512; no layer slower than PEFT + bitsandbytes.
"""
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import warnings

import pytest
import torch

import fastlora
import fastlora.peft as fp
from fastlora.bench import interleaved_medians

bnb = pytest.importorskip("bitsandbytes")  # the test extra installs it
from peft import LoraConfig, get_peft_model  # noqa: E402

quant = __import__("importlib").import_module("fastlora.quantize")

# (M, in, out, r): the LoRA linear benchmark's shapes
CASES = [(8, 4096, 4096, 16), (512, 2048, 2048, 16), (2048, 1024, 1024, 16), (512, 4096, 4096, 64)]
# Asserted: measured to hold (README, QLoRA tables). The model-level training step is the
# target (>= 1.3x); a single layer in float32 at M >= 512 is GEMM-bound, where bitsandbytes'
# path (its fast dequantization, then one BLAS GEMM on the whole float32 weight) is only a
# little slower than fastlora's panels: there fastlora is asserted not to be slower.
MIN_STEP_SPEEDUP_VS_PEFT_BNB = 1.3
MIN_LAYER_SPEEDUP_VS_PEFT_BNB = 1.0
MAX_RATIO_VS_DENSE = 1.3


class LayerSetup:
    def __init__(self, m, k, n, r):
        torch.manual_seed(0)

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = bnb.nn.Linear4bit(k, n, bias=False, quant_type="nf4", compute_dtype=torch.float32)

            def forward(self, x):
                return self.fc(x)

        def peft_layer():
            torch.manual_seed(0)
            net = Net().to("cpu")
            net.is_loaded_in_4bit = True  # as transformers marks a model it loaded in 4 bits
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = get_peft_model(net, LoraConfig(target_modules=["fc"], r=r, lora_alpha=2 * r))
            model.train()
            return model

        self.models = {"peft+bnb": peft_layer(), "fastlora": peft_layer()}
        self.n_patched = fp.patch(self.models["fastlora"])
        self.x = torch.randn(m, k, requires_grad=True)
        layer = self.models["fastlora"].base_model.model.fc
        self.dense_w = quant.QuantizedWeight.from_bnb(layer.base_layer).dequantize(torch.float32)
        self.A = torch.randn(r, k, requires_grad=True)
        self.B = torch.randn(n, r, requires_grad=True)
        self.layer = layer

    def fn(self, impl):
        x = self.x
        if impl == "dense":
            def run():
                y = fastlora.lora_linear(x, self.dense_w, None, self.A, self.B, 2.0)
                y.backward(torch.ones_like(y))
            return run
        model = self.models[impl]

        def run():
            y = model(x)
            y.backward(torch.ones_like(y))
        return run


@pytest.fixture(scope="module", params=CASES, ids=lambda c: "M{}-{}x{}-r{}".format(*c))
def layer_setup(request):
    return request.param, LayerSetup(*request.param)


@pytest.mark.parametrize("impl", ["peft+bnb", "fastlora", "dense"])
def test_layer_time(benchmark, layer_setup, impl):
    (m, k, n, r), setup = layer_setup
    benchmark.group = f"nf4 lora layer M{m} {k}x{n} r{r} fwd+bwd"
    benchmark.pedantic(setup.fn(impl), rounds=5, warmup_rounds=1, iterations=1)


def test_layer_targets(layer_setup, record_property, benchmark):
    (m, k, n, r), setup = layer_setup
    assert setup.n_patched == 1
    before = setup.layer.fastlora_calls
    t = interleaved_medians({i: setup.fn(i) for i in ("peft+bnb", "fastlora", "dense")}, min_rounds=5,
                            max_rounds=15, budget_s=15.0, warmup=1)
    assert setup.layer.fastlora_calls > before  # the fast path really ran
    info = {"ms_peft_bnb": round(t["peft+bnb"] * 1e3, 2), "ms_fastlora": round(t["fastlora"] * 1e3, 2),
            "ms_dense_fp32": round(t["dense"] * 1e3, 2),
            "speedup_vs_peft_bnb": round(t["peft+bnb"] / t["fastlora"], 3),
            "ratio_vs_dense_fp32": round(t["fastlora"] / t["dense"], 3),
            "threads": torch.get_num_threads(), "cpu_isa": fastlora.cpu_isa()}
    for key, v in info.items():
        record_property(key, v)
    benchmark.extra_info.update(info)
    benchmark.group = f"nf4 lora layer targets M{m} {k}x{n} r{r}"
    benchmark.pedantic(lambda: None, rounds=1)
    print(info)
    assert info["speedup_vs_peft_bnb"] >= MIN_LAYER_SPEEDUP_VS_PEFT_BNB, info
    if m >= 512:
        assert info["ratio_vs_dense_fp32"] <= MAX_RATIO_VS_DENSE, info


def test_base_weight_memory(record_property):
    """Codes + scales of a 4096 x 4096 weight against its float32 bytes."""
    w = torch.randn(4096, 4096)
    ratios = {"nf4_double_quant": quant.weight_bytes_ratio(fastlora.quantize(w, "nf4")),
              "nf4": quant.weight_bytes_ratio(fastlora.quantize(w, "nf4", double_quant=False)),
              "int8": quant.weight_bytes_ratio(fastlora.quantize(w, "int8"))}
    for key, v in ratios.items():
        record_property(f"bytes_vs_fp32_{key}", round(v, 4))
    print({k: f"1/{1 / v:.2f}" for k, v in ratios.items()})
    assert ratios["nf4_double_quant"] <= 1 / 7 and ratios["nf4"] <= 1 / 7


_PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, threading, warnings
    import psutil, torch
    sys.path.insert(0, {bench_dir!r})
    torch.set_num_threads({threads})
    from test_bench_lora_quantized_linear import LayerSetup
    warnings.simplefilter("ignore")
    setup = LayerSetup({m}, {k}, {n}, {r})
    run = setup.fn({impl!r})
    run()  # warm-up: lazily allocated state, thread pools
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            done.wait(0.0005)

    t = threading.Thread(target=sample)
    t.start()
    run()
    done.set()
    t.join()
    print(json.dumps({{"peak_added_bytes": peak[0] - base}}))
""")


def test_fwd_bwd_peak_memory(record_property):
    """Peak memory one fwd + bwd adds over the set-up layer: RSS sampled every 0.5 ms in a fresh
    process per implementation, with glibc returning every large block to the OS when freed
    (MALLOC_MMAP_THRESHOLD_), so the RSS follows the tensors. bitsandbytes dequantizes the whole
    weight for each product; fastlora works on ~2 MiB panels."""
    m, k, n, r = 512, 4096, 4096, 64
    peaks = {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    for impl in ("peft+bnb", "fastlora", "dense"):
        code = _PEAK_SCRIPT.format(bench_dir=os.path.dirname(os.path.abspath(__file__)),
                                   threads=torch.get_num_threads(), m=m, k=k, n=n, r=r, impl=impl)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
        peaks[impl] = json.loads(out.stdout.strip().splitlines()[-1])["peak_added_bytes"] / 2 ** 20
    for key, v in peaks.items():
        record_property(f"fwd_bwd_peak_added_MiB_{key}", round(v, 1))
    print({k_: f"{v:.1f} MiB" for k_, v in peaks.items()})
    # the float32 weight alone is 64 MiB: bitsandbytes' transient copy of it shows, fastlora's does not
    assert peaks["fastlora"] < peaks["peft+bnb"] - 32, peaks


# --- a QLoRA training step ----------------------------------------------------------------------

HIDDEN, INTERMEDIATE, LAYERS, HEADS, SEQ, BATCH, VOCAB = 512, 1376, 4, 8, 256, 4, 1000
R, ALPHA, DROPOUT = 16, 32, 0.05


@pytest.fixture(scope="module")
def qlora_models():
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=HEADS, vocab_size=VOCAB)
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16)
    models = {}
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        LlamaForCausalLM(cfg).save_pretrained(d)
        for name in ("peft+bnb", "fastlora"):
            base = LlamaForCausalLM.from_pretrained(d, quantization_config=qc, device_map="cpu", dtype=torch.bfloat16)
            torch.manual_seed(0)
            models[name] = get_peft_model(base, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                                           target_modules="all-linear"))
            models[name].train()
    n = fp.patch(models["fastlora"])
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in models.items()}

    def step(name):
        def run():
            loss = models[name](ids, labels=ids).loss
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
        return run

    return models, step, n


@pytest.mark.parametrize("impl", ["peft+bnb", "fastlora"])
def test_qlora_step_time(benchmark, qlora_models, impl):
    _, step, _ = qlora_models
    benchmark.group = f"qlora llama h{HIDDEN} L{LAYERS} seq{SEQ} b{BATCH} r{R} nf4 bf16 train step"
    benchmark.pedantic(step(impl), rounds=3, warmup_rounds=1, iterations=1)


def test_qlora_step_target(qlora_models, record_property, benchmark):
    models, step, n = qlora_models
    assert n == 7 * LAYERS
    before = fp.fast_path_calls(models["fastlora"])
    t = interleaved_medians({k: step(k) for k in models}, min_rounds=3, max_rounds=8, budget_s=30.0, warmup=1)
    assert fp.fast_path_calls(models["fastlora"]) > before
    info = {"step_ms_peft_bnb": round(t["peft+bnb"] * 1e3, 1), "step_ms_fastlora": round(t["fastlora"] * 1e3, 1),
            "speedup": round(t["peft+bnb"] / t["fastlora"], 3), "threads": torch.get_num_threads(),
            "cpu_isa": fastlora.cpu_isa()}
    for key, v in info.items():
        record_property(key, v)
    benchmark.extra_info.update(info)
    benchmark.group = "qlora step target"
    benchmark.pedantic(lambda: None, rounds=1)
    print(info)
    assert info["speedup"] >= MIN_STEP_SPEEDUP_VS_PEFT_BNB, info
