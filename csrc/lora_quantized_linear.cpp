// fastlora::lora_quantized_linear family: LoRA over a quantized, frozen base weight (QLoRA).
//
//   y = x @ dequant(W)^T + bias + scaling * (dropout(x) @ lora_A^T @ lora_B^T + lora_B_bias)
//
// The base weight is stored as codes plus one float32 scale (absmax) per block of `blocksize`
// consecutive elements of the row-major (out_features, in_features) weight:
//   dequant(W).flat[f] = code[q(f)] * absmax[f / blocksize]
// code has 16 entries: 4-bit codes, two per byte, the element with the even flat index in the
// high nibble (bitsandbytes' NF4 / FP4 layout, so its stored weights are used as they are); or
// 256 entries: one byte per element (int8 with per-row scales is blocksize = in_features and
// code[u] = int8(u) / 127, bitsandbytes' LLM.int8() weight layout).
//
//   lora_quantized_linear      public entry (CompositeImplicitAutograd): validates, flattens
//                              leading dims, draws the dropout seed, calls the _fwd op.
//   lora_quantized_linear_fwd  2-D kernel op returning (y, xa), xa = dropout(x) @ lora_A^T.
//   lora_quantized_linear_bwd  2-D kernel op: grad_x (through dequant(W), never materialised),
//                              grad_bias, grad_lora_A, grad_lora_B. The base weight is frozen.
//   dequantize                 the full-precision weight (merging, export, the reference).
// Per-device kernels: csrc/cpu/lora_quantized_linear_cpu.cpp (CPU), kernels/lora_quantized_linear.py
// (CUDA, registered from Python), fastlora/reference/lora_quantized_linear.py (any other device). Autograd and
// autocast: below (LoraQuantizedLinearFunction), in C++ as for lora_linear; the Python wrapper:
// fastlora/ops/lora_quantized_linear.py.
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

// numel as an int, also while tracing with symbolic shapes (the composite op runs then): the
// weight's buffers have fixed sizes, so specialising on them costs nothing.
int64_t numel_of(const Tensor& t) { return t.sym_numel().guard_int(__FILE__, __LINE__); }

// The quantized weight's pieces against its declared shape: the number of codes and scales a
// shape needs is computed here, so a corrupted or truncated weight is an error, never a read
// past the end of a buffer.
void check_quantized_weight(const char* fn, const Tensor& qweight, const Tensor& absmax, const Tensor& code,
                            int64_t blocksize, at::IntArrayRef weight_shape, const at::Device& device) {
  TORCH_CHECK_VALUE(weight_shape.size() == 2, fn, ": weight_shape must be (out_features, in_features), got ",
                    weight_shape);
  const int64_t N = weight_shape[0], K = weight_shape[1];
  // Both below 2^31 keeps N * K (and every flat index) far from int64 overflow.
  TORCH_CHECK_VALUE(N >= 0 && K >= 0 && N < (int64_t{1} << 31) && K < (int64_t{1} << 31), fn,
                    ": weight_shape must be two sizes in [0, 2^31), got ", weight_shape);
  TORCH_CHECK_VALUE(blocksize >= 1, fn, ": blocksize must be >= 1, got ", blocksize);
  TORCH_CHECK_TYPE(code.scalar_type() == at::kFloat, fn, ": code must be float32, got ", code.scalar_type());
  const int64_t code_len = numel_of(code);
  TORCH_CHECK_VALUE(code.dim() == 1 && (code_len == 16 || code_len == 256), fn,
                    ": code must be 1-D with 16 entries (4-bit codes) or 256 (8-bit codes), got shape ",
                    code.sizes());
  TORCH_CHECK_TYPE(qweight.scalar_type() == at::kByte, fn, ": qweight must be uint8 (view int8 codes as uint8), got ",
                   qweight.scalar_type());
  TORCH_CHECK_VALUE(qweight.is_contiguous(), fn, ": qweight must be contiguous");
  const int64_t numel = N * K;
  const bool four_bit = code_len == 16;
  const int64_t want_bytes = four_bit ? (numel + 1) / 2 : numel;
  const int64_t have_bytes = numel_of(qweight);
  TORCH_CHECK_VALUE(have_bytes == want_bytes, fn, ": qweight has ", have_bytes, " bytes but a ",
                    four_bit ? "4-bit " : "8-bit ", N, " x ", K, " weight needs ", want_bytes);
  TORCH_CHECK_TYPE(absmax.scalar_type() == at::kFloat, fn, ": absmax must be float32, got ", absmax.scalar_type());
  const int64_t want_blocks = (numel + blocksize - 1) / blocksize;
  TORCH_CHECK_VALUE(absmax.dim() == 1 && numel_of(absmax) == want_blocks && absmax.is_contiguous(), fn,
                    ": absmax must be a contiguous 1-D tensor of ", want_blocks, " scales (one per block of ",
                    blocksize, " elements of the ", N, " x ", K, " weight), got shape ", absmax.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"qweight", &qweight}, {"absmax", &absmax},
                                {"code", &code}}) {
    TORCH_CHECK_VALUE(t->device() == device, fn, ": ", name, " is on ", t->device(), " but x is on ", device);
  }
}

