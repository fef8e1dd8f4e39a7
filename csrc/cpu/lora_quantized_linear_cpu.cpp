// CPU kernels of fastlora::lora_quantized_linear_fwd / _bwd and fastlora::dequantize (formats and
// semantics in csrc/lora_quantized_linear.cpp).
//
// The base weight is never materialised in full precision: the base products run on panels of
// it, each dequantized into a per-thread buffer of ~2 or ~8 MiB (panel_width: codes ->
// code[q] * absmax, the float32 product bitsandbytes computes, then the compute type) right
// before the BLAS multiplies it, one thread per panel:
//   forward   y[:, n0:n1]  += x  @ dequant(W[n0:n1, :])^T   (panels of W's rows)
//   backward  dX[:, k0:k1] += dY @ dequant(W[:, k0:k1])     (panels of W's columns)
// so each output column block is written by one thread and nothing is accumulated across threads.
// The LoRA branch is lora_linear's: the same shrink (small_gemm on dropped blocks of rows), the
// dropout mask regenerated from the counter-based hash in backward.
//
// Compute type: float64 for float64 inputs, float32 otherwise. float16 / bfloat16 x (and half or
// float32 adapters) run on float32 copies, the results rounded once (a half-precision GEMM is
// slow on CPUs without native half instructions), except the base products of bfloat16 x on
// CPUs with native bf16 GEMMs, which run in bfloat16 (native_half_base).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include "../lora_op_checks.h"
#include "lora_linear_blocks.h"

#include <immintrin.h>

#include <cstring>
#include <type_traits>

namespace fastlora {
namespace lora_cpu {
namespace {

// A validated quantized weight (check_quantized_weight ran): raw pointers and sizes.
struct QuantView {
  const uint8_t* q;
  const float* absmax;
  const float* code;
  int64_t blocksize, N, K;
  bool four_bit;

  static QuantView of(const Tensor& qweight, const Tensor& absmax, const Tensor& code, int64_t blocksize,
                      at::IntArrayRef shape) {
    return {qweight.const_data_ptr<uint8_t>(), absmax.const_data_ptr<float>(), code.const_data_ptr<float>(),
            blocksize, shape[0], shape[1], code.numel() == 16};
  }
};

// Whole bytes of 4-bit codes (two elements each, the high nibble first) through a 16-entry
// table of the block's values: out[2i] = lut[q[i] >> 4], out[2i + 1] = lut[q[i] & 15]. Vector
// builds: one permute looks up 16 (float32) or 32 (bfloat16) elements; scalar otherwise. The
// table holds the float32 products code * absmax already rounded to the output type, so every
// build writes the same values.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void nibbles_f32_avx512(const uint8_t* q, int64_t nbytes,
                                                                              const float* lut, float* out) {
  const __m512 table = _mm512_loadu_ps(lut);
  const __m128i low4 = _mm_set1_epi8(0x0F);
  int64_t i = 0;
  for (; i + 8 <= nbytes; i += 8) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4), lo = _mm_and_si128(b, low4);
    const __m512i idx = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));
    _mm512_storeu_ps(out + 2 * i, _mm512_permutexvar_ps(idx, table));
  }
  for (; i < nbytes; ++i) {
    out[2 * i] = lut[q[i] >> 4];
    out[2 * i + 1] = lut[q[i] & 0xF];
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) void nibbles_bf16_avx512(const uint8_t* q, int64_t nbytes,
                                                                               const at::BFloat16* lut,
                                                                               at::BFloat16* out) {
  // 32 bf16 entries: the 16 values twice (permutexvar_epi16 indexes 32 lanes; indices < 16)
  uint16_t bits[32];
  std::memcpy(bits, lut, 16 * sizeof(uint16_t));
  std::memcpy(bits + 16, lut, 16 * sizeof(uint16_t));
  const __m512i table = _mm512_loadu_si512(bits);
  const __m128i low4 = _mm_set1_epi8(0x0F);
  int64_t i = 0;
  for (; i + 16 <= nbytes; i += 16) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4), lo = _mm_and_si128(b, low4);
    const __m512i idx = _mm512_cvtepu8_epi16(_mm256_set_m128i(_mm_unpackhi_epi8(hi, lo), _mm_unpacklo_epi8(hi, lo)));
    _mm512_storeu_si512(out + 2 * i, _mm512_permutexvar_epi16(idx, table));
  }
  for (; i < nbytes; ++i) {
    out[2 * i] = lut[q[i] >> 4];
    out[2 * i + 1] = lut[q[i] & 0xF];
  }
}

