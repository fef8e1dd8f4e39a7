// C++-level tests of fastlora::topk_sparsify through the dispatcher (no Python involved).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cstdio>

#include "expect.h"
#include <string>
#include <vector>

using fastlora_test::expect;
using fastlora_test::finish;

namespace {

using at::Tensor;

}  // namespace

int main() {
  auto sparsify = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("fastlora::topk_sparsify", "")
                      .typed<std::tuple<Tensor, Tensor>(at::TensorList, at::TensorList, int64_t, bool, at::ScalarType)>();
  at::manual_seed(0);

  // Two tensors laid end to end; global top-k with error feedback conserves mass exactly.
  std::vector<Tensor> deltas = {at::randn({300, 7}), at::randn({1000})};
  std::vector<Tensor> residuals = {at::randn({300, 7}) * 0.1, at::randn({1000}) * 0.1};
  std::vector<Tensor> before = {residuals[0].clone(), residuals[1].clone()};
  auto [idx, val] = sparsify.call(deltas, residuals, 123, false, at::kHalf);
  expect(idx.numel() == 123 && val.scalar_type() == at::kHalf, "exactly k values in the travel dtype");
  Tensor v = at::cat({(deltas[0] + before[0]).reshape(-1), (deltas[1] + before[1]).reshape(-1)});
  Tensor dense = at::zeros({v.numel()});
  dense.index_put_({idx}, val.to(at::kFloat));
  Tensor res = at::cat({residuals[0].reshape(-1), residuals[1].reshape(-1)});
  expect(at::equal(dense + res, v), "mass conservation: sent + residual_new == delta + residual_old (bitwise)");
  Tensor kept = at::zeros({v.numel()}, at::kBool).index_fill_(0, idx, true);
  expect(v.abs().masked_select(kept).min().item<float>() >= v.abs().masked_select(kept.logical_not()).max().item<float>(),
         "every kept |v| >= every dropped |v|");
  expect(at::equal(std::get<0>(idx.sort()), idx), "indices sorted ascending");

  return finish();
}
