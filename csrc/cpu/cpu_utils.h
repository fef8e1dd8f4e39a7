// Small helpers shared by the CPU kernels of the LoRA op families.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace fastlora {

// t itself when its rows are contiguous (last stride 1: the BLAS takes any leading stride),
// otherwise a contiguous copy.
inline at::Tensor row_major(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// Accumulation type of a kernel on scalar_t: float64 for double, float32 otherwise (also for
// float16 / bfloat16, which are rounded once at the end, as in the reference).
template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// dst[j * ld_dst + i] = src[i * ld_src + j] for a rows x cols source, in 64 x 64 blocks so both
// sides stay in L1 (ATen's strided copy took ~0.1 ms for a 16 x 4096 LoRA matrix, comparable to
// the LoRA work of a decode-sized batch).
template <typename T>
void transpose_into(const T* src, int64_t rows, int64_t cols, int64_t ld_src, T* dst, int64_t ld_dst) {
  constexpr int64_t kB = 64;
  for (int64_t i0 = 0; i0 < rows; i0 += kB) {
    const int64_t i1 = std::min(rows, i0 + kB);
    for (int64_t j0 = 0; j0 < cols; j0 += kB) {
      const int64_t j1 = std::min(cols, j0 + kB);
      for (int64_t j = j0; j < j1; ++j) {
        for (int64_t i = i0; i < i1; ++i) dst[j * ld_dst + i] = src[i * ld_src + j];
      }
    }
  }
}

}  // namespace fastlora
