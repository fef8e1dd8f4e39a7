// The float32 backward's two products on the x side of a block of rows under dropout, fused with
// its mask (lora_bwd_x_side_f32, declared in lora_linear_blocks.h):
//   d lora_A partial  pa[j, :] += g[i, j] * dropout(x)[i, :]      (j < r, i < n)
//   dX's LoRA term    gx[i, :]  = mask(i, :) * (g[i, :r] @ A)
// Otherwise these are two small_gemm products around a dropout pass that writes dropout(x) and
// masks dX in place. Here one vector of columns at a time, walking down the rows: the vector's d
// lora_A partials stay in registers (one load and one store per kSubRows rows), each g[i, j] is
// broadcast once for both products, the mask is computed once per element and applied in
// registers, x is read once and dX written once. The partials take half the vector registers:
// ranks up to 16 (x_side_max_rank); higher ranks stay with small_gemm (see there).
// Measured (backward op, 2 threads of a Xeon, both plans in one process in random order per
// round, ~500-750 rounds, median of the per-round differences): M = 2048, 1024^2, r = 16 -0.22 /
// -0.28 ms of 16.2 at p = 0.05 (float32), -0.17 ms at p = 0.1, -0.20 ms of 18.1 at p = 0.05 with
// bfloat16 x and float32 adapters; 512 x 2048^2, p = 0.05 -0.12 ms; 2048 x 768^2, r = 8, p = 0.1
// -0.04 ms. The kernel runs at about small_gemm's rate on these thin shapes (~20 flop / cycle /
// core): what it saves is the dropout pass over memory. Without dropout there is no such pass
// and small_gemm's products on x itself were faster (+0.20 / +0.15 ms through this kernel at p =
// 0: 1024^2, 512 x 2048^2), so it runs only under dropout.
// AVX-512 only. An AVX2 build (8-float vectors in 16 registers: ranks up to 8) gained 0.10 ms
// at M = 2048, 1024^2, r = 8, p = 0.05 on a Xeon capped at AVX2, but lost to small_gemm's
// products and the dropout pass on a real AVX2 CPU, a Zen 3 EPYC (same method): +0.49 ms of ~32
// there, +0.13 ms at r = 4, +0.21 ms at 512 x 2048^2, r = 8, +0.09 ms at 2048 x 768^2, r = 8, p =
// 0.1 (and +1.2 to +1.5 ms with its vmaskmov loads and stores, which AMD CPUs microcode).
#include "lora_linear_blocks.h"

#include "dropout_mask_simd.h"

namespace fastlora {
namespace lora_cpu {

#if FASTLORA_AVX512_ROWS
namespace {

struct XSideArgs {
  const float* x;
  int64_t ldx;
  const float* g;
  int64_t ldg;
  const float* a;  // lora_A, r x K, rows contiguous
  int64_t r, K, n;
  const uint32_t* row_in;  // per row: its row hash (the mask's input at column 0)
  const DropoutParams* d;
  float* gx;  // null: no dX term
  int64_t ldgx;
  float* pa;  // r x K, rows contiguous
};

// Rows walked down one vector of columns before the next. Each row's lines lie in a different
// page: walking down a whole block (64 rows at 1024 columns) missed the TLB and the prefetchers
// on every load, and the backward at M = 2048, 1024^2, r = 16 took ~1 ms longer than through
// small_gemm (interleaved medians); 8 or 16 rows were faster than small_gemm, 32 about even. The
// d lora_A partials are loaded and stored once per sub-block and vector.
constexpr int64_t kSubRows = 16;

// The vector of columns k0 .. k0 + kLanes - 1 of the rows of p, at rank RC = p.r.
struct Avx512 {
  static constexpr int kLanes = 16;
  template <int RC, bool kGx>
  FASTLORA_AVX512_TARGET static void columns(const XSideArgs& p, int64_t k0) {
    const __mmask16 valid = avx512::lanes(p.K - k0);
    alignas(64) float at[RC][16];
    for (int j = 0; j < RC; ++j) _mm512_store_ps(at[j], _mm512_maskz_loadu_ps(valid, p.a + j * p.K + k0));
    __m512 acc[RC];  // fully unrolled loops only, so that GCC keeps the array in registers
#pragma GCC unroll 16
    for (int j = 0; j < RC; ++j) acc[j] = _mm512_maskz_loadu_ps(valid, p.pa + j * p.K + k0);
    const __m512i lane_in = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                               _mm512_set1_epi32(static_cast<int>(kGolden32)));
    const uint32_t col_in = static_cast<uint32_t>(k0) * kGolden32;
    const __m512 sv = _mm512_set1_ps(static_cast<float>(p.d->scale));
    for (int64_t i = 0; i < p.n; ++i) {
      const __m512i in = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(p.row_in[i] + col_in)), lane_in);
      const __m512 m = _mm512_maskz_mov_ps(mask_keep_avx512(in, p.d->seed_hi, p.d->threshold), sv);
      const __m512 xd = _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, p.x + i * p.ldx + k0), m);
      __m512 dx0 = _mm512_setzero_ps(), dx1 = _mm512_setzero_ps();  // two sums: half the dependent chain
      const float* gi = p.g + i * p.ldg;
      // The A tile is read from L1 in every row: the empty asm hides that its address is
      // loop-invariant, or GCC keeps the tile in 16 registers and moves the partials to the stack.
      const float* atp = &at[0][0];
      asm("" : "+r"(atp));
#pragma GCC unroll 16
      for (int j = 0; j < RC; ++j) {
        const __m512 gb = _mm512_set1_ps(gi[j]);
        acc[j] = _mm512_fmadd_ps(gb, xd, acc[j]);
        if constexpr (kGx) {
          if (j % 2 == 0) {
            dx0 = _mm512_fmadd_ps(gb, _mm512_load_ps(atp + 16 * j), dx0);
          } else {
            dx1 = _mm512_fmadd_ps(gb, _mm512_load_ps(atp + 16 * j), dx1);
          }
        }
      }
      if constexpr (kGx) {
        const __m512 dx = _mm512_add_ps(dx0, dx1);
        _mm512_mask_storeu_ps(p.gx + i * p.ldgx + k0, valid, _mm512_mul_ps(dx, m));
      }
    }
