// The bfloat16 LoRA backward of a decode-sized batch (at most kBf16DecodeRows rows) on AVX-512:
// every rank-r product as broadcast-FMA loops over bfloat16 operands read in place, each
// gradient rounded as it is stored.
//
// Why not the row-block kernels (lora_linear_bf16_cpu.cpp) at this size: with a handful of rows
// the products are ~0.5 M multiply-adds each, less work than the passes around them. Those
// kernels pack A and B in pairs (2 x 128 KiB at r = 16, 4096^2), accumulate d lora_A and d
// lora_B^T in an r x (in + out) float32 buffer (512 KiB), then round it and transpose d lora_B
// (another 2 x 128 KiB): most of their time after the base product dY @ W, which has just
// evicted every operand from L2. Here A, B, x and dY are read once each and the gradients
// written once. At M = 8, 4096^2, r = 16 (Xeon, 2 threads): the LoRA part alone 0.14 -> 0.03 ms;
// after dY @ W, as in a training step, 0.16 -> 0.06 ms (AVX512-BF16 level); the training step
// +11.4 to +12.6% -> +8.4 to +10.1% over the bf16 base with AMX, +12.4 to +14.3% -> +9.6 to +9.8%
// at the AVX512-BF16 level (interleaved). r = 64 with dropout: 0.37 -> 0.15 ms alone.
//
// Rounding as in the row-block kernels (PEFT's points): g = s dY @ B rounded to bfloat16 before
// its two products, dropout(x) rounded to bfloat16, each gradient summed in float32 and rounded
// once, dX rounded once from the rounded base product (already in grad_x) plus the masked float32
// LoRA term.
#include "lora_linear_blocks.h"

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__)
#include <immintrin.h>
#define FASTLORA_DECODE_BUILT 1
#define FASTLORA_DECODE_TARGET __attribute__((target("arch=x86-64-v4")))
#else
#define FASTLORA_DECODE_BUILT 0
#endif

namespace fastlora {
namespace lora_cpu {

#if FASTLORA_DECODE_BUILT
namespace {

constexpr int64_t kJChunk = 512;  // dY's columns per task of the first pass (g, d lora_B)
constexpr int64_t kCChunk = 256;  // x's columns per task of the second pass (d lora_A, dX)

FASTLORA_DECODE_TARGET inline __mmask16 lanes(int64_t w) {
  return w >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << w) - 1u);
}

FASTLORA_DECODE_TARGET inline __m512 load_bf16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// float_to_bf16_bits on 16 lanes: round to nearest even, NaN -> 0x7FC0.
FASTLORA_DECODE_TARGET inline __m256i round_bf16(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

FASTLORA_DECODE_TARGET inline void store_bf16(uint16_t* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, round_bf16(v));
}

// The value bfloat16 rounding gives, as float32.
FASTLORA_DECODE_TARGET inline __m512 rounded(__m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(round_bf16(v)), 16));
}

// Columns [j0, j1) of dY (rows of B and of d lora_B): g_part (NR x r, float32) = dY[:, j0:j1] @
// B[j0:j1, :] and d lora_B[j0:j1, :] = s * dY[:, j0:j1]^T @ xa, rounded. dyf: scratch, NR x
// (j1 - j0) floats.
template <int NR>
FASTLORA_DECODE_TARGET void g_and_grad_B(const uint16_t* dy, int64_t ldy, const uint16_t* xa, const uint16_t* B,
                                         int64_t r, float s, int64_t j0, int64_t j1, float* dyf, float* g_part,
                                         uint16_t* grad_B) {
  const int64_t w = j1 - j0;
  for (int i = 0; i < NR; ++i) {
    for (int64_t j = 0; j < w; ++j) dyf[i * w + j] = bf16_bits_to_float(dy[i * ldy + j0 + j]);
  }
  const __m512 sv = _mm512_set1_ps(s);
  for (int64_t k0 = 0; k0 < r; k0 += 16) {
    const __mmask16 mk = lanes(r - k0);
    __m512 xv[NR], gacc[NR];
    for (int i = 0; i < NR; ++i) {
      xv[i] = load_bf16(xa + i * r + k0, mk);
      gacc[i] = _mm512_setzero_ps();
    }
    for (int64_t j = 0; j < w; ++j) {
      const __m512 bj = load_bf16(B + (j0 + j) * r + k0, mk);
      __m512 db = _mm512_setzero_ps();
      for (int i = 0; i < NR; ++i) {
        const __m512 d = _mm512_set1_ps(dyf[i * w + j]);
        gacc[i] = _mm512_fmadd_ps(d, bj, gacc[i]);
        db = _mm512_fmadd_ps(d, xv[i], db);
      }
      store_bf16(grad_B + (j0 + j) * r + k0, _mm512_mul_ps(db, sv), mk);
    }
    for (int i = 0; i < NR; ++i) _mm512_mask_storeu_ps(g_part + i * r + k0, mk, gacc[i]);
  }
}

