// rsvd's passes over a dense A with a bfloat16 sketch, on CPUs with AVX512-BF16: every
// product with A in small_gemm_bf16 on blocks of A converted to bfloat16 as they are read, so
// no bfloat16 copy of A is ever made.
//
// A copy (half of A's float32 bytes: 32 MiB for 4096 x 4096) cost more than its conversion:
// fresh pages are zeroed by the kernel (~14 ms through 4 KiB faults, ~4.5 ms into transparent
// huge pages), and huge pages asked for with madvise stalled in direct compaction when memory
// was fragmented: an rsvd called between other work (a training step) took 113-139 ms at rank
// 32 where back-to-back calls took 35 ms, against 73 ms for torch.svd_lowrank (2 cores, Zen 4).
// Converting again in every pass instead costs a float32 read of A per pass, which the
// products' arithmetic (l multiply-adds per element) hides.
//
// A X: blocks of A's rows, converted (k = n runs along them, in pairs as they lie).
// A^T Y: k = m runs down A's columns, so pairs are two rows' values side by side: strips of A's
// columns (the output's rows), k in chunks of row pairs interleaved as they are converted.
#include "lowrank_sketch_bf16.h"

#include <ATen/Parallel.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <functional>
#include <vector>

#include "cpu_utils.h"
#include "small_gemm.h"

namespace fastlora {
namespace {

// The sum of the squares of n bfloat16 values: float sums in 16 lanes, so that the loop
// vectorises under strict floating point (inlined into the cloned loops below).
inline float sum_squares(const uint16_t* __restrict v, int64_t n) {
  float part[16] = {}, f[16];
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int j = 0; j < 16; ++j) f[j] = bf16_bits_to_float(v[i + j]);
    for (int j = 0; j < 16; ++j) part[j] += f[j] * f[j];
  }
  for (; i < n; ++i) part[0] += bf16_bits_to_float(v[i]) * bf16_bits_to_float(v[i]);
  float acc = 0.0f;
  for (int j = 0; j < 16; ++j) acc += part[j];
  return acc;
}

// dst = bfloat16(src), n values; with squares, returns the sum of the squares of the rounded
// values.
FASTLORA_VECTOR_CLONES
float round_row(const float* __restrict src, uint16_t* __restrict dst, int64_t n, bool squares) {
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16_bits(src[i]);
  return squares ? sum_squares(dst, n) : 0.0f;
}

// The same for values already in bfloat16 (dst = src, when dst is given).
FASTLORA_VECTOR_CLONES
float copy_row(const uint16_t* __restrict src, uint16_t* __restrict dst, int64_t n, bool squares) {
  if (dst != nullptr) std::copy(src, src + n, dst);
  return squares ? sum_squares(src, n) : 0.0f;
}

// dst[j] = bfloat16(lo[j]) | bfloat16(hi[j]) << 16 (hi null: zeros): two rows' values as pairs.
FASTLORA_VECTOR_CLONES
void pair_rows(const float* __restrict lo, const float* __restrict hi, uint32_t* __restrict dst, int64_t n) {
  if (hi == nullptr) {
    for (int64_t j = 0; j < n; ++j) dst[j] = float_to_bf16_bits(lo[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) {
      dst[j] = static_cast<uint32_t>(float_to_bf16_bits(lo[j])) |
               (static_cast<uint32_t>(float_to_bf16_bits(hi[j])) << 16);
    }
  }
}

FASTLORA_VECTOR_CLONES
void pair_rows(const uint16_t* __restrict lo, const uint16_t* __restrict hi, uint32_t* __restrict dst, int64_t n) {
  if (hi == nullptr) {
    for (int64_t j = 0; j < n; ++j) dst[j] = lo[j];
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<uint32_t>(lo[j]) | (static_cast<uint32_t>(hi[j]) << 16);
  }
}

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__)
// The float32 A's conversions in the instruction itself: vcvtneps2bf16 rounds 16 values to
// nearest even, as float_to_bf16_bits does, where the integer emulation above (~20 vector
// instructions per 16 values) made the A X pass compute-bound: 3.7-4.1 ms of a 4.0 ms pass at
// 4096^2, its AMX products 2.35 ms on their own, while two threads read A's 64 MiB in 1.4 ms
// (Xeon). The instruction treats float32 denormals (|x| < 1.2e-38) as zero where
// float_to_bf16_bits keeps them, which changes no result: the products that read the rounded
// values (vdpbf16ps, tdpbf16ps) treat bfloat16 denormals as zero too, and a denormal's square
// underflows in the float32 sum of squares. A NaN keeps its sign and payload (A's NaN / Inf are
// reported after the first product either way). Only reached where small_gemm_bf16_native()
// holds: the CPU has AVX512-BF16.
#define FASTLORA_CVT_TARGET __attribute__((target("arch=x86-64-v4,avx512bf16")))
constexpr bool kNativeConvert = true;

