// Argument checks shared by the LoRA op families (csrc/lora_linear.cpp, csrc/lora_grouped.cpp).
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <utility>

namespace fastlora {

// x is float32/float64/float16/bfloat16, and every given tensor (name, optional tensor) has
// x's dtype and device: errors name the op and the argument.
inline void check_float_like_x(const char* fn, const at::Tensor& x,
                               std::initializer_list<std::pair<const char*, const at::Tensor*>> tensors) {
  const auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, fn,
                   ": x must be float32, float64, float16 or bfloat16, got ", dt);
  for (const auto& [name, t] : tensors) {
    if (t == nullptr) continue;
    TORCH_CHECK_TYPE(t->scalar_type() == dt, fn, ": ", name, " has dtype ", t->scalar_type(), " but x has ", dt,
                     " (cast the LoRA weights or the input first)");
    TORCH_CHECK_VALUE(t->device() == x.device(), fn, ": ", name, " is on ", t->device(), " but x is on ", x.device());
  }
}

}  // namespace fastlora
