"""The float32 copies of half-precision base weights that the CPU LoRA kernels keep across calls
(csrc/cpu/weight_cache.cpp): reused only while the weight is unchanged, bounded by the limit,
dropped with their weights; results bitwise those of an uncached call."""
import gc
import os
import subprocess
import sys

import pytest
import torch

import fastlora
from fastlora import cpu

FWD, BWD = torch.ops.fastlora.lora_linear_fwd, torch.ops.fastlora.lora_linear_bwd
SEED = torch.tensor(3)


@pytest.fixture(autouse=True)
def fresh_cache():
    """Each test starts from an empty cache under the default limit and leaves it so; 2 threads,
    so that make()'s batches have row blocks for every thread (the backward's weight is then
    converted too: fewer rows stream the 16-bit weight instead)."""
    limit = cpu.weight_cache_limit()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    cpu.clear_weight_cache()
    yield
    cpu.set_weight_cache_limit(limit)
    cpu.clear_weight_cache()
    torch.set_num_threads(threads)


def make(dtype=torch.float16, m=160, k=48, n=36, r=4, seed=0):
    # float16 runs on float32 copies on every CPU above 128 rows (from 32 rows up where float16
    # GEMMs are not native; bfloat16 only without native bf16 GEMMs), so these shapes take the
    # cached path on any machine.
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return dict(x=mk(m, k), W=mk(n, k), b=mk(n), A=mk(r, k), B=mk(n, r), gy=mk(m, n))


def step(t, W=None):
    """Forward and backward (grad_x, whose base term reads the weight too)."""
    W = t["W"] if W is None else W
    y, xa = FWD(t["x"], W, t["b"], t["A"], t["B"], 0.5, 0.2, SEED, None)
    grads = BWD(t["gy"], t["x"], W, t["A"], t["B"], xa, 0.5, 0.2, SEED, [True, False, True])
    return [y, xa, *grads]


def uncached(t, W=None):
    """The float32 op on float32 copies, rounded once: what the half-precision op computes,
    without touching the cache (float32 weights are not cached)."""
    W = t["W"] if W is None else W
    f = {k: v.float() for k, v in t.items()}
    y, xa = FWD(f["x"], W.float(), f["b"], f["A"], f["B"], 0.5, 0.2, SEED, None)
    xa = xa.to(W.dtype)  # as the half-precision forward returns it
    grads = BWD(f["gy"], f["x"], W.float(), f["A"], f["B"], xa.float(), 0.5, 0.2, SEED, [True, False, True])
    return [y.to(W.dtype), xa, *(g.to(W.dtype) for g in grads)]


def assert_same(got, want):
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_copy_is_kept_and_reused_with_identical_results():
    t = make()
    previous = cpu.set_weight_cache_limit(0)
    want = step(t)
    assert want[0].dtype == torch.float16
    assert_same(want, uncached(t))
    cpu.set_weight_cache_limit(previous)
    assert cpu.weight_cache_usage() == (0, 0)
    assert_same(step(t), want)
    assert cpu.weight_cache_usage() == (1, t["W"].numel() * 4)
    assert_same(step(t), want)  # a hit
    assert cpu.weight_cache_usage() == (1, t["W"].numel() * 4)


@pytest.mark.parametrize("write", ["in_place", "view", "data_all", "reassign_data"])
def test_changed_weight_is_never_served_stale(write):
    t = make()
    step(t)
    assert cpu.weight_cache_usage()[0] == 1
    W = t["W"]
    with torch.no_grad():
        if write == "in_place":
            W.add_(1.0)  # version counter
        elif write == "view":
            W[0, 1] += 1.0  # through a view (same version counter), at a place not sampled
        elif write == "data_all":
            W.data.mul_(1.5)  # not counted: caught by the sampled values
        else:
            W.data = torch.randn_like(W)  # new storage
    assert_same(step(t), uncached(t))
    assert cpu.weight_cache_usage()[0] == 1  # the stale copy was replaced, not added to


def test_views_and_other_weights_get_their_own_copies():
    t = make()
    W2 = t["W"].clone()
    step(t)
    step(t, W2)
    assert cpu.weight_cache_usage() == (2, 2 * W2.numel() * 4)
    # rows of one storage at another offset: another weight
    big = torch.cat([t["W"], t["W"] * 2])
    lower = big[t["W"].shape[0]:]
    assert_same(step(t, lower), uncached(t, lower))
    assert cpu.weight_cache_usage()[0] == 3


def test_freed_weights_are_dropped():
    t = make()
    step(t)
    assert cpu.weight_cache_usage()[0] == 1
    W2 = t["W"].clone()
    del t["W"]
    gc.collect()
    assert cpu.weight_cache_usage()[0] == 1  # held until the next call
    step(t, W2)  # whichever weight it has
    assert cpu.weight_cache_usage() == (1, W2.numel() * 4)
    del W2
    gc.collect()
    cpu.clear_weight_cache()
    assert cpu.weight_cache_usage() == (0, 0)


