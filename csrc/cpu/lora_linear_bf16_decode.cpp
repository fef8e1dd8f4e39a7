// The LoRA part of a small bfloat16 batch (at most kBf16DecodeRows = 32 rows) on AVX-512, forward
// and backward, with bfloat16 adapters or PEFT's default float32 ones: every rank-r product as
// broadcast-FMA loops over the operands read in place (B's rows transposed 16 x 16 in registers
// for the expand), in groups of up to 8 rows (one vector per row in registers), partial sums per
// column chunk added in chunk order (the same bits on any thread count), each result rounded as
// it is stored.
//
// Why not the row-block kernels (lora_linear_bf16_cpu.cpp) at this size: with a handful of rows
// the products are ~0.5 M multiply-adds each, less work than the passes around them. Those
// kernels pack A and B in pairs (2 x 128 KiB at r = 16, 4096^2), and the backward accumulates d
// lora_A and d lora_B^T in an r x (in + out) float32 buffer (512 KiB), then rounds it and
// transposes d lora_B (another 2 x 128 KiB), after the base products have evicted every operand
// from L2. Here A, B, x and dY are read once each and the outputs written once. At M = 8,
// 4096^2, r = 16 (Xeon, 2 threads, interleaved):
//   forward's LoRA part (after x @ W^T): 0.086-0.097 -> 0.013-0.035 ms;
//   backward's LoRA part alone 0.14 -> 0.03 ms, after dY @ W 0.16 -> 0.06 ms (AVX512-BF16 level);
//   the training step over the bf16 base: +11.4 to +12.6% -> +7.2 to +8.5% with AMX (forward
//   and backward both), +12.4 to +14.3% -> +7.2 to +8.0% at the AVX512-BF16 level.
// r = 64 with dropout p = 0.1: forward 0.32 -> 0.15 ms, backward alone 0.37 -> 0.15 ms. With
// PEFT's default float32 adapters (whose branch ran in float32 small_gemm on float32 copies of x
// and dY) the M = 8 step went from +13.0 to +16.0% over the base to +9.2 to +9.6% (AMX).
// Up to 32 rows (where the row-block kernels run few blocks, single-threaded below 4), steps over
// the base, row blocks -> these kernels, AMX: M = 16, 4096^2, r = 64, p = 0.1: +44.5-45.7% (slower
// than PEFT) -> +28.2-29.3%; M = 32, 2048^2, r = 16, p = 0.05: +37.8-42.1% -> +28.3-28.7%; M = 32,
// 4096^2, r = 64, p = 0.1: +42.9-46.8% -> +39.6-41.8%. At 64 rows and r = 64 the row blocks win
// (+40-42% against +47-53%).
//
// With bfloat16 adapters, rounding as in the row-block kernels (PEFT's points): xa rounded once
// (the output and the expand's operand), g = s dY @ B rounded before its two products,
// dropout(x) rounded, each gradient summed in float32 and rounded once. y and dX are rounded once
// from the rounded base product (already in y / grad_x) plus the float32 LoRA term, with either
// adapter dtype.
#include "lora_linear_blocks.h"

#include "bf16_avx512.h"

#if FASTLORA_AVX512_ROWS
#define FASTLORA_DECODE_BUILT 1
#define FASTLORA_DECODE_TARGET FASTLORA_AVX512_TARGET
#else
#define FASTLORA_DECODE_BUILT 0
#endif

