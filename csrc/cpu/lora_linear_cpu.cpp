// CPU kernels of fastlora::lora_linear_fwd / lora_linear_bwd.
//
// On float32 / float64 the thin rank-r products and the backward's base product dY @ W run in
// small_gemm (small_gemm.h), and so does the forward's x @ W^T for decode-sized batches (<= 2
// vectors of rows; base_few_rows); the rest, and bfloat16, go to ATen's BLAS (MKL/oneDNN).
// float16 runs the float32 kernels on float32 copies (to_float). What this file adds is the
// fusion around them:
//  * dropout is applied on the fly, one block of rows at a time, from the counter-based hash
//    (dropout_hash.h): no M x K mask or dropped copy of x is ever materialised or stored;
//  * the LoRA expand and the bias are written into the output first and the base GEMM then
//    accumulates on top of them (beta = 1), so the LoRA branch costs no extra pass over the
//    M x N output;
//  * backward is one pass over L2-sized blocks of rows, one thread per block: g = s * dY @ B
//    once per block, reused for d lora_A and for the LoRA term of dX (masked as it is
//    written), onto which the block's dY_b @ W is accumulated while it is hot, so dY is read
//    and dX written once (float32 / float64, blocks of >= 16 rows; otherwise the BLAS adds
//    dY @ W afterwards at full size, beta = 1); d lora_A / d lora_B are per-thread partials
//    summed in a fixed order. A batch with too few rows for every thread (decode-sized) is
//    one block whose columns the threads split instead, and dY @ W splits W's rows;
//  * decode-sized batches are bound by reading W once: their base products read W's rows
//    front to back, split across threads (~2.5x the BLAS's rate at M = 8 on this machine).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../dropout_hash.h"
#include "../lora_op_checks.h"
#include "cpu_utils.h"
#include "small_gemm.h"