void check_args(const char* fn, const Tensor& x, const Tensor& qweight, const Tensor& absmax, const Tensor& code,
                int64_t blocksize, at::IntArrayRef weight_shape, const std::optional<Tensor>& bias,
                const Tensor& lora_A, const Tensor& lora_B, double scaling, double dropout_p,
                const std::optional<Tensor>& lora_B_bias, const std::optional<Tensor>& seed) {
  TORCH_CHECK_VALUE(x.dim() >= 1, fn, ": x must have at least 1 dim (..., in_features), got a 0-dim tensor");
  check_quantized_weight(fn, qweight, absmax, code, blocksize, weight_shape, x.device());
  const int64_t out = weight_shape[0], in = weight_shape[1];
  TORCH_CHECK_VALUE(x.size(-1) == in, fn, ": x has ", x.size(-1), " features in its last dim but the weight expects in_features=", in);
  check_lora_branch_shapes(fn, in, out, lora_A, lora_B, bias, lora_B_bias, dropout_p, scaling);
  check_float_like_x(fn, x, {{"bias", bias ? &*bias : nullptr}});
  check_adapter_dtypes(fn, x, {{"lora_A", &lora_A}, {"lora_B", &lora_B},
                               {"lora_B_bias", lora_B_bias ? &*lora_B_bias : nullptr}});
  check_seed(fn, seed, x.device());
}

Tensor lora_quantized_linear(const Tensor& x, const Tensor& qweight, const Tensor& absmax, const Tensor& code,
                             int64_t blocksize, at::IntArrayRef weight_shape, const std::optional<Tensor>& bias,
                             const Tensor& lora_A, const Tensor& lora_B, double scaling, double dropout_p,
                             bool training, const std::optional<Tensor>& lora_B_bias,
                             const std::optional<Tensor>& seed) {
  check_args("fastlora.lora_quantized_linear", x, qweight, absmax, code, blocksize, weight_shape, bias, lora_A,
             lora_B, scaling, dropout_p, lora_B_bias, seed);
  const double p = training ? dropout_p : 0.0;
  const Tensor seed_t = dropout_seed(seed, p, x.device());
  const Tensor x2d = rows_2d(x);
  static auto fwd = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("fastlora::lora_quantized_linear_fwd", "")
                        .typed<std::tuple<Tensor, Tensor>(
                            const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, at::IntArrayRef,
                            const std::optional<Tensor>&, const Tensor&, const Tensor&, double, double, const Tensor&,
                            const std::optional<Tensor>&)>();
  auto y = std::get<0>(fwd.call(x2d, qweight, absmax, code, blocksize, weight_shape, bias, lora_A, lora_B, scaling,
                                p, seed_t, lora_B_bias));
  auto out_shape = x.sizes().vec();
  out_shape.back() = weight_shape[0];
  return y.view(out_shape);
}

void fwd_check_op(const Tensor& x, const Tensor& qweight, const Tensor& absmax, const Tensor& code, int64_t blocksize,
                  at::IntArrayRef weight_shape, const std::optional<Tensor>& bias, const Tensor& lora_A,
                  const Tensor& lora_B, double scaling, double dropout_p, const Tensor& seed,
                  const std::optional<Tensor>& lora_B_bias) {
  check_lora_quantized_fwd_args(x, qweight, absmax, code, blocksize, weight_shape, bias, lora_A, lora_B, scaling,
                                dropout_p, seed, lora_B_bias);
}

