// Helpers shared by the CPU kernels of fastlora::lora_linear_fwd / _bwd
// (lora_linear_fwd_cpu.cpp, lora_linear_bwd_cpu.cpp): the dropout mask applied to blocks of
// rows from the counter-based hash (no mask is ever materialised), the row blocking of the
// L2-sized passes, small_gemm operand padding, and the half-precision route through float32.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "../dropout_hash.h"
#include "cpu_utils.h"
#include "small_gemm.h"
#include "weight_cache.h"

namespace fastlora {
namespace lora_cpu {

using at::Tensor;

// Per-column multipliers (scale if kept, 0 if dropped) of one row of the dropout mask, for
// columns col0 .. col0 + cols - 1 (defined in lora_linear_blocks.cpp, with target clones).
void row_multipliers_f32(float* __restrict out, int64_t cols, int64_t col0, uint32_t row_h, uint32_t seed_hi,
                         uint32_t threshold, float scale);
void row_multipliers_f64(double* __restrict out, int64_t cols, int64_t col0, uint32_t row_h, uint32_t seed_hi,
                         uint32_t threshold, double scale);

// dst[j] = bfloat16(src[j] * mult[j]) when mult is given, else bfloat16(src[j] + add[j]) when
// add is, else bfloat16(src[j]) (float_to_bf16_bits); and dst[j] = bfloat16(float(src[j]) *
// mult[j]) for bfloat16 src. Defined in lora_linear_blocks.cpp, with target clones.
void round_row_bf16(uint16_t* __restrict dst, const float* __restrict src, const float* __restrict mult,
                    const float* __restrict add, int64_t n);
void scale_row_bf16(uint16_t* __restrict dst, const uint16_t* __restrict src, const float* __restrict mult,
                    int64_t n);
// y[j] = bfloat16(float(y[j]) + add[j] * mult[j]) when mult is given, else bfloat16(float(y[j]) +
// (add[j] + add2[j])), add2 optional (lora_linear_blocks.cpp): a LoRA term added to the rounded
// base product, the sum rounded once.
void add_row_into_bf16(uint16_t* __restrict y, const float* __restrict add, const float* __restrict mult,
                       const float* __restrict add2, int64_t n);

// The multipliers of columns col0 .. col0 + cols - 1 of row `row` into mult, in the
// accumulation type.
template <typename acc_t>
inline void row_mask(acc_t* mult, int64_t cols, int64_t col0, int64_t row, const DropoutParams& d) {
  const uint32_t h = d.row_hash(row);
  if constexpr (std::is_same_v<acc_t, double>) {
    row_multipliers_f64(mult, cols, col0, h, d.seed_hi, d.threshold, d.scale);
  } else {
    row_multipliers_f32(mult, cols, col0, h, d.seed_hi, d.threshold, static_cast<float>(d.scale));
  }
}

// One row of dropout_rows_raw on float32 with the multipliers never stored: dst[j] = src[j] *
// m[j] (src may be dst) and, when also is not null, also[j] *= m[j], m the multipliers of
// row_multipliers_f32 (the same bits). Returns false, doing nothing, where there is no such
// kernel (small_gemm's baseline build, or a compiler without the intrinsics used).
bool dropout_row_f32(float* dst, const float* src, float* also, int64_t cols, int64_t col0, uint32_t row_h,
                     uint32_t seed_hi, uint32_t threshold, float scale);

// The float32 backward's x-side products of a block of n rows under dropout
// (lora_bwd_x_side.cpp), the mask (rows row0 .. row0 + n - 1) applied in registers: pa (r x K,
// row stride K) += g^T @ dropout(x) and, when gx is not null, gx = mask * (g[:, :r] @ a), a =
// lora_A (r x K, contiguous), g n x r with row stride ldg. Returns false, doing nothing, where
// it does not apply: no dropout (d.active false; small_gemm is faster there), a rank above 16,
// small_gemm's builds below AVX-512, or a compiler without the intrinsics used.
bool lora_bwd_x_side_f32(const float* x, int64_t ldx, const float* g, int64_t ldg, const float* a, int64_t r,
                         int64_t K, int64_t n, int64_t row0, const DropoutParams& d, float* gx, int64_t ldgx,
                         float* pa);

// dst[j] = src[j] * mult[j], a[j] *= mult[j], dst[j] = float(src[j]) for bfloat16 bits
// (lora_linear_blocks.cpp, target clones).
void mul_row_f32(float* __restrict dst, const float* __restrict src, const float* __restrict mult, int64_t n);
void mul_row_inplace_f32(float* __restrict a, const float* __restrict mult, int64_t n);
void bf16_row_to_float(const uint16_t* __restrict src, float* __restrict dst, int64_t n);
// The same for float16 bits (exact).
void fp16_row_to_float(const uint16_t* __restrict src, float* __restrict dst, int64_t n);

// For `rows` rows: dst[i, :] = src[i, :] * mask(row0 + i, :) * scale (src may alias dst) and,
// when kAlso, also[i, :] *= the same multipliers in place: backward's two uses of one mask
// (dropout(x) for d lora_A, the mask on the dX LoRA term) from a single hash evaluation per
// element. Math in float32 (float64 for double), rounded once to scalar_t, as in the reference.
// The pointers may start at column col0 of their matrices (the mask is that of columns col0 ..
// col0 + cols - 1); mult is scratch.
template <typename scalar_t, bool kAlso>
inline void dropout_rows_raw(const scalar_t* s, int64_t lds, scalar_t* o, int64_t ldd, scalar_t* a, int64_t lda,
                      int64_t rows, int64_t cols, int64_t row0, const DropoutParams& d,
                      std::vector<acc_type_t<scalar_t>>& mult, int64_t col0 = 0) {
  using acc_t = acc_type_t<scalar_t>;
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* si = s + i * lds;
    scalar_t* oi = o + i * ldd;
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (dropout_row_f32(oi, si, kAlso ? a + i * lda : nullptr, cols, col0, d.row_hash(row0 + i), d.seed_hi,
                          d.threshold, static_cast<float>(d.scale))) {
        continue;
      }
    }
    // Sized here, not on entry: the fused float32 row above never touches the scratch.
    if (mult.size() < static_cast<size_t>(cols)) mult.resize(cols);
    row_mask(mult.data(), cols, col0, row0 + i, d);
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (si == oi) {  // in place
        mul_row_inplace_f32(oi, mult.data(), cols);
      } else {
        mul_row_f32(oi, si, mult.data(), cols);
      }
      if constexpr (kAlso) mul_row_inplace_f32(a + i * lda, mult.data(), cols);
      continue;
    }
    for (int64_t j = 0; j < cols; ++j) {
      oi[j] = static_cast<scalar_t>(static_cast<acc_t>(si[j]) * mult[j]);
    }
    if constexpr (kAlso) {
      scalar_t* ai = a + i * lda;
      for (int64_t j = 0; j < cols; ++j) {
        ai[j] = static_cast<scalar_t>(static_cast<acc_t>(ai[j]) * mult[j]);
      }
    }
  }
}

