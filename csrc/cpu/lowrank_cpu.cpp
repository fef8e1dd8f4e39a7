// Kernels of the fastlora low-rank family (schema and semantics: csrc/lowrank.cpp).
//
// These kernels call ATen ops (matmul, linalg_qr, linalg_svd, index_add), so they are
// registered as CompositeExplicitAutograd: the same code serves every device (on CUDA the
// ATen calls dispatch to cuBLAS / cuSOLVER). One exception, on the CPU: rsvd's products with a
// dense A, the tall-times-skinny GEMMs that are most of its time, run in fastlora's own
// kernels: small_gemm for float32 (see sketch_product), small_gemm_bf16 on blocks of A rounded
// as they are read for a bfloat16 sketch with AVX512-BF16 (lowrank_sketch_bf16.cpp). There is
// no autograd formula: these ops re-factorise updates (data), and the Python wrappers call them
// without recording history.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu_utils.h"
#include "lowrank_sketch_bf16.h"
#include "small_gemm.h"

namespace fastlora {
namespace {

using at::Tensor;
using Triple = std::tuple<Tensor, Tensor, Tensor>;

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// min and max propagate NaN: one vectorised reduction (isfinite + all took 0.5 ms on a 4096 x 96
// sketch, twice per rsvd call).
bool all_finite(const Tensor& t) {
  if (t.numel() == 0) return true;
  const auto [lo, hi] = at::aminmax(t);
  return at::isfinite(lo).logical_and(at::isfinite(hi)).item<bool>();
}

// The factored sum  sum_i w_i B_i A_i  as the stacked factors Bw = [w_1 B_1, ...] (m x R) and
// Ac = [A_1; A_2; ...] (R x n), in the compute dtype, after validating every input.
struct Factored {
  Tensor Bw, Ac;
  int64_t m = 0, n = 0, R = 0;
};

Factored stack_factors(const char* op, at::TensorList Bs, at::TensorList As, const Tensor& weights) {
  const int64_t count = static_cast<int64_t>(Bs.size());
  TORCH_CHECK_VALUE(count >= 1, op, ": factors must not be empty");
  TORCH_CHECK_VALUE(As.size() == Bs.size(), op, ": ", Bs.size(), " B factors but ", As.size(), " A factors");
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.size(0) == count, op, ": weights must have one entry per product (",
                    count, "), got shape ", weights.sizes());
  bool dbl = false;
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK_TYPE(is_float_dtype(Bs[i].scalar_type()) && is_float_dtype(As[i].scalar_type()), op, ": factor ", i,
                     " must be floating point, got ", Bs[i].scalar_type(), " and ", As[i].scalar_type());
    TORCH_CHECK_VALUE(Bs[i].dim() == 2 && As[i].dim() == 2, op, ": factor ", i, ": B and A must be 2-D, got shapes ",
                      Bs[i].sizes(), " and ", As[i].sizes());
    TORCH_CHECK_VALUE(Bs[i].size(1) == As[i].size(0), op, ": factor ", i, ": B is ", Bs[i].sizes(), " and A is ",
                      As[i].sizes(), " (B's columns must equal A's rows, the rank)");
    TORCH_CHECK_VALUE(Bs[i].size(0) == Bs[0].size(0) && As[i].size(1) == As[0].size(1), op, ": factor ", i,
                      ": product is ", Bs[i].size(0), " x ", As[i].size(1), ", factor 0's is ", Bs[0].size(0), " x ",
                      As[0].size(1));
    TORCH_CHECK_VALUE(Bs[i].device() == Bs[0].device() && As[i].device() == Bs[0].device(), op, ": factor ", i,
                      " is on another device than factor 0");
    dbl = dbl || Bs[i].scalar_type() == at::kDouble || As[i].scalar_type() == at::kDouble;
  }
  Factored f;
  f.m = Bs[0].size(0);
  f.n = As[0].size(1);
  TORCH_CHECK_VALUE(f.m >= 1 && f.n >= 1, op, ": the product is empty (", f.m, " x ", f.n, ")");
  const auto dt = dbl ? at::kDouble : at::kFloat;
  const Tensor w = weights.to(Bs[0].device(), dt);
  TORCH_CHECK_VALUE(all_finite(w), op, ": weights contain non-finite values (NaN/Inf)");
  std::vector<Tensor> bw, ac;
  for (int64_t i = 0; i < count; ++i) {
    if (Bs[i].size(1) == 0) continue;
    const Tensor b = Bs[i].to(dt), a = As[i].to(dt);
    TORCH_CHECK_VALUE(all_finite(b), op, ": factor ", i, ": B contains non-finite values (NaN/Inf)");
    TORCH_CHECK_VALUE(all_finite(a), op, ": factor ", i, ": A contains non-finite values (NaN/Inf)");
    bw.push_back(b * w[i]);
    ac.push_back(a);
    f.R += a.size(0);
  }
  TORCH_CHECK_VALUE(f.R >= 1, op, ": every factor has rank 0");
  f.Bw = at::cat(bw, 1);
  f.Ac = at::cat(ac, 0);
  return f;
}

