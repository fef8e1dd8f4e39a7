// The LoRA part of fastlora::lora_linear_fwd / _bwd on bfloat16 x, weight and adapters where the
// CPU has AVX512-BF16: every rank-r product in small_gemm_bf16 (vdpbf16ps, float32 sums) on
// blocks of rows, the base products x @ W^T and dY @ W left to the BLAS (oneDNN's bf16 GEMMs,
// which win at those sizes). The base product comes first (beta = 0) and the blocks add the
// float32 LoRA term (and the bias) to it, rounding once: oneDNN's bf16 GEMM accumulating onto
// an output (beta = 1, or addmm's bias) took 0.5 ms more than writing it (10.6 vs 10.1 ms at
// M = 2048, in = out = 1024), more than this pass's read of the rounded product.
//
// Where the CPU has AMX-BF16 and the batch has row blocks for every thread, the forward's expand
// is oneDNN's instead: the bias (and s * lora_B_bias) rounded to bfloat16 goes into the base
// product (addmm, as nn.Linear does), then y.addmm_(xa, B^T, alpha = s) adds the expand in
// float32 onto the rounded y and rounds once, in an AMX pass over y at ~40 GB/s (0.20 ms at
// M = 2048, in = out = 1024), where the blocks' AMX expand and rounding pass took ~0.4 ms:
// forward +61% over the base against +71% (M = 2048, 1024^2), +19% against +23% (4096^2, r =
// 64; Xeon, 2 threads).
//
// Through oneDNN the rank-r products cost more than their arithmetic: at M = 2048, in = out =
// 1024, r = 16, p = 0.05 (2 threads, Zen 4) the backward took +37% over the base dY @ W with
// per-block bf16 GEMM calls and float32 partials, +21% here (the forward +8% / +11%: oneDNN's
// expand was already one call; at M = 8, 4096^2, +17% / +10%). PEFT's rounding points are kept:
// xa and g = s dY @ B are rounded to bfloat16 before the products that use them, each gradient
// rounded once from float32, y and dX rounded from the rounded base product plus the float32
// LoRA term (PEFT rounds that term once more before the sum).
//
// The LoRA part of a small batch (at most 32 rows), forward and backward, runs
// lora_linear_bf16_decode.cpp's kernels instead, on the operands in place.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "lora_linear_blocks.h"

