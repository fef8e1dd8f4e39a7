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
#include <sys/syscall.h>
#include <unistd.h>
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

// AMX-BF16 (Sapphire Rapids and later): tdpbf16ps multiplies a 16 x 32 bfloat16 tile by a 16-pair
// x 16 tile into 16 x 16 float32 sums, 16 times the multiply-adds of vdpbf16ps per instruction.
// The operand layouts are small_gemm_bf16's own: A's rows hold their k values adjacent (a_col =
// 2), B comes in row pairs (tdpbf16ps's "VNNI" layout), so tiles load straight from them.
#define FASTLORA_AMX_TARGET __attribute__((target("arch=x86-64-v4,avx512bf16,amx-tile,amx-bf16")))

// The 64-byte tile configuration (palette 1): tile t has rows[t] rows of colsb[t] bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// One block of C, MI x NJ tiles of tm x tn (tiles 0-3; A in tiles 4-5, B in 6-7) over `steps` k
// steps of tk pairs, stored to out (row stride ld_out floats). One prefetch step per k step: issued
// in bursts (one per block) the prefetches stalled the kernel once the line fill buffers filled,
// most of its time in rsvd's passes.
// With kOnto the tiles start from out's values (row stride ld_out floats) instead of zero.
template <int MI, int NJ, bool kOnto = false>
FASTLORA_AMX_TARGET FASTLORA_INLINE void amx_block(int64_t steps, int64_t tm, int64_t tn, int64_t tk,
                                                   const uint16_t* a, int64_t a_row, const uint32_t* b, int64_t ldb,
                                                   float* out, PrefetchCursor& prefetch, int64_t ld_out = 32) {
  const int64_t a_bytes = 2 * a_row, b_bytes = 4 * ldb;
  const int64_t ld = ld_out * int64_t(sizeof(float));
  if constexpr (kOnto) {
    _tile_loadd(0, out, ld);
    if constexpr (NJ > 1) _tile_loadd(1, out + tn, ld);
    if constexpr (MI > 1) _tile_loadd(2, out + tm * ld_out, ld);
    if constexpr (MI > 1 && NJ > 1) _tile_loadd(3, out + tm * ld_out + tn, ld);
  } else {
    _tile_zero(0);
    if constexpr (NJ > 1) _tile_zero(1);
    if constexpr (MI > 1) _tile_zero(2);
    if constexpr (MI > 1 && NJ > 1) _tile_zero(3);
  }
  for (int64_t s = 0; s < steps; ++s) {
    prefetch.step();
    const uint16_t* ak = a + s * 2 * tk;
    const uint32_t* bk = b + s * tk * ldb;
    _tile_loadd(4, ak, a_bytes);
    _tile_loadd(6, bk, b_bytes);
    if constexpr (NJ > 1) _tile_loadd(7, bk + tn, b_bytes);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NJ > 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (MI > 1) {
      _tile_loadd(5, ak + tm * a_row, a_bytes);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (NJ > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, out, ld);
  if constexpr (NJ > 1) _tile_stored(1, out + tn, ld);
  if constexpr (MI > 1) _tile_stored(2, out + tm * ld_out, ld);
  if constexpr (MI > 1 && NJ > 1) _tile_stored(3, out + tm * ld_out + tn, ld);
}

// One MI x NJ block of tiles with alpha = 1, straight into c (row stride ldc): from c's values
// when accumulating, from zero otherwise; no float32 block and epilogue pass in between.
template <int MI, int NJ>
FASTLORA_AMX_TARGET FASTLORA_INLINE void amx_block_into(bool accumulate, int64_t steps, int64_t tm, int64_t tn,
                                                        int64_t tk, const uint16_t* a, int64_t a_row,
                                                        const uint32_t* b, int64_t ldb, float* c, int64_t ldc,
                                                        PrefetchCursor& prefetch) {
  if (accumulate) {
    amx_block<MI, NJ, true>(steps, tm, tn, tk, a, a_row, b, ldb, c, prefetch, ldc);
  } else {
    amx_block<MI, NJ, false>(steps, tm, tn, tk, a, a_row, b, ldb, c, prefetch, ldc);
  }
}

// c = alpha * block + (accumulate ? c : 0) for a rows x cols (<= 32 x 32) block.
FASTLORA_AMX_TARGET FASTLORA_INLINE void amx_epilogue(const float* block, int64_t rows, int64_t cols, float alpha,
                                                      bool accumulate, float* c, int64_t ldc) {
  const __m512 scale = _mm512_set1_ps(alpha);
  const __mmask16 m0 = static_cast<__mmask16>(cols >= 16 ? 0xffff : (1u << cols) - 1);
  const __mmask16 m1 = static_cast<__mmask16>(cols >= 32 ? 0xffff : cols > 16 ? (1u << (cols - 16)) - 1 : 0);
  for (int64_t i = 0; i < rows; ++i) {
    float* ci = c + i * ldc;
    __m512 v0 = _mm512_mul_ps(_mm512_loadu_ps(block + i * 32), scale);
    if (accumulate) v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, ci));
    _mm512_mask_storeu_ps(ci, m0, v0);
    if (m1 != 0) {
      __m512 v1 = _mm512_mul_ps(_mm512_loadu_ps(block + i * 32 + 16), scale);
      if (accumulate) v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, ci + 16));
      _mm512_mask_storeu_ps(ci + 16, m1, v1);
    }
  }
}

