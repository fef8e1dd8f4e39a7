// fastlora::topk_sparsify family: schema. Kernels: csrc/cpu/sparsify_cpu.cpp (CPU),
// kernels/sparsify.py (CUDA, registered from Python), fastlora/reference/sparsify.py (elsewhere);
// wrapper, fake and argument checks: fastlora/ops/sparsify.py.
//
//   topk_sparsify(deltas, residuals, k, approx, value_dtype) -> (indices, values)
//     Selects the k entries of largest |delta + residual| over all tensors laid end to end
//     (flat index = tensor offset + row-major position), ties to the lowest flat index.
//     residuals (float32, same shapes, or an empty list) are updated in place with what was
//     not sent: residual = delta + residual - float32(value) at kept entries, delta +
//     residual elsewhere. Non-finite inputs raise before anything is written.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastlora, m) {
  m.def(
      "topk_sparsify(Tensor[] deltas, Tensor(a!)[] residuals, int k, bool approx, ScalarType value_dtype) "
      "-> (Tensor indices, Tensor values)");
}
