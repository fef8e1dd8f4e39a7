// fastlora::lora_grouped_linear family: mixed-adapter batches (punica SGMV-style), schemas,
// argument validation and the public composite op.
//
//   lora_grouped_linear      public entry (CompositeImplicitAutograd): validates shapes, dtypes
//                            and devices, calls lora_grouped_linear_fwd.
//   lora_grouped_linear_fwd  2-D kernel op. Autograd: fastlora/ops/lora.py.
//   lora_grouped_linear_bwd  its gradients (grad_x, grad_weight, grad_bias, grad_lora_A,
//                            grad_lora_B); one composite kernel for every device, in Python
//                            (fastlora.reference: index ops and small GEMMs per adapter).
//
// Semantics, per row i of the 2-D x (M, in), with a = row_adapter[i] in [-1, K):
//   y[i] = x[i] @ W^T + bias + (a >= 0 ? scalings[a] * (x[i] @ A[a, :r_a]^T) @ B[a, :, :r_a]^T : 0)
// where lora_A (K, r_max, in) and lora_B (K, out, r_max) are the adapters stacked and zero-padded
// to r_max, and r_a = ranks[a] (entries past r_a are never read). a = -1 is the base model only
// (PEFT's "__base__"). No dropout: mixed batches are an inference feature.
// Per-device kernels: csrc/cpu/lora_grouped_linear_cpu.cpp (CPU), kernels/lora_grouped_linear.py (CUDA,
// registered from Python), fastlora/reference/lora_grouped_linear.py (any other device). The values of ranks and
// row_adapter (ranges) are checked by each kernel, since only they read the data.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "arg_checks.h"
#include "lora_op_checks.h"

namespace fastlora {

using at::Tensor;

namespace {

void check_lora_grouped_args(const char* fn, const Tensor& x, const Tensor& weight,
                             const std::optional<Tensor>& bias, const Tensor& lora_A, const Tensor& lora_B,
                             const Tensor& scalings, const Tensor& ranks, const Tensor& row_adapter) {
  TORCH_CHECK_VALUE(x.dim() == 2, fn, ": x must be 2-D (rows, in_features), got shape ", x.sizes(),
                    " (the Python wrapper fastlora.lora_grouped_linear flattens leading dims)");
  TORCH_CHECK_VALUE(weight.dim() == 2, fn, ": weight must be 2-D (out_features, in_features), got shape ",
                    weight.sizes());
  const int64_t M = x.size(0), in = weight.size(1), out = weight.size(0);
  TORCH_CHECK_VALUE(x.size(1) == in, fn, ": x has ", x.size(1), " features but weight expects in_features=", in);
  TORCH_CHECK_VALUE(lora_A.dim() == 3 && lora_A.size(2) == in, fn,
                    ": lora_A must have shape (num_adapters, r_max, in_features=", in, "), got ", lora_A.sizes());
  const int64_t K = lora_A.size(0), r_max = lora_A.size(1);
  TORCH_CHECK_VALUE(lora_B.dim() == 3 && lora_B.size(0) == K && lora_B.size(1) == out && lora_B.size(2) == r_max,
                    fn, ": lora_B must have shape (num_adapters=", K, ", out_features=", out, ", r_max=", r_max,
                    "), got ", lora_B.sizes());
  if (bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out, fn, ": bias must have shape (", out, ",), got ",
                      bias->sizes());
  }
  TORCH_CHECK_VALUE(scalings.dim() == 1 && scalings.size(0) == K, fn, ": scalings must have shape (num_adapters=", K,
                    ",), got ", scalings.sizes());
  TORCH_CHECK_VALUE(ranks.dim() == 1 && ranks.size(0) == K, fn, ": ranks must have shape (num_adapters=", K,
                    ",), got ", ranks.sizes());
  TORCH_CHECK_VALUE(row_adapter.dim() == 1 && row_adapter.size(0) == M, fn, ": row_adapter must have shape (rows=", M,
                    ",) (one adapter id per row of x), got ", row_adapter.sizes());