namespace fastlora {
namespace {

using at::Tensor;

// Per-column multipliers (scale if kept, 0 if dropped) of one row. Kept in its own function
// with target clones so the uint32 hash loop is vectorised with AVX2/AVX-512 where the
// machine has them, while the binary still runs on any x86-64.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTLORA_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTLORA_VECTOR_CLONES
#endif

FASTLORA_VECTOR_CLONES
void row_multipliers_f32(float* __restrict out, int64_t cols, int64_t col0, uint32_t row_h, uint32_t seed_hi,
                         uint32_t threshold, float scale) {
  for (int64_t j = 0; j < cols; ++j) {
    uint32_t u = fmix32((row_h + static_cast<uint32_t>(col0 + j) * kGolden32) ^ seed_hi);
    out[j] = (u >> 8) >= threshold ? scale : 0.0f;
  }
}

FASTLORA_VECTOR_CLONES
void row_multipliers_f64(double* __restrict out, int64_t cols, int64_t col0, uint32_t row_h, uint32_t seed_hi,
                          uint32_t threshold, double scale) {
  for (int64_t j = 0; j < cols; ++j) {
    uint32_t u = fmix32((row_h + static_cast<uint32_t>(col0 + j) * kGolden32) ^ seed_hi);
    out[j] = (u >> 8) >= threshold ? scale : 0.0;
  }
}

// The multipliers of columns col0 .. col0 + cols - 1 of row `row` into mult, in the
// accumulation type.
template <typename acc_t>
void row_mask(acc_t* mult, int64_t cols, int64_t col0, int64_t row, const DropoutParams& d) {
  const uint32_t h = d.row_hash(row);
  if constexpr (std::is_same_v<acc_t, double>) {
    row_multipliers_f64(mult, cols, col0, h, d.seed_hi, d.threshold, d.scale);
  } else {
    row_multipliers_f32(mult, cols, col0, h, d.seed_hi, d.threshold, static_cast<float>(d.scale));
  }
}

// For `rows` rows: dst[i, :] = src[i, :] * mask(row0 + i, :) * scale (src may alias dst) and,
// when kAlso, also[i, :] *= the same multipliers in place: backward's two uses of one mask
// (dropout(x) for d lora_A, the mask on the dX LoRA term) from a single hash evaluation per
// element. Math in float32 (float64 for double), rounded once to scalar_t, as in the reference.
// The pointers may start at column col0 of their matrices (the mask is that of columns col0 ..
// col0 + cols - 1); mult is scratch.
template <typename scalar_t, bool kAlso>
void dropout_rows_raw(const scalar_t* s, int64_t lds, scalar_t* o, int64_t ldd, scalar_t* a, int64_t lda,
                      int64_t rows, int64_t cols, int64_t row0, const DropoutParams& d,
                      std::vector<acc_type_t<scalar_t>>& mult, int64_t col0 = 0) {
  using acc_t = acc_type_t<scalar_t>;
  mult.resize(std::max<size_t>(mult.size(), static_cast<size_t>(cols)));
  for (int64_t i = 0; i < rows; ++i) {
    row_mask(mult.data(), cols, col0, row0 + i, d);
    const scalar_t* si = s + i * lds;
    scalar_t* oi = o + i * ldd;
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
void dropout_rows(const Tensor& src, Tensor& dst, Tensor* also, int64_t row0, const DropoutParams& d) {
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

void dropout_rows_(const Tensor& src, Tensor& dst, int64_t row0, const DropoutParams& d) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "fastlora_dropout_rows",
                                  [&] { dropout_rows<scalar_t, false>(src, dst, nullptr, row0, d); });
}

void dropout_rows_pair_(const Tensor& x, Tensor& xd, Tensor& gx, int64_t row0, const DropoutParams& d) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastlora_dropout_rows_pair",
                                  [&] { dropout_rows<scalar_t, true>(x, xd, &gx, row0, d); });
}

// Rows per block in the blocked loops: a block of each M x K / M x N operand (~256 KiB) should
// stay in L2 while the few small GEMMs on it run, one thread per block.
int64_t block_rows(int64_t cols, int64_t elem_size) {
  int64_t rows = (int64_t{1} << 18) / std::max<int64_t>(1, cols * elem_size);
  return std::max<int64_t>(16, rows / 16 * 16);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool blocks_run_parallel(int64_t nblocks) { return nblocks >= 2 * at::get_num_threads(); }

// Runs body over the row blocks: one thread per block when there are enough blocks to keep
// every thread busy, otherwise sequentially so that each small GEMM gets all threads (a
// decode-sized batch is one block: single-threaded blocks would leave cores idle).
template <typename F>
void run_blocks(int64_t nblocks, const F& body) {
  if (blocks_run_parallel(nblocks)) {
    at::parallel_for(0, nblocks, 1, body);
  } else if (nblocks > 0) {
    body(0, nblocks);
  }
}

int64_t seed_value(const Tensor& seed) { return seed.item<int64_t>(); }

// acc += alpha * a @ b, where acc may be float32 while a, b are half precision: then the
// block product is rounded once to the input dtype and summed in float32.
void accumulate_mm(Tensor& acc, const Tensor& a, const Tensor& b, double alpha) {
  if (acc.scalar_type() == a.scalar_type()) {
    acc.addmm_(a, b, 1.0, alpha);
  } else {
    acc.add_(at::mm(a, b), alpha);
  }
}

// Rows per block of the small_gemm paths: L2-sized but at least 64 (the d lora_A / d lora_B
// partials, r x in and r x out, are read and written once per block: with 16-row blocks at
// in = out = 4096, r = 64 that traffic ran those products at half speed), and small enough (down
// to 8 rows) that every thread gets two blocks: small_gemm is single-threaded, so a batch of one
// or two blocks would leave cores idle.
int64_t direct_block_rows(int64_t M, int64_t cols, int64_t elem_size) {
  const int64_t nthreads = std::max(1, at::get_num_threads());
  const int64_t per_thread = ceil_div(ceil_div(M, 2 * nthreads), 8) * 8;
  const int64_t cache_rows = std::max<int64_t>(64, block_rows(cols, elem_size));
  return std::max<int64_t>(1, std::min({M, cache_rows, std::max<int64_t>(8, per_thread)}));
}

// Whether the small_gemm paths get row blocks for every thread (they then run one thread per
// block); otherwise the batch is decode-sized and the caller takes another path.
bool row_blocks_for_all_threads(int64_t M, int64_t cols, int64_t elem_size) {
  return blocks_run_parallel(ceil_div(M, direct_block_rows(M, cols, elem_size)));
}

// Rank padded to whole small_gemm vectors (the pad columns are zeros).
template <typename T>
int64_t padded_rank(int64_t r) {
  const int64_t L = small_gemm_lanes<T>();
  return ceil_div(r, L) * L;
}

// src (transposed first when `transpose`) as a row-major matrix whose rows are padded with zero
// columns to cols_padded entries; src itself when it already is one.
template <typename T>
Tensor padded_rows(const Tensor& src_in, bool transpose, int64_t cols_padded) {
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

// xa = dropout(x) @ lora_A^T on float32 / float64 when row_blocks_for_all_threads(M, K): per
// block of rows (one thread each), the dropped block goes to an L2-resident buffer and
// small_gemm shrinks it, so x is read once.
template <typename T>
Tensor shrink_direct(const Tensor& x, const Tensor& lora_A, const DropoutParams& d) {
  const int64_t M = x.size(0), K = x.size(1), r = lora_A.size(0);
  const int64_t rp = padded_rank<T>(r);
  const Tensor At = padded_rows<T>(lora_A, /*transpose=*/true, rp);  // K x rp
  Tensor xa = at::empty({M, r}, x.options());
  const int64_t bm = direct_block_rows(M, K, x.element_size());
  const int64_t nblocks = ceil_div(M, bm);
  const int64_t nthreads = std::max(1, at::get_num_threads());
  // Per thread: the dropped block (when dropout is on) and the padded xa block (when r < rp).
  const int64_t scratch_len = (d.active ? bm * K : 0) + (rp != r ? bm * rp : 0);
  Tensor scratch = at::empty({nthreads, scratch_len}, x.options());
  const T* xp = x.const_data_ptr<T>();
  const T* Atp = At.const_data_ptr<T>();
  T* xap = xa.mutable_data_ptr<T>();
  const int64_t ldx = x.stride(0);
  auto body = [&](int64_t b0, int64_t b1) {
    T* xd = scratch.mutable_data_ptr<T>() + at::get_thread_num() * scratch_len;
    T* out_pad = xd + (d.active ? bm * K : 0);
    std::vector<T> mult;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * bm, n = std::min(bm, M - r0);
      const T* a = xp + r0 * ldx;
      int64_t lda = ldx;
      if (d.active) {
        dropout_rows_raw<T, false>(a, ldx, xd, K, nullptr, 0, n, K, r0, d, mult);
        a = xd;
        lda = K;
      }
      if (rp == r) {
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

// The backward's LoRA part on float32 / float64, every product through small_gemm on raw
// pointers (see lora_linear_bwd_cpu for the pass): no ATen op inside the loops. Built on the
// operands as small_gemm takes them; run() writes the masked LoRA term of dX into grad_x (when
// given) and returns (d lora_A, d lora_B).
template <typename T>
struct LoraBwdSmallGemm {
  // Row blocks at least this tall also run the base product dY_b @ W of dX in small_gemm, on
  // top of the block's LoRA term while it is hot in L2 (see by_row_blocks). Each block reads
  // all of W, so short blocks lose to the BLAS, which packs W once for all rows: measured
  // (backward, 2 threads, Zen 4) 8-row blocks 5% slower than the BLAS at M = 32, 4096 x 4096;
  // 16-row blocks 16-26% faster at M = 64 (1024^2 and 4096^2).
  static constexpr int64_t kFusedBaseMinRows = 16;

  // The fused base product beats the BLAS only with small_gemm's AVX-512 build; with the AVX2
  // build (half the vector width, narrow tiles) MKL's dY @ W is faster and the fusion made the
  // whole backward slower than PEFT's (README, LoRA benchmarks per instruction set).
  static bool fused_base_pays() { return small_gemm_isa() >= 4; }

  int64_t M, K, N, r, rp;
  Tensor A, xa, Bp, W;  // contiguous lora_A (r x K), xa (M x r); lora_B padded to N x rp; W rows
  const T *dy, *x, *a, *xa_p, *b_p, *w;
  T* gx;  // dX (M x K, contiguous) or null when not requested
  int64_t ldy, ldx, ldw;
  T s;
  const DropoutParams& d;
  bool base_in_grad_x = false;  // set by run(): dX already holds dY @ W as well

  // weight undefined: the base term of dX is left to the caller (a weight in another dtype).
  // dy_t and x_t must outlive this object (raw pointers into them are kept).
  LoraBwdSmallGemm(const Tensor& dy_t, const Tensor& x_t, const Tensor& weight, const Tensor& lora_A,
                   const Tensor& lora_B, const Tensor& xa_t, double scaling, const DropoutParams& dropout,
                   Tensor* grad_x)
      : M(x_t.size(0)), K(x_t.size(1)), N(dy_t.size(1)), r(lora_A.size(0)), rp(padded_rank<T>(r)),
        A(lora_A.contiguous()), xa(xa_t.contiguous()), Bp(padded_rows<T>(lora_B, /*transpose=*/false, rp)),
        W(weight.defined() ? row_major(weight) : weight), dy(dy_t.const_data_ptr<T>()), x(x_t.const_data_ptr<T>()),
        a(A.const_data_ptr<T>()), xa_p(xa.const_data_ptr<T>()), b_p(Bp.const_data_ptr<T>()),
        w(W.defined() ? W.const_data_ptr<T>() : nullptr),
        gx(grad_x ? grad_x->mutable_data_ptr<T>() : nullptr), ldy(dy_t.stride(0)), ldx(x_t.stride(0)),
        ldw(W.defined() ? W.stride(0) : 0), s(static_cast<T>(scaling)), d(dropout) {}

  std::tuple<Tensor, Tensor> run() {
    return row_blocks_for_all_threads(M, std::max(K, N), sizeof(T)) ? by_row_blocks() : by_columns();
  }

  // Blocks of rows, one thread per block. Per block: dY_b is copied once, transposed, into an
  // L2-resident buffer (small_gemm's fast layout for a long-k left operand: a tile's values
  // adjacent in memory, ~90 GFLOP/s per thread against ~60 through the strided rows); from it
  // g = s * dY_b @ B and, for blocks of kFusedBaseMinRows rows or more, the base term dY_b @ W
  // of dX, accumulated onto the block's masked LoRA term while both are hot, so dY is read and
  // dX written once for the whole backward. d lora_B uses dY_b's rows, d lora_A the dropped x
  // block; both are per-thread partials summed in a fixed order.
  std::tuple<Tensor, Tensor> by_row_blocks() {
    const int64_t bm = direct_block_rows(M, std::max(K, N), sizeof(T));
    const int64_t nblocks = ceil_div(M, bm);
    base_in_grad_x = gx != nullptr && w != nullptr && bm >= kFusedBaseMinRows && fused_base_pays();
    const int nthreads = std::max(1, at::get_num_threads());  // thread ids are < this
    // Per thread: partial d lora_A (r x K) and d lora_B^T (r x N), zeroed by the thread that
    // first uses them; scratch dY_b^T (N x bm), g (bm x rp) and dropped x block (bm x K).
    const int64_t part_len = r * (K + N);
    Tensor parts = at::empty({nthreads, part_len}, A.options());
    const int64_t scratch_len = (base_in_grad_x ? N * bm : 0) + bm * rp + (d.active ? bm * K : 0);
    Tensor scratch = at::empty({nthreads, scratch_len}, A.options());
    std::vector<char> used(nthreads, 0);
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      const int tid = at::get_thread_num();
      T* pa = parts.mutable_data_ptr<T>() + tid * part_len;
      T* pb = pa + r * K;
      if (!used[tid]) {
        std::fill(pa, pa + part_len, T(0));
        used[tid] = 1;
      }
      T* dyt = scratch.mutable_data_ptr<T>() + tid * scratch_len;
      T* g = dyt + (base_in_grad_x ? N * bm : 0);
      T* xd = g + bm * rp;
      std::vector<T> mult;
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = blk * bm, n = std::min(bm, M - r0);
        const T* dy_b = dy + r0 * ldy;
        const T* x_b = x + r0 * ldx;
        // g = s * dY_b @ B, through dY_b^T (dyt[p * bm + i] = dY[r0 + i, p]) when the base
        // term needs it anyway
        if (base_in_grad_x) {
          transpose_into(dy_b, n, N, ldy, dyt, bm);
          small_gemm(n, rp, N, s, dyt, 1, bm, b_p, rp, false, g, rp);
        } else {
          small_gemm(n, rp, N, s, dy_b, ldy, 1, b_p, rp, false, g, rp);
        }
        // d lora_B^T += s * xa_b^T @ dY_b  (vectorised along N: reads dY rows, not columns)
        small_gemm(r, N, n, s, xa_p + r0 * r, 1, r, dy_b, ldy, true, pb, N);
        // dX_b = g @ A, masked below with the same multipliers as dropout(x_b)
        T* gx_b = gx ? gx + r0 * K : nullptr;
        if (gx_b) small_gemm(n, K, r, T(1), g, rp, 1, a, K, false, gx_b, K);
        const T* xd_b = x_b;
        int64_t ldxd = ldx;
        if (d.active) {
          if (gx_b) {
            dropout_rows_raw<T, true>(x_b, ldx, xd, K, gx_b, K, n, K, r0, d, mult);
          } else {
            dropout_rows_raw<T, false>(x_b, ldx, xd, K, nullptr, 0, n, K, r0, d, mult);
          }
          xd_b = xd;
          ldxd = K;
        }
        // dX_b += dY_b @ W
        if (base_in_grad_x) small_gemm(n, K, N, T(1), dyt, 1, bm, w, ldw, true, gx_b, K);
        // d lora_A += g^T @ dropout(x_b)
        small_gemm(r, K, n, T(1), g, 1, rp, xd_b, ldxd, true, pa, K);
      }
    });
    Tensor acc;
    for (int t = 0; t < nthreads; ++t) {  // fixed order
      if (!used[t]) continue;
      if (!acc.defined()) {
        acc = parts[t];
      } else {
        acc.add_(parts[t]);
      }
    }
    if (!acc.defined()) acc = parts[0].zero_();  // no block ran
    Tensor grad_A = acc.narrow(0, 0, r * K).view({r, K});
    Tensor grad_B = at::empty({N, r}, A.options());
    transpose_into(acc.const_data_ptr<T>() + r * K, r, N, N, grad_B.mutable_data_ptr<T>(), r);
    return {grad_A, grad_B};
  }

  // A batch with too few rows to give every thread row blocks (decode-sized): the rows stay
  // one block and the threads split the columns instead, of dY for d lora_B and of x / dX for
  // d lora_A and the dX term, written straight into the gradients (nothing to sum).
  std::tuple<Tensor, Tensor> by_columns() {
    // g = s * dY @ B: M x N x r, small next to the rest; one thread. dY^T (N x M, a few rows
    // of dY) is also the left operand of dX's base term (add_base_split_k).
    base_in_grad_x = gx != nullptr && w != nullptr;
    Tensor dyt_t = at::empty({base_in_grad_x ? N * M : 0}, A.options());
    T* dyt = dyt_t.mutable_data_ptr<T>();
    if (base_in_grad_x) transpose_into(dy, M, N, ldy, dyt, M);
    Tensor g = at::empty({M, rp}, A.options());
    T* gp = g.mutable_data_ptr<T>();
    small_gemm(M, rp, N, s, dy, ldy, 1, b_p, rp, false, gp, rp);
    Tensor grad_A = at::empty({r, K}, A.options());
    Tensor grad_Bt = at::empty({r == rp ? 0 : r, N}, A.options());
    Tensor grad_B = at::empty({N, r}, A.options());
    T* gAp = grad_A.mutable_data_ptr<T>();
    T* gBtp = grad_Bt.mutable_data_ptr<T>();
    T* gBp = grad_B.mutable_data_ptr<T>();
    // One parallel region (a fork/join costs more than a decode-sized batch's LoRA work) over
    // column tasks: first those of dY, then those of x / dX.
    constexpr int64_t kCols = 256;  // columns per task
    const int64_t tasks_N = ceil_div(N, kCols), tasks_K = ceil_div(K, kCols);
    at::parallel_for(0, tasks_N + tasks_K, 1, [&](int64_t t0, int64_t t1) {
      std::vector<T> xd, mult;
      for (int64_t t = t0; t < t1; ++t) {
        if (t < tasks_N) {
          const int64_t c0 = t * kCols, nc = std::min(kCols, N - c0);
          if (r == rp) {  // d lora_B[c, :] = s * dY[:, c]^T @ xa, r whole vectors wide
            small_gemm(nc, r, M, s, dy + c0, 1, ldy, xa_p, r, false, gBp + c0 * r, r);
          } else {  // d lora_B^T[:, c] = s * xa^T @ dY[:, c], then its transpose
            small_gemm(r, nc, M, s, xa_p, 1, r, dy + c0, ldy, false, gBtp + c0, N);
            transpose_into(gBtp + c0, r, nc, N, gBp + c0 * r, r);
          }
          continue;
        }
        // dX[:, c] = mask * (g @ A[:, c]); d lora_A[:, c] = g^T @ dropout(x[:, c]).
        const int64_t c0 = (t - tasks_N) * kCols, nc = std::min(kCols, K - c0);
        T* gx_c = gx ? gx + c0 : nullptr;
        if (gx_c) small_gemm(M, nc, r, T(1), gp, rp, 1, a + c0, K, false, gx_c, K);
        const T* xd_c = x + c0;
        int64_t ldxd = ldx;
        if (d.active) {
          xd.resize(M * kCols);
          if (gx_c) {
            dropout_rows_raw<T, true>(x + c0, ldx, xd.data(), kCols, gx_c, K, M, nc, 0, d, mult, c0);
          } else {
            dropout_rows_raw<T, false>(x + c0, ldx, xd.data(), kCols, nullptr, 0, M, nc, 0, d, mult, c0);
          }
          xd_c = xd.data();
          ldxd = kCols;
        }
        small_gemm(r, nc, M, T(1), gp, 1, rp, xd_c, ldxd, false, gAp + c0, K);
      }
    });
    if (base_in_grad_x) add_base_split_k(dyt);
    return {grad_A, grad_B};
  }

  // dX += dY @ W for a decode-sized batch, from dyt = dY^T (N x M). The product streams all of
  // W for a few rows, so it is bound by reading W: the threads split W's rows (the k of this
  // product) and each reads its rows front to back (small_gemm takes 16-row chunks when C is a
  // single row tile); thread 0 accumulates onto dX, the others into partials added in thread
  // order. Measured at M = 8, in = out = 4096 on 2 threads: ~3.7 ms, the BLAS ~8 ms.
  void add_base_split_k(const T* dyt) {
    const int nthreads = std::max(1, at::get_num_threads());  // thread ids are < this
    Tensor parts = at::empty({nthreads, M * K}, A.options());  // row 0 unused: thread 0 writes dX
    std::vector<char> used(nthreads, 0);
    at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
      const int tid = at::get_thread_num();
      T* out = tid == 0 ? gx : parts.mutable_data_ptr<T>() + tid * M * K;
      small_gemm(M, K, n1 - n0, T(1), dyt + n0 * M, 1, M, w + n0 * ldw, ldw, /*accumulate=*/tid == 0, out, K);
      used[tid] = 1;
    });
    for (int t = 1; t < nthreads; ++t) {
      if (!used[t]) continue;
      const T* part = parts.const_data_ptr<T>() + t * M * K;
      for (int64_t e = 0; e < M * K; ++e) gx[e] += part[e];
    }
  }
};

// The backward's LoRA part on bfloat16 with rows for every thread: the same pass through
// ATen's BLAS, block products rounded once to the input dtype and summed in float32 partials.
std::tuple<Tensor, Tensor> lora_bwd_half(const Tensor& dy, const Tensor& x, const Tensor& lora_A,
                                         const Tensor& lora_B, const Tensor& xa, double scaling,
                                         const DropoutParams& d, Tensor* grad_x) {
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t r = lora_A.size(0), N = dy.size(1);
  const auto acc_opts = x.options().dtype(at::kFloat);
  const int64_t bm = std::max<int64_t>(1, std::min(M, block_rows(std::max(K, N), x.element_size())));
  const int64_t nblocks = ceil_div(M, bm);
  const int nthreads = std::max(1, at::get_num_threads());  // thread ids are < this
  std::vector<Tensor> part_A(nthreads), part_Bt(nthreads);
  auto body = [&](int64_t b0, int64_t b1) {
    at::AutoDispatchBelowAutograd below_autograd;  // worker threads: see the forward
    const int tid = at::get_thread_num();
    Tensor& pa = part_A[tid];
    Tensor& pb = part_Bt[tid];
    if (!pa.defined()) {
      pa = at::zeros({r, K}, acc_opts);
      pb = at::zeros({r, N}, acc_opts);
    }
    Tensor xdrop = d.active ? at::empty({bm, K}, x.options()) : Tensor();
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * bm, n = std::min(bm, M - r0);
      const Tensor dy_b = dy.narrow(0, r0, n), x_b = x.narrow(0, r0, n);
      const Tensor g = at::mm(dy_b, lora_B).mul_(scaling);
      accumulate_mm(pb, xa.narrow(0, r0, n).t(), dy_b, scaling);
      Tensor xd = x_b;
      if (grad_x) {
        Tensor gx = grad_x->narrow(0, r0, n);
        at::mm_out(gx, g, lora_A);
        if (d.active) {  // one mask evaluation for both of its uses
          xd = xdrop.narrow(0, 0, n);
          dropout_rows_pair_(x_b, xd, gx, r0, d);
        }
      } else if (d.active) {
        xd = xdrop.narrow(0, 0, n);
        dropout_rows_(x_b, xd, r0, d);
      }
      accumulate_mm(pa, g.t(), xd, 1.0);
    }
  };
  run_blocks(nblocks, body);
  Tensor acc_A, acc_Bt;
  for (int t = 0; t < nthreads; ++t) {  // fixed order
    if (!part_A[t].defined()) continue;
    if (!acc_A.defined()) {
      acc_A = part_A[t];
      acc_Bt = part_Bt[t];
    } else {
      acc_A.add_(part_A[t]);
      acc_Bt.add_(part_Bt[t]);
    }
  }
  if (!acc_A.defined()) {  // M == 0
    acc_A = at::zeros({r, K}, acc_opts);
    acc_Bt = at::zeros({r, N}, acc_opts);
  }
  return {acc_A.to(x.scalar_type()), transposed_copy(acc_Bt).to(x.scalar_type())};
}

