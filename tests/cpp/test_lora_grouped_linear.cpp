// C++-level tests of fastlora::lora_grouped_linear through the dispatcher (no Python involved).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <string>

#include "expect.h"

using fastlora_test::expect;
using fastlora_test::finish;

namespace {

using at::Tensor;
using GroupedFn = Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&, const Tensor&,
                         const Tensor&, const Tensor&, const Tensor&);

}  // namespace

int main() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("fastlora::lora_grouped_linear", "")
                .typed<GroupedFn>();
  at::manual_seed(0);
  const int64_t M = 150, K_in = 29, N = 23, r_max = 6;
  auto opts = at::TensorOptions().dtype(at::kDouble);
  auto longs = at::TensorOptions().dtype(at::kLong);
  Tensor x = at::randn({M, K_in}, opts), w = at::randn({N, K_in}, opts), b = at::randn({N}, opts);
  // Three adapters of ranks 6, 2 and 0; padding past each rank filled with NaN (never read).
  Tensor A = at::full({3, r_max, K_in}, NAN, opts), B = at::full({3, N, r_max}, NAN, opts);
  const int64_t ranks_v[3] = {6, 2, 0};
  for (int64_t k = 0; k < 3; ++k) {
    if (ranks_v[k] == 0) continue;
    A[k].narrow(0, 0, ranks_v[k]).copy_(at::randn({ranks_v[k], K_in}, opts));
    B[k].narrow(1, 0, ranks_v[k]).copy_(at::randn({N, ranks_v[k]}, opts));
  }
  Tensor ranks = at::tensor({int64_t{6}, int64_t{2}, int64_t{0}}, longs);
  Tensor scal = at::tensor({0.5f, 2.0f, 3.0f}, at::TensorOptions().dtype(at::kFloat));
  Tensor ra = at::randint(-1, 3, {M}, longs);
  // Rows 100..149 all adapter 0 (consecutive rows: the in-place path of the CPU kernel).
  ra.narrow(0, 100, 50).fill_(0);

  Tensor y = op.call(x, w, b, A, B, scal, ranks, ra);
  Tensor expected = at::linear(x, w, b);
  const double s[3] = {0.5, 2.0, 3.0};
  for (int64_t i = 0; i < M; ++i) {
    const int64_t a = ra[i].item<int64_t>();
    if (a < 0 || ranks_v[a] == 0) continue;
    Tensor Ak = A[a].narrow(0, 0, ranks_v[a]), Bk = B[a].narrow(1, 0, ranks_v[a]);
    expected[i] += s[a] * at::matmul(at::matmul(x[i], Ak.t()), Bk.t());
  }
  expect(y.sizes() == expected.sizes(), "output shape (rows, out_features)");
  expect(at::allclose(y, expected, 1e-10, 1e-10), "y = x W^T + b + s_a B_a A_a x per row, padding never read");

  Tensor empty = op.call(x.narrow(0, 0, 0), w, b, A, B, scal, ranks, ra.narrow(0, 0, 0));
  expect(empty.size(0) == 0 && empty.size(1) == N, "empty batch gives (0, out_features)");

  bool threw = false;
  try {
    Tensor bad = ra.clone();
    bad[3] = 3;
    op.call(x, w, b, A, B, scal, ranks, bad);
  } catch (const c10::ValueError& e) {
    threw = std::string(e.what()).find("row_adapter[3] = 3 is out of range") != std::string::npos;
  }
  expect(threw, "out-of-range row_adapter raises ValueError naming the row");

  threw = false;
  try {
    op.call(x, w, b, A, B.narrow(2, 0, 5), scal, ranks, ra);
  } catch (const c10::ValueError& e) {
    threw = std::string(e.what()).find("lora_B must have shape") != std::string::npos;
  }
  expect(threw, "bad lora_B shape raises ValueError naming lora_B");
  return finish();
}