__attribute__((target("avx2,fma"))) void nibbles_f32_avx2(const uint8_t* q, int64_t nbytes, const float* lut,
                                                         float* out) {
  const __m256 lo_table = _mm256_loadu_ps(lut), hi_table = _mm256_loadu_ps(lut + 8);
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m256i seven = _mm256_set1_epi32(7);
  int64_t i = 0;
  for (; i + 4 <= nbytes; i += 4) {
    int32_t four;
    std::memcpy(&four, q + i, sizeof(four));  // an unaligned load without undefined behaviour
    const __m128i b = _mm_cvtsi32_si128(four);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4), lo = _mm_and_si128(b, low4);
    const __m256i idx = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));
    const __m256 from_lo = _mm256_permutevar8x32_ps(lo_table, idx), from_hi = _mm256_permutevar8x32_ps(hi_table, idx);
    const __m256 upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, seven));
    _mm256_storeu_ps(out + 2 * i, _mm256_blendv_ps(from_lo, from_hi, upper));
  }
  for (; i < nbytes; ++i) {
    out[2 * i] = lut[q[i] >> 4];
    out[2 * i + 1] = lut[q[i] & 0xF];
  }
}

template <typename T>
void nibbles_scalar(const uint8_t* q, int64_t nbytes, const T* lut, T* out) {
  for (int64_t i = 0; i < nbytes; ++i) {
    out[2 * i] = lut[q[i] >> 4];
    out[2 * i + 1] = lut[q[i] & 0xF];
  }
}

template <typename T>
void nibbles(const uint8_t* q, int64_t nbytes, const T* lut, T* out) {
  static const int level = small_gemm_isa();  // the instruction-set cap (FASTLORA_CPU_ISA) applies
  if constexpr (std::is_same_v<T, float>) {
    if (level >= 4) return nibbles_f32_avx512(q, nbytes, lut, out);
    if (level >= 3) return nibbles_f32_avx2(q, nbytes, lut, out);
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (level >= 4) return nibbles_bf16_avx512(q, nbytes, lut, out);
  }
  nibbles_scalar(q, nbytes, lut, out);
}

// Elements f .. f + len - 1 of the flat (row-major) weight into out, as T.
template <typename T>
void dequant_span(const QuantView& w, int64_t f, int64_t len, T* out) {
  const int64_t fend = f + len;
  while (f < fend) {
    const int64_t blk = f / w.blocksize;
    const int64_t bend = std::min(fend, (blk + 1) * w.blocksize);
    const float am = w.absmax[blk];
    if (w.four_bit) {
      // The block's 16 values once: the float32 products code[q] * absmax, rounded to T.
      T lut[16];
      for (int i = 0; i < 16; ++i) lut[i] = static_cast<T>(w.code[i] * am);
      if ((f & 1) && f < bend) {  // odd flat index: the low nibble of its byte
        *out++ = lut[w.q[f >> 1] & 0xF];
        ++f;
      }
      const int64_t pairs = (bend - f) / 2;
      nibbles<T>(w.q + (f >> 1), pairs, lut, out);
      out += 2 * pairs;
      f += 2 * pairs;
      if (f < bend) {
        *out++ = lut[w.q[f >> 1] >> 4];
        ++f;
      }
    } else {
      for (; f < bend; ++f) *out++ = static_cast<T>(w.code[w.q[f]] * am);
    }
  }
}

