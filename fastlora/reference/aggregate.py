"""Reference of ``fastlora::sparse_aggregate_``."""
from __future__ import annotations

import torch


def sparse_aggregate_(out, indices, values, weights, validate=True):
    """Reference of ``fastlora::sparse_aggregate_``: for each client i in order,
    out[indices[i]] += float32(weights[i]) * float32(values[i]) over the float32 tensors of
    ``out`` laid end to end (each product and sum rounded in float32)."""
    flat = torch.cat([o.reshape(-1) for o in out]) if out else torch.zeros(0)
    w = weights.to(torch.float32)
    for i, (idx, val) in enumerate(zip(indices, values)):
        flat[idx] = flat[idx] + w[i] * val.to(torch.float32)
    offset = 0
    for o in out:
        o.copy_(flat[offset:offset + o.numel()].view(o.shape))
        offset += o.numel()
