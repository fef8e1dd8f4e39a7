"""Low-rank re-factorisation: randomized SVD, exact SVD of factored products, LoRA-Squeeze
rank compression and exact LoRA aggregation.

Ops (schemas in csrc/lowrank.cpp) and their Python functions: ``fastlora::svd_factored``
(``svd_factored``), ``fastlora::lowrank_truncate`` (``lowrank_truncate``; ``squeeze`` and
``aggregate_lora`` are it in LoRA's terms), ``fastlora::rsvd`` and ``fastlora::rsvd_implicit``
(``rsvd`` of a tensor / of a ``FactoredSum``). Dispatch: one C++ implementation
(csrc/cpu/lowrank_cpu.cpp) that only calls ATen ops (matmul, linalg_qr, linalg_svd) and is
registered as CompositeExplicitAutograd, i.e. for every device (on a GPU its products, QR and
SVD are cuBLAS / cuSOLVER's: the work is dense linear algebra that a custom kernel would not
beat, so the family has no Triton kernel); fastlora.reference holds the
pure-PyTorch semantics the tests compare against. No autograd: these ops re-factorise updates
(data); the wrappers detach their inputs.

Compute dtype: float64 if any input is float64, else float32 (float16 / bfloat16 inputs are
upcast). ``rsvd`` / ``svd_factored`` return that dtype; ``squeeze`` / ``aggregate_lora`` cast
the new factors back to the adapter's dtype.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from fastlora import _library  # noqa: F401  (registers the C++ schemas and kernels)
from fastlora import cpu as fastlora_cpu
from fastlora.sparse_delta import SparseDelta

_FLOAT = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class FactoredSum:
    """Implicit m x n operator ``sum_i w_i B_i @ A_i (+ S)``, never materialised by ``rsvd``.

    Args:
        factors: list of ``(lora_A_i, lora_B_i)`` pairs in PEFT's shapes (A: r_i x n,
            B: m x r_i); ranks may differ. May be empty if ``sparse`` is given.
        weights: one per pair (list or tensor), used as given; default 1 each.
        sparse: optional ``SparseDelta`` over a single (m, n) tensor layout (e.g. an
            aggregated sparse delta), added to the sum.
    """

    def __init__(self, factors: Sequence[Tuple[torch.Tensor, torch.Tensor]], weights=None,
                 sparse: Optional[SparseDelta] = None):
        self.factors = [(a, b) for a, b in factors]
        self.weights = _weights(weights, len(self.factors), "FactoredSum")
        self.sparse = sparse
        if not self.factors and sparse is None:
            raise ValueError("FactoredSum: factors is empty and no sparse term given")
        shape = None
        if self.factors:
            _check_pairs(self.factors, "FactoredSum", "factors")
            shape = (self.factors[0][1].shape[0], self.factors[0][0].shape[1])
        if sparse is not None:
            if not isinstance(sparse, SparseDelta):
                raise TypeError(f"FactoredSum: sparse must be a SparseDelta, got {type(sparse).__name__}")
            specs = sparse.layout.specs
            if sparse.layout.is_dict or len(specs) != 1 or len(specs[0].shape) != 2:
                raise ValueError("FactoredSum: sparse must be a SparseDelta over one 2-D tensor (m, n)")
            if shape is not None and tuple(specs[0].shape) != shape:
                raise ValueError(f"FactoredSum: sparse has shape {tuple(specs[0].shape)}, the factors' product is {shape}")
            shape = tuple(specs[0].shape)
        self.shape = torch.Size(shape)

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The materialised m x n matrix (for tests and small cases)."""
        device = self.factors[0][0].device if self.factors else self.sparse.values.device
        out = torch.zeros(self.shape, dtype=dtype, device=device)
        for w, (a, b) in zip(self.weights.tolist(), self.factors):
            out += w * (b.to(dtype) @ a.to(dtype))
        if self.sparse is not None:
            out += self.sparse.to_dense(dtype).to(device)
        return out


