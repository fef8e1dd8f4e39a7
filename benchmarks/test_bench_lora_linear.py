"""LoRA linear: fastlora vs PEFT's LoRA Linear vs the frozen base nn.Linear.

    .venv/bin/python -m pytest benchmarks/test_bench_lora_linear.py --benchmark-columns=median,iqr,rounds

Each case is a pytest-benchmark group (time per implementation), plus one target test per
case that times all three interleaved in the same run and asserts the project's targets as
ratios (never absolute times): fastlora is never slower than PEFT; on CPU with dropout, its
fwd+bwd overhead over the frozen base layer stays within 10%; the activations it saves for
backward are at most x plus the M x r shrink.
"""
import pytest
import torch

from fastlora.bench import LORA_LINEAR_CASES, LoraLinearCase, interleaved_medians, saved_activation_bytes

CASE_IDS = [f"M{m}-in{i}-out{o}-r{r}-p{p}" for m, i, o, r, p in LORA_LINEAR_CASES]
# Timing noise allowance on the "never slower than PEFT" ratio: at M=8 both are the base GEMM.
NOISE = 1.03
MAX_OVERHEAD_CPU = 1.10


@pytest.fixture(scope="module", params=LORA_LINEAR_CASES, ids=CASE_IDS)
def case(request, device):
    c = LoraLinearCase(*request.param, device=device)
    c.impls = c.build()
    return c


@pytest.mark.parametrize("impl", ["base", "peft", "fastlora"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_time(benchmark, case, impl, mode):
    benchmark.group = f"lora_linear {case.label} {mode}"
    forward, train_step = case.impls[impl]
    fn = forward if mode == "fwd" else train_step
    sync = torch.cuda.synchronize if case.device.startswith("cuda") else (lambda: None)

    def run():
        fn()
        sync()

    benchmark.pedantic(run, rounds=5, warmup_rounds=2, iterations=1)


def test_targets(case, record_property):
    steps = interleaved_medians({n: s for n, (_, s) in case.impls.items()}, case.device)
    fwds = interleaved_medians({n: f for n, (f, _) in case.impls.items()}, case.device)
    saved = saved_activation_bytes(case.impls["fastlora"][0], case.params)
    limit = case.x.numel() * case.x.element_size() + case.m * case.r * case.x.element_size()
    summary = {f"{mode}_{n}_ms": round(t * 1e3, 3) for mode, d in (("fwd", fwds), ("step", steps)) for n, t in d.items()}
    for k, v in summary.items():
        record_property(k, v)
    print(case.label, summary, "saved bytes", saved)
    assert steps["fastlora"] <= NOISE * steps["peft"], f"fwd+bwd slower than PEFT: {summary}"
    assert fwds["fastlora"] <= NOISE * fwds["peft"], f"fwd slower than PEFT: {summary}"
    if case.device == "cpu" and case.dropout_p > 0:
        overhead = steps["fastlora"] / steps["base"]
        assert overhead <= MAX_OVERHEAD_CPU, f"LoRA overhead {overhead - 1:.1%} over base > 10%: {summary}"
    assert saved <= limit, f"saved {saved} bytes for backward, more than x + shrink = {limit}"