def test_limit_bounds_the_cache_and_lowering_it_drops_copies():
    t, u = make(seed=1), make(seed=2)
    nbytes = t["W"].numel() * 4
    cpu.set_weight_cache_limit(nbytes)  # room for one copy
    step(t)
    assert_same(step(u), uncached(u))  # does not fit: converted per call, results unchanged
    assert cpu.weight_cache_usage() == (1, nbytes)
    assert cpu.set_weight_cache_limit(nbytes - 1) == nbytes
    assert cpu.weight_cache_usage() == (0, 0)
    cpu.set_weight_cache_limit(0)
    step(t)
    assert cpu.weight_cache_usage() == (0, 0)
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="weight cache limit"):
            cpu.set_weight_cache_limit(bad)


def test_weights_not_cached_still_compute_correctly():
    t = make()
    W_t = t["W"].t().contiguous().t()  # not contiguous
    assert_same(step(t, W_t), uncached(t, W_t))
    with torch.inference_mode():
        W_inf = t["W"].clone()  # no version counter
    assert_same(step(t, W_inf), uncached(t, W_inf))
    assert cpu.weight_cache_usage() == (0, 0)


def test_float32_and_decode_sized_steps_keep_no_copy():
    t32 = {k: v.float() for k, v in make().items()}
    step(t32)  # float32: nothing to convert
    step(make(m=8))  # decode-sized float16 reads the float16 weight as it is
    assert cpu.weight_cache_usage() == (0, 0)


@pytest.mark.parametrize("m", [64, 128])
def test_float16_batches_up_to_128_rows_use_the_cache_only_without_native_float16(m):
    # With native float16 GEMMs (AVX512-FP16) such batches run their base products on the float16
    # weight as it is: no float32 copy is made. Elsewhere they run on the cached float32 copy.
    t = make(m=m)
    want = uncached(t)
    got = step(t)
    if cpu.native_fp16_matmul():
        assert cpu.weight_cache_usage() == (0, 0)
        # Other roundings than the float32 plan's one per output: a term is rounded to float16
        # before the other is added (the base product in the forward, the LoRA term in dX) and
        # the sum rounded again. Each rounding is within float16's unit roundoff 2^-11 of the
        # largest output, so the two plans differ by at most three of them.
        for a, b in zip(got, want):
            scale = b.abs().max().item() if b.numel() else 0.0
            torch.testing.assert_close(a, b, rtol=0, atol=3 * 2 ** -11 * scale)
    else:
        assert_same(got, want)
        assert cpu.weight_cache_usage() == (1, t["W"].numel() * 4)


def test_bfloat16_without_native_gemms_uses_the_cache():
    best = fastlora.use_cpu_isa("auto")
    try:
        fastlora.use_cpu_isa("avx2")
        assert not cpu.native_bf16_matmul()
        t = make(torch.bfloat16)
        want = uncached(t)
        assert_same(step(t), want)
        assert_same(step(t), want)
        assert cpu.weight_cache_usage() == (1, t["W"].numel() * 4)
    finally:
        fastlora.use_cpu_isa(best)


def test_peft_merge_and_unmerge_drop_the_copies():
    """PEFT's merge writes the base weight through .data and a small delta leaves most bfloat16
    values (and possibly every sampled one) as they were: the drop-in layer clears the cache."""
    from peft import LoraConfig, get_peft_model

    import fastlora.peft

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 36)).half()
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
    fastlora.peft.patch(model)
    x = torch.randn(160, 48).half()  # above 128 rows: float16 runs on the cached float32 copy
    model(x)
    assert cpu.weight_cache_usage()[0] == 1
    model.base_model.model[0].merge()
    assert cpu.weight_cache_usage() == (0, 0)
    model(x)  # merged: the base layer alone
    model.base_model.model[0].unmerge()
    assert cpu.weight_cache_usage() == (0, 0)
    layer = model.base_model.model[0]
    y = model(x)
    previous = cpu.set_weight_cache_limit(0)
    try:
        assert torch.equal(y, model(x))
    finally:
        cpu.set_weight_cache_limit(previous)
    assert layer.fastlora_calls > 0


def run_python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_environment_sets_the_limit_and_rejects_bad_values():
    res = run_python("import fastlora; print(fastlora.cpu.weight_cache_limit())", FASTLORA_WEIGHT_CACHE_MB="3")
    assert res.returncode == 0, res.stderr[-3000:]
    assert int(res.stdout) == 3 << 20
    res = run_python("import fastlora; print(fastlora.cpu.weight_cache_limit())", FASTLORA_WEIGHT_CACHE_MB="0")
    assert int(res.stdout) == 0
    res = run_python("import fastlora", FASTLORA_WEIGHT_CACHE_MB="lots")
    assert res.returncode != 0 and "FASTLORA_WEIGHT_CACHE_MB='lots'" in res.stderr


def test_default_limit_is_a_quarter_of_memory():
    # unset, or set empty (as FASTLORA_CPU_ISA): the default
    res = run_python("import fastlora; print(fastlora.cpu.weight_cache_limit())", FASTLORA_WEIGHT_CACHE_MB="")
    assert res.returncode == 0, res.stderr[-3000:]
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = open(path).read().strip()
        except OSError:
            continue
        if value.isdigit() and 0 < int(value) < memory:
            memory = int(value)
    assert int(res.stdout) == memory // 4