// Exact thin SVD of Bw @ Ac: QR of both factors, SVD of the small core Rb Ra^T.
Triple svd_of_factored(const Factored& f) {
  auto [Qb, Rb] = at::linalg_qr(f.Bw, "reduced");          // m x kb, kb x R
  auto [Qa, Ra] = at::linalg_qr(f.Ac.mT(), "reduced");     // n x ka, ka x R
  auto [Uc, S, Vhc] = at::linalg_svd(at::matmul(Rb, Ra.mT()), /*full_matrices=*/false);
  return {at::matmul(Qb, Uc), S, at::matmul(Vhc, Qa.mT())};
}

Triple svd_factored(at::TensorList Bs, at::TensorList As, const Tensor& weights) {
  return svd_of_factored(stack_factors("svd_factored", Bs, As, weights));
}

std::tuple<Tensor, Tensor, Tensor> lowrank_truncate(at::TensorList Bs, at::TensorList As, const Tensor& weights,
                                                    int64_t rank) {
  const Factored f = stack_factors("lowrank_truncate", Bs, As, weights);
  TORCH_CHECK_VALUE(rank >= 1 && rank <= std::min(f.m, f.n), "lowrank_truncate: rank must be in [1, min(m, n)] = [1, ",
                    std::min(f.m, f.n), "], got ", rank);
  auto [U, S, Vh] = svd_of_factored(f);
  const int64_t k = S.size(0), kk = std::min(rank, k);
  const Tensor sq = S.narrow(0, 0, kk).sqrt();
  Tensor B = U.narrow(1, 0, kk) * sq;                     // m x kk
  Tensor A = Vh.narrow(0, 0, kk) * sq.unsqueeze(1);        // kk x n
  if (kk < rank) {  // fewer nonzero directions than asked: pad with zero rows / columns
    B = at::cat({B, at::zeros({f.m, rank - kk}, B.options())}, 1);
    A = at::cat({A, at::zeros({rank - kk, f.n}, A.options())}, 0);
  }
  // Tail energy summed directly (no cancellation in total - head).
  const Tensor s2 = S * S;
  const Tensor total = s2.sum();
  const Tensor tail = s2.narrow(0, kk, k - kk).sum();
  const Tensor rel = at::where(total > 0, (tail / at::where(total > 0, total, at::ones_like(total))).sqrt(),
                               at::zeros_like(total));
  return {A, B, rel};
}

using QR = std::pair<Tensor, Tensor>;

// Householder QR, reduced: Y (..., m, l) = Q R.
QR householder_qr(const Tensor& Y) {
  auto [Q, R] = at::linalg_qr(Y, "reduced");
  return {Q, R};
}

// One Cholesky-QR step, Y = Q R with R^T R = Y^T Y: two GEMM-shaped steps instead of a
// Householder sweep, 2-3x cheaper on tall sketches. The Gram matrix squares Y's condition
// number, so the step is taken only when cond(Y) <= 1e3 (read off the small R exactly: bounds
// from R and its inverse, such as ||R||_F ||R^-1||_F, overshot cond_2 5-10x on power-iteration
// sketches): then Q is orthonormal to ~cond^2 eps and a second step makes it orthonormal to
// working precision (CholeskyQR2, Fukaya et al. 2014). Empty when that does not hold
// (ill-conditioned or rank-deficient sketch, NaN): callers fall back to Householder.
// sv_out: R's singular values (= Y's, descending), when asked for (sketch_flatness reads them).
std::optional<QR> cholesky_qr_step(const Tensor& Y, Tensor* sv_out = nullptr) {
  constexpr double kMaxCond = 1e3;
  auto [R, info] = at::linalg_cholesky_ex(at::matmul(Y.mT(), Y), /*upper=*/true);
  const Tensor sv = at::linalg_svdvals(R);
  const Tensor ok = info.eq(0).all().logical_and(
      sv.select(-1, 0).le(sv.select(-1, -1) * kMaxCond).all());  // false for NaN too
  if (!ok.item<bool>()) return std::nullopt;
  if (sv_out) *sv_out = sv;
  // Q = Y R^-1 as a GEMM with the inverted l x l factor: ~3x faster than a triangular solve
  // against the tall Y, and accurate here because cond(R) <= kMaxCond.
  const Tensor eye = at::eye(R.size(-1), R.options()).expand(R.sizes());
  const Tensor R_inv = at::linalg_solve_triangular(R, eye, /*upper=*/true, /*left=*/true);
  return QR{at::matmul(Y, R_inv), R};
}

