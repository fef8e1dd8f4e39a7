// The AVX2 and AVX-512 kernels of the decode-sized LoRA base products (forward x @ W^T, 16-bit
// backward dY @ W) and of the float32 shrink at small ranks; see rows_dot.h.
#include "rows_dot.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "bf16_avx512.h"
#include "small_gemm.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FASTLORA_ROWS_DOT_AVX2 1
#endif

namespace fastlora {
namespace lora_cpu {

namespace {
constexpr int64_t kGroup = 16;  // k per step: one 32-byte load of bfloat16

// Whether the AVX-512 kernels run (small_gemm's AVX-512 build in use): a group of 16 k is one
// 16-lane vector there, in natural order.
bool wide_kernels() {
#if FASTLORA_AVX512_ROWS
  return small_gemm_isa() >= 4;
#else
  return false;
#endif
}

// Position in the permuted group of column t. AVX2: lanes 0-7 hold k = 0-3, 8-11; lanes 8-15
// hold k = 4-7, 12-15 (what unpacking a 16-lane bfloat16 vector with zeros yields, lo then hi).
// AVX-512: lane t.
inline int64_t permuted_lane(int64_t t, bool natural) {
  if (natural) return t;
  const int64_t quad = t / 4, within = t % 4;  // quads 0..3 of the group
  return (quad % 2) * 8 + (quad / 2) * 4 + within;
}

// The loops around a build's kernels, shared by the AVX2 and AVX-512 builds.
// rows_dot_add: W's rows four at a time (four_rows, where the build has such a kernel and the
// caller asks for it), then two (two_rows; one_row for an odd last one), the last partial group
// of each row read from a zero-padded copy, so no load passes the end of a row.
template <typename WT>
using RowsKernel = void (*)(const WT* w, int64_t ldw, int64_t K, const float* xp, int64_t m, const WT* tail,
                            float* out, int64_t ldo);
template <typename WT>
void rows_dot_driver(RowsKernel<WT> four_rows, RowsKernel<WT> two_rows, RowsKernel<WT> one_row, const WT* w,
                     int64_t ldw, int64_t n, int64_t K, const float* xp, int64_t m, float* out, int64_t ldo) {
  const int64_t full = K / kGroup * kGroup;
  WT tail[4 * kGroup];  // the last partial group of up to four rows, zero-padded
  auto fill_tail = [&](int64_t j, int rows_) {
    std::memset(static_cast<void*>(tail), 0, sizeof(tail));
    for (int jj = 0; jj < rows_; ++jj) {
      std::memcpy(static_cast<void*>(tail + jj * kGroup), w + (j + jj) * ldw + full, sizeof(WT) * (K - full));
    }
  };
  int64_t j = 0;
  if (four_rows != nullptr) {
    for (; j + 4 <= n; j += 4) {
      if (full < K) fill_tail(j, 4);
      four_rows(w + j * ldw, ldw, K, xp, m, tail, out + j * ldo, ldo);
    }
  }
  for (; j + 2 <= n; j += 2) {
    if (full < K) fill_tail(j, 2);
    two_rows(w + j * ldw, ldw, K, xp, m, tail, out + j * ldo, ldo);
  }
  if (j < n) {
    if (full < K) fill_tail(j, 1);
    one_row(w + j * ldw, ldw, K, xp, m, tail, out + j * ldo, ldo);
  }
}

// rows_axpy_add: W's rows in chunks of 16 (the group loop reads them front to back side by side,
// streams the hardware prefetchers follow: M = 8, in = out = 4096, bfloat16 W, 2 threads, AVX2:
// 4 rows 3.3 ms, 16 rows 2.5 ms, 64 rows 3.8 ms; more rows are more strided streams at once),
// each chunk's sums into buf (m x width, groups in the build's lane order), then added to out.
template <typename WT>
using AxpyChunkKernel = void (*)(const WT* w, int64_t ldw, int64_t nc, int64_t full, int64_t k0, int64_t k1,
                                 const WT* tail, const float* dyt, int64_t m, float* buf, int64_t width);
template <typename WT>
void rows_axpy_driver(AxpyChunkKernel<WT> chunk, bool natural, const WT* w, int64_t ldw, int64_t n, int64_t K,
                      int64_t k0, int64_t k1, const WT* tail, const float* dyt, int64_t m, float* out, int64_t ldo) {
  const int64_t full = K / kGroup * kGroup;
  const int64_t width = rows_dot_width(k1 - k0);
  std::vector<float> buf(m * width, 0.0f);
  constexpr int64_t kChunk = 16;
  for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
    chunk(w + j0 * ldw, ldw, std::min(kChunk, n - j0), full, k0, k1, tail ? tail + j0 * kGroup : tail, dyt + j0 * m,
          m, buf.data(), width);
  }
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t g = (k - k0) / kGroup * kGroup;
      out[i * ldo + k] += buf[i * width + g + permuted_lane((k - k0) % kGroup, natural)];
    }
  }
}
}  // namespace

