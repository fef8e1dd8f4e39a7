// CPU kernel of fastlora::sparse_aggregate_: weighted sum of many clients' sparse updates
// into a dense float32 output, without atomics.
//
// The flat output is cut into fixed chunks; each thread owns whole chunks and, for every
// client in order, binary-searches that client's sorted indices for the chunk's range and
// adds its entries. A chunk (512 KiB of float32, measured best among 64 KiB..1 MiB) stays in
// L2 while all clients' entries for it land, so the random scatter of N x nnz adds costs
// about one streaming pass over the output.
// Each output element receives its clients' contributions in client order whatever the
// thread count: results are bitwise identical across runs and thread counts.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace fastlora {
namespace {

using at::Tensor;

constexpr int64_t kOutChunk = 1 << 17;

struct OutPiece {
  float* data;
  int64_t offset, numel;
};

// Validates one client's indices (sorted, unique, in range) and values (finite, and within
// float32's range); raises a ValueError naming the client before anything is written.
template <typename T>
void check_client(int64_t client, const int64_t* idx, const T* val, int64_t nnz, int64_t numel) {
  for (int64_t j = 0; j < nnz; ++j) {
    TORCH_CHECK_VALUE(idx[j] >= 0 && idx[j] < numel, "sparse_aggregate: client ", client, ": index ", idx[j],
                      " at position ", j, " is out of range [0, ", numel, ")");
    TORCH_CHECK_VALUE(j == 0 || idx[j] > idx[j - 1], "sparse_aggregate: client ", client,
                      ": indices must be sorted ascending and unique (position ", j, ")");
    if (!std::isfinite(static_cast<float>(val[j]))) {
      // A finite float64 beyond float32's range would be accumulated as inf: say so.
      TORCH_CHECK_VALUE(!std::isfinite(static_cast<double>(val[j])), "sparse_aggregate: client ", client, ": value ",
                        static_cast<double>(val[j]), " at position ", j, " does not fit float32 (the accumulator)");
      TORCH_CHECK_VALUE(false, "sparse_aggregate: client ", client, ": non-finite value at position ", j);
    }
  }
}

template <typename F>
void with_values(const Tensor& v, F&& f) {
  switch (v.scalar_type()) {
    case at::kFloat: f(v.const_data_ptr<float>()); break;
    case at::kHalf: f(v.const_data_ptr<c10::Half>()); break;
    case at::kBFloat16: f(v.const_data_ptr<c10::BFloat16>()); break;
    case at::kDouble: f(v.const_data_ptr<double>()); break;
    default: TORCH_CHECK_TYPE(false, "sparse_aggregate: values must be floating point, got ", v.scalar_type());
  }
}

void sparse_aggregate_cpu(at::TensorList out, at::TensorList indices, at::TensorList values, const Tensor& weights,
                          bool validate) {
  const int64_t n_clients = static_cast<int64_t>(indices.size());
  TORCH_CHECK_VALUE(values.size() == indices.size(), "sparse_aggregate: ", indices.size(), " index tensors but ",
                    values.size(), " value tensors");
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.size(0) == n_clients, "sparse_aggregate: weights must have one entry per client (",
                    n_clients, "), got shape ", weights.sizes());
  std::vector<OutPiece> pieces;
  int64_t numel = 0;
  for (size_t p = 0; p < out.size(); ++p) {
    TORCH_CHECK_TYPE(out[p].scalar_type() == at::kFloat, "sparse_aggregate: out[", p, "] must be float32 (the accumulator), got ",
                     out[p].scalar_type());
    TORCH_CHECK_VALUE(out[p].is_contiguous(), "sparse_aggregate: out[", p, "] must be contiguous");
    pieces.push_back({out[p].data_ptr<float>(), numel, out[p].numel()});
    numel += out[p].numel();
  }
  const Tensor w = weights.to(at::kFloat).contiguous();
  const float* wp = w.const_data_ptr<float>();
  std::vector<Tensor> idx_c(n_clients), val_c(n_clients);
  for (int64_t i = 0; i < n_clients; ++i) {
    TORCH_CHECK_VALUE(indices[i].scalar_type() == at::kLong && indices[i].dim() == 1, "sparse_aggregate: client ", i,
                      ": indices must be a 1-D int64 tensor");
    TORCH_CHECK_VALUE(values[i].dim() == 1 && values[i].numel() == indices[i].numel(), "sparse_aggregate: client ", i,
                      ": values must be 1-D with as many entries as indices");
    TORCH_CHECK_VALUE(std::isfinite(wp[i]), "sparse_aggregate: client ", i, ": weight is not finite");
    idx_c[i] = indices[i].contiguous();
    val_c[i] = values[i].contiguous();
  }
  // Validate every client before writing anything (parallel over clients).
  if (validate) {
    at::parallel_for(0, n_clients, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        with_values(val_c[i], [&](auto* v) {
          check_client(i, idx_c[i].const_data_ptr<int64_t>(), v, idx_c[i].numel(), numel);
        });
      }
    });
  }
  if (!validate) {
    // O(1) per client: unvalidated (trusted) input must not have entries that no chunk's
    // window would ever see; the windows themselves catch unsorted entries.
    for (int64_t i = 0; i < n_clients; ++i) {
      const int64_t nnz = idx_c[i].numel();
      const int64_t* idx = idx_c[i].const_data_ptr<int64_t>();
      TORCH_CHECK_VALUE(nnz == 0 || (idx[0] >= 0 && idx[nnz - 1] < numel), "sparse_aggregate: client ", i,
                        ": indices are unsorted or out of range");
    }
  }
  if (numel == 0 || n_clients == 0) return;

  const int64_t n_chunks = (numel + kOutChunk - 1) / kOutChunk;
  at::parallel_for(0, n_chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t lo = c * kOutChunk, hi = std::min(numel, lo + kOutChunk);
      // The output pieces overlapping this chunk (a chunk may span tensors of the layout).
      auto first = std::upper_bound(pieces.begin(), pieces.end(), lo,
                                    [](int64_t g, const OutPiece& p) { return g < p.offset + p.numel; });
      // Pull the chunk into cache as one sequential stream (which the hardware prefetcher
      // handles at full bandwidth) instead of one demand miss per scattered add.
      for (auto p = first; p != pieces.end() && p->offset < hi; ++p) {
        const int64_t a = std::max(lo, p->offset) - p->offset, b = std::min(hi, p->offset + p->numel) - p->offset;
        for (int64_t e = a; e < b; e += 16) __builtin_prefetch(p->data + e, 1, 3);
      }
      for (int64_t i = 0; i < n_clients; ++i) {
        const int64_t* idx = idx_c[i].const_data_ptr<int64_t>();
        const int64_t nnz = idx_c[i].numel();
        const int64_t j0 = std::lower_bound(idx, idx + nnz, lo) - idx;
        const int64_t j1 = std::lower_bound(idx + j0, idx + nnz, hi) - idx;
        if (j0 == j1) continue;
        const float wi = wp[i];
        bool bad = false;
        with_values(val_c[i], [&](auto* v) {
          if (first->offset <= lo && hi <= first->offset + first->numel) {
            // Common case: the chunk lies inside one output tensor.
            float* o = first->data - first->offset + lo;  // o[g - lo] is element g
            const uint64_t span = static_cast<uint64_t>(hi - lo);
            for (int64_t j = j0; j < j1; ++j) {
              // Memory safety even for unvalidated input: binary search on unsorted
              // indices can hand us an index outside this chunk.
              const uint64_t off = static_cast<uint64_t>(idx[j] - lo);
              if (off >= span) {
                bad = true;
                break;
              }
              const float prod = wi * static_cast<float>(v[j]);
              o[off] = o[off] + prod;
            }
          } else {
            auto piece = first;
            for (int64_t j = j0; j < j1; ++j) {
              const int64_t g = idx[j];
              if (g < lo || g >= hi) {
                bad = true;
                break;
              }
              while (g >= piece->offset + piece->numel) ++piece;
              const float prod = wi * static_cast<float>(v[j]);
              float& o = piece->data[g - piece->offset];
              o = o + prod;
            }
          }
        });
        TORCH_CHECK_VALUE(!bad, "sparse_aggregate: client ", i, ": indices are unsorted or out of range");
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlora, CPU, m) {
  m.impl("sparse_aggregate_", &sparse_aggregate_cpu);
}

}  // namespace fastlora
