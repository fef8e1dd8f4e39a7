// small_gemm: see small_gemm.h for what it is for.
//
// Written with GCC/Clang vector extensions rather than intrinsics so one source serves every
// x86-64 level: with GCC >= 12 the entry points pick, once per process, a build of the same
// template for x86-64-v4 (AVX-512: 64-byte vectors, wide tiles), x86-64-v3 (AVX2 + FMA: 32-byte
// vectors) or baseline, so the wheel runs on any x86-64 and uses the widest unit the machine
// has. fp-contract=fast on these functions only: the project builds with -ffp-contract=off so
// that sums the tests compare bitwise round like the reference, but these are BLAS-style
// products (compared with tolerances, as the BLAS they replace uses FMA too), and the FMA is the
// point.
#include "small_gemm.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace fastlora {
namespace {

#define FASTLORA_INLINE inline __attribute__((always_inline))

// T vector of VB bytes.
template <typename T, int VB>
struct Vec {
  typedef T type __attribute__((vector_size(VB)));
};

// Unaligned vector load / store (by reference: no vector passed by value across an ABI).
template <typename V>
FASTLORA_INLINE void load(V& v, const void* p) {
  std::memcpy(&v, p, sizeof(V));
}

template <typename V>
FASTLORA_INLINE void store(void* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// One MR x (NV vectors) tile of C, its accumulators held in registers over the whole k loop.
template <typename T, typename V, int MR, int NV>
FASTLORA_INLINE void tile(int64_t k, T alpha, const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb,
                          bool accumulate, T* c, int64_t ldc) {
  constexpr int L = sizeof(V) / sizeof(T);
  V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = V{};
  // Software prefetch of the next column panel, of C (with write intent) and of each B row as
  // it is read. The operands are rows of long matrices (dY, x, dX: 4-16 KiB apart), so a
  // panel touches one or two lines in each of 64+ pages, too many streams for the hardware
  // prefetchers: measured on the LoRA backward at in = out = 4096, both prefetches together
  // took the four products from 35 to 25 ms at r = 64 and from 14 to 9 ms at r = 16.
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) __builtin_prefetch(c + i * ldc + (NV + v) * L, 1);
  for (int64_t p = 0; p < k; ++p) {
    V bv[NV];
    for (int v = 0; v < NV; ++v) load(bv[v], b + p * ldb + v * L);
    for (int v = 0; v < NV; ++v) __builtin_prefetch(b + p * ldb + (NV + v) * L);
    for (int i = 0; i < MR; ++i) {
      const T ai = a[i * a_row + p * a_col];
      for (int v = 0; v < NV; ++v) acc[i][v] += ai * bv[v];
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int v = 0; v < NV; ++v) {
      T* ci = c + i * ldc + v * L;
      V out = acc[i][v] * alpha;
      if (accumulate) {
        V cv;
        load(cv, ci);
        out += cv;
      }
      store(ci, out);
    }
  }
}

// All rows of one panel of NV vectors of columns: MR-row tiles, then single rows.
template <typename T, typename V, int MR, int NV>
FASTLORA_INLINE void panel(int64_t m, int64_t k, T alpha, const T* a, int64_t a_row, int64_t a_col, const T* b,
                           int64_t ldb, bool accumulate, T* c, int64_t ldc) {
  int64_t i = 0;
  for (; i + MR <= m; i += MR) {
    tile<T, V, MR, NV>(k, alpha, a + i * a_row, a_row, a_col, b, ldb, accumulate, c + i * ldc, ldc);
  }
  for (; i < m; ++i) {
    tile<T, V, 1, NV>(k, alpha, a + i * a_row, a_row, a_col, b, ldb, accumulate, c + i * ldc, ldc);
  }
}

// C = 0 for an empty sum (k == 0), or C unchanged when accumulating.
template <typename T>
FASTLORA_INLINE void empty_sum(int64_t m, int64_t n, bool accumulate, T* c, int64_t ldc) {
  if (!accumulate) {
    for (int64_t i = 0; i < m; ++i) std::memset(c + i * ldc, 0, n * sizeof(T));
  }
}

// Columns j0 .. n - 1 of one k chunk (a tail narrower than a vector), scalar.
template <typename T>
FASTLORA_INLINE void column_tail(int64_t j0, int64_t m, int64_t n, int64_t kc, T alpha, const T* a, int64_t a_row,
                                 int64_t a_col, const T* b, int64_t ldb, bool accumulate, T* c, int64_t ldc) {
  for (int64_t j = j0; j < n; ++j) {
    for (int64_t i = 0; i < m; ++i) {
      T sum = 0;
      for (int64_t p = 0; p < kc; ++p) sum += a[i * a_row + p * a_col] * b[p * ldb + j];
      T* cij = c + i * ldc + j;
      *cij = accumulate ? *cij + alpha * sum : alpha * sum;
    }
  }
}

// Tile shapes. Narrow: 4 rows x 2 vectors or 8 rows x 1 vector, 8 accumulators (fits the 16
// registers of AVX2). Wide (AVX-512, 32 registers): 8 x 2 or 16 x 1, 16 accumulators, used when
// the A values of a tile are adjacent in memory (a_row == 1: one cache line per k step) or k is
// short; with long k over A rows strided in memory, 16 concurrent row streams run slower than 8
// (measured on Zen 4: g = dY @ B at 53 vs 117 GFLOP/s).
template <typename T, int VB, bool kWide>
FASTLORA_INLINE void gemm(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t a_row, int64_t a_col,
                          const T* b, int64_t ldb, bool accumulate, T* c, int64_t ldc) {
  using V = typename Vec<T, VB>::type;
  constexpr int64_t L = VB / sizeof(T);
  constexpr int MR2 = kWide ? 8 : 4, MR1 = kWide ? 16 : 8;
  if (k == 0) return empty_sum(m, n, accumulate, c, ldc);
  // k in chunks: the B rows of a chunk (at most KC x 2 vectors, 16 KiB) stay in L1 while every
  // row tile of C passes over them. Without this a long k (the shrink over in_features = 4096
  // at r = 64) re-streamed a 512 KiB B panel from memory for every 4-row tile. With a single
  // row tile B is not reused but streamed once (a decode-sized batch times a weight): short
  // chunks then read it as 16 sequential row streams rather than 128 (8 x 4096 times 4096 x
  // 4096 split over 2 threads: 3.7 ms against 5.5 ms with 128-row chunks).
  const int64_t KC = m <= MR1 ? 16 : 8192 / VB;
  for (int64_t p0 = 0; p0 < k; p0 += KC) {
    const int64_t kc = std::min(KC, k - p0);
    const bool acc = accumulate || p0 > 0;
    const T* ak = a + p0 * a_col;
    const T* bk = b + p0 * ldb;
    int64_t j = 0;
    for (; j + 2 * L <= n; j += 2 * L) {
      panel<T, V, MR2, 2>(m, kc, alpha, ak, a_row, a_col, bk + j, ldb, acc, c + j, ldc);
    }
    for (; j + L <= n; j += L) {
      panel<T, V, MR1, 1>(m, kc, alpha, ak, a_row, a_col, bk + j, ldb, acc, c + j, ldc);
    }
    column_tail(j, m, n, kc, alpha, ak, a_row, a_col, bk, ldb, acc, c, ldc);
  }
}

#define FASTLORA_GEMM_ARGS                                                                                  \
  int64_t m, int64_t n, int64_t k, T alpha, const T *a, int64_t a_row, int64_t a_col, const T *b, int64_t ldb, \
      bool accumulate, T *c, int64_t ldc
#define FASTLORA_GEMM_PASS m, n, k, alpha, a, a_row, a_col, b, ldb, accumulate, c, ldc

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__)
template <typename T>
__attribute__((target("arch=x86-64-v4"), optimize("fp-contract=fast"))) void gemm_v4(FASTLORA_GEMM_ARGS) {
  if (a_row == 1 || k <= 64) {
    gemm<T, 64, true>(FASTLORA_GEMM_PASS);
  } else {
    gemm<T, 64, false>(FASTLORA_GEMM_PASS);
  }
}
// AVX2 + FMA, float: MR x (8 * NV) tiles written with intrinsics. The 6 x 16 tile holds 12
// accumulators, enough independent FMA chains to hide the FMA latency on both ports (the 4 x 16
// tile of the generic template has 8, at the limit). The same tile through the vector-extension
// template above measured 2-6x slower with GCC 12, whose register allocation spills it; with
// intrinsics it stays in registers.
template <int MR, int NV, bool kPrefetch>
__attribute__((target("arch=x86-64-v3"))) FASTLORA_INLINE void tile_v3(int64_t k, float alpha, const float* a,
                                                                       int64_t a_row, int64_t a_col, const float* b,
                                                                       int64_t ldb, bool accumulate, float* c,
                                                                       int64_t ldc) {
  __m256 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_setzero_ps();
  // With kPrefetch, the generic tile's software prefetches (see tile): the next panel of C and
  // of each B row, for B streamed from memory panel by panel.
  if (kPrefetch) {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) __builtin_prefetch(c + i * ldc + 8 * (NV + v), 1);
  }
  for (int64_t p = 0; p < k; ++p) {
    __m256 bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = _mm256_loadu_ps(b + p * ldb + 8 * v);
    if (kPrefetch) {
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) __builtin_prefetch(b + p * ldb + 8 * (NV + v));
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 ai = _mm256_broadcast_ss(a + i * a_row + p * a_col);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_fmadd_ps(ai, bv[v], acc[i][v]);
    }
  }
  const __m256 scale = _mm256_set1_ps(alpha);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      float* ci = c + i * ldc + 8 * v;
      __m256 out = _mm256_mul_ps(acc[i][v], scale);
      if (accumulate) out = _mm256_add_ps(out, _mm256_loadu_ps(ci));
      _mm256_storeu_ps(ci, out);
    }
  }
}

