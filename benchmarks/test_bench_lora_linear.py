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


def test_bfloat16_targets(record_property):
    """bfloat16 training step (fwd+bwd) at M=512, in=out=2048, r=16, p=0.05 on CPU, against PEFT
    and against fastlora's own float32 step on the same values.

    Without native bf16 GEMMs (AVX2, or FASTLORA_CPU_ISA below avx512) ATen emulates them and a
    PEFT / base step takes seconds, while fastlora runs float32 kernels on float32 copies:
    targets there are >= 10x PEFT and within 1.5x of fastlora's float32 step (the peers get one
    warm-up and one timed round each). With native bf16 GEMMs: >= 1.2x PEFT and <= +15% over
    the bf16 base layer."""
    import fastlora

    native = fastlora.cpu.native_bf16_matmul()
    cases = {dtype: LoraLinearCase(512, 2048, 2048, 16, 0.05, dtype=dtype) for dtype in (torch.bfloat16, torch.float32)}
    for c in cases.values():
        c.impls = c.build()
    if native:
        steps = interleaved_medians({n: s for n, (_, s) in cases[torch.bfloat16].impls.items()})
    else:
        steps = interleaved_medians({n: s for n, (_, s) in cases[torch.bfloat16].impls.items()},
                                    min_rounds=1, max_rounds=1, warmup=1)
    steps["fastlora_float32"] = interleaved_medians({"f": cases[torch.float32].impls["fastlora"][1]})["f"]
    steps["fastlora"] = interleaved_medians({"f": cases[torch.bfloat16].impls["fastlora"][1]})["f"]
    summary = {f"step_{n}_ms": round(t * 1e3, 2) for n, t in steps.items()}
    summary.update(native_bf16=native, cpu_isa=fastlora.cpu_isa())
    for k, v in summary.items():
        record_property(k, v)
    print("bfloat16 M=512 in=2048 out=2048 r=16 p=0.05", summary)
    if native:
        # The LoRA products in the AVX512-BF16 kernel: measured 1.35-1.45x PEFT and +7 to +12%
        # over the bf16 base here; asserted with room for noise.
        assert steps["peft"] >= 1.2 * steps["fastlora"], summary
        assert steps["fastlora"] <= 1.15 * steps["base"], summary
    else:
        assert steps["peft"] >= 10 * steps["fastlora"], summary
        assert steps["fastlora"] <= 1.5 * steps["fastlora_float32"], summary
