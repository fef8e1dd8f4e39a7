// CPU kernel of fastlora::lora_linear_bwd, and the overview of both directions (the forward is in
// lora_linear_fwd_cpu.cpp, the shared dropout / blocking helpers in lora_linear_blocks.h).
//
// On float32 / float64 the thin rank-r products (float32 ranks above 64: whole-batch BLAS GEMMs,
// lora_bwd_blas and the forward's shrink) and the backward's base product dY @ W run in
// small_gemm (small_gemm.h), and so does the forward's x @ W^T for decode-sized batches (<= 2
// vectors of rows; base_few_rows); the rest goes to ATen's BLAS (MKL/oneDNN). bfloat16 with
// AVX512-BF16 runs its rank-r products in small_gemm_bf16 (lora_linear_bf16_cpu.cpp) and its
// base products in the BLAS.
// float16 runs the float32 kernels on float32 copies (to_float). What this file adds is the
// fusion around them:
//  * dropout is applied on the fly, one block of rows at a time, from the counter-based hash
//    (dropout_hash.h): no M x K mask or dropped copy of x is ever stored (the BLAS plan above
//    rank 64 materialises dropout(x) for the duration of one product);
//  * the LoRA expand and the bias are written into the output first and the base GEMM then
//    accumulates on top of them (beta = 1), so the LoRA branch costs no extra pass over the
//    M x N output;
//  * backward is one pass over L2-sized blocks of rows, one thread per block: g = s * dY @ B
//    once per block, reused for d lora_A and for the LoRA term of dX (masked as it is
//    written; on float32 under dropout up to rank 16 with AVX-512, both products and the mask
//    in one kernel, lora_bwd_x_side.cpp), onto which the block's dY_b @ W is
//    accumulated while it is hot, so dY is read and dX written once (float32 / float64, blocks
//    of >= 16 rows; otherwise the BLAS adds dY @ W afterwards at full size, beta = 1); d lora_A
//    / d lora_B are per-thread partials summed in a fixed order. A batch with too few rows for every
//    thread (decode-sized) is one block whose columns the threads split instead, and dY @ W
//    splits W's rows;
//  * decode-sized batches are bound by reading W once: their base products read W's rows
//    front to back, split across threads (~2.5x the BLAS's rate at M = 8 on this machine).
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

  // The fused base product beats the BLAS only with small_gemm's AVX-512 build on a CPU where
  // MKL does not run its own AVX-512 kernels. With the AVX2 build (half the vector width) MKL's
  // dY @ W is faster: fused, the backward measured +30 to +38% over the base with 4 x 16 tiles
  // and still +13 to +20% with the 6 x 16 ones, against +5 to +11% through MKL
  // (docs/benchmarks.md, LoRA linear, AVX2); on a real AVX2 CPU (Zen 3 EPYC), forced on, the
  // backward op at M = 2048, 1024^2 took 35.8-38.8 ms against 28.0-30.4 ms. On Intel CPUs MKL
  // picks its AVX-512 kernels (on AMD it does not): there the backward measured +30 to +50%
  // over the base fused against +10 to +23% through MKL (Xeon with AMX, 2 threads, the float32
  // benchmark shapes).
  static bool fused_base_pays() { return small_gemm_isa() >= 4 && !blas_has_avx512_sgemm(); }

  int64_t M, K, N, r, rp;
  Tensor A, xa, Bp, W;  // contiguous lora_A (r x K), xa (M x r); lora_B padded to N x rp; W rows
  const T *dy, *x, *a, *xa_p, *b_p, *w;
  // A bfloat16 or float16 weight under float32 operands (a decode-sized half-precision batch):
  // only the decode-sized base term reads it (add_base_split_k, converting a few rows at a time).
  const uint16_t* w_half;
  bool w_fp16;
  T* gx;  // dX (M x K, contiguous) or null when not requested
  // bfloat16 dY, x and dX under float32 adapters (T = float; PEFT's default on a bfloat16 model),
  // in place of dy, x, gx: by_row_blocks converts each block into L2-resident float32 scratch
  // (exact) and rounds the block's dX term into the bfloat16 dX, so no float32 copy of the whole
  // dY, x or dX is made (at M = 2048, in = out = 1024 those copies cost more than the products).
  const at::BFloat16 *dy_h, *x_h;
  at::BFloat16* gx_h;
  bool onto_gx_h = false;  // add the LoRA term to what gx_h holds (in float32, rounded once)
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
        W(weight.defined() ? row_major(weight) : weight), dy(typed<T>(dy_t)), x(typed<T>(x_t)),
        a(A.const_data_ptr<T>()), xa_p(xa.const_data_ptr<T>()), b_p(Bp.const_data_ptr<T>()),
        w(W.defined() && W.scalar_type() == c10::CppTypeToScalarType<T>::value ? W.const_data_ptr<T>() : nullptr),
        w_half(W.defined() && (W.scalar_type() == at::kBFloat16 || W.scalar_type() == at::kHalf) &&
                       std::is_same_v<T, float>
                   ? static_cast<const uint16_t*>(W.const_data_ptr()) : nullptr),
        w_fp16(W.defined() && W.scalar_type() == at::kHalf),
        gx(grad_x ? typed<T>(*grad_x) : nullptr), dy_h(half_rows(dy_t)), x_h(half_rows(x_t)),
        gx_h(grad_x ? half_rows(*grad_x) : nullptr), ldy(dy_t.stride(0)), ldx(x_t.stride(0)),
        ldw(W.defined() ? W.stride(0) : 0), s(static_cast<T>(scaling)), d(dropout) {}

  template <typename U>
  static U* typed(const Tensor& t) {
    return t.scalar_type() == c10::CppTypeToScalarType<U>::value ? const_cast<U*>(t.const_data_ptr<U>()) : nullptr;
  }
  static at::BFloat16* half_rows(const Tensor& t) {
    return std::is_same_v<T, float> ? typed<at::BFloat16>(t) : nullptr;
  }

  std::tuple<Tensor, Tensor> run() {
    // bfloat16 operands: row blocks only (the caller converts decode-sized batches whole)
    if (dy_h != nullptr) return by_row_blocks();
    const bool few_rows = M <= kColumnsMaxRows && !fused_base_pays();
    return few_rows || !row_blocks_for_all_threads(M, std::max(K, N), sizeof(T)) ? by_columns() : by_row_blocks();
  }

  // Batches of up to this many rows split their columns between the threads (by_columns) even
  // where they would have row blocks for every thread: short blocks (8 rows each at M = 32 on 2
  // threads) make d lora_A / d lora_B products of depth 8 that read and write an r x (K + N)
  // float32 partial per block. LoRA part of the backward (without dX), 4096^2, r = 64, p = 0.1,
  // 2 threads of a Xeon: M = 32 0.93 -> 0.38 ms, M = 128 3.06 -> 1.57 ms; under the AVX2 caps
  // M = 32 1.24 -> 0.62 ms. At M = 256 the row blocks win at r = 16 (1.27 against 1.79 ms).
  // Not where the row blocks fuse dY @ W (fused_base_pays): that plan was measured there.
  static constexpr int64_t kColumnsMaxRows = kSmallBatchRows;

  // Rank from which by_row_blocks copies a float32 dY block to a padded row stride (see there).
  static constexpr int64_t kCopyDyMinRank = 32;

  // Rows up to which by_columns computes dX's base term dY @ W itself (add_base_split_k, which
  // streams W once) rather than leaving it to the BLAS. Measured at 4096^2 on 2 threads of a
  // Xeon: with MKL's AVX-512 kernels the split-k product wins up to 32 rows (backward 4.53
  // against 5.36 ms at M = 32) and loses at 128 (20.2 against 16.2 ms); under the AVX2 caps it
  // wins at 8 rows (2.1-2.3 against 3.7-3.9 ms) and loses from 12 (5.1 against 4.8 ms). Where
  // MKL runs no AVX-512 kernels on an AVX-512 CPU (fused_base_pays) every such batch keeps it,
  // as before these measurements; the baseline build leaves it to the BLAS. A 16-bit W always
  // goes through it: there is no float32 copy for the BLAS.
  int64_t split_k_max_rows() const {
    if (w_half != nullptr || fused_base_pays()) return std::numeric_limits<int64_t>::max();
    return small_gemm_isa() >= 4 ? 32 : small_gemm_isa() == 3 ? 8 : 0;
  }

  // Rows per block of by_row_blocks: direct_block_rows (L2-sized, at least 64), except under the
  // AVX2 build where the d lora_A / d lora_B partials (r x (in + out)) are small: 32 rows there,
  // whose block operands (dY_b, x_b, its dropped copy, dX_b) stay in L2 with the partials.
  // Measured under the AVX2 caps on a Xeon (backward, 2 threads, p = 0.05, interleaved): M =
  // 2048, 1024^2, r = 16: 23.5-23.9 against 24.0-24.8 ms (p = 0: 23.4 against 24.9); M = 512,
  // 2048^2: 22.1-23.8 against 22.5-23.9; M = 512, 4096^2, r = 16: 84.2 against 85.0; but r = 64
  // (2 MiB of partials, read and written once per block): 93.4-93.8 against 92.1-92.4, hence
  // the bound. With AVX-512 (MKL's dY @ W, or the fused one) 32 rows were no faster.
  int64_t block_rows_of_pass() const {
    const int64_t bm = direct_block_rows(M, std::max(K, N), sizeof(T));
    constexpr int64_t kAvx2Rows = 32, kAvx2MaxPartialBytes = 512 << 10;
    const bool small_partials = r * (K + N) * static_cast<int64_t>(sizeof(T)) <= kAvx2MaxPartialBytes;
    return small_gemm_isa() == 3 && small_partials ? balanced_block_rows(M, std::min(bm, kAvx2Rows)) : bm;
  }

  // Blocks of rows, one thread per block. Per block: dY_b is copied once, transposed, into an
  // L2-resident buffer (small_gemm's fast layout for a long-k left operand: a tile's values
  // adjacent in memory, ~90 GFLOP/s per thread against ~60 through the strided rows); from it
  // g = s * dY_b @ B and, for blocks of kFusedBaseMinRows rows or more, the base term dY_b @ W
  // of dX, accumulated onto the block's masked LoRA term while both are hot, so dY is read and
  // dX written once for the whole backward. d lora_B uses dY_b's rows, d lora_A the dropped x
  // block; both are per-thread partials summed in a fixed order.
  std::tuple<Tensor, Tensor> by_row_blocks() {
    const int64_t bm = block_rows_of_pass();
    const int64_t nblocks = ceil_div(M, bm);
    base_in_grad_x = gx != nullptr && w != nullptr && bm >= kFusedBaseMinRows && fused_base_pays();
    const int nthreads = std::max(1, at::get_num_threads());  // thread ids are < this
    // Per thread: partial d lora_A (r x K) and d lora_B^T (r x N); scratch dY_b^T (N x bm),
    // g (bm x rp), the dropped x block (bm x ldk) and a staged dY block (bm x ldn).
    ThreadPartials<T> parts(r * (K + N), A.options());
    // bfloat16 operands add float32 blocks of dY (bm x ldn) and dX (bm x K), and always stage x.
    const bool half = dy_h != nullptr;
    // small_gemm's B operands with K columns, lora_A (for the dX term) and the dropped x block
    // (for d lora_A), at a row stride off multiples of 1 KiB (panel_row_stride).
    const int64_t ldk = panel_row_stride(K, sizeof(T));
    Tensor A_panel = A;
    if (ldk != K && (gx != nullptr || gx_h != nullptr)) {
      A_panel = at::empty({r, ldk}, A.options());
      A_panel.narrow(1, 0, K).copy_(A);
    }
    const T* a_mm = A_panel.const_data_ptr<T>();
    const int64_t lda_mm = A_panel.stride(0);
    // d lora_B's B operand, the dY block, likewise: bfloat16 dY is converted into such a block
    // anyway; a float32 dY at multiples of 1 KiB is copied into one from rank kCopyDyMinRank up,
    // where the product has enough row tiles to repay the copy, by the AVX2 build (where it was
    // measured; AVX-512 runs the products faster, so the copy weighs more). On the Zen 3 EPYC
    // (backward op's LoRA part, random order per round, median of per-round differences): r = 64,
    // M = 2048, 4096^2 -1.47 ms of ~28 (p = 0.1), -0.84 (p = 0); r = 32, M = 1024, 4096^2 -0.19
    // ms; r = 32 at 1024^2 +0.03 (noise) and r = 16 +0.02 / +0.05 ms (512 x 2048^2 / 2048 x
    // 1024^2). The same copy of a float32 x block without dropout (p = 0, r = 64) gained nothing
    // (-0.05 ms, spread +-1).
    const int64_t ldn = panel_row_stride(N, sizeof(T));
    const bool copy_dy =
        std::is_same_v<T, float> && !half && r >= kCopyDyMinRank && ldn != N && small_gemm_isa() == 3;
    const bool stage_x = d.active || half, stage_dy = half || copy_dy;
    const int64_t scratch_len = (base_in_grad_x ? N * bm : 0) + bm * rp + (stage_x ? bm * ldk : 0) +
                                (stage_dy ? bm * ldn : 0) + (gx_h ? bm * K : 0);
    Tensor scratch = at::empty({nthreads, scratch_len}, A.options());
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      const int tid = at::get_thread_num();
      T* pa = parts.mine();
      T* pb = pa + r * K;
      T* dyt = scratch.mutable_data_ptr<T>() + tid * scratch_len;
      T* g = dyt + (base_in_grad_x ? N * bm : 0);
      T* xd = g + bm * rp;
      T* dyf = xd + (stage_x ? bm * ldk : 0);  // the staged dY_b (half: then float32 dX_b)
      T* gxf = dyf + (stage_dy ? bm * ldn : 0);
      std::vector<T> mult;
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = blk * bm, n = std::min(bm, M - r0);
        const T* dy_b = dy + r0 * ldy;
        const T* x_b = x + r0 * ldx;
        int64_t ldy_b = ldy, ldx_b = ldx;
        if constexpr (std::is_same_v<T, float>) {
          if (half) {  // exact conversions; dropout then runs on xd in place
            for (int64_t i = 0; i < n; ++i) {
              bf16_row_to_float(reinterpret_cast<const uint16_t*>(dy_h + (r0 + i) * ldy), dyf + i * ldn, N);
              bf16_row_to_float(reinterpret_cast<const uint16_t*>(x_h + (r0 + i) * ldx), xd + i * ldk, K);
            }
            dy_b = dyf;
            x_b = xd;
            ldy_b = ldn;
            ldx_b = ldk;
          }
        }
        if (copy_dy) {
          for (int64_t i = 0; i < n; ++i) std::copy(dy_b + i * ldy, dy_b + i * ldy + N, dyf + i * ldn);
          dy_b = dyf;
          ldy_b = ldn;
        }
        // g = s * dY_b @ B, through dY_b^T (dyt[p * bm + i] = dY[r0 + i, p]) when the base
        // term needs it anyway
        if (base_in_grad_x) {
          transpose_into(dy_b, n, N, ldy_b, dyt, bm);
          small_gemm(n, rp, N, s, dyt, 1, bm, b_p, rp, false, g, rp);
        } else {
          small_gemm(n, rp, N, s, dy_b, ldy_b, 1, b_p, rp, false, g, rp);
        }
        // d lora_B^T += s * xa_b^T @ dY_b  (vectorised along N: reads dY rows, not columns)
        small_gemm(r, N, n, s, xa_p + r0 * r, 1, r, dy_b, ldy_b, true, pb, N);
        // dX_b = mask * (g @ A) and d lora_A += g^T @ dropout(x_b): in one kernel where there is
        // one (float32 under dropout, small ranks), else small_gemm's products around a dropout
        // pass that evaluates the mask once for both
        T* gx_b = gx ? gx + r0 * K : gx_h ? gxf : nullptr;
        bool x_side_done = false;
        if constexpr (std::is_same_v<T, float>) {
          x_side_done = lora_bwd_x_side_f32(x_b, ldx_b, g, rp, a, r, K, n, r0, d, gx_b, K, pa);
        }
        const T* xd_b = x_b;
        int64_t ldxd = ldx_b;
        if (!x_side_done) {
          if (gx_b) small_gemm(n, K, r, T(1), g, rp, 1, a_mm, lda_mm, false, gx_b, K);
          if (d.active) {
            if (gx_b) {
              dropout_rows_raw<T, true>(x_b, ldx_b, xd, ldk, gx_b, K, n, K, r0, d, mult);
            } else {
              dropout_rows_raw<T, false>(x_b, ldx_b, xd, ldk, nullptr, 0, n, K, r0, d, mult);
            }
            xd_b = xd;
            ldxd = ldk;
          }
        }
        if constexpr (std::is_same_v<T, float>) {
          if (gx_h) {  // the float32 LoRA term of dX rounded once into the bfloat16 dX
            uint16_t* out = reinterpret_cast<uint16_t*>(gx_h + r0 * K);
            for (int64_t i = 0; i < n; ++i) {
              if (onto_gx_h) {
                add_row_into_bf16(out + i * K, gxf + i * K, nullptr, nullptr, K);
              } else {
                round_row_bf16(out + i * K, gxf + i * K, nullptr, nullptr, K);
              }
            }
          }
        }
        // dX_b += dY_b @ W
        if (base_in_grad_x) small_gemm(n, K, N, T(1), dyt, 1, bm, w, ldw, true, gx_b, K);
        // d lora_A += g^T @ dropout(x_b)
        if (!x_side_done) small_gemm(r, K, n, T(1), g, 1, rp, xd_b, ldxd, true, pa, K);
      }
    });
    const Tensor acc = parts.sum();
    Tensor grad_A = acc.narrow(0, 0, r * K).view({r, K});
    Tensor grad_B = at::empty({N, r}, A.options());
    transpose_into(acc.const_data_ptr<T>() + r * K, r, N, N, grad_B.mutable_data_ptr<T>(), r);
    return {grad_A, grad_B};
  }

  // A batch of few rows (decode-sized, or up to kColumnsMaxRows): the rows stay one block and
  // the threads split the columns instead, of dY for d lora_B and of x / dX for d lora_A and
  // the dX term, written straight into the gradients (nothing to sum).
  std::tuple<Tensor, Tensor> by_columns() {
    // g = s * dY @ B: M x N x r, small next to the rest; chunks of 16 rows over the threads (one
    // chunk, decode-sized, runs inline). dY^T (N x M) is also the left operand of dX's base term
    // when add_base_split_k computes it.
    base_in_grad_x = gx != nullptr && (w != nullptr || w_half != nullptr) && M <= split_k_max_rows();
    Tensor dyt_t = at::empty({base_in_grad_x ? N * M : 0}, A.options());
    T* dyt = dyt_t.mutable_data_ptr<T>();
    if (base_in_grad_x) transpose_into(dy, M, N, ldy, dyt, M);
    Tensor g = at::empty({M, rp}, A.options());
    T* gp = g.mutable_data_ptr<T>();
    constexpr int64_t kGRows = 16;
    at::parallel_for(0, ceil_div(M, kGRows), 1, [&](int64_t c0, int64_t c1) {
      const int64_t i0 = c0 * kGRows, i1 = std::min(M, c1 * kGRows);
      small_gemm(i1 - i0, rp, N, s, dy + i0 * ldy, ldy, 1, b_p, rp, false, gp + i0 * rp, rp);
    });
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
    if constexpr (std::is_same_v<T, float>) {
      if (w_half != nullptr && rows_dot_available()) return add_base_by_columns(dyt);
    }
    const int nthreads = std::max(1, at::get_num_threads());  // thread ids are < this
    Tensor parts = at::empty({nthreads, M * K}, A.options());  // row 0 unused: thread 0 writes dX
    std::vector<char> used(nthreads, 0);
    at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
      const int tid = at::get_thread_num();
      T* out = tid == 0 ? gx : parts.mutable_data_ptr<T>() + tid * M * K;
      if (w != nullptr) {
        small_gemm(M, K, n1 - n0, T(1), dyt + n0 * M, 1, M, w + n0 * ldw, ldw, /*accumulate=*/tid == 0, out, K);
      } else if constexpr (std::is_same_v<T, float>) {
        // bfloat16 W: chunks of its rows converted to float32 (exact) in an L1/L2-sized buffer
        // while the product streams them.
        constexpr int64_t kChunk = 16;
        std::vector<T> wrows(kChunk * K);
        for (int64_t c0 = n0; c0 < n1; c0 += kChunk) {
          const int64_t nc = std::min(kChunk, n1 - c0);
          for (int64_t i = 0; i < nc; ++i) {
            const uint16_t* row = w_half + (c0 + i) * ldw;
            if (w_fp16) {
              fp16_row_to_float(row, wrows.data() + i * K, K);
            } else {
              bf16_row_to_float(row, wrows.data() + i * K, K);
            }
          }
          small_gemm(M, K, nc, T(1), dyt + c0 * M, 1, M, wrows.data(), K, /*accumulate=*/tid == 0 || c0 > n0,
                     out, K);
        }
      }
      used[tid] = 1;
    });
    for (int t = 1; t < nthreads; ++t) {
      if (!used[t]) continue;
      const T* part = parts.const_data_ptr<T>() + t * M * K;
      for (int64_t e = 0; e < M * K; ++e) gx[e] += part[e];
    }
  }

  // The same for a bfloat16 or float16 W from AVX2 up (level >= 3): rows_axpy_add, which widens
  // W in registers instead of converting rows into a buffer first. The threads split dX's columns
  // (groups of 16), so each adds its share straight into dX. Measured at M = 8, in = out =
  // 4096 on 2 threads of a Xeon capped at AVX2, backward: 2.5 ms (3.0 with W out of cache)
  // against 3.5 ms (4.5) converting rows for small_gemm. A float32 W stays with small_gemm,
  // 2.2 ms (3.4) against rows_axpy_add's 2.5 ms (3.9).
  void add_base_by_columns(const float* dyt) {
    if (w_fp16) {
      add_base_by_columns_typed(reinterpret_cast<const at::Half*>(w_half), dyt);
    } else {
      add_base_by_columns_typed(reinterpret_cast<const at::BFloat16*>(w_half), dyt);
    }
  }
  template <typename HT>
  void add_base_by_columns_typed(const HT* wh, const float* dyt) {
    const int64_t full = K / 16 * 16;
    std::vector<HT> tail;
    if (full < K) {
      tail.resize(N * 16);
      rows_axpy_tail(wh, ldw, N, K, tail.data());
    }
    at::parallel_for(0, ceil_div(K, 16), 1, [&](int64_t g0, int64_t g1) {
      rows_axpy_add(wh, ldw, N, K, g0 * 16, std::min(g1 * 16, K), full < K ? tail.data() : nullptr, dyt, M, gx, K);
    });
  }
};