int64_t rows_dot_width(int64_t K) { return (K + kGroup - 1) / kGroup * kGroup; }

void permute_rows_for_dot(const float* x, int64_t m, int64_t K, int64_t ldx, float* xp) {
  const int64_t Kp = rows_dot_width(K);
  const bool natural = wide_kernels();
  for (int64_t i = 0; i < m; ++i) {
    float* dst = xp + i * Kp;
    std::memset(dst + (K / kGroup) * kGroup, 0, sizeof(float) * (Kp - (K / kGroup) * kGroup));
    for (int64_t k = 0; k < K; ++k) {
      dst[(k / kGroup) * kGroup + permuted_lane(k % kGroup, natural)] = x[i * ldx + k];
    }
  }
}

#if FASTLORA_ROWS_DOT_AVX2

namespace {

#define FASTLORA_AVX2 __attribute__((target("avx2,fma,f16c")))

// The 16 weights of one group as the two permuted float32 vectors.
struct LoadBf16 {
  FASTLORA_AVX2 static inline void load(const uint16_t* w, __m256& lo, __m256& hi) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    const __m256i z = _mm256_setzero_si256();
    lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, v));
    hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, v));
  }
};

// float16: halves {0-3, 8-11} and {4-7, 12-15} gathered by 64-bit unpacks, then widened (F16C).
struct LoadF16 {
  FASTLORA_AVX2 static inline void load(const uint16_t* w, __m256& lo, __m256& hi) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 8));
    lo = _mm256_cvtph_ps(_mm_unpacklo_epi64(a, b));
    hi = _mm256_cvtph_ps(_mm_unpackhi_epi64(a, b));
  }
};

struct LoadF32 {
  FASTLORA_AVX2 static inline void load(const float* w, __m256& lo, __m256& hi) {
    const __m256 a = _mm256_loadu_ps(w), b = _mm256_loadu_ps(w + 8);
    lo = _mm256_permute2f128_ps(a, b, 0x20);
    hi = _mm256_permute2f128_ps(a, b, 0x31);
  }
};

FASTLORA_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// One group of 16 k: J rows of W (at wk[j]) against I rows of x (permuted, row stride Kp).
template <class Load, typename WT, int J, int I>
FASTLORA_AVX2 inline void group(const WT* const* wk, const float* xk, int64_t Kp, __m256 (&acc)[J][I]) {
  __m256 lo[J], hi[J];
  for (int j = 0; j < J; ++j) Load::load(wk[j], lo[j], hi[j]);
  for (int i = 0; i < I; ++i) {
    const __m256 xlo = _mm256_loadu_ps(xk + i * Kp), xhi = _mm256_loadu_ps(xk + i * Kp + 8);
    for (int j = 0; j < J; ++j) {
      acc[j][i] = _mm256_fmadd_ps(lo[j], xlo, acc[j][i]);
      acc[j][i] = _mm256_fmadd_ps(hi[j], xhi, acc[j][i]);
    }
  }
}

