// CPU kernel of fastlora::lora_linear_fwd (the overview of both directions is in
// lora_linear_bwd_cpu.cpp's header comment): the shrink xa = dropout(x) @ lora_A^T in blocks of
// rows (small_gemm on float32 / float64), the expand and bias written into y before the base GEMM
// accumulates on top of them, and the decode-sized path that streams W's rows (base_few_rows).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include "../lora_op_checks.h"
#include "lora_linear_blocks.h"
#include "rows_dot.h"

namespace fastlora {
namespace lora_cpu {
namespace {

// Whether the forward's float32 shrink (shrink_direct: dropout(x_b) @ lora_A^T per block of rows)
// runs as dot products along in_features (rows_dot_add_tall: each row of the block against
// lora_A's r rows) rather than in small_gemm, whose register tiles span whole 16-float vectors
// of r: at r <= 8 half of each tile or more is padding. Measured on 2 threads of an Ice Lake
// Xeon, forward op interleaved, p = 0.05 (dot / small_gemm, whole forward): AVX-512 r = 8
// 0.967 at M = 1024, 1536 -> 384, 0.977 at M = 2048, 1024^2, 0.968 at M = 1024, 384^2; r = 4
// 0.975 (M = 1024, 768^2); the shrink alone (out_features = 1, p = 0) 0.31 against 0.48 ms at
// M = 1024, in = 1536, r = 8. At r = 16 no padding is left and small_gemm held its own (shrink
// alone 0.94, but the forward at M = 2048, 1024^2 1.03); r = 32: 1.015. Under the AVX2 caps
// (FASTLORA_CPU_ISA=avx2, 8-float vectors, rows_dot's two-row tiles) r = 4: 0.970 / 0.984 /
// 0.979 (M = 1024 1536 -> 384, 768^2; M = 2048, 1024^2), r = 8 only 0.993-0.995, so the bound
// is 4 there. Batches of up to kSmallBatchRows rows, which otherwise take the BLAS's GEMM, gain
// too (r = 8: 0.94-0.98 at M = 64 / 128 with dropout, 0.97-1.00 without; r = 4 capped 0.977-0.998).
bool shrink_by_rows_dot(int64_t r) {
  return r > 0 && rows_dot_available() && r <= (small_gemm_isa() >= 4 ? 8 : 4);
}

// xa = dropout(x) @ lora_A^T on float32 / float64 when row_blocks_for_all_threads(M, K): per
// block of rows (one thread each), the dropped block goes to an L2-resident buffer and
// small_gemm (or, at the small float32 ranks of shrink_by_rows_dot, rows_dot_add_tall)
// shrinks it, so x is read once. A bfloat16 x (XT) under float32 adapters (T = float, PEFT's
// default on a bfloat16 model) is converted block by block into that buffer, exactly, and
// dropped there in float32, as PEFT's dropout(x.to(float32)) does; xa is in T.
template <typename T, typename XT = T>
Tensor shrink_direct(const Tensor& x, const Tensor& lora_A, const DropoutParams& d) {
  constexpr bool kConvert = !std::is_same_v<T, XT>;
  const int64_t M = x.size(0), K = x.size(1), r = lora_A.size(0);
  const int64_t rp = padded_rank<T>(r);
  Tensor xa = at::empty({M, r}, lora_A.options());
  const int64_t bm = direct_block_rows(M, K, sizeof(T));
  const int64_t nblocks = ceil_div(M, bm);
  const int64_t nthreads = std::max(1, at::get_num_threads());
  // The products' right operand: lora_A's rows in rows_dot's layout (r x rows_dot_width(K)) for
  // the dot-product plan (shrink_by_rows_dot), otherwise lora_A^T padded for small_gemm
  // (K x rp).
  Tensor Ap, At;
  if (std::is_same_v<T, float> && shrink_by_rows_dot(r)) {
    const Tensor Ac = lora_A.contiguous();
    Ap = at::empty({r, rows_dot_width(K)}, lora_A.options());
    permute_rows_for_dot(Ac.const_data_ptr<float>(), r, K, K, Ap.mutable_data_ptr<float>());
  } else {
    At = padded_rows<T>(lora_A, /*transpose=*/true, rp);
  }
  const T* Atp = At.defined() ? At.const_data_ptr<T>() : nullptr;
  // Per thread: the dropped (or converted) block and small_gemm's padded xa block (r < rp).
  const bool staged = d.active || kConvert;
  const bool padded_out = At.defined() && rp != r;
  const int64_t scratch_len = (staged ? bm * K : 0) + (padded_out ? bm * rp : 0);
  Tensor scratch = at::empty({nthreads, scratch_len}, lora_A.options());
  const XT* xp = x.const_data_ptr<XT>();
  T* xap = xa.mutable_data_ptr<T>();
  const int64_t ldx = x.stride(0);
  auto body = [&](int64_t b0, int64_t b1) {
    T* xd = scratch.mutable_data_ptr<T>() + at::get_thread_num() * scratch_len;
    T* out_pad = xd + (staged ? bm * K : 0);
    std::vector<T> mult;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * bm, n = std::min(bm, M - r0);
      const T* a;
      int64_t lda;
      if constexpr (kConvert) {
        for (int64_t i = 0; i < n; ++i) {
          bf16_row_to_float(reinterpret_cast<const uint16_t*>(xp + (r0 + i) * ldx), xd + i * K, K);
        }
        if (d.active) dropout_rows_raw<T, false>(xd, K, xd, K, nullptr, 0, n, K, r0, d, mult);
        a = xd;
        lda = K;
      } else {
        a = xp + r0 * ldx;
        lda = ldx;
        if (d.active) {
          dropout_rows_raw<T, false>(a, ldx, xd, K, nullptr, 0, n, K, r0, d, mult);
          a = xd;
          lda = K;
        }
      }
      if constexpr (std::is_same_v<T, float>) {
        if (Ap.defined()) {  // rows_dot adds into its output
          std::fill(xap + r0 * r, xap + (r0 + n) * r, 0.0f);
          rows_dot_add_tall(a, lda, n, K, Ap.const_data_ptr<float>(), r, xap + r0 * r, r);
          continue;
        }
      }
      if (!padded_out) {
        small_gemm(n, rp, K, T(1), a, lda, 1, Atp, rp, false, xap + r0 * r, r);
      } else {
        small_gemm(n, rp, K, T(1), a, lda, 1, Atp, rp, false, out_pad, rp);
        for (int64_t i = 0; i < n; ++i) std::copy(out_pad + i * rp, out_pad + i * rp + r, xap + (r0 + i) * r);
      }
    }
  };
  at::parallel_for(0, nblocks, 1, body);
  return xa;
}

// Whether the forward of a decode-sized batch goes through base_few_rows: float32 / float64 with
// at most two small_gemm vectors of rows (with AVX-512; AVX2: 8 rows; baseline: too few rows to
// give every thread row blocks). Measured at 4096^2, r = 64, p = 0.1 on 2 threads of a Xeon:
// with AVX-512 base_few_rows beats the BLAS up to those 32 rows even where there are row blocks
// (forward 6.2 against 7.0 ms at M = 32, 8.7 against 8.4 at M = 48; equal or better at 1024^2
// and 2048^2); under the AVX2 caps it wins at 8 rows (3.6 against 4.0 ms) and loses from 12
// (5.3 against 4.7 ms; 16 rows: 6.3 against 5.7).
bool few_rows_forward(const Tensor& x, bool direct) {
  const int64_t M = x.size(0);
  const at::ScalarType dtype = x.scalar_type();
  if ((dtype != at::kFloat && dtype != at::kDouble) || M == 0) return false;
  if (small_gemm_isa() == 3) return M <= 8;
  if (direct && small_gemm_isa() < 4) return false;
  return M <= 2 * (dtype == at::kFloat ? small_gemm_lanes<float>() : small_gemm_lanes<double>());
}

// Whether a half-precision x / weight batch takes the decode-sized float32 path with the 16-bit
// weight streamed (lora_linear_fwd_cpu): the rows base_few_rows takes on float32, for float16,
// and for bfloat16 on a CPU without native bf16 GEMMs. With them (AVX512-BF16 / AMX) the BLAS's
// bf16 base products win (and the LoRA part runs in fwd_bf16_native where the CPU has
// AVX512-BF16): they read half the bytes at twice the float32 rate (M = 8, 4096^2: 10.0 ms fwd
// + bwd through this path, 6.2 ms through the BLAS).
bool half_decode(const Tensor& x, const Tensor& weight) {
  const at::ScalarType dtype = x.scalar_type();
  if ((dtype != at::kBFloat16 && dtype != at::kHalf) || weight.scalar_type() != dtype || weight.numel() == 0 ||
      !half_via_float32(dtype) || fp16_native_plan(x)) {
    return false;
  }
  const int64_t M = x.size(0);
  return M > 0 && M <= 2 * small_gemm_lanes<float>() && !row_blocks_for_all_threads(M, x.size(1), sizeof(float));
}

// y = x @ W^T + bias_eff + s * xa @ B^T for a decode-sized batch, computed transposed: y^T = W @
// x^T, with x^T (K x M, rows padded to whole vectors) as the small right operand and W's rows as
// the left one, so each thread reads its share of W's rows once, front to back, in tasks of 8
// rows that also add the expand (B's rows against xa^T) and the bias, then write their 8 columns
// of y. The product is bound by reading W; the BLAS reads it at ~9 GB/s here for M = 8 against
// the ~27 GB/s two threads stream: measured at M = 8, in = out = 4096 on 2 threads, ~3 ms for
// the base product against ~7 ms through the BLAS.
// A bfloat16 weight (WT) under float32 x (T = float): each task converts its 8 rows to float32 in
// a per-thread buffer right before its product (exact), so the decode step of a bfloat16 model
// reads W in bfloat16 once, with no float32 copy of the whole weight.
template <typename T, typename WT = T>
Tensor base_few_rows(const Tensor& x, const Tensor& weight, const Tensor& bias_eff, const Tensor& xa,
                     const Tensor& lora_B, double scaling) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = xa.size(1);
  const int64_t L = small_gemm_lanes<T>();
  const int64_t Mp = ceil_div(M, L) * L;
  // W @ x^T in rows_dot_add for a 16-bit W from AVX2 up, and for a float32 W on AVX2 (level 3):
  // the same arithmetic for every W dtype, so at level 3 a bfloat16 / float16 W gives the
  // float32 op's result on its float32 copy, bitwise. x goes there permuted (xp), elsewhere
  // transposed (xt) for small_gemm.
  constexpr bool float_rows = std::is_same_v<T, float>;
  const bool dot_rows =
      float_rows && rows_dot_available() && (!std::is_same_v<WT, float> || small_gemm_isa() == 3);
  Tensor xt, xp;
  if (dot_rows) {
    xp = at::empty({M, rows_dot_width(K)}, x.options());
    if constexpr (float_rows) {
      permute_rows_for_dot(x.const_data_ptr<float>(), M, K, x.stride(0), xp.mutable_data_ptr<float>());
    }
  } else {
    xt = at::zeros({K, Mp}, x.options());  // pad columns stay zero
    transpose_into(x.const_data_ptr<T>(), M, K, x.stride(0), xt.mutable_data_ptr<T>(), Mp);
  }
  Tensor xat = at::zeros({r, Mp}, x.options());
  const Tensor xa_c = xa.contiguous();
  transpose_into(xa_c.const_data_ptr<T>(), M, r, r, xat.mutable_data_ptr<T>(), Mp);
  const Tensor W = row_major(weight);
  const Tensor Bc = lora_B.contiguous();
  const Tensor bias_c = bias_eff.defined() ? bias_eff.contiguous() : bias_eff;
  Tensor y = at::empty({M, N}, x.options());
  const T* xtp = dot_rows ? nullptr : xt.const_data_ptr<T>();
  const T* xatp = xat.const_data_ptr<T>();
  const WT* wp = W.const_data_ptr<WT>();
  const T* bp = Bc.const_data_ptr<T>();
  const T* biasp = bias_c.defined() ? bias_c.const_data_ptr<T>() : nullptr;
  T* yp = y.mutable_data_ptr<T>();
  const int64_t ldw = W.stride(0);
  const T s = static_cast<T>(scaling);
  constexpr int64_t kRows = 8;  // rows of W per task
  at::parallel_for(0, ceil_div(N, kRows), 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> yt(kRows * Mp);
    std::vector<T> wrows(std::is_same_v<T, WT> || dot_rows ? 0 : kRows * K);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j0 = t * kRows, nt = std::min(kRows, N - j0);
      // y^T rows j0 .. j0 + nt: s * B @ xa^T, then += W @ x^T
      small_gemm(nt, Mp, r, s, bp + j0 * r, r, 1, xatp, Mp, false, yt.data(), Mp);
      if (dot_rows) {
        if constexpr (float_rows) rows_dot_add(wp + j0 * ldw, ldw, nt, K, xp.const_data_ptr<float>(), M, yt.data(), Mp);
      } else if constexpr (std::is_same_v<T, WT>) {
        small_gemm(nt, Mp, K, T(1), wp + j0 * ldw, ldw, 1, xtp, Mp, true, yt.data(), Mp);
      } else {
        for (int64_t jj = 0; jj < nt; ++jj) {
          const uint16_t* row = reinterpret_cast<const uint16_t*>(wp + (j0 + jj) * ldw);
          if constexpr (std::is_same_v<WT, at::Half>) {
            fp16_row_to_float(row, wrows.data() + jj * K, K);
          } else {
            bf16_row_to_float(row, wrows.data() + jj * K, K);
          }
        }
        small_gemm(nt, Mp, K, T(1), wrows.data(), K, 1, xtp, Mp, true, yt.data(), Mp);
      }
      for (int64_t jj = 0; jj < nt; ++jj) {
        const T b = biasp ? biasp[j0 + jj] : T(0);
        for (int64_t i = 0; i < M; ++i) yp[i * N + j0 + jj] = yt[jj * Mp + i] + b;
      }
    }
  });
  return y;
}

