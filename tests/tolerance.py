"""Tolerances derived from the reference's own error (flash-attention style).

truth   = reference computed in float64
ref_err = max |reference computed in the test dtype - truth|
pass if   max |kernel output - truth| <= 2 * ref_err + floor

floor is a few units in the last place of the output's scale in the test dtype, so that a
reference that happens to be exact does not demand bit-exactness from a kernel that sums in a
different order.
"""
import torch

FLOOR_ULPS = 4


def assert_close_to_truth(out, ref_out, truth, name=""):
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    assert out.dtype == ref_out.dtype, f"{name}: dtype {out.dtype} != {ref_out.dtype}"
    if truth.numel() == 0:
        return
    truth = truth.double()
    err = (out.double() - truth).abs().max().item()
    ref_err = (ref_out.double() - truth).abs().max().item()
    floor = FLOOR_ULPS * torch.finfo(out.dtype).eps * max(truth.abs().max().item(), 1e-30)
    bound = 2 * ref_err + floor
    assert err <= bound, (
        f"{name}: max error {err:.3g} vs float64 truth exceeds 2 x reference error "
        f"{ref_err:.3g} + floor {floor:.3g} ({out.dtype})")