// Whether the forward of a decode-sized batch goes through base_few_rows: float32 / float64 with
// at most two small_gemm vectors of rows.
bool few_rows_forward(const Tensor& x, bool direct) {
  const int64_t M = x.size(0);
  if (direct || M == 0) return false;
  if (x.scalar_type() == at::kFloat) return M <= 2 * small_gemm_lanes<float>();
  if (x.scalar_type() == at::kDouble) return M <= 2 * small_gemm_lanes<double>();
  return false;
}

// y = x @ W^T + bias_eff + s * xa @ B^T for a decode-sized batch, computed transposed: y^T = W @
// x^T, with x^T (K x M, rows padded to whole vectors) as the small right operand and W's rows as
// the left one, so each thread reads its share of W's rows once, front to back, in tasks of 8
// rows that also add the expand (B's rows against xa^T) and the bias, then write their 8 columns
// of y. The product is bound by reading W; the BLAS reads it at ~9 GB/s here for M = 8 against
// the ~27 GB/s two threads stream: measured at M = 8, in = out = 4096 on 2 threads, ~3 ms for
// the base product against ~7 ms through the BLAS.
template <typename T>
Tensor base_few_rows(const Tensor& x, const Tensor& weight, const Tensor& bias_eff, const Tensor& xa,
                     const Tensor& lora_B, double scaling) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = xa.size(1);
  const int64_t L = small_gemm_lanes<T>();
  const int64_t Mp = ceil_div(M, L) * L;
  Tensor xt = at::zeros({K, Mp}, x.options());  // pad columns stay zero
  Tensor xat = at::zeros({r, Mp}, x.options());
  transpose_into(x.const_data_ptr<T>(), M, K, x.stride(0), xt.mutable_data_ptr<T>(), Mp);
  const Tensor xa_c = xa.contiguous();
  transpose_into(xa_c.const_data_ptr<T>(), M, r, r, xat.mutable_data_ptr<T>(), Mp);
  const Tensor W = row_major(weight);
  const Tensor Bc = lora_B.contiguous();
  const Tensor bias_c = bias_eff.defined() ? bias_eff.contiguous() : bias_eff;
  Tensor y = at::empty({M, N}, x.options());
  const T* xtp = xt.const_data_ptr<T>();
  const T* xatp = xat.const_data_ptr<T>();
  const T* wp = W.const_data_ptr<T>();
  const T* bp = Bc.const_data_ptr<T>();
  const T* biasp = bias_c.defined() ? bias_c.const_data_ptr<T>() : nullptr;
  T* yp = y.mutable_data_ptr<T>();
  const int64_t ldw = W.stride(0);
  const T s = static_cast<T>(scaling);
  constexpr int64_t kRows = 8;  // rows of W per task
  at::parallel_for(0, ceil_div(N, kRows), 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> yt(kRows * Mp);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j0 = t * kRows, nt = std::min(kRows, N - j0);
      // y^T rows j0 .. j0 + nt: s * B @ xa^T, then += W @ x^T
      small_gemm(nt, Mp, r, s, bp + j0 * r, r, 1, xatp, Mp, false, yt.data(), Mp);
      small_gemm(nt, Mp, K, T(1), wp + j0 * ldw, ldw, 1, xtp, Mp, true, yt.data(), Mp);
      for (int64_t jj = 0; jj < nt; ++jj) {
        const T b = biasp ? biasp[j0 + jj] : T(0);
        for (int64_t i = 0; i < M; ++i) yp[i * N + j0 + jj] = yt[jj * Mp + i] + b;
      }
    }
  });
  return y;
}

