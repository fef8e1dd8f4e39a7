// Argument checks of the lora_linear family's kernel ops (lora_linear_fwd / lora_linear_bwd).
// Every kernel runs them first (the C++ CPU kernels directly; the CUDA and reference kernels,
// registered from Python, through the catch-all ops fastlora::_lora_linear_fwd_check / _bwd_check),
// so a raw call with mismatched shapes, dtypes or devices is a clear error, never an
// out-of-bounds read. Defined in csrc/lora_linear.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastlora {

void check_lora_linear_fwd_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, double dropout_p,
                                const at::Tensor& seed, const std::optional<at::Tensor>& lora_B_bias);

void check_lora_linear_bwd_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa,
                                double scaling, double dropout_p, const at::Tensor& seed);

}  // namespace fastlora
