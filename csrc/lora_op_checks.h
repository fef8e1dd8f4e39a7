// Argument checks of the LoRA families' kernel ops (lora_linear_fwd / _bwd, lora_grouped_linear_fwd
// / _bwd, lora_quantized_linear_fwd / _bwd, dequantize). Every kernel runs them first (the C++ CPU
// kernels directly; the CUDA and reference kernels, registered from Python, through the
// catch-all ops fastlora::_<op>_check), so a raw call with mismatched shapes, dtypes or devices
// is a clear error, never an out-of-bounds read. Defined in csrc/lora_linear.cpp,
// csrc/lora_grouped_linear.cpp and csrc/lora_quantized_linear.cpp.
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

void check_lora_grouped_fwd_args(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                 const at::Tensor& lora_B, const at::Tensor& scalings, const at::Tensor& ranks,
                                 const at::Tensor& row_adapter);

void check_lora_grouped_bwd_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& scalings,
                                 const at::Tensor& ranks, const at::Tensor& row_adapter);

// The quantized-base family (csrc/lora_quantized_linear.cpp).
void check_lora_quantized_fwd_args(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& absmax,
                                   const at::Tensor& code, int64_t blocksize, at::IntArrayRef weight_shape,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                   const at::Tensor& lora_B, double scaling, double dropout_p, const at::Tensor& seed,
                                   const std::optional<at::Tensor>& lora_B_bias);

void check_lora_quantized_bwd_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& qweight,
                                   const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
                                   at::IntArrayRef weight_shape, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                   const at::Tensor& xa, double scaling, double dropout_p, const at::Tensor& seed);

void check_dequantize_args(const at::Tensor& qweight, const at::Tensor& absmax, const at::Tensor& code,
                           int64_t blocksize, at::IntArrayRef weight_shape, at::ScalarType dtype);

}  // namespace fastlora
