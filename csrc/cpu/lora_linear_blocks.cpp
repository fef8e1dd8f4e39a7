// Out-of-line parts of lora_linear_blocks.h: the dropout mask's per-row multipliers, compiled
// for several instruction sets.
#include "lora_linear_blocks.h"

#include "bf16_avx512.h"
#include "dropout_mask_simd.h"

namespace fastlora {
namespace lora_cpu {

#if FASTLORA_AVX512_ROWS
// The dropout multipliers and the bfloat16 row loops written with AVX-512 intrinsics, taken where
// small_gemm runs its AVX-512 build (the same bits as the cloned loops below). GCC's avx512f
// clones of those loops ran 256-bit vectors and ~30 instructions per 16 values for the rounding:
// in the bf16 backward at M = 512, in = out = 2048, p = 0.05 (Xeon, AMX), the mask's multipliers
// and dropout(x) took 29% of the LoRA part, more than its AMX products (15%). With these, the
// LoRA part of the forward 0.51-0.56 -> 0.47-0.51 ms, of the backward (after dY @ W) 0.86-0.89
// -> 0.76-0.80 ms (interleaved, three runs each).
namespace {

bool rows_avx512() { return small_gemm_isa() >= 4; }

FASTLORA_AVX512_TARGET void row_multipliers_f32_avx512(float* __restrict out, int64_t cols, int64_t col0,
                                                       uint32_t row_h, uint32_t seed_hi, uint32_t threshold,
                                                       float scale) {
  __m512i in = mask_inputs_avx512(row_h, col0);
  const __m512i step = _mm512_set1_epi32(static_cast<int>(kMaskStep512));
  const __m512 sv = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < cols; j += 16) {
    const __mmask16 keep = mask_keep_avx512(in, seed_hi, threshold);
    _mm512_mask_storeu_ps(out + j, avx512::lanes(cols - j), _mm512_maskz_mov_ps(keep, sv));
    in = _mm512_add_epi32(in, step);
  }
}

FASTLORA_AVX512_TARGET void round_row_bf16_avx512(uint16_t* __restrict dst, const float* __restrict src,
                                                  const float* __restrict mult, const float* __restrict add,
                                                  int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = avx512::lanes(n - j);
    __m512 v = _mm512_maskz_loadu_ps(m, src + j);
    if (mult != nullptr) {
      v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, mult + j));
    } else if (add != nullptr) {
      v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, add + j));
    }
    avx512::store_bf16(dst + j, v, m);
  }
}

FASTLORA_AVX512_TARGET void add_row_into_bf16_avx512(uint16_t* __restrict y, const float* __restrict add,
                                                     const float* __restrict mult, const float* __restrict add2,
                                                     int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = avx512::lanes(n - j);
    const __m512 yv = avx512::load_bf16(y + j, m), a = _mm512_maskz_loadu_ps(m, add + j);
    __m512 v;
    if (mult != nullptr) {
      v = _mm512_fmadd_ps(a, _mm512_maskz_loadu_ps(m, mult + j), yv);
    } else if (add2 != nullptr) {
      v = _mm512_add_ps(yv, _mm512_add_ps(a, _mm512_maskz_loadu_ps(m, add2 + j)));
    } else {
      v = _mm512_add_ps(yv, a);
    }
    avx512::store_bf16(y + j, v, m);
  }
}

FASTLORA_AVX512_TARGET void scale_row_bf16_avx512(uint16_t* __restrict dst, const uint16_t* __restrict src,
                                                  const float* __restrict mult, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = avx512::lanes(n - j);
    avx512::store_bf16(dst + j, _mm512_mul_ps(avx512::load_bf16(src + j, m), _mm512_maskz_loadu_ps(m, mult + j)), m);
  }
}

// The multipliers with AVX2 intrinsics, taken where small_gemm runs its AVX2 build (the same bits
// as the cloned loop below): the hash's input stepped by 8 * kGolden32 per vector, as in the
// AVX-512 version, two multiplies per 8 values. GCC 12's avx2 clone of that loop multiplied each
// column index afresh from 64-bit lanes (three multiplies, four shuffles per 8 values): the mask
// of 2048 rows of 1024 columns took 1.0 ms against 0.46 ms so (one thread of a Xeon, both built
// for AVX2 alone), twice per training step of a layer with dropout (forward and backward).
__attribute__((target("avx2"))) void row_multipliers_f32_avx2(float* __restrict out, int64_t cols, int64_t col0,
                                                              uint32_t row_h, uint32_t seed_hi, uint32_t threshold,
                                                              float scale) {
  __m256i in = mask_inputs_avx2(row_h, col0);
  const __m256i step = _mm256_set1_epi32(static_cast<int>(kMaskStep256));
  const __m256 sv = _mm256_set1_ps(scale);
  int64_t j = 0;
  for (; j + 8 <= cols; j += 8) {
    _mm256_storeu_ps(out + j, mask_multipliers_avx2(in, seed_hi, threshold, sv));
    in = _mm256_add_epi32(in, step);
  }
  if (j < cols) {
    alignas(32) float tail[8];
    _mm256_store_ps(tail, mask_multipliers_avx2(in, seed_hi, threshold, sv));
    for (int64_t t = 0; j + t < cols; ++t) out[j + t] = tail[t];
  }
}