FASTLORA_CVT_TARGET inline __m256i cvt16(const float* src, __mmask16 mask) {
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, src)));
}

FASTLORA_CVT_TARGET void round_row_native(const float* __restrict src, uint16_t* __restrict dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), cvt16(src + i, 0xffff));
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm256_mask_storeu_epi16(dst + i, m, cvt16(src + i, m));
  }
}

// pair_rows(float) with the conversions above: dst[j] = bf16(lo[j]) | bf16(hi[j]) << 16.
FASTLORA_CVT_TARGET void pair_rows_native(const float* __restrict lo, const float* __restrict hi,
                                          uint32_t* __restrict dst, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = static_cast<__mmask16>(n - j >= 16 ? 0xffff : (1u << (n - j)) - 1);
    __m512i pairs = _mm512_cvtepu16_epi32(cvt16(lo + j, m));
    if (hi != nullptr) pairs = _mm512_or_si512(pairs, _mm512_slli_epi32(_mm512_cvtepu16_epi32(cvt16(hi + j, m)), 16));
    _mm512_mask_storeu_epi32(dst + j, m, pairs);
  }
}
#else
constexpr bool kNativeConvert = false;
void round_row_native(const float*, uint16_t*, int64_t) {}
void pair_rows_native(const float*, const float*, uint32_t*, int64_t) {}
#endif

const uint16_t* bits(const at::BFloat16* p) { return reinterpret_cast<const uint16_t*>(p); }

// The rows x l float32 matrix x (row-major) as small_gemm_bf16's B operand, its rows in pairs.
std::vector<uint32_t> pack_operand(const float* x, int64_t rows, int64_t l) {
  std::vector<uint32_t> out(ceil_div(rows, 2) * l);
  for (int64_t p = 0; 2 * p < rows; ++p) {
    pair_rows(x + 2 * p * l, 2 * p + 1 < rows ? x + (2 * p + 1) * l : nullptr, out.data() + p * l, l);
  }
  return out;
}

// out (m x l) = A X for one m x n matrix a, X packed (pack_operand); returns the sum of the
// squares of A's bfloat16 values when `squares`. A bfloat16 A with an even n is read in place;
// otherwise blocks of rows are converted (padded to an even length with a zero).
template <typename T>
double product_rows(const T* a, int64_t m, int64_t n, const uint32_t* xp, int64_t l, float* out, bool squares) {
  // A block of 16 rows of 4096 values: 256 KiB of float32 fetched into L2 while the previous
  // block's products run, 128 KiB converted.
  constexpr int64_t kRows = 16;
  const int64_t n2 = ceil_div(n, 2), ld = tile_row_stride(2 * n2, sizeof(uint16_t));
  constexpr bool in_place_ok = std::is_same_v<T, at::BFloat16>;
  const bool in_place = in_place_ok && n % 2 == 0;
  return at::parallel_reduce(
      0, ceil_div(m, kRows), 1, 0.0,
      [&](int64_t b0, int64_t b1, double acc) {
        std::vector<uint16_t> buf(in_place ? 0 : kRows * ld, 0);  // an odd n's padding stays zero
        for (int64_t blk = b0; blk < b1; ++blk) {
          const int64_t r0 = blk * kRows, rows = std::min(kRows, m - r0);
          const uint16_t* block;
          int64_t lda;
          if constexpr (std::is_same_v<T, float>) {
            for (int64_t i = 0; i < rows; ++i) {
              uint16_t* row = buf.data() + i * ld;
              if constexpr (kNativeConvert) {
                round_row_native(a + (r0 + i) * n, row, n);
                if (squares) acc += copy_row(row, nullptr, n, true);
              } else {
                acc += round_row(a + (r0 + i) * n, row, n, squares);
              }
            }
            block = buf.data();
            lda = ld;
          } else {
            if (!in_place || squares) {
              for (int64_t i = 0; i < rows; ++i) {
                acc += copy_row(bits(a + (r0 + i) * n), in_place ? nullptr : buf.data() + i * ld, n, squares);
              }
            }
            block = in_place ? bits(a + r0 * n) : buf.data();
            lda = in_place ? n : ld;
          }
          PrefetchRegion next;  // this thread's next block, when it converts one
          if (!in_place && blk + 1 < b1) {
            const int64_t row_bytes = n * int64_t(sizeof(T));
            next = {a + (r0 + kRows) * n, std::min(kRows, m - r0 - kRows), row_bytes, row_bytes};
          }
          small_gemm_bf16(rows, l, n2, 1.0f, block, lda, 2, xp, l, /*accumulate=*/false, out + r0 * l, l, next);
        }
        return acc;
      },
      std::plus<double>());
}