// Y = Q R with Q orthonormal to working precision: CholeskyQR2 when `cheap` and Y is well
// enough conditioned, Householder otherwise.
// `first`: Y's first Cholesky-QR step when the caller has taken it already.
QR qr_factor(const Tensor& Y, bool cheap, std::optional<QR> first = std::nullopt) {
  if (cheap) {
    if (!first) first = cholesky_qr_step(Y);
    if (first) {
      if (auto second = cholesky_qr_step(first->first)) {
        return {second->first, at::matmul(second->second, first->second)};
      }
    }
  }
  return householder_qr(Y);
}

// A basis of Y's span for the power iteration, where only the span matters: one Cholesky-QR
// step when `cheap` (its loss of orthogonality, <= ~0.1, does not shrink the span),
// Householder otherwise.
// With the step's own Q R, whether it was a Cholesky-QR step, and then R's singular values.
struct SpanStep {
  QR qr;
  bool cholesky;
  Tensor sv;
};

SpanStep span_basis(const Tensor& Y, bool cheap) {
  if (cheap) {
    Tensor sv;
    if (auto step = cholesky_qr_step(Y, &sv)) return {*step, true, sv};
  }
  return {householder_qr(Y), false, Tensor()};
}

// How flat a sketch's spectrum is, which decides how much more work the adaptive plan does:
// the estimate sigma_l / sigma_rank of the last kept singular value against the last sketched
// one, read off R (Y = Q R: R has Y's singular values). After one power iteration this estimate
// sits at 0.51-0.53 for a 1/i spectrum, 0.58 for 1/i^0.75, 0.66-0.69 for 1/sqrt(i) and
// 0.82-0.85 for 1/i^0.25 (ranks 12-128, oversample max(10, rank / 2)). One iteration gave a
// lower error than torch.svd_lowrank's two up to 1/i^0.75 and a higher one from 1/sqrt(i) on,
// hence kFlat between them. Past kVeryFlat the row-space projection (see hmt) kept its lower
// reconstruction error than svd_lowrank's but its singular values drifted by more than 5% of
// the largest on a 120 x 120, 1/i^0.25 test (rank 12: 0.053, two iterations 0.034,
// svd_lowrank 0.086-0.098): a second power iteration runs there. The flattest batch element
// decides for the whole batch; NaN counts as very flat.
enum class Flatness { steep, flat, very_flat };

Flatness sketch_flatness(const SpanStep& step, int64_t rank) {
  constexpr double kFlat = 0.62, kVeryFlat = 0.76;
  const Tensor sv = step.sv.defined() ? step.sv : at::linalg_svdvals(step.qr.second);  // descending
  const Tensor ratio = sv.select(-1, sv.size(-1) - 1) / sv.select(-1, rank - 1);
  if (ratio.isnan().any().item<bool>()) return Flatness::very_flat;
  const double worst = ratio.max().item<double>();
  return worst > kVeryFlat ? Flatness::very_flat : worst > kFlat ? Flatness::flat : Flatness::steep;
}

// The w leading left singular directions of Y = Q R (Q orthonormal or, after one Cholesky-QR
// step, nearly so): Q Ur[:, :w] with R = Ur S Vr^T, an m x w basis for the passes after the
// adaptive plan's flatness test. Those passes do not need the oversampled width: on 4096^2
// 1/sqrt(i), 1/i^0.25 and Gaussian matrices (ranks 32 and 64, l = rank + max(10, rank / 2))
// the projection at w = rank + (l - rank) / 4 left 1.0044 / 1.0055 of the optimal error at
// 1/sqrt(i) against svd_lowrank's 1.0062 / 1.0080 (1.0037 / 1.0044 at the full width), and the
// second power iteration 1.0026 / 1.0046 on Gaussian A (svd_lowrank 1.0029 / 1.0054, full width
// 1.0026 / 1.0045), with singular values closer to the optimal ones than svd_lowrank's; a tenth
// fewer multiply-adds with A on the flat plan, an eighth fewer on the very flat one.
Tensor leading_directions(const QR& qr, int64_t w) {
  if (w >= qr.first.size(-1)) return qr.first;
  const Tensor Ur = std::get<0>(at::linalg_svd(qr.second, /*full_matrices=*/false));
  return at::matmul(qr.first, Ur.narrow(-1, 0, w));
}

