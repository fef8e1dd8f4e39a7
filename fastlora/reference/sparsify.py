"""Reference of ``fastlora::topk_sparsify`` (top-k with error feedback)."""
from __future__ import annotations

import torch


def topk_sparsify(deltas, residuals, k, approx=False, value_dtype=torch.float32):
    """Reference of ``fastlora::topk_sparsify`` over tensors laid end to end (flat order).

    v = delta (as float32) + residual (float32, or 0 without residuals); keeps the k entries
    of largest |v|, ties broken by the lowest flat index (exactly k; ``approx`` selects the
    same set here: any approximate kernel must stay within +-5% of k). Returns (indices
    int64 sorted ascending, values rounded to value_dtype, new residuals as a list of float32
    tensors) where residual_new = v - float32(value) at kept entries and v elsewhere.
    """
    flat = [d.detach().reshape(-1).float() for d in deltas]
    if residuals:
        flat = [f + r.detach().reshape(-1) for f, r in zip(flat, residuals)]
    v = torch.cat(flat) if flat else torch.zeros(0)
    n = v.numel()
    k = max(0, min(int(k), n))
    # Stable descending sort: among equal |v| the lower index comes first.
    order = torch.sort(v.abs(), descending=True, stable=True).indices
    idx = torch.sort(order[:k]).values
    values = v[idx].to(value_dtype)
    _check_values_fit(v[idx], values, idx)
    res = v.clone()
    res[idx] = v[idx] - values.float()
    sizes = [d.numel() for d in deltas]
    new_res = [part.view(d.shape) for part, d in zip(res.split(sizes), deltas)]
    return idx, values, new_res


def _check_values_fit(kept, values, idx):
    """Raises ValueError (before any residual is written) when a kept value overflows the travel
    dtype: it would travel as inf and leave -inf in the residual."""
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        j = int(bad.nonzero()[0])
        raise ValueError(f"topk_sparsify: the kept value {float(kept[j])} (flat index {int(idx[j])}) overflows "
                         f"{values.dtype} (largest finite {torch.finfo(values.dtype).max}); nothing was changed, the "
                         f"residual included: send float32 values or scale the update")
