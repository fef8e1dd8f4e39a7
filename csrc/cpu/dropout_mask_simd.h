// The dropout mask (dropout_hash.h) a vector of columns at a time, with AVX-512 and with AVX2
// intrinsics: the same bits as DropoutParams::keep. Include only inside `#if FASTLORA_AVX512_ROWS`
// (bf16_avx512.h) and call from functions built for the matching target.
#pragma once

#include "../dropout_hash.h"
#include "bf16_avx512.h"

#if FASTLORA_AVX512_ROWS
namespace fastlora {
namespace lora_cpu {

// 16 columns of a row at a time: the hash's inputs of columns
// col0 .. col0 + 15, stepped by 16 * kGolden32 per 16 columns (no multiply), and which of them
// the mask keeps.
__attribute__((target("arch=x86-64-v4"), always_inline)) inline __m512i mask_inputs_avx512(uint32_t row_h,
                                                                                            int64_t col0) {
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  return _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(row_h + static_cast<uint32_t>(col0) * kGolden32)),
                          _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int>(kGolden32))));
}
constexpr uint32_t kMaskStep512 = 16u * kGolden32;

__attribute__((target("arch=x86-64-v4"), always_inline)) inline __mmask16 mask_keep_avx512(__m512i in,
                                                                                            uint32_t seed_hi,
                                                                                            uint32_t threshold) {
  __m512i h = _mm512_xor_si512(in, _mm512_set1_epi32(static_cast<int>(seed_hi)));
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(static_cast<int>(0x85EBCA6Bu)));
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 13));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(static_cast<int>(0xC2B2AE35u)));
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
  return _mm512_cmpge_epu32_mask(_mm512_srli_epi32(h, 8), _mm512_set1_epi32(static_cast<int>(threshold)));
}

// The mask 8 columns at a time with AVX2: the hash's inputs, and scale where it keeps a column, 0
// where it drops it (keep iff (h >> 8) >= threshold, i.e. not threshold > (h >> 8): both < 2^31,
// a signed compare).
__attribute__((target("avx2"), always_inline)) inline __m256i mask_inputs_avx2(uint32_t row_h, int64_t col0) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(row_h + static_cast<uint32_t>(col0) * kGolden32)),
                          _mm256_mullo_epi32(lane, _mm256_set1_epi32(static_cast<int>(kGolden32))));
}
constexpr uint32_t kMaskStep256 = 8u * kGolden32;

__attribute__((target("avx2"), always_inline)) inline __m256 mask_multipliers_avx2(__m256i in, uint32_t seed_hi,
                                                                                   uint32_t threshold, __m256 sv) {
  __m256i h = _mm256_xor_si256(in, _mm256_set1_epi32(static_cast<int>(seed_hi)));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(0x85EBCA6Bu)));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 13));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(0xC2B2AE35u)));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  const __m256i drop = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(threshold)), _mm256_srli_epi32(h, 8));
  return _mm256_andnot_ps(_mm256_castsi256_ps(drop), sv);
}

}  // namespace lora_cpu
}  // namespace fastlora
#endif