// Halko-Martinsson-Tropp range finder + SVD of the projection, for any operator given by its
// products apply(X) = Op X (X: ..., n x l) and apply_t(Y) = Op^T Y (Y: ..., m x l).
// `cheap_qr` lets the orthonormalisations use Cholesky-QR where it is safe (see above).
// n_iter: the number of power iterations, or nullopt for the adaptive plan (sketch_flatness
// after one power iteration decides): on a steep spectrum nothing more; on a flat one one more
// product with Op^T, Z = Op^T Q, and the result projected on the row space Z spans,
// Op ~ (Op P) P^T with P = orth(Z); on a very flat one a second power iteration; both on Q's
// leading directions only (leading_directions). The projection is five passes over Op where a
// second iteration takes six (svd_lowrank's count), and its error lies between one
// iteration's and two's: P spans (Op^T Op)^2 Omega, which weighs
// each singular direction by sigma^4, between sigma^3 (one iteration) and sigma^5 (two). On
// 1/i^0.75 to 1/i^0.25 spectra, ranks 16-128, its excess error was 0.25-0.9x
// torch.svd_lowrank's (two iterations, no oversampling).
template <typename Apply, typename ApplyT>
Triple hmt(const char* op, const Tensor& omega, int64_t rank, std::optional<int64_t> n_iter, Apply apply,
           ApplyT apply_t, bool cheap_qr = false) {
  TORCH_CHECK_VALUE(n_iter.value_or(0) >= 0, op, ": n_iter must be >= 0 (or None: adaptive), got ", *n_iter);
  TORCH_CHECK_VALUE(all_finite(omega), op, ": omega contains non-finite values");
  Tensor Y = apply(omega);
  // omega is finite and (almost surely) has no zero entry, so any NaN/Inf in the operator
  // reaches Y: this checks the input without an extra pass over it.
  TORCH_CHECK_VALUE(all_finite(Y), op, ": the input contains non-finite values (NaN/Inf), or its product with the "
                    "test matrix overflows");
  // Re-orthonormalise after every product (the stable normaliser): without it the columns of
  // (A A^T)^q A omega collapse onto the top singular vector in floating point. The basis the
  // result is projected on (the last one) must be orthonormal, the others only span.
  std::optional<Tensor> last;  // the basis to project on, when the adaptive plan stops early
  for (int64_t it = 0; it < n_iter.value_or(2); ++it) {
    const SpanStep step = span_basis(Y, cheap_qr);
    // A fixed n_iter iterates regardless, as the adaptive plan does on a very flat spectrum.
    const bool adaptive = !n_iter.has_value() && it == 1;
    const Flatness flatness = adaptive ? sketch_flatness(step, rank) : Flatness::very_flat;
    // The passes after the flatness test run on Y's top rank + (l - rank) / 4 directions only.
    const Tensor basis = adaptive && flatness != Flatness::steep
                             ? leading_directions(step.qr, rank + (Y.size(-1) - rank) / 4)
                             : step.qr.first;
    if (flatness == Flatness::flat) {
      // Op ~ W P^T with W = Op P (m x w) = Qw Rw and Rw = Ur S Vhr: U = Qw Ur, Vh = Vhr P^T.
      const Tensor P = qr_factor(apply_t(basis), cheap_qr).first;  // n x w, orthonormal
      auto [Qw, Rw] = qr_factor(apply(P), cheap_qr);
      auto [Ur, S, Vhr] = at::linalg_svd(Rw, /*full_matrices=*/false);
      return {at::matmul(Qw, Ur.narrow(-1, 0, rank)), S.narrow(-1, 0, rank).contiguous(),
              at::matmul(Vhr.narrow(-2, 0, rank), P.mT())};
    }
    if (flatness == Flatness::steep) {
      // Y's first orthonormalisation step is taken: qr_factor continues from it (a Householder
      // basis is orthonormal already), the bits of a fixed n_iter = 1.
      last = step.cholesky ? qr_factor(Y, cheap_qr, step.qr).first : step.qr.first;
      break;
    }
    Y = apply(span_basis(apply_t(basis), cheap_qr).qr.first);
  }
  const Tensor Q = last ? *last : qr_factor(Y, cheap_qr).first;
  const Tensor Bt = apply_t(Q);                                  // ..., n x l  (= (Q^T Op)^T)
  // SVD of the wide l x n matrix B = Bt^T through Bt = Qb Rb: B = Rb^T Qb^T, so the SVD of the
  // small Rb^T gives B's (2-3x cheaper than a direct SVD of B).
  auto [Qb, Rb] = qr_factor(Bt, cheap_qr);
  auto [Ub, S, Vhr] = at::linalg_svd(Rb.mT(), /*full_matrices=*/false);
  const Tensor U = at::matmul(Q, Ub.narrow(-1, 0, rank));
  const Tensor Vh = at::matmul(Vhr.narrow(-2, 0, rank), Qb.mT());
  return {U, S.narrow(-1, 0, rank).contiguous(), Vh};
}