namespace fastlora {
namespace lora_cpu {

#if FASTLORA_DECODE_BUILT
namespace {

constexpr int64_t kJChunk = 512;  // dY's columns per task of the first pass (g, d lora_B)
constexpr int64_t kCChunk = 256;  // x's columns per task of the second pass (d lora_A, dX)

using avx512::lanes;
using avx512::load_bf16;
using avx512::rounded;
using avx512::store_bf16;

// The adapters' side (lora_A, lora_B, xa, their gradients): AT = uint16_t for bfloat16 adapters,
// whose results are rounded (PEFT's points, above), or float for PEFT's default float32 adapters
// on a bfloat16 model, whose branch runs in float32 on x's float32 values: nothing on that side
// is rounded, only y and dX (once, from the rounded base product plus the float32 term).
template <typename AT>
constexpr bool kBf16Adapters = std::is_same_v<AT, uint16_t>;

FASTLORA_DECODE_TARGET inline __m512 load_adapter(const uint16_t* p, __mmask16 m) { return load_bf16(p, m); }
FASTLORA_DECODE_TARGET inline __m512 load_adapter(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
FASTLORA_DECODE_TARGET inline void store_adapter(uint16_t* p, __m512 v, __mmask16 m) { store_bf16(p, v, m); }
FASTLORA_DECODE_TARGET inline void store_adapter(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }

// dropout(x) as the adapters' dtype holds it: rounded to bfloat16 for bfloat16 adapters.
template <typename AT>
FASTLORA_DECODE_TARGET inline __m512 dropped(__m512 x, __m512 mult) {
  const __m512 v = _mm512_mul_ps(x, mult);
  if constexpr (kBf16Adapters<AT>) return rounded(v);
  return v;
}

// A scalar result in the adapters' dtype (v itself for float32), and its value.
inline void put_adapter(uint16_t* p, float v) { *p = float_to_bf16_bits(v); }
inline void put_adapter(float* p, float v) { *p = v; }
template <typename AT>
inline float adapter_value(float v) {
  if constexpr (kBf16Adapters<AT>) return bf16_bits_to_float(float_to_bf16_bits(v));
  return v;
}

// Calls f(std::integral_constant<int, n>{}) for a row group of n = 1 .. kGroupRows rows.
constexpr int64_t kGroupRows = 8;  // rows per group: the kernels keep one vector per row in registers

template <typename F>
void with_group_rows(int64_t n, const F& f) {
  switch (n) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

// Columns [j0, j1) of dY (rows of B and of d lora_B), for NR rows of dY and xa: g_part (NR x r,
// float32) = dY[:, j0:j1] @ B[j0:j1, :], and these rows' share of d lora_B[j0:j1, :] = s *
// dY[:, j0:j1]^T @ xa: added to the float32 sums of the earlier row groups in db_acc (N x r)
// unless `first`, then stored rounded into grad_B, or back into db_acc while grad_B is null (row
// groups still to come). dyf: scratch, NR x (j1 - j0) floats.
template <int NR, typename AT>
FASTLORA_DECODE_TARGET void g_and_grad_B(const uint16_t* dy, int64_t ldy, const AT* xa, const AT* B, int64_t r,
                                         float s, int64_t j0, int64_t j1, float* dyf, float* g_part, float* db_acc,
                                         bool first, AT* grad_B) {
  const int64_t w = j1 - j0;
  for (int i = 0; i < NR; ++i) {
    for (int64_t j = 0; j < w; ++j) dyf[i * w + j] = bf16_bits_to_float(dy[i * ldy + j0 + j]);
  }
  const __m512 sv = _mm512_set1_ps(s);
  for (int64_t k0 = 0; k0 < r; k0 += 16) {
    const __mmask16 mk = lanes(r - k0);
    __m512 xv[NR], gacc[NR];
    for (int i = 0; i < NR; ++i) {
      xv[i] = load_adapter(xa + i * r + k0, mk);
      gacc[i] = _mm512_setzero_ps();
    }
    for (int64_t j = 0; j < w; ++j) {
      const __m512 bj = load_adapter(B + (j0 + j) * r + k0, mk);
      float* acc = db_acc == nullptr ? nullptr : db_acc + (j0 + j) * r + k0;
      __m512 db = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mk, acc);
      for (int i = 0; i < NR; ++i) {
        const __m512 d = _mm512_set1_ps(dyf[i * w + j]);
        gacc[i] = _mm512_fmadd_ps(d, bj, gacc[i]);
        db = _mm512_fmadd_ps(d, xv[i], db);
      }
      if (grad_B != nullptr) {
        store_adapter(grad_B + (j0 + j) * r + k0, _mm512_mul_ps(db, sv), mk);
      } else {
        _mm512_mask_storeu_ps(acc, mk, db);
      }
    }
    for (int i = 0; i < NR; ++i) _mm512_mask_storeu_ps(g_part + i * r + k0, mk, gacc[i]);
  }
}

// Columns [c0, c1) of x (and of A, d lora_A, dX), for the NR rows from row0: these rows' share
// of d lora_A[:, c0:c1] = g^T @ dropout(x)[:, c0:c1] (summed with da_acc (r x K) as d lora_B is
// with db_acc above), and dX[:, c0:c1] = bfloat16(dX + mask * (g @ A[:, c0:c1])), g (NR x r) as
// the float32 values of its rounding. mult: scratch, NR x (c1 - c0) floats.
template <int NR, typename AT>
FASTLORA_DECODE_TARGET void grad_A_and_x(const uint16_t* x, int64_t ldx, const AT* A, int64_t K, int64_t r,
                                         const float* g, const DropoutParams& d, int64_t row0, int64_t c0,
                                         int64_t c1, float* mult, float* da_acc, bool first, AT* grad_A,
                                         uint16_t* gx) {
  const int64_t w = c1 - c0;
  if (d.active) {
    for (int i = 0; i < NR; ++i) row_mask(mult + i * w, w, c0, row0 + i, d);
  }
  for (int64_t c = 0; c < w; c += 16) {
    const __mmask16 mc = lanes(w - c);
    __m512 xv[NR], mv[NR];
    for (int i = 0; i < NR; ++i) {
      xv[i] = load_bf16(x + i * ldx + c0 + c, mc);
      mv[i] = _mm512_set1_ps(1.0f);
      if (d.active) {
        mv[i] = _mm512_maskz_loadu_ps(mc, mult + i * w + c);
        xv[i] = dropped<AT>(xv[i], mv[i]);
      }
    }
    for (int64_t k = 0; k < r; ++k) {
      float* sum = da_acc == nullptr ? nullptr : da_acc + k * K + c0 + c;
      __m512 acc = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mc, sum);
      for (int i = 0; i < NR; ++i) acc = _mm512_fmadd_ps(_mm512_set1_ps(g[i * r + k]), xv[i], acc);
      if (grad_A != nullptr) {
        store_adapter(grad_A + k * K + c0 + c, acc, mc);
      } else {
        _mm512_mask_storeu_ps(sum, mc, acc);
      }
    }
    if (gx == nullptr) continue;
    __m512 acc[NR];
    for (int i = 0; i < NR; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t k = 0; k < r; ++k) {
      const __m512 ak = load_adapter(A + k * K + c0 + c, mc);
      for (int i = 0; i < NR; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(g[i * r + k]), ak, acc[i]);
    }
    for (int i = 0; i < NR; ++i) {
      uint16_t* out = gx + i * K + c0 + c;
      const __m512 y = load_bf16(out, mc);
      store_bf16(out, _mm512_fmadd_ps(acc[i], mv[i], y), mc);
    }
  }
}

// Columns [c0, c1) of x and A, for the NR rows from row0: part (NR x r, float32) =
// dropout(x)[:, c0:c1] @ A[:, c0:c1]^T, with
// dropout(x) rounded to bfloat16 as in the row-block kernels. Scratch: mult (c1 - c0 floats),
// xd (NR x the columns rounded up to 16, floats).
template <int NR, typename AT>
FASTLORA_DECODE_TARGET void shrink_part(const uint16_t* x, int64_t ldx, const AT* A, int64_t K, int64_t r,
                                        const DropoutParams& d, int64_t row0, int64_t c0, int64_t c1, float* mult,
                                        float* xd, float* part) {
  const int64_t w = c1 - c0, wp = ceil_div(w, 16) * 16;
  for (int i = 0; i < NR; ++i) {
    if (d.active) row_mask(mult, w, c0, row0 + i, d);
    for (int64_t c = 0; c < w; c += 16) {
      const __mmask16 mc = lanes(w - c);
      __m512 v = load_bf16(x + i * ldx + c0 + c, mc);
      if (d.active) v = dropped<AT>(v, _mm512_maskz_loadu_ps(mc, mult + c));
      _mm512_storeu_ps(xd + i * wp + c, v);  // zeros past the last column
    }
  }
  for (int64_t k = 0; k < r; ++k) {
    __m512 acc[NR];
    for (int i = 0; i < NR; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t c = 0; c < w; c += 16) {
      const __m512 a = load_adapter(A + k * K + c0 + c, lanes(w - c));
      for (int i = 0; i < NR; ++i) acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(xd + i * wp + c), a, acc[i]);
    }
    for (int i = 0; i < NR; ++i) part[i * r + k] = _mm512_reduce_add_ps(acc[i]);
  }
}

FASTLORA_DECODE_TARGET inline __m512 lo64(__m512 a, __m512 b) {
  return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
}
FASTLORA_DECODE_TARGET inline __m512 hi64(__m512 a, __m512 b) {
  return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
}

// In place: v[k] (lane j) = the old v[j] (lane k), a 16 x 16 float32 transpose.
FASTLORA_DECODE_TARGET inline void transpose16(__m512 v[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(v[i], v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    v[i] = lo64(t[i], t[i + 2]);
    v[i + 1] = hi64(t[i], t[i + 2]);
    v[i + 2] = lo64(t[i + 1], t[i + 3]);
    v[i + 3] = hi64(t[i + 1], t[i + 3]);
  }
  // v[4g + e], 128-bit lane L: column 4L + e of rows 4g .. 4g + 3. Gather the lanes: column 4L + e
  // takes lane L of v[e], v[4 + e], v[8 + e], v[12 + e].
  for (int e = 0; e < 4; ++e) {
    for (int h = 0; h < 2; ++h) {
      t[4 * h + e] = _mm512_shuffle_f32x4(v[e + 8 * h], v[e + 4 + 8 * h], 0x88);
      t[8 + 4 * h + e] = _mm512_shuffle_f32x4(v[e + 8 * h], v[e + 4 + 8 * h], 0xDD);
    }
  }
  for (int e = 0; e < 4; ++e) {
    v[e] = _mm512_shuffle_f32x4(t[e], t[4 + e], 0x88);
    v[8 + e] = _mm512_shuffle_f32x4(t[e], t[4 + e], 0xDD);
    v[4 + e] = _mm512_shuffle_f32x4(t[8 + e], t[12 + e], 0x88);
    v[12 + e] = _mm512_shuffle_f32x4(t[8 + e], t[12 + e], 0xDD);
  }
}

// One 16-column block of y (columns jb .. jb + nj - 1) for NR rows: y = bfloat16(y + (s * xa @
// B_block^T + bias)), with bt holding B_block transposed (r rows of 16 floats) and xa (NR x r) the
// float32 values of its rounding.
template <int NR>
FASTLORA_DECODE_TARGET void expand_block(const float* xa, const float* bt, int64_t r, float s, const float* bias,
                                         int64_t jb, int64_t nj, uint16_t* y, int64_t ldy) {
  __m512 acc[NR];
  for (int i = 0; i < NR; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < r; ++k) {
    const __m512 btk = _mm512_loadu_ps(bt + k * 16);
    for (int i = 0; i < NR; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(xa[i * r + k]), btk, acc[i]);
  }
  const __mmask16 mj = lanes(nj);
  const __m512 b = bias ? _mm512_maskz_loadu_ps(mj, bias + jb) : _mm512_setzero_ps();
  for (int i = 0; i < NR; ++i) {
    uint16_t* out = y + i * ldy + jb;
    store_bf16(out, _mm512_add_ps(load_bf16(out, mj), _mm512_fmadd_ps(acc[i], _mm512_set1_ps(s), b)), mj);
  }
}

// B's rows jb .. jb + nj - 1 transposed into bt (r rows of 16 floats, zeros past nj), 16 x 16
// blocks in registers: B is read in place.
template <typename AT>
FASTLORA_DECODE_TARGET void transpose_B_block(const AT* B, int64_t r, int64_t jb, int64_t nj, float* bt) {
  for (int64_t k0 = 0; k0 < r; k0 += 16) {
    const __mmask16 mk = lanes(r - k0);
    __m512 v[16];
    for (int jj = 0; jj < 16; ++jj) v[jj] = jj < nj ? load_adapter(B + (jb + jj) * r + k0, mk) : _mm512_setzero_ps();
    transpose16(v);  // v[k]: B[jb .. jb + 15, k0 + k]
    for (int64_t k = 0; k < std::min<int64_t>(16, r - k0); ++k) _mm512_storeu_ps(bt + (k0 + k) * 16, v[k]);
  }
}

// The forward: the shrink over chunks of K, then the expand over chunks of y's columns, each task
// taking the row groups in order (each 16-column block of B transposed once for all of them).
template <typename AT>
void fwd_decode(const uint16_t* x, int64_t ldx, const AT* A, const AT* B, const float* bias, int64_t M, int64_t K,
                int64_t N, int64_t r, float s, const DropoutParams& d, AT* xa, uint16_t* y) {
  // The shrink's partial sums per chunk of K, added in chunk order (the same on any thread count).
  const int64_t nk = ceil_div(K, kCChunk);
  std::vector<float> parts(nk * M * r);
  at::parallel_for(0, nk, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> mult(kCChunk), xd(kGroupRows * kCChunk);
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t g0 = 0; g0 < M; g0 += kGroupRows) {
        with_group_rows(std::min(kGroupRows, M - g0), [&](auto n) {
          shrink_part<decltype(n)::value, AT>(x + g0 * ldx, ldx, A, K, r, d, g0, t * kCChunk,
                                              std::min(K, (t + 1) * kCChunk), mult.data(), xd.data(),
                                              parts.data() + (t * M + g0) * r);
        });
      }
    }
  });
  std::vector<float> xa32(M * r, 0.0f);
  for (int64_t t = 0; t < nk; ++t) {
    for (int64_t e = 0; e < M * r; ++e) xa32[e] += parts[t * M * r + e];
  }
  for (int64_t e = 0; e < M * r; ++e) {  // xa (rounded once): the output, and the expand's operand
    put_adapter(xa + e, xa32[e]);
    xa32[e] = adapter_value<AT>(xa32[e]);
  }
  at::parallel_for(0, ceil_div(N, kJChunk), 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> bt(r * 16);
    for (int64_t jb = t0 * kJChunk; jb < std::min(N, t1 * kJChunk); jb += 16) {
      const int64_t nj = std::min<int64_t>(16, N - jb);
      transpose_B_block(B, r, jb, nj, bt.data());
      for (int64_t g0 = 0; g0 < M; g0 += kGroupRows) {
        with_group_rows(std::min(kGroupRows, M - g0), [&](auto n) {
          expand_block<decltype(n)::value>(xa32.data() + g0 * r, bt.data(), r, s, bias, jb, nj, y + g0 * N, N);
        });
      }
    }
  });
}