// Rows n0 .. n1 - 1, columns k0 .. k1 - 1 of the weight into out (row stride ld).
template <typename T>
void dequant_rect(const QuantView& w, int64_t n0, int64_t n1, int64_t k0, int64_t k1, T* out, int64_t ld) {
  for (int64_t n = n0; n < n1; ++n) dequant_span(w, n * w.K + k0, k1 - k0, out + (n - n0) * ld);
}

// Panel width (rows or columns of W) for panels of `len`-long lines of T, at least two panels
// per thread so both cores stay busy; a multiple of 8. The BLAS reads the other operand (x or
// dY, `other_bytes`) once per panel: ~2 MiB panels (L2-sized) where that operand is small, ~8
// MiB where it is larger than 1 MiB, whose re-reads from L3 then cost more than a panel that
// spills L2. Measured on an Ice Lake Xeon (2 threads, NF4, fwd + bwd): M=512, 4096^2, r=64
// 141-164 ms with 8 MiB panels against 185-207 with 2 MiB (PEFT + bitsandbytes 177-205), 221
// against 242 ms under the AVX2 caps; M=512, 2048^2 38.2 against 40.6 ms; M=8, 4096^2 stays at
// 2 MiB (20.2 ms with 8 MiB against 16.3).
int64_t panel_width(int64_t lines, int64_t len, int64_t elem_size, int64_t other_bytes) {
  const int64_t panel_bytes = other_bytes > (int64_t{1} << 20) ? int64_t{8} << 20 : int64_t{2} << 20;
  const int64_t nthreads = std::max(1, at::get_num_threads());
  const int64_t by_cache = std::max<int64_t>(8, panel_bytes / std::max<int64_t>(1, len * elem_size) / 8 * 8);
  const int64_t by_threads = std::max<int64_t>(8, ceil_div(ceil_div(lines, 2 * nthreads), 8) * 8);
  return std::max<int64_t>(1, std::min({lines, by_cache, by_threads}));
}

// out (+)= a @ op(dequant(W)) by panels of W, each dequantized (rounded to T, as bitsandbytes'
// compute dtype) right before its BLAS product and never all at once:
//   kForward:  out (M x N) = x (M x K) @ W^T, panels of W's rows (out's columns n0 .. n0 + n);
//   otherwise: out (M x K) = dY (M x N) @ W,  panels of W's columns (out's columns k0 .. k0 + k).
// kAccumulate: out += the product (out holds the LoRA branch already); else out = the product.
template <typename T, bool kForward, bool kAccumulate = true>
void quantized_product(const Tensor& a, const QuantView& w, Tensor& out) {
  const int64_t cols = kForward ? w.N : w.K;  // out's columns, cut into panels
  const int64_t depth = kForward ? w.K : w.N; // the reduction
  if (a.size(0) == 0 || cols == 0 || depth == 0) return;
  const int64_t pw = panel_width(cols, depth, sizeof(T), a.numel() * a.element_size());
  at::parallel_for(0, ceil_div(cols, pw), 1, [&](int64_t p0, int64_t p1) {
    // Worker threads do not inherit the caller's dispatch state: we are below autograd.
    at::AutoDispatchBelowAutograd below_autograd;
    Tensor panel = kForward ? at::empty({pw, depth}, a.options()) : at::empty({depth, pw}, a.options());
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c0 = p * pw, c = std::min(pw, cols - c0);
      Tensor b;
      if constexpr (kForward) {
        dequant_rect<T>(w, c0, c0 + c, 0, w.K, panel.mutable_data_ptr<T>(), w.K);
        b = panel.narrow(0, 0, c).t();
      } else {
        dequant_rect<T>(w, 0, w.N, c0, c0 + c, panel.mutable_data_ptr<T>(), pw);
        b = panel.narrow(1, 0, c);
      }
      Tensor out_cols = out.narrow(1, c0, c);
      if constexpr (kAccumulate) {
        out_cols.addmm_(a, b);
      } else {
        at::mm_out(out_cols, a, b);
      }
    }
  });
}