// A X (transpose_a = false) or A^T X (true) for a contiguous float32 CPU matrix A (m x n) and
// an l-column X, in small_gemm over blocks of output rows: rsvd's passes over A. These are
// compute-bound (A is read once per pass, each element used l times) and MKL on AMD runs their
// skinny shapes well below its square-GEMM rate: 4096 x 4096 times 4096 x 48 at 140 GFLOP/s
// and the transposed product at 117 (2 threads, Zen 4 under the AVX2 build), against 180 and
// 160 here. Only where small_gemm has a vector build (AVX2 or AVX-512) and the BLAS is not MKL
// on an Intel CPU: there MKL's tuned kernels, in the operand layouts of rsvd's BLAS plan, won
// at every level (rsvd's default at rank 32 on a Xeon, against svd_lowrank: under the AVX2 caps
// 1.09x / 1.38x on 1/sqrt(i) / 1/i through MKL against 0.93x / 1.20x through small_gemm; with
// AVX-512, equal work, 0.73x through small_gemm). Baseline keeps the BLAS.
bool use_sketch_product(const Tensor& a) {
  return a.device().is_cpu() && a.scalar_type() == at::kFloat && a.is_contiguous() && small_gemm_isa() >= 3 &&
         !blas_is_mkl_on_intel();
}

Tensor sketch_product(const Tensor& a, const Tensor& x, bool transpose_a) {
  const int64_t m = a.size(-2), n = a.size(-1), batch = a.numel() / (m * n);
  const int64_t rows = transpose_a ? n : m, depth = transpose_a ? m : n;
  TORCH_INTERNAL_ASSERT(x.dim() == a.dim() && x.size(-2) == depth);
  // small_gemm's column tail narrower than a vector is scalar: pad X with zero columns to whole
  // vectors (the sketch widths rank + oversample are rarely multiples of 8 or 16).
  const int64_t lanes = small_gemm_isa() >= 4 ? 16 : 8, l = (x.size(-1) + lanes - 1) / lanes * lanes;
  const Tensor xc = l == x.size(-1) ? x.contiguous() : at::constant_pad_nd(x, {0, l - x.size(-1)});
  std::vector<int64_t> out_sizes(a.sizes().begin(), a.sizes().end() - 2);
  out_sizes.insert(out_sizes.end(), {rows, l});
  Tensor out = at::empty(out_sizes, a.options());
  // A(i, p) for output row i: row i of A, or column i of A (whose values for consecutive i are
  // adjacent, which small_gemm's tiles read as one cache line per step).
  const int64_t a_row = transpose_a ? 1 : n, a_col = transpose_a ? n : 1;
  for (int64_t b = 0; b < batch; ++b) {
    const float* pa = a.const_data_ptr<float>() + b * m * n;
    const float* px = xc.const_data_ptr<float>() + b * depth * l;
    float* po = out.mutable_data_ptr<float>() + b * rows * l;
    at::parallel_for(0, rows, 96, [&](int64_t r0, int64_t r1) {
      small_gemm(r1 - r0, l, depth, 1.0f, pa + r0 * a_row, a_row, a_col, px, l, /*accumulate=*/false, po + r0 * l,
                 l);
    });
  }
  return l == x.size(-1) ? out : out.narrow(-1, 0, x.size(-1));
}

