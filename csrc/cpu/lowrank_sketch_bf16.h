// rsvd's products with a dense A when it sketches in bfloat16 on a CPU with AVX512-BF16
// (lowrank_sketch_bf16.cpp): A is read where it lies, a block at a time, and never copied.
#pragma once

#include <ATen/ATen.h>

namespace fastlora {

// Whether bf16_sketch_product runs here: A on the CPU, small_gemm_bf16 running vdpbf16ps.
bool bf16_sketch_streams(const at::Tensor& A);

// A X (transpose = false) or A^T X (true) for a contiguous float32 or bfloat16 A (..., m, n)
// and a float32 X
// (..., depth, l), both with A's values and X's rounded to bfloat16 (as a product of the
// bfloat16 copies would), float32 sums: a float32 (..., rows, l) result. norm2, when given:
// set to the squared Frobenius norms of the bfloat16 values of A's matrices (float64,
// A's batch shape), from the same pass (transpose = false only).
at::Tensor bf16_sketch_product(const at::Tensor& A, const at::Tensor& X, bool transpose, at::Tensor* norm2);

}  // namespace fastlora