// The row tiles of one panel of NV vectors (8 floats each): 6-row tiles, then the row tail
// in tiles of 4, 2 and 1 rows. (A 4 x 3-vector tile, also 12 accumulators, needs all 16
// registers and GCC 12 spills it: 33 GFLOP/s.)
template <int NV, bool kPrefetch>
__attribute__((target("arch=x86-64-v3"))) FASTLORA_INLINE void tile_rows_v3(int64_t rows, int64_t kc, float alpha,
                                                                            const float* a, int64_t a_row,
                                                                            int64_t a_col, const float* b, int64_t ldb,
                                                                            bool accumulate, float* c, int64_t ldc) {
  switch (rows) {
    case 6: tile_v3<6, NV, kPrefetch>(kc, alpha, a, a_row, a_col, b, ldb, accumulate, c, ldc); break;
    case 4: tile_v3<4, NV, kPrefetch>(kc, alpha, a, a_row, a_col, b, ldb, accumulate, c, ldc); break;
    case 2: tile_v3<2, NV, kPrefetch>(kc, alpha, a, a_row, a_col, b, ldb, accumulate, c, ldc); break;
    default: tile_v3<1, NV, kPrefetch>(kc, alpha, a, a_row, a_col, b, ldb, accumulate, c, ldc); break;
  }
}