void check_omega(const char* op, const Tensor& omega, int64_t n, int64_t rank, int64_t kmax) {
  TORCH_CHECK_VALUE(rank >= 1 && rank <= kmax, op, ": rank must be in [1, min(m, n)] = [1, ", kmax, "], got ", rank);
  TORCH_CHECK_VALUE(omega.dim() >= 2 && omega.size(-2) == n, op, ": omega must be (..., n = ", n, ", l), got ",
                    omega.sizes());
  TORCH_CHECK_VALUE(omega.size(-1) >= rank && omega.size(-1) <= kmax, op, ": omega has ", omega.size(-1),
                    " columns; need rank (", rank, ") <= l <= min(m, n) (", kmax, ")");
}

// x's values as float, 16 at a time (cpu_utils.h: a shift for bfloat16, which vectorises).
inline void to_float16(const at::BFloat16* x, float* out) {
  const uint16_t* h = reinterpret_cast<const uint16_t*>(x);
  for (int j = 0; j < 16; ++j) out[j] = bf16_bits_to_float(h[j]);
}

inline void to_float16(const at::Half* x, float* out) {
  for (int j = 0; j < 16; ++j) out[j] = static_cast<float>(x[j]);
}

// Squared Frobenius norms of the (..., m, n) matrices of a contiguous half-precision x, in
// float64. On the CPU a loop over the values (ATen's norm with a float result dtype converts
// element by element: 26 ms for a 4096 x 4096 bfloat16 matrix, most of a bf16 rsvd's own
// work): float sums over chunks of 4096 values, added in double.
Tensor squared_norms(const Tensor& x) {
  if (!x.device().is_cpu()) {
    return at::linalg_vector_norm(x, 2, {-2, -1}, /*keepdim=*/false, at::kDouble).square();
  }
  const int64_t per = x.size(-2) * x.size(-1), mats = x.numel() / per;
  Tensor out = at::empty({mats}, x.options().dtype(at::kDouble));
  double* po = out.mutable_data_ptr<double>();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "squared_norms", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    for (int64_t b = 0; b < mats; ++b) {
      const scalar_t* pb = px + b * per;
      po[b] = at::parallel_reduce(
          0, per, 1 << 16, 0.0,
          [&](int64_t i0, int64_t i1, double acc) {
            for (int64_t c0 = i0; c0 < i1; c0 += 4096) {
              const int64_t c1 = std::min(i1, c0 + 4096);
              float part[16] = {}, v[16];
              int64_t i = c0;
              for (; i + 16 <= c1; i += 16) {
                to_float16(pb + i, v);
                for (int j = 0; j < 16; ++j) part[j] += v[j] * v[j];
              }
              for (; i < c1; ++i) {
                const float w = static_cast<float>(pb[i]);
                part[0] += w * w;
              }
              for (int j = 0; j < 16; ++j) acc += part[j];
            }
            return acc;
          },
          std::plus<double>());
    }
  });
  return out.view(x.sizes().slice(0, x.dim() - 2));
}

// Whether the rounding of A to the sketch dtype would dominate a sketched result's error: the
// copy a differs from A by up to eps ||A||_F (eps = 2^-7 for bfloat16), which is invisible next
// to a large optimal error (noisy or slowly decaying spectra) and dominant when A is (nearly)
// low rank. The error the result leaves on a, sqrt(||a||_F^2 - ||S||^2), stands for the optimal
// one: when eps ||a||_F exceeds an eighth of it (adding, in quadrature, up to ~1% to the error)
// in any batch element, rsvd computes the call again in float32 instead.
// norm2: the squared norms of the copy's matrices.
bool sketch_floor_dominates(at::ScalarType sketch_dtype, const Tensor& norm2, const Tensor& S) {
  const double eps = sketch_dtype == at::kBFloat16 ? 0.0078125 : 0.0009765625;  // finfo(dtype).eps
  const Tensor tail2 = (norm2 - S.to(at::kDouble).square().sum(-1)).clamp_min(0);
  return (norm2 * (64 * eps * eps)).gt(tail2).any().item<bool>();
}

