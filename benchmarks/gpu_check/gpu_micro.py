"""fastlora GPU micro-checks; `python gpu_micro.py SECTION` writes $GPU_CHECK_OUT/micro_SECTION.json.
Sections run in separate processes so that a CUDA fault in one cannot poison the others."""
import json, os, statistics, subprocess, sys, time, traceback, warnings
import torch
import torch.nn.functional as F
import fastlora  # noqa: F401  (registers torch.ops.fastlora.*)

OUT = os.environ.get("GPU_CHECK_OUT", ".")
DRY = os.environ.get("GPU_CHECK_DRY", "0") == "1"
DEV = "cpu" if DRY else "cuda"
S = 1 / 64 if DRY else 1.0          # size scale for dry runs
R = {}                               # this section's results


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def timeit(fn, iters=10, warmup=2):
    """(median wall ms incl. host overhead, median device ms from CUDA events or None)."""
    for _ in range(warmup):
        fn()
    sync()
    wall, dev = [], []
    for _ in range(iters):
        if DEV == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t = time.perf_counter(); s.record(); fn(); e.record(); e.synchronize()
            wall.append((time.perf_counter() - t) * 1e3); dev.append(s.elapsed_time(e))
        else:
            t = time.perf_counter(); fn(); wall.append((time.perf_counter() - t) * 1e3)
    return round(statistics.median(wall), 4), (round(statistics.median(dev), 4) if dev else None)