// J rows of W (J <= 2) against I rows of x (I <= 4): J * I accumulators of 8 lanes. The last
// group of a K that is not a multiple of 16 is read from a zero-padded copy (tail), so no load
// passes the end of a row.
template <class Load, typename WT, int J, int I>
FASTLORA_AVX2 void block(const WT* w, int64_t ldw, int64_t K, const float* xp, int64_t Kp, const WT* tail,
                         float* out, int64_t ldo) {
  __m256 acc[J][I];
  for (int j = 0; j < J; ++j)
    for (int i = 0; i < I; ++i) acc[j][i] = _mm256_setzero_ps();
  const int64_t full = K / kGroup * kGroup;
  const WT* wk[J];
  for (int64_t k = 0; k < full; k += kGroup) {
    for (int j = 0; j < J; ++j) wk[j] = w + j * ldw + k;
    group<Load, WT, J, I>(wk, xp + k, Kp, acc);
  }
  if (full < K) {
    for (int j = 0; j < J; ++j) wk[j] = tail + j * kGroup;
    group<Load, WT, J, I>(wk, xp + full, Kp, acc);
  }
  for (int j = 0; j < J; ++j)
    for (int i = 0; i < I; ++i) out[j * ldo + i] += hsum(acc[j][i]);
}

template <class Load, typename WT, int J>
FASTLORA_AVX2 void rows(const WT* w, int64_t ldw, int64_t K, const float* xp, int64_t m, const WT* tail,
                        float* out, int64_t ldo) {
  const int64_t Kp = rows_dot_width(K);
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) block<Load, WT, J, 4>(w, ldw, K, xp + i * Kp, Kp, tail, out + i, ldo);
  switch (m - i) {
    case 3: block<Load, WT, J, 3>(w, ldw, K, xp + i * Kp, Kp, tail, out + i, ldo); break;
    case 2: block<Load, WT, J, 2>(w, ldw, K, xp + i * Kp, Kp, tail, out + i, ldo); break;
    case 1: block<Load, WT, J, 1>(w, ldw, K, xp + i * Kp, Kp, tail, out + i, ldo); break;
    default: break;
  }
}

template <class Load, typename WT>
void rows_dot_add_impl(const WT* w, int64_t ldw, int64_t n, int64_t K, const float* xp, int64_t m, float* out,
                       int64_t ldo) {
  rows_dot_driver<WT>(nullptr, rows<Load, WT, 2>, rows<Load, WT, 1>, w, ldw, n, K, xp, m, out, ldo);
}

// buf (I rows of 16 permuted sums, row stride ldb) += dyt(:, :I)^T @ W rows (nc rows at wk,
// row stride ldwk, one group of 16 columns): 2 I accumulators over the rows.
template <class Load, typename WT, int I>
FASTLORA_AVX2 inline __attribute__((always_inline)) void axpy_block(const WT* wk, int64_t ldwk, int64_t nc,
                                                                    const float* dyt, int64_t m, float* buf,
                                                                    int64_t ldb) {
  __m256 lo_acc[I], hi_acc[I];
  for (int i = 0; i < I; ++i) {
    lo_acc[i] = _mm256_loadu_ps(buf + i * ldb);
    hi_acc[i] = _mm256_loadu_ps(buf + i * ldb + 8);
  }
  for (int64_t j = 0; j < nc; ++j) {
    __m256 lo, hi;
    Load::load(wk + j * ldwk, lo, hi);
    for (int i = 0; i < I; ++i) {
      const __m256 d = _mm256_broadcast_ss(dyt + j * m + i);
      lo_acc[i] = _mm256_fmadd_ps(d, lo, lo_acc[i]);
      hi_acc[i] = _mm256_fmadd_ps(d, hi, hi_acc[i]);
    }
  }
  for (int i = 0; i < I; ++i) {
    _mm256_storeu_ps(buf + i * ldb, lo_acc[i]);
    _mm256_storeu_ps(buf + i * ldb + 8, hi_acc[i]);
  }
}