Triple rsvd(const Tensor& A, const Tensor& omega, int64_t rank, std::optional<int64_t> n_iter,
            std::optional<at::ScalarType> sketch_dtype) {
  TORCH_CHECK_TYPE(is_float_dtype(A.scalar_type()), "rsvd: A must be floating point, got ", A.scalar_type());
  TORCH_CHECK_VALUE(A.dim() >= 2, "rsvd: A must have at least 2 dimensions (..., m, n), got shape ", A.sizes());
  const int64_t m = A.size(-2), n = A.size(-1);
  TORCH_CHECK_VALUE(A.numel() > 0, "rsvd: A is empty (shape ", A.sizes(), ")");
  check_omega("rsvd", omega, n, rank, std::min(m, n));
  TORCH_CHECK_VALUE(omega.sizes().slice(0, omega.dim() - 2) == A.sizes().slice(0, A.dim() - 2),
                    "rsvd: omega's batch dims ", omega.sizes(), " differ from A's ", A.sizes());
  const auto dt = A.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (!sketch_dtype.has_value()) {
    const Tensor a = A.to(dt);
    if (use_sketch_product(a)) {
      // Cholesky-QR where it is safe (see cholesky_qr_step): a Householder QR of a 4096 x 48
      // sketch costs 2 ms, a sixth of one pass over a 4096 x 4096 A.
      return hmt(
          "rsvd", omega.to(dt), rank, n_iter, [&](const Tensor& X) { return sketch_product(a, X, false); },
          [&](const Tensor& Y) { return sketch_product(a, Y, true); }, /*cheap_qr=*/true);
    }
    // Through the BLAS (MKL on an Intel CPU, at every level; the baseline build; float64; CUDA,
    // as its bfloat16 sketch below), in the operand layouts MKL runs fastest, measured with 4096^2 x
    // 48 float32 on 2 threads of a Xeon: A^T Y as (Y^T A)^T, reading A along its rows (6.5
    // against 9.3 ms with AVX-512, 11.7 against 14.5 under the AVX2 caps), and with AVX-512 A X
    // with X handed over column-major (6.1 against 6.8 ms; 12.3 against 11.3 under the AVX2
    // caps, hence only there). With Cholesky-QR as above, rsvd's default at rank 32 went from
    // 1.05x to 1.37-1.41x torch.svd_lowrank's speed on a 1/i spectrum and from 0.91x to
    // 1.11-1.18x on 1/sqrt(i) (FASTLORA_CPU_ISA=avx512 on that Xeon), at the same errors.
    const bool x_column_major = a.is_cpu() && blas_has_avx512_sgemm();
    return hmt(
        "rsvd", omega.to(dt), rank, n_iter,
        [&](const Tensor& X) { return at::matmul(a, x_column_major ? X.mT().contiguous().mT() : X); },
        [&](const Tensor& Y) { return at::matmul(Y.mT(), a).mT(); }, /*cheap_qr=*/true);
  }
  const auto sd = *sketch_dtype;
  TORCH_CHECK_VALUE(sd == at::kBFloat16 || sd == at::kHalf, "rsvd: sketch_dtype must be bfloat16 or float16, got ",
                    sd);
  if (sd == at::kBFloat16 && bf16_sketch_streams(A)) {
    // No bfloat16 copy of A (see lowrank_sketch_bf16.cpp); its norm comes with the first pass.
    // Other dtypes (float16, float64) through float32, so that the same values give the same
    // bits whatever their dtype.
    const bool as_is = A.scalar_type() == at::kFloat || A.scalar_type() == at::kBFloat16;
    const Tensor a = as_is ? A.contiguous() : A.to(at::kFloat).contiguous();
    Tensor norm2;
    Triple out = hmt(
        "rsvd", omega.to(dt), rank, n_iter,
        [&](const Tensor& X) {
          return bf16_sketch_product(a, X.to(at::kFloat), false, norm2.defined() ? nullptr : &norm2).to(dt);
        },
        [&](const Tensor& Y) { return bf16_sketch_product(a, Y.to(at::kFloat), true, nullptr).to(dt); },
        /*cheap_qr=*/true);
    if (sketch_floor_dominates(sd, norm2, std::get<1>(out))) return rsvd(A, omega, rank, n_iter, std::nullopt);
    return out;
  }
  // A copy of A in the sketch dtype (CUDA; float16 with AMX-FP16; bfloat16 where the CPU has no
  // AVX512-BF16, for a caller of the raw op: the Python API sketches in float32 there).
  Tensor a = A.to(sd, /*non_blocking=*/false, /*copy=*/false, at::MemoryFormat::Contiguous);
  // A^T Y is formed as (Y^T A)^T: with A row-major this reads A along its rows, which the
  // low-precision GEMMs do ~10% faster than the transposed operand.
  Triple out = hmt(
      "rsvd", omega.to(dt), rank, n_iter, [&](const Tensor& X) { return at::matmul(a, X.to(sd)).to(dt); },
      [&](const Tensor& Y) { return at::matmul(Y.to(sd).mT(), a).mT().to(dt); }, /*cheap_qr=*/true);
  if (sketch_floor_dominates(sd, squared_norms(a), std::get<1>(out))) {
    a = Tensor();  // the half-precision copy is not needed by the float32 call
    return rsvd(A, omega, rank, n_iter, std::nullopt);
  }
  return out;
}