// dropout_rows_raw on tensors (2-D, rows contiguous), rows split over threads.
template <typename scalar_t, bool kAlso>
inline void dropout_rows(const Tensor& src, Tensor& dst, Tensor* also, int64_t row0, const DropoutParams& d) {
  const int64_t cols = src.size(1);
  const scalar_t* s = src.const_data_ptr<scalar_t>();
  scalar_t* o = dst.mutable_data_ptr<scalar_t>();
  scalar_t* a = kAlso ? also->mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t lds = src.stride(0), ldd = dst.stride(0), lda = kAlso ? also->stride(0) : 0;
  at::parallel_for(0, src.size(0), 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_type_t<scalar_t>> mult(cols);
    dropout_rows_raw<scalar_t, kAlso>(s + begin * lds, lds, o + begin * ldd, ldd, kAlso ? a + begin * lda : nullptr,
                                      lda, end - begin, cols, row0 + begin, d, mult);
  });
}

inline void dropout_rows_(const Tensor& src, Tensor& dst, int64_t row0, const DropoutParams& d) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "fastlora_dropout_rows",
                                  [&] { dropout_rows<scalar_t, false>(src, dst, nullptr, row0, d); });
}

inline void dropout_rows_pair_(const Tensor& x, Tensor& xd, Tensor& gx, int64_t row0, const DropoutParams& d) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastlora_dropout_rows_pair",
                                  [&] { dropout_rows<scalar_t, true>(x, xd, &gx, row0, d); });
}