// The expand's operands with the bias as one more term (see lora_linear_fwd_cpu): xa1 = [s xa | 1]
// (M x (r + 1)) and bt1 = [lora_B^T ; bias] ((r + 1) x N), written in two loops. Built from
// ATen's narrow / copy_ / mul_ / fill_ views they cost the forward 23-48 us more at M = 256-1024
// (forward op, interleaved: 0.937 at M = 256, 384^2, r = 8; 0.962 at M = 1024; 0.979 at M = 512,
// 768^2, r = 16; 0.992 at M = 2048, 1024^2; under the AVX2 caps 0.976 / 0.997).
template <typename T>
void expand_operands_with_bias(const Tensor& xa, const Tensor& lora_B, const Tensor& bias, double scaling,
                               Tensor& xa1, Tensor& bt1) {
  const int64_t M = xa.size(0), r = xa.size(1), N = lora_B.size(0);
  const Tensor xac = xa.contiguous(), Bc = lora_B.contiguous(), bc = bias.contiguous();
  const T* xap = xac.const_data_ptr<T>();
  using acc_t = acc_type_t<T>;  // as ATen's mul_ by a scalar: in float for 16-bit types
  const acc_t s = static_cast<acc_t>(scaling);
  T* x1 = xa1.mutable_data_ptr<T>();
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < r; ++j) x1[i * (r + 1) + j] = static_cast<T>(static_cast<acc_t>(xap[i * r + j]) * s);
    x1[i * (r + 1) + r] = T(1);
  }
  T* b1 = bt1.mutable_data_ptr<T>();
  const int64_t ldb1 = bt1.stride(0);
  transpose_into(Bc.const_data_ptr<T>(), N, r, r, b1, ldb1);
  std::copy(bc.const_data_ptr<T>(), bc.const_data_ptr<T>() + N, b1 + r * ldb1);
}

}  // namespace

