#pragma once
// Dot products of a few float32 rows x against the rows of a weight W stored in float32 or
// bfloat16: out(j, i) += sum_k W(j, k) * x(i, k). The decode-sized LoRA forward's base product
// (base_few_rows) on AVX2 CPUs, where it is bound by arithmetic rather than by reading W:
// small_gemm's broadcast tiles ran it at ~40% of the FMA peak, and a bfloat16 W paid one more
// pass to convert each row to float32 first. Forward at M = 8, in = out = 4096, r = 16, 2
// threads of a Xeon capped at AVX2: bfloat16 6.3 -> 2.6 ms (6.7 -> 3.7 ms with W out of
// cache), float32 4.5 -> 3.3-3.8 ms (unchanged out of cache, where reading W bounds it).
//
// Here the products run along k: 16 weights per step are loaded (one 32-byte load of bfloat16,
// widened in registers by unpacking with zeros; or two of float32, regrouped by 128-bit halves)
// into two float32 vectors holding k = {0-3, 8-11} and {4-7, 12-15}, and x is stored in that
// order once per call (permute_rows_for_dot), so both weight dtypes run the same arithmetic in
// the same order: a bfloat16 W gives bitwise the float32 result on its float32 copy.
#include <cstdint>

namespace fastlora {
namespace lora_cpu {

// Whether rows_dot_add has its vector build at the kernel level in use (AVX2 + FMA, level 3;
// the AVX-512 levels keep small_gemm, which is faster there).
bool rows_dot_available();

// Columns of the permuted copy of a row of K values: K rounded up to whole groups of 16.
int64_t rows_dot_width(int64_t K);

// xp (m x rows_dot_width(K), row-major) = the rows of x (m x K, row stride ldx, unit column
// stride) with each group of 16 columns in the kernel's order, zero-padded.
void permute_rows_for_dot(const float* x, int64_t m, int64_t K, int64_t ldx, float* xp);

// out[j * ldo + i] += sum_k w[j * ldw + k] * x(i, k) for j < n, i < m, with xp from
// permute_rows_for_dot. Needs rows_dot_available(). The bfloat16 overload takes W's raw bits.
void rows_dot_add(const float* w, int64_t ldw, int64_t n, int64_t K, const float* xp, int64_t m, float* out,
                  int64_t ldo);
void rows_dot_add(const uint16_t* w, int64_t ldw, int64_t n, int64_t K, const float* xp, int64_t m, float* out,
                  int64_t ldo);

// out[i * ldo + k] += sum_{j < n} dyt[j * m + i] * w[j * ldw + k] for i < m and k0 <= k < k1
// (the decode-sized backward's dX += dY @ W, with dyt = dY^T, n x m) for a bfloat16 W (raw
// bits), widened in registers: W's rows in groups of 16 columns, each group's m x 16 sums in
// registers over chunks of rows. k0 must be a multiple of 16; k1 a multiple of 16 or K, the row
// length (the last partial group is read from tail, a zero-padded copy of W's columns past the
// last whole group, n x 16, from rows_axpy_tail; null when K % 16 == 0). A column's sum runs
// over the rows in the same order whatever the range, so splitting the columns between threads
// gives the same bits. Needs rows_dot_available().
void rows_axpy_add(const uint16_t* w, int64_t ldw, int64_t n, int64_t K, int64_t k0, int64_t k1,
                   const uint16_t* tail, const float* dyt, int64_t m, float* out, int64_t ldo);
// The zero-padded tail columns of W (n x 16) that rows_axpy_add reads when K % 16 != 0.
void rows_axpy_tail(const uint16_t* w, int64_t ldw, int64_t n, int64_t K, uint16_t* tail);

}  // namespace lora_cpu
}  // namespace fastlora