// out (n x l) = A^T Y for one m x n matrix a, Y packed (pack_operand, m rows): strips of A's
// columns, down which k runs in chunks of row pairs interleaved into P as they are converted.
// With AMX tiles (yt given: Y^T, l x m, its pairs along the rows) the strip's product is taken
// transposed, out^T = Y^T A: P is then the tiles' B operand as it is built, where as the A
// operand (pair-major, a_col = 2 w) it would run in vdpbf16ps; the l x w result is transposed
// into out once per strip.
template <typename T>
void product_cols(const T* a, int64_t m, int64_t n, const uint32_t* yp, const uint32_t* yt, int64_t ldyt, int64_t l,
                  float* out) {
  constexpr int64_t kPairs = 32;  // a chunk: 64 rows of a strip (P: 128 KiB at 1024 columns)
  const int64_t m2 = ceil_div(m, 2);
  // Strips of up to 1024 columns, narrower for small n so that every thread gets some. Each
  // row's part of a strip is one run of memory that the prefetcher must find anew: at 256
  // columns (1 KiB) the conversion took as long as the products.
  const int64_t width = std::clamp<int64_t>(ceil_div(ceil_div(n, at::get_num_threads()), 16) * 16, 16, 1024);
  const int64_t ldp = tile_row_stride(width, sizeof(uint32_t));  // P's and out_t's row stride
  at::parallel_for(0, ceil_div(n, width), 1, [&](int64_t s0, int64_t s1) {
    std::vector<uint32_t> P(kPairs * ldp);
    std::vector<float> out_t(yt != nullptr ? l * ldp : 0);
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t c0 = s * width, w = std::min(width, n - c0);
      for (int64_t p0 = 0; p0 < m2; p0 += kPairs) {
        const int64_t kp = std::min(kPairs, m2 - p0);
        for (int64_t p = 0; p < kp; ++p) {
          const int64_t row = 2 * (p0 + p);
          const T* lo = a + row * n + c0;
          const T* hi = row + 1 < m ? lo + n : nullptr;
          if constexpr (std::is_same_v<T, float> && kNativeConvert) {
            pair_rows_native(lo, hi, P.data() + p * ldp, w);
          } else if constexpr (std::is_same_v<T, float>) {
            pair_rows(lo, hi, P.data() + p * ldp, w);
          } else {
            pair_rows(bits(lo), hi ? bits(hi) : nullptr, P.data() + p * ldp, w);
          }
        }
        // The next chunk of this thread's strips, fetched while this one's products run.
        PrefetchRegion next;
        const int64_t row_bytes = n * int64_t(sizeof(T));
        if (p0 + kPairs < m2) {
          const int64_t r = 2 * (p0 + kPairs);
          next = {a + r * n + c0, std::min(2 * kPairs, m - r), w * int64_t(sizeof(T)), row_bytes};
        } else if (s + 1 < s1) {
          next = {a + c0 + width, std::min(2 * kPairs, m), std::min(width, n - c0 - width) * int64_t(sizeof(T)),
                  row_bytes};
        }
        if (yt != nullptr) {  // out^T += Y^T[:, chunk] @ P
          small_gemm_bf16(l, w, kp, 1.0f, reinterpret_cast<const uint16_t*>(yt + p0), 2 * ldyt, 2, P.data(), ldp,
                          /*accumulate=*/p0 > 0, out_t.data(), ldp, next);
        } else {  // P as the A operand: output row j (column c0 + j of A), pair p at P[p * ldp + j]
          small_gemm_bf16(w, l, kp, 1.0f, reinterpret_cast<const uint16_t*>(P.data()), 2, 2 * ldp, yp + p0 * l, l,
                          /*accumulate=*/p0 > 0, out + c0 * l, l, next);
        }
      }
      if (m2 == 0) {
        std::fill(out + c0 * l, out + (c0 + w) * l, 0.0f);
      } else if (yt != nullptr) {
        transpose_into(out_t.data(), l, w, ldp, out + c0 * l, l);
      }
    }
  });
}

}  // namespace