at::ScalarType compute_type(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

// bfloat16 x on a CPU with native bf16 GEMMs (AVX512-BF16 / AMX): the base products in
// bfloat16 on panels dequantized to bfloat16, as bitsandbytes with a bfloat16 compute dtype
// does (its QLoRA default), at twice the float32 GEMMs' rate; the LoRA branch and bias in
// float32, added to the rounded base product and rounded once (fastlora.reference's semantics
// for half-precision x; elsewhere float16 / bfloat16 run in float32 throughout, which is closer
// to the exact result still). Measured on Zen 4, 2 threads, a 4-layer QLoRA Llama step: the
// float32 route ran at 0.43x of PEFT + bitsandbytes' bfloat16 layers.
bool native_half_base(at::ScalarType dtype) { return dtype == at::kBFloat16 && native_bf16_gemm(); }

}  // namespace

std::tuple<Tensor, Tensor> lora_quantized_linear_fwd_cpu(const Tensor& x_in, const Tensor& qweight,
                                                         const Tensor& absmax, const Tensor& code, int64_t blocksize,
                                                         at::IntArrayRef weight_shape,
                                                         const std::optional<Tensor>& bias, const Tensor& lora_A,
                                                         const Tensor& lora_B, double scaling, double dropout_p,
                                                         const Tensor& seed,
                                                         const std::optional<Tensor>& lora_B_bias) {
  check_lora_quantized_fwd_args(x_in, qweight, absmax, code, blocksize, weight_shape, bias, lora_A, lora_B, scaling,
                                dropout_p, seed, lora_B_bias);
  const at::ScalarType dtype = x_in.scalar_type(), adapter_dtype = lora_A.scalar_type();
  const at::ScalarType ct = compute_type(dtype);
  const DropoutParams d = DropoutParams::make(dropout_p, seed_value(seed));
  const QuantView w = QuantView::of(qweight, absmax, code, blocksize, weight_shape);
  // bias + s * lora_B_bias in the compute type, added with the branch
  Tensor bias_eff;
  if (bias && lora_B_bias) {
    bias_eff = bias->to(ct).add(lora_B_bias->to(ct), scaling);
  } else if (bias) {
    bias_eff = bias->to(ct);
  } else if (lora_B_bias) {
    bias_eff = lora_B_bias->to(ct).mul(scaling);
  }
  if (native_half_base(dtype)) {
    // The base product in bfloat16 (see native_half_base); the branch and biases in float32 on
    // x's float32 values, added to it and rounded once, with neither a float32 copy of x nor an
    // M x N float32 branch (shrink and add_expand_into_bf16, as lora_linear's).
    const Tensor x = row_major(x_in);
    const Tensor xa = shrink(x, lora_A.to(ct), d);
    Tensor y = at::empty({x.size(0), w.N}, x.options());
    quantized_product<at::BFloat16, /*kForward=*/true, /*kAccumulate=*/false>(x, w, y);
    add_expand_into_bf16(y, xa, lora_B.to(ct), bias_eff, scaling);
    return {y, xa.to(adapter_dtype)};
  }
  const Tensor x = row_major(x_in.to(ct));
  const Tensor xa = shrink(x, lora_A.to(ct), d);
  // y = bias_eff + s * xa @ B^T first; the base panels accumulate on top.
  const Tensor Bt = transposed_copy(lora_B.to(ct));
  Tensor y = bias_eff.defined() ? at::addmm(bias_eff, xa, Bt, 1.0, scaling) : at::mm(xa, Bt).mul_(scaling);
  if (ct == at::kDouble) {
    quantized_product<double, /*kForward=*/true>(x, w, y);
  } else {
    quantized_product<float, /*kForward=*/true>(x, w, y);
  }
  return {y.to(dtype), xa.to(adapter_dtype)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lora_quantized_linear_bwd_cpu(
    const Tensor& grad_y, const Tensor& x_in, const Tensor& qweight, const Tensor& absmax, const Tensor& code,
    int64_t blocksize, at::IntArrayRef weight_shape, const Tensor& lora_A, const Tensor& lora_B, const Tensor& xa_in,
    double scaling, double dropout_p, const Tensor& seed, std::array<bool, 2> output_mask) {
  check_lora_quantized_bwd_args(grad_y, x_in, qweight, absmax, code, blocksize, weight_shape, lora_A, lora_B, xa_in,
                                scaling, dropout_p, seed);
  const at::ScalarType dtype = x_in.scalar_type(), adapter_dtype = lora_A.scalar_type();
  const at::ScalarType ct = compute_type(dtype);
  const auto [need_x, need_bias] = output_mask;
  const bool half_base = native_half_base(dtype);
  const DropoutParams d = DropoutParams::make(dropout_p, seed_value(seed));
  const QuantView w = QuantView::of(qweight, absmax, code, blocksize, weight_shape);
  // The LoRA products in small_gemm (lora_bwd_products: g = s dY @ B shared by d lora_A and dX,
  // dropout regenerated per block), on x's and dY's float32 values; dX's masked LoRA term and
  // the base product meet in float32, rounded once to x's dtype.
  const Tensor A = lora_A.to(ct), B = lora_B.to(ct), xa = xa_in.to(ct);
  const Tensor x = row_major(half_base ? x_in : x_in.to(ct)), dy = row_major(half_base ? grad_y : grad_y.to(ct));
  Tensor grad_x = at::empty({need_x ? x.size(0) : 0, need_x ? w.K : 0}, x.options());
  if (need_x && half_base) {  // the base term in bfloat16 first (see native_half_base)
    quantized_product<at::BFloat16, /*kForward=*/false, /*kAccumulate=*/false>(dy, w, grad_x);
  }
  auto [grad_A, grad_B] =
      lora_bwd_products(dy, x, A, B, xa, scaling, d, need_x ? &grad_x : nullptr, /*onto_grad_x=*/half_base);
  if (need_x && !half_base) {  // the base term onto the LoRA term
    if (ct == at::kDouble) {
      quantized_product<double, /*kForward=*/false>(dy, w, grad_x);
    } else {
      quantized_product<float, /*kForward=*/false>(dy, w, grad_x);
    }
  }
  const Tensor grad_bias = need_bias ? at::sum(dy, {0}, false, ct).to(dtype) : at::empty({0}, x_in.options());
  return {need_x ? grad_x.to(dtype) : at::empty({0}, x_in.options()), grad_bias, grad_A.to(adapter_dtype),
          grad_B.to(adapter_dtype)};
}

Tensor dequantize_cpu(const Tensor& qweight, const Tensor& absmax, const Tensor& code, int64_t blocksize,
                      at::IntArrayRef weight_shape, at::ScalarType dtype) {
  check_dequantize_args(qweight, absmax, code, blocksize, weight_shape, dtype);
  const QuantView w = QuantView::of(qweight, absmax, code, blocksize, weight_shape);
  const at::ScalarType ct = compute_type(dtype);
  Tensor out = at::empty({w.N, w.K}, qweight.options().dtype(ct));
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, w.K));
  AT_DISPATCH_FLOATING_TYPES(ct, "fastlora_dequantize", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, w.N, grain, [&](int64_t n0, int64_t n1) { dequant_rect<scalar_t>(w, n0, n1, 0, w.K, o + n0 * w.K, w.K); });
  });
  return out.to(dtype);
}

}  // namespace lora_cpu

TORCH_LIBRARY_IMPL(fastlora, CPU, m) {
  m.impl("lora_quantized_linear_fwd", &lora_cpu::lora_quantized_linear_fwd_cpu);
  m.impl("lora_quantized_linear_bwd", &lora_cpu::lora_quantized_linear_bwd_cpu);
  m.impl("dequantize", &lora_cpu::dequantize_cpu);
}

}  // namespace fastlora