void bwd_check_op(const Tensor& grad_y, const Tensor& x, const Tensor& qweight, const Tensor& absmax,
                  const Tensor& code, int64_t blocksize, at::IntArrayRef weight_shape, const Tensor& lora_A,
                  const Tensor& lora_B, const Tensor& xa, double scaling, double dropout_p, const Tensor& seed) {
  check_lora_quantized_bwd_args(grad_y, x, qweight, absmax, code, blocksize, weight_shape, lora_A, lora_B, xa,
                                scaling, dropout_p, seed);
}

void dequantize_check_op(const Tensor& qweight, const Tensor& absmax, const Tensor& code, int64_t blocksize,
                         at::IntArrayRef weight_shape, at::ScalarType dtype) {
  check_dequantize_args(qweight, absmax, code, blocksize, weight_shape, dtype);
}

using FwdOp = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t,
                                         at::IntArrayRef, const std::optional<Tensor>&, const Tensor&, const Tensor&,
                                         double, double, const Tensor&, const std::optional<Tensor>&);
using BwdOp = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                         const Tensor&, int64_t, at::IntArrayRef, const Tensor&,
                                                         const Tensor&, const Tensor&, double, double, const Tensor&,
                                                         std::array<bool, 2>);

// lora_quantized_linear_fwd's autograd (the Python wrapper's cost per training step was
// 0.75 ms at M = 8 and 512). Saved for backward: x, the M x r xa and the frozen weight's codes,
// scales and code book; the dropout mask is regenerated from the seed.
class LoraQuantizedLinearFunction : public torch::autograd::Function<LoraQuantizedLinearFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& x,
                                                const Tensor& qweight, const Tensor& absmax, const Tensor& code,
                                                int64_t blocksize, at::IntArrayRef weight_shape,
                                                const std::optional<Tensor>& bias, const Tensor& lora_A,
                                                const Tensor& lora_B, double scaling, double dropout_p,
                                                const Tensor& seed, const std::optional<Tensor>& lora_B_bias) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastlora::lora_quantized_linear_fwd", "")
                         .typed<FwdOp>();
    TORCH_CHECK(!qweight.requires_grad() && !absmax.requires_grad() && !code.requires_grad(),
                "fastlora.lora_quantized_linear: the quantized weight (codes, scales, code book) has no gradient; "
                "it is frozen");
    const auto needs = [](const std::optional<Tensor>& t) { return t && t->defined() && t->requires_grad(); };
    ctx->saved_data["needs"] =
        std::vector<bool>{needs(x), needs(bias), needs(lora_A), needs(lora_B), needs(lora_B_bias)};
    ctx->saved_data["blocksize"] = blocksize;
    ctx->saved_data["weight_shape"] = weight_shape.vec();
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["lora_B_bias_dtype"] =
        lora_B_bias ? static_cast<int64_t>(lora_B_bias->scalar_type()) : int64_t{-1};
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, xa] = op.call(x, qweight, absmax, code, blocksize, weight_shape, bias, lora_A, lora_B, scaling,
                           dropout_p, seed, lora_B_bias);
    ctx->mark_non_differentiable({xa});
    ctx->save_for_backward({x, qweight, absmax, code, lora_A, lora_B, xa, seed});
    return {y, xa};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastlora::lora_quantized_linear_bwd", "")
                         .typed<BwdOp>();
    const auto s = ctx->get_saved_variables();
    const auto needs = ctx->saved_data["needs"].toBoolList();
    const bool nx = needs[0], nb = needs[1], nA = needs[2], nB = needs[3], nBb = needs[4];
    const double scaling = ctx->saved_data["scaling"].toDouble();
    const auto weight_shape = ctx->saved_data["weight_shape"].toIntVector();
    const Tensor& grad_y = grads[0];
    auto [gx, gb, gA, gB] =
        op.call(grad_y, s[0], s[1], s[2], s[3], ctx->saved_data["blocksize"].toInt(), weight_shape, s[4], s[5],
                s[6], scaling, ctx->saved_data["dropout_p"].toDouble(), s[7], std::array<bool, 2>{nx, nb || nBb});
    Tensor gBb;
    if (nBb) {
      const auto dt = static_cast<at::ScalarType>(ctx->saved_data["lora_B_bias_dtype"].toInt());
      gBb = grad_y.sum(0, /*keepdim=*/false, dt) * scaling;
    }
    // One entry per forward argument: x, qweight, absmax, code, blocksize, weight_shape, bias,
    // lora_A, lora_B, scaling, dropout_p, seed, lora_B_bias.
    return {nx ? gx : Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), nb ? gb : Tensor(),
            nA ? gA : Tensor(), nB ? gB : Tensor(), Tensor(), Tensor(), Tensor(), gBb};
  }
};