// small_gemm_bf16 with A row-major (a_col = 2) in AMX tiles: the tiles are min(16, m) x min(16,
// n) over min(16, k2) pairs, in blocks of up to 2 x 2 tiles (all eight tile registers); what the
// tiles do not cover (the rows, columns and pairs past the last whole tile) goes to the
// AVX512-BF16 kernel, whose products and float32 sums are the same operations in another order.
FASTLORA_AMX_TARGET void gemm_bf16_amx(int64_t m, int64_t n, int64_t k2, float alpha, const uint16_t* a,
                                       int64_t a_row, const uint32_t* b, int64_t ldb, bool accumulate, float* c,
                                       int64_t ldc, const PrefetchRegion& region) {
  const int64_t tm = std::min<int64_t>(16, m), tn = std::min<int64_t>(16, n), tk = std::min<int64_t>(16, k2);
  const int64_t mm = m / tm * tm, nm = n / tn * tn, km = k2 / tk * tk;
  TileConfig cfg;
  for (int t = 0; t < 4; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(tm);
    cfg.colsb[t] = static_cast<uint16_t>(4 * tn);
  }
  for (int t = 4; t < 6; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(tm);
    cfg.colsb[t] = static_cast<uint16_t>(4 * tk);
  }
  for (int t = 6; t < 8; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(tk);
    cfg.colsb[t] = static_cast<uint16_t>(4 * tn);
  }
  _tile_loadconfig(&cfg);
  alignas(64) float block[32 * 32];
  const int64_t steps = km / tk;
  // alpha = 1: the tiles load and store c themselves, no float32 block and epilogue pass (rsvd's
  // A^T Y chunks accumulate onto their output: that pass took 4.3-4.6 ms at 4096^2, l = 48,
  // against 4.6-5.0 ms through the block, timed interleaved on the Xeon). Not where c's rows are
  // a multiple of 4 KiB apart: a tile's 16 rows would then share one L1 set (12 lines, see
  // tile_row_stride), while the epilogue walks them one at a time (not timed separately).
  const bool direct = alpha == 1.0f && (ldc * int64_t(sizeof(float))) % 4096 != 0;
  PrefetchCursor prefetch(region, ((mm + 2 * tm - 1) / (2 * tm)) * ((nm + 2 * tn - 1) / (2 * tn)) * steps);
  for (int64_t i0 = 0; i0 < mm; i0 += 2 * tm) {
    const bool two_rows = i0 + 2 * tm <= mm;
    const uint16_t* ai = a + i0 * a_row;
    for (int64_t j0 = 0; j0 < nm; j0 += 2 * tn) {
      const bool two_cols = j0 + 2 * tn <= nm;
      if (direct) {
        float* cij = c + i0 * ldc + j0;
        if (two_rows && two_cols) {
          amx_block_into<2, 2>(accumulate, steps, tm, tn, tk, ai, a_row, b + j0, ldb, cij, ldc, prefetch);
        } else if (two_rows) {
          amx_block_into<2, 1>(accumulate, steps, tm, tn, tk, ai, a_row, b + j0, ldb, cij, ldc, prefetch);
        } else if (two_cols) {
          amx_block_into<1, 2>(accumulate, steps, tm, tn, tk, ai, a_row, b + j0, ldb, cij, ldc, prefetch);
        } else {
          amx_block_into<1, 1>(accumulate, steps, tm, tn, tk, ai, a_row, b + j0, ldb, cij, ldc, prefetch);
        }
        continue;
      }
      if (two_rows && two_cols) {
        amx_block<2, 2>(steps, tm, tn, tk, ai, a_row, b + j0, ldb, block, prefetch);
      } else if (two_rows) {
        amx_block<2, 1>(steps, tm, tn, tk, ai, a_row, b + j0, ldb, block, prefetch);
      } else if (two_cols) {
        amx_block<1, 2>(steps, tm, tn, tk, ai, a_row, b + j0, ldb, block, prefetch);
      } else {
        amx_block<1, 1>(steps, tm, tn, tk, ai, a_row, b + j0, ldb, block, prefetch);
      }
      amx_epilogue(block, (two_rows ? 2 : 1) * tm, (two_cols ? 2 : 1) * tn, alpha, accumulate, c + i0 * ldc + j0, ldc);
    }
  }
  _tile_release();
  while (prefetch.pending()) prefetch.step();
  const PrefetchRegion none;
  if (km < k2) {  // the last pairs of the tiled block, onto its sums
    gemm_bf16_avx512(mm, nm, k2 - km, alpha, a + 2 * km, a_row, 2, b + km * ldb, ldb, true, c, ldc, none);
  }
  if (nm < n) gemm_bf16_avx512(mm, n - nm, k2, alpha, a, a_row, 2, b + nm, ldb, accumulate, c + nm, ldc, none);
  if (mm < m) {
    gemm_bf16_avx512(m - mm, n, k2, alpha, a + mm * a_row, a_row, 2, b, ldb, accumulate, c + mm * ldc, ldc, none);
  }
}

