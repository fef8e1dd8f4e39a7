"""References of the low-rank family (``svd_factored``, ``lowrank_truncate``, ``rsvd``, ``rsvd_implicit``)."""
from __future__ import annotations

import torch


def _lowrank_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def factored_sum_dense(Bs, As, weights, sparse_indices=None, sparse_values=None, m=None, dtype=None):
    """The materialised ``sum_i weights[i] * Bs[i] @ As[i] (+ S)`` (S: sparse_values at the
    row-major flat positions sparse_indices) in the low-rank family's compute dtype."""
    dtype = dtype or _lowrank_dtype(*Bs, *As)
    m = Bs[0].shape[0] if Bs else m
    n = As[0].shape[1]
    out = torch.zeros(m, n, dtype=dtype, device=Bs[0].device)
    for w, b, a in zip(weights.to(dtype).tolist(), Bs, As):
        out += w * (b.to(dtype) @ a.to(dtype))
    if sparse_indices is not None and sparse_indices.numel():
        out.view(-1).index_add_(0, sparse_indices, sparse_values.to(dtype))
    return out


def svd_factored(Bs, As, weights):
    """Reference of ``fastlora::svd_factored``: thin SVD of the materialised weighted sum,
    truncated to k = min(total rank, m, n) (the trailing singular values are zero)."""
    M = factored_sum_dense(Bs, As, weights)
    k = min(sum(a.shape[0] for a in As), *M.shape)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :k], S[:k], Vh[:k]


def lowrank_truncate(Bs, As, weights, rank):
    """Reference of ``fastlora::lowrank_truncate``: best rank-``rank`` factors (sqrt(S) on each
    side, zero-padded past the total rank) and the relative Frobenius error of the truncation."""
    U, S, Vh = svd_factored(Bs, As, weights)
    kk = min(rank, S.shape[0])
    sq = S[:kk].sqrt()
    B = torch.zeros(U.shape[0], rank, dtype=U.dtype)
    A = torch.zeros(rank, Vh.shape[1], dtype=U.dtype)
    B[:, :kk] = U[:, :kk] * sq
    A[:kk] = sq[:, None] * Vh[:kk]
    total = (S * S).sum()
    rel = ((S[kk:] * S[kk:]).sum() / total).sqrt() if total > 0 else torch.zeros((), dtype=U.dtype)
    return A, B, rel


def rsvd(A, omega, rank, n_iter, sketch_dtype=None):
    """Reference of ``fastlora::rsvd`` (Halko-Martinsson-Tropp with QR after every product,
    ``n_iter`` power iterations or, for None, one and, where the spectrum is flat, one more
    product with A^T and a projection on the row space it spans (a second iteration where it
    is very flat);
    with ``sketch_dtype``, every product with A formed from A and the basis in that dtype, unless
    that dtype's rounding of A would dominate the result's error).
    The kernel's mixed-precision path may orthonormalise by Cholesky-QR instead of Householder:
    the same spans, different bases, so it agrees with this to the sketch dtype's rounding."""
    dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    if sketch_dtype is None:
        A = A.to(dtype)
        return _hmt(lambda X: A @ X, lambda Y: A.mT @ Y, omega.to(dtype), rank, n_iter)
    a = A.to(sketch_dtype)
    out = _hmt(lambda X: (a @ X.to(sketch_dtype)).to(dtype), lambda Y: (Y.to(sketch_dtype).mT @ a).mT.to(dtype),
               omega.to(dtype), rank, n_iter)
    # When the rounding of A to the sketch dtype (eps ||A||_F) exceeds an eighth of the error the
    # result leaves on that copy, it would dominate: the call is computed in float32 instead.
    norm2 = a.double().square().sum(dim=(-2, -1))
    tail2 = (norm2 - out[1].double().square().sum(-1)).clamp_min(0)
    if bool((norm2 * 64 * torch.finfo(sketch_dtype).eps ** 2 > tail2).any()):
        return rsvd(A, omega, rank, n_iter)
    return out


def rsvd_implicit(Bs, As, weights, sparse_indices, sparse_values, omega, m, rank, n_iter):
    """Reference of ``fastlora::rsvd_implicit``: ``rsvd`` of the materialised operator."""
    dtype = _lowrank_dtype(omega, sparse_values, *Bs, *As)
    if Bs:
        M = factored_sum_dense(Bs, As, weights, sparse_indices, sparse_values, dtype=dtype)
    else:
        M = torch.zeros(m, omega.shape[0], dtype=dtype)
        M.view(-1).index_add_(0, sparse_indices, sparse_values.to(dtype))
    return rsvd(M, omega.to(dtype), rank, n_iter)


# n_iter None (adaptive): one power iteration; when the sketch after it estimates
# sigma_l / sigma_rank above FLAT_SKETCH (a flat spectrum; see the kernel's hmt and
# sketch_flatness) one more product with A^T and the result projected on the row space that
# product spans; above VERY_FLAT_SKETCH a second power iteration; both on the sketch's leading
# rank + (l - rank) // 4 directions (the kernel's leading_directions).
FLAT_SKETCH = 0.62
VERY_FLAT_SKETCH = 0.76


def _hmt(apply, apply_t, omega, rank, n_iter):
    Y = apply(omega)
    for it in range(2 if n_iter is None else n_iter):
        if n_iter is None and it == 1:
            sv = torch.linalg.svdvals(Y)
            ratio = sv[..., -1] / sv[..., rank - 1]
            worst = float("nan") if bool(ratio.isnan().any()) else float(ratio.max())
            if worst <= FLAT_SKETCH:
                break
            # The passes after the test run on Y's rank + (l - rank) // 4 leading directions.
            basis = torch.linalg.svd(Y, full_matrices=False).U[..., :rank + (Y.shape[-1] - rank) // 4]
            if worst <= VERY_FLAT_SKETCH:
                P = torch.linalg.qr(apply_t(basis)).Q   # A ~ (A P) P^T
                U, S, Vh = torch.linalg.svd(apply(P), full_matrices=False)
                return U[..., :rank], S[..., :rank], Vh[..., :rank, :] @ P.mT
            Y = apply(torch.linalg.qr(apply_t(basis)).Q)
            continue
        Y = apply(torch.linalg.qr(apply_t(torch.linalg.qr(Y).Q)).Q)
    Q = torch.linalg.qr(Y).Q
    Ub, S, Vh = torch.linalg.svd(apply_t(Q).mT, full_matrices=False)
    return Q @ Ub[..., :rank], S[..., :rank], Vh[..., :rank, :]