namespace fastlora {
namespace lora_cpu {
namespace {

const uint16_t* bits(const Tensor& t) { return reinterpret_cast<const uint16_t*>(t.const_data_ptr<at::BFloat16>()); }
uint16_t* bits_mut(Tensor& t) { return reinterpret_cast<uint16_t*>(t.mutable_data_ptr<at::BFloat16>()); }

// Pairs along the columns of the rows x cols bfloat16 matrix src as the B operand of
// small_gemm_bf16 whose k runs along those columns: out[p * rows + j] = src(j, 2p) | src(j, 2p +
// 1) << 16, an odd last column paired with zero. (rows x cols, row stride ld.)
void pack_column_pairs(const uint16_t* src, int64_t rows, int64_t cols, int64_t ld, uint32_t* out) {
  const int64_t c2 = ceil_div(cols, 2);
  if (cols % 2 == 0 && ld % 2 == 0 && reinterpret_cast<uintptr_t>(src) % 4 == 0) {
    // The pairs are src's 32-bit words: a transpose of those (at M = 8, 4096^2 the per-element
    // loop took 88 us per forward, most of its LoRA part)
    transpose_into(reinterpret_cast<const uint32_t*>(src), rows, c2, ld / 2, out, rows);
    return;
  }
  for (int64_t j = 0; j < rows; ++j) {
    const uint16_t* s = src + j * ld;
    for (int64_t p = 0; p < c2; ++p) {
      const uint32_t hi = 2 * p + 1 < cols ? s[2 * p + 1] : 0;
      out[p * rows + j] = static_cast<uint32_t>(s[2 * p]) | (hi << 16);
    }
  }
}

// dst (cols x ld_dst) = the transpose of the rows x cols block src (row stride ld_src), rows
// padded with zeros to an even count: the A operand of a product whose k runs along src's rows.
void transpose_padded(const uint16_t* src, int64_t rows, int64_t cols, int64_t ld_src, uint16_t* dst,
                      int64_t ld_dst) {
  transpose_into(src, rows, cols, ld_src, dst, ld_dst);
  if (rows % 2 == 1) {
    for (int64_t j = 0; j < cols; ++j) dst[j * ld_dst + rows] = 0;
  }
}

}  // namespace

bool bf16_native_lora(const Tensor& x, const Tensor& lora_A, int64_t out_features) {
  if (!(x.scalar_type() == at::kBFloat16 && lora_A.scalar_type() == at::kBFloat16 && small_gemm_bf16_native() &&
        x.size(0) > 0 && lora_A.size(0) > 0)) {
    return false;
  }
  // The decode kernels take any sizes; the row blocks pack in / out features in pairs
  if (x.size(0) <= kBf16DecodeRows && bf16_decode_kernels_available()) return true;
  return x.size(1) % 2 == 0 && out_features % 2 == 0;
}

std::tuple<Tensor, Tensor> fwd_bf16_native(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                           const Tensor& lora_A, const Tensor& lora_B, double scaling,
                                           const DropoutParams& d, const std::optional<Tensor>& lora_B_bias) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_A.size(0);
  const int64_t r2 = ceil_div(r, 2);
  const Tensor A = lora_A.contiguous(), B = lora_B.contiguous();
  const int64_t bm = direct_block_rows(M, std::max(K, N), sizeof(float));
  // With AMX the expand goes to oneDNN, accumulating onto the base product in its own pass (see
  // the header); a batch with fewer blocks keeps it in the blocks (one oneDNN call more cost
  // 0.07 ms at M = 8, 4096^2, before that size got its own kernels).
  const bool onednn_expand = small_gemm_bf16_amx() && blocks_run_parallel(ceil_div(M, bm));
  std::vector<float> bias_eff;
  if (bias || lora_B_bias) {
    bias_eff.assign(N, 0.0f);
    const Tensor bc = bias ? bias->contiguous() : Tensor(), lbc = lora_B_bias ? lora_B_bias->contiguous() : Tensor();
    const uint16_t* pb = bc.defined() ? bits(bc) : nullptr;
    const uint16_t* plb = lbc.defined() ? bits(lbc) : nullptr;
    const float s = static_cast<float>(scaling);
    for (int64_t j = 0; j < N; ++j) {
      bias_eff[j] = (pb ? bf16_bits_to_float(pb[j]) : 0.0f) + (plb ? s * bf16_bits_to_float(plb[j]) : 0.0f);
    }
  }
  Tensor xa = at::empty({M, r}, x.options());
  if (M <= kBf16DecodeRows && bf16_decode_kernels_available()) {
    Tensor y = at::mm(x, weight.t());
    fwd_bf16_decode(bits(x), x.stride(0), bits(A), bits(B), bias_eff.empty() ? nullptr : bias_eff.data(), M, K, N, r,
                    static_cast<float>(scaling), d, bits_mut(xa), bits_mut(y));
    return {y, xa};
  }
  // shrink's B operand: A^T in pairs along K; the expand's (in the blocks): B^T in pairs along r
  const auto at_pairs = uninitialized<uint32_t>(K / 2 * r);
  const auto bt_pairs = uninitialized<uint32_t>(onednn_expand ? 0 : r2 * N);
  pack_column_pairs(bits(A), r, K, K, at_pairs.get());
  if (!onednn_expand) pack_column_pairs(bits(B), N, r, r, bt_pairs.get());
  Tensor y;
  if (onednn_expand) {
    Tensor be;
    if (bias || lora_B_bias) {
      be = at::empty({N}, x.options());
      round_row_bf16(bits_mut(be), bias_eff.data(), nullptr, nullptr, N);
    }
    y = be.defined() ? at::addmm(be, x, weight.t()) : at::mm(x, weight.t());
  } else {
    y = at::mm(x, weight.t());
  }
  const uint16_t* xp = bits(x);
  uint16_t* xap = bits_mut(xa);
  uint16_t* yp = bits_mut(y);
  const int64_t ldx = x.stride(0);
  const float s = static_cast<float>(scaling);
  constexpr int64_t kCols = 512;  // expand columns per chunk (an L2-sized float32 block)
  run_blocks(ceil_div(M, bm), [&](int64_t b0, int64_t b1) {
    const int64_t ldxd = tile_row_stride(K, sizeof(uint16_t));  // dropout(x)'s rows, as AMX tiles' A
    const auto xd = uninitialized<uint16_t>(d.active ? bm * ldxd : 0);
    std::vector<uint16_t> xab(bm * 2 * r2, 0);  // an odd rank's pad column stays zero
    std::vector<float> xa32(bm * r), mult;
    const auto ych = uninitialized<float>(onednn_expand ? 0 : bm * kCols);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * bm, n = std::min(bm, M - r0);
      const uint16_t* a = xp + r0 * ldx;
      int64_t lda = ldx;
      if (d.active) {
        mult.resize(K);
        for (int64_t i = 0; i < n; ++i) {
          row_mask(mult.data(), K, 0, r0 + i, d);
          scale_row_bf16(xd.get() + i * ldxd, a + i * ldx, mult.data(), K);
        }
        a = xd.get();
        lda = ldxd;
      }
      small_gemm_bf16(n, r, K / 2, 1.0f, a, lda, 2, at_pairs.get(), r, false, xa32.data(), r);
      for (int64_t i = 0; i < n; ++i) {  // xa rounded once: the output, and the expand's operand
        round_row_bf16(xap + (r0 + i) * r, xa32.data() + i * r, nullptr, nullptr, r);
        std::copy(xap + (r0 + i) * r, xap + (r0 + i + 1) * r, xab.data() + i * 2 * r2);
      }
      if (onednn_expand) continue;
      for (int64_t j0 = 0; j0 < N; j0 += kCols) {
        const int64_t nc = std::min(kCols, N - j0);
        small_gemm_bf16(n, nc, r2, s, xab.data(), 2 * r2, 2, bt_pairs.get() + j0, N, false, ych.get(), nc);
        for (int64_t i = 0; i < n; ++i) {
          add_row_into_bf16(yp + (r0 + i) * N + j0, ych.get() + i * nc, nullptr,
                            bias_eff.empty() ? nullptr : bias_eff.data() + j0, nc);
        }
      }
    }
  });
  if (onednn_expand) y.addmm_(xa, lora_B.t(), 1.0, scaling);
  return {y, xa};
}

