// fastlora::sparse_aggregate_ family: schema. Kernels: csrc/cpu/aggregate_cpu.cpp (CPU),
// kernels/aggregate.py (CUDA, registered from Python), fastlora/reference/aggregate.py (elsewhere);
// wrapper and fake: fastlora/ops/aggregate.py.
//
//   sparse_aggregate_(out, indices, values, weights)
//     For each client i in list order, out[indices[i]] += weights[i] * float32(values[i]),
//     every product and sum rounded in float32 in that order (no FMA), so the result is
//     bitwise reproducible and folding clients in one call or one by one gives the same
//     bits. out: float32 tensors laid end to end (the flat index space of a layout).
//     validate=true checks every client (sorted unique in-range indices, values finite in
//     float32: a float64 beyond its range "does not fit float32") before anything is
//     written; validate=false is for updates already checked (decoded payloads, sparsify
//     outputs) and saves a full read of the inputs; the kernel then still
//     never writes outside the output (an index outside its chunk's window raises).
//     Sums overflow as IEEE float32 does (to +-inf): fastlora.sparse_aggregate bounds the
//     products first and checks (fastlora/ops/aggregate.py), once for every kernel.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastlora, m) {
  m.def("sparse_aggregate_(Tensor(a!)[] out, Tensor[] indices, Tensor[] values, Tensor weights, bool validate=True) -> ()");
}
