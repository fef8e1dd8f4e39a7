"""Targets shared by several benchmark files."""
import json
import os
import subprocess
import sys
import textwrap

import torch


def assert_emulated_bf16_targets(t_fastlora, t_peft, t_fastlora_float32, info, min_speedup_converting):
    """Targets of a bfloat16 step on a CPU without native bf16 GEMMs, where fastlora runs float32
    kernels on float32 copies: within 1.5x of fastlora's float32 step, and a speed-up over PEFT
    that depends on how the peers' bf16 GEMMs run there, read off the peer itself. With AVX2
    only ATen emulates them element by element (a PEFT step 100-300x float32's, measured on an
    AMD EPYC and on a Xeon under the AVX2 caps): >= 10x PEFT. An AVX-512 CPU without AVX512-BF16
    (Ice Lake, Cascade Lake) converts to float32 in AVX-512 inside oneDNN and runs them at ~1.5-5x
    float32's time (measured on an Ice Lake Xeon): ``min_speedup_converting`` there. The line
    between the two: a PEFT step at 15x fastlora's float32 step."""
    assert t_fastlora <= 1.5 * t_fastlora_float32, info
    if t_peft >= 15 * t_fastlora_float32:
        assert t_peft >= 10 * t_fastlora, info
    else:
        assert t_peft >= min_speedup_converting * t_fastlora, info


# Run by interleaved_medians_in_fresh_process: the benchmarks folder on sys.path, the caller's
# thread count, then the setup (which must define `fns`, name -> callable) and the timing.
_FRESH_PROCESS_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    sys.path.insert(0, {bench_dir!r})
    torch.set_num_threads({threads})
    from fastlora.bench import interleaved_medians
    {setup}
    t = interleaved_medians({{k: fns[k] for k in {names!r}}}, min_rounds=5, budget_s={budget_s!r})
    print(json.dumps(t))
""")


def interleaved_medians_in_fresh_process(setup: str, names, budget_s=10.0) -> dict:
    """interleaved_medians of fns[name] for each name, measured in a fresh Python process whose
    ``setup`` code (one line, or several joined by "; ") defines ``fns``.

    For targets stated against clone() of a large tensor: clone() pays for fresh memory (64 MiB
    at 16M float32: page faults, 10-24 ms on an Ice Lake Xeon) only while the allocator has no
    freed block that size to recycle (~5 ms then, a plain copy), and that depends on what the
    process ran before. Measured in one pytest process after the other benchmark files, clone()
    flipped between the two from one case to the next, which moved every ratio to it 3x."""
    script = _FRESH_PROCESS_SCRIPT.format(bench_dir=os.path.dirname(os.path.abspath(__file__)),
                                          threads=torch.get_num_threads(), setup=setup, names=tuple(names),
                                          budget_s=budget_s)
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])
