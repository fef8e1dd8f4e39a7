// C++-level tests of fastlora::lora_linear through the dispatcher (no Python involved).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cstdio>

#include "expect.h"
#include <optional>
#include <string>
#include <vector>

using fastlora_test::expect;
using fastlora_test::finish;

namespace {

using at::Tensor;
using LoraLinearFn = Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&, const Tensor&,
                            double, double, bool, const std::optional<Tensor>&, const std::optional<Tensor>&);

}  // namespace

int main() {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastlora::lora_linear", "").typed<LoraLinearFn>();
  at::manual_seed(0);
  const int64_t M = 37, K = 29, N = 23, r = 5;
  auto opts = at::TensorOptions().dtype(at::kDouble);
  Tensor x = at::randn({2, M, K}, opts), w = at::randn({N, K}, opts), b = at::randn({N}, opts);
  Tensor A = at::randn({r, K}, opts), B = at::randn({N, r}, opts);

  Tensor y = op.call(x, w, b, A, B, 0.5, 0.0, true, std::nullopt, std::nullopt);
  Tensor expected = at::linear(x, w, b) + 0.5 * at::linear(at::linear(x, A), B);
  expect(y.sizes() == expected.sizes(), "output keeps leading dims");
  expect(at::allclose(y, expected, 1e-10, 1e-10), "no-dropout output equals x W^T + b + s B A x");

  Tensor seed = at::full({}, 1234, at::TensorOptions().dtype(at::kLong));
  Tensor y1 = op.call(x, w, b, A, B, 0.5, 0.3, true, std::nullopt, seed);
  Tensor y2 = op.call(x, w, b, A, B, 0.5, 0.3, true, std::nullopt, seed);
  expect(at::equal(y1, y2), "same seed gives the same dropout mask");
  expect(!at::allclose(y1, y), "dropout changes the LoRA branch");
  Tensor y_eval = op.call(x, w, b, A, B, 0.5, 0.3, false, std::nullopt, std::nullopt);
  expect(at::allclose(y_eval, expected, 1e-10, 1e-10), "training=false disables dropout");

  // Dropout alone (A = B = I, W = 0): kept fraction close to 1 - p, kept values scaled.
  Tensor ones = at::ones({400, 64}, opts), eye = at::eye(64, opts);
  Tensor d = op.call(ones, at::zeros({64, 64}, opts), std::nullopt, eye, eye, 1.0, 0.25, true, std::nullopt, seed);
  double kept = d.ne(0).to(at::kDouble).mean().item<double>();
  expect(kept > 0.74 && kept < 0.76, "kept fraction ~ 0.75 (got " + std::to_string(kept) + ")");
  expect(at::allclose(d.masked_select(d.ne(0)), at::full({}, 1.0 / 0.75, opts)), "kept values scaled by 1/(1-p)");

  // Autograd from C++: gradients of <y, g> for x, the adapters and the bias; the frozen weight
  // gets none.
  {
    Tensor xg = x.clone().requires_grad_(), bg = b.clone().requires_grad_();
    Tensor Ag = A.clone().requires_grad_(), Bg = B.clone().requires_grad_();
    Tensor g = at::randn({2, M, N}, opts);
    op.call(xg, w, bg, Ag, Bg, 0.5, 0.0, true, std::nullopt, std::nullopt).backward(g);
    const Tensor gB = at::matmul(g, B) * 0.5;  // (2, M, r)
    expect(at::allclose(xg.grad(), at::matmul(g, w) + at::matmul(gB, A), 1e-10, 1e-10), "grad x");
    expect(at::allclose(Ag.grad(), at::matmul(gB.reshape({-1, r}).t(), x.reshape({-1, K})), 1e-10, 1e-10),
           "grad lora_A");
    expect(at::allclose(Bg.grad(), at::matmul(g.reshape({-1, N}).t(), at::matmul(x, A.t()).reshape({-1, r})) * 0.5,
                        1e-10, 1e-10),
           "grad lora_B");
    expect(at::allclose(bg.grad(), g.sum({0, 1}), 1e-10, 1e-10), "grad bias");
    expect(!w.grad().defined(), "a frozen weight gets no gradient");
  }

  // float32 with dropout on batches with a block of rows for every thread (the fused d lora_A /
  // dX kernel of lora_bwd_x_side.cpp up to rank 16 with AVX-512, small_gemm above and below
  // AVX-512; a column tail everywhere) against the same op in float64: same
  // seed, same mask.
  for (const int64_t rank : {5, 16, 17}) {
    const int64_t Mf = 300, Kf = 37, Nf = 45;
    const Tensor xd = at::randn({Mf, Kf}, opts), wd = at::randn({Nf, Kf}, opts) / 6;
    const Tensor Ad = at::randn({rank, Kf}, opts) / 6, Bd = at::randn({Nf, rank}, opts) / 6;
    const Tensor gd = at::randn({Mf, Nf}, opts);
    auto grads = [&](at::ScalarType t) {
      Tensor xg = xd.to(t).requires_grad_(), Ag = Ad.to(t).requires_grad_(), Bg = Bd.to(t).requires_grad_();
      op.call(xg, wd.to(t), std::nullopt, Ag, Bg, 0.5, 0.2, true, std::nullopt, seed).backward(gd.to(t));
      return std::vector<Tensor>{xg.grad().to(at::kDouble), Ag.grad().to(at::kDouble), Bg.grad().to(at::kDouble)};
    };
    const std::vector<Tensor> g32 = grads(at::kFloat), g64 = grads(at::kDouble);
    const char* names[] = {"grad x", "grad lora_A", "grad lora_B"};
    for (int i = 0; i < 3; ++i) {
      expect(at::allclose(g32[i], g64[i], 1e-4, 1e-4),
             std::string("float32 ") + names[i] + " with dropout matches float64, r = " + std::to_string(rank));
    }
  }

  bool threw = false;
  try {
    op.call(x, w, b, at::randn({r, K + 1}, opts), B, 0.5, 0.0, true, std::nullopt, std::nullopt);
  } catch (const c10::ValueError& e) {
    threw = std::string(e.what()).find("lora_A must have shape") != std::string::npos;
  }
  expect(threw, "bad lora_A shape raises ValueError naming lora_A");

  return finish();
}
