// C++-level tests of fastlora::sparse_aggregate_ through the dispatcher (no Python involved).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <string>

#include "expect.h"

using fastlora_test::expect;
using fastlora_test::finish;

int main() {
  using at::Tensor;
  auto aggregate = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastlora::sparse_aggregate_", "")
                       .typed<void(at::TensorList, at::TensorList, at::TensorList, const Tensor&, bool)>();
  at::manual_seed(0);
  const int64_t n = 3100, k = 123;

  // One client's sparse update: k sorted unique indices, float16 values (what travels).
  Tensor idx = std::get<0>(at::randperm(n, at::TensorOptions().dtype(at::kLong)).narrow(0, 0, k).sort());
  Tensor val = at::randn({k}).to(at::kHalf);
  Tensor dense = at::zeros({n});
  dense.index_put_({idx}, val.to(at::kFloat));

  // Two clients (the same update) into a float32 output: 0.25 x + 0.75 x == x.
  Tensor out = at::zeros({n});
  Tensor w = at::tensor({0.25f, 0.75f});
  aggregate.call({out}, {idx, idx}, {val, val}, w, true);
  expect(at::allclose(out, dense), "0.25 x + 0.75 x == x");

  // A second output tensor laid end to end: indices past the first address the second.
  Tensor a = at::zeros({1000}), b = at::zeros({n - 1000});
  aggregate.call({a, b}, {idx}, {val}, at::tensor({1.0f}), true);
  expect(at::equal(at::cat({a, b}), dense), "several output tensors are one flat index space");

  // The error path leaves the output untouched.
  Tensor snapshot = out.clone();
  bool threw = false;
  try {
    aggregate.call({out}, {idx, at::tensor({5, 3}, at::kLong)}, {val, at::ones({2}).to(at::kHalf)}, w, true);
  } catch (const c10::ValueError& e) {
    threw = std::string(e.what()).find("client 1") != std::string::npos;
  }
  expect(threw && at::equal(out, snapshot), "unsorted client raises ValueError naming client 1, out untouched");
  threw = false;
  try {
    aggregate.call({out}, {at::tensor({n}, at::kLong)}, {at::ones({1}).to(at::kHalf)}, at::tensor({1.0f}), true);
  } catch (const c10::ValueError& e) {
    threw = true;
  }
  expect(threw && at::equal(out, snapshot), "an index past the end raises ValueError, out untouched");

  return finish();
}