#pragma GCC unroll 16
    for (int j = 0; j < RC; ++j) _mm512_mask_storeu_ps(p.pa + j * p.K + k0, valid, acc[j]);
  }
};

template <class Isa, int RC>
void columns_of(const XSideArgs& p, int64_t k0) {
  if (p.gx != nullptr) return Isa::template columns<RC, true>(p, k0);
  return Isa::template columns<RC, false>(p, k0);
}

// columns_of<Isa, r> for 1 <= r <= sizeof...(RC).
template <class Isa, int... RC>
void columns_of_rank(int r, const XSideArgs& p, int64_t k0, std::integer_sequence<int, RC...>) {
  ((r == RC + 1 ? (columns_of<Isa, RC + 1>(p, k0), 0) : 0), ...);
}

template <class Isa, int kMaxRank>
void x_side(const XSideArgs& p) {
  for (int64_t i0 = 0; i0 < p.n; i0 += kSubRows) {
    XSideArgs q = p;
    q.n = std::min(kSubRows, p.n - i0);
    q.x += i0 * p.ldx;
    q.g += i0 * p.ldg;
    if (q.gx != nullptr) q.gx += i0 * p.ldgx;
    q.row_in += i0;
    for (int64_t k0 = 0; k0 < p.K; k0 += Isa::kLanes) {
      columns_of_rank<Isa>(static_cast<int>(p.r), q, k0, std::make_integer_sequence<int, kMaxRank>());
    }
  }
}

}  // namespace
#endif

// Ranks above this (which would need the partials of two passes over the ranks, a row's dropped
// x, multipliers and partial dX kept in L1 between them) measured slower than small_gemm: r = 32
// at M = 2048, 1024^2, p = 0.05 (LoRA part of the backward 4.1 against 4.6 ms; the same two-pass
// plan at r = 16 in 8-float vectors, under the AVX2 caps: 3.09 against 3.34 ms).
constexpr int64_t kXSideMaxRank = 16;

// 0 where the kernel does not run: below AVX-512 (see the header comment).
static int64_t x_side_max_rank() {
#if FASTLORA_AVX512_ROWS
  if (small_gemm_isa() >= 4) return kXSideMaxRank;
#endif
  return 0;
}

bool lora_bwd_x_side_f32(const float* x, int64_t ldx, const float* g, int64_t ldg, const float* a, int64_t r,
                         int64_t K, int64_t n, int64_t row0, const DropoutParams& d, float* gx, int64_t ldgx,
                         float* pa) {
#if FASTLORA_AVX512_ROWS
  if (!d.active || r < 1 || r > x_side_max_rank()) return false;
  std::vector<uint32_t> row_in(n);
  for (int64_t i = 0; i < n; ++i) row_in[i] = d.row_hash(row0 + i);
  const XSideArgs p{x, ldx, g, ldg, a, r, K, n, row_in.data(), &d, gx, ldgx, pa};
  x_side<Avx512, kXSideMaxRank>(p);
  return true;
#else
  return false;
#endif
}

}  // namespace lora_cpu
}  // namespace fastlora