// xa = dropout(x) @ lora_A^T (x and lora_A of one dtype). Also the shrink of the quantized-base
// family (lora_quantized_linear_cpu.cpp).
Tensor shrink(const Tensor& x, const Tensor& lora_A, const DropoutParams& d) {
  const int64_t M = x.size(0), K = x.size(1), r = lora_A.size(0);
  // small_gemm when there are blocks for every thread (up to kSmallGemmMaxRank on float32; the
  // BLAS above it); a small batch instead gets the BLAS's GEMM and no transposed copy of lora_A
  // (measured faster at M = 8, and up to 128 rows below).
  if (x.scalar_type() != lora_A.scalar_type()) {  // a half-precision x under float32 adapters
    if (x.scalar_type() == at::kBFloat16 && row_blocks_for_all_threads(M, K, sizeof(float))) {
      return shrink_direct<float, at::BFloat16>(x, lora_A, d);
    }
    return shrink(x.to(lora_A.scalar_type()), lora_A, d);
  }
  // Small batches (up to kSmallBatchRows) too: shrink_direct's transposed copy of lora_A (0.2
  // ms at r = 64, in = 4096 under the AVX2 caps) costs more than it saves there.
  // The dot-product plan (shrink_by_rows_dot) wins there too, its copy of lora_A included.
  const bool direct = (M > kSmallBatchRows || (x.scalar_type() == at::kFloat && shrink_by_rows_dot(r))) &&
                      row_blocks_for_all_threads(M, K, x.element_size());
  if (x.scalar_type() == at::kFloat && rank_products_in_blas(M, r)) {
    if (!d.active) return at::mm(x, lora_A.t());
    Tensor xd = at::empty({M, K}, x.options());
    dropout_rows_(x, xd, 0, d);
    return at::mm(xd, lora_A.t());
  }
  if (direct && x.scalar_type() == at::kFloat) return shrink_direct<float>(x, lora_A, d);
  if (direct && x.scalar_type() == at::kDouble) return shrink_direct<double>(x, lora_A, d);
  if (!d.active || M == 0) return at::mm(x, lora_A.t());
  // One thread per block of rows: dropout into an L2-resident buffer, then the shrink GEMM
  // on it (single-threaded inside the parallel region), so x is read once.
  Tensor xa = at::empty({M, r}, x.options());
  const int64_t bm = std::min(M, block_rows(K, x.element_size()));
  const int64_t nblocks = ceil_div(M, bm);
  auto body = [&](int64_t b0, int64_t b1) {
    // Worker threads do not inherit the caller's dispatch state: we are below autograd.
    at::AutoDispatchBelowAutograd below_autograd;
    Tensor xdrop = at::empty({bm, K}, x.options());
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * bm, n = std::min(bm, M - r0);
      Tensor xd = xdrop.narrow(0, 0, n);
      dropout_rows_(x.narrow(0, r0, n), xd, r0, d);
      Tensor xa_blk = xa.narrow(0, r0, n);
      at::mm_out(xa_blk, xd, lora_A.t());
    }
  };
  run_blocks(nblocks, body);
  return xa;
}