// dropout_row_f32 (lora_linear_blocks.h): the multipliers of row_multipliers_f32_avx512 /
// _avx2 kept in registers and applied at once to the row of x and, when given, of `also`,
// rather than stored into a row of multipliers that two more loops read back. At M = 2048, in =
// out = 1024, r = 16, p = 0.05 (2 threads of a Xeon, ops interleaved against the stored
// multipliers, two runs): under the AVX2 caps forward -0.45 to -0.85 ms, backward -0.5 to -1.0
// ms (d lora_A and dX's term), on a ~50 ms layer step; natively within noise (-0.2 to +0.5 ms
// on ~20 ms ops; the backward's products alone -0.13 ms).
FASTLORA_AVX512_TARGET void dropout_row_f32_avx512(float* dst, const float* src, float* also, int64_t cols,
                                                   int64_t col0, uint32_t row_h, uint32_t seed_hi, uint32_t threshold,
                                                   float scale) {
  __m512i in = mask_inputs_avx512(row_h, col0);
  const __m512i step = _mm512_set1_epi32(static_cast<int>(kMaskStep512));
  const __m512 sv = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < cols; j += 16) {
    const __m512 m = _mm512_maskz_mov_ps(mask_keep_avx512(in, seed_hi, threshold), sv);
    const __mmask16 valid = avx512::lanes(cols - j);
    _mm512_mask_storeu_ps(dst + j, valid, _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, src + j), m));
    if (also != nullptr) {
      _mm512_mask_storeu_ps(also + j, valid, _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, also + j), m));
    }
    in = _mm512_add_epi32(in, step);
  }
}

__attribute__((target("avx2"))) void dropout_row_f32_avx2(float* dst, const float* src, float* also, int64_t cols,
                                                          int64_t col0, uint32_t row_h, uint32_t seed_hi,
                                                          uint32_t threshold, float scale) {
  __m256i in = mask_inputs_avx2(row_h, col0);
  const __m256i step = _mm256_set1_epi32(static_cast<int>(kMaskStep256));
  const __m256 sv = _mm256_set1_ps(scale);
  int64_t j = 0;
  for (; j + 8 <= cols; j += 8) {
    const __m256 m = mask_multipliers_avx2(in, seed_hi, threshold, sv);
    _mm256_storeu_ps(dst + j, _mm256_mul_ps(_mm256_loadu_ps(src + j), m));
    if (also != nullptr) _mm256_storeu_ps(also + j, _mm256_mul_ps(_mm256_loadu_ps(also + j), m));
    in = _mm256_add_epi32(in, step);
  }
  if (j < cols) {
    alignas(32) float m[8];
    _mm256_store_ps(m, mask_multipliers_avx2(in, seed_hi, threshold, sv));
    for (int64_t t = 0; j + t < cols; ++t) {
      dst[j + t] = src[j + t] * m[t];
      if (also != nullptr) also[j + t] *= m[t];
    }
  }
}

}  // namespace
#define FASTLORA_ROWS_DISPATCH(call) \
  if (rows_avx512()) return call
#else
#define FASTLORA_ROWS_DISPATCH(call)
#endif

// Per-column multipliers (scale if kept, 0 if dropped) of one row. Kept in its own function
// with target clones (cpu_utils.h) so the uint32 hash loop is vectorised with AVX2/AVX-512.

namespace {
FASTLORA_VECTOR_CLONES
void row_multipliers_f32_clones(float* __restrict out, int64_t cols, int64_t col0, uint32_t row_h, uint32_t seed_hi,
                                uint32_t threshold, float scale) {
  for (int64_t j = 0; j < cols; ++j) {
    uint32_t u = fmix32((row_h + static_cast<uint32_t>(col0 + j) * kGolden32) ^ seed_hi);
    out[j] = (u >> 8) >= threshold ? scale : 0.0f;
  }
}
}  // namespace

bool dropout_row_f32(float* dst, const float* src, float* also, int64_t cols, int64_t col0, uint32_t row_h,
                     uint32_t seed_hi, uint32_t threshold, float scale) {
#if FASTLORA_AVX512_ROWS
  if (rows_avx512()) {
    dropout_row_f32_avx512(dst, src, also, cols, col0, row_h, seed_hi, threshold, scale);
    return true;
  }
  if (small_gemm_isa() == 3) {
    dropout_row_f32_avx2(dst, src, also, cols, col0, row_h, seed_hi, threshold, scale);
    return true;
  }
#endif
  return false;
}

