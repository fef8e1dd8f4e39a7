// Out-of-line parts of lora_linear_blocks.h: the dropout mask's per-row multipliers, compiled
// for several instruction sets.
#include "lora_linear_blocks.h"

namespace fastlora {
namespace lora_cpu {

// Per-column multipliers (scale if kept, 0 if dropped) of one row. Kept in its own function
// with target clones (cpu_utils.h) so the uint32 hash loop is vectorised with AVX2/AVX-512.

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

// The bfloat16 rounding of float32 rows in the bfloat16 LoRA kernels (lora_linear_bf16_cpu.cpp),
// cloned like the multipliers: built for baseline x86-64 these loops ran scalar, at ~40% of the
// LoRA part of a bfloat16 backward (M = 2048, in = out = 1024, r = 16).
FASTLORA_VECTOR_CLONES
void round_row_bf16(uint16_t* __restrict dst, const float* __restrict src, const float* __restrict mult,
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
void add_row_into_bf16(uint16_t* __restrict y, const float* __restrict add, const float* __restrict mult,
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
void scale_row_bf16(uint16_t* __restrict dst, const uint16_t* __restrict src, const float* __restrict mult,
                    int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = float_to_bf16_bits(bf16_bits_to_float(src[j]) * mult[j]);
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