// The backward: two passes over column chunks, each task taking the row groups in order, d lora_A
// and d lora_B summed over the groups in float32 (db_acc, da_acc) and rounded by the last group.
template <typename AT>
void bwd_decode(const uint16_t* dy, int64_t ldy, const uint16_t* x, int64_t ldx, const AT* xa, const AT* A,
                const AT* B, int64_t M, int64_t K, int64_t N, int64_t r, float s, const DropoutParams& d, uint16_t* gx,
                AT* grad_A, AT* grad_B) {
  const bool one_group = M <= kGroupRows;
  std::vector<float> db_acc(one_group ? 0 : N * r), da_acc(one_group ? 0 : r * K);
  // g's partial sums per chunk of dY's columns, added in chunk order: the same result on any
  // number of threads.
  const int64_t nj = ceil_div(N, kJChunk);
  std::vector<float> g_parts(nj * M * r, 0.0f);
  at::parallel_for(0, nj, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> dyf(kGroupRows * kJChunk);
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t g0 = 0; g0 < M; g0 += kGroupRows) {
        const int64_t nr = std::min(kGroupRows, M - g0);
        with_group_rows(nr, [&](auto n) {
          g_and_grad_B<decltype(n)::value, AT>(dy + g0 * ldy, ldy, xa + g0 * r, B, r, s, t * kJChunk,
                                               std::min(N, (t + 1) * kJChunk), dyf.data(),
                                               g_parts.data() + (t * M + g0) * r, one_group ? nullptr : db_acc.data(),
                                               g0 == 0, g0 + nr == M ? grad_B : nullptr);
        });
      }
    }
  });
  std::vector<float> g(M * r, 0.0f);
  for (int64_t t = 0; t < nj; ++t) {
    for (int64_t e = 0; e < M * r; ++e) g[e] += g_parts[t * M * r + e];
  }
  for (float& v : g) v = adapter_value<AT>(s * v);  // the gradient of xa, in the adapters' dtype
  at::parallel_for(0, ceil_div(K, kCChunk), 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> mult(d.active ? kGroupRows * kCChunk : 0);
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t g0 = 0; g0 < M; g0 += kGroupRows) {
        const int64_t nr = std::min(kGroupRows, M - g0);
        with_group_rows(nr, [&](auto n) {
          grad_A_and_x<decltype(n)::value, AT>(x + g0 * ldx, ldx, A, K, r, g.data() + g0 * r, d, g0, t * kCChunk,
                                               std::min(K, (t + 1) * kCChunk), mult.data(),
                                               one_group ? nullptr : da_acc.data(), g0 == 0,
                                               g0 + nr == M ? grad_A : nullptr, gx == nullptr ? nullptr : gx + g0 * K);
        });
      }
    }
  });
}

}  // namespace
#endif