// The backward's LoRA part on float32 above small_gemm's ranks (kSmallGemmMaxRank, measured
// there): whole-batch BLAS GEMMs, each multithreaded: g = s * dY @ B, d lora_B = s * dY^T @ xa,
// the LoRA term g @ A written into dX and masked there as dropout(x) is materialised (one mask
// evaluation for both), d lora_A = g^T @ dropout(x). The caller accumulates dY @ W onto dX.
std::tuple<Tensor, Tensor> lora_bwd_blas(const Tensor& dy, const Tensor& x, const Tensor& lora_A,
                                         const Tensor& lora_B, const Tensor& xa, double scaling,
                                         const DropoutParams& d, Tensor* grad_x) {
  const Tensor g = at::mm(dy, lora_B).mul_(scaling);
  Tensor grad_B = at::mm(dy.t(), xa).mul_(scaling);
  Tensor xd = d.active ? at::empty(x.sizes(), x.options()) : x;
  if (grad_x) {
    at::mm_out(*grad_x, g, lora_A);
    if (d.active) dropout_rows_pair_(x, xd, *grad_x, 0, d);
  } else if (d.active) {
    dropout_rows_(x, xd, 0, d);
  }
  return {at::mm(g.t(), xd), grad_B};
}

}  // namespace

std::tuple<Tensor, Tensor> lora_bwd_products(const Tensor& dy, const Tensor& x, const Tensor& lora_A,
                                             const Tensor& lora_B, const Tensor& xa, double scaling,
                                             const DropoutParams& d, Tensor* grad_x, bool onto_grad_x) {
  const at::ScalarType ct = lora_A.scalar_type();
  if (dy.scalar_type() == ct) {
    TORCH_INTERNAL_ASSERT(!onto_grad_x, "lora_bwd_products: onto_grad_x is for a half-precision dX");
    if (ct == at::kDouble) return LoraBwdSmallGemm<double>(dy, x, Tensor(), lora_A, lora_B, xa, scaling, d, grad_x).run();
    if (rank_products_in_blas(x.size(0), lora_A.size(0))) {
      return lora_bwd_blas(dy, x, lora_A, lora_B, xa, scaling, d, grad_x);
    }
    return LoraBwdSmallGemm<float>(dy, x, Tensor(), lora_A, lora_B, xa, scaling, d, grad_x).run();
  }
  TORCH_INTERNAL_ASSERT(ct == at::kFloat && (!onto_grad_x || dy.scalar_type() == at::kBFloat16),
                        "lora_bwd_products: half-precision operands need float32 adapters");
  const int64_t M = x.size(0), K = x.size(1);
  // bfloat16 dY / x with rows for every thread: converted a block at a time inside the pass
  // (LoraBwdSmallGemm's half mode); otherwise (a few rows, or float16) whole.
  const bool by_blocks =
      dy.scalar_type() == at::kBFloat16 && row_blocks_for_all_threads(M, std::max(K, dy.size(1)), sizeof(float));
  const Tensor dy32 = by_blocks ? dy : dy.to(at::kFloat), x32 = by_blocks ? x : x.to(at::kFloat);
  Tensor gx32 = grad_x && !by_blocks ? at::empty({M, K}, x.options().dtype(at::kFloat)) : Tensor();
  LoraBwdSmallGemm<float> bwd(dy32, x32, Tensor(), lora_A, lora_B, xa, scaling, d,
                              grad_x ? (by_blocks ? grad_x : &gx32) : nullptr);
  bwd.onto_gx_h = onto_grad_x;
  auto grads = bwd.run();
  if (grad_x && !by_blocks) {
    if (onto_grad_x) {
      add_float_into_bf16(*grad_x, gx32);
    } else {
      grad_x->copy_(gx32);
    }
  }
  return grads;
}

