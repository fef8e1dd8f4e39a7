// C++-level tests of fastlora::lora_quantized_linear / _bwd and fastlora::dequantize through the
// dispatcher (no Python involved), against the format's definition written out here:
//   W.flat[f] = code[q(f)] * absmax[f / blocksize], 4-bit codes two per byte, the even f high.
// Shapes whose blocks straddle rows and start rows on odd nibbles; run under ASan / UBSan by
// make test-cpp-sanitize.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "expect.h"

using fastlora_test::expect;
using fastlora_test::finish;

namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;
using QLinearFn = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, at::IntArrayRef,
                         const OptT&, const Tensor&, const Tensor&, double, double, bool, const OptT&, const OptT&);
using QBwdFn = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                          const Tensor&, int64_t, at::IntArrayRef, const Tensor&,
                                                          const Tensor&, const Tensor&, double, double, const Tensor&,
                                                          std::array<bool, 2>);
using DequantFn = Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t, at::IntArrayRef, at::ScalarType);

// The definition, element by element, in float32 (then double).
Tensor dequant_by_definition(const Tensor& q, const Tensor& absmax, const Tensor& code, int64_t blocksize, int64_t n,
                             int64_t k) {
  const bool four_bit = code.numel() == 16;
  const uint8_t* qp = q.const_data_ptr<uint8_t>();
  const float* ap = absmax.const_data_ptr<float>();
  const float* cp = code.const_data_ptr<float>();
  std::vector<double> out(static_cast<size_t>(n * k));
  for (int64_t f = 0; f < n * k; ++f) {
    const int idx = four_bit ? ((f % 2 == 0) ? (qp[f / 2] >> 4) : (qp[f / 2] & 0xF)) : qp[f];
    out[static_cast<size_t>(f)] = static_cast<double>(cp[idx] * ap[f / blocksize]);
  }
  return at::tensor(out, at::TensorOptions().dtype(at::kDouble)).reshape({n, k});
}

struct Weight {
  Tensor q, absmax, code;
  int64_t blocksize;
};

Weight random_weight(int64_t n, int64_t k, bool four_bit, int64_t blocksize) {
  const int64_t numel = n * k;
  const int64_t bytes = four_bit ? (numel + 1) / 2 : numel;
  Weight w;
  w.q = at::randint(0, 256, {bytes}, at::TensorOptions().dtype(at::kByte));
  w.blocksize = blocksize;
  w.absmax = at::rand({(numel + blocksize - 1) / blocksize}) + 0.5;
  w.code = at::randn({four_bit ? 16 : 256});
  return w;
}

}  // namespace