std::tuple<Tensor, Tensor> fwd_autograd(const Tensor& x, const Tensor& qweight, const Tensor& absmax,
                                        const Tensor& code, int64_t blocksize, at::IntArrayRef weight_shape,
                                        const std::optional<Tensor>& bias, const Tensor& lora_A, const Tensor& lora_B,
                                        double scaling, double dropout_p, const Tensor& seed,
                                        const std::optional<Tensor>& lora_B_bias) {
  auto out = LoraQuantizedLinearFunction::apply(x, qweight, absmax, code, blocksize, weight_shape, bias, lora_A,
                                                lora_B, scaling, dropout_p, seed, lora_B_bias);
  return {out[0], out[1]};
}

// Autocast as lora_linear's (csrc/lora_linear.cpp): the floating-point activations and adapters
// (x, bias, lora_A, lora_B, lora_B_bias) to the autocast dtype, never the codes, scales or code
// book; then the op with autocast off.
template <c10::DeviceType device>
Tensor autocast_op(const Tensor& x, const Tensor& qweight, const Tensor& absmax, const Tensor& code,
                   int64_t blocksize, at::IntArrayRef weight_shape, const std::optional<Tensor>& bias,
                   const Tensor& lora_A, const Tensor& lora_B, double scaling, double dropout_p, bool training,
                   const std::optional<Tensor>& lora_B_bias, const std::optional<Tensor>& seed) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device));
  const auto dt = at::autocast::get_lower_precision_fp_from_device_type(device);
  using at::autocast::cached_cast;
  return lora_quantized_linear(cached_cast(dt, x, device), qweight, absmax, code, blocksize, weight_shape,
                               cached_cast(dt, bias, device), cached_cast(dt, lora_A, device),
                               cached_cast(dt, lora_B, device), scaling, dropout_p, training,
                               cached_cast(dt, lora_B_bias, device), seed);
}

template <c10::DeviceType device>
std::tuple<Tensor, Tensor> fwd_autocast(const Tensor& x, const Tensor& qweight, const Tensor& absmax,
                                        const Tensor& code, int64_t blocksize, at::IntArrayRef weight_shape,
                                        const std::optional<Tensor>& bias, const Tensor& lora_A, const Tensor& lora_B,
                                        double scaling, double dropout_p, const Tensor& seed,
                                        const std::optional<Tensor>& lora_B_bias) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device));
  const auto dt = at::autocast::get_lower_precision_fp_from_device_type(device);
  using at::autocast::cached_cast;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastlora::lora_quantized_linear_fwd", "")
                       .typed<FwdOp>();
  return op.call(cached_cast(dt, x, device), qweight, absmax, code, blocksize, weight_shape,
                 cached_cast(dt, bias, device), cached_cast(dt, lora_A, device), cached_cast(dt, lora_B, device),
                 scaling, dropout_p, seed, cached_cast(dt, lora_B_bias, device));
}

}  // namespace

void check_lora_quantized_fwd_args(const Tensor& x, const Tensor& qweight, const Tensor& absmax, const Tensor& code,
                                   int64_t blocksize, at::IntArrayRef weight_shape, const std::optional<Tensor>& bias,
                                   const Tensor& lora_A, const Tensor& lora_B, double scaling, double dropout_p,
                                   const Tensor& seed, const std::optional<Tensor>& lora_B_bias) {
  constexpr const char* fn = "fastlora::lora_quantized_linear_fwd";
  TORCH_CHECK_VALUE(x.dim() == 2, fn, ": x must be 2-D (rows, in_features), got shape ", x.sizes());
  check_args(fn, x, qweight, absmax, code, blocksize, weight_shape, bias, lora_A, lora_B, scaling, dropout_p,
             lora_B_bias, seed);
}

