// Argument checks shared by the LoRA op families (csrc/lora_linear.cpp, csrc/lora_grouped_linear.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <initializer_list>
#include <limits>
#include <optional>
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

// The LoRA branch's arguments against the base's (out_features, in_features): lora_A (r, in),
// lora_B (out, r), bias and lora_B_bias (out,), dropout_p in [0, 1], a finite scaling. Shared by
// the dense and the quantized-base LoRA families.
inline void check_lora_branch_shapes(const char* fn, int64_t in, int64_t out, const at::Tensor& lora_A,
                                     const at::Tensor& lora_B, const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& lora_B_bias, double dropout_p,
                                     double scaling) {
  TORCH_CHECK_VALUE(lora_A.dim() == 2 && lora_A.size(1) == in, fn,
                    ": lora_A must have shape (r, in_features=", in, "), got ", lora_A.sizes());
  const int64_t r = lora_A.size(0);
  TORCH_CHECK_VALUE(lora_B.dim() == 2 && lora_B.size(0) == out && lora_B.size(1) == r, fn,
                    ": lora_B must have shape (out_features=", out, ", r=", r, "), got ", lora_B.sizes());
  if (bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out, fn, ": bias must have shape (", out, ",), got ",
                      bias->sizes());
  }
  if (lora_B_bias) {
    TORCH_CHECK_VALUE(lora_B_bias->dim() == 1 && lora_B_bias->size(0) == out, fn,
                      ": lora_B_bias must have shape (", out, ",), got ", lora_B_bias->sizes());
  }
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p <= 1.0, fn, ": dropout_p must be in [0, 1], got ", dropout_p);
  TORCH_CHECK_VALUE(std::isfinite(scaling), fn, ": scaling must be finite, got ", scaling);
}

// The LoRA backward ops' grad_y (rows, out_features) and xa (rows, r), against x's rows: the
// shapes, grad_y in x's dtype, xa in the adapters'.
inline void check_lora_backward_inputs(const char* fn, const at::Tensor& x, const at::Tensor& grad_y,
                                       const at::Tensor& xa, const at::Tensor& lora_A, int64_t out) {
  const int64_t M = x.size(0), r = lora_A.size(0);
  TORCH_CHECK_VALUE(grad_y.dim() == 2 && grad_y.size(0) == M && grad_y.size(1) == out, fn,
                    ": grad_y must have shape (rows=", M, ", out_features=", out, "), got ", grad_y.sizes());
  TORCH_CHECK_VALUE(xa.dim() == 2 && xa.size(0) == M && xa.size(1) == r, fn, ": xa must have shape (rows=", M,
                    ", r=", r, "), got ", xa.sizes());
  check_float_like_x(fn, x, {{"grad_y", &grad_y}});
  check_adapter_dtypes(fn, x, {{"lora_A", &lora_A}, {"xa", &xa}});
}

// An explicit dropout seed is a one-element int64 tensor on the CPU or on x's device.
inline void check_seed(const char* fn, const std::optional<at::Tensor>& seed, const at::Device& device) {
  if (!seed) return;
  TORCH_CHECK_VALUE(seed->sym_numel() == 1 && seed->scalar_type() == at::kLong &&
                        (seed->device().is_cpu() || seed->device() == device),
                    fn, ": seed must be a one-element int64 tensor on the CPU or on x's device (", device, "), got ",
                    seed->scalar_type(), " ", seed->sizes(), " on ", seed->device());
}

// The public LoRA ops' dropout seed: the given one (checked by the caller), else drawn on x's
// device from torch's default generator for it when dropout is active (so torch.manual_seed
// makes runs reproducible), else 0. On a GPU the seed so stays on the device: the kernels read
// it there, no call reads it back to the host, and a captured CUDA graph draws a new one on
// every replay (the generator's philox offset advances).
inline at::Tensor dropout_seed(const std::optional<at::Tensor>& seed, double p, const at::Device& device) {
  if (seed) return seed->reshape({});
  const auto opts = at::TensorOptions().dtype(at::kLong).device(device);
  if (p > 0.0) return at::randint(std::numeric_limits<int64_t>::max(), {}, opts);
  return at::zeros({}, opts);
}

// x (..., in_features) as (rows, in_features). reshape({-1, 0}) is ambiguous when in_features
// is 0: the row count is given then (symbolic sizes, so torch.compile's dynamic shapes trace it).
inline at::Tensor rows_2d(const at::Tensor& x) {
  if (x.sym_size(-1) == 0) {
    c10::SymInt rows = 1;
    for (int64_t d = 0; d + 1 < x.dim(); ++d) rows = rows * x.sym_size(d);
    return x.reshape_symint({rows, 0});
  }
  return x.reshape({-1, x.size(-1)});
}

}  // namespace fastlora