bool bf16_decode_kernels_available() { return FASTLORA_DECODE_BUILT && small_gemm_isa() >= 4; }

#if FASTLORA_DECODE_BUILT
#define FASTLORA_DECODE_CALL(call) call
#else
#define FASTLORA_DECODE_CALL(call)
#endif

void fwd_bf16_decode(const uint16_t* x, int64_t ldx, const uint16_t* A, const uint16_t* B, const float* bias,
                     int64_t M, int64_t K, int64_t N, int64_t r, float s, const DropoutParams& d, uint16_t* xa,
                     uint16_t* y) {
  TORCH_INTERNAL_ASSERT(bf16_decode_kernels_available() && M >= 1 && M <= kBf16DecodeRows);
  FASTLORA_DECODE_CALL(fwd_decode(x, ldx, A, B, bias, M, K, N, r, s, d, xa, y));
}

void fwd_bf16_decode(const uint16_t* x, int64_t ldx, const float* A, const float* B, const float* bias, int64_t M,
                     int64_t K, int64_t N, int64_t r, float s, const DropoutParams& d, float* xa, uint16_t* y) {
  TORCH_INTERNAL_ASSERT(bf16_decode_kernels_available() && M >= 1 && M <= kBf16DecodeRows);
  FASTLORA_DECODE_CALL(fwd_decode(x, ldx, A, B, bias, M, K, N, r, s, d, xa, y));
}

