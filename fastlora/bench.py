"""Benchmark cases shared by ``fastlora bench`` (the README table) and benchmarks/ (the
pytest-benchmark suites): fastlora's fused LoRA linear vs PEFT's LoRA ``Linear`` vs the frozen
base ``nn.Linear`` alone, on identical inputs and parameters.

Timings are interleaved (A B C A B C ...) so that load changes on a shared machine hit every
implementation alike; report ratios measured in the same run, never absolute times from
different runs.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

import fastlora

# (M, in_features, out_features, r, dropout_p): a decode-like batch, two training batches
# with dropout, and a large layer at rank 64.
LORA_LINEAR_CASES = [
    (8, 4096, 4096, 16, 0.0),
    (512, 2048, 2048, 16, 0.05),
    (2048, 1024, 1024, 16, 0.05),
    (2048, 4096, 4096, 64, 0.1),
]
IMPLS = ("base", "peft", "fastlora")


@dataclass
class LoraLinearCase:
    m: int
    in_features: int
    out_features: int
    r: int
    dropout_p: float
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    # The adapters' dtype (lora_A, lora_B) when not dtype: float32 on a bfloat16 / float16 base is
    # PEFT's default for half-precision models (its LoRA branch then runs in float32).
    adapter_dtype: torch.dtype | None = None

    @property
    def label(self) -> str:
        return f"M={self.m} in={self.in_features} out={self.out_features} r={self.r} p={self.dropout_p}"

    def build(self):
        """Returns {impl: (forward_fn, train_step_fn)} sharing one base layer and one adapter.

        forward_fn runs a training-mode forward (autograd recording, dropout on);
        train_step_fn runs forward + backward with a fixed output gradient. The base weight
        is frozen and x requires grad, as for a layer inside a network being fine-tuned."""
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as PeftLoraLinear

        torch.manual_seed(0)
        kw = dict(dtype=self.dtype, device=self.device)
        base = torch.nn.Linear(self.in_features, self.out_features, **kw).requires_grad_(False)
        alpha = 2 * self.r
        peft_layer = PeftLoraLinear(
            base, "default", config=LoraConfig(r=self.r, lora_alpha=alpha, lora_dropout=self.dropout_p),
            r=self.r, lora_alpha=alpha, lora_dropout=self.dropout_p).to(**kw)
        if self.adapter_dtype is not None:
            peft_layer.lora_A.to(self.adapter_dtype)
            peft_layer.lora_B.to(self.adapter_dtype)
        peft_layer.train()
        lora_A = peft_layer.lora_A["default"].weight
        lora_B = peft_layer.lora_B["default"].weight
        with torch.no_grad():  # PEFT initialises B to zero; make the branch non-trivial
            lora_B.normal_(0, self.r ** -0.5)
        scaling = peft_layer.scaling["default"]
        x = torch.randn(self.m, self.in_features, requires_grad=True, **kw)
        grad_y = torch.randn(self.m, self.out_features, **kw)

        def fused(inp):
            return fastlora.lora_linear(inp, base.weight, base.bias, lora_A, lora_B, scaling,
                                        self.dropout_p, training=True)

        fns = {"base": base, "peft": peft_layer, "fastlora": fused}

        def make(fn):
            def forward():
                return fn(x)

            def train_step():
                fn(x).backward(grad_y)

            return forward, train_step

        self.params = [base.weight, base.bias, lora_A, lora_B]
        self.x = x
        return {name: make(fn) for name, fn in fns.items()}


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_medians(fns: dict, device="cpu", min_rounds=5, max_rounds=50, budget_s=3.0,
                        warmup=2) -> dict:
    """Median seconds per call of each fn, timed round-robin with a rotating start."""
    times = interleaved_times(fns, device, min_rounds, max_rounds, budget_s, warmup)
    return {n: statistics.median(v) for n, v in times.items()}


def paired_ratio_quartiles(num: list, den: list) -> tuple[float, float, float]:
    """Quartiles (25%, 50%, 75%) of the per-round ratios num[i] / den[i] of two series from one
    interleaved_times run. The calls of a round run back to back, so a machine whose speed drifts
    between rounds (a shared VM) moves both alike: the spread of these ratios shows how far a
    ratio of medians can be trusted."""
    ratios = sorted(a / b for a, b in zip(num, den))
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, q2, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q1, q2, q3


def interleaved_times(fns: dict, device="cpu", min_rounds=5, max_rounds=50, budget_s=3.0,
                      warmup=2) -> dict:
    """Seconds per call of each fn in every round ({name: [round 0, round 1, ...]}), timed
    round-robin with a rotating start."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    _sync(device)
    times = {n: [] for n in names}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (rounds < max_rounds and time.perf_counter() - start < budget_s):
        order = names[rounds % len(names):] + names[:rounds % len(names)]
        for n in order:
            _sync(device)
            t0 = time.perf_counter()
            fns[n]()
            _sync(device)
            times[n].append(time.perf_counter() - t0)
        rounds += 1
    return times


