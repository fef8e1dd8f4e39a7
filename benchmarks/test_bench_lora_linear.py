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
from bench_targets import assert_emulated_bf16_targets

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


def _overheads_against_peft(m, in_features, out_features, r, p, device, record_property):
    """fwd+bwd of fastlora, PEFT and the base layer timed interleaved; records the step times
    and each LoRA's overhead over the base, asserts fastlora is never slower than PEFT, and
    returns (case, overheads, summary)."""
    case = LoraLinearCase(m, in_features, out_features, r, p, device=device)
    steps = interleaved_medians({n: s for n, (_, s) in case.build().items()}, case.device)
    summary = {f"step_{n}_ms": round(t * 1e3, 3) for n, t in steps.items()}
    overhead = {n: steps[n] / steps["base"] - 1 for n in ("peft", "fastlora")}
    summary.update({f"overhead_{n}": round(v, 3) for n, v in overhead.items()})
    for k, v in summary.items():
        record_property(k, v)
    print(case.label, summary)
    assert steps["fastlora"] <= NOISE * steps["peft"], f"fwd+bwd slower than PEFT: {summary}"
    return case, overhead, summary


# Ranks above small_gemm's (64): float32 LoRA products in the BLAS on the CPU.
HIGH_RANK_CASES = [(512, 2048, 2048, 128, 0.05), (512, 2048, 2048, 256, 0.05)]


@pytest.mark.parametrize("m, in_features, out_features, r, p", HIGH_RANK_CASES,
                         ids=[f"M{m}-in{i}-out{o}-r{r}-p{p}" for m, i, o, r, p in HIGH_RANK_CASES])
def test_high_rank_targets(m, in_features, out_features, r, p, device, record_property):
    """fwd+bwd at ranks 128 and 256, timed interleaved with PEFT and the base layer: never
    slower than PEFT, and on the CPU a LoRA overhead over the base at most 0.8x PEFT's (measured
    0.40-0.71x on the Ice Lake Xeon, natively and under the AVX2 caps; with the rank-r products
    in small_gemm, r = 256 gave 0.92-0.96x natively and 1.15-1.16x under the caps)."""
    case, overhead, summary = _overheads_against_peft(m, in_features, out_features, r, p, device, record_property)
    if case.device == "cpu":
        assert overhead["fastlora"] <= 0.8 * overhead["peft"], f"overhead not below 0.8x PEFT's: {summary}"


# PEFT's default rank (r = 8) on a small encoder's layers (hidden 384, MLP 1536: MiniLM-sized),
# 1024 rows: below half a vector of r the float32 shrink runs as dot products (rows_dot).
DEFAULT_RANK_CASES = [(1024, 384, 1536, 8, 0.1), (1024, 1536, 384, 8, 0.1)]


@pytest.mark.parametrize("m, in_features, out_features, r, p", DEFAULT_RANK_CASES,
                         ids=[f"M{m}-in{i}-out{o}-r{r}-p{p}" for m, i, o, r, p in DEFAULT_RANK_CASES])
def test_default_rank_targets(m, in_features, out_features, r, p, device, record_property):
    """fwd+bwd at PEFT's default rank on small layers, timed interleaved with PEFT and the base
    layer: never slower than PEFT, and on the CPU a LoRA overhead over the base at most half of
    PEFT's (the fixed costs of a small layer weigh more here than at the 10% target's shapes)."""
    case, overhead, summary = _overheads_against_peft(m, in_features, out_features, r, p, device, record_property)
    if case.device == "cpu":
        assert overhead["fastlora"] <= 0.5 * overhead["peft"], f"overhead not below 0.5x PEFT's: {summary}"


