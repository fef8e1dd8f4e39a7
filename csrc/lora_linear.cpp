// fastlora::lora_linear family: schemas, argument validation and the public composite op.
//
//   lora_linear      public entry (CompositeImplicitAutograd): validates, flattens leading
//                    dims, draws the dropout seed, calls lora_linear_fwd.
//   lora_linear_fwd  2-D kernel op returning (y, xa); xa = dropout(x) @ lora_A^T is the only
//                    activation saved for backward besides x. Autograd: LoraLinearFunction below.
//   lora_linear_bwd  2-D kernel op computing all gradients in one pass.
// Per-device kernels: csrc/cpu/lora_linear_{fwd,bwd}_cpu.cpp (CPU), kernels/lora_linear.py (CUDA,
// registered from Python), fastlora/reference/lora_linear.py (any other device).
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "arg_checks.h"
#include "lora_op_checks.h"

#include <cmath>
#include <limits>

namespace fastlora {

using at::Tensor;

namespace {

void check_lora_linear_args(const char* fn, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                            const Tensor& lora_A, const Tensor& lora_B, double scaling,
                            double dropout_p, const std::optional<Tensor>& lora_B_bias,
                            const std::optional<Tensor>& seed) {
  TORCH_CHECK_VALUE(x.dim() >= 1, fn, ": x must have at least 1 dim (..., in_features), got a 0-dim tensor");
  TORCH_CHECK_VALUE(weight.dim() == 2, fn, ": weight must be 2-D (out_features, in_features), got shape ", weight.sizes());
  const int64_t in = weight.size(1), out = weight.size(0);
  TORCH_CHECK_VALUE(x.size(-1) == in, fn, ": x has ", x.size(-1), " features in its last dim but weight expects in_features=", in);
  check_lora_branch_shapes(fn, in, out, lora_A, lora_B, bias, lora_B_bias, dropout_p, scaling);

  check_float_like_x(fn, x, {{"weight", &weight}, {"bias", bias ? &*bias : nullptr}});
  check_adapter_dtypes(fn, x, {{"lora_A", &lora_A}, {"lora_B", &lora_B},
                               {"lora_B_bias", lora_B_bias ? &*lora_B_bias : nullptr}});
  check_seed(fn, seed, x.device());
}

Tensor lora_linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                   const Tensor& lora_A, const Tensor& lora_B, double scaling, double dropout_p,
                   bool training, const std::optional<Tensor>& lora_B_bias,
                   const std::optional<Tensor>& seed) {
  check_lora_linear_args("fastlora.lora_linear", x, weight, bias, lora_A, lora_B, scaling, dropout_p, lora_B_bias,
                         seed);
  const double p = training ? dropout_p : 0.0;
  const Tensor seed_t = dropout_seed(seed, p, x.device());
  const Tensor x2d = rows_2d(x);
  static auto fwd = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("fastlora::lora_linear_fwd", "")
                        .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                                          const Tensor&, const Tensor&, double, double, const Tensor&,
                                                          const std::optional<Tensor>&)>();
  auto y = std::get<0>(fwd.call(x2d, weight, bias, lora_A, lora_B, scaling, p, seed_t, lora_B_bias));
  auto out_shape = x.sizes().vec();
  out_shape.back() = weight.size(0);
  return y.view(out_shape);
}

void fwd_check_op(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& lora_A,
                  const Tensor& lora_B, double scaling, double dropout_p, const Tensor& seed,
                  const std::optional<Tensor>& lora_B_bias) {
  check_lora_linear_fwd_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_B_bias);
}

void bwd_check_op(const Tensor& grad_y, const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                  const Tensor& lora_B, const Tensor& xa, double scaling, double dropout_p, const Tensor& seed) {
  check_lora_linear_bwd_args(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed);
}

using FwdOp = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&,
                                         const Tensor&, double, double, const Tensor&, const std::optional<Tensor>&);
using BwdOp = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                 const Tensor&, const Tensor&, const Tensor&, double,
                                                                 double, const Tensor&, std::array<bool, 3>);

