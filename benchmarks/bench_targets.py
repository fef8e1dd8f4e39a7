"""Targets shared by several benchmark files."""


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