@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32], ids=["bf16_adapters", "fp32_adapters"])
def test_bfloat16_targets(adapter_dtype, record_property):
    """bfloat16 training step (fwd+bwd) at M=512, in=out=2048, r=16, p=0.05 on CPU, with the
    model's own bf16 adapters and with PEFT's default float32 ones, against PEFT and against
    fastlora's own float32 step on the same values.

    Without native bf16 GEMMs (AVX2, AVX-512 without AVX512-BF16, or FASTLORA_CPU_ISA below
    avx512) fastlora runs float32 kernels on float32 copies: within 1.5x of its float32 step and
    >= 10x PEFT where the peers' bf16 GEMMs are emulated slowly (AVX2: a step takes seconds),
    >= 2x where oneDNN converts in AVX-512 (bench_targets.assert_emulated_bf16_targets; the peers get
    one warm-up and one timed round each). With native bf16 GEMMs: >= 1.2x PEFT and <= +15% over
    the bf16 base layer (+20% with float32 adapters, whose branch runs at the float32 rate against
    a base at the bf16 rate, as PEFT's does)."""
    import fastlora

    native = fastlora.cpu.native_bf16_matmul()
    cases = {torch.bfloat16: LoraLinearCase(512, 2048, 2048, 16, 0.05, dtype=torch.bfloat16, adapter_dtype=adapter_dtype),
             torch.float32: LoraLinearCase(512, 2048, 2048, 16, 0.05, dtype=torch.float32)}
    for c in cases.values():
        c.impls = c.build()
    if native:  # all three timed interleaved, as fastlora bench does
        steps = interleaved_medians({n: s for n, (_, s) in cases[torch.bfloat16].impls.items()})
    else:
        # The emulated peers take seconds per step: one round each, then fastlora's own rounds.
        steps = interleaved_medians({n: s for n, (_, s) in cases[torch.bfloat16].impls.items()},
                                    min_rounds=1, max_rounds=1, warmup=1)
        steps["fastlora"] = interleaved_medians({"f": cases[torch.bfloat16].impls["fastlora"][1]})["f"]
    steps["fastlora_float32"] = interleaved_medians({"f": cases[torch.float32].impls["fastlora"][1]})["f"]
    summary = {f"step_{n}_ms": round(t * 1e3, 2) for n, t in steps.items()}
    summary.update(native_bf16=native, cpu_isa=fastlora.cpu_isa(), adapters=str(adapter_dtype))
    for k, v in summary.items():
        record_property(k, v)
    print("bfloat16 M=512 in=2048 out=2048 r=16 p=0.05", summary)
    if native:
        # The LoRA products in the AVX512-BF16 kernel: measured 1.35-1.45x PEFT and +7 to +12%
        # over the bf16 base on Zen 4; asserted with room for noise. With AMX (Xeon) the base
        # GEMMs are 3-4x faster and the passes around the LoRA products weigh more: +35 to +45%,
        # 2.1x PEFT there, failing (docs/benchmarks.md, Xeon (AMX)).
        # Float32 adapters: +14.8%, 1.48x PEFT on Zen 4 (`fastlora bench --dtype bfloat16
        # --adapter-dtype float32`, docs/benchmarks.md).
        assert steps["peft"] >= 1.2 * steps["fastlora"], summary
        assert steps["fastlora"] <= (1.15 if adapter_dtype == torch.bfloat16 else 1.2) * steps["base"], summary
    else:
        # Measured on an Ice Lake Xeon: 3.75x PEFT, 1.10-1.15x the float32 step (1.08x under the
        # AVX2 caps); float32 adapters 4.65x PEFT, 0.90-1.06x the float32 step natively and 0.98x
        # under the AVX2 caps.
        assert_emulated_bf16_targets(steps["fastlora"], steps["peft"], steps["fastlora_float32"], summary, 2.0)


