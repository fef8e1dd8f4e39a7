"""Reference of the ``lora_grouped_linear`` family (mixed-adapter batches)."""
from __future__ import annotations

import torch


def check_grouped_values(ranks, row_adapter, r_max):
    """Range checks of ``fastlora::lora_grouped_linear``'s metadata values (the C++ op checks
    shapes, dtypes and devices): ranks in [0, r_max], row_adapter in [-1, K)."""
    fn = "fastlora.lora_grouped_linear"
    K = ranks.shape[0]
    rk = ranks.cpu()
    bad = ((rk < 0) | (rk > r_max)).nonzero()
    if bad.numel():
        k = int(bad[0, 0])
        raise ValueError(f"{fn}: ranks[{k}] = {int(rk[k])} is out of range [0, r_max={r_max}]")
    ra = row_adapter.cpu()
    bad = ((ra < -1) | (ra >= K)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(f"{fn}: row_adapter[{i}] = {int(ra[i])} is out of range [-1, num_adapters={K}) "
                         "(-1 = base model only)")


def _adapter_groups(ranks, row_adapter, device):
    """(adapter k, its rank, its row indices) for every adapter with rows and rank > 0."""
    ra = row_adapter.to(device)
    for k in range(ranks.numel()):
        r = int(ranks[k])
        idx = (ra == k).nonzero().squeeze(1)
        if r and idx.numel():
            yield k, r, idx


def lora_grouped_linear(x2d, weight, bias, lora_A, lora_B, scalings, ranks, row_adapter):
    """Reference of ``fastlora::lora_grouped_linear`` (PEFT's mixed-batch forward): for each row
    i with a = row_adapter[i] >= 0, y[i] = base(x[i]) + scalings[a] * B_a[:, :r_a](A_a[:r_a](x[i]))
    with r_a = ranks[a]; rows with a = -1 get the base layer only. Roundings follow PEFT's
    ``_mixed_batch_forward``: base output, shrink, expand and scaled LoRA branch each rounded to
    the working dtype before the final add."""
    check_grouped_values(ranks, row_adapter, lora_A.shape[1])
    base = torch.nn.functional.linear(x2d, weight, bias)
    y = base.clone()
    for k, r, idx in _adapter_groups(ranks, row_adapter, x2d.device):
        xa = torch.nn.functional.linear(x2d[idx], lora_A[k, :r])
        lora = torch.nn.functional.linear(xa, lora_B[k, :, :r]) * float(scalings[k])
        y[idx] = base[idx] + lora
    return y


def lora_grouped_linear_backward(grad_y, x2d, weight, lora_A, lora_B, scalings, ranks, row_adapter,
                                 need_x=True, need_weight=False, need_bias=False):
    """Gradients of ``lora_grouped_linear``: (grad_x, grad_weight, grad_bias, grad_lora_A,
    grad_lora_B); grad_lora_A / grad_lora_B are zero past each adapter's rank and for adapters
    with no rows; entries not requested are empty tensors."""
    grad_A = torch.zeros_like(lora_A)
    grad_B = torch.zeros_like(lora_B)
    grad_x = grad_y @ weight if need_x else grad_y.new_empty(0)
    for k, r, idx in _adapter_groups(ranks, row_adapter, x2d.device):
        s = float(scalings[k])
        gy, xk = grad_y[idx], x2d[idx]
        A, B = lora_A[k, :r], lora_B[k, :, :r]
        g = (gy @ B) * s  # (n, r)
        grad_A[k, :r] = g.t() @ xk
        grad_B[k, :, :r] = (gy.t() @ (xk @ A.t())) * s
        if need_x:
            grad_x[idx] += g @ A
    grad_w = grad_y.t() @ x2d if need_weight else grad_y.new_empty(0)
    grad_b = grad_y.sum(0) if need_bias else grad_y.new_empty(0)
    return grad_x, grad_w, grad_b, grad_A, grad_B