namespace {

// The backward's LoRA part on bfloat16 with rows for every thread where bwd_bf16_native does not
// apply (odd in / out features, or no AVX512-BF16 kernel under a native-bf16 BLAS: AMX without
// it): the same pass through ATen's BLAS, block products rounded once to the input dtype and
// summed in float32 partials.
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

// The backward after its argument checks (lora_linear_bwd_cpu); weight may be undefined when
// grad_x is not requested (the half-precision route then skips converting it).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lora_linear_bwd_checked(
    const Tensor& grad_y_in, const Tensor& x_in, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B,
    const Tensor& xa, double scaling, double dropout_p, const Tensor& seed, std::array<bool, 3> output_mask) {
  const at::ScalarType dtype = x_in.scalar_type(), adapter_dtype = lora_A.scalar_type();
  const bool fp16_native = fp16_native_plan(x_in);
  if ((dtype == at::kBFloat16 || dtype == at::kHalf) && half_via_float32(dtype) && !fp16_native && weight.defined() &&
      weight.scalar_type() == dtype && weight.numel() > 0 && x_in.size(0) > 0 &&
      !row_blocks_for_all_threads(x_in.size(0), std::max(x_in.size(1), grad_y_in.size(1)), sizeof(float))) {
    // A decode-sized float16 batch, or bfloat16 without native bf16 GEMMs (with them the BLAS's
    // bf16 GEMM wins, see half_decode in the forward): the float32 backward on float32 copies
    // of its few rows and the adapters, dX's base term streaming the 16-bit weight
    // (add_base_split_k) instead of converting all of it to float32 first (21 ms at 4096^2);
    // each gradient rounded once.
    auto [gx, gw, gb, gA, gB] = lora_linear_bwd_checked(
        to_float(grad_y_in), to_float(x_in), output_mask[0] ? weight : Tensor(), to_float(lora_A), to_float(lora_B),
        to_float(xa), scaling, dropout_p, seed, output_mask);
    return {gx.to(dtype), gw.to(dtype), gb.to(dtype), gA.to(adapter_dtype), gB.to(adapter_dtype)};
  }
  if (half_via_float32(dtype) && !fp16_native) {  // see to_float; the weight only matters for grad_x
    auto [gx, gw, gb, gA, gB] = lora_linear_bwd_checked(
        to_float(grad_y_in), to_float(x_in), output_mask[0] ? float32_weight(weight) : Tensor(), to_float(lora_A),
        to_float(lora_B), to_float(xa), scaling, dropout_p, seed, output_mask);
    return {gx.to(dtype), gw.to(dtype), gb.to(dtype), gA.to(adapter_dtype), gB.to(adapter_dtype)};
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
  bool base_done = false;  // whether grad_x already holds dY @ W
  // dY @ W in the BLAS. A decode-sized bfloat16 dY is handed to it column-major (a transposed
  // copy of its few rows) on CPUs without AMX: oneDNN's AVX512-BF16 dY @ W ran 15% faster so
  // (Zen 4, M = 8, 4096^2: 2.6 vs 3.1 ms, the largest part of the step); from ~128 rows on the
  // row-major operand is as fast or faster. oneDNN's AMX kernels are faster on the row-major
  // one at every M (Xeon, M = 8: 1.8 vs 2.2 ms).
  auto base_term = [&](bool accumulate) {
    static const bool amx = machine_has_amx_bf16();
    const bool few_rows = dy.scalar_type() == at::kBFloat16 && !amx &&
                          !row_blocks_for_all_threads(M, std::max(K, dy.size(1)), x.element_size());
    const Tensor dy_blas = few_rows ? dy.t().contiguous().t() : dy;
    if (accumulate) {
      grad_x.addmm_(dy_blas, weight);
    } else {
      at::mm_out(grad_x, dy_blas, weight);
    }
    base_done = true;
  };
  if (x.scalar_type() == at::kFloat && rank_products_in_blas(M, lora_A.size(0))) {
    std::tie(grad_A, grad_B) = lora_bwd_blas(dy, x, lora_A, lora_B, xa, scaling, d, gx);
  } else if (x.scalar_type() == at::kFloat) {
    LoraBwdSmallGemm<float> bwd(dy, x, weight, lora_A, lora_B, xa, scaling, d, gx);
    std::tie(grad_A, grad_B) = bwd.run();
    base_done = bwd.base_in_grad_x;
  } else if (x.scalar_type() == at::kDouble) {
    LoraBwdSmallGemm<double> bwd(dy, x, weight, lora_A, lora_B, xa, scaling, d, gx);
    std::tie(grad_A, grad_B) = bwd.run();
    base_done = bwd.base_in_grad_x;
  } else if (adapter_dtype == dtype && bf16_native_lora(x, lora_A, dy.size(1))) {
    // The base term first, written by the BLAS (beta = 0); the LoRA pass adds to it (see
    // lora_linear_bf16_cpu.cpp for why not the other way round).
    if (need_x) base_term(/*accumulate=*/false);
    std::tie(grad_A, grad_B) = bwd_bf16_native(dy, x, lora_A, lora_B, xa, scaling, d, gx);
  } else if (dtype == at::kBFloat16 && adapter_dtype == at::kFloat && M > 0 && M <= kBf16DecodeRows &&
             lora_A.size(0) > 0 && bf16_decode_kernels_available()) {
    // PEFT's default float32 adapters on a decode-sized bfloat16 batch: the base term first, then
    // lora_linear_bf16_decode.cpp's kernels on the operands in place add the float32 LoRA term
    // to it, rounding once, and write the float32 gradients.
    if (need_x) base_term(/*accumulate=*/false);
    const Tensor A = lora_A.contiguous(), B = lora_B.contiguous(), xac = xa.contiguous();
    grad_A = at::empty(lora_A.sizes(), lora_A.options());
    grad_B = at::empty(lora_B.sizes(), lora_B.options());
    bwd_bf16_decode(reinterpret_cast<const uint16_t*>(dy.const_data_ptr<at::BFloat16>()), dy.stride(0),
                    reinterpret_cast<const uint16_t*>(x.const_data_ptr<at::BFloat16>()), x.stride(0),
                    xac.const_data_ptr<float>(), A.const_data_ptr<float>(), B.const_data_ptr<float>(), M, K,
                    dy.size(1), lora_A.size(0), static_cast<float>(scaling), d,
                    need_x ? reinterpret_cast<uint16_t*>(grad_x.mutable_data_ptr<at::BFloat16>()) : nullptr,
                    grad_A.mutable_data_ptr<float>(), grad_B.mutable_data_ptr<float>());
  } else if (M == 0 && adapter_dtype != dtype) {
    grad_A = at::zeros(lora_A.sizes(), lora_A.options());
    grad_B = at::zeros(lora_B.sizes(), lora_B.options());
  } else if (M > 0 && (fp16_native || adapter_dtype != dtype ||
                       !row_blocks_for_all_threads(M, std::max(K, dy.size(1)), x.element_size()))) {
    // The LoRA products in float32 small_gemm (lora_bwd_products), the base term with the BLAS
    // on the half-precision weight. Taken by float32 adapters on a half-precision x (PEFT's
    // default: the branch is float32, gradients of float32 adapters in float32) and by
    // decode-sized bfloat16 batches that bwd_bf16_native does not take: through the BLAS, the
    // per-call cost of their tiny products was most of the LoRA part (0.5 ms at M = 8, in = out
    // = 4096, bf16). A bfloat16 dX gets the base term first and the float32 LoRA term added to
    // it, rounded once (as bwd_bf16_native); float16 gets the LoRA term rounded to float16 first
    // (as PEFT's cast of x to the adapters' dtype does in backward), the BLAS accumulating onto it.
    // Also the native float16 plan's (fp16_native_plan) at every row count it takes.
    const bool onto = need_x && dtype == at::kBFloat16;
    if (onto) base_term(/*accumulate=*/false);
    // Half-precision adapters: their float32 copies in the thread's kept buffers (see
    // float32_copy_in_thread_buffer); float32 ones are used as they are.
    const bool half_adapters = adapter_dtype != at::kFloat;
    std::tie(grad_A, grad_B) = lora_bwd_products(
        dy, x, half_adapters ? float32_copy_in_thread_buffer(0, lora_A) : lora_A,
        half_adapters ? float32_copy_in_thread_buffer(1, lora_B) : lora_B, xa.to(at::kFloat), scaling, d,
        need_x ? &grad_x : nullptr, /*onto_grad_x=*/onto);
    grad_A = grad_A.to(adapter_dtype);
    grad_B = grad_B.to(adapter_dtype);
  } else {
    std::tie(grad_A, grad_B) = lora_bwd_half(dy, x, lora_A, lora_B, xa, scaling, d, gx);
  }
  if (need_x && M > 0 && !base_done) base_term(/*accumulate=*/true);
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

}  // namespace lora_cpu

TORCH_LIBRARY_IMPL(fastlora, CPU, m) {
  m.impl("lora_linear_bwd", &lora_cpu::lora_linear_bwd_cpu);
}

}  // namespace fastlora