// AMX-BF16 usable by this process: the CPU has it and Linux grants the tile data state
// (arch_prctl ARCH_REQ_XCOMP_PERM, once per process; denied on kernels before 5.16).
bool amx_permitted() {
  __builtin_cpu_init();
  if (!(__builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") && machine_has_avx512_bf16())) {
    return false;
  }
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
}
#else
bool machine_has_avx512_bf16() { return false; }
bool amx_permitted() { return false; }
#endif

}  // namespace

bool machine_has_amx_bf16() {
  static const bool usable = amx_permitted();
  return usable;
}

bool small_gemm_bf16_native() {
  static const bool hardware = machine_has_avx512_bf16();
  return hardware && small_gemm_isa() >= 4;
}

bool small_gemm_bf16_amx() { return small_gemm_bf16_native() && small_gemm_isa() >= 5; }

void small_gemm_bf16(int64_t m, int64_t n, int64_t k2, float alpha, const uint16_t* a, int64_t a_row,
                     int64_t a_col, const uint32_t* b, int64_t ldb, bool accumulate, float* c, int64_t ldc,
                     const PrefetchRegion& prefetch) {
  if (m <= 0 || n <= 0) return;
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__)
  if (small_gemm_bf16_native()) {
    if (a_col == 2 && k2 > 0 && small_gemm_bf16_amx()) {
      return gemm_bf16_amx(m, n, k2, alpha, a, a_row, b, ldb, accumulate, c, ldc, prefetch);
    }
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