// Rows of the next tile, `left` rows remaining: 8 rows as two 4-row tiles rather than 6 + 2
// (the decode kernels' 8-row blocks of W: 8 accumulators per tile, not 12 and 4).
FASTLORA_INLINE int64_t tile_rows(int64_t left) {
  return left == 8 ? 4 : left >= 6 ? 6 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
}

// One tile of `rows` rows at vector column v: 2 vectors wide, or 1 for the last of an odd n / 8.
template <bool kPrefetch>
__attribute__((target("arch=x86-64-v3"))) FASTLORA_INLINE void tile_at_v3(int64_t nvec, int64_t i, int64_t rows,
                                                                          int64_t v, int64_t kc, float alpha,
                                                                          const float* a, int64_t a_row, int64_t a_col,
                                                                          const float* b, int64_t ldb, bool accumulate,
                                                                          float* c, int64_t ldc) {
  const float* ai = a + i * a_row;
  float* cij = c + i * ldc + 8 * v;
  if (nvec - v >= 2) {
    tile_rows_v3<2, kPrefetch>(rows, kc, alpha, ai, a_row, a_col, b + 8 * v, ldb, accumulate, cij, ldc);
  } else {
    tile_rows_v3<1, kPrefetch>(rows, kc, alpha, ai, a_row, a_col, b + 8 * v, ldb, accumulate, cij, ldc);
  }
}

