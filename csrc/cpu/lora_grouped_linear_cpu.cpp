// CPU kernel of fastlora::lora_grouped_linear_fwd (mixed-adapter batches, SGMV-style).
//
//  1. The rows are counting-sorted by adapter (O(M), stable; base rows form bucket -1) and cut
//     into tasks of (adapter, <= kChunk rows).
//  2. One thread per task writes its rows of y once: base rows (and rows of rank-0 adapters)
//     get the bias (or 0); adapter rows get bias + s_k * (rows @ A_k[:r_k]^T) @ B_k[:, :r_k]^T
//     (two small single-threaded GEMMs, the second with the bias and s_k in its epilogue). A
//     task whose rows are consecutive in x (the usual case: a sample's sequence positions) reads
//     x and writes y in place; otherwise its rows are gathered into / scattered from small
//     L2-resident buffers; tasks of a few rows (decode) use plain loops instead of BLAS calls.
//     Every row belongs to exactly one task: no two threads write a row.
//  3. y += x @ W^T: one full-size BLAS GEMM on all threads, accumulating on top (beta = 1), so
//     the LoRA branch costs no extra pass over the M x N output.
// Padding past ranks[k] is never read, so the stacked weights may hold anything there.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../lora_op_checks.h"
#include "cpu_utils.h"
#include "weight_cache.h"

namespace fastlora {
namespace {

using at::Tensor;

// Rows per task: big enough for the two small GEMMs to run near BLAS speed (64 -> 128 rows
// saved ~15% of the LoRA part at r = 16), small enough that a batch of a few hundred rows over
// a few adapters still gives every thread work.
constexpr int64_t kChunk = 128;

// Decode-sized work: tasks of at most kSmallRows rows compute the LoRA term with plain loops
// (no BLAS call); when every adapter task is that small and the batch has at most
// kSerialRows rows, all tasks run on the calling thread (no fork/join at all). A BLAS call
// there would use the BLAS's own threads for a few rows (one fork/join per tiny GEMM).
constexpr int64_t kSmallRows = 4;
constexpr int64_t kSerialRows = 256;

struct Task {
  int64_t adapter, begin, end;  // rows perm[begin:end] all use `adapter` (-1: base rows)
};

// y[rows[i]] = bias + s * (x[rows[i]] @ A_k[:r]^T) @ B_k[:, :r]^T for a few rows, with loops:
// fp32 accumulation (float64 for double), the shrink kept in the accumulator type, one rounding.
template <typename scalar_t>
void small_rows(const Tensor& x, const Tensor& lora_A, const Tensor& lora_B, const Tensor& bias_row, Tensor& y,
                const int64_t* rows, int64_t n, int64_t k, int64_t r, double s) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t in = x.size(1), out = y.size(1), ldx = x.stride(0);
  const int64_t sa_r = lora_A.stride(1), sa_c = lora_A.stride(2), sb_o = lora_B.stride(1), sb_r = lora_B.stride(2);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* Ak = lora_A.const_data_ptr<scalar_t>() + k * lora_A.stride(0);
  const scalar_t* Bk = lora_B.const_data_ptr<scalar_t>() + k * lora_B.stride(0);
  const scalar_t* bias = bias_row.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  const acc_t sa = static_cast<acc_t>(s);
  std::vector<acc_t> xa(r);
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* xr = xp + rows[i] * ldx;
    for (int64_t q = 0; q < r; ++q) {
      const scalar_t* a = Ak + q * sa_r;
      acc_t acc = 0;
      for (int64_t c = 0; c < in; ++c) acc += static_cast<acc_t>(xr[c]) * static_cast<acc_t>(a[c * sa_c]);
      xa[q] = acc;
    }
    scalar_t* yr = yp + rows[i] * out;
    for (int64_t o = 0; o < out; ++o) {
      const scalar_t* b = Bk + o * sb_o;
      acc_t acc = 0;
      for (int64_t q = 0; q < r; ++q) acc += xa[q] * static_cast<acc_t>(b[q * sb_r]);
      yr[o] = static_cast<scalar_t>(static_cast<acc_t>(bias[o]) + sa * acc);
    }
  }
}