// Rows per block in the blocked loops: a block of each M x K / M x N operand (~256 KiB) should
// stay in L2 while the few small GEMMs on it run, one thread per block.
inline int64_t block_rows(int64_t cols, int64_t elem_size) {
  int64_t rows = (int64_t{1} << 18) / std::max<int64_t>(1, cols * elem_size);
  return std::max<int64_t>(16, rows / 16 * 16);
}

inline bool blocks_run_parallel(int64_t nblocks) { return nblocks >= 2 * at::get_num_threads(); }

// Runs body over the row blocks: one thread per block when there are enough blocks to keep
// every thread busy, otherwise sequentially so that each small GEMM gets all threads (a
// decode-sized batch is one block: single-threaded blocks would leave cores idle).
template <typename F>
inline void run_blocks(int64_t nblocks, const F& body) {
  if (blocks_run_parallel(nblocks)) {
    at::parallel_for(0, nblocks, 1, body);
  } else if (nblocks > 0) {
    body(0, nblocks);
  }
}

inline int64_t seed_value(const Tensor& seed) { return seed.item<int64_t>(); }

// acc += alpha * a @ b, where acc may be float32 while a, b are half precision: then the
// block product is rounded once to the input dtype and summed in float32.
inline void accumulate_mm(Tensor& acc, const Tensor& a, const Tensor& b, double alpha) {
  if (acc.scalar_type() == a.scalar_type()) {
    acc.addmm_(a, b, 1.0, alpha);
  } else {
    acc.add_(at::mm(a, b), alpha);
  }
}

// bm lowered (to a multiple of 8) until the M / bm blocks split evenly between the threads:
// at::parallel_for gives each thread a run of ceil(blocks / threads) of them, so 7 blocks on 2
// threads (M = 1024, in = out = 384: 160-row blocks) left one thread 640 rows and the other 384.
// Measured on 2 threads of the Xeon, interleaved, p = 0.1, the backward's LoRA part: 0.39
// against 0.50 ms there (r = 8), 1.17 against 1.28 at 1024 x 768^2 (r = 16), 0.52 against 0.56
// at M = 1100; under the AVX2 caps 0.38 / 0.41 and 0.95 / 1.06 (M = 1000, 768^2). The forward's
// shrink moved within the noise (0.97-1.03).
inline int64_t balanced_block_rows(int64_t M, int64_t bm) {
  const int64_t nthreads = std::max(1, at::get_num_threads());
  const int64_t nblocks = ceil_div(M, bm);
  if (nblocks % nthreads == 0 || nblocks < nthreads) return bm;
  const int64_t even = ceil_div(nblocks, nthreads) * nthreads;
  return std::max<int64_t>(1, ceil_div(ceil_div(M, even), 8) * 8);
}

// A row stride of at least `cols` elements of `size` bytes for a block that small_gemm reads as
// its B operand: a tile walks down a panel of B's rows (one cache line each) and every row tile
// of C reuses the panel from L1, but at a multiple of 1 KiB those rows fall in at most 4 of the
// L1's 64 sets (one set at 4 KiB), more lines than a set holds, and each tile reloads the panel
// from L2. Measured on a Zen 3 EPYC (AVX2): the backward's dX term g @ lora_A and d lora_A
// product in isolation (one thread, 32-row blocks, r = 16, in = 1024 / 2048) at 57-67 GFLOP/s
// with a 4 KiB / 8 KiB stride, 79-82 padded; at r = 64, 4096^2, 64-row blocks 64-66 against 86;
// the backward op's LoRA part in place (both in random order per round, median of per-round
// differences) -2.0 ms of 30.1 at M = 2048, 4096^2, r = 64, p = 0.1 (without the dX term), -0.05
// of 2.18 at 1024^2, r = 16.
inline int64_t panel_row_stride(int64_t cols, int64_t size) {
  const int64_t bytes = cols * size;
  return bytes >= 1024 && bytes % 1024 == 0 ? cols + 64 / size : cols;
}