namespace {

// Half-precision x / weight with float32 adapters where the half-precision GEMM is used (bfloat16
// on a CPU with native bf16 GEMMs, float16 batches too small to convert the weight), PEFT's way:
// the base product in x's dtype, the LoRA branch in float32 on x's float32 values (the shrink as
// in the float32 kernel, dropout on the float32 values), the branch added to the rounded base
// output in float32 and the sum rounded once more, as PEFT's
// `result + lora_B(lora_A(dropout(x.to(float32)))) * scaling` then `.to(x.dtype)` does. bfloat16
// goes through neither a float32 copy of x nor an M x N float32 branch (shrink,
// add_expand_into_bf16: at M = 2048, in = out = 1024 those took the forward to +25% over the base).
std::tuple<Tensor, Tensor> fwd_mixed_half(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                            const Tensor& lora_A, const Tensor& lora_B, double scaling,
                                            const DropoutParams& d, const std::optional<Tensor>& lora_B_bias) {
  const int64_t M = x.size(0), r = lora_A.size(0);
  auto bias_add = [&] {  // the float32 bias and s * lora_B_bias added with the branch
    Tensor add;
    if (bias) add = bias->to(at::kFloat);
    if (lora_B_bias) add = add.defined() ? add.add(*lora_B_bias, scaling) : lora_B_bias->mul(scaling);
    return add.defined() ? add.contiguous() : add;
  };
  if (x.scalar_type() == at::kBFloat16 && M > 0 && M <= kBf16DecodeRows && r > 0 && bf16_decode_kernels_available()) {
    // A decode-sized batch: the branch in lora_linear_bf16_decode.cpp's kernels, on x and the
    // float32 adapters in place, added onto the rounded base product.
    Tensor y = at::mm(x, weight.t());
    const Tensor A = lora_A.contiguous(), B = lora_B.contiguous(), add = bias_add();
    Tensor xa = at::empty({M, r}, lora_A.options());
    fwd_bf16_decode(reinterpret_cast<const uint16_t*>(x.const_data_ptr<at::BFloat16>()), x.stride(0),
                    A.const_data_ptr<float>(), B.const_data_ptr<float>(),
                    add.defined() ? add.const_data_ptr<float>() : nullptr, M, x.size(1), weight.size(0), r,
                    static_cast<float>(scaling), d, xa.mutable_data_ptr<float>(),
                    reinterpret_cast<uint16_t*>(y.mutable_data_ptr<at::BFloat16>()));
    return {y, xa};
  }
  const Tensor xa = shrink(x, lora_A, d);
  if (x.scalar_type() == at::kBFloat16) {
    // The bias goes in with the branch: oneDNN's bf16 GEMM adding a bias (beta = 1) took 0.6 ms
    // more than the plain product (10.7 vs 10.1 ms at M = 2048, in = out = 1024).
    Tensor y = at::mm(x, weight.t());
    add_expand_into_bf16(y, xa, lora_B, bias_add(), scaling);
    return {y, xa};
  }
  Tensor y = bias ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  const Tensor Bt = transposed_copy(lora_B);  // see the BLAS note in lora_linear_fwd_cpu
  y.add_(lora_B_bias ? at::addmm(*lora_B_bias, xa, Bt, scaling, scaling) : at::mm(xa, Bt).mul_(scaling));
  return {y, xa};
}

}  // namespace

