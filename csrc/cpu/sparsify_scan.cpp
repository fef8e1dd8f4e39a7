// Builds of topk_sparsify's candidate scan; see sparsify_scan.h.
//
// Why vector code: at 1% density about half of all 64-value blocks hold a candidate, so a
// scalar loop with a branch per value mispredicts on each candidate, and a byte-flag walk
// slows down as the density grows (16M float32 at 10%: 48 ms against 28 for the branchy
// loop). The AVX-512 build compresses a vector's candidates into registers
// (vcompressps / vpcompressd) and stores the whole vector, the AVX2 build permutes them
// with a table indexed by the 8-lane mask: a step per 16 or 8 values whatever the density.
#include "sparsify_scan.h"

#include "small_gemm.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FASTLORA_SCAN_X86 1
#endif

namespace fastlora {
namespace sparsify_cpu {
namespace {

// Baseline build, and the tails of the vector builds.
int64_t scan_scalar(const float* d, const float* r, int64_t begin, int64_t n, uint32_t lo, uint32_t t,
                    int32_t* idx, float* val, int64_t count, int64_t* above_t, int64_t* first_nonfinite) {
  int64_t above = 0;
  for (int64_t i = begin; i < n; ++i) {
    const float v = r ? d[i] + r[i] : d[i];
    const uint32_t key = key_of(v);
    if (key < lo) continue;
    if (key >= kNonFiniteKey) {
      if (*first_nonfinite < 0) *first_nonfinite = i;
      continue;
    }
    above += key >= t;
    idx[count] = static_cast<int32_t>(i);
    val[count] = v;
    ++count;
  }
  *above_t += above;
  return count;
}

#if FASTLORA_SCAN_X86
__attribute__((target("avx512f,popcnt"))) int64_t scan_avx512(const float* d, const float* r, int64_t n,
                                                              uint32_t lo, uint32_t t, int32_t* idx,
                                                              float* val, int64_t* above_t,
                                                              int64_t* first_nonfinite) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
  const __m512i lo_v = _mm512_set1_epi32(static_cast<int>(lo));
  const __m512i t_v = _mm512_set1_epi32(static_cast<int>(t));
  const __m512i nf_v = _mm512_set1_epi32(static_cast<int>(kNonFiniteKey));
  const __m512i step = _mm512_set1_epi32(16);
  __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t count = 0, above = 0;
  for (int64_t i = 0; i < n; i += 16, lane = _mm512_add_epi32(lane, step)) {
    const int64_t rem = n - i;
    const __mmask16 in = rem >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << rem) - 1);
    __m512 v = _mm512_maskz_loadu_ps(in, d + i);
    if (r) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(in, r + i));
    const __m512i key = _mm512_and_si512(_mm512_castps_si512(v), abs_mask);
    const __mmask16 finite = _mm512_mask_cmplt_epu32_mask(in, key, nf_v);
    const __mmask16 nonfinite = in & ~finite;
    if (nonfinite && *first_nonfinite < 0) *first_nonfinite = i + __builtin_ctz(nonfinite);
    above += __builtin_popcount(_mm512_mask_cmpge_epu32_mask(finite, key, t_v));
    const __mmask16 take = _mm512_mask_cmpge_epu32_mask(finite, key, lo_v);
    if (!take) continue;
    _mm512_storeu_ps(val + count, _mm512_maskz_compress_ps(take, v));
    _mm512_storeu_si512(idx + count, _mm512_maskz_compress_epi32(take, lane));
    count += __builtin_popcount(take);
  }
  *above_t += above;
  return count;
}

// kCompress8[m]: the lanes of the 8-bit mask m in increasing order, then zeros.
struct Compress8Table {
  alignas(32) int32_t lanes[256][8];
  Compress8Table() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int j = 0; j < 8; ++j)
        if (m >> j & 1) lanes[m][k++] = j;
      while (k < 8) lanes[m][k++] = 0;
    }
  }
};
const Compress8Table kCompress8;

__attribute__((target("avx2,popcnt"))) int64_t scan_avx2(const float* d, const float* r, int64_t n, uint32_t lo,
                                                         uint32_t t, int32_t* idx, float* val, int64_t* above_t,
                                                         int64_t* first_nonfinite) {
  // Keys are below 2^31, so signed compares order them; key >= b is key > b - 1 (b = 0 gives
  // -1, below every key).
  const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
  const __m256i lo_m1 = _mm256_set1_epi32(static_cast<int>(lo) - 1);
  const __m256i t_m1 = _mm256_set1_epi32(static_cast<int>(t) - 1);
  const __m256i nf_m1 = _mm256_set1_epi32(static_cast<int>(kNonFiniteKey) - 1);
  const __m256i step = _mm256_set1_epi32(8);
  __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t count = 0, above = 0, i = 0;
  for (; i + 8 <= n; i += 8, lane = _mm256_add_epi32(lane, step)) {
    __m256 v = _mm256_loadu_ps(d + i);
    if (r) v = _mm256_add_ps(v, _mm256_loadu_ps(r + i));
    const __m256i key = _mm256_and_si256(_mm256_castps_si256(v), abs_mask);
    const int nonfinite = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(key, nf_m1)));
    if (nonfinite && *first_nonfinite < 0) *first_nonfinite = i + __builtin_ctz(nonfinite);
    const int finite = ~nonfinite & 0xFF;
    above += __builtin_popcount(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(key, t_m1))) & finite);
    const int take = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(key, lo_m1))) & finite;
    if (!take) continue;
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompress8.lanes[take]));
    _mm256_storeu_ps(val + count, _mm256_permutevar8x32_ps(v, perm));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + count), _mm256_permutevar8x32_epi32(lane, perm));
    count += __builtin_popcount(take);
  }
  *above_t += above;
  return scan_scalar(d, r, i, n, lo, t, idx, val, count, above_t, first_nonfinite);
}
#endif

}  // namespace

int64_t scan_candidates_at(int level, const float* d, const float* r, int64_t n, uint32_t lo, uint32_t t,
                           int32_t* idx, float* val, int64_t* above_t, int64_t* first_nonfinite) {
#if FASTLORA_SCAN_X86
  if (level >= 4) return scan_avx512(d, r, n, lo, t, idx, val, above_t, first_nonfinite);
  if (level >= 3) return scan_avx2(d, r, n, lo, t, idx, val, above_t, first_nonfinite);
#else
  (void)level;
#endif
  return scan_scalar(d, r, 0, n, lo, t, idx, val, 0, above_t, first_nonfinite);
}

int64_t scan_candidates(const float* d, const float* r, int64_t n, uint32_t lo, uint32_t t, int32_t* idx,
                        float* val, int64_t* above_t, int64_t* first_nonfinite) {
  return scan_candidates_at(small_gemm_isa(), d, r, n, lo, t, idx, val, above_t, first_nonfinite);
}

}  // namespace sparsify_cpu
}  // namespace fastlora