// lora_linear_fwd's autograd, in C++ rather than through torch.library.register_autograd: the
// Python wrapper's setup_context and backward cost 0.26 ms per training step (M = 8, 4096^2,
// bfloat16: 5% of the step, as much as the LoRA products). The backward regenerates the
// dropout mask from the seed, so the activations saved are x and the M x r xa only; a frozen
// base weight or bias never pays for its gradient (output_mask).
class LoraLinearFunction : public torch::autograd::Function<LoraLinearFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& x,
                                                const Tensor& weight, const std::optional<Tensor>& bias,
                                                const Tensor& lora_A, const Tensor& lora_B, double scaling,
                                                double dropout_p, const Tensor& seed,
                                                const std::optional<Tensor>& lora_B_bias) {
    static auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("fastlora::lora_linear_fwd", "").typed<FwdOp>();
    // Which gradients backward computes (torch.library's ctx.needs_input_grad, read here).
    const auto needs = [](const Tensor* t) { return t != nullptr && t->defined() && t->requires_grad(); };
    ctx->saved_data["needs"] = std::vector<bool>{
        needs(&x), needs(&weight), needs(bias ? &*bias : nullptr), needs(&lora_A), needs(&lora_B),
        needs(lora_B_bias ? &*lora_B_bias : nullptr)};
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["lora_B_bias_dtype"] =
        lora_B_bias ? static_cast<int64_t>(lora_B_bias->scalar_type()) : int64_t{-1};
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, xa] = op.call(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_B_bias);
    ctx->mark_non_differentiable({xa});
    ctx->save_for_backward({x, weight, lora_A, lora_B, xa, seed});
    return {y, xa};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("fastlora::lora_linear_bwd", "").typed<BwdOp>();
    const auto saved = ctx->get_saved_variables();
    const auto needs = ctx->saved_data["needs"].toBoolList();
    const bool nx = needs[0], nw = needs[1], nb = needs[2], nA = needs[3], nB = needs[4], nBb = needs[5];
    const double scaling = ctx->saved_data["scaling"].toDouble();
    const Tensor& grad_y = grads[0];
    const std::array<bool, 3> mask{nx, nw, nb || nBb};
    auto [gx, gw, gb, gA, gB] = op.call(grad_y, saved[0], saved[1], saved[2], saved[3], saved[4], scaling,
                                        ctx->saved_data["dropout_p"].toDouble(), saved[5], mask);
    Tensor gBb;
    if (nBb) {
      // Summed in the adapters' dtype (float32 adapters on a half-precision x: grad_y's sum in
      // float32, not the base bias gradient's half-precision rounding of it).
      const auto dt = static_cast<at::ScalarType>(ctx->saved_data["lora_B_bias_dtype"].toInt());
      gBb = (dt == grad_y.scalar_type() ? gb : grad_y.sum(0, /*keepdim=*/false, dt)) * scaling;
    }
    // One entry per forward argument; undefined for the non-differentiable ones.
    return {nx ? gx : Tensor(), nw ? gw : Tensor(), nb ? gb : Tensor(), nA ? gA : Tensor(), nB ? gB : Tensor(),
            Tensor(),           Tensor(),           Tensor(),           gBb};
  }
};

std::tuple<Tensor, Tensor> lora_linear_fwd_autograd(const Tensor& x, const Tensor& weight,
                                                    const std::optional<Tensor>& bias, const Tensor& lora_A,
                                                    const Tensor& lora_B, double scaling, double dropout_p,
                                                    const Tensor& seed, const std::optional<Tensor>& lora_B_bias) {
  auto out = LoraLinearFunction::apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_B_bias);
  return {out[0], out[1]};
}

// Autocast, as for nn.Linear (and so PEFT's LoRA modules, whose lora_A / lora_B are
// nn.Linear): float32 / float16 / bfloat16 tensors on the autocast device (x, weight, bias and
// the adapters; not the seed) are cast to the autocast dtype, float64 stays, and the op runs
// with autocast off. Above autograd, so the casts are recorded and float32 parameters get
// float32 gradients; the backward op sees the cast dtype. In C++ (the Python kernel cost 55 us
// per call) and through autocast's cache, which casts a leaf that requires grad (the adapters)
// once per autocast region.
template <c10::DeviceType device>
Tensor lora_linear_autocast(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                            const Tensor& lora_A, const Tensor& lora_B, double scaling, double dropout_p,
                            bool training, const std::optional<Tensor>& lora_B_bias,
                            const std::optional<Tensor>& seed) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device));
  const auto dt = at::autocast::get_lower_precision_fp_from_device_type(device);
  using at::autocast::cached_cast;
  return lora_linear(cached_cast(dt, x, device), cached_cast(dt, weight, device), cached_cast(dt, bias, device),
                     cached_cast(dt, lora_A, device), cached_cast(dt, lora_B, device), scaling, dropout_p, training,
                     cached_cast(dt, lora_B_bias, device), seed);
}