// Rows per block of the small_gemm paths: L2-sized but at least 64 (the d lora_A / d lora_B
// partials, r x in and r x out, are read and written once per block: with 16-row blocks at
// in = out = 4096, r = 64 that traffic ran those products at half speed), and small enough (down
// to 8 rows) that every thread gets two blocks: small_gemm is single-threaded, so a batch of one
// or two blocks would leave cores idle. Then balanced_block_rows, which may take a block below
// those 64 rows (641 rows of 4096 features on 2 threads: 12 blocks of 56 instead of 11 of 64).
inline int64_t direct_block_rows(int64_t M, int64_t cols, int64_t elem_size) {
  const int64_t nthreads = std::max(1, at::get_num_threads());
  const int64_t per_thread = ceil_div(ceil_div(M, 2 * nthreads), 8) * 8;
  const int64_t cache_rows = std::max<int64_t>(64, block_rows(cols, elem_size));
  return balanced_block_rows(M, std::max<int64_t>(1, std::min({M, cache_rows, std::max<int64_t>(8, per_thread)})));
}

// Rows up to which a float32 / float64 batch counts as small: the backward splits its columns
// between the threads instead of its rows, and the forward runs its rank-r products through the
// BLAS on the adapters as they are, with no transposed copies (lora_linear_fwd_cpu.cpp /
// lora_linear_bwd_cpu.cpp, measured there).
constexpr int64_t kSmallBatchRows = 128;

// The highest rank whose float32 LoRA products run in small_gemm (its register tiles hold one to
// four vectors of r) for batches of at least kBlasRankMinRows rows; above it the forward's shrink
// and the backward's rank-r products are whole-batch BLAS GEMMs (multithreaded), dropout(x)
// materialised once. Measured (Ice Lake Xeon, 2 threads, the ops interleaved, p = 0.05; op time
// through the BLAS / through small_gemm, forward / backward): natively 0.96 / 0.88 at r = 128
// (M = 512, 2048^2: the backward's LoRA part 7.4 against 11.3 ms) and 0.97 / 0.89 (M = 2048,
// 1024^2), 0.92 / 0.77 at r = 256, 1.00 / 0.95 at r = 96, but 1.00-1.04 at r = 64 (M = 2048,
// 4096^2: 1.04 / 1.04); under the AVX2 caps 0.99-1.01 / 0.92-0.95 at r = 128, 0.95 / 0.80 at
// r = 256, 1.00 / 0.94 at r = 96, 1.02-1.06 / 0.97-1.00 at r = 64.
constexpr int64_t kSmallGemmMaxRank = 64;
// Fewer rows keep small_gemm's plans at every rank (the decode-sized ones read W once for both
// products of a direction): at M = 64 the BLAS backward measured 0.84-0.96 natively and
// 0.81-0.96 capped (2048^2 r = 256, 4096^2 r = 128 and 256; M = 128: 0.80-1.00), at M = 32 up
// to 1.12 (4096^2, r = 128), at M = 16 up to 1.14, at M = 8 1.37-1.45.
constexpr int64_t kBlasRankMinRows = 64;

