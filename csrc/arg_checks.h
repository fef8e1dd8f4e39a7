// Argument checks shared by the LoRA op families (csrc/lora_linear.cpp, csrc/lora_grouped_linear.cpp).
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

// The LoRA linear family's adapter dtypes (PEFT's rule): lora_A, lora_B, lora_B_bias (and xa =
// dropout(x) @ lora_A^T) share lora_A's dtype, which is x's, or float32 when x is float16 /
// bfloat16: PEFT keeps adapters in float32 on a half-precision model by default
// (autocast_adapter_dtype=True) and runs the LoRA branch in float32 on x cast to it.
inline void check_adapter_dtypes(const char* fn, const at::Tensor& x,
                                 std::initializer_list<std::pair<const char*, const at::Tensor*>> adapters) {
  const auto dt = x.scalar_type();
  const at::Tensor* first = adapters.begin()->second;
  const auto adt = first->scalar_type();
  const bool ok = adt == dt || (adt == at::kFloat && (dt == at::kHalf || dt == at::kBFloat16));
  TORCH_CHECK_TYPE(ok, fn, ": ", adapters.begin()->first, " has dtype ", adt, " but x has ", dt,
                   " (the LoRA weights must have x's dtype, or float32 when x is float16 / bfloat16; "
                   "cast the LoRA weights or the input first)");
  for (const auto& [name, t] : adapters) {
    if (t == nullptr) continue;
    TORCH_CHECK_TYPE(t->scalar_type() == adt, fn, ": ", name, " has dtype ", t->scalar_type(), " but ",
                     adapters.begin()->first, " has ", adt, " (the LoRA weights share one dtype)");
    TORCH_CHECK_VALUE(t->device() == x.device(), fn, ": ", name, " is on ", t->device(), " but x is on ", x.device());
  }
}

}  // namespace fastlora