void check_lora_quantized_bwd_args(const Tensor& grad_y, const Tensor& x, const Tensor& qweight,
                                   const Tensor& absmax, const Tensor& code, int64_t blocksize,
                                   at::IntArrayRef weight_shape, const Tensor& lora_A, const Tensor& lora_B,
                                   const Tensor& xa, double scaling, double dropout_p, const Tensor& seed) {
  constexpr const char* fn = "fastlora::lora_quantized_linear_bwd";
  TORCH_CHECK_VALUE(x.dim() == 2, fn, ": x must be 2-D (rows, in_features), got shape ", x.sizes());
  check_args(fn, x, qweight, absmax, code, blocksize, weight_shape, std::nullopt, lora_A, lora_B, scaling, dropout_p,
             std::nullopt, seed);
  check_lora_backward_inputs(fn, x, grad_y, xa, lora_A, weight_shape[0]);
}

void check_dequantize_args(const Tensor& qweight, const Tensor& absmax, const Tensor& code, int64_t blocksize,
                           at::IntArrayRef weight_shape, at::ScalarType dtype) {
  check_quantized_weight("fastlora::dequantize", qweight, absmax, code, blocksize, weight_shape, qweight.device());
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                   "fastlora::dequantize: dtype must be float32, float64, float16 or bfloat16, got ", dtype);
}

TORCH_LIBRARY_FRAGMENT(fastlora, m) {
  m.def(
      "lora_quantized_linear(Tensor x, Tensor qweight, Tensor absmax, Tensor code, int blocksize, "
      "int[2] weight_shape, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, float dropout_p=0., "
      "bool training=True, Tensor? lora_B_bias=None, Tensor? seed=None) -> Tensor");
  m.def(
      "lora_quantized_linear_fwd(Tensor x, Tensor qweight, Tensor absmax, Tensor code, int blocksize, "
      "int[2] weight_shape, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, float dropout_p, "
      "Tensor seed, Tensor? lora_B_bias) -> (Tensor, Tensor)");
  m.def(
      "lora_quantized_linear_bwd(Tensor grad_y, Tensor x, Tensor qweight, Tensor absmax, Tensor code, "
      "int blocksize, int[2] weight_shape, Tensor lora_A, Tensor lora_B, Tensor xa, float scaling, "
      "float dropout_p, Tensor seed, bool[2] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("dequantize(Tensor qweight, Tensor absmax, Tensor code, int blocksize, int[2] weight_shape, "
        "ScalarType dtype) -> Tensor");
  // The kernel ops' argument checks, for the kernels registered from Python (CUDA, reference).
  m.def("_lora_quantized_linear_fwd_check(Tensor x, Tensor qweight, Tensor absmax, Tensor code, int blocksize, "
        "int[2] weight_shape, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, float dropout_p, "
        "Tensor seed, Tensor? lora_B_bias) -> ()",
        &fwd_check_op);
  m.def("_lora_quantized_linear_bwd_check(Tensor grad_y, Tensor x, Tensor qweight, Tensor absmax, Tensor code, "
        "int blocksize, int[2] weight_shape, Tensor lora_A, Tensor lora_B, Tensor xa, float scaling, "
        "float dropout_p, Tensor seed) -> ()",
        &bwd_check_op);
  m.def("_dequantize_check(Tensor qweight, Tensor absmax, Tensor code, int blocksize, int[2] weight_shape, "
        "ScalarType dtype) -> ()",
        &dequantize_check_op);
}

TORCH_LIBRARY_IMPL(fastlora, CompositeImplicitAutograd, m) {
  m.impl("lora_quantized_linear", &lora_quantized_linear);
}

TORCH_LIBRARY_IMPL(fastlora, Autograd, m) {
  m.impl("lora_quantized_linear_fwd", &fwd_autograd);
}

TORCH_LIBRARY_IMPL(fastlora, AutocastCPU, m) {
  m.impl("lora_quantized_linear", &autocast_op<c10::DeviceType::CPU>);
  m.impl("lora_quantized_linear_fwd", &fwd_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(fastlora, AutocastCUDA, m) {
  m.impl("lora_quantized_linear", &autocast_op<c10::DeviceType::CUDA>);
  m.impl("lora_quantized_linear_fwd", &fwd_autocast<c10::DeviceType::CUDA>);
}

}  // namespace fastlora