// float16, and bfloat16 on CPUs without native bf16 GEMMs, run the float32 kernels on float32
// copies, results rounded once (half_via_float32, cpu_utils.h): ATen's GEMMs in those dtypes
// have no fast CPU kernel there (float16 on AVX-512 Zen 4: dY @ W 10.8 s at M = 512, in = out =
// 2048, 29 ms through float32; x @ W^T 95 ms, 32 ms). The copies cost a transient float32
// weight (twice the half-precision one) per call. bfloat16 with AVX512-BF16 / AMX keeps its own
// path: its GEMMs are fast there (oneDNN).
Tensor to_float(const Tensor& t) { return t.defined() ? t.to(at::kFloat) : t; }
std::optional<Tensor> to_float(const std::optional<Tensor>& t) {
  return t ? std::optional<Tensor>(t->to(at::kFloat)) : std::nullopt;
}

std::tuple<Tensor, Tensor> lora_linear_fwd_cpu(const Tensor& x_in, const Tensor& weight,
                                               const std::optional<Tensor>& bias, const Tensor& lora_A,
                                               const Tensor& lora_B, double scaling, double dropout_p,
                                               const Tensor& seed, const std::optional<Tensor>& lora_B_bias) {
  check_lora_linear_fwd_args(x_in, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_B_bias);
  // Half precision forward through float32 (see to_float), except float16 batches so small
  // that converting the weight costs more than the float16 GEMM: at in = out = 4096 the
  // conversion took 20 ms, the float16 x @ W^T ~0.7 ms per row. Emulated bfloat16 GEMMs are
  // slower still (a 4096^2 layer's fwd+bwd took 1 s at M = 8 on an AVX2 EPYC): always convert.
  constexpr int64_t kHalfViaFloatMinRows = 32;
  const at::ScalarType dtype = x_in.scalar_type();
  if (half_via_float32(dtype) && (dtype == at::kBFloat16 || x_in.size(0) >= kHalfViaFloatMinRows)) {
    auto [y, xa] = lora_linear_fwd_cpu(to_float(x_in), to_float(weight), to_float(bias), to_float(lora_A),
                                       to_float(lora_B), scaling, dropout_p, seed, to_float(lora_B_bias));
    return {y.to(dtype), xa.to(dtype)};
  }
  const Tensor x = row_major(x_in);
  const int64_t M = x.size(0), K = x.size(1), r = lora_A.size(0);
  const DropoutParams d = DropoutParams::make(dropout_p, seed_value(seed));

  // small_gemm when there are blocks for every thread; a decode-sized batch instead gets the
  // BLAS's multi-threaded GEMM and no transposed copy of lora_A (measured faster at M = 8).
  const bool direct = row_blocks_for_all_threads(M, K, x.element_size());
  Tensor xa;
  if (direct && x.scalar_type() == at::kFloat) {
    xa = shrink_direct<float>(x, lora_A, d);
  } else if (direct && x.scalar_type() == at::kDouble) {
    xa = shrink_direct<double>(x, lora_A, d);
  } else if (!d.active || M == 0) {
    xa = at::mm(x, lora_A.t());
  } else {
    // One thread per block of rows: dropout into an L2-resident buffer, then the shrink GEMM
    // on it (single-threaded inside the parallel region), so x is read once.
    xa = at::empty({M, r}, x.options());
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
  }

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
  // lora_B^T as a row-major r x N copy (r * N elements): the BLAS ran the expand on the
  // transposed view 4x slower at M = 8, in = out = 4096 (0.13 vs 0.03 ms). Not for float16
  // (only small batches get here): its GEMM is fast only on the transposed view (0.36 vs 0.95 ms).
  const Tensor Bt = x.scalar_type() == at::kHalf ? lora_B.t() : transposed_copy(lora_B);
  Tensor y;
  if (bias_eff.defined()) {
    y = at::addmm(bias_eff, xa, Bt, 1.0, scaling);
  } else {
    y = at::mm(xa.mul(scaling), Bt);
  }
  y.addmm_(x, weight.t());
  return {y, xa};
}

