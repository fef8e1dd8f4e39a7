"""Mixed-adapter batches: PEFT's ``_mixed_batch_forward`` (a Python loop over adapters with
boolean-mask gathers) vs fastlora's grouped op, for one LoRA Linear layer at inference.

    .venv/bin/python -m pytest benchmarks/test_bench_lora_grouped_linear.py -s --benchmark-columns=median,iqr,rounds

Four timings on identical inputs and parameters (no_grad, eval): ``peft`` (PEFT's Linear
called with ``adapter_names``), ``fastlora_layer`` (the same layer patched by ``fastlora.peft``:
name -> id mapping, cached stacked weights, one ``lora_grouped_linear``), ``fastlora_op`` (the
op on pre-stacked weights), and ``base`` (the frozen nn.Linear alone, the floor). Rows are
interleaved over the adapters and "__base__" (row i -> i % (K + 1)), the worst case for PEFT's
gathers and for our gather / scatter, or one adapter per sample of 128 consecutive rows. The
speed-ups are measured in the same run (interleaved medians) and recorded in extra_info; only
targets measured to hold with margin are asserted.
"""
import copy
import warnings

import pytest
import torch

import fastlora
import fastlora.peft as fp
from fastlora.bench import interleaved_medians

M, IN, OUT, R = 2048, 1024, 1024, 16
SEQ = 128  # per-sample layout: M // SEQ samples of SEQ consecutive rows
# (adapters, layout): rows interleaved over the adapters (the case, worst for PEFT's
# gathers and for our gather/scatter), and one adapter per sample of 128 consecutive rows (how
# PEFT's adapter_names is used for sequences).
CASES = [(4, "interleaved"), (16, "interleaved"), (4, "per-sample")]
# Asserted, measured to hold with margin on the 2-core CPU machine (figures in extra_info):
#  * the LoRA part (time over the frozen base layer) of the patched layer is >= 1.5x cheaper
#    than PEFT's (1 thread: 1.76-2.6x; 2 threads on the shared, CPU-quota-limited machine:
#    45-145x, where each of PEFT's ~6 small parallel ops per adapter waits ~8 ms at its
#    fork/join while fastlora's LoRA part is one parallel region);
#  * the whole layer is never slower than PEFT (1 thread: 1.06-1.14x; 2 threads on that
#    machine: 5-16x). The whole-layer 1.5x aim therefore holds only where PEFT's
#    per-op overheads dominate; at 1 thread the base GEMM is 75-90% of PEFT's time, so no
#    LoRA kernel can reach 1.5x there.
MIN_LORA_SPEEDUP = 1.5
NOISE = 1.03
IMPLS = ("base", "peft", "fastlora_layer", "fastlora_op")