Triple rsvd_implicit(at::TensorList Bs, at::TensorList As, const Tensor& weights, const Tensor& sparse_indices,
                     const Tensor& sparse_values, const Tensor& omega, int64_t m, int64_t rank,
                     std::optional<int64_t> n_iter) {
  const char* op = "rsvd_implicit";
  TORCH_CHECK_VALUE(omega.dim() == 2, op, ": omega must be 2-D (n x l), got ", omega.sizes());
  const int64_t n = omega.size(0);
  TORCH_CHECK_VALUE(m >= 1 && n >= 1, op, ": the operator is empty (", m, " x ", n, ")");
  const bool has_factors = !Bs.empty() || !As.empty();
  Factored f;
  if (has_factors) {
    f = stack_factors(op, Bs, As, weights);
    TORCH_CHECK_VALUE(f.m == m && f.n == n, op, ": the factors' product is ", f.m, " x ", f.n, ", the operator is ",
                      m, " x ", n);
  }
  const bool has_sparse = sparse_indices.numel() > 0;
  TORCH_CHECK_VALUE(has_factors || has_sparse, op, ": the operator is empty (no factors and no sparse entries)");
  TORCH_CHECK_VALUE(sparse_indices.dim() == 1 && sparse_indices.scalar_type() == at::kLong, op,
                    ": sparse_indices must be a 1-D int64 tensor");
  TORCH_CHECK_VALUE(sparse_values.dim() == 1 && sparse_values.numel() == sparse_indices.numel(), op,
                    ": sparse_values must be 1-D with as many entries as sparse_indices");
  // Same rule as the fake: float64 if any input is float64 (an empty sparse term included).
  bool dbl = omega.scalar_type() == at::kDouble || (has_factors && f.Bw.scalar_type() == at::kDouble) ||
             sparse_values.scalar_type() == at::kDouble;
  const auto dt = dbl ? at::kDouble : at::kFloat;
  Tensor rows, cols, vals;
  if (has_sparse) {
    TORCH_CHECK_TYPE(is_float_dtype(sparse_values.scalar_type()), op, ": sparse values must be floating point");
    const int64_t lo = sparse_indices.min().item<int64_t>(), hi = sparse_indices.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi < m * n, op, ": sparse index out of range [0, ", m * n, ")");
    vals = sparse_values.to(dt).unsqueeze(1);
    TORCH_CHECK_VALUE(all_finite(vals), op, ": sparse values contain non-finite values (NaN/Inf)");
    rows = at::div(sparse_indices, n, "floor");
    cols = sparse_indices - rows * n;
  }
  if (has_factors && dbl) {
    f.Bw = f.Bw.to(dt);
    f.Ac = f.Ac.to(dt);
  }
  check_omega(op, omega, n, rank, std::min(m, n));
  auto apply = [&](const Tensor& X) {  // (sum_i w_i B_i A_i + S) X, as Bw (Ac X) + S X
    Tensor out = has_factors ? at::matmul(f.Bw, at::matmul(f.Ac, X)) : at::zeros({m, X.size(1)}, X.options());
    if (has_sparse) out.index_add_(0, rows, X.index_select(0, cols) * vals);
    return out;
  };
  // Ac^T (Bw^T Y) formed as ((Y^T Bw) Ac)^T, reading the factors along their rows, and
  // Cholesky-QR2 in hmt: 64 clients x rank 16 into rank 64 at 4096^2 (the benchmark's case) went
  // from 80 to 67-72 ms on a Xeon (105 to 89 ms under the AVX2 caps), each change about half.
  auto apply_t = [&](const Tensor& Y) {  // (...)^T Y = Ac^T (Bw^T Y) + S^T Y
    Tensor out = has_factors ? at::matmul(at::matmul(Y.mT(), f.Bw), f.Ac).mT() : at::zeros({n, Y.size(1)}, Y.options());
    if (has_sparse) out.index_add_(0, cols, Y.index_select(0, rows) * vals);
    return out;
  };
  return hmt(op, omega.to(dt), rank, n_iter, apply, apply_t, /*cheap_qr=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlora, CompositeExplicitAutograd, m) {
  m.impl("svd_factored", &svd_factored);
  m.impl("lowrank_truncate", &lowrank_truncate);
  m.impl("rsvd", &rsvd);
  m.impl("rsvd_implicit", &rsvd_implicit);
}

}  // namespace fastlora