// The backward after its argument checks (lora_linear_bwd_cpu); weight may be undefined when
// grad_x is not requested (the half-precision route then skips converting it).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lora_linear_bwd_checked(
    const Tensor& grad_y_in, const Tensor& x_in, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B,
    const Tensor& xa, double scaling, double dropout_p, const Tensor& seed, std::array<bool, 3> output_mask) {
  const at::ScalarType dtype = x_in.scalar_type();
  if (half_via_float32(dtype)) {  // see to_float; the weight only matters for grad_x
    auto [gx, gw, gb, gA, gB] = lora_linear_bwd_checked(
        to_float(grad_y_in), to_float(x_in), output_mask[0] ? to_float(weight) : Tensor(), to_float(lora_A),
        to_float(lora_B), to_float(xa), scaling, dropout_p, seed, output_mask);
    return {gx.to(dtype), gw.to(dtype), gb.to(dtype), gA.to(dtype), gB.to(dtype)};
  }
  const Tensor x = row_major(x_in);
  const Tensor dy = row_major(grad_y_in);
  const int64_t M = x.size(0), K = x.size(1);
  const bool need_x = output_mask[0], need_w = output_mask[1], need_b = output_mask[2];
  const DropoutParams d = DropoutParams::make(dropout_p, seed_value(seed));
  // Outputs not requested are distinct empty tensors (outputs must never alias).
  auto empty = [&] { return at::empty({0}, dy.options()); };

  // One pass over the rows in blocks, one thread per block, every block's operands hot in L2:
  //   g    = s * dY_b @ B                 (shared by grad_A and grad_x)
  //   B^T += s * xa_b^T @ dY_b             (per-thread partial)
  //   A   += g^T @ dropout(x_b)            (per-thread partial; mask regenerated)
  //   dX_b = dropout_mask(g @ A)           (LoRA term of grad_x, masked as it is written)
  //   dX_b += dY_b @ W                     (float32 / float64 blocks of >= 16 rows)
  // otherwise the BLAS accumulates dY @ W onto dX afterwards at full size (beta = 1). The small
  // GEMMs run single-threaded inside the parallel region, so the whole pass costs one fork/join.
  Tensor grad_x = need_x ? at::empty({M, K}, x.options()) : empty();
  Tensor grad_A, grad_B;
  Tensor* gx = need_x ? &grad_x : nullptr;
  bool base_done = false;  // whether the LoRA pass also accumulated dY @ W into grad_x
  if (x.scalar_type() == at::kFloat) {
    LoraBwdSmallGemm<float> bwd(dy, x, weight, lora_A, lora_B, xa, scaling, d, gx);
    std::tie(grad_A, grad_B) = bwd.run();
    base_done = bwd.base_in_grad_x;
  } else if (x.scalar_type() == at::kDouble) {
    LoraBwdSmallGemm<double> bwd(dy, x, weight, lora_A, lora_B, xa, scaling, d, gx);
    std::tie(grad_A, grad_B) = bwd.run();
    base_done = bwd.base_in_grad_x;
  } else if (M > 0 && !row_blocks_for_all_threads(M, std::max(K, dy.size(1)), x.element_size())) {
    // Decode-sized bfloat16: the LoRA products in float32 small_gemm on float32
    // copies (a few rows of x and dY, the LoRA matrices). Through the BLAS, the per-call cost of
    // these tiny products was most of the LoRA part: 0.5 ms at M = 8, in = out = 4096, bf16.
    // The base term stays with the BLAS (below), on the half-precision weight.
    const auto f32 = x.options().dtype(at::kFloat);
    const Tensor dy32 = dy.to(at::kFloat), x32 = x.to(at::kFloat);
    Tensor gx32 = need_x ? at::empty({M, K}, f32) : Tensor();
    LoraBwdSmallGemm<float> bwd(dy32, x32, Tensor(), lora_A.to(at::kFloat), lora_B.to(at::kFloat),
                                xa.to(at::kFloat), scaling, d, need_x ? &gx32 : nullptr);
    std::tie(grad_A, grad_B) = bwd.run();
    grad_A = grad_A.to(x.scalar_type());
    grad_B = grad_B.to(x.scalar_type());
    if (need_x) grad_x.copy_(gx32);
  } else {
    std::tie(grad_A, grad_B) = lora_bwd_half(dy, x, lora_A, lora_B, xa, scaling, d, gx);
  }
  if (need_x && M > 0 && !base_done) grad_x.addmm_(dy, weight);
  Tensor grad_w = need_w ? at::mm(dy.t(), x) : empty();
  Tensor grad_b = need_b ? dy.sum(0) : empty();
  return {grad_x, grad_w, grad_b, grad_A, grad_B};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lora_linear_bwd_cpu(
    const Tensor& grad_y, const Tensor& x, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B,
    const Tensor& xa, double scaling, double dropout_p, const Tensor& seed, std::array<bool, 3> output_mask) {
  check_lora_linear_bwd_args(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed);
  return lora_linear_bwd_checked(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, output_mask);
}

TORCH_LIBRARY_IMPL(fastlora, CPU, m) {
  m.impl("lora_linear_fwd", &lora_linear_fwd_cpu);
  m.impl("lora_linear_bwd", &lora_linear_bwd_cpu);
}

}  // namespace fastlora