std::tuple<Tensor, Tensor> bwd_bf16_native(const Tensor& dy, const Tensor& x, const Tensor& lora_A,
                                           const Tensor& lora_B, const Tensor& xa_in, double scaling,
                                           const DropoutParams& d, Tensor* grad_x) {
  const int64_t M = x.size(0), K = x.size(1), N = dy.size(1), r = lora_A.size(0);
  const int64_t r2 = ceil_div(r, 2);
  const Tensor A = lora_A.contiguous(), B = lora_B.contiguous(), xa = xa_in.contiguous();
  if (M <= kBf16DecodeRows && bf16_decode_kernels_available()) {
    Tensor grad_A = at::empty({r, K}, x.options()), grad_B = at::empty({N, r}, x.options());
    bwd_bf16_decode(bits(dy), dy.stride(0), bits(x), x.stride(0), bits(xa), bits(A), bits(B), M, K, N, r,
                    static_cast<float>(scaling), d, grad_x ? bits_mut(*grad_x) : nullptr, bits_mut(grad_A),
                    bits_mut(grad_B));
    return {grad_A, grad_B};
  }
  // g = s dY @ B: B's rows in pairs (k = N); dX's LoRA term g @ A: A's rows in pairs (k = r)
  // (the buffers that AMX tiles load get row strides off 4 KiB multiples: tile_row_stride)
  const int64_t ldk = tile_row_stride(K, sizeof(uint32_t)), ldn = tile_row_stride(N, sizeof(uint32_t));
  const auto b_pairs = uninitialized<uint32_t>(N / 2 * r), a_pairs = uninitialized<uint32_t>(r2 * ldk);
  pack_bf16_row_pairs(bits(B), N, r, r, b_pairs.get(), r);
  pack_bf16_row_pairs(bits(A), r, K, K, a_pairs.get(), ldk);
  const uint16_t* dyp = bits(dy);
  const uint16_t* xp = bits(x);
  const uint16_t* xap = bits(xa);
  uint16_t* gxp = grad_x ? bits_mut(*grad_x) : nullptr;
  const int64_t ldy = dy.stride(0), ldx = x.stride(0);
  const int64_t bm = direct_block_rows(M, std::max(K, N), sizeof(float));
  const int64_t bm2 = ceil_div(bm, 2);
  const float s = static_cast<float>(scaling);
  ThreadPartials<float> parts(r * (K + N), x.options().dtype(at::kFloat));
  run_blocks(ceil_div(M, bm), [&](int64_t b0, int64_t b1) {
    float* pa = nullptr;  // d lora_A (r x K), then d lora_B^T (r x N): claimed at the first block
    float* pb = nullptr;
    bool first = false;
    std::vector<float> g32(bm * r), mult(K);
    std::vector<uint16_t> gb(bm * 2 * r2, 0), gbt(r * 2 * bm2), xat(r * 2 * bm2);  // gb: odd r's pad stays zero
    const auto gx32 = uninitialized<float>(grad_x ? bm * ldk : 0);
    const auto xd = uninitialized<uint16_t>(d.active ? bm * K : 0);
    const auto dy_pairs = uninitialized<uint32_t>(bm2 * ldn), xd_pairs = uninitialized<uint32_t>(bm2 * ldk);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * bm, n = std::min(bm, M - r0), n2 = ceil_div(n, 2);
      const uint16_t* dy_b = dyp + r0 * ldy;
      const uint16_t* x_b = xp + r0 * ldx;
      if (pa == nullptr) {
        pa = parts.claim(&first);
        pb = pa + r * K;
      } else {
        first = false;
      }
      // g = s * dY_b @ B, rounded (PEFT's bfloat16 gradient of xa)
      small_gemm_bf16(n, r, N / 2, s, dy_b, ldy, 2, b_pairs.get(), r, false, g32.data(), r);
      for (int64_t i = 0; i < n; ++i) round_row_bf16(gb.data() + i * 2 * r2, g32.data() + i * r, nullptr, nullptr, r);
      // d lora_B^T += s * xa_b^T @ dY_b (k = the block's rows, in pairs)
      transpose_padded(xap + r0 * r, n, r, r, xat.data(), 2 * n2);
      pack_bf16_row_pairs(dy_b, n, N, ldy, dy_pairs.get(), ldn);
      small_gemm_bf16(r, N, n2, s, xat.data(), 2 * n2, 2, dy_pairs.get(), ldn, /*accumulate=*/!first, pb, N);
      // dX_b = mask * (g @ A), and dropout(x_b) with the same multipliers
      if (grad_x) small_gemm_bf16(n, K, r2, 1.0f, gb.data(), 2 * r2, 2, a_pairs.get(), ldk, false, gx32.get(), ldk);
      const uint16_t* xd_b = x_b;
      int64_t ldxd = ldx;
      for (int64_t i = 0; i < n; ++i) {
        if (d.active) {
          row_mask(mult.data(), K, 0, r0 + i, d);
          scale_row_bf16(xd.get() + i * K, x_b + i * ldx, mult.data(), K);
        }
        if (grad_x) {
          add_row_into_bf16(gxp + (r0 + i) * K, gx32.get() + i * ldk, d.active ? mult.data() : nullptr, nullptr, K);
        }
      }
      if (d.active) {
        xd_b = xd.get();
        ldxd = K;
      }
      // d lora_A += g^T @ dropout(x_b)
      transpose_padded(gb.data(), n, r, 2 * r2, gbt.data(), 2 * n2);
      pack_bf16_row_pairs(xd_b, n, K, ldxd, xd_pairs.get(), ldk);
      small_gemm_bf16(r, K, n2, 1.0f, gbt.data(), 2 * n2, 2, xd_pairs.get(), ldk, /*accumulate=*/!first, pa, K);
    }
  });
  const Tensor acc = parts.sum();
  // Rounded by the vectorised row loop, d lora_B^T transposed as bfloat16 (ATen's rounding
  // copies, the transposed one strided, took 150 us at M = 8, 4096^2: 5% of the backward).
  Tensor grad_A = at::empty({r, K}, x.options()), grad_B = at::empty({N, r}, x.options());
  const auto gbt16 = uninitialized<uint16_t>(r * N);
  const float* pacc = acc.const_data_ptr<float>();
  round_row_bf16(bits_mut(grad_A), pacc, nullptr, nullptr, r * K);
  round_row_bf16(gbt16.get(), pacc + r * K, nullptr, nullptr, r * N);
  transpose_into(gbt16.get(), r, N, N, bits_mut(grad_B), r);
  return {grad_A, grad_B};
}

}  // namespace lora_cpu
}  // namespace fastlora