void row_multipliers_f32(float* __restrict out, int64_t cols, int64_t col0, uint32_t row_h, uint32_t seed_hi,
                         uint32_t threshold, float scale) {
  FASTLORA_ROWS_DISPATCH(row_multipliers_f32_avx512(out, cols, col0, row_h, seed_hi, threshold, scale));
#if FASTLORA_AVX512_ROWS
  if (small_gemm_isa() == 3) return row_multipliers_f32_avx2(out, cols, col0, row_h, seed_hi, threshold, scale);
#endif
  row_multipliers_f32_clones(out, cols, col0, row_h, seed_hi, threshold, scale);
}

FASTLORA_VECTOR_CLONES
void row_multipliers_f64(double* __restrict out, int64_t cols, int64_t col0, uint32_t row_h, uint32_t seed_hi,
                          uint32_t threshold, double scale) {
  for (int64_t j = 0; j < cols; ++j) {
    uint32_t u = fmix32((row_h + static_cast<uint32_t>(col0 + j) * kGolden32) ^ seed_hi);
    out[j] = (u >> 8) >= threshold ? scale : 0.0;
  }
}

// The bfloat16 rounding of float32 rows in the bfloat16 LoRA kernels (lora_linear_bf16_cpu.cpp),
// cloned like the multipliers: built for baseline x86-64 these loops ran scalar, at ~40% of the
// LoRA part of a bfloat16 backward (M = 2048, in = out = 1024, r = 16).
namespace {
FASTLORA_VECTOR_CLONES
void round_row_bf16_clones(uint16_t* __restrict dst, const float* __restrict src, const float* __restrict mult,
                           const float* __restrict add, int64_t n) {
  if (mult != nullptr) {
    for (int64_t j = 0; j < n; ++j) dst[j] = float_to_bf16_bits(src[j] * mult[j]);
  } else if (add != nullptr) {
    for (int64_t j = 0; j < n; ++j) dst[j] = float_to_bf16_bits(src[j] + add[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = float_to_bf16_bits(src[j]);
  }
}

FASTLORA_VECTOR_CLONES
void add_row_into_bf16_clones(uint16_t* __restrict y, const float* __restrict add, const float* __restrict mult,
                              const float* __restrict add2, int64_t n) {

  if (mult != nullptr) {
    for (int64_t j = 0; j < n; ++j) y[j] = float_to_bf16_bits(bf16_bits_to_float(y[j]) + add[j] * mult[j]);
  } else if (add2 != nullptr) {
    for (int64_t j = 0; j < n; ++j) y[j] = float_to_bf16_bits(bf16_bits_to_float(y[j]) + (add[j] + add2[j]));
  } else {
    for (int64_t j = 0; j < n; ++j) y[j] = float_to_bf16_bits(bf16_bits_to_float(y[j]) + add[j]);
  }
}

FASTLORA_VECTOR_CLONES
void scale_row_bf16_clones(uint16_t* __restrict dst, const uint16_t* __restrict src, const float* __restrict mult,
                           int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = float_to_bf16_bits(bf16_bits_to_float(src[j]) * mult[j]);
}
}  // namespace

void round_row_bf16(uint16_t* __restrict dst, const float* __restrict src, const float* __restrict mult,
                    const float* __restrict add, int64_t n) {
  FASTLORA_ROWS_DISPATCH(round_row_bf16_avx512(dst, src, mult, add, n));
  round_row_bf16_clones(dst, src, mult, add, n);
}

void add_row_into_bf16(uint16_t* __restrict y, const float* __restrict add, const float* __restrict mult,
                       const float* __restrict add2, int64_t n) {
  FASTLORA_ROWS_DISPATCH(add_row_into_bf16_avx512(y, add, mult, add2, n));
  add_row_into_bf16_clones(y, add, mult, add2, n);
}

void scale_row_bf16(uint16_t* __restrict dst, const uint16_t* __restrict src, const float* __restrict mult,
                    int64_t n) {
  FASTLORA_ROWS_DISPATCH(scale_row_bf16_avx512(dst, src, mult, n));
  scale_row_bf16_clones(dst, src, mult, n);
}

// The float32 loops of dropout_rows_raw and of the bfloat16 blocks' conversion, cloned: built
// for baseline x86-64 they ran 4 floats per instruction, 8% of a bf16-model backward with
// float32 adapters (M = 2048, in = out = 1024).
FASTLORA_VECTOR_CLONES
void mul_row_f32(float* __restrict dst, const float* __restrict src, const float* __restrict mult, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = src[j] * mult[j];
}

FASTLORA_VECTOR_CLONES
void mul_row_inplace_f32(float* __restrict a, const float* __restrict mult, int64_t n) {
  for (int64_t j = 0; j < n; ++j) a[j] *= mult[j];
}

FASTLORA_VECTOR_CLONES
void bf16_row_to_float(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = bf16_bits_to_float(src[j]);
}

FASTLORA_VECTOR_CLONES
void fp16_row_to_float(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(c10::Half(src[j], c10::Half::from_bits()));
}

}  // namespace lora_cpu
}  // namespace fastlora