// One chunk of rows (nc rows at w, row stride ldw, columns [k0, k1) of which those from full
// on come from the padded tail) into buf, group by group, every row block of dY^T in turn.
template <class Load, typename WT>
FASTLORA_AVX2 void axpy_chunk(const WT* w, int64_t ldw, int64_t nc, int64_t full, int64_t k0, int64_t k1,
                              const WT* tail, const float* dyt, int64_t m, float* buf, int64_t width) {
  for (int64_t k = k0; k < k1; k += kGroup) {
    const bool in_tail = k >= full;
    const WT* wk = in_tail ? tail : w + k;
    const int64_t ldwk = in_tail ? kGroup : ldw;
    float* bk = buf + (k - k0);
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) axpy_block<Load, WT, 4>(wk, ldwk, nc, dyt + i, m, bk + i * width, width);
    switch (m - i) {
      case 3: axpy_block<Load, WT, 3>(wk, ldwk, nc, dyt + i, m, bk + i * width, width); break;
      case 2: axpy_block<Load, WT, 2>(wk, ldwk, nc, dyt + i, m, bk + i * width, width); break;
      case 1: axpy_block<Load, WT, 1>(wk, ldwk, nc, dyt + i, m, bk + i * width, width); break;
      default: break;
    }
  }
}

template <class Load, typename WT>
void rows_axpy_add_impl(const WT* w, int64_t ldw, int64_t n, int64_t K, int64_t k0, int64_t k1, const WT* tail,
                        const float* dyt, int64_t m, float* out, int64_t ldo) {
  rows_axpy_driver<WT>(axpy_chunk<Load, WT>, /*natural=*/false, w, ldw, n, K, k0, k1, tail, dyt, m, out, ldo);
}

}  // namespace

#if FASTLORA_AVX512_ROWS
// The same kernels on 16-lane vectors (AVX-512), where a group of 16 k is one vector in natural
// order: W's 16 values widened in one instruction (float16: vcvtph2ps; bfloat16: a zero-extend
// and shift) and twice the multiply-adds per instruction of the AVX2 build. A float16 decode
// forward at M = 8, in = out = 4096 on 2 threads of a Xeon (AVX512-FP16, where oneDNN's float16
// GEMM is native) took its base product through the AVX2 build at more than that GEMM's time.
namespace {

struct Load512Bf16 {
  FASTLORA_AVX512_TARGET static inline __m512 load(const uint16_t* w) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
  }
};

struct Load512F16 {
  FASTLORA_AVX512_TARGET static inline __m512 load(const uint16_t* w) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
  }
};

struct Load512F32 {
  FASTLORA_AVX512_TARGET static inline __m512 load(const float* w) { return _mm512_loadu_ps(w); }
};

// One group of 16 k: J rows of W (at wk[j]) against I rows of x (row stride Kp).
template <class Load, typename WT, int J, int I>
FASTLORA_AVX512_TARGET inline __attribute__((always_inline)) void group512(const WT* const* wk, const float* xk,
                                                                          int64_t Kp, __m512 (&acc)[J][I]) {
  __m512 wv[J];
  for (int j = 0; j < J; ++j) wv[j] = Load::load(wk[j]);
  for (int i = 0; i < I; ++i) {
    const __m512 xv = _mm512_loadu_ps(xk + i * Kp);
    for (int j = 0; j < J; ++j) acc[j][i] = _mm512_fmadd_ps(wv[j], xv, acc[j][i]);
  }
}