def svd_factored(B, A, weights=None):
    """Exact thin SVD of ``B @ A`` (B m x r, A r x n), or of ``sum_i weights[i] B_i @ A_i``
    when B and A are lists (ranks may differ): QR of the stacked factors
    ``[w_1 B_1, w_2 B_2, ...]`` and ``[A_1; A_2; ...]`` and an SVD of the small R x R core,
    O((m + n) R^2) with R the total rank; the m x n product is never formed.

    Returns ``(U m x k, S k, Vh k x n)``, ``k = min(R, m, n)``, S descending, non-negative,
    in float64 if any input is float64, else float32. ``U @ diag(S) @ Vh`` equals the sum to
    rounding. Shape mismatches, empty or non-finite inputs raise ValueError.
    """
    Bs, As, w = _factored_args("svd_factored", B, A, weights)
    with torch.no_grad():
        out = torch.ops.fastlora.svd_factored([b.detach() for b in Bs], [a.detach() for a in As],
                                              w.to(Bs[0].device))
    return _finite_or_raise("svd_factored", "the (weighted sum of the) product(s) B @ A", out)


def lowrank_truncate(B, A, weights=None, *, rank: int):
    """Best rank-``rank`` approximation (Frobenius and spectral) of ``B @ A``, or of
    ``sum_i weights[i] B_i @ A_i`` when B and A are lists (ranks may differ), as balanced
    factors from the exact factored SVD (the m x n product is never formed):
    ``B' = U sqrt(S)`` (m x rank), ``A' = sqrt(S) Vh`` (rank x n).

    Returns ``(A', B', rel_error)`` in float64 if any input is float64, else float32, with
    ``rel_error = ||sum - B' @ A'||_F / ||sum||_F`` (0-dim; 0 for a zero sum). ``rank`` is in
    [1, min(m, n)]; beyond the total rank the extra rows / columns are zero. :func:`squeeze`
    (one LoRA pair, scaling folded in) and :func:`aggregate_lora` (clients' pairs, FedAvg
    weights) are this op in LoRA's terms, with PEFT's shapes and the adapter's dtype.
    """
    Bs, As, w = _factored_args("lowrank_truncate", B, A, weights)
    _check_rank(rank, Bs[0].shape[0], As[0].shape[1], "lowrank_truncate", "(m, n)")
    with torch.no_grad():
        out = torch.ops.fastlora.lowrank_truncate([b.detach() for b in Bs], [a.detach() for a in As],
                                                  w.to(Bs[0].device), rank)
    return _finite_or_raise("lowrank_truncate", "the (weighted sum of the) product(s) B @ A", out)


def _factored_args(op, B, A, weights):
    """(Bs, As, float64 weights) of svd_factored / lowrank_truncate's B, A (tensors or lists)."""
    Bs = list(B) if isinstance(B, (list, tuple)) else [B]
    As = list(A) if isinstance(A, (list, tuple)) else [A]
    if len(Bs) != len(As):
        raise ValueError(f"{op}: {len(Bs)} B factors but {len(As)} A factors")
    if not Bs:
        raise ValueError(f"{op}: B and A must not be empty lists")
    _check_pairs(list(zip(As, Bs)), op, "B/A", math_order=True)
    return Bs, As, _weights(weights, len(Bs), op)