template <c10::DeviceType device>
std::tuple<Tensor, Tensor> lora_linear_fwd_autocast(const Tensor& x, const Tensor& weight,
                                                    const std::optional<Tensor>& bias, const Tensor& lora_A,
                                                    const Tensor& lora_B, double scaling, double dropout_p,
                                                    const Tensor& seed, const std::optional<Tensor>& lora_B_bias) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device));
  const auto dt = at::autocast::get_lower_precision_fp_from_device_type(device);
  using at::autocast::cached_cast;
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastlora::lora_linear_fwd", "").typed<FwdOp>();
  return op.call(cached_cast(dt, x, device), cached_cast(dt, weight, device), cached_cast(dt, bias, device),
                 cached_cast(dt, lora_A, device), cached_cast(dt, lora_B, device), scaling, dropout_p, seed,
                 cached_cast(dt, lora_B_bias, device));
}

}  // namespace

void check_lora_linear_fwd_args(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                const Tensor& lora_A, const Tensor& lora_B, double scaling, double dropout_p,
                                const Tensor& seed, const std::optional<Tensor>& lora_B_bias) {
  constexpr const char* fn = "fastlora::lora_linear_fwd";
  TORCH_CHECK_VALUE(x.dim() == 2, fn, ": x must be 2-D (rows, in_features), got shape ", x.sizes());
  check_lora_linear_args(fn, x, weight, bias, lora_A, lora_B, scaling, dropout_p, lora_B_bias, seed);
}

void check_lora_linear_bwd_args(const Tensor& grad_y, const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                                const Tensor& lora_B, const Tensor& xa, double scaling, double dropout_p,
                                const Tensor& seed) {
  constexpr const char* fn = "fastlora::lora_linear_bwd";
  TORCH_CHECK_VALUE(x.dim() == 2, fn, ": x must be 2-D (rows, in_features), got shape ", x.sizes());
  check_lora_linear_args(fn, x, weight, std::nullopt, lora_A, lora_B, scaling, dropout_p, std::nullopt, seed);
  check_lora_backward_inputs(fn, x, grad_y, xa, lora_A, weight.size(0));
}

TORCH_LIBRARY_FRAGMENT(fastlora, m) {
  m.def(
      "lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
      "float dropout_p=0., bool training=True, Tensor? lora_B_bias=None, Tensor? seed=None) -> Tensor");
  m.def(
      "lora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
      "float dropout_p, Tensor seed, Tensor? lora_B_bias) -> (Tensor, Tensor)");
  m.def(
      "lora_linear_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor xa, "
      "float scaling, float dropout_p, Tensor seed, bool[3] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The kernel ops' argument checks, for the kernels registered from Python (CUDA, reference):
  // catch-all, metadata only.
  m.def("_lora_linear_fwd_check(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
        "float dropout_p, Tensor seed, Tensor? lora_B_bias) -> ()",
        &fwd_check_op);
  m.def("_lora_linear_bwd_check(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor xa, "
        "float scaling, float dropout_p, Tensor seed) -> ()",
        &bwd_check_op);
}

TORCH_LIBRARY_IMPL(fastlora, CompositeImplicitAutograd, m) {
  m.impl("lora_linear", &lora_linear);
}

TORCH_LIBRARY_IMPL(fastlora, Autograd, m) {
  m.impl("lora_linear_fwd", &lora_linear_fwd_autograd);
}

TORCH_LIBRARY_IMPL(fastlora, AutocastCPU, m) {
  m.impl("lora_linear", &lora_linear_autocast<c10::DeviceType::CPU>);
  m.impl("lora_linear_fwd", &lora_linear_fwd_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(fastlora, AutocastCUDA, m) {
  m.impl("lora_linear", &lora_linear_autocast<c10::DeviceType::CUDA>);
  m.impl("lora_linear_fwd", &lora_linear_fwd_autocast<c10::DeviceType::CUDA>);
}

}  // namespace fastlora
