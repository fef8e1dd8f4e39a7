#pragma once
// Dot products of a few float32 rows x against the rows of a weight W stored in float32 or
// bfloat16: out(j, i) += sum_k W(j, k) * x(i, k). Also the float32 shrink at ranks of up to
// half a vector (rows_dot_add_tall: a block of the input's rows as W, lora_A's r rows as x).
// The decode-sized LoRA forward's base product (base_few_rows) on AVX2 CPUs, where it is bound
// by arithmetic rather than by reading W: small_gemm's broadcast tiles ran it at ~40% of the
// FMA peak, and a bfloat16 W paid one more pass to convert each row to float32 first. Forward at M = 8, in = out = 4096, r = 16, 2
// threads of a Xeon capped at AVX2: bfloat16 6.3 -> 2.6 ms (6.7 -> 3.7 ms with W out of
// cache), float32 4.5 -> 3.3-3.8 ms (unchanged out of cache, where reading W bounds it).
//
// Here the products run along k: 16 weights per step are loaded (one 32-byte load of bfloat16,
// widened in registers by unpacking with zeros; or two of float32, regrouped by 128-bit halves)
// into two float32 vectors holding k = {0-3, 8-11} and {4-7, 12-15}, and x is stored in that
// order once per call (permute_rows_for_dot), so both weight dtypes run the same arithmetic in
// the same order: a bfloat16 W gives bitwise the float32 result on its float32 copy. Where
// small_gemm runs its AVX-512 build the 16 weights are one 16-lane vector in natural order (x
// too), twice the multiply-adds per instruction (float16 at M = 8, 4096^2 on a Xeon: forward
// 3.4 -> 2.7 ms, backward 2.45 -> 1.74 ms); the weight dtypes agree bitwise there as well.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace fastlora {
namespace lora_cpu {

// Whether the kernels below can run at the kernel level in use (AVX2 + FMA + F16C: level 3 and
// up; the AVX-512 build from level 4). permute_rows_for_dot and the products must run at the
// same level. Callers take them for 16-bit weights at every such level (widening in registers
// beats converting rows for small_gemm there too: a float16 decode forward at M = 8, 4096^2,
// took 4.5 ms through AVX-512 small_gemm on converted rows, 2.7 ms here), and for a float32 W at
// level 3 only (AVX-512 small_gemm is as fast on float32 rows).
bool rows_dot_available();

// Columns of the permuted copy of a row of K values: K rounded up to whole groups of 16.
int64_t rows_dot_width(int64_t K);

// xp (m x rows_dot_width(K), row-major) = the rows of x (m x K, row stride ldx, unit column
// stride) with each group of 16 columns in the kernel's order, zero-padded.
void permute_rows_for_dot(const float* x, int64_t m, int64_t K, int64_t ldx, float* xp);

// out[j * ldo + i] += sum_k w[j * ldw + k] * x(i, k) for j < n, i < m, with xp from
// permute_rows_for_dot. Needs rows_dot_available(). A float16 W (F16C conversions) runs the
// same arithmetic too.
void rows_dot_add(const float* w, int64_t ldw, int64_t n, int64_t K, const float* xp, int64_t m, float* out,
                  int64_t ldo);
void rows_dot_add(const c10::BFloat16* w, int64_t ldw, int64_t n, int64_t K, const float* xp, int64_t m, float* out,
                  int64_t ldo);
void rows_dot_add(const c10::Half* w, int64_t ldw, int64_t n, int64_t K, const float* xp, int64_t m, float* out,
                  int64_t ldo);
// rows_dot_add on a float32 w of many rows against few x rows (the LoRA shrink: a block of the
// input's rows against lora_A's r rows): the AVX-512 build takes w four rows at a time (4 x 4
// accumulators; the decode product keeps two), the AVX2 build is rows_dot_add's.
void rows_dot_add_tall(const float* w, int64_t ldw, int64_t n, int64_t K, const float* xp, int64_t m, float* out,
                       int64_t ldo);

// out[i * ldo + k] += sum_{j < n} dyt[j * m + i] * w[j * ldw + k] for i < m and k0 <= k < k1
// (the decode-sized backward's dX += dY @ W, with dyt = dY^T, n x m) for a bfloat16 or float16
// W, widened in registers: W's rows in groups of 16 columns, each group's m x 16 sums in
// registers over chunks of rows. k0 must be a multiple of 16; k1 a multiple of 16 or K, the row
// length (the last partial group is read from tail, a zero-padded copy of W's columns past the
// last whole group, n x 16, from rows_axpy_tail; null when K % 16 == 0). A column's sum runs
// over the rows in the same order whatever the range, so splitting the columns between threads
// gives the same bits. Needs rows_dot_available().
void rows_axpy_add(const c10::BFloat16* w, int64_t ldw, int64_t n, int64_t K, int64_t k0, int64_t k1,
                   const c10::BFloat16* tail, const float* dyt, int64_t m, float* out, int64_t ldo);
void rows_axpy_add(const c10::Half* w, int64_t ldw, int64_t n, int64_t K, int64_t k0, int64_t k1,
                   const c10::Half* tail, const float* dyt, int64_t m, float* out, int64_t ldo);
// The zero-padded tail columns of a 16-bit W (n x 16) that rows_axpy_add reads when K % 16 != 0.
template <typename HT>
void rows_axpy_tail(const HT* w, int64_t ldw, int64_t n, int64_t K, HT* tail);

}  // namespace lora_cpu
}  // namespace fastlora