// Whether a float16 batch takes the native float16 plan: on a CPU with native float16 GEMMs
// (native_fp16_gemm: AVX512-FP16), batches of more than 8 and up to kSmallBatchRows rows run
// both base products (x @ W^T, dY @ W) in ATen's float16 GEMMs on the weight as it is, and the
// LoRA products as elsewhere (the forward's through the BLAS, the backward's in float32
// small_gemm). Measured at 4096^2 on the Xeon, float16 GEMM against float32: x @ W^T 3.1 / 4.9
// ms at M = 16, 4.8 / 6.3 at 32, 12.9 / 14.9 at 128; the float32 plan's streamed dY @ W lost to
// it too (backward 5.5 -> 4.9 ms at M = 16). Up to 8 rows the decode kernels stream the
// float16 weight faster (fwd+bwd 3.9-4.1 against 4.4-4.8 ms at M = 8); above 128 rows the
// float32 plan on the cached float32 weight was as fast or faster (M = 512, 2048^2: 1.16-1.18x
// PEFT against 1.06-1.15x).
inline bool fp16_native_plan(const at::Tensor& x) {
  const int64_t M = x.dim() == 2 ? x.size(0) : 0;
  return x.scalar_type() == at::kHalf && M > 8 && M <= kSmallBatchRows && native_fp16_gemm();
}

// Whether the small_gemm paths get row blocks for every thread (they then run one thread per
// block); otherwise the batch is decode-sized and the caller takes another path.
inline bool row_blocks_for_all_threads(int64_t M, int64_t cols, int64_t elem_size) {
  return blocks_run_parallel(ceil_div(M, direct_block_rows(M, cols, elem_size)));
}

// Whether a float32 batch of M rows at rank r runs its rank-r products as whole-batch BLAS GEMMs
// rather than in small_gemm (kSmallGemmMaxRank, kBlasRankMinRows).
inline bool rank_products_in_blas(int64_t M, int64_t r) { return r > kSmallGemmMaxRank && M >= kBlasRankMinRows; }

// The bfloat16 LoRA backward of a batch of at most kBf16DecodeRows rows on AVX-512
// (lora_linear_bf16_decode.cpp): g = s dY @ B, d lora_A, d lora_B and, when gx is given, dX's
// masked LoRA term added onto the rounded dY @ W it holds. Row-major bfloat16 bits: dY (M x N,
// row stride ldy), x (M x K, ldx), xa (M x r), A (r x K), B (N x r), gx (M x K), grad_A (r x K),
// grad_B (N x r). Only where bf16_decode_kernels_available() (the AVX-512 build in use).
constexpr int64_t kBf16DecodeRows = 32;
bool bf16_decode_kernels_available();
// The forward's LoRA part likewise: xa = dropout(x) @ A^T (M x r, rounded) and y = bfloat16(y + s *
// xa @ B^T + bias) onto the rounded x @ W^T that y (M x N) holds; bias float32 (N) or null.
// Both also for PEFT's default float32 adapters on a bfloat16 x (float32 A, B, xa and gradients:
// the branch in float32 on x's float32 values, nothing on the adapters' side rounded).
void fwd_bf16_decode(const uint16_t* x, int64_t ldx, const uint16_t* A, const uint16_t* B, const float* bias,
                     int64_t M, int64_t K, int64_t N, int64_t r, float s, const DropoutParams& d, uint16_t* xa,
                     uint16_t* y);
void fwd_bf16_decode(const uint16_t* x, int64_t ldx, const float* A, const float* B, const float* bias, int64_t M,
                     int64_t K, int64_t N, int64_t r, float s, const DropoutParams& d, float* xa, uint16_t* y);
void bwd_bf16_decode(const uint16_t* dy, int64_t ldy, const uint16_t* x, int64_t ldx, const uint16_t* xa,
                     const uint16_t* A, const uint16_t* B, int64_t M, int64_t K, int64_t N, int64_t r, float s,
                     const DropoutParams& d, uint16_t* gx, uint16_t* grad_A, uint16_t* grad_B);
void bwd_bf16_decode(const uint16_t* dy, int64_t ldy, const uint16_t* x, int64_t ldx, const float* xa, const float* A,
                     const float* B, int64_t M, int64_t K, int64_t N, int64_t r, float s, const DropoutParams& d,
                     uint16_t* gx, float* grad_A, float* grad_B);