// In blocks of rows whose float32 branch stays in L2 (no M x N float32 tensor).
void add_expand_into_bf16(Tensor& y, const Tensor& xa, const Tensor& lora_B, const Tensor& add, double scaling) {
  const int64_t M = y.size(0), N = y.size(1), r = xa.size(1);
  if (M == 0 || N == 0) return;
  const Tensor Bt = transposed_copy(lora_B);  // r x N
  const Tensor addc = add.defined() ? add.contiguous() : add;
  const float* lb = addc.defined() ? addc.const_data_ptr<float>() : nullptr;
  const float* xap = xa.const_data_ptr<float>();
  const float* btp = Bt.const_data_ptr<float>();
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.mutable_data_ptr<at::BFloat16>());
  constexpr int64_t kCols = 512;  // columns per chunk: an L2-sized float32 block of the branch
  const int64_t bm = std::min<int64_t>(M, 64);
  at::parallel_for(0, ceil_div(M, bm), 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> branch(bm * kCols);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * bm, n = std::min(bm, M - r0);
      for (int64_t j0 = 0; j0 < N; j0 += kCols) {
        const int64_t nc = std::min(kCols, N - j0);
        small_gemm(n, nc, r, static_cast<float>(scaling), xap + r0 * r, r, 1, btp + j0, N, false, branch.data(), nc);
        for (int64_t i = 0; i < n; ++i) {
          add_row_into_bf16(yp + (r0 + i) * N + j0, branch.data() + i * nc, nullptr, lb ? lb + j0 : nullptr, nc);
        }
      }
    }
  });
}