int main() {
  auto& d = c10::Dispatcher::singleton();
  auto op = d.findSchemaOrThrow("fastlora::lora_quantized_linear", "").typed<QLinearFn>();
  auto bwd = d.findSchemaOrThrow("fastlora::lora_quantized_linear_bwd", "").typed<QBwdFn>();
  auto deq = d.findSchemaOrThrow("fastlora::dequantize", "").typed<DequantFn>();
  at::manual_seed(0);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);

  // N x K = 23 x 29: odd K, so rows start on odd nibbles and 64-element blocks straddle rows;
  // 8-bit codes with per-row scales (blocksize K) and with blocks across rows (blocksize 50).
  struct Case {
    bool four_bit;
    int64_t blocksize;
    const char* name;
  };
  for (const Case c : {Case{true, 64, "4-bit, blocksize 64"}, Case{false, 29, "8-bit, per row"},
                       Case{false, 50, "8-bit, blocksize 50"}}) {
    const int64_t N = 23, K = 29, M = 37, r = 5;
    const Weight w = random_weight(N, K, c.four_bit, c.blocksize);
    const Tensor W = dequant_by_definition(w.q, w.absmax, w.code, w.blocksize, N, K);
    const std::string tag = std::string(" (") + c.name + ")";
    expect(at::equal(deq.call(w.q, w.absmax, w.code, w.blocksize, {N, K}, at::kDouble), W),
           "dequantize in float64 is the definition, exactly" + tag);
    expect(at::equal(deq.call(w.q, w.absmax, w.code, w.blocksize, {N, K}, at::kBFloat16), W.to(at::kFloat).to(at::kBFloat16)),
           "dequantize in bfloat16 is the float32 value rounded" + tag);

    Tensor x = at::randn({2, M, K}, f64), b = at::randn({N}, f64);
    Tensor A = at::randn({r, K}, f64), B = at::randn({N, r}, f64);
    Tensor y = op.call(x, w.q, w.absmax, w.code, w.blocksize, {N, K}, b, A, B, 0.5, 0.0, true, std::nullopt,
                       std::nullopt);
    Tensor expected = at::linear(x, W, b) + 0.5 * at::linear(at::linear(x, A), B);
    expect(y.sizes() == expected.sizes(), "output keeps leading dims" + tag);
    expect(at::allclose(y, expected, 1e-10, 1e-10), "float64 output equals x W^T + b + s B A x" + tag);
    Tensor y32 = op.call(x.to(at::kFloat), w.q, w.absmax, w.code, w.blocksize, {N, K}, b.to(at::kFloat),
                         A.to(at::kFloat), B.to(at::kFloat), 0.5, 0.0, true, std::nullopt, std::nullopt);
    expect(at::allclose(y32.to(at::kDouble), expected, 1e-4, 1e-4), "float32 output close to the float64 one" + tag);
    Tensor y16 = op.call(x.to(at::kBFloat16), w.q, w.absmax, w.code, w.blocksize, {N, K}, b.to(at::kBFloat16),
                         A.to(at::kFloat), B.to(at::kFloat), 0.5, 0.0, true, std::nullopt, std::nullopt);
    expect(y16.scalar_type() == at::kBFloat16 && at::allclose(y16.to(at::kDouble), expected, 0.05, 0.1),
           "bfloat16 x with float32 adapters: bfloat16 output near the exact one" + tag);

    // Backward, no dropout: every gradient against its formula.
    Tensor x2 = x.reshape({-1, K}), gy = at::randn({2 * M, N}, f64), xa = at::mm(x2, A.t());
    auto [gx, gb, gA, gB] = bwd.call(gy, x2, w.q, w.absmax, w.code, w.blocksize, {N, K}, A, B, xa, 0.5, 0.0,
                                     at::zeros({}, at::TensorOptions().dtype(at::kLong)), std::array<bool, 2>{true, true});
    Tensor g = 0.5 * at::mm(gy, B);
    expect(at::allclose(gx, at::mm(gy, W) + at::mm(g, A), 1e-10, 1e-10), "grad_x = dY W + s (dY B) A" + tag);
    expect(at::allclose(gb, gy.sum(0), 1e-12, 1e-12), "grad_bias = sum of dY" + tag);
    expect(at::allclose(gA, at::mm(g.t(), x2), 1e-10, 1e-10), "grad_A = s (dY B)^T x" + tag);
    expect(at::allclose(gB, 0.5 * at::mm(gy.t(), xa), 1e-10, 1e-10), "grad_B = s dY^T xa" + tag);

    // Autograd from C++: the same gradients through backward(), none for the frozen codes.
    Tensor xg = x2.clone().requires_grad_(), bg = b.clone().requires_grad_();
    Tensor Ag = A.clone().requires_grad_(), Bg = B.clone().requires_grad_();
    op.call(xg, w.q, w.absmax, w.code, w.blocksize, {N, K}, bg, Ag, Bg, 0.5, 0.0, true, std::nullopt, std::nullopt)
        .backward(gy);
    expect(at::allclose(xg.grad(), gx, 1e-10, 1e-10) && at::allclose(bg.grad(), gb, 1e-12, 1e-12) &&
               at::allclose(Ag.grad(), gA, 1e-10, 1e-10) && at::allclose(Bg.grad(), gB, 1e-10, 1e-10),
           "autograd gives the backward op's gradients" + tag);
  }

  // Bad input: a clear ValueError before any read.
  const Weight w = random_weight(10, 12, true, 64);
  Tensor x = at::randn({3, 12}), A = at::randn({2, 12}), B = at::randn({10, 2});
  auto raises = [&](auto&& call, const std::string& needle) {
    try {
      call();
    } catch (const c10::ValueError& e) {
      return std::string(e.what()).find(needle) != std::string::npos;
    }
    return false;
  };
  expect(raises([&] { op.call(x, w.q.narrow(0, 0, 59), w.absmax, w.code, 64, {10, 12}, std::nullopt, A, B, 1.0, 0.0,
                              true, std::nullopt, std::nullopt); },
                "qweight has 59 bytes but a 4-bit 10 x 12 weight needs 60"),
         "truncated codes raise ValueError naming the sizes");
  expect(raises([&] { op.call(x, w.q, w.absmax, w.code, 64, {int64_t{1} << 40, 12}, std::nullopt, A, B, 1.0, 0.0,
                              true, std::nullopt, std::nullopt); },
                "weight_shape must be two sizes in [0, 2^31)"),
         "an absurd declared shape raises ValueError");
  expect(raises([&] { deq.call(w.q, w.absmax.narrow(0, 0, 1), w.code, 64, {10, 12}, at::kFloat); },
                "absmax must be a contiguous 1-D tensor of 2 scales"),
         "too few scales raise ValueError");
  return finish();
}