// Per-thread partial sums (the LoRA backward's d lora_A / d lora_B over row blocks): a thread's
// row of buf is zeroed when it first asks for it (mine), or written in full by the caller
// (claim); sum() adds the rows used in thread order, so
// the result does not depend on which thread ran which block.
template <typename T>
struct ThreadPartials {
  Tensor buf;
  std::vector<char> used;
  int64_t len;
  ThreadPartials(int64_t len_, const at::TensorOptions& opts)
      : buf(at::empty({std::max(1, at::get_num_threads()), len_}, opts)),
        used(std::max(1, at::get_num_threads()), 0),
        len(len_) {}
  T* mine() {
    bool fresh;
    T* p = claim(&fresh);
    if (fresh) std::fill(p, p + len, T(0));
    return p;
  }
  // The calling thread's partial, not zeroed: *fresh says whether this is the thread's first
  // claim, when the caller must write all of it (a first product with accumulate = false)
  // before it is summed. Saves a pass over it when the partials are large next to the work
  // (a decode-sized batch: r x (in + out) sums from a few rows).
  T* claim(bool* fresh) {
    const int tid = at::get_thread_num();
    *fresh = !used[tid];
    used[tid] = 1;
    return buf.mutable_data_ptr<T>() + tid * len;
  }
  Tensor sum() {
    Tensor acc;
    for (size_t t = 0; t < used.size(); ++t) {  // fixed order
      if (!used[t]) continue;
      if (!acc.defined()) {
        acc = buf[t];
      } else {
        acc.add_(buf[t]);
      }
    }
    return acc.defined() ? acc : buf[0].zero_();  // no block ran
  }
};

// Rank padded to whole small_gemm vectors (the pad columns are zeros).
template <typename T>
inline int64_t padded_rank(int64_t r) {
  const int64_t L = small_gemm_lanes<T>();
  return ceil_div(r, L) * L;
}

// src (transposed first when `transpose`) as a row-major matrix whose rows are padded with zero
// columns to cols_padded entries; src itself when it already is one.
template <typename T>
inline Tensor padded_rows(const Tensor& src_in, bool transpose, int64_t cols_padded) {
  const int64_t rows = src_in.size(transpose ? 1 : 0), cols = src_in.size(transpose ? 0 : 1);
  if (!transpose && cols == cols_padded && src_in.is_contiguous()) return src_in;
  const Tensor src = src_in.contiguous();
  Tensor out = at::empty({rows, cols_padded}, src.options());
  T* o = out.mutable_data_ptr<T>();
  const T* sp = src.const_data_ptr<T>();
  if (transpose) {
    transpose_into(sp, cols, rows, rows, o, cols_padded);
  } else {
    for (int64_t i = 0; i < rows; ++i) std::copy(sp + i * cols, sp + (i + 1) * cols, o + i * cols_padded);
  }
  for (int64_t i = 0; i < rows; ++i) std::fill(o + i * cols_padded + cols, o + (i + 1) * cols_padded, T(0));
  return out;
}

// float16, and bfloat16 on CPUs without native bf16 GEMMs, run the float32 kernels on float32
// copies, results rounded once (half_via_float32, cpu_utils.h): ATen's GEMMs in those dtypes
// have no fast CPU kernel there (float16 on AVX-512 Zen 4: dY @ W 10.8 s at M = 512, in = out =
// 2048, 29 ms through float32; x @ W^T 95 ms, 32 ms). The weight's float32 copy is kept across
// calls (float32_weight, weight_cache.h) while it fits the cache's limit, else made per call.
// bfloat16 with AVX512-BF16 / AMX keeps its own path: its GEMMs are fast there (oneDNN).
inline Tensor to_float(const Tensor& t) { return t.defined() ? t.to(at::kFloat) : t; }
inline std::optional<Tensor> to_float(const std::optional<Tensor>& t) {
  return t ? std::optional<Tensor>(t->to(at::kFloat)) : std::nullopt;
}