def kernel_names(fn):
    """CUDA kernel names launched by fn (profiler)."""
    from torch.profiler import profile, ProfilerActivity
    fn(); sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn(); sync()
    return [e.name for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")]


def _is_lora_kernel(name):
    """A Triton kernel of fastlora's LoRA linear (band kernels, band sum, rank-r GEMM, add)."""
    return any(k in name for k in ("_lora_fwd_band_kernel", "_lora_bwd_band_kernel", "_band_sum_kernel",
                                   "_lora_gemm_kernel", "_lora_add_kernel"))


def save_partial(name):
    json.dump(dict(R, status="PARTIAL"), open(os.path.join(OUT, f"micro_{name}.json"), "w"), indent=1, default=str)


def section(fn):
    name = fn.__name__
    def run():
        t = time.time()
        try:
            fn()
            R["status"] = "OK"
        except Exception as e:
            R["status"] = f"ERROR {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            traceback.print_exc()
        R["seconds"] = round(time.time() - t, 1)
        json.dump(R, open(os.path.join(OUT, f"micro_{name}.json"), "w"), indent=1, default=str)
        print("RESULT", name, json.dumps(R, default=str))
        if R["status"] != "OK":
            sys.exit(1)  # the step fails, and so does the check (its result is recorded above)
    return run


def lora_inputs(M, K, N, r, dtype, p=0.05, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(dtype).to(DEV)
    x = mk(M, K).requires_grad_(True)
    W, b = mk(N, K, sc=K ** -0.5), mk(N)
    A = mk(r, K, sc=K ** -0.5).requires_grad_(True)
    B = mk(N, r, sc=r ** -0.5).requires_grad_(True)
    return x, W, b, A, B, mk(M, N)


# ------------------------------------------------------------------------------ sections
@section
def env():
    import triton, fastlora
    R["torch"] = torch.__version__
    R["cuda"] = torch.version.cuda
    R["triton"] = triton.__version__
    R["fastlora"] = fastlora.__version__
    R["kernels_file"] = __import__("fastlora.kernels.lora_linear", fromlist=["x"]).__file__
    if DEV == "cuda":
        pr = torch.cuda.get_device_properties(0)
        R["gpu"] = f"{pr.name} sm_{pr.major}{pr.minor} SMs={pr.multi_processor_count} mem={pr.total_memory >> 30}GiB"
    R["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET")
    # the repo's top-level kernels/ shadows Hugging Face's `kernels` (imported by recent
    # transformers) whenever the repo root is on sys.path (python -m / -c from the root)
    for where, cwd in (("repo root", os.getcwd()), ("elsewhere", OUT)):
        p = subprocess.run([sys.executable, "-c", "import importlib.util as u; s = u.find_spec('kernels'); "
                            "print(s.origin if s else None); import peft; print('import peft OK')"],
                           capture_output=True, text=True, cwd=cwd, timeout=60)
        R[f"python -c 'import peft' from {where}"] = " | ".join((p.stdout + p.stderr).strip().splitlines()[-2:])
    try:
        R["allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        R["fp32_precision"] = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    except Exception as e:
        R["allow_tf32"] = f"raises {e}"


@section
def dispatch():
    """Do CUDA tensors reach the Triton kernels (eager)? Kernel counts per LoRA fwd+bwd."""
    import fastlora
    M, K, N, r = int(2048 * S) or 16, int(4096 * S) or 16, int(4096 * S) or 16, 16
    for dt in (torch.bfloat16, torch.float32):
        x, W, b, A, B, gy = lora_inputs(M, K, N, r, dt)
        step = lambda: fastlora.lora_linear(x, W, b, A, B, 2.0, 0.05).backward(gy)
        if DEV == "cuda":
            names = kernel_names(step)
            R[f"{dt}_kernels_per_fwd_bwd"] = len(names)
            R[f"{dt}_triton_lora_launches"] = sum(_is_lora_kernel(n) for n in names)
            R[f"{dt}_kernel_histogram"] = {n[:60]: names.count(n) for n in sorted(set(names))}
        # correctness vs the reference on the same seed
        seed = torch.tensor(1234)
        y = fastlora.lora_linear(x, W, b, A, B, 2.0, 0.05, seed=seed)
        from fastlora import reference as ref
        yr = ref.lora_linear(x.detach().double(), W.double(), b.double(), A.detach().double(), B.detach().double(), 2.0, 0.05, 1234)
        R[f"{dt}_fwd_max_rel_err_vs_fp64_ref"] = float((y.double() - yr).abs().max() / yr.abs().max())
    # the other families
    d = torch.randn(int(1 << 20), device=DEV)
    if DEV == "cuda":
        R["topk_kernels"] = sorted(set(n[:40] for n in kernel_names(lambda: fastlora.topk_sparsify(d, density=0.01))))
        out = [torch.zeros(1 << 20, device=DEV)]
        idx = [torch.randperm(1 << 20, device=DEV)[:10000].sort().values]
        val = [torch.randn(10000, device=DEV)]
        R["aggregate_kernels"] = sorted(set(n[:40] for n in kernel_names(
            lambda: torch.ops.fastlora.sparse_aggregate_(out, idx, val, torch.ones(1), True))))
        xs = torch.randn(64, 256, device=DEV, dtype=torch.bfloat16)
        Ws = torch.randn(128, 256, device=DEV, dtype=torch.bfloat16)
        As = [torch.randn(8, 256, device=DEV, dtype=torch.bfloat16) for _ in range(3)]
        Bs = [torch.randn(128, 8, device=DEV, dtype=torch.bfloat16) for _ in range(3)]
        ra = torch.randint(-1, 3, (64,), device=DEV)
        R["grouped_kernels"] = sorted(set(n[:40] for n in kernel_names(
            lambda: fastlora.lora_grouped_linear(xs, Ws, None, As, Bs, [1.0, 0.5, 2.0], ra))))


@section
def compiled():
    """Under torch.compile(fullgraph=True): still the Triton kernels? Same result as eager?"""
    import fastlora
    M, K, N, r = 256, 512, 512, 16
    x, W, b, A, B, gy = lora_inputs(M, K, N, r, torch.bfloat16, seed=3)
    f = lambda inp, s: fastlora.lora_linear(inp, W, b, A, B, 2.0, 0.1, seed=s)
    cf = torch.compile(f, fullgraph=True)
    seed = torch.tensor(77)
    ye = f(x, seed); ye.backward(gy); ge = x.grad.clone(); x.grad = None
    yc = cf(x, seed); yc.backward(gy); gc = x.grad.clone(); x.grad = None
    R["fwd_equal_eager_vs_compiled"] = bool(torch.equal(ye, yc))
    R["grad_x_equal"] = bool(torch.equal(ge, gc))
    if DEV == "cuda":
        names = kernel_names(lambda: cf(x, seed).backward(gy))
        R["compiled_triton_lora_launches"] = sum(_is_lora_kernel(n) for n in names)
    # default seed path (random op traced into the graph)
    cf2 = torch.compile(lambda inp: fastlora.lora_linear(inp, W, b, A, B, 2.0, 0.1), fullgraph=True)
    R["default_seed_two_calls_differ"] = bool(not torch.equal(cf2(x), cf2(x)))


@section
def lora():
    """fastlora fwd+bwd vs the frozen base layer (cuBLAS) vs an eager PEFT-style LoRA; and the
    forward launcher alone (cuBLAS base product + the Triton band kernel) vs torch.addmm: what
    the LoRA branch costs on top of the base GEMM."""
    import fastlora
    from fastlora.kernels import lora_linear as tk
    cases = [(8, 4096, 4096, 16, 0.0), (2048, 4096, 4096, 16, 0.05), (2048, 4096, 4096, 64, 0.1)]
    for dt in (torch.bfloat16, torch.float32):
        for (M, K, N, r, p) in cases:
            M, K, N = max(16, int(M * S)), max(16, int(K * S)), max(16, int(N * S))
            x, W, b, A, B, gy = lora_inputs(M, K, N, r, dt, p)
            s = 2.0
            base = lambda: F.linear(x, W, b).backward(gy)
            peft = lambda: (F.linear(x, W, b) + s * F.linear(F.linear(F.dropout(x, p), A), B)).backward(gy)
            fl = lambda: fastlora.lora_linear(x, W, b, A, B, s, p).backward(gy)
            key = f"{str(dt)[6:]} M={M} K={K} N={N} r={r}"
            t = {n: timeit(fn, iters=10) for n, fn in (("base", base), ("peft", peft), ("fastlora", fl))}
            R[key + " fwd+bwd wall/dev ms"] = t
            if t["base"][1]:
                R[key + " overhead_vs_base_dev"] = f"{100 * (t['fastlora'][1] / t['base'][1] - 1):+.1f}%"
                R[key + " speedup_vs_peft_dev"] = round(t["peft"][1] / t["fastlora"][1], 2)
            if DEV != "cuda":
                continue
            with torch.no_grad():
                tri = timeit(lambda: tk.lora_linear_forward(x, W, b, A, B, s, 0.0, 0), iters=10)
                cub = timeit(lambda: torch.addmm(b, x, W.t()), iters=10)
            if tri[1]:
                fl_ = 2 * M * N * K / 1e9
                R[key + " fwd TFLOPS launcher/cublas addmm"] = (round(fl_ / tri[1], 1), round(fl_ / cub[1], 1))
            save_partial("lora")


@section
def topk():
    import fastlora
    n = int((64 << 20) * S)
    k = int(0.01 * n + 0.5)
    d = torch.randn(n, device=DEV)
    res = fastlora.new_residual(d)
    R["n"], R["k"] = n, k
    R["clone_ms"] = timeit(lambda: d.clone(), iters=5)
    R["torch.topk(abs, sorted=False)_ms"] = timeit(lambda: torch.topk(d.abs(), k, sorted=False), iters=5)
    R["torch.topk(abs, sorted=True)_ms"] = timeit(lambda: torch.topk(d.abs(), k), iters=5)
    R["fastlora_exact_ms"] = timeit(lambda: fastlora.topk_sparsify(d, k=k), iters=5)
    R["fastlora_approx_ms"] = timeit(lambda: fastlora.topk_sparsify(d, k=k, approx=True), iters=5)
    R["fastlora_exact_ef_ms"] = timeit(lambda: fastlora.topk_sparsify(d, k=k, residual=res), iters=5)
    sd = fastlora.topk_sparsify(d, k=k)
    tv = torch.topk(d.abs(), k, sorted=False).values
    R["same_selected_magnitudes_as_torch.topk"] = bool(torch.equal(torch.sort(sd.values.abs()).values, torch.sort(tv).values))
    R["indices_sorted_unique"] = bool((sd.indices[1:] > sd.indices[:-1]).all())
    sa = fastlora.topk_sparsify(d, k=k, approx=True)
    R["approx_nnz_rel_err"] = round(abs(sa.nnz - k) / k, 4)


@section
def aggregate():
    n = int((16 << 20) * S)
    C, kk = 64, int(0.01 * n)
    g = torch.Generator(device=DEV).manual_seed(0)
    idx = [torch.randperm(n, device=DEV, generator=g)[:kk].sort().values for _ in range(C)]
    val = [torch.randn(kk, device=DEV, generator=g) for _ in range(C)]
    w = torch.full((C,), 1.0 / C)
    out0 = torch.randn(n, device=DEV, generator=g)
    R["clients"], R["numel"], R["nnz_each"] = C, n, kk
    R["clone_ms"] = timeit(lambda: out0.clone(), iters=5)

    def fl(validate):
        o = out0.clone()
        torch.ops.fastlora.sparse_aggregate_([o], idx, val, w, validate)
        return o

    wl = [float(v) for v in w]

    def ia2():
        o = out0.clone()
        for i in range(C):
            o.index_add_(0, idx[i], val[i] * wl[i])
        return o
    R["fastlora_validate=False_ms(incl clone)"] = timeit(lambda: fl(False), iters=5)
    R["fastlora_validate=True_ms(incl clone)"] = timeit(lambda: fl(True), iters=5)
    R["index_add__ms(incl clone)"] = timeit(ia2, iters=5)
    a, b2 = fl(False), ia2()
    R["bitwise_equal_to_index_add_"] = bool(torch.equal(a, b2))
    R["deterministic_two_runs"] = bool(torch.equal(a, fl(False)))
    R["max_abs_diff_vs_index_add_"] = float((a - b2).abs().max())


@section
def probe_tf32_new_api():
    """kernels/_common.py dot_precision reads torch.backends.cuda.matmul.allow_tf32, which
    raises on torch >= 2.9 once the new fp32_precision API was used."""
    code = ("import torch, fastlora\n"
            "torch.backends.cuda.matmul.fp32_precision = 'tf32'\n"
            f"x = torch.randn(64, 64, device='{DEV}')\n"
            "y = fastlora.lora_linear(x, torch.randn(64, 64, device=x.device), None, torch.randn(4, 64, device=x.device), torch.randn(64, 4, device=x.device), 1.0)\n"
            "print('OK', y.shape)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    R["rc"] = p.returncode
    R["tail"] = (p.stdout + p.stderr).strip().splitlines()[-1:] if (p.stdout + p.stderr).strip() else []


@section
def probe_grouped_r1024():
    """lora_grouped_linear: R_PAD = next_pow2(r_max) is loaded whole; r_max=1024 needs >227 KB smem."""
    import fastlora
    for r in (256, 512, 1024):
        for dt in (torch.bfloat16, torch.float32):
            x = torch.randn(64, 1024, device=DEV, dtype=dt)
            W = torch.randn(1024, 1024, device=DEV, dtype=dt) * 0.03
            As = [torch.randn(r, 1024, device=DEV, dtype=dt) * 0.03 for _ in range(2)]
            Bs = [torch.randn(1024, r, device=DEV, dtype=dt) * 0.03 for _ in range(2)]
            ra = torch.randint(0, 2, (64,), device=DEV)
            try:
                y = fastlora.lora_grouped_linear(x, W, None, As, Bs, [1.0, 1.0], ra)
                sync()
                R[f"r={r} {dt}"] = "OK"
            except Exception as e:
                R[f"r={r} {dt}"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"


@section
def probe_big_lora():
    """> 2**31-element x and y (int64 addressing) through the public op, p=0 and p>0."""
    import fastlora
    K = N = 4096
    M = (1 << 31) // K + 3 if not DRY else 64
    dt = torch.bfloat16
    x = torch.randn(M, K, device=DEV, dtype=dt)
    W = torch.randn(N, K, device=DEV, dtype=dt) * K ** -0.5
    b = torch.randn(N, device=DEV, dtype=dt)
    A = torch.randn(16, K, device=DEV, dtype=dt) * K ** -0.5
    B = torch.randn(N, 16, device=DEV, dtype=dt) * 0.25
    R["x_numel"] = x.numel()
    with torch.no_grad():
        y = fastlora.lora_linear(x, W, b, A, B, 2.0, 0.0)
        for name, sl in (("first", slice(0, 64)), ("last", slice(M - 64, M))):
            xs = x[sl].double()
            ref = F.linear(xs, W.double(), b.double()) + 2.0 * F.linear(F.linear(xs, A.double()), B.double())
            R[f"{name}_rows_rel_err"] = float((y[sl].double() - ref).abs().max() / ref.abs().max())
    del y
    # backward at the same size (grad_x has > 2**31 elements): p > 0, last rows vs the reference
    x.requires_grad_(True)
    A.requires_grad_(True)
    gy = torch.randn(M, N, device=DEV, dtype=dt)
    seed = torch.tensor(99)
    fastlora.lora_linear(x, W, b, A, B, 2.0, 0.1, seed=seed).backward(gy)
    from fastlora import reference as ref
    from fastlora.reference import dropout_hash as ref_dropout  # the hash's uint32 helpers
    sl = slice(M - 32, M)
    # dropout mask of the last rows, by the reference hash (seed 99: lo = 99, hi = 0)
    i = torch.arange(M - 32, M, device=DEV).unsqueeze(1)
    j = torch.arange(K, device=DEV).unsqueeze(0)
    h = ref.fmix32(i ^ 99)
    u = ref.fmix32(((h + ref_dropout._mul32(j, ref.GOLDEN32)) & ref_dropout._M32) ^ 0)
    keep = (u >> 8) >= ref.dropout_threshold(0.1)
    g = (gy[sl].double() @ B.double()) * 2.0
    gx = gy[sl].double() @ W.double() + (g @ A.detach().double()) * keep.double() / 0.9
    R["grad_x_last_rows_rel_err"] = float((x.grad[sl].double() - gx).abs().max() / gx.abs().max())


@section
def probe_big_topk():
    """top-k over 2**31 + 4099 fp16 elements with planted maxima past 2**31 (int64 flat indices)."""
    import fastlora
    n = (1 << 31) + 4099 if not DRY else 100_000
    d = torch.randn(n, device=DEV, dtype=torch.float16)
    planted = torch.arange(n - 3000, n, 3, device=DEV)
    d[planted] = 1000.0
    sd = fastlora.topk_sparsify(d, k=planted.numel())
    R["n"] = n
    R["planted_found"] = bool(torch.equal(sd.indices, planted))


@section
def probe_cuda_graph():
    """fastlora.lora_linear fwd+bwd captured in a CUDA graph with the default (device-drawn)
    dropout seed: two replays must draw two masks, and a replay must equal an eager call with the
    seed it drew (the kernels read the seed on the device; nothing reads it back)."""
    import fastlora
    if DEV != "cuda":
        return
    M, K, N, r, p = 256, 512, 512, 16, 0.25
    x, W, b, A, B, gy = lora_inputs(M, K, N, r, torch.bfloat16)
    xs = x.detach().clone()
    seeds = []

    def step():
        seed = torch.randint(2**63 - 1, (), device=DEV)  # what the op draws by default, kept here
        seeds.append(seed)
        return fastlora.lora_linear(xs, W, b, A.detach(), B.detach(), 2.0, p, seed=seed)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up (compiles the kernels) outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = step()
    outs = []
    for _ in range(2):
        g.replay()
        sync()
        outs.append((y.clone(), seeds[-1].item()))
    R["replays_differ"] = bool(not torch.equal(outs[0][0], outs[1][0]))
    eager = fastlora.lora_linear(xs, W, b, A.detach(), B.detach(), 2.0, p, seed=outs[1][1])
    R["replay_equals_eager_with_its_seed"] = bool(torch.equal(outs[1][0], eager))


@section
def probe_misc():
    import fastlora
    # M = 0 through the public op, with autograd
    x = torch.empty(0, 64, device=DEV, requires_grad=True)
    W = torch.randn(32, 64, device=DEV)
    A = torch.randn(4, 64, device=DEV, requires_grad=True)
    B = torch.randn(32, 4, device=DEV, requires_grad=True)
    fastlora.lora_linear(x, W, None, A, B, 1.0, 0.1).sum().backward()
    R["M0_ok"] = bool(A.grad is not None and float(A.grad.abs().sum()) == 0.0)
    # y.sum().backward(): grad_y has stride (0, 0)
    x = torch.randn(50, 64, device=DEV, requires_grad=True)
    A.grad = None
    fastlora.lora_linear(x, W, None, A, B, 1.5, 0.0).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    A2 = A.detach().clone().requires_grad_(True)
    (F.linear(x2, W) + 1.5 * F.linear(F.linear(x2, A2), B.detach())).sum().backward()
    R["stride0_grad_x_rel_err"] = float((x.grad - x2.grad).abs().max() / x2.grad.abs().max())
    R["stride0_grad_A_rel_err"] = float((A.grad - A2.grad).abs().max() / A2.grad.abs().max())
    # NaN in a value must be rejected by validation (NaN checks vs Triton's no-NaN codegen)
    out = [torch.zeros(100, device=DEV)]
    v = torch.ones(10, device=DEV)
    v[3] = float("nan")
    try:
        torch.ops.fastlora.sparse_aggregate_(out, [torch.arange(10, device=DEV)], [v], torch.ones(1), True)
        R["aggregate_nan_rejected"] = False
    except ValueError as e:
        R["aggregate_nan_rejected"] = "non-finite" in str(e)


@section
def syncs():
    """Host<->device synchronisations per call (torch.cuda sync debug mode)."""
    import fastlora
    if DEV != "cuda":
        return
    x, W, b, A, B, gy = lora_inputs(256, 512, 512, 16, torch.bfloat16)
    d = torch.randn(1 << 20, device=DEV)
    out = [torch.zeros(1 << 20, device=DEV)]
    idx = [torch.randperm(1 << 20, device=DEV)[:1000].sort().values]
    val = [torch.randn(1000, device=DEV)]
    xs = torch.randn(64, 512, device=DEV, dtype=torch.bfloat16)
    As = [A.detach()] * 2
    Bs = [B.detach()] * 2
    ra = torch.randint(-1, 2, (64,), device=DEV)
    cases = {
        "lora_fwd_bwd": lambda: fastlora.lora_linear(x, W, b, A, B, 2.0, 0.05).backward(gy),
        "grouped_fwd": lambda: fastlora.lora_grouped_linear(xs, W, None, As, Bs, [1.0, 2.0], ra),
        "topk_sparsify": lambda: fastlora.topk_sparsify(d, density=0.01),
        "sparse_aggregate_validate": lambda: torch.ops.fastlora.sparse_aggregate_(out, idx, val, torch.ones(1), True),
        "sparse_aggregate_novalidate": lambda: torch.ops.fastlora.sparse_aggregate_(out, idx, val, torch.ones(1), False),
    }
    for name, fn in cases.items():
        fn(); sync()
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter("always")
            fn()
        torch.cuda.set_sync_debug_mode(0)
        R[name] = sum("ynchroniz" in str(w.message) for w in ws)


@section
def summary():
    """Prints the final block from the json files of every step."""
    lines = ["=" * 30 + " fastlora GPU check SUMMARY " + "=" * 30]
    steps = os.path.join(OUT, "steps.tsv")
    if os.path.exists(steps):
        for l in open(steps):
            n, st, sec = (l.rstrip("\n").split("\t") + ["", "", ""])[:3]
            lines.append(f"step {n:<22} {st:<20} {sec}s")
    tj = os.path.join(OUT, "tests.json")
    if os.path.exists(tj):
        t = json.load(open(tj))
        lines.append(f"tests: (`-k device` would select only {t.get('selected_by_-k_device')}) collected {t['collected']} passed {t['passed']} failed {t['failed']} error {t['error']} "
                     f"skipped {t['skipped']} not_run {t['not_run']} timed_out_shards {t['timed_out_shards']} ({t['seconds']}s)")
        lines += ["  " + f for f in t["failures"][:25]]
    for name in ("env", "dispatch", "compiled", "syncs", "topk", "aggregate", "lora", "probe_tf32_new_api",
                 "probe_grouped_r1024", "probe_big_lora", "probe_big_topk", "probe_cuda_graph", "probe_misc"):
        p = os.path.join(OUT, f"micro_{name}.json")
        if not os.path.exists(p):
            lines.append(f"[{name}] no result")
            continue
        d = json.load(open(p))
        lines.append(f"[{name}] {d.pop('status', '?')} ({d.pop('seconds', '?')}s)")
        for k, v in d.items():
            if "histogram" in k:
                v = ", ".join(f"{n}x{c}" for n, c in v.items())
            lines.append(f"  {k}: {v}")
    for dt in ("float32", "bfloat16"):
        p = os.path.join(OUT, f"bench_{dt}.log")
        if os.path.exists(p):
            rows = [l for l in open(p) if l.startswith("| M=") or l.startswith("# fastlora")]
            lines.append(f"[bench {dt}]")
            lines += ["  " + r.rstrip() for r in rows] or ["  (no rows: see bench log)"]
    lines.append("=" * 88)
    txt = "\n".join(lines)
    print(txt)
    open(os.path.join(OUT, "summary.txt"), "w").write(txt + "\n")


if __name__ == "__main__":
    name = sys.argv[1]
    if name != "summary":
        R.clear()
    globals()[name]()