  check_float_like_x(fn, x, {{"weight", &weight}, {"lora_A", &lora_A}, {"lora_B", &lora_B},
                             {"bias", bias ? &*bias : nullptr}});
  // Small per-adapter / per-row metadata: on x's device or on the CPU.
  auto meta = [&](const Tensor& t, const char* name, bool ok_dtype, const char* want) {
    TORCH_CHECK_TYPE(ok_dtype, fn, ": ", name, " must be ", want, ", got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == x.device() || t.device().is_cpu(), fn, ": ", name, " is on ", t.device(),
                      " but must be on x's device (", x.device(), ") or on the CPU");
  };
  meta(scalings, "scalings", scalings.scalar_type() == at::kFloat || scalings.scalar_type() == at::kDouble,
       "float32 (or float64)");
  meta(ranks, "ranks", ranks.scalar_type() == at::kLong, "int64");
  meta(row_adapter, "row_adapter", row_adapter.scalar_type() == at::kLong, "int64");
}

Tensor lora_grouped_linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                           const Tensor& lora_A, const Tensor& lora_B, const Tensor& scalings, const Tensor& ranks,
                           const Tensor& row_adapter) {
  check_lora_grouped_args("fastlora.lora_grouped_linear", x, weight, bias, lora_A, lora_B, scalings, ranks,
                          row_adapter);
  static auto fwd = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("fastlora::lora_grouped_linear_fwd", "")
                        .typed<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&,
                                      const Tensor&, const Tensor&, const Tensor&, const Tensor&)>();
  return fwd.call(x, weight, bias, lora_A, lora_B, scalings, ranks, row_adapter);
}

void fwd_check_op(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& lora_A,
                  const Tensor& lora_B, const Tensor& scalings, const Tensor& ranks, const Tensor& row_adapter) {
  check_lora_grouped_fwd_args(x, weight, bias, lora_A, lora_B, scalings, ranks, row_adapter);
}

void bwd_check_op(const Tensor& grad_y, const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                  const Tensor& lora_B, const Tensor& scalings, const Tensor& ranks, const Tensor& row_adapter) {
  check_lora_grouped_bwd_args(grad_y, x, weight, lora_A, lora_B, scalings, ranks, row_adapter);
}

}  // namespace

void check_lora_grouped_fwd_args(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                 const Tensor& lora_A, const Tensor& lora_B, const Tensor& scalings,
                                 const Tensor& ranks, const Tensor& row_adapter) {
  check_lora_grouped_args("fastlora::lora_grouped_linear_fwd", x, weight, bias, lora_A, lora_B, scalings, ranks,
                          row_adapter);
}

void check_lora_grouped_bwd_args(const Tensor& grad_y, const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                                 const Tensor& lora_B, const Tensor& scalings, const Tensor& ranks,
                                 const Tensor& row_adapter) {
  constexpr const char* fn = "fastlora::lora_grouped_linear_bwd";
  check_lora_grouped_args(fn, x, weight, std::nullopt, lora_A, lora_B, scalings, ranks, row_adapter);
  TORCH_CHECK_VALUE(grad_y.dim() == 2 && grad_y.size(0) == x.size(0) && grad_y.size(1) == weight.size(0), fn,
                    ": grad_y must have shape (rows=", x.size(0), ", out_features=", weight.size(0), "), got ",
                    grad_y.sizes());
  check_float_like_x(fn, x, {{"grad_y", &grad_y}});
}

TORCH_LIBRARY_FRAGMENT(fastlora, m) {
  m.def(
      "lora_grouped_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor scalings, "
      "Tensor ranks, Tensor row_adapter) -> Tensor");
  m.def(
      "lora_grouped_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "Tensor scalings, Tensor ranks, Tensor row_adapter) -> Tensor");
  m.def(
      "lora_grouped_linear_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
      "Tensor scalings, Tensor ranks, Tensor row_adapter, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The kernel ops' argument checks, for the kernels registered from Python (CUDA, reference,
  // the backward): catch-all, metadata only.
  m.def("_lora_grouped_linear_fwd_check(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
        "Tensor scalings, Tensor ranks, Tensor row_adapter) -> ()",
        &fwd_check_op);
  m.def("_lora_grouped_linear_bwd_check(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
        "Tensor scalings, Tensor ranks, Tensor row_adapter) -> ()",
        &bwd_check_op);
}

TORCH_LIBRARY_IMPL(fastlora, CompositeImplicitAutograd, m) {
  m.impl("lora_grouped_linear", &lora_grouped_linear);
}

}  // namespace fastlora