// A float32 copy of t (a half-precision adapter, an operand the kernels only read) in a buffer
// the calling thread keeps across calls, one per slot (two copies alive at once take different
// slots). Made fresh on every call, multi-MiB temporaries cost page faults: glibc hands a freed
// block at the top of its heap back to the kernel once more than its trim threshold is free, and
// the next call faults the pages in again (the float16 backward at M = 16, 4096^2, r = 64, its
// adapters' float32 copies 1 MiB each, faulted ~790 pages per call, ~1 ms of 4-5 ms, in some
// processes and not others). The buffers grow to the largest size asked for and live as long
// as the thread. The returned tensor views the buffer: it must not outlive the call (never an
// output) and is overwritten by the thread's next copy into the same slot.
inline Tensor float32_copy_in_thread_buffer(int slot, const Tensor& t) {
  constexpr int kSlots = 2;
  thread_local std::vector<float> buffers[kSlots];
  TORCH_INTERNAL_ASSERT(slot >= 0 && slot < kSlots, "float32_copy_in_thread_buffer: slot ", slot);
  std::vector<float>& buf = buffers[slot];
  if (static_cast<int64_t>(buf.size()) < t.numel()) buf.resize(t.numel());
  Tensor out = at::from_blob(buf.data(), t.sizes(), t.options().dtype(at::kFloat));
  out.copy_(t);
  return out;
}

// xa = dropout(x) @ lora_A^T in lora_A's dtype (lora_linear_fwd_cpu.cpp): small_gemm on blocks of
// rows when every thread gets blocks, otherwise the BLAS (on dropped blocks). x in lora_A's dtype
// or, under float32 adapters, half precision (computed on x's float32 values, PEFT's way; bfloat16
// rows are converted a block at a time).
Tensor shrink(const Tensor& x, const Tensor& lora_A, const DropoutParams& d);
// y = bfloat16(float(y) + s * xa @ lora_B^T + add) for a bfloat16 y and float32 xa, lora_B and
// add (an out_features vector, or undefined): a float32 LoRA branch added to a rounded
// bfloat16 base output and rounded once, as PEFT adds a float32 branch to a bf16 model's output.
void add_expand_into_bf16(Tensor& y, const Tensor& xa, const Tensor& lora_B, const Tensor& add, double scaling);

// The backward's LoRA part in small_gemm, or in the BLAS at float32 ranks above small_gemm's
// (rank_products_in_blas) (lora_linear_bwd_cpu.cpp): returns (d lora_A, d lora_B)
// in lora_A's dtype and writes dX's masked LoRA term into grad_x (when given), for a base term
// the caller adds. dy / x either in lora_A's dtype (float32 / float64), or half precision with
// float32 adapters: then the products run on float32 values (bfloat16 rows converted a block at
// a time) and the term is rounded once into grad_x (x's dtype), or, with onto_grad_x (bfloat16
// only), added in float32 to what grad_x holds and the sum rounded once.
std::tuple<Tensor, Tensor> lora_bwd_products(const Tensor& dy, const Tensor& x, const Tensor& lora_A,
                                             const Tensor& lora_B, const Tensor& xa, double scaling,
                                             const DropoutParams& d, Tensor* grad_x, bool onto_grad_x);

// bfloat16 x, weight and adapters on a CPU with AVX512-BF16 (lora_linear_bf16_cpu.cpp): the
// rank-r products in small_gemm_bf16, the base products in the BLAS. Taken when x has rows, the
// rank is positive and either the batch is decode-sized (the decode kernels take any sizes) or
// in / out features are even (small_gemm_bf16 reads x's and dY's values in pairs along their
// rows); x, dy row-major.
bool bf16_native_lora(const Tensor& x, const Tensor& lora_A, int64_t out_features);
// y = x @ W^T + bias + s * lora_B_bias + s * dropout(x) @ A^T @ B^T, and xa.
std::tuple<Tensor, Tensor> fwd_bf16_native(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                           const Tensor& lora_A, const Tensor& lora_B, double scaling,
                                           const DropoutParams& d, const std::optional<Tensor>& lora_B_bias);
// (d lora_A, d lora_B); adds dX's LoRA term to grad_x (when given), which holds dY @ W.
std::tuple<Tensor, Tensor> bwd_bf16_native(const Tensor& dy, const Tensor& x, const Tensor& lora_A,
                                           const Tensor& lora_B, const Tensor& xa, double scaling,
                                           const DropoutParams& d, Tensor* grad_x);

}  // namespace lora_cpu
}  // namespace fastlora