// J rows of W (J <= 4: up to 16 accumulators of the 32 registers) against I rows of x (I <= 4);
// the tail group from the zero-padded copy, as in the AVX2 build.
template <class Load, typename WT, int J, int I>
FASTLORA_AVX512_TARGET void block512(const WT* w, int64_t ldw, int64_t K, const float* xp, int64_t Kp,
                                     const WT* tail, float* out, int64_t ldo) {
  __m512 acc[J][I];
  for (int j = 0; j < J; ++j)
    for (int i = 0; i < I; ++i) acc[j][i] = _mm512_setzero_ps();
  const int64_t full = K / kGroup * kGroup;
  const WT* wk[J];
  for (int64_t k = 0; k < full; k += kGroup) {
    for (int j = 0; j < J; ++j) wk[j] = w + j * ldw + k;
    group512<Load, WT, J, I>(wk, xp + k, Kp, acc);
  }
  if (full < K) {
    for (int j = 0; j < J; ++j) wk[j] = tail + j * kGroup;
    group512<Load, WT, J, I>(wk, xp + full, Kp, acc);
  }
  for (int j = 0; j < J; ++j)
    for (int i = 0; i < I; ++i) out[j * ldo + i] += _mm512_reduce_add_ps(acc[j][i]);
}

template <class Load, typename WT, int J>
FASTLORA_AVX512_TARGET void rows512(const WT* w, int64_t ldw, int64_t K, const float* xp, int64_t m, const WT* tail,
                                    float* out, int64_t ldo) {
  const int64_t Kp = rows_dot_width(K);
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) block512<Load, WT, J, 4>(w, ldw, K, xp + i * Kp, Kp, tail, out + i, ldo);
  switch (m - i) {
    case 3: block512<Load, WT, J, 3>(w, ldw, K, xp + i * Kp, Kp, tail, out + i, ldo); break;
    case 2: block512<Load, WT, J, 2>(w, ldw, K, xp + i * Kp, Kp, tail, out + i, ldo); break;
    case 1: block512<Load, WT, J, 1>(w, ldw, K, xp + i * Kp, Kp, tail, out + i, ldo); break;
    default: break;
  }
}

template <class Load, typename WT>
void rows_dot_add_512(const WT* w, int64_t ldw, int64_t n, int64_t K, const float* xp, int64_t m, float* out,
                      int64_t ldo, bool tall = false) {
  rows_dot_driver<WT>(tall ? rows512<Load, WT, 4> : nullptr, rows512<Load, WT, 2>, rows512<Load, WT, 1>, w, ldw, n,
                      K, xp, m, out, ldo);
}

// buf (I rows of 16 sums, row stride ldb) += dyt(:, :I)^T @ W rows (nc rows at wk, row stride
// ldwk, one group of 16 columns): I accumulators over the rows (I <= 8).
template <class Load, typename WT, int I>
FASTLORA_AVX512_TARGET inline __attribute__((always_inline)) void axpy_block512(const WT* wk, int64_t ldwk,
                                                                               int64_t nc, const float* dyt,
                                                                               int64_t m, float* buf, int64_t ldb) {
  __m512 acc[I];
  for (int i = 0; i < I; ++i) acc[i] = _mm512_loadu_ps(buf + i * ldb);
  for (int64_t j = 0; j < nc; ++j) {
    const __m512 wv = Load::load(wk + j * ldwk);
    for (int i = 0; i < I; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(dyt[j * m + i]), wv, acc[i]);
  }
  for (int i = 0; i < I; ++i) _mm512_storeu_ps(buf + i * ldb, acc[i]);
}

