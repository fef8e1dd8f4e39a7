"""The checkout shadows nothing, and the CPU instruction-set switch (FASTLORA_CPU_ISA) works.

Subprocesses, because both are about what a fresh interpreter sees: its sys.path and its
environment at import time."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import fastlora
from fastlora import reference
from tolerance import assert_close_to_truth

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_python(code, cwd=ROOT, **env):
    full_env = {k: v for k, v in os.environ.items() if k != "FASTLORA_CPU_ISA"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=300)


# --- nothing in the checkout shadows an installed package ---------------------------------------

def test_checkout_root_first_on_sys_path_shadows_no_installed_package():
    # transformers >= 5.25 imports Hugging Face's top-level `kernels` package; the checkout's
    # kernels/ folder (Triton sources) must not be found in its place, whatever sys.path says.
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
            "import importlib.util, transformers.modeling_utils, peft\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print(spec.origin if spec else None)\n")
    res = run_python(code)
    assert res.returncode == 0, res.stderr[-3000:]
    origin = res.stdout.strip().splitlines()[-1]
    assert not origin.startswith(str(ROOT / "kernels")), f"`import kernels` from the checkout root finds {origin}"


def test_kernels_folder_is_not_a_package():
    # A regular package at the root would win over any installed namespace or package.
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_triton_sources_import_as_fastlora_kernels_from_anywhere(tmp_path):
    res = run_python("import fastlora.kernels._common as m; print(m.__file__)", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith(os.path.join("kernels", "_common.py"))


# --- FASTLORA_CPU_ISA ------------------------------------------------------------------------------

def test_cpu_isa_is_a_known_build():
    assert fastlora.cpu_isa() in ("amx", "avx512", "avx2", "baseline")


def test_amx_build_only_where_the_cpu_has_it():
    """The amx build runs only where AMX-BF16 is usable, and capping at avx512 turns it off while
    bfloat16 products stay native (vdpbf16ps)."""
    cpuinfo = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    best = fastlora.use_cpu_isa("auto")
    if best == "amx":
        assert "amx_bf16" in cpuinfo
    res = run_python("import fastlora; print(fastlora.cpu_isa(), fastlora.cpu.native_bf16_matmul())",
                     FASTLORA_CPU_ISA="avx512")
    assert res.returncode == 0, res.stderr[-3000:]
    used, native_bf16 = res.stdout.split()
    assert used == ("avx512" if best in ("amx", "avx512") else best)
    assert native_bf16 == str(best in ("amx", "avx512") and ("avx512_bf16" in cpuinfo or "amx_bf16" in cpuinfo))


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_environment_caps_the_build(isa):
    res = run_python("import fastlora; print(fastlora.cpu_isa(), fastlora.cpu.native_bf16_matmul())",
                     FASTLORA_CPU_ISA=isa)
    assert res.returncode == 0, res.stderr[-3000:]
    used, native_bf16 = res.stdout.split()
    best = fastlora.cpu.ISA_LEVELS[fastlora.use_cpu_isa("auto")]
    assert fastlora.cpu.ISA_LEVELS[used] == min(best, fastlora.cpu.ISA_LEVELS[isa])
    assert native_bf16 == "False"  # capped below AVX-512: bf16 work is routed to float32


def test_environment_rejects_unknown_value():
    res = run_python("import fastlora", FASTLORA_CPU_ISA="avx1024")
    assert res.returncode != 0
    assert "FASTLORA_CPU_ISA='avx1024'" in res.stderr and "avx2" in res.stderr


def test_use_cpu_isa_switches_and_rejects_unknown():
    best = fastlora.use_cpu_isa("auto")
    try:
        assert fastlora.use_cpu_isa("baseline") == "baseline" == fastlora.cpu_isa()
        with pytest.raises(ValueError, match="unknown CPU instruction set"):
            fastlora.use_cpu_isa("sse9")
        assert fastlora.cpu_isa() == "baseline"
    finally:
        assert fastlora.use_cpu_isa("auto") == best


def test_every_build_computes_the_lora_linear():
    # The whole LoRA suite runs under each build in CI (FASTLORA_CPU_ISA); this is the quick
    # in-process check that every build the machine can run keeps the result.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(70, 96, generator=g)
    W, A, B = (torch.randn(*s, generator=g) for s in ((80, 96), (8, 96), (80, 8)))
    args64 = [t.double() for t in (x, W)] + [None] + [t.double() for t in (A, B)]
    truth = reference.lora_linear(*args64, 0.5, 0.0, 0)
    ref32 = reference.lora_linear(x, W, None, A, B, 0.5, 0.0, 0)
    best = fastlora.use_cpu_isa("auto")
    try:
        for isa in ("baseline", "avx2", "avx512"):
            if fastlora.use_cpu_isa(isa) != isa:
                continue
            y = fastlora.lora_linear(x, W, None, A, B, 0.5, 0.0)
            assert_close_to_truth(y, ref32, truth, name=isa)
    finally:
        fastlora.use_cpu_isa(best)


def test_bench_isa_flag_runs_that_build(monkeypatch, capsys):
    from fastlora import bench
    from fastlora.cli import main

    monkeypatch.setattr(bench, "LORA_LINEAR_CASES", [(8, 32, 24, 4, 0.1)])
    best = fastlora.use_cpu_isa("auto")
    try:
        assert main(["bench", "--isa", "baseline", "--budget", "0"]) == 0
        out = capsys.readouterr().out
        assert "fastlora CPU kernels baseline, no native bf16" in out
        assert "| M=8 in=32 out=24 r=4 p=0.1 |" in out
    finally:
        fastlora.use_cpu_isa(best)


def test_bench_case_flag_times_the_given_shapes(capsys):
    from fastlora.cli import main

    assert main(["bench", "--case", "3,20,12,2,0.25", "--case", "5,16,8,4,0", "--budget", "0"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| M=")]
    assert [r.split(" |")[0] for r in rows] == ["| M=3 in=20 out=12 r=2 p=0.25", "| M=5 in=16 out=8 r=4 p=0.0"]
    for bad, says in (("3,20,12,2", "expected M,IN,OUT,R,P"), ("3,20,12,2,x", "expected M,IN,OUT,R,P"),
                      ("0,20,12,2,0.1", "must be >= 1"), ("3,20,12,2,1.0", "0 <= P < 1")):
        with pytest.raises(SystemExit):
            main(["bench", "--case", bad])
        err = capsys.readouterr().err
        assert "argument --case" in err and says in err and repr(bad) in err


def test_bench_reports_the_spread_of_per_round_ratios(monkeypatch, capsys):
    """The fwd+bwd ratios come with the quartiles of their round-by-round values, which a drift of
    the machine's speed between rounds does not move (both calls of a round run back to back)."""
    from fastlora import bench
    from fastlora.cli import main

    # Rounds on a machine that slows 10x halfway through: fastlora is 1.2x base in every round.
    base = [1.0, 1.0, 1.0, 10.0, 10.0, 10.0]
    q1, q2, q3 = bench.paired_ratio_quartiles([1.2 * t for t in base], base)
    assert q1 == pytest.approx(1.2) and q2 == pytest.approx(1.2) and q3 == pytest.approx(1.2)
    assert bench.paired_ratio_quartiles([3.0, 1.0, 2.0, 4.0, 5.0], [1.0] * 5) == (2.0, 3.0, 4.0)
    assert bench.paired_ratio_quartiles([3.0], [2.0]) == (1.5, 1.5, 1.5)
    # Paired by round (4, 2 and 1 here), not the series' own quartiles or sorted values divided.
    assert bench.paired_ratio_quartiles([4.0, 20.0, 3.0], [1.0, 10.0, 3.0]) == (1.5, 2.0, 3.0)

    monkeypatch.setattr(bench, "LORA_LINEAR_CASES", [(8, 32, 24, 4, 0.1)])
    assert main(["bench", "--budget", "0"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| M=8"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    overhead, speedup = cells[4], cells[5]
    lo, hi = (float(v.rstrip("%")) for v in overhead.split("[")[1].rstrip("]").split(","))
    assert overhead.split(" [")[0].endswith("%") and lo <= hi
    slo, shi = (float(v) for v in speedup.split("[")[1].rstrip("]").split(","))
    assert speedup.split(" [")[0].endswith("x") and 0 < slo <= shi


def test_bench_float32_adapters_on_a_bfloat16_base(monkeypatch, capsys):
    """--adapter-dtype float32 times PEFT's default for half-precision models: the PEFT layer's
    adapters and the ones fastlora gets are float32, x and the base layer bfloat16."""
    from fastlora import bench
    from fastlora.cli import main

    case = bench.LoraLinearCase(8, 32, 24, 4, 0.1, dtype=torch.bfloat16, adapter_dtype=torch.float32)
    case.build()
    assert [p.dtype for p in case.params] == [torch.bfloat16] * 2 + [torch.float32] * 2
    assert case.x.dtype == torch.bfloat16
    monkeypatch.setattr(bench, "LORA_LINEAR_CASES", [(8, 32, 24, 4, 0.1)])
    assert main(["bench", "--dtype", "bfloat16", "--adapter-dtype", "float32", "--budget", "0"]) == 0
    out = capsys.readouterr().out
    assert ", bfloat16, float32 adapters" in out and "| M=8 in=32 out=24 r=4 p=0.1 |" in out
