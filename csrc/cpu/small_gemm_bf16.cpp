// small_gemm_bf16: see small_gemm.h. The AVX512-BF16 build runs vdpbf16ps (two bfloat16
// products summed into each float32 lane per instruction: twice the multiply-adds of a float32
// FMA of the same width); the portable build computes the same sums with float32 arithmetic, for
// machines without the instruction (native_bf16_gemm() is false there, so the LoRA kernels do not
// call it; the C++ tests do).
#include <algorithm>
#include <atomic>
#include <cstring>

#include "small_gemm.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace fastlora {
namespace {

#define FASTLORA_INLINE inline __attribute__((always_inline))

FASTLORA_INLINE uint32_t load_pair(const uint16_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

FASTLORA_INLINE float bf16_bits_to_float(uint32_t bits16) {
  const uint32_t bits = bits16 << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

void gemm_bf16_portable(int64_t m, int64_t n, int64_t k2, float alpha, const uint16_t* a, int64_t a_row,
                        int64_t a_col, const uint32_t* b, int64_t ldb, bool accumulate, float* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      float sum = 0.0f;
      for (int64_t p = 0; p < k2; ++p) {
        const uint32_t ap = load_pair(a + i * a_row + p * a_col), bp = b[p * ldb + j];
        sum += bf16_bits_to_float(ap & 0xffff) * bf16_bits_to_float(bp & 0xffff);
        sum += bf16_bits_to_float(ap >> 16) * bf16_bits_to_float(bp >> 16);
      }
      float* cij = c + i * ldc + j;
      *cij = accumulate ? *cij + alpha * sum : alpha * sum;
    }
  }
}

// Walks a PrefetchRegion's cache lines in order, a few per step of the kernel.
class PrefetchCursor {
 public:
  // steps: how many times step() will be called; the lines are spread evenly over them.
  PrefetchCursor(const PrefetchRegion& r, int64_t steps) : r_(r) {
    lines_per_row_ = (r.bytes + 63) / 64;
    total_ = r.base != nullptr ? r.rows * lines_per_row_ : 0;
    per_step_ = steps > 0 ? (total_ + steps - 1) / steps : total_;
  }
  bool pending() const { return next_ < total_; }
  void step() {
#if defined(__x86_64__)
    for (int64_t end = std::min(total_, next_ + per_step_); next_ < end; ++next_) {
      const int64_t row = next_ / lines_per_row_, line = next_ % lines_per_row_;
      _mm_prefetch(static_cast<const char*>(r_.base) + row * r_.stride + line * 64, _MM_HINT_T1);
    }
#endif
  }

 private:
  PrefetchRegion r_;
  int64_t lines_per_row_ = 0, total_ = 0, per_step_ = 0, next_ = 0;
};

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__)
#define FASTLORA_BF16_TARGET __attribute__((target("arch=x86-64-v4,avx512bf16")))

// One MR x NV-vector tile of C over k2 pairs; `last` masks the columns of the last vector (the
// column tail), so no scalar tail loop is needed.
template <int MR, int NV>
FASTLORA_BF16_TARGET FASTLORA_INLINE void tile_bf16(int64_t k2, float alpha, const uint16_t* a, int64_t a_row,
                                                    int64_t a_col, const uint32_t* b, int64_t ldb, bool accumulate,
                                                    float* c, int64_t ldc, __mmask16 last) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < k2; ++p) {
    __m512i bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      const __mmask16 mk = v == NV - 1 ? last : __mmask16(0xffff);
      bv[v] = _mm512_maskz_loadu_epi32(mk, b + p * ldb + 16 * v);
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512i ai = _mm512_set1_epi32(static_cast<int>(load_pair(a + i * a_row + p * a_col)));
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], (__m512bh)ai, (__m512bh)bv[v]);
    }
  }
  const __m512 scale = _mm512_set1_ps(alpha);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      const __mmask16 mk = v == NV - 1 ? last : __mmask16(0xffff);
      float* ci = c + i * ldc + 16 * v;
      __m512 out = _mm512_mul_ps(acc[i][v], scale);
      if (accumulate) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(mk, ci));
      _mm512_mask_storeu_ps(ci, mk, out);
    }
  }
}

