// CPU kernels of fastlora::lora_quantized_linear_fwd / _bwd and fastlora::dequantize (formats and
// semantics in csrc/lora_quantized_linear.cpp).
//
// The base weight is never materialised in full precision: the base products run on panels of
// it, each dequantized into a per-thread buffer of ~2 MiB (codes -> code[q] * absmax, the float32
// product bitsandbytes computes, then the compute type) right before the BLAS multiplies it,
// one thread per panel:
//   forward   y[:, n0:n1]  += x  @ dequant(W[n0:n1, :])^T   (panels of W's rows)
//   backward  dX[:, k0:k1] += dY @ dequant(W[:, k0:k1])     (panels of W's columns)
// so each output column block is written by one thread and nothing is accumulated across threads.
// The LoRA branch is lora_linear's: the same shrink (small_gemm on dropped blocks of rows), the
// dropout mask regenerated from the counter-based hash in backward.
//
// Compute type: float64 for float64 inputs, float32 otherwise. float16 / bfloat16 x (and half or
// float32 adapters) run on float32 copies, the results rounded once: the dequantized weight is
// float32 anyway, and a half-precision GEMM is slow on CPUs without native half instructions.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include "../lora_op_checks.h"
#include "lora_linear_blocks.h"

namespace fastlora {
namespace lora_cpu {
namespace {

// A validated quantized weight (check_quantized_weight ran): raw pointers and sizes.
struct QuantView {
  const uint8_t* q;
  const float* absmax;
  const float* code;
  int64_t blocksize, N, K;
  bool four_bit;