template <class Load, typename WT>
FASTLORA_AVX512_TARGET void axpy_chunk512(const WT* w, int64_t ldw, int64_t nc, int64_t full, int64_t k0,
                                          int64_t k1, const WT* tail, const float* dyt, int64_t m, float* buf,
                                          int64_t width) {
  for (int64_t k = k0; k < k1; k += kGroup) {
    const bool in_tail = k >= full;
    const WT* wk = in_tail ? tail : w + k;
    const int64_t ldwk = in_tail ? kGroup : ldw;
    float* bk = buf + (k - k0);
    int64_t i = 0;
    for (; i + 8 <= m; i += 8) axpy_block512<Load, WT, 8>(wk, ldwk, nc, dyt + i, m, bk + i * width, width);
    switch (m - i) {
      case 7: axpy_block512<Load, WT, 7>(wk, ldwk, nc, dyt + i, m, bk + i * width, width); break;
      case 6: axpy_block512<Load, WT, 6>(wk, ldwk, nc, dyt + i, m, bk + i * width, width); break;
      case 5: axpy_block512<Load, WT, 5>(wk, ldwk, nc, dyt + i, m, bk + i * width, width); break;
      case 4: axpy_block512<Load, WT, 4>(wk, ldwk, nc, dyt + i, m, bk + i * width, width); break;
      case 3: axpy_block512<Load, WT, 3>(wk, ldwk, nc, dyt + i, m, bk + i * width, width); break;
      case 2: axpy_block512<Load, WT, 2>(wk, ldwk, nc, dyt + i, m, bk + i * width, width); break;
      case 1: axpy_block512<Load, WT, 1>(wk, ldwk, nc, dyt + i, m, bk + i * width, width); break;
      default: break;
    }
  }
}

template <class Load, typename WT>
void rows_axpy_add_512(const WT* w, int64_t ldw, int64_t n, int64_t K, int64_t k0, int64_t k1, const WT* tail,
                       const float* dyt, int64_t m, float* out, int64_t ldo) {
  rows_axpy_driver<WT>(axpy_chunk512<Load, WT>, /*natural=*/true, w, ldw, n, K, k0, k1, tail, dyt, m, out, ldo);
}

}  // namespace
#define FASTLORA_WIDE(...) \
  if (wide_kernels()) {     \
    __VA_ARGS__;            \
    return;                 \
  }
#else
#define FASTLORA_WIDE(...)
#endif

bool rows_dot_available() { return small_gemm_isa() >= 3; }

void rows_axpy_add(const c10::BFloat16* w, int64_t ldw, int64_t n, int64_t K, int64_t k0, int64_t k1,
                   const c10::BFloat16* tail, const float* dyt, int64_t m, float* out, int64_t ldo) {
  FASTLORA_WIDE(rows_axpy_add_512<Load512Bf16, uint16_t>(reinterpret_cast<const uint16_t*>(w), ldw, n, K, k0, k1,
                                                         reinterpret_cast<const uint16_t*>(tail), dyt, m, out, ldo));
  rows_axpy_add_impl<LoadBf16, uint16_t>(reinterpret_cast<const uint16_t*>(w), ldw, n, K, k0, k1,
                                         reinterpret_cast<const uint16_t*>(tail), dyt, m, out, ldo);
}

void rows_axpy_add(const c10::Half* w, int64_t ldw, int64_t n, int64_t K, int64_t k0, int64_t k1,
                   const c10::Half* tail, const float* dyt, int64_t m, float* out, int64_t ldo) {
  FASTLORA_WIDE(rows_axpy_add_512<Load512F16, uint16_t>(reinterpret_cast<const uint16_t*>(w), ldw, n, K, k0, k1,
                                                        reinterpret_cast<const uint16_t*>(tail), dyt, m, out, ldo));
  rows_axpy_add_impl<LoadF16, uint16_t>(reinterpret_cast<const uint16_t*>(w), ldw, n, K, k0, k1,
                                        reinterpret_cast<const uint16_t*>(tail), dyt, m, out, ldo);
}

void rows_dot_add(const float* w, int64_t ldw, int64_t n, int64_t K, const float* xp, int64_t m, float* out,
                  int64_t ldo) {
  FASTLORA_WIDE(rows_dot_add_512<Load512F32, float>(w, ldw, n, K, xp, m, out, ldo));
  rows_dot_add_impl<LoadF32, float>(w, ldw, n, K, xp, m, out, ldo);
}

