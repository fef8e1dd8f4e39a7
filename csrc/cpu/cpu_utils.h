// Small helpers shared by the CPU kernels of the LoRA op families.
#pragma once

#include <ATen/ATen.h>

#include <type_traits>

namespace fastlora {

// t itself when its rows are contiguous (last stride 1: the BLAS takes any leading stride),
// otherwise a contiguous copy.
inline at::Tensor row_major(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// Accumulation type of a kernel on scalar_t: float64 for double, float32 otherwise (also for
// float16 / bfloat16, which are rounded once at the end, as in the reference).
template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

}  // namespace fastlora