def rsvd(A, rank: int, *, oversample: Optional[int] = None, n_iter: Optional[int] = None,
         generator: Optional[torch.Generator] = None, sketch_dtype=None):
    """Randomized truncated SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1).

    ``A`` is a dense tensor ``(..., m, n)`` (leading dims are a batch) or a ``FactoredSum``
    (applied implicitly, only through products with its factors and sparse term). With
    ``l = min(rank + oversample, m, n)`` and a Gaussian n x l test matrix drawn from
    ``generator`` (default: the global RNG): Q = orth(A G), then ``n_iter`` power iterations
    Q = orth(A orth(A^T Q)), each product re-orthonormalised; the SVD of Q^T A gives the
    result. The op itself is deterministic given the test matrix: the same generator state
    gives the same bits.

    Defaults (the measured plan; docs/benchmarks.md, Low-rank):
    ``oversample=max(10, rank // 2)`` and ``n_iter=None``, adaptive: one power iteration, then
    by the sketch's estimate of sigma_l / sigma_rank. Up to 0.62 (1/i and steeper spectra) that
    is all: one power iteration fewer than ``torch.svd_lowrank``, paid for by oversampling (the
    same multiply-adds with A at rank >= 20) and a lower error than ``torch.svd_lowrank(q=rank,
    niter=2)``. Above it (about 1/sqrt(i)) one more product with A^T, the result projected on
    the row space it spans: five passes over A to svd_lowrank's six, a lower error than its.
    Above 0.76 (about 1/i^0.25) a second power iteration: svd_lowrank's two with more columns.
    The passes after that test run on the sketch's leading ``rank + (l - rank) // 4`` directions.
    The same for a ``FactoredSum``. Accuracy: within a factor
    1 + 0.05 of the optimal rank-``rank`` Frobenius error on the spectra in tests/test_lowrank.py
    (slow decay included); more ``n_iter`` for very flat spectra.

    Precision (``sketch_dtype``, dense A): by default (None, or "auto") bfloat16 where its GEMMs
    are native and beat float32 ones (CUDA; CPUs with AMX; CPUs with AVX512-BF16 whose float32
    GEMMs do not run MKL's AVX-512 kernels, such as AMD's), the input's precision elsewhere and for
    float64 input; ``torch.float32`` asks for full precision everywhere; ``torch.bfloat16`` /
    ``torch.float16`` ask for that dtype, granted only where its GEMMs are native (AMX-FP16 for
    float16 on CPUs): elsewhere ATen emulates them 100x or more slower than float32, so the
    products run in float32, faster there and more accurate. With a half-precision sketch every
    product with A uses A's values rounded to that dtype (on an AVX512-BF16 CPU block by block as
    the products read them, no copy of A; elsewhere from a copy), everything small stays in float32:
    2.1-2.4x faster than ``torch.svd_lowrank(q=rank, niter=2)`` on an AVX512-BF16 CPU, with an error
    floor of about that dtype's rounding of A (<= 2^-7 ||A||_F for bfloat16) on top of the
    randomized error. That floor is invisible when the optimal error is large (noisy or slowly
    decaying spectra: updates, gradients); where it would dominate (A nearly low rank: the
    floor above an eighth of the error the result leaves), the call is computed again in
    float32, so the default never returns the floor in its place. In float32 on the CPU the
    products with A run in fastlora's own GEMM: 1.35-1.47x ``torch.svd_lowrank`` at rank 32 on AVX2.

    Returns ``(U (..., m, rank), S (..., rank), Vh (..., rank, n))`` in float32 (float64 for
    float64 input; float16 / bfloat16 are computed in float32). Raises TypeError for a
    non-int rank / oversample / n_iter, ValueError for rank
    outside [1, min(m, n)], negative oversample / n_iter, empty or non-finite input, and a
    ``sketch_dtype`` other than None / "auto" / float32 / bfloat16 / float16 or a half
    precision given with a ``FactoredSum``.
    """
    factored = isinstance(A, FactoredSum)
    for name, v in (("rank", rank), ("oversample", oversample), ("n_iter", n_iter)):
        if (v is not None or name == "rank") and (isinstance(v, bool) or not isinstance(v, int)):
            raise TypeError(f"rsvd: {name} must be an int{'' if name == 'rank' else ' or None'}, got "
                            f"{type(v).__name__}")
    if oversample is None:
        oversample = max(10, rank // 2)
    if oversample < 0:
        raise ValueError(f"rsvd: oversample must be >= 0, got {oversample}")
    if n_iter is not None and n_iter < 0:
        raise ValueError(f"rsvd: n_iter must be >= 0 (or None), got {n_iter}")
    if sketch_dtype is not None:
        if sketch_dtype not in (torch.float32, torch.bfloat16, torch.float16, "auto"):
            raise ValueError(f"rsvd: sketch_dtype must be None, 'auto', torch.float32, torch.bfloat16 or "
                             f"torch.float16, got {sketch_dtype!r}")
        if factored and sketch_dtype in (torch.bfloat16, torch.float16):
            raise ValueError("rsvd: a half-precision sketch_dtype applies to a dense A; a FactoredSum is applied "
                             "through its (already cheap) factors in the compute dtype")
    if isinstance(A, FactoredSum):
        m, n = A.shape
        batch: Tuple[int, ...] = ()
        dbl = any(t.dtype == torch.float64 for pair in A.factors for t in pair) or (
            A.sparse is not None and A.sparse.values.dtype == torch.float64)
        device = A.factors[0][0].device if A.factors else A.sparse.values.device
    elif isinstance(A, torch.Tensor):
        if A.dtype not in _FLOAT:
            raise TypeError(f"rsvd: A must be floating point, got {A.dtype}")
        if A.dim() < 2:
            raise ValueError(f"rsvd: A must have at least 2 dimensions (..., m, n), got shape {tuple(A.shape)}")
        if A.numel() == 0:
            raise ValueError(f"rsvd: A is empty (shape {tuple(A.shape)})")
        m, n = A.shape[-2:]
        batch = tuple(A.shape[:-2])
        dbl = A.dtype == torch.float64
        device = A.device
    else:
        raise TypeError(f"rsvd: A must be a tensor or a fastlora.FactoredSum, got {type(A).__name__}")
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rsvd: rank must be in [1, min(m, n)] = [1, {min(m, n)}], got {rank}")
    dtype = torch.float64 if dbl else torch.float32
    omega = gaussian_test_matrix(batch, n, min(rank + oversample, m, n), dtype, device, generator)
    with torch.no_grad():
        if isinstance(A, torch.Tensor):
            sketch_dtype = _sketch_dtype_for(sketch_dtype, A.dtype, device)
            return torch.ops.fastlora.rsvd(A.detach(), omega, rank, n_iter, sketch_dtype)
        if A.sparse is not None:
            idx, val = A.sparse.indices.to(device), A.sparse.values.to(device)
        else:
            idx, val = torch.zeros(0, dtype=torch.int64, device=device), torch.zeros(0, dtype=dtype, device=device)
        return torch.ops.fastlora.rsvd_implicit([b.detach() for _, b in A.factors], [a.detach() for a, _ in A.factors],
                                                A.weights.to(device), idx, val, omega, m, rank, n_iter)


def _sketch_dtype_for(sketch_dtype, input_dtype: torch.dtype, device: torch.device):
    """The sketch dtype rsvd really uses (None: the compute dtype). A half precision only where
    its GEMMs are native (see rsvd's docstring); None / "auto" mean bfloat16 where it also beats
    float32 (_bf16_sketch_pays), except for float64 input."""
    if sketch_dtype is torch.float32:
        return None
    if sketch_dtype is None or sketch_dtype == "auto":
        if input_dtype == torch.float64:
            return None
        sketch_dtype = "auto"
    if device.type == "cuda":
        return torch.bfloat16 if sketch_dtype == "auto" else sketch_dtype
    if device.type != "cpu":
        return None if sketch_dtype == "auto" else sketch_dtype
    if sketch_dtype == torch.float16:
        return sketch_dtype if torch.cpu._is_amx_fp16_supported() else None
    if sketch_dtype == "auto" and not _bf16_sketch_pays():
        return None
    return torch.bfloat16 if fastlora_cpu.native_bf16_matmul() else None


def _bf16_sketch_pays() -> bool:
    """Whether "auto" takes a bfloat16 sketch on this CPU: its GEMMs are native and beat the
    float32 ones. AMX tiles do everywhere; AVX512-BF16 alone (vdpbf16ps) does where MKL runs no
    AVX-512 float32 kernels (AMD: 2.1-2.4x svd_lowrank at rank 32), but not against MKL's
    AVX-512 sgemm on an Intel CPU (Xeon at the avx512 level, 4096^2, rank 32: bfloat16 0.87x
    svd_lowrank's speed, float32 through MKL 1.44x at a lower error)."""
    if not fastlora_cpu.native_bf16_matmul():
        return False
    return fastlora_cpu.cpu_isa() == "amx" or not fastlora_cpu.blas_avx512_sgemm()


def gaussian_test_matrix(batch, n, l, dtype, device, generator=None) -> torch.Tensor:
    """The (..., n, l) standard normal test matrix ``rsvd`` draws (on the generator's device,
    then moved): exposed so that callers of the raw ops reproduce ``rsvd`` exactly."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(*batch, n, l, generator=generator, dtype=dtype, device=gen_device).to(device)


def squeeze(lora_A: torch.Tensor, lora_B: torch.Tensor, rank: int, *, scaling: float = 1.0):
    """LoRA-Squeeze: re-factorise ``scaling * lora_B @ lora_A`` at rank ``rank`` (PEFT's shapes:
    lora_A r x in, lora_B out x r) by an exact factored SVD, splitting the singular values
    evenly: ``lora_B' = U sqrt(S)``, ``lora_A' = sqrt(S) Vh``.

    ``scaling`` is folded into the new factors: pass ``old_scaling / new_scaling`` when the
    adapter's scaling changes with the rank (so that new_scaling * B'A' ~ old_scaling * BA);
    the default 1.0 keeps ``B'A' ~ BA``. ``rank`` may exceed r (up to min(out, in)): the extra
    rows / columns are zero.

    Returns ``(lora_A' rank x in, lora_B' out x rank, rel_error)`` with the factors in the
    input dtypes and ``rel_error = ||BA - B'A'||_F / ||BA||_F`` (scaled product; 0 for a zero
    product) as a 0-dim float32 (float64) tensor computed from the singular values.
    """
    _check_pairs([(lora_A, lora_B)], "squeeze", "lora_A/lora_B", single=True)
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool) or not math.isfinite(scaling):
        raise ValueError(f"squeeze: scaling must be a finite number, got {scaling!r}")
    _check_rank(rank, lora_B.shape[0], lora_A.shape[1], "squeeze")
    w = torch.tensor([float(scaling)], dtype=torch.float64)
    with torch.no_grad():
        A2, B2, rel = torch.ops.fastlora.lowrank_truncate([lora_B.detach()], [lora_A.detach()], w.to(lora_A.device),
                                                          rank)
    _finite_or_raise("squeeze", "scaling * lora_B @ lora_A", (A2, B2, rel))
    return A2.to(lora_A.dtype), B2.to(lora_B.dtype), rel


def aggregate_lora(factors: Sequence[Tuple[torch.Tensor, torch.Tensor]], weights=None, rank: int = None):
    """Exact LoRA aggregation: the best rank-``rank`` approximation (Frobenius and spectral) of
    ``sum_i weights[i] * lora_B_i @ lora_A_i`` as new factors, via ``svd_factored`` (no
    out x in product; clients may have different ranks r_i).

    Args:
        factors: list of ``(lora_A_i, lora_B_i)`` (A: r_i x in, B: out x r_i).
        weights: one per client, used as given (FedAvg: n_i / n); default 1/N each.
        rank: the global rank, in [1, min(out, in)]; beyond sum r_i the extra rows / columns
            are zero.

    Returns ``(lora_A rank x in, lora_B out x rank)`` in the first client's dtypes, with
    sqrt(S) on each side (balanced factors). Averaging A and B separately is not the same:
    it adds cross terms B_i A_j.
    """
    factors = [(a, b) for a, b in factors]
    if not factors:
        raise ValueError("aggregate_lora: factors must not be empty")
    _check_pairs(factors, "aggregate_lora", "factors")
    if rank is None:
        raise ValueError("aggregate_lora: rank is required")
    _check_rank(rank, factors[0][1].shape[0], factors[0][0].shape[1], "aggregate_lora")
    w = _weights(weights, len(factors), "aggregate_lora", default_mean=True)
    dev = factors[0][0].device
    with torch.no_grad():
        A2, B2, _ = torch.ops.fastlora.lowrank_truncate([b.detach() for _, b in factors],
                                                        [a.detach() for a, _ in factors], w.to(dev), rank)
    _finite_or_raise("aggregate_lora", "the weighted sum of the clients' lora_B @ lora_A", (A2, B2))
    return A2.to(factors[0][0].dtype), B2.to(factors[0][1].dtype)


# --- argument checks ------------------------------------------------------------------------

def _check_rank(rank, m, n, op, dims="(out, in)"):
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"{op}: rank must be an int, got {type(rank).__name__}")
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"{op}: rank must be in [1, min{dims}] = [1, {min(m, n)}], got {rank}")


def _check_pairs(pairs, op, what, math_order=False, single=False):
    an, bn = ("A", "B") if math_order else ("lora_A", "lora_B")

    def label(i):
        return f"{what}" if single else f"{what}[{i}]" if math_order else f"client {i}"

    for i, (a, b) in enumerate(pairs):
        for name, t in ((an, a), (bn, b)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{op}: {label(i)}: {name} must be a tensor, got {type(t).__name__}")
            if t.dtype not in _FLOAT:
                raise TypeError(f"{op}: {label(i)}: {name} must be floating point, got {t.dtype}")
            if t.dim() != 2:
                raise ValueError(f"{op}: {label(i)}: {name} must be 2-D, got shape {tuple(t.shape)}")
        if b.shape[1] != a.shape[0]:
            raise ValueError(f"{op}: {label(i)}: {bn} is {tuple(b.shape)} and {an} is {tuple(a.shape)}; "
                             f"{bn}'s columns must equal {an}'s rows (the rank)")
        if b.shape[0] == 0 or a.shape[1] == 0:
            raise ValueError(f"{op}: {label(i)}: the product is empty ({b.shape[0]} x {a.shape[1]})")
        a0, b0 = pairs[0]
        if (b.shape[0], a.shape[1]) != (b0.shape[0], a0.shape[1]):
            raise ValueError(f"{op}: {label(i)}: product is {b.shape[0]} x {a.shape[1]}, the first one's is "
                             f"{b0.shape[0]} x {a0.shape[1]}")
    if sum(a.shape[0] for a, _ in pairs) == 0:
        raise ValueError(f"{op}: every factor has rank 0 (empty input)")
    # Checked here, where the factors have the caller's names (the kernels check again, naming
    # positions). Data-dependent: not under torch.compile, where the kernels' checks apply.
    if not torch.compiler.is_compiling():
        dev = pairs[0][0].device
        finite = torch.stack([torch.isfinite(t).all().to(dev) for pair in pairs for t in pair]).tolist()  # one sync
        if not all(finite):
            i = finite.index(False)
            raise ValueError(f"{op}: {label(i // 2)}: {(an, bn)[i % 2]} contains non-finite values (NaN/Inf)")


def _weights(weights, count, op, default_mean=False):
    if weights is None:
        return torch.full((count,), (1.0 / count if default_mean else 1.0) if count else 0.0, dtype=torch.float64)
    if isinstance(weights, (int, float)):
        weights = [weights]
    # Python floats stay float64 (as_tensor would round them to float32 first).
    w = (weights.detach().to("cpu", torch.float64) if isinstance(weights, torch.Tensor)
         else torch.as_tensor(weights, dtype=torch.float64)).reshape(-1)
    if w.numel() != count:
        raise ValueError(f"{op}: {w.numel()} weights for {count} products")
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(w).all()):  # (the kernels check under compile)
        raise ValueError(f"{op}: weights contain non-finite values (NaN/Inf)")
    return w


def _finite_or_raise(name: str, what: str, tensors):
    """tensors, or ValueError when the factorisation of finite factors came out non-finite: the
    product they stand for overflows the compute dtype (rsvd raises on such input as well). Not
    under torch.compile, where a data-dependent raise would break the graph."""
    if torch.compiler.is_compiling():
        return tensors
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        dtype = next(t.dtype for t in tensors if t.is_floating_point())
        raise ValueError(f"{name}: {what} overflows {dtype} (its singular values are not finite); "
                         f"scale the factors down (e.g. by the same factor on each side)")
    return tensors


# --- fakes ----------------------------------------------------------------------------------

def _dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@torch.library.register_fake("fastlora::svd_factored")
def _svd_factored_fake(Bs, As, weights):
    m, n = Bs[0].shape[0], As[0].shape[1]
    k = torch.sym_min(torch.sym_min(sum(a.shape[0] for a in As), m), n)
    dt, dev = _dtype(*Bs, *As), Bs[0].device
    return (Bs[0].new_empty((m, k), dtype=dt, device=dev), Bs[0].new_empty((k,), dtype=dt, device=dev),
            Bs[0].new_empty((k, n), dtype=dt, device=dev))


@torch.library.register_fake("fastlora::lowrank_truncate")
def _lowrank_truncate_fake(Bs, As, weights, rank):
    m, n = Bs[0].shape[0], As[0].shape[1]
    dt, dev = _dtype(*Bs, *As), Bs[0].device
    return (Bs[0].new_empty((rank, n), dtype=dt, device=dev), Bs[0].new_empty((m, rank), dtype=dt, device=dev),
            Bs[0].new_empty((), dtype=dt, device=dev))


@torch.library.register_fake("fastlora::rsvd")
def _rsvd_fake(A, omega, rank, n_iter, sketch_dtype=None):
    *batch, m, n = A.shape
    dt = torch.float64 if A.dtype == torch.float64 else torch.float32
    return (A.new_empty((*batch, m, rank), dtype=dt), A.new_empty((*batch, rank), dtype=dt),
            A.new_empty((*batch, rank, n), dtype=dt))


@torch.library.register_fake("fastlora::rsvd_implicit")
def _rsvd_implicit_fake(Bs, As, weights, sparse_indices, sparse_values, omega, m, rank, n_iter):
    n = omega.shape[0]
    dt = _dtype(omega, sparse_values, *Bs, *As)
    return (omega.new_empty((m, rank), dtype=dt), omega.new_empty((rank,), dtype=dt),
            omega.new_empty((rank, n), dtype=dt))