bool bf16_sketch_streams(const at::Tensor& A) { return A.device().is_cpu() && small_gemm_bf16_native(); }

at::Tensor bf16_sketch_product(const at::Tensor& A, const at::Tensor& X, bool transpose, at::Tensor* norm2) {
  TORCH_INTERNAL_ASSERT(bf16_sketch_streams(A) && A.is_contiguous() && X.scalar_type() == at::kFloat &&
                        (A.scalar_type() == at::kFloat || A.scalar_type() == at::kBFloat16) && (!norm2 || !transpose));
  const int64_t m = A.size(-2), n = A.size(-1), mats = A.numel() / (m * n), l = X.size(-1);
  const int64_t rows = transpose ? n : m, depth = transpose ? m : n;
  TORCH_INTERNAL_ASSERT(X.size(-2) == depth && X.numel() == mats * depth * l);
  const at::Tensor x = X.contiguous();
  std::vector<int64_t> out_sizes(A.sizes().begin(), A.sizes().end() - 2);
  const std::vector<int64_t> batch = out_sizes;
  out_sizes.insert(out_sizes.end(), {rows, l});
  at::Tensor out = at::empty(out_sizes, x.options());
  at::Tensor sums;
  if (norm2) sums = at::empty({mats}, x.options().dtype(at::kDouble));
  for (int64_t b = 0; b < mats; ++b) {
    const std::vector<uint32_t> xp = pack_operand(x.const_data_ptr<float>() + b * depth * l, depth, l);
    float* po = out.mutable_data_ptr<float>() + b * rows * l;
    const bool f32 = A.scalar_type() == at::kFloat;
    const int64_t off = b * m * n;
    if (transpose) {
      std::vector<uint32_t> yt;  // Y^T in pairs along its rows, for AMX tiles (product_cols)
      const int64_t ldyt = tile_row_stride(ceil_div(depth, 2), sizeof(uint32_t));
      if (small_gemm_bf16_amx()) {
        yt.resize(l * ldyt);
        transpose_into(xp.data(), ceil_div(depth, 2), l, l, yt.data(), ldyt);
      }
      const uint32_t* ytp = yt.empty() ? nullptr : yt.data();
      if (f32) {
        product_cols(A.const_data_ptr<float>() + off, m, n, xp.data(), ytp, ldyt, l, po);
      } else {
        product_cols(A.const_data_ptr<at::BFloat16>() + off, m, n, xp.data(), ytp, ldyt, l, po);
      }
    } else {
      const double s = f32 ? product_rows(A.const_data_ptr<float>() + off, m, n, xp.data(), l, po, norm2 != nullptr)
                           : product_rows(A.const_data_ptr<at::BFloat16>() + off, m, n, xp.data(), l, po,
                                          norm2 != nullptr);
      if (norm2) sums.mutable_data_ptr<double>()[b] = s;
    }
  }
  if (norm2) *norm2 = sums.view(batch);
  return out;
}

}  // namespace fastlora
