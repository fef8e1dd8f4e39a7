// fastlora low-rank family (randomized / factored SVD): schema. Kernels:
// csrc/cpu/lowrank_cpu.cpp (ATen calls only, registered for every device); references:
// fastlora/reference/lowrank.py; wrappers, fakes and argument checks: fastlora/ops/lowrank.py.
//
// A "factored sum" is sum_i weights[i] * Bs[i] @ As[i] with Bs[i] m x r_i and As[i] r_i x n
// (PEFT's lora_B and lora_A), i.e. the stacked product [w_1 B_1, w_2 B_2, ...] @ [A_1; A_2; ...]
// of total rank R = sum_i r_i. Computation is in float64 if any input is float64, otherwise
// in float32 (float16 / bfloat16 inputs are upcast); outputs are in that dtype.
//
//   svd_factored(Bs, As, weights) -> (U m x k, S k, Vh k x n), k = min(R, m, n)
//     Exact thin SVD of the factored sum via QR of the stacked factors and an SVD of the
//     small R x R core, O((m + n) R^2); the m x n product is never formed.
//   lowrank_truncate(Bs, As, weights, rank) -> (lora_A rank x n, lora_B m x rank, rel_error)
//     Best rank-`rank` approximation of the factored sum as factors with sqrt(S) on each side,
//     rel_error = ||sum - lora_B @ lora_A||_F / ||sum||_F (0-dim, from the singular values).
//     rank > k pads with zero rows / columns.
//   rsvd(A, omega, rank, n_iter, sketch_dtype=None) -> (U ..., m x rank, S ..., rank, Vh ..., rank x n)
//     Halko-Martinsson-Tropp randomized SVD of dense A (..., m, n) with the Gaussian test
//     matrix omega (..., n, l), l >= rank, and n_iter power iterations re-orthonormalised by QR
//     (n_iter None: adaptive, one iteration; where the sketch after it estimates
//     sigma_l / sigma_rank > 0.62, a flat spectrum, one more product with A^T and the result
//     projected on the row space it spans; above 0.76 a second iteration).
//     sketch_dtype (bfloat16 or float16): every product with A is formed from a copy of A in
//     that dtype (its GEMMs are 2-2.5x faster than float32 on CPUs with AVX512-BF16 and on
//     GPU tensor cores); intermediate bases are orthonormalised by Cholesky-QR (Householder QR
//     when the Gram matrix is not positive definite), the last basis by Householder QR; the
//     small matrices stay in the compute dtype. The result is accurate to about the sketch
//     dtype's rounding of A (~2^-8 ||A||_F for bfloat16) on top of the randomized error; when
//     that rounding (eps ||A||_F) exceeds an eighth of the error the result leaves on the copy,
//     the call is computed again without sketch_dtype.
//   rsvd_implicit(Bs, As, weights, sparse_indices, sparse_values, omega, m, rank, n_iter)
//     The same for the implicit operator factored sum + S, S the m x n matrix with
//     sparse_values at the row-major flat positions sparse_indices (empty: no sparse term);
//     n = omega.size(0). Only products with the factors and S are formed. n_iter as for rsvd.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastlora, m) {
  m.def("svd_factored(Tensor[] Bs, Tensor[] As, Tensor weights) -> (Tensor U, Tensor S, Tensor Vh)");
  m.def("lowrank_truncate(Tensor[] Bs, Tensor[] As, Tensor weights, int rank) "
        "-> (Tensor lora_A, Tensor lora_B, Tensor rel_error)");
  m.def("rsvd(Tensor A, Tensor omega, int rank, int? n_iter, ScalarType? sketch_dtype=None) "
        "-> (Tensor U, Tensor S, Tensor Vh)");
  m.def("rsvd_implicit(Tensor[] Bs, Tensor[] As, Tensor weights, Tensor sparse_indices, Tensor sparse_values, "
        "Tensor omega, int m, int rank, int? n_iter) -> (Tensor U, Tensor S, Tensor Vh)");
}