// The tiles of one k chunk in column panels of two vectors (16 floats), one of a single vector
// when n / 8 is odd, then the columns past the last whole vector. Rows outer: no prefetch (the
// B chunk is L1-resident); panels outer: B streams panel by panel, prefetched.
template <bool kRowsOuter>
__attribute__((target("arch=x86-64-v3"))) FASTLORA_INLINE void chunk_v3(int64_t m, int64_t n, int64_t kc,
                                                                        float alpha, const float* a, int64_t a_row,
                                                                        int64_t a_col, const float* b, int64_t ldb,
                                                                        bool accumulate, float* c, int64_t ldc) {
  const int64_t nvec = n / 8;
  if (kRowsOuter) {
    for (int64_t i = 0, rows; i < m; i += rows) {
      rows = tile_rows(m - i);
      for (int64_t v = 0; v < nvec; v += 2) {
        tile_at_v3<false>(nvec, i, rows, v, kc, alpha, a, a_row, a_col, b, ldb, accumulate, c, ldc);
      }
    }
  } else {
    for (int64_t v = 0; v < nvec; v += 2) {
      for (int64_t i = 0, rows; i < m; i += rows) {
        rows = tile_rows(m - i);
        tile_at_v3<true>(nvec, i, rows, v, kc, alpha, a, a_row, a_col, b, ldb, accumulate, c, ldc);
      }
    }
  }
  column_tail(nvec * 8, m, n, kc, alpha, a, a_row, a_col, b, ldb, accumulate, c, ldc);
}

// Loop order and k chunk by shape (measured on Zen 4 under the AVX2 build, one thread). A narrow
// C (a k chunk of B under 64 KiB: the rank-r products, a sketch times a tall matrix) runs the
// tiles of a row block across all its columns before moving on, so the A rows of the block
// stay in L1 and each A element is read from memory once; 128-deep chunks when A's rows are
// strided (6 row streams), 64 when a tile's A values are adjacent (k streams): 4096 x 4096 times
// 4096 x 48 at 90 GFLOP/s (from 64), its transpose at 80. A wide C keeps a 16-column panel of
// the B chunk in L1 and passes every row tile over it.
__attribute__((target("arch=x86-64-v3"))) void gemm_v3_float(int64_t m, int64_t n, int64_t k, float alpha,
                                                             const float* a, int64_t a_row, int64_t a_col,
                                                             const float* b, int64_t ldb, bool accumulate, float* c,
                                                             int64_t ldc) {
  if (k == 0) return empty_sum(m, n, accumulate, c, ldc);
  const bool rows_outer = n * 128 * static_cast<int64_t>(sizeof(float)) <= (64 << 10);
  const int64_t KC = m <= 8 ? 16 : !rows_outer ? 256 : a_row == 1 ? 64 : 128;
  for (int64_t p0 = 0; p0 < k; p0 += KC) {
    const int64_t kc = std::min(KC, k - p0);
    const bool acc = accumulate || p0 > 0;
    if (rows_outer) {
      chunk_v3<true>(m, n, kc, alpha, a + p0 * a_col, a_row, a_col, b + p0 * ldb, ldb, acc, c, ldc);
    } else {
      chunk_v3<false>(m, n, kc, alpha, a + p0 * a_col, a_row, a_col, b + p0 * ldb, ldb, acc, c, ldc);
    }
  }
}