void bwd_bf16_decode(const uint16_t* dy, int64_t ldy, const uint16_t* x, int64_t ldx, const uint16_t* xa,
                     const uint16_t* A, const uint16_t* B, int64_t M, int64_t K, int64_t N, int64_t r, float s,
                     const DropoutParams& d, uint16_t* gx, uint16_t* grad_A, uint16_t* grad_B) {
  TORCH_INTERNAL_ASSERT(bf16_decode_kernels_available() && M >= 1 && M <= kBf16DecodeRows);
  FASTLORA_DECODE_CALL(bwd_decode(dy, ldy, x, ldx, xa, A, B, M, K, N, r, s, d, gx, grad_A, grad_B));
}

void bwd_bf16_decode(const uint16_t* dy, int64_t ldy, const uint16_t* x, int64_t ldx, const float* xa, const float* A,
                     const float* B, int64_t M, int64_t K, int64_t N, int64_t r, float s, const DropoutParams& d,
                     uint16_t* gx, float* grad_A, float* grad_B) {
  TORCH_INTERNAL_ASSERT(bf16_decode_kernels_available() && M >= 1 && M <= kBf16DecodeRows);
  FASTLORA_DECODE_CALL(bwd_decode(dy, ldy, x, ldx, xa, A, B, M, K, N, r, s, d, gx, grad_A, grad_B));
}

}  // namespace lora_cpu
}  // namespace fastlora