  static QuantView of(const Tensor& qweight, const Tensor& absmax, const Tensor& code, int64_t blocksize,
                      at::IntArrayRef shape) {
    return {qweight.const_data_ptr<uint8_t>(), absmax.const_data_ptr<float>(), code.const_data_ptr<float>(),
            blocksize, shape[0], shape[1], code.numel() == 16};
  }
};

// Elements f .. f + len - 1 of the flat (row-major) weight into out, as T.
template <typename T>
void dequant_span(const QuantView& w, int64_t f, int64_t len, T* out) {
  const int64_t fend = f + len;
  while (f < fend) {
    const int64_t blk = f / w.blocksize;
    const int64_t bend = std::min(fend, (blk + 1) * w.blocksize);
    const float am = w.absmax[blk];
    if (w.four_bit) {
      // The block's 16 values once (the same float32 products as code[q] * absmax per element).
      float lut[16];
      for (int i = 0; i < 16; ++i) lut[i] = w.code[i] * am;
      if ((f & 1) && f < bend) {  // odd flat index: the low nibble of its byte
        *out++ = static_cast<T>(lut[w.q[f >> 1] & 0xF]);
        ++f;
      }
      for (; f + 1 < bend; f += 2) {
        const uint8_t b = w.q[f >> 1];
        out[0] = static_cast<T>(lut[b >> 4]);
        out[1] = static_cast<T>(lut[b & 0xF]);
        out += 2;
      }
      if (f < bend) {
        *out++ = static_cast<T>(lut[w.q[f >> 1] >> 4]);
        ++f;
      }
    } else {
      for (; f < bend; ++f) *out++ = static_cast<T>(w.code[w.q[f]] * am);
    }
  }
}

// Rows n0 .. n1 - 1, columns k0 .. k1 - 1 of the weight into out (row stride ld).
template <typename T>
void dequant_rect(const QuantView& w, int64_t n0, int64_t n1, int64_t k0, int64_t k1, T* out, int64_t ld) {
  for (int64_t n = n0; n < n1; ++n) dequant_span(w, n * w.K + k0, k1 - k0, out + (n - n0) * ld);
}

// Panel width (rows or columns of W) for panels of `len`-long lines of T: ~2 MiB, so the BLAS
// re-reads the other operand (x or dY) only N / width times (at 4096^2, 32x), and at least two
// panels per thread so both cores stay busy; a multiple of 8.
int64_t panel_width(int64_t lines, int64_t len, int64_t elem_size) {
  constexpr int64_t kPanelBytes = int64_t{2} << 20;
  const int64_t nthreads = std::max(1, at::get_num_threads());
  const int64_t by_cache = std::max<int64_t>(8, kPanelBytes / std::max<int64_t>(1, len * elem_size) / 8 * 8);
  const int64_t by_threads = std::max<int64_t>(8, ceil_div(ceil_div(lines, 2 * nthreads), 8) * 8);
  return std::max<int64_t>(1, std::min({lines, by_cache, by_threads}));
}

// y += x @ dequant(W)^T, by panels of W's rows (y: M x N, x: M x K, both of type T).
template <typename T>
void base_forward(const Tensor& x, const QuantView& w, Tensor& y) {
  const int64_t M = x.size(0), N = w.N, K = w.K;
  if (M == 0 || N == 0 || K == 0) return;
  const int64_t nb = panel_width(N, K, sizeof(T));
  at::parallel_for(0, ceil_div(N, nb), 1, [&](int64_t p0, int64_t p1) {
    // Worker threads do not inherit the caller's dispatch state: we are below autograd.
    at::AutoDispatchBelowAutograd below_autograd;
    Tensor panel = at::empty({nb, K}, x.options());
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * nb, n = std::min(nb, N - n0);
      dequant_rect<T>(w, n0, n0 + n, 0, K, panel.mutable_data_ptr<T>(), K);
      Tensor y_cols = y.narrow(1, n0, n);
      y_cols.addmm_(x, panel.narrow(0, 0, n).t());
    }
  });
}

// grad_x += dY @ dequant(W), by panels of W's columns (grad_x: M x K, dY: M x N).
template <typename T>
void base_backward(const Tensor& dy, const QuantView& w, Tensor& grad_x) {
  const int64_t M = dy.size(0), N = w.N, K = w.K;
  if (M == 0 || N == 0 || K == 0) return;
  const int64_t kb = panel_width(K, N, sizeof(T));
  at::parallel_for(0, ceil_div(K, kb), 1, [&](int64_t p0, int64_t p1) {
    at::AutoDispatchBelowAutograd below_autograd;
    Tensor panel = at::empty({N, kb}, dy.options());
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t k0 = p * kb, k = std::min(kb, K - k0);
      dequant_rect<T>(w, 0, N, k0, k0 + k, panel.mutable_data_ptr<T>(), kb);
      Tensor gx_cols = grad_x.narrow(1, k0, k);
      gx_cols.addmm_(dy, panel.narrow(1, 0, k));
    }
  });
}

at::ScalarType compute_type(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

std::tuple<Tensor, Tensor> lora_quantized_linear_fwd_cpu(const Tensor& x_in, const Tensor& qweight,
                                                         const Tensor& absmax, const Tensor& code, int64_t blocksize,
                                                         at::IntArrayRef weight_shape,
                                                         const std::optional<Tensor>& bias, const Tensor& lora_A,
                                                         const Tensor& lora_B, double scaling, double dropout_p,
                                                         const Tensor& seed,
                                                         const std::optional<Tensor>& lora_B_bias) {
  check_lora_quantized_fwd_args(x_in, qweight, absmax, code, blocksize, weight_shape, bias, lora_A, lora_B, scaling,
                                dropout_p, seed, lora_B_bias);
  const at::ScalarType dtype = x_in.scalar_type(), adapter_dtype = lora_A.scalar_type();
  const at::ScalarType ct = compute_type(dtype);
  const Tensor x = row_major(x_in.to(ct));
  const Tensor A = lora_A.to(ct), Bt = transposed_copy(lora_B.to(ct));
  const DropoutParams d = DropoutParams::make(dropout_p, seed_value(seed));
  const Tensor xa = shrink(x, A, d);
  // y = bias + s * lora_B_bias + s * xa @ B^T first; the base panels accumulate on top.
  Tensor bias_eff;
  if (bias && lora_B_bias) {
    bias_eff = bias->to(ct).add(lora_B_bias->to(ct), scaling);
  } else if (bias) {
    bias_eff = bias->to(ct);
  } else if (lora_B_bias) {
    bias_eff = lora_B_bias->to(ct).mul(scaling);
  }
  Tensor y = bias_eff.defined() ? at::addmm(bias_eff, xa, Bt, 1.0, scaling) : at::mm(xa, Bt).mul_(scaling);
  const QuantView w = QuantView::of(qweight, absmax, code, blocksize, weight_shape);
  if (ct == at::kDouble) {
    base_forward<double>(x, w, y);
  } else {
    base_forward<float>(x, w, y);
  }
  return {y.to(dtype), xa.to(adapter_dtype)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lora_quantized_linear_bwd_cpu(
    const Tensor& grad_y, const Tensor& x_in, const Tensor& qweight, const Tensor& absmax, const Tensor& code,
    int64_t blocksize, at::IntArrayRef weight_shape, const Tensor& lora_A, const Tensor& lora_B, const Tensor& xa_in,
    double scaling, double dropout_p, const Tensor& seed, std::array<bool, 2> output_mask) {
  check_lora_quantized_bwd_args(grad_y, x_in, qweight, absmax, code, blocksize, weight_shape, lora_A, lora_B, xa_in,
                                scaling, dropout_p, seed);
  const at::ScalarType dtype = x_in.scalar_type(), adapter_dtype = lora_A.scalar_type();
  const at::ScalarType ct = compute_type(dtype);
  const auto [need_x, need_bias] = output_mask;
  const Tensor x = row_major(x_in.to(ct)), dy = row_major(grad_y.to(ct));
  const Tensor A = lora_A.to(ct), B = lora_B.to(ct), xa = xa_in.to(ct);
  const DropoutParams d = DropoutParams::make(dropout_p, seed_value(seed));
  // g = s * dY @ B (M x r): the LoRA branch's gradient at xa, used by d lora_A and dX.
  const Tensor g = at::mm(dy, B).mul_(scaling);
  Tensor grad_A;
  if (d.active) {
    Tensor xd = at::empty_like(x);
    dropout_rows_(x, xd, 0, d);
    grad_A = at::mm(g.t(), xd);
  } else {
    grad_A = at::mm(g.t(), x);
  }
  const Tensor grad_B = at::mm(dy.t(), xa).mul_(scaling);
  Tensor grad_x;
  if (need_x) {
    // The LoRA term, masked as dropout(x) was, then the base product on top.
    grad_x = at::mm(g, A);
    if (d.active) dropout_rows_(grad_x, grad_x, 0, d);
    const QuantView w = QuantView::of(qweight, absmax, code, blocksize, weight_shape);
    if (ct == at::kDouble) {
      base_backward<double>(dy, w, grad_x);
    } else {
      base_backward<float>(dy, w, grad_x);
    }
    grad_x = grad_x.to(dtype);
  } else {
    grad_x = at::empty({0}, x_in.options());
  }
  const Tensor grad_bias = need_bias ? dy.sum(0).to(dtype) : at::empty({0}, x_in.options());
  return {grad_x, grad_bias, grad_A.to(adapter_dtype), grad_B.to(adapter_dtype)};
}

Tensor dequantize_cpu(const Tensor& qweight, const Tensor& absmax, const Tensor& code, int64_t blocksize,
                      at::IntArrayRef weight_shape, at::ScalarType dtype) {
  check_dequantize_args(qweight, absmax, code, blocksize, weight_shape);
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                   "fastlora::dequantize: dtype must be float32, float64, float16 or bfloat16, got ", dtype);
  const QuantView w = QuantView::of(qweight, absmax, code, blocksize, weight_shape);
  const at::ScalarType ct = compute_type(dtype);
  Tensor out = at::empty({w.N, w.K}, qweight.options().dtype(ct));
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, w.K));
  AT_DISPATCH_FLOATING_TYPES(ct, "fastlora_dequantize", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, w.N, grain, [&](int64_t n0, int64_t n1) { dequant_rect<scalar_t>(w, n0, n1, 0, w.K, o + n0 * w.K, w.K); });
  });
  return out.to(dtype);
}

}  // namespace lora_cpu

TORCH_LIBRARY_IMPL(fastlora, CPU, m) {
  m.impl("lora_quantized_linear_fwd", &lora_cpu::lora_quantized_linear_fwd_cpu);
  m.impl("lora_quantized_linear_bwd", &lora_cpu::lora_quantized_linear_bwd_cpu);
  m.impl("dequantize", &lora_cpu::dequantize_cpu);
}

}  // namespace fastlora