@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32], ids=["bf16_adapters", "fp32_adapters"])
def test_bfloat16_decode_targets(adapter_dtype, record_property):
    """Decode-sized bfloat16 training step (fwd+bwd) at M=8, in=out=4096, r=16 on CPU, with the
    model's own bf16 adapters and with PEFT's default float32 ones, against PEFT and the base.

    With native bf16 GEMMs the step is two reads of the weight in oneDNN's GEMMs, and the LoRA part
    runs fastlora's decode kernels: targets <= +10% over the bf16 base layer and not slower than
    PEFT (measured +7.9 to +9.6% and 1.05-1.08x on a Xeon with AMX). Without them the peers'
    emulated bf16 GEMMs take ~1 s per step with AVX2 (one timed round each) while fastlora streams
    the bf16 weight into float32 kernels: within 1.5x of fastlora's float32 step, >= 10x PEFT
    there and >= 1.5x where oneDNN converts in AVX-512 (bench_targets.assert_emulated_bf16_targets)."""
    import fastlora

    native = fastlora.cpu.native_bf16_matmul()
    case = LoraLinearCase(8, 4096, 4096, 16, 0.0, dtype=torch.bfloat16, adapter_dtype=adapter_dtype)
    impls = case.build()
    float32_step = LoraLinearCase(8, 4096, 4096, 16, 0.0, dtype=torch.float32).build()["fastlora"][1]
    if native:
        steps = interleaved_medians({n: s for n, (_, s) in impls.items()})
    else:
        steps = interleaved_medians({n: s for n, (_, s) in impls.items()}, min_rounds=1, max_rounds=1, warmup=1)
        steps["fastlora"] = interleaved_medians({"f": impls["fastlora"][1]})["f"]
    steps["fastlora_float32"] = interleaved_medians({"f": float32_step})["f"]
    summary = {f"step_{n}_ms": round(t * 1e3, 3) for n, t in steps.items()}
    summary.update(native_bf16=native, cpu_isa=fastlora.cpu_isa(), adapters=str(adapter_dtype))
    for k, v in summary.items():
        record_property(k, v)
    print("bfloat16 M=8 in=4096 out=4096 r=16 p=0", summary)
    if native:
        assert steps["fastlora"] <= MAX_OVERHEAD_CPU * steps["base"], summary
        assert steps["fastlora"] <= steps["peft"], summary
    else:
        # Measured on an Ice Lake Xeon: 2.3-2.5x PEFT (the bf16 peers read half the bytes of W
        # that float32 ones do), faster than fastlora's own float32 step.
        assert_emulated_bf16_targets(steps["fastlora"], steps["peft"], steps["fastlora_float32"], summary, 1.5)


def test_half_precision_weight_cache(record_property):
    """float16 training step (fwd+bwd) at M=256, in=out=4096, r=16, p=0.05 on CPU, with the
    float32 copy of the frozen weight kept across calls (the default) and made per call (limit 0),
    each against fastlora's float32 step on the same values, timed interleaved with it.

    float16 runs the float32 kernels on float32 copies on every CPU (bfloat16 takes the same path
    without native bf16 GEMMs): converting the 4096^2 weight, twice per step, cost 39-56% of the
    float32 step here. Targets: the cached step within 1.25x of the float32 one and at least 10%
    faster than converting per call. The cached run sets a limit that fits the copy, so that a
    FASTLORA_WEIGHT_CACHE_MB in the environment does not decide what is measured."""
    import fastlora

    cases = {dtype: LoraLinearCase(256, 4096, 4096, 16, 0.05, dtype=dtype) for dtype in (torch.float16, torch.float32)}
    f32 = cases[torch.float32].build()["fastlora"][1]
    f16 = cases[torch.float16].build()["fastlora"][1]
    limit = fastlora.cpu.weight_cache_limit()
    try:
        fastlora.cpu.set_weight_cache_limit(0)
        per_call = interleaved_medians({"float16": f16, "float32": f32})
        fastlora.cpu.set_weight_cache_limit(max(limit, 4096 * 4096 * 4))
        cached = interleaved_medians({"float16": f16, "float32": f32})
    finally:
        fastlora.cpu.set_weight_cache_limit(limit)
    ratios = {"cached_vs_float32": cached["float16"] / cached["float32"],
              "per_call_vs_float32": per_call["float16"] / per_call["float32"]}
    summary = {k: round(v, 3) for k, v in ratios.items()}
    summary.update(cached_ms=round(cached["float16"] * 1e3, 2), per_call_ms=round(per_call["float16"] * 1e3, 2),
                   float32_ms=round(cached["float32"] * 1e3, 2), cpu_isa=fastlora.cpu_isa())
    for k, v in summary.items():
        record_property(k, v)
    print("float16 M=256 in=4096 out=4096 r=16 p=0.05", summary)
    assert ratios["cached_vs_float32"] <= 1.25, summary
    assert ratios["cached_vs_float32"] <= 0.9 * ratios["per_call_vs_float32"], summary