std::tuple<Tensor, Tensor> lora_linear_fwd_cpu(const Tensor& x_in, const Tensor& weight,
                                               const std::optional<Tensor>& bias, const Tensor& lora_A,
                                               const Tensor& lora_B, double scaling, double dropout_p,
                                               const Tensor& seed, const std::optional<Tensor>& lora_B_bias) {
  check_lora_linear_fwd_args(x_in, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_B_bias);
  // Half precision forward through float32 (see to_float), except float16 batches so small
  // that converting the weight costs more than the float16 GEMM (kHalfViaFloatMinRows).
  const at::ScalarType dtype = x_in.scalar_type(), adapter_dtype = lora_A.scalar_type();
  const bool mixed = adapter_dtype != dtype;
  if (half_decode(x_in, weight)) {
    // A decode-sized float16 batch, or bfloat16 without native bf16 GEMMs: the float32 forward
    // on float32 copies of x and the adapters (a few rows, r-sized), its base product streaming
    // the 16-bit weight (base_few_rows<float, Half / BFloat16>) instead of converting all of it
    // to float32 first (21 ms at 4096^2, more than the whole float32 decode step); one rounding.
    const Tensor x = to_float(row_major(x_in)), A = to_float(lora_A);
    const DropoutParams d = DropoutParams::make(dropout_p, seed_value(seed));
    const Tensor xa = shrink(x, A, d);
    Tensor bias_eff;
    if (bias) bias_eff = bias->to(at::kFloat);
    if (lora_B_bias) {
      const Tensor lb = lora_B_bias->to(at::kFloat).mul(scaling);
      bias_eff = bias_eff.defined() ? bias_eff.add(lb) : lb;
    }
    const Tensor y = dtype == at::kHalf
                         ? base_few_rows<float, at::Half>(x, weight, bias_eff, xa, to_float(lora_B), scaling)
                         : base_few_rows<float, at::BFloat16>(x, weight, bias_eff, xa, to_float(lora_B), scaling);
    return {y.to(dtype), xa.to(adapter_dtype)};
  }
  if (half_via_float32(dtype) && !fp16_native_plan(x_in) &&
      (dtype == at::kBFloat16 || x_in.size(0) >= kHalfViaFloatMinRows)) {
    auto [y, xa] = lora_linear_fwd_cpu(to_float(x_in), float32_weight(weight), to_float(bias), to_float(lora_A),
                                       to_float(lora_B), scaling, dropout_p, seed, to_float(lora_B_bias));
    return {y.to(dtype), xa.to(adapter_dtype)};
  }
  const Tensor x = row_major(x_in);
  const int64_t M = x.size(0), K = x.size(1);
  const DropoutParams d = DropoutParams::make(dropout_p, seed_value(seed));
  if (mixed) return fwd_mixed_half(x, weight, bias, lora_A, lora_B, scaling, d, lora_B_bias);
  if (bf16_native_lora(x, lora_A, weight.size(0))) {
    return fwd_bf16_native(x, weight, bias, lora_A, lora_B, scaling, d, lora_B_bias);
  }
  const bool direct = row_blocks_for_all_threads(M, K, x.element_size());
  const Tensor xa = shrink(x, lora_A, d);

  // y = bias + s * lora_B_bias + s * xa @ B^T, then y += x @ W^T inside the base GEMM.
  Tensor bias_eff;
  if (bias && lora_B_bias) {
    bias_eff = bias->add(*lora_B_bias, scaling);
  } else if (bias) {
    bias_eff = *bias;
  } else if (lora_B_bias) {
    bias_eff = lora_B_bias->mul(scaling);
  }
  if (few_rows_forward(x, direct)) {
    Tensor y = x.scalar_type() == at::kFloat ? base_few_rows<float>(x, weight, bias_eff, xa, lora_B, scaling)
                                             : base_few_rows<double>(x, weight, bias_eff, xa, lora_B, scaling);
    return {y, xa};
  }
  // lora_B^T as a row-major r x N copy (r * N elements) for large batches: the BLAS ran the
  // expand on the transposed view 4x slower at M = 8, in = out = 4096 (0.13 vs 0.03 ms), but
  // the copy itself takes ~0.2 ms at r = 64, N = 4096, more than the view costs up to
  // kSmallBatchRows rows (with the shrink above, forward at 4096^2, r = 64, p = 0.1 under the
  // AVX2 caps: 9.2 -> 8.2 ms at M = 32, 24.3 -> 23.5 at M = 128; on the Xeon 9.8 -> 9.2 at M =
  // 64; at M = 512, 2048^2, r = 16 the copy wins: 12.9 against 13.1 ms). Not for float16 (only
  // small batches get here): its GEMM is fast only on the transposed view (0.36 vs 0.95 ms).
  Tensor y;
  if (x.scalar_type() == at::kHalf || M <= kSmallBatchRows) {
    y = bias_eff.defined() ? at::addmm(bias_eff, xa, lora_B.t(), 1.0, scaling) : at::mm(xa.mul(scaling), lora_B.t());
  } else if (bias_eff.defined()) {
    const int64_t N = weight.size(0), r = lora_A.size(0);
    // The bias as one more term of the expand: [s xa | 1] @ [B^T ; bias], one GEMM of depth r + 1
    // that writes y once, where addmm broadcast the bias into y first and then accumulated onto
    // it (the expand alone 1.0-1.2 ms against 0.5-0.6 at M = 2048, N = 1024, r = 16, MKL under
    // the AVX2 caps; the forward 21.7 vs 22.3 ms there, interleaved; 12.6 vs 12.8 natively).
    // With small_gemm's AVX2 build the float32 expand runs there, over blocks of rows, its B
    // operand [B^T ; bias] at a padded row stride (panel_row_stride): on a Zen 3 EPYC (forward
    // op, 2 threads, both in random order per round, median of per-round differences) -0.18 ms
    // of 27 at M = 2048, 1024^2, r = 16 and -0.42 ms at M = 512, 2048^2 against MKL's GEMM of
    // depth r + 1 (one thread in isolation: 1.16-1.2 against ~0.92 ms at 1024^2; 14.2 against
    // 12.7 ms at 4096^2, r = 64; unpadded, small_gemm was no faster than MKL). Not measured
    // with AVX-512, where MKL (on Intel) runs its own AVX-512 kernels: the BLAS keeps it there.
    const bool sg = x.scalar_type() == at::kFloat && small_gemm_isa() == 3;
    const int64_t ldn = sg ? panel_row_stride(N, sizeof(float)) : N;
    Tensor xa1 = at::empty({M, r + 1}, xa.options());
    Tensor bt1_buf = at::empty({r + 1, ldn}, xa.options());
    Tensor bt1 = bt1_buf.narrow(1, 0, N);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xa.scalar_type(), "fastlora_expand_operands", [&] {
      expand_operands_with_bias<scalar_t>(xa, lora_B, bias_eff, scaling, xa1, bt1);
    });
    if (sg) {
      y = at::empty({M, N}, x.options());
      const float* a1 = xa1.const_data_ptr<float>();
      const float* b1 = bt1_buf.const_data_ptr<float>();
      float* yp = y.mutable_data_ptr<float>();
      constexpr int64_t kRows = 64;  // per task: 64 rows of y (256 KiB at 1024 columns)
      at::parallel_for(0, ceil_div(M, kRows), 1, [&](int64_t c0, int64_t c1) {
        const int64_t i0 = c0 * kRows, i1 = std::min(M, c1 * kRows);
        small_gemm(i1 - i0, N, r + 1, 1.0f, a1 + i0 * (r + 1), r + 1, 1, b1, ldn, false, yp + i0 * N, N);
      });
    } else {
      y = at::mm(xa1, bt1);
    }
  } else {
    y = at::mm(xa.mul(scaling), transposed_copy(lora_B));
  }
  y.addmm_(x, weight.t());
  return {y, xa};
}

}  // namespace lora_cpu

TORCH_LIBRARY_IMPL(fastlora, CPU, m) {
  m.impl("lora_linear_fwd", &lora_cpu::lora_linear_fwd_cpu);
}

}  // namespace fastlora
