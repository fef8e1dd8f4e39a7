// bfloat16 <-> float32 on 16 lanes of AVX-512 (AVX512F/BW/VL, x86-64-v4), for the CPU kernels'
// row loops. Include only inside `#if FASTLORA_AVX512_ROWS` and call from functions carrying
// FASTLORA_AVX512_TARGET. Rounding is float_to_bf16_bits's (cpu_utils.h) bit for bit: round to
// nearest even on the integer bits, NaN -> 0x7FC0, subnormals kept (vcvtneps2bf16 would flush
// them).
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__)
#define FASTLORA_AVX512_ROWS 1
#include <immintrin.h>

#include <cstdint>

#define FASTLORA_AVX512_TARGET __attribute__((target("arch=x86-64-v4")))

namespace fastlora {
namespace avx512 {

// The first min(w, 16) lanes.
FASTLORA_AVX512_TARGET inline __mmask16 lanes(int64_t w) {
  return w >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << w) - 1u);
}

FASTLORA_AVX512_TARGET inline __m512 load_bf16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

FASTLORA_AVX512_TARGET inline __m256i round_bf16(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

FASTLORA_AVX512_TARGET inline void store_bf16(uint16_t* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, round_bf16(v));
}

// The value bfloat16 rounding gives, as float32.
FASTLORA_AVX512_TARGET inline __m512 rounded(__m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(round_bf16(v)), 16));
}

}  // namespace avx512
}  // namespace fastlora
#endif