// All rows of one panel of NV vectors: 8-row tiles (16 accumulators with two vectors, of 32
// registers), then 4, 2, 1.
template <int NV>
FASTLORA_BF16_TARGET FASTLORA_INLINE void panel_bf16(int64_t m, int64_t k2, float alpha, const uint16_t* a,
                                                     int64_t a_row, int64_t a_col, const uint32_t* b, int64_t ldb,
                                                     bool accumulate, float* c, int64_t ldc, __mmask16 last,
                                                     PrefetchCursor& prefetch) {
  int64_t i = 0;
  for (; i + 8 <= m; i += 8) {
    prefetch.step();
    tile_bf16<8, NV>(k2, alpha, a + i * a_row, a_row, a_col, b, ldb, accumulate, c + i * ldc, ldc, last);
  }
  if (i + 4 <= m) {
    tile_bf16<4, NV>(k2, alpha, a + i * a_row, a_row, a_col, b, ldb, accumulate, c + i * ldc, ldc, last);
    i += 4;
  }
  if (i + 2 <= m) {
    tile_bf16<2, NV>(k2, alpha, a + i * a_row, a_row, a_col, b, ldb, accumulate, c + i * ldc, ldc, last);
    i += 2;
  }
  if (i < m) tile_bf16<1, NV>(k2, alpha, a + i * a_row, a_row, a_col, b, ldb, accumulate, c + i * ldc, ldc, last);
}

FASTLORA_BF16_TARGET void gemm_bf16_avx512(int64_t m, int64_t n, int64_t k2, float alpha, const uint16_t* a,
                                           int64_t a_row, int64_t a_col, const uint32_t* b, int64_t ldb,
                                           bool accumulate, float* c, int64_t ldc, const PrefetchRegion& region) {
  if (k2 == 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < m; ++i) std::memset(c + i * ldc, 0, n * sizeof(float));
    }
    return;
  }
  // k in chunks of 64 pairs: a chunk of a 2-vector panel of B (8 KiB) stays in L1 while every
  // row tile passes over it.
  constexpr int64_t KC = 64;
  // one prefetch step per 8-row tile (each a few thousand cycles of arithmetic)
  const int64_t panels = n / 32 + (n % 32 + 15) / 16;
  PrefetchCursor prefetch(region, ((k2 + KC - 1) / KC) * panels * (m / 8));
  for (int64_t p0 = 0; p0 < k2; p0 += KC) {
    const int64_t kc = std::min(KC, k2 - p0);
    const bool acc = accumulate || p0 > 0;
    const uint16_t* ak = a + p0 * a_col;
    const uint32_t* bk = b + p0 * ldb;
    int64_t j = 0;
    for (; j + 32 <= n; j += 32) {
      panel_bf16<2>(m, kc, alpha, ak, a_row, a_col, bk + j, ldb, acc, c + j, ldc, 0xffff, prefetch);
    }
    for (; j < n; j += 16) {
      const int64_t cols = std::min<int64_t>(16, n - j);
      const __mmask16 last = static_cast<__mmask16>((1u << cols) - 1);
      panel_bf16<1>(m, kc, alpha, ak, a_row, a_col, bk + j, ldb, acc, c + j, ldc, last, prefetch);
    }
  }
  while (prefetch.pending()) prefetch.step();  // what is left (m < 8: no tile stepped)
}

bool machine_has_avx512_bf16() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("x86-64-v4");
}
#else
bool machine_has_avx512_bf16() { return false; }
#endif

}  // namespace

bool small_gemm_bf16_native() {
  static const bool hardware = machine_has_avx512_bf16();
  return hardware && small_gemm_isa() >= 4;
}

void small_gemm_bf16(int64_t m, int64_t n, int64_t k2, float alpha, const uint16_t* a, int64_t a_row,
                     int64_t a_col, const uint32_t* b, int64_t ldb, bool accumulate, float* c, int64_t ldc,
                     const PrefetchRegion& prefetch) {
  if (m <= 0 || n <= 0) return;
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__)
  if (small_gemm_bf16_native()) {
    return gemm_bf16_avx512(m, n, k2, alpha, a, a_row, a_col, b, ldb, accumulate, c, ldc, prefetch);
  }
#endif
  gemm_bf16_portable(m, n, k2, alpha, a, a_row, a_col, b, ldb, accumulate, c, ldc);
}

namespace {

// One row of pairs; restrict-qualified so that the loop vectorises (the packing of a 4096 x 16
// adapter ran at ~1 ns per value scalar, a visible part of a decode-sized LoRA backward).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void interleave_rows(const uint16_t* __restrict lo, const uint16_t* __restrict hi, uint32_t* __restrict o,
                     int64_t cols) {
  if (hi != nullptr) {
    for (int64_t j = 0; j < cols; ++j) o[j] = static_cast<uint32_t>(lo[j]) | (static_cast<uint32_t>(hi[j]) << 16);
  } else {
    for (int64_t j = 0; j < cols; ++j) o[j] = lo[j];
  }
}

}  // namespace

void pack_bf16_row_pairs(const uint16_t* src, int64_t rows, int64_t cols, int64_t ld, uint32_t* dst,
                         int64_t ldd) {
  for (int64_t p = 0; 2 * p < rows; ++p) {
    const uint16_t* lo = src + 2 * p * ld;
    interleave_rows(lo, 2 * p + 1 < rows ? lo + ld : nullptr, dst + p * ldd, cols);
  }
}

}  // namespace fastlora
