"""fastlora's counter-based dropout, the reference every backend reproduces bit for bit.

Dropout mask (shared bit-for-bit by the reference, the C++ kernel and the Triton kernel, so
that a mask can be regenerated in backward instead of stored):

    seed (int64) -> seed_lo = seed & 0xFFFFFFFF, seed_hi = (seed >> 32) & 0xFFFFFFFF
    for row i, column j of the 2-D (M, K) input (uint32 arithmetic, wrapping):
        h = fmix32(i ^ seed_lo)
        u = fmix32((h + j * 0x9E3779B9) ^ seed_hi)
        keep(i, j) = (u >> 8) >= threshold,  threshold = floor(p * 2**24 + 0.5)
    kept values are multiplied by 1 / (1 - p) (computed in float64, applied in float32, or
    float64 for float64 inputs).

fmix32 is MurmurHash3's 32-bit finaliser. A counter-based hash (rather than a stateful
generator) lets every backend produce the same mask in any order, tile or thread split.
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B9
FMIX_C1 = 0x85EBCA6B
FMIX_C2 = 0xC2B2AE35


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    # (h * c) mod 2**32 on int64 tensors without signed overflow: split c into 16-bit halves
    # so that every intermediate product stays below 2**49.
    lo, hi = c & 0xFFFF, c >> 16
    return (h * lo + (((h * hi) & 0xFFFF) << 16)) & _M32


def fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, FMIX_C1)
    h = h ^ (h >> 13)
    h = _mul32(h, FMIX_C2)
    return h ^ (h >> 16)


def dropout_threshold(p: float) -> int:
    """Integer keep-threshold on the top 24 bits of the hash (see module docstring)."""
    return min(int(p * 16777216.0 + 0.5), 1 << 24)


def dropout_scale(p: float) -> float:
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def dropout_keep_mask(rows: int, cols: int, p: float, seed: int, device=None) -> torch.Tensor:
    """Boolean (rows, cols) keep-mask of fastlora's counter-based dropout."""
    seed = int(seed)
    seed_lo, seed_hi = seed & _M32, (seed >> 32) & _M32
    i = torch.arange(rows, dtype=torch.int64, device=device).unsqueeze(1)
    j = torch.arange(cols, dtype=torch.int64, device=device).unsqueeze(0)
    h = fmix32(i ^ seed_lo)
    u = fmix32(((h + _mul32(j, GOLDEN32)) & _M32) ^ seed_hi)
    return (u >> 8) >= dropout_threshold(p)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the references compute in: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dropout(x2d: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """fastlora's dropout of a 2-D tensor: x * keep / (1 - p), rounded once to x's dtype."""
    if p <= 0.0:
        return x2d
    keep = dropout_keep_mask(x2d.shape[0], x2d.shape[1], p, seed, device=x2d.device)
    cdt = compute_dtype(x2d.dtype)
    scale = torch.tensor(dropout_scale(p), dtype=torch.float64).to(cdt).item()
    return (x2d.to(cdt) * keep.to(cdt) * scale).to(x2d.dtype)