def saved_activation_bytes(fn, exclude) -> int:
    """Bytes autograd saves for backward in one call of fn, excluding the given tensors
    (parameters) and counting each storage once."""
    skip = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip and t.numel() > 1:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def run_lora_linear(cases=None, dtype=torch.float32, device="cpu", budget_s=3.0, log=print,
                    adapter_dtype=None):
    rows = []
    for shape in cases or LORA_LINEAR_CASES:
        case = LoraLinearCase(*shape, dtype=dtype, device=device, adapter_dtype=adapter_dtype)
        impls = case.build()
        fwd = interleaved_medians({n: f for n, (f, _) in impls.items()}, device, budget_s=budget_s)
        step_times = interleaved_times({n: s for n, (_, s) in impls.items()}, device, budget_s=budget_s)
        step = {n: statistics.median(v) for n, v in step_times.items()}
        saved = {n: saved_activation_bytes(f, case.params) for n, (f, _) in impls.items()}
        row = dict(case=case.label, fwd=fwd, step=step, saved=saved,
                   overhead_quartiles=paired_ratio_quartiles(step_times["fastlora"], step_times["base"]),
                   speedup_quartiles=paired_ratio_quartiles(step_times["peft"], step_times["fastlora"]),
                   shrink_bytes=case.m * case.r * case.x.element_size(),
                   x_bytes=case.x.numel() * case.x.element_size())
        rows.append(row)
        if log:
            log(format_row(row))
    return rows


TABLE_HEADER = (
    "| case (M, in, out, r, p) | base fwd+bwd ms | PEFT fwd+bwd ms | fastlora fwd+bwd ms | "
    "fastlora overhead over base | speed-up vs PEFT (fwd+bwd) | speed-up vs PEFT (fwd) | "
    "saved activations PEFT / fastlora MiB |\n"
    "|---|---|---|---|---|---|---|---|")


def format_row(row) -> str:
    """One table row; the fwd+bwd ratios are followed by the quartiles of their per-round values
    in brackets (paired_ratio_quartiles)."""
    s, f, sv = row["step"], row["fwd"], row["saved"]
    mib = 1 << 20
    oq, sq = row["overhead_quartiles"], row["speedup_quartiles"]
    return (f"| {row['case']} | {s['base'] * 1e3:.1f} | {s['peft'] * 1e3:.1f} | {s['fastlora'] * 1e3:.1f} | "
            f"{100 * (s['fastlora'] / s['base'] - 1):+.1f}% [{100 * (oq[0] - 1):+.1f}, {100 * (oq[2] - 1):+.1f}] | "
            f"{s['peft'] / s['fastlora']:.2f}x [{sq[0]:.2f}, {sq[2]:.2f}] | "
            f"{f['peft'] / f['fastlora']:.2f}x | {sv['peft'] / mib:.1f} / {sv['fastlora'] / mib:.1f} |")


def environment_line(device="cpu") -> str:
    import platform

    if device.startswith("cuda"):
        where = torch.cuda.get_device_name()
    else:
        # The instruction set matters as much as the core count: fastlora's own kernels run the
        # build named here (FASTLORA_CPU_ISA caps it), the BLAS whatever MKL / oneDNN pick.
        bf16 = "native bf16" if fastlora.cpu.native_bf16_matmul() else "no native bf16"
        where = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                 f"fastlora CPU kernels {fastlora.cpu_isa()}, {bf16}")
    return f"torch {torch.__version__}, {device} ({where}), fastlora {fastlora.__version__}"