class Case:
    def __init__(self, n_adapters, layout, device):
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as PeftLinear

        torch.manual_seed(0)
        self.label = f"M={M} in={IN} out={OUT} r={R} adapters={n_adapters} {layout}"
        base = torch.nn.Linear(IN, OUT, device=device).requires_grad_(False)
        cfg = LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=0.0)
        names = [f"a{k}" for k in range(n_adapters)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_layer = PeftLinear(base, names[0], config=cfg, r=R, lora_alpha=2 * R).to(device)
            for name in names[1:]:
                peft_layer.update_layer(name, r=R, lora_alpha=2 * R, config=cfg)
        peft_layer.to(device).eval()
        with torch.no_grad():  # PEFT initialises lora_B to zero; make every branch non-trivial
            for name in names:
                peft_layer.lora_B[name].weight.normal_(0, R ** -0.5)
        fast_layer = copy.deepcopy(peft_layer)  # identical parameters
        assert fp.patch(fast_layer) == 1
        self.peft_layer, self.fast_layer = peft_layer, fast_layer
        # One adapter per sample (PEFT's adapter_names); a sample is one row when interleaved.
        samples, seq = (M, 1) if layout == "interleaved" else (M // SEQ, SEQ)
        self.x = torch.randn(samples, seq, IN, device=device).squeeze(1)
        self.adapter_names = [(["__base__"] + names)[i % (n_adapters + 1)] for i in range(samples)]
        A, B, ranks = fastlora.stack_lora_adapters([peft_layer.lora_A[n].weight for n in names],
                                                   [peft_layer.lora_B[n].weight for n in names])
        scalings = torch.tensor([peft_layer.scaling[n] for n in names])
        ids = torch.tensor([i % (n_adapters + 1) - 1 for i in range(samples)])  # per sample
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

        def timed(fn):
            def run():
                with torch.no_grad():
                    out = fn()
                sync()
                return out
            return run

        self.impls = {
            "base": timed(lambda: base(self.x)),
            "peft": timed(lambda: peft_layer(self.x, adapter_names=self.adapter_names)),
            "fastlora_layer": timed(lambda: fast_layer(self.x, adapter_names=self.adapter_names)),
            "fastlora_op": timed(lambda: fastlora.lora_grouped_linear(self.x, base.weight, base.bias, A, B,
                                                                      scalings, ids, ranks=ranks)),
        }
        self.device = device


@pytest.fixture(scope="module", params=CASES, ids=[f"adapters{k}-{layout}" for k, layout in CASES])
def case(request, device):
    return Case(*request.param, device)


@pytest.mark.parametrize("impl", IMPLS)
def test_time(benchmark, case, impl):
    benchmark.group = f"lora_grouped {case.label} fwd"
    benchmark.pedantic(case.impls[impl], rounds=5, warmup_rounds=2, iterations=1)


def test_targets(case, record_property, benchmark):
    out = {n: f() for n, f in case.impls.items() if n != "base"}
    torch.testing.assert_close(out["fastlora_layer"], out["peft"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["fastlora_op"], out["peft"], rtol=1e-4, atol=1e-4)
    calls = case.fast_layer.fastlora_calls
    t = interleaved_medians(case.impls, case.device, min_rounds=7, max_rounds=30, budget_s=10.0)
    assert case.fast_layer.fastlora_calls > calls  # the fast path really ran
    info = {f"{n}_ms": round(v * 1e3, 2) for n, v in t.items()}
    info.update({
        "speedup_layer_vs_peft": round(t["peft"] / t["fastlora_layer"], 3),
        "speedup_op_vs_peft": round(t["peft"] / t["fastlora_op"], 3),
        # None when fastlora's LoRA part is below timing noise (not slower than the base layer).
        "lora_part_speedup_layer_vs_peft": (round((t["peft"] - t["base"]) / (t["fastlora_layer"] - t["base"]), 2)
                                            if t["fastlora_layer"] > t["base"] else None),
        "lora_overhead_over_base_layer": round(t["fastlora_layer"] / t["base"] - 1, 3),
        "lora_overhead_over_base_peft": round(t["peft"] / t["base"] - 1, 3),
        "threads": torch.get_num_threads(),
    })
    for k, v in info.items():
        record_property(k, v)
    benchmark.extra_info.update(info)
    benchmark.group = f"lora_grouped targets {case.label}"
    benchmark.pedantic(lambda: None, rounds=1)  # carries extra_info into the benchmark report
    print(case.label, info)
    # LoRA part: (fastlora - base) * 1.5 <= (PEFT - base); robust when fastlora's part is ~0.
    assert (t["fastlora_layer"] - t["base"]) * MIN_LORA_SPEEDUP <= t["peft"] - t["base"], info
    assert t["fastlora_layer"] <= NOISE * t["peft"], info


def test_half_precision_through_float32(record_property):
    """Training step (fwd+bwd) of the grouped op at M=512, in=out=2048, four adapters of rank 16
    (rows interleaved), bfloat16 with the kernels' avx2 build (no native bf16 GEMMs: the op runs
    its float32 kernels on float32 copies, as on an AVX2 CPU) and float16, against the float32
    step timed interleaved with them. Through ATen's emulated bf16 GEMMs that step took 15.1 s
    on the AVX2-capped Xeon (60 ms through float32). Target: within 1.5x of float32."""
    m, n_in, n_out, r, k = 512, 2048, 2048, 16, 4
    g = torch.Generator().manual_seed(0)
    ra = torch.arange(m) % (k + 1) - 1

    def make(dtype):
        x = torch.randn(m, n_in, generator=g).to(dtype).requires_grad_()
        w = (torch.randn(n_out, n_in, generator=g) / n_in ** 0.5).to(dtype)
        b = torch.randn(n_out, generator=g).to(dtype)
        a = (torch.randn(k, r, n_in, generator=g) / n_in ** 0.5).to(dtype).requires_grad_()
        bb = (torch.randn(k, n_out, r, generator=g) * 0.1).to(dtype).requires_grad_()
        gy = torch.randn(m, n_out, generator=g).to(dtype)
        s, ranks = torch.full((k,), 2.0), torch.full((k,), r)

        def step():
            fastlora.lora_grouped_linear(x, w, b, a, bb, s, ra, ranks).backward(gy)
        return step

    best = fastlora.use_cpu_isa("auto")
    try:
        fastlora.use_cpu_isa("avx2")
        assert not fastlora.cpu.native_bf16_matmul()
        steps = interleaved_medians({str(dt).split(".")[1]: make(dt)
                                     for dt in (torch.float32, torch.bfloat16, torch.float16)})
    finally:
        fastlora.use_cpu_isa(best)
    summary = {f"step_{n}_ms": round(t * 1e3, 2) for n, t in steps.items()}
    for key, value in summary.items():
        record_property(key, value)
    print("grouped M=512 in=2048 out=2048 r=16 K=4 (avx2 build)", summary)
    assert steps["bfloat16"] <= 1.5 * steps["float32"], summary
    assert steps["float16"] <= 1.5 * steps["float32"], summary