void rows_dot_add_tall(const float* w, int64_t ldw, int64_t n, int64_t K, const float* xp, int64_t m, float* out,
                       int64_t ldo) {
  FASTLORA_WIDE(rows_dot_add_512<Load512F32, float>(w, ldw, n, K, xp, m, out, ldo, /*tall=*/true));
  rows_dot_add_impl<LoadF32, float>(w, ldw, n, K, xp, m, out, ldo);
}

void rows_dot_add(const c10::BFloat16* w, int64_t ldw, int64_t n, int64_t K, const float* xp, int64_t m, float* out,
                  int64_t ldo) {
  FASTLORA_WIDE(rows_dot_add_512<Load512Bf16, uint16_t>(reinterpret_cast<const uint16_t*>(w), ldw, n, K, xp, m,
                                                        out, ldo));
  rows_dot_add_impl<LoadBf16, uint16_t>(reinterpret_cast<const uint16_t*>(w), ldw, n, K, xp, m, out, ldo);
}

void rows_dot_add(const c10::Half* w, int64_t ldw, int64_t n, int64_t K, const float* xp, int64_t m, float* out,
                  int64_t ldo) {
  FASTLORA_WIDE(rows_dot_add_512<Load512F16, uint16_t>(reinterpret_cast<const uint16_t*>(w), ldw, n, K, xp, m,
                                                       out, ldo));
  rows_dot_add_impl<LoadF16, uint16_t>(reinterpret_cast<const uint16_t*>(w), ldw, n, K, xp, m, out, ldo);
}

#else  // not x86-64 / GCC: no vector build; callers check rows_dot_available()

bool rows_dot_available() { return false; }

void rows_dot_add(const float*, int64_t, int64_t, int64_t, const float*, int64_t, float*, int64_t) {
  TORCH_CHECK(false, "rows_dot_add: no AVX2 build on this platform");
}

void rows_dot_add_tall(const float*, int64_t, int64_t, int64_t, const float*, int64_t, float*, int64_t) {
  TORCH_CHECK(false, "rows_dot_add_tall: no AVX2 build on this platform");
}

void rows_dot_add(const c10::BFloat16*, int64_t, int64_t, int64_t, const float*, int64_t, float*, int64_t) {
  TORCH_CHECK(false, "rows_dot_add: no AVX2 build on this platform");
}

void rows_dot_add(const c10::Half*, int64_t, int64_t, int64_t, const float*, int64_t, float*, int64_t) {
  TORCH_CHECK(false, "rows_dot_add: no AVX2 build on this platform");
}

void rows_axpy_add(const c10::BFloat16*, int64_t, int64_t, int64_t, int64_t, int64_t, const c10::BFloat16*,
                   const float*, int64_t, float*, int64_t) {
  TORCH_CHECK(false, "rows_axpy_add: no AVX2 build on this platform");
}

void rows_axpy_add(const c10::Half*, int64_t, int64_t, int64_t, int64_t, int64_t, const c10::Half*, const float*,
                   int64_t, float*, int64_t) {
  TORCH_CHECK(false, "rows_axpy_add: no AVX2 build on this platform");
}

#endif

template <typename HT>
void rows_axpy_tail(const HT* w, int64_t ldw, int64_t n, int64_t K, HT* tail) {
  const int64_t full = K / kGroup * kGroup;
  for (int64_t j = 0; j < n; ++j) {
    std::memset(static_cast<void*>(tail + j * kGroup), 0, sizeof(HT) * kGroup);  // +0 in both formats
    std::memcpy(static_cast<void*>(tail + j * kGroup), w + j * ldw + full, sizeof(HT) * (K - full));
  }
}
template void rows_axpy_tail<c10::BFloat16>(const c10::BFloat16*, int64_t, int64_t, int64_t, c10::BFloat16*);
template void rows_axpy_tail<c10::Half>(const c10::Half*, int64_t, int64_t, int64_t, c10::Half*);

}  // namespace lora_cpu
}  // namespace fastlora