// Columns [c0, c1) of x (and of A, d lora_A, dX): d lora_A[:, c0:c1] = g^T @ dropout(x)[:, c0:c1]
// and dX[:, c0:c1] = bfloat16(dX + mask * (g @ A[:, c0:c1])), g (NR x r) as the float32 values
// of its rounding. mult: scratch, NR x (c1 - c0) floats (the dropout multipliers when active).
template <int NR>
FASTLORA_DECODE_TARGET void grad_A_and_x(const uint16_t* x, int64_t ldx, const uint16_t* A, int64_t K, int64_t r,
                                         const float* g, const DropoutParams& d, int64_t c0, int64_t c1,
                                         float* mult, uint16_t* grad_A, uint16_t* gx) {
  const int64_t w = c1 - c0;
  if (d.active) {
    for (int i = 0; i < NR; ++i) row_mask(mult + i * w, w, c0, i, d);
  }
  for (int64_t c = 0; c < w; c += 16) {
    const __mmask16 mc = lanes(w - c);
    __m512 xv[NR], mv[NR];
    for (int i = 0; i < NR; ++i) {
      xv[i] = load_bf16(x + i * ldx + c0 + c, mc);
      mv[i] = _mm512_set1_ps(1.0f);
      if (d.active) {
        mv[i] = _mm512_maskz_loadu_ps(mc, mult + i * w + c);
        xv[i] = rounded(_mm512_mul_ps(xv[i], mv[i]));  // dropout(x), rounded as PEFT's bf16 product is
      }
    }
    for (int64_t k = 0; k < r; ++k) {
      __m512 acc = _mm512_setzero_ps();
      for (int i = 0; i < NR; ++i) acc = _mm512_fmadd_ps(_mm512_set1_ps(g[i * r + k]), xv[i], acc);
      store_bf16(grad_A + k * K + c0 + c, acc, mc);
    }
    if (gx == nullptr) continue;
    __m512 acc[NR];
    for (int i = 0; i < NR; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t k = 0; k < r; ++k) {
      const __m512 ak = load_bf16(A + k * K + c0 + c, mc);
      for (int i = 0; i < NR; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(g[i * r + k]), ak, acc[i]);
    }
    for (int i = 0; i < NR; ++i) {
      uint16_t* out = gx + i * K + c0 + c;
      const __m512 y = load_bf16(out, mc);
      store_bf16(out, _mm512_fmadd_ps(acc[i], mv[i], y), mc);
    }
  }
}

template <int NR>
void bwd_decode_rows(const uint16_t* dy, int64_t ldy, const uint16_t* x, int64_t ldx, const uint16_t* xa,
                     const uint16_t* A, const uint16_t* B, int64_t K, int64_t N, int64_t r, float s,
                     const DropoutParams& d, uint16_t* gx, uint16_t* grad_A, uint16_t* grad_B) {
  // g's partial sums per chunk of dY's columns, added in chunk order: the same result on any
  // number of threads.
  const int64_t nj = ceil_div(N, kJChunk);
  std::vector<float> g_parts(nj * NR * r, 0.0f);
  at::parallel_for(0, nj, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> dyf(NR * kJChunk);
    for (int64_t t = t0; t < t1; ++t) {
      g_and_grad_B<NR>(dy, ldy, xa, B, r, s, t * kJChunk, std::min(N, (t + 1) * kJChunk), dyf.data(),
                       g_parts.data() + t * NR * r, grad_B);
    }
  });
  std::vector<float> g(NR * r, 0.0f);
  for (int64_t t = 0; t < nj; ++t) {
    for (int64_t e = 0; e < NR * r; ++e) g[e] += g_parts[t * NR * r + e];
  }
  for (float& v : g) v = bf16_bits_to_float(float_to_bf16_bits(s * v));  // PEFT's bf16 gradient of xa
  at::parallel_for(0, ceil_div(K, kCChunk), 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> mult(d.active ? NR * kCChunk : 0);
    for (int64_t t = t0; t < t1; ++t) {
      grad_A_and_x<NR>(x, ldx, A, K, r, g.data(), d, t * kCChunk, std::min(K, (t + 1) * kCChunk), mult.data(),
                       grad_A, gx);
    }
  });
}

}  // namespace
#endif

bool bf16_decode_kernels_available() { return FASTLORA_DECODE_BUILT && small_gemm_isa() >= 4; }

void bwd_bf16_decode(const uint16_t* dy, int64_t ldy, const uint16_t* x, int64_t ldx, const uint16_t* xa,
                     const uint16_t* A, const uint16_t* B, int64_t M, int64_t K, int64_t N, int64_t r, float s,
                     const DropoutParams& d, uint16_t* gx, uint16_t* grad_A, uint16_t* grad_B) {
  TORCH_INTERNAL_ASSERT(bf16_decode_kernels_available() && M >= 1 && M <= kBf16DecodeRows);
#if FASTLORA_DECODE_BUILT
  switch (M) {
    case 1: return bwd_decode_rows<1>(dy, ldy, x, ldx, xa, A, B, K, N, r, s, d, gx, grad_A, grad_B);
    case 2: return bwd_decode_rows<2>(dy, ldy, x, ldx, xa, A, B, K, N, r, s, d, gx, grad_A, grad_B);
    case 3: return bwd_decode_rows<3>(dy, ldy, x, ldx, xa, A, B, K, N, r, s, d, gx, grad_A, grad_B);
    case 4: return bwd_decode_rows<4>(dy, ldy, x, ldx, xa, A, B, K, N, r, s, d, gx, grad_A, grad_B);
    case 5: return bwd_decode_rows<5>(dy, ldy, x, ldx, xa, A, B, K, N, r, s, d, gx, grad_A, grad_B);
    case 6: return bwd_decode_rows<6>(dy, ldy, x, ldx, xa, A, B, K, N, r, s, d, gx, grad_A, grad_B);
    case 7: return bwd_decode_rows<7>(dy, ldy, x, ldx, xa, A, B, K, N, r, s, d, gx, grad_A, grad_B);
    default: return bwd_decode_rows<8>(dy, ldy, x, ldx, xa, A, B, K, N, r, s, d, gx, grad_A, grad_B);
  }
#endif
}

}  // namespace lora_cpu
}  // namespace fastlora