Tensor lora_grouped_linear_fwd_cpu(const Tensor& x_in, const Tensor& weight, const std::optional<Tensor>& bias,
                                   const Tensor& lora_A, const Tensor& lora_B, const Tensor& scalings,
                                   const Tensor& ranks, const Tensor& row_adapter) {
  constexpr const char* fn = "fastlora.lora_grouped_linear";
  check_lora_grouped_fwd_args(x_in, weight, bias, lora_A, lora_B, scalings, ranks, row_adapter);
  const at::ScalarType dtype = x_in.scalar_type();
  if (half_via_float32(dtype) && (dtype == at::kBFloat16 || x_in.size(0) >= kHalfViaFloatMinRows)) {
    // As lora_linear: the float32 kernel on float32 copies (the weight's kept across calls),
    // y rounded once, instead of ATen's emulated bfloat16 / slow float16 GEMMs (the base product
    // alone took seconds at 512 x 2048^2).
    const Tensor y = lora_grouped_linear_fwd_cpu(x_in.to(at::kFloat), float32_weight(weight),
                                                 bias ? std::optional<Tensor>(bias->to(at::kFloat)) : std::nullopt,
                                                 lora_A.to(at::kFloat), lora_B.to(at::kFloat), scalings, ranks,
                                                 row_adapter);
    return y.to(dtype);
  }
  const Tensor x = row_major(x_in);
  const int64_t M = x.size(0), in = x.size(1), out = weight.size(0);
  const int64_t K = lora_A.size(0), r_max = lora_A.size(1);

  // Values of the metadata (only kernels read them).
  const Tensor ranks_c = ranks.to(at::kCPU).contiguous();
  const int64_t* rk = ranks_c.const_data_ptr<int64_t>();
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK_VALUE(rk[k] >= 0 && rk[k] <= r_max, fn, ": ranks[", k, "] = ", rk[k],
                      " is out of range [0, r_max=", r_max, "]");
  }
  const Tensor scal_c = scalings.to(at::kCPU).to(at::kDouble).contiguous();
  const double* sc = scal_c.const_data_ptr<double>();
  const Tensor ra_c = row_adapter.to(at::kCPU).contiguous();
  const int64_t* ra = ra_c.const_data_ptr<int64_t>();
  // Buckets b = adapter + 1 (bucket 0: base rows): counts, then bucket starts.
  std::vector<int64_t> start(K + 2, 0);
  for (int64_t i = 0; i < M; ++i) {
    const int64_t a = ra[i];
    TORCH_CHECK_VALUE(a >= -1 && a < K, fn, ": row_adapter[", i, "] = ", a, " is out of range [-1, num_adapters=", K,
                      ") (-1 = base model only)");
    ++start[a + 2];
  }
  Tensor y = at::empty({M, out}, x.options());
  if (M == 0) return y;

  // Stable counting sort; tasks of <= kChunk rows of one bucket.
  for (int64_t b = 0; b <= K; ++b) start[b + 1] += start[b];
  std::vector<int64_t> perm(M);
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < M; ++i) perm[next[ra[i] + 1]++] = i;
  }
  std::vector<Task> tasks;
  for (int64_t b = 0; b <= K; ++b) {
    for (int64_t r0 = start[b]; r0 < start[b + 1]; r0 += kChunk) {
      tasks.push_back({b - 1, r0, std::min(r0 + kChunk, start[b + 1])});
    }
  }
  const int64_t ntasks = static_cast<int64_t>(tasks.size());
  bool serial = M <= kSerialRows;
  for (const Task& task : tasks) {
    if (task.adapter >= 0 && rk[task.adapter] > 0 && task.end - task.begin > kSmallRows) serial = false;
  }

  const Tensor bias_row = bias ? bias->contiguous() : at::zeros({out}, x.options());
  const int64_t esize = x.element_size(), ldx = x.stride(0);
  const size_t x_row_bytes = static_cast<size_t>(in) * esize, y_row_bytes = static_cast<size_t>(out) * esize;
  const char* xp = static_cast<const char*>(x.const_data_ptr());
  const char* bp = static_cast<const char*>(bias_row.const_data_ptr());
  char* yp = static_cast<char*>(y.mutable_data_ptr());  // contiguous (M, out)
  // Serial only when no task calls the BLAS: run inline, the small GEMMs of bigger tasks would
  // each use the BLAS's own threads (one fork/join per GEMM: measured 196 ms vs 14 ms at 64
  // rows x 8 adapters on 2 threads).
  at::parallel_for(0, ntasks, serial ? ntasks : 1, [&](int64_t t0, int64_t t1) {
    // Worker threads do not inherit the caller's dispatch state: we are below autograd.
    at::AutoDispatchBelowAutograd below_autograd;
    Tensor xbuf, ybuf;  // gather / scatter buffers, allocated on first use
    for (int64_t t = t0; t < t1; ++t) {
      const Task& task = tasks[t];
      const int64_t n = task.end - task.begin;
      const int64_t* rows = perm.data() + task.begin;
      const bool consecutive = rows[n - 1] - rows[0] == n - 1;  // rows ascend within a bucket
      const int64_t r = task.adapter >= 0 ? rk[task.adapter] : 0;
      if (r == 0) {  // base rows: the bias (or 0); the base GEMM adds x @ W^T below
        for (int64_t j = 0; j < n; ++j) std::memcpy(yp + rows[j] * y_row_bytes, bp, y_row_bytes);
        continue;
      }
      if (n <= kSmallRows) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastlora_grouped_small_rows", [&] {
          small_rows<scalar_t>(x, lora_A, lora_B, bias_row, y, rows, n, task.adapter, r, sc[task.adapter]);
        });
        continue;
      }
      Tensor xin;
      if (consecutive) {
        xin = x.narrow(0, rows[0], n);
      } else {
        if (!xbuf.defined()) xbuf = at::empty({kChunk, in}, x.options());
        char* xb = static_cast<char*>(xbuf.mutable_data_ptr());
        for (int64_t j = 0; j < n; ++j) std::memcpy(xb + j * x_row_bytes, xp + rows[j] * ldx * esize, x_row_bytes);
        xin = xbuf.narrow(0, 0, n);
      }
      const Tensor A_k = lora_A.select(0, task.adapter).narrow(0, 0, r);  // (r, in)
      const Tensor B_k = lora_B.select(0, task.adapter).narrow(1, 0, r);  // (out, r)
      const Tensor xa = at::mm(xin, A_k.t());
      if (consecutive) {
        Tensor yv = y.narrow(0, rows[0], n);
        at::addmm_out(yv, bias_row, xa, B_k.t(), 1.0, sc[task.adapter]);
      } else {
        if (!ybuf.defined()) ybuf = at::empty({kChunk, out}, x.options());
        Tensor yv = ybuf.narrow(0, 0, n);
        at::addmm_out(yv, bias_row, xa, B_k.t(), 1.0, sc[task.adapter]);
        const char* yb = static_cast<const char*>(ybuf.const_data_ptr());
        for (int64_t j = 0; j < n; ++j) std::memcpy(yp + rows[j] * y_row_bytes, yb + j * y_row_bytes, y_row_bytes);
      }
    }
  });
  y.addmm_(x, weight.t());
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlora, CPU, m) {
  m.impl("lora_grouped_linear_fwd", &lora_grouped_linear_fwd_cpu);
}

}  // namespace fastlora