template <typename T>
__attribute__((target("arch=x86-64-v3"), optimize("fp-contract=fast"))) void gemm_v3(FASTLORA_GEMM_ARGS) {
  if constexpr (std::is_same_v<T, float>) {
    gemm_v3_float(FASTLORA_GEMM_PASS);
  } else {
    gemm<T, 32, false>(FASTLORA_GEMM_PASS);
  }
}
template <typename T>
__attribute__((optimize("fp-contract=fast"))) void gemm_base(FASTLORA_GEMM_ARGS) {
  gemm<T, 16, false>(FASTLORA_GEMM_PASS);
}

bool machine_has_native_bf16() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16");
}

int machine_level() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return machine_has_amx_bf16() ? 5 : 4;
  if (__builtin_cpu_supports("x86-64-v3")) return 3;
  return 1;
}

std::atomic<int>& level_in_use() {
  static std::atomic<int> level{std::min(machine_level(), requested_level())};
  return level;
}

template <typename T>
void dispatch(FASTLORA_GEMM_ARGS) {
  const int level = level_in_use().load(std::memory_order_relaxed);
  if (level >= 4) {
    gemm_v4<T>(FASTLORA_GEMM_PASS);
  } else if (level == 3) {
    gemm_v3<T>(FASTLORA_GEMM_PASS);
  } else {
    gemm_base<T>(FASTLORA_GEMM_PASS);
  }
}
#else
bool machine_has_native_bf16() { return false; }

int machine_level() { return 1; }

std::atomic<int>& level_in_use() {
  static std::atomic<int> level{1};
  return level;
}

template <typename T>
void dispatch(FASTLORA_GEMM_ARGS) {
  gemm<T, 32, false>(FASTLORA_GEMM_PASS);
}
#endif

}  // namespace

int requested_level() {
  // FASTLORA_CPU_ISA, read once when the library loads: a cap, so that a machine with AVX-512
  // can run (and test, and benchmark) what AVX2 and older machines run.
  const char* isa = std::getenv("FASTLORA_CPU_ISA");
  if (isa == nullptr) return 5;
  if (std::strcmp(isa, "avx512") == 0) return 4;
  if (std::strcmp(isa, "avx2") == 0) return 3;
  if (std::strcmp(isa, "baseline") == 0) return 1;
  return 5;  // "", "auto", "amx"; anything else is rejected by fastlora's Python import
}

int small_gemm_isa() { return level_in_use().load(); }

bool native_bf16_gemm() {
  static const bool hardware = machine_has_native_bf16();
  return hardware && small_gemm_isa() >= 4;
}

bool native_fp16_gemm() {
  // torch's own test (CPU features and oneDNN's ISA cap, ONEDNN_MAX_CPU_ISA), asked once.
  static const bool torch_native = [] {
    try {
      auto op = c10::Dispatcher::singleton().findSchema({"mkldnn::_is_mkldnn_fp16_supported", ""});
      return op.has_value() && op->typed<bool()>().call();
    } catch (const c10::Error&) {
      return false;
    }
  }();
  return torch_native && small_gemm_isa() >= 4;
}

int small_gemm_use_isa(int level) {
  const int used = std::max(1, std::min(level, machine_level()));
  level_in_use().store(used);
  return used;
}

void small_gemm(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t a_row, int64_t a_col,
                const float* b, int64_t ldb, bool accumulate, float* c, int64_t ldc) {
  dispatch<float>(m, n, k, alpha, a, a_row, a_col, b, ldb, accumulate, c, ldc);
}

void small_gemm(int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t a_row, int64_t a_col,
                const double* b, int64_t ldb, bool accumulate, double* c, int64_t ldc) {
  dispatch<double>(m, n, k, alpha, a, a_row, a_col, b, ldb, accumulate, c, ldc);
}

}  // namespace fastlora
