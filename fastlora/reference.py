"""Pure-PyTorch references for every fastlora op.

These functions define the semantics. Tests compare every kernel (C++ CPU, Triton, CUDA)
against them, and they are the fallback kernel on devices that have no dedicated one.
They favour clarity over speed and may allocate freely.

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


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dropout(x2d: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """fastlora's dropout of a 2-D tensor: x * keep / (1 - p), rounded once to x's dtype."""
    if p <= 0.0:
        return x2d
    keep = dropout_keep_mask(x2d.shape[0], x2d.shape[1], p, seed, device=x2d.device)
    cdt = _compute_dtype(x2d.dtype)
    scale = torch.tensor(dropout_scale(p), dtype=torch.float64).to(cdt).item()
    return (x2d.to(cdt) * keep.to(cdt) * scale).to(x2d.dtype)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, seed=0,
                lora_B_bias=None):
    """PEFT's LoRA Linear: base(x) + scaling * lora_B(lora_A(dropout(x))).

    ``x`` may have any leading dims. ``seed`` is the dropout seed (ignored when dropout_p=0).
    Intermediate roundings follow PEFT: base output, LoRA branch and scaled LoRA branch are
    each rounded to their working dtype before the final add. Adapters in another dtype than x
    (float32 adapters on a float16 / bfloat16 model, PEFT's default) run the branch in their
    dtype on x cast to it, the sum in that dtype, cast back to x's dtype, as PEFT does.
    """
    y, _ = lora_linear_with_shrink(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, scaling,
                                   dropout_p, seed, lora_B_bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def lora_linear_with_shrink(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed,
                            lora_B_bias=None):
    """Reference of the op ``fastlora::lora_linear_fwd``: returns (y, xa) for 2-D x, where
    xa = dropout(x) @ lora_A.T (in the adapters' dtype) is the M x r activation saved for
    backward."""
    base = torch.nn.functional.linear(x2d, weight, bias)
    xa = torch.nn.functional.linear(dropout(x2d.to(lora_A.dtype), dropout_p, seed), lora_A)
    lora = torch.nn.functional.linear(xa, lora_B, lora_B_bias) * scaling
    return (base + lora).to(x2d.dtype), xa


def lora_linear_backward(grad_y, x2d, weight, lora_A, lora_B, xa, scaling, dropout_p, seed,
                         need_x=True, need_weight=False, need_bias=False):
    """Reference of ``fastlora::lora_linear_bwd``: (grad_x, grad_weight, grad_bias,
    grad_lora_A, grad_lora_B); entries not requested are empty tensors. The gradient of
    lora_B_bias is ``scaling * grad_bias`` (summed in the adapters' dtype). With adapters in
    another dtype than x, the branch's gradients are computed in the adapters' dtype on
    grad_y cast to it and the branch's term of grad_x is rounded to x's dtype before it is
    added, as autograd does through PEFT's casts."""
    gy = grad_y.to(lora_A.dtype)
    g = (gy @ lora_B) * scaling  # (M, r), shared by grad_A and grad_x
    x_drop = dropout(x2d.to(lora_A.dtype), dropout_p, seed)
    grad_A = g.t() @ x_drop
    grad_B = (gy.t() @ xa) * scaling
    grad_x = grad_y.new_empty(0)
    if need_x:
        lora_in = g @ lora_A
        if dropout_p > 0.0:
            lora_in = dropout(lora_in, dropout_p, seed)
        grad_x = grad_y @ weight + lora_in.to(grad_y.dtype)
    grad_w = grad_y.t() @ x2d if need_weight else grad_y.new_empty(0)
    grad_b = grad_y.sum(0) if need_bias else grad_y.new_empty(0)
    return grad_x, grad_w, grad_b, grad_A, grad_B


# --- mixed-adapter batches (grouped LoRA linear) ----------------------------------------------

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


# --- top-k sparsification with error feedback --------------------------------------------

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


# --- sparse aggregation ----------------------------------------------------------------------

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


# --- low-rank family (randomized / factored SVD) ---------------------------------------------

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
    """Reference of ``fastlora::rsvd`` (Halko-Martinsson-Tropp with QR after every product;
    with ``sketch_dtype``, every product with A formed from A and the basis in that dtype).
    The kernel's mixed-precision path may orthonormalise by Cholesky-QR instead of Householder:
    the same spans, different bases, so it agrees with this to the sketch dtype's rounding."""
    dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    if sketch_dtype is None:
        A = A.to(dtype)
        return _hmt(lambda X: A @ X, lambda Y: A.mT @ Y, omega.to(dtype), rank, n_iter)
    a = A.to(sketch_dtype)
    return _hmt(lambda X: (a @ X.to(sketch_dtype)).to(dtype), lambda Y: (Y.to(sketch_dtype).mT @ a).mT.to(dtype),
                omega.to(dtype), rank, n_iter)


def rsvd_implicit(Bs, As, weights, sparse_indices, sparse_values, omega, m, rank, n_iter):
    """Reference of ``fastlora::rsvd_implicit``: ``rsvd`` of the materialised operator."""
    dtype = _lowrank_dtype(omega, sparse_values, *Bs, *As)
    if Bs:
        M = factored_sum_dense(Bs, As, weights, sparse_indices, sparse_values, dtype=dtype)
    else:
        M = torch.zeros(m, omega.shape[0], dtype=dtype)
        M.view(-1).index_add_(0, sparse_indices, sparse_values.to(dtype))
    return rsvd(M, omega.to(dtype), rank, n_iter)


def _hmt(apply, apply_t, omega, rank, n_iter):
    Q = torch.linalg.qr(apply(omega)).Q
    for _ in range(n_iter):
        Q = torch.linalg.qr(apply(torch.linalg.qr(apply_t(Q)).Q)).Q
    Ub, S, Vh = torch.linalg.svd(apply_t(Q).mT, full_matrices=False)
    return Q @ Ub[..., :rank], S[..., :rank], Vh[..., :rank, :]


# --- LoRA over a quantized base weight ---------------------------------------------------------

def dequantize(qweight, absmax, code, blocksize, weight_shape, dtype=torch.float32):
    """Reference of ``fastlora::dequantize``: ``W.flat[f] = code[q(f)] * absmax[f // blocksize]``
    (the float32 product, then dtype); 4-bit codes two per byte, the even element high."""
    n_out, n_in = weight_shape
    n = n_out * n_in
    q = qweight.reshape(-1)
    if code.numel() == 16:
        q = torch.stack([q >> 4, q & 0xF], dim=1).reshape(-1)[:n]
    scales = absmax.repeat_interleave(blocksize)[:n]
    return (code[q.long()] * scales).reshape(n_out, n_in).to(dtype)


def _quantized_base(x2d, qweight, absmax, code, blocksize, weight_shape, ct):
    """x @ dequant(W)^T in the compute dtype ct: for a float16 / bfloat16 x, the product in x's
    dtype on the weight rounded to it (bitsandbytes' compute dtype), then ct."""
    if x2d.dtype in (torch.float16, torch.bfloat16):
        w = dequantize(qweight, absmax, code, blocksize, weight_shape, x2d.dtype)
        return (x2d @ w.t()).to(ct)
    return x2d.to(ct) @ dequantize(qweight, absmax, code, blocksize, weight_shape, ct).t()


def lora_quantized_linear_with_shrink(x2d, qweight, absmax, code, blocksize, weight_shape, bias, lora_A, lora_B,
                                      scaling, dropout_p, seed, lora_B_bias=None):
    """Reference of ``fastlora::lora_quantized_linear_fwd``: (y, xa). The base product as
    ``_quantized_base`` (in x's dtype for a half-precision x, as bitsandbytes computes it;
    float32 / float64 otherwise); the bias and the LoRA branch in float32 (float64 for a float64
    x) on x cast to it, added to the base product and rounded once: y to x's dtype, xa to the
    adapters'. (A kernel may keep a half-precision x's base product in float32, before or after
    the half-precision products: closer to the exact result. The CPU kernel computes it in
    float32 where half GEMMs are slow; the Triton kernel multiplies in half precision and adds
    the epilogue to the float32 accumulator without rounding it first.)"""
    ct = _compute_dtype(x2d.dtype)
    xa = dropout(x2d.to(ct), dropout_p, seed) @ lora_A.to(ct).t()
    y = _quantized_base(x2d, qweight, absmax, code, blocksize, weight_shape, ct) + (xa @ lora_B.to(ct).t()) * scaling
    if bias is not None:
        y = y + bias.to(ct)
    if lora_B_bias is not None:
        y = y + lora_B_bias.to(ct) * scaling
    return y.to(x2d.dtype), xa.to(lora_A.dtype)


def lora_quantized_linear_backward(grad_y, x2d, qweight, absmax, code, blocksize, weight_shape, lora_A, lora_B, xa,
                                   scaling, dropout_p, seed, need_x=True, need_bias=False):
    """Reference of ``fastlora::lora_quantized_linear_bwd``: (grad_x, grad_bias, grad_lora_A,
    grad_lora_B), computed as the forward is (the base term of grad_x as ``_quantized_base``,
    the rest in float32 / float64, rounded once); entries not requested are empty tensors. The
    base weight is frozen: no gradient."""
    ct = _compute_dtype(x2d.dtype)
    gy = grad_y.to(ct)
    g = (gy @ lora_B.to(ct)) * scaling
    grad_A = g.t() @ dropout(x2d.to(ct), dropout_p, seed)
    grad_B = (gy.t() @ xa.to(ct)) * scaling
    grad_x = grad_y.new_empty(0)
    if need_x:
        lora_in = g @ lora_A.to(ct)
        if dropout_p > 0.0:
            lora_in = dropout(lora_in, dropout_p, seed)
        n_out, n_in = weight_shape
        # dY @ W = (W^T @ dY^T)^T: the same product as the forward's with the weight transposed
        w_t = dequantize(qweight, absmax, code, blocksize, weight_shape,
                         grad_y.dtype if grad_y.dtype in (torch.float16, torch.bfloat16) else ct)
        base = (grad_y.to(w_t.dtype) @ w_t).to(ct)
        grad_x = (base + lora_in).to(x2d.dtype)
    grad_b = gy.sum(0).to(x2d.dtype) if need_bias else grad_y.new_empty(0)
    return grad_x, grad_b, grad_A.to(lora_A.dtype), grad_B.to(lora_A.dtype)
