// CPU kernels of fastlora::lora_linear_fwd / lora_linear_bwd.
//
// The GEMMs go to ATen's BLAS (MKL/oneDNN); what this file adds is the fusion around them:
//  * dropout is applied on the fly, one block of rows at a time, from the counter-based hash
//    (dropout_hash.h): no M x K mask or dropped copy of x is ever materialised or stored;
//  * the LoRA expand and the bias are written into the output first and the base GEMM then
//    accumulates on top of them (beta = 1), so the LoRA branch costs no extra pass over the
//    M x N output;
//  * backward is one pass over L2-sized blocks of rows (one thread per block when there are
//    enough blocks): g = s * dY @ B once per block, reused for d lora_A and for the LoRA term
//    of dX (masked as it is written); d lora_A / d lora_B are per-thread partials summed in a
//    fixed order; the dY @ W GEMM then accumulates onto dX at full size (beta = 1).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../dropout_hash.h"
#include "cpu_utils.h"

namespace fastlora {
namespace {

using at::Tensor;

// Per-column multipliers (scale if kept, 0 if dropped) of one row. Kept in its own function
// with target clones so the uint32 hash loop is vectorised with AVX2/AVX-512 where the
// machine has them, while the binary still runs on any x86-64.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTLORA_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTLORA_VECTOR_CLONES
#endif

FASTLORA_VECTOR_CLONES
void row_multipliers_f32(float* __restrict out, int64_t cols, uint32_t row_h, uint32_t seed_hi,
                         uint32_t threshold, float scale) {
  for (int64_t j = 0; j < cols; ++j) {
    uint32_t u = fmix32((row_h + static_cast<uint32_t>(j) * kGolden32) ^ seed_hi);
    out[j] = (u >> 8) >= threshold ? scale : 0.0f;
  }
}

FASTLORA_VECTOR_CLONES
void row_multipliers_f64(double* __restrict out, int64_t cols, uint32_t row_h, uint32_t seed_hi,
                         uint32_t threshold, double scale) {
  for (int64_t j = 0; j < cols; ++j) {
    uint32_t u = fmix32((row_h + static_cast<uint32_t>(j) * kGolden32) ^ seed_hi);
    out[j] = (u >> 8) >= threshold ? scale : 0.0;
  }
}

// The multipliers of row `row` into mult (cols entries), in the accumulation type.
template <typename acc_t>
void row_mask(std::vector<acc_t>& mult, int64_t row, const DropoutParams& d) {
  const uint32_t h = d.row_hash(row);
  const int64_t cols = static_cast<int64_t>(mult.size());
  if constexpr (std::is_same_v<acc_t, double>) {
    row_multipliers_f64(mult.data(), cols, h, d.seed_hi, d.threshold, d.scale);
  } else {
    row_multipliers_f32(mult.data(), cols, h, d.seed_hi, d.threshold, static_cast<float>(d.scale));
  }
}

// For the rows of a block: dst[i, :] = src[i, :] * mask(row0 + i, :) * scale (src may alias
// dst) and, when `also` is given, also[i, :] *= the same multipliers in place: backward's two
// uses of one mask (dropout(x) for d lora_A, the mask on the dX LoRA term) from a single hash
// evaluation per element. Math in float32 (float64 for double), rounded once to scalar_t, as in
// the reference.
template <typename scalar_t, bool kAlso>
void dropout_rows(const Tensor& src, Tensor& dst, Tensor* also, int64_t row0, const DropoutParams& d) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t rows = src.size(0), cols = src.size(1);
  const int64_t lds = src.stride(0), ldd = dst.stride(0), lda = kAlso ? also->stride(0) : 0;
  const scalar_t* s = src.const_data_ptr<scalar_t>();
  scalar_t* o = dst.mutable_data_ptr<scalar_t>();
  scalar_t* a = kAlso ? also->mutable_data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> mult(cols);
    for (int64_t i = begin; i < end; ++i) {
      row_mask(mult, row0 + i, d);
      const scalar_t* si = s + i * lds;
      scalar_t* oi = o + i * ldd;
      for (int64_t j = 0; j < cols; ++j) {
        oi[j] = static_cast<scalar_t>(static_cast<acc_t>(si[j]) * mult[j]);
      }
      if constexpr (kAlso) {
        scalar_t* ai = a + i * lda;
        for (int64_t j = 0; j < cols; ++j) {
          ai[j] = static_cast<scalar_t>(static_cast<acc_t>(ai[j]) * mult[j]);
        }
      }
    }
  });
}

void dropout_rows_(const Tensor& src, Tensor& dst, int64_t row0, const DropoutParams& d) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "fastlora_dropout_rows",
                                  [&] { dropout_rows<scalar_t, false>(src, dst, nullptr, row0, d); });
}

void dropout_rows_pair_(const Tensor& x, Tensor& xd, Tensor& gx, int64_t row0, const DropoutParams& d) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastlora_dropout_rows_pair",
                                  [&] { dropout_rows<scalar_t, true>(x, xd, &gx, row0, d); });
}

// Rows per block in the blocked loops: a block of each M x K / M x N operand (~256 KiB) should
// stay in L2 while the few small GEMMs on it run, one thread per block.
int64_t block_rows(int64_t cols, int64_t elem_size) {
  int64_t rows = (int64_t{1} << 18) / std::max<int64_t>(1, cols * elem_size);
  return std::max<int64_t>(16, rows / 16 * 16);
}

// Runs body over the row blocks: one thread per block when there are enough blocks to keep
// every thread busy, otherwise sequentially so that each small GEMM gets all threads (a
// decode-sized batch is one block: single-threaded blocks would leave cores idle).
template <typename F>
void run_blocks(int64_t nblocks, const F& body) {
  if (nblocks >= 2 * at::get_num_threads()) {
    at::parallel_for(0, nblocks, 1, body);
  } else if (nblocks > 0) {
    body(0, nblocks);
  }
}

int64_t seed_value(const Tensor& seed) { return seed.item<int64_t>(); }

// acc += alpha * a @ b, where acc may be float32 while a, b are half precision: then the
// block product is rounded once to the input dtype and summed in float32.
void accumulate_mm(Tensor& acc, const Tensor& a, const Tensor& b, double alpha) {
  if (acc.scalar_type() == a.scalar_type()) {
    acc.addmm_(a, b, 1.0, alpha);
  } else {
    acc.add_(at::mm(a, b), alpha);
  }
}

std::tuple<Tensor, Tensor> lora_linear_fwd_cpu(const Tensor& x_in, const Tensor& weight,
                                               const std::optional<Tensor>& bias, const Tensor& lora_A,
                                               const Tensor& lora_B, double scaling, double dropout_p,
                                               const Tensor& seed, const std::optional<Tensor>& lora_B_bias) {
  TORCH_CHECK(x_in.dim() == 2, "fastlora::lora_linear_fwd expects a 2-D x");
  const Tensor x = row_major(x_in);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_A.size(0);
  const DropoutParams d = DropoutParams::make(dropout_p, seed_value(seed));

  Tensor xa;
  if (!d.active || M == 0) {
    xa = at::mm(x, lora_A.t());
  } else {
    // One thread per block of rows: dropout into an L2-resident buffer, then the shrink GEMM
    // on it (single-threaded inside the parallel region), so x is read once.
    xa = at::empty({M, r}, x.options());
    const int64_t bm = std::min(M, block_rows(K, x.element_size()));
    const int64_t nblocks = (M + bm - 1) / bm;
    auto body = [&](int64_t b0, int64_t b1) {
      // Worker threads do not inherit the caller's dispatch state: we are below autograd.
      at::AutoDispatchBelowAutograd below_autograd;
      Tensor xdrop = at::empty({bm, K}, x.options());
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = blk * bm, n = std::min(bm, M - r0);
        Tensor xd = xdrop.narrow(0, 0, n);
        dropout_rows_(x.narrow(0, r0, n), xd, r0, d);
        Tensor xa_blk = xa.narrow(0, r0, n);
        at::mm_out(xa_blk, xd, lora_A.t());
      }
    };
    run_blocks(nblocks, body);
  }

  // y = bias + s * lora_B_bias + s * xa @ B^T, then y += x @ W^T inside the base GEMM.
  Tensor bias_eff;
  if (bias && lora_B_bias) {
    bias_eff = bias->add(*lora_B_bias, scaling);
  } else if (bias) {
    bias_eff = *bias;
  } else if (lora_B_bias) {
    bias_eff = lora_B_bias->mul(scaling);
  }
  Tensor y;
  if (bias_eff.defined()) {
    y = at::addmm(bias_eff, xa, lora_B.t(), 1.0, scaling);
  } else {
    y = at::mm(xa.mul(scaling), lora_B.t());
  }
  y.addmm_(x, weight.t());
  return {y, xa};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lora_linear_bwd_cpu(
    const Tensor& grad_y_in, const Tensor& x_in, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B,
    const Tensor& xa, double scaling, double dropout_p, const Tensor& seed, std::array<bool, 3> output_mask) {
  TORCH_CHECK(x_in.dim() == 2 && grad_y_in.dim() == 2, "fastlora::lora_linear_bwd expects 2-D x and grad_y");
  const Tensor x = row_major(x_in);
  const Tensor dy = row_major(grad_y_in);
  const int64_t M = x.size(0), K = x.size(1);
  const bool need_x = output_mask[0], need_w = output_mask[1], need_b = output_mask[2];
  const DropoutParams d = DropoutParams::make(dropout_p, seed_value(seed));
  // Outputs not requested are distinct empty tensors (outputs must never alias).
  auto empty = [&] { return at::empty({0}, dy.options()); };

  // One pass over the rows in blocks, one thread per block, every block's operands hot in L2:
  //   g    = s * dY_b @ B                 (shared by grad_A and grad_x)
  //   B^T += s * xa_b^T @ dY_b             (per-thread partial)
  //   A   += g^T @ dropout(x_b)            (per-thread partial; mask regenerated)
  //   dX_b = dropout_mask(g @ A)           (LoRA term of grad_x, masked as it is written)
  // then the base GEMM accumulates dY @ W onto dX at full size (beta = 1). The small GEMMs run
  // single-threaded inside the parallel region, so the whole pass costs one fork/join.
  const int64_t r = lora_A.size(0), N = dy.size(1);
  const bool half = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  const auto acc_opts = half ? x.options().dtype(at::kFloat) : x.options();
  const int64_t bm = std::max<int64_t>(1, std::min(M, block_rows(std::max(K, N), x.element_size())));
  const int64_t nblocks = (M + bm - 1) / bm;
  const int nthreads = std::max(1, at::get_num_threads());  // thread ids are < this
  std::vector<Tensor> part_A(nthreads), part_Bt(nthreads);
  Tensor grad_x = need_x ? at::empty({M, K}, x.options()) : empty();
  auto body = [&](int64_t b0, int64_t b1) {
    at::AutoDispatchBelowAutograd below_autograd;  // worker threads: see the forward
    const int tid = at::get_thread_num();
    Tensor& pa = part_A[tid];
    Tensor& pb = part_Bt[tid];
    if (!pa.defined()) {
      pa = at::zeros({r, K}, acc_opts);
      pb = at::zeros({r, N}, acc_opts);
    }
    Tensor xdrop = d.active ? at::empty({bm, K}, x.options()) : Tensor();
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * bm, n = std::min(bm, M - r0);
      const Tensor dy_b = dy.narrow(0, r0, n), x_b = x.narrow(0, r0, n);
      const Tensor g = at::mm(dy_b, lora_B).mul_(scaling);
      accumulate_mm(pb, xa.narrow(0, r0, n).t(), dy_b, scaling);
      Tensor xd = x_b;
      if (need_x) {
        Tensor gx = grad_x.narrow(0, r0, n);
        at::mm_out(gx, g, lora_A);
        if (d.active) {  // one mask evaluation for both of its uses
          xd = xdrop.narrow(0, 0, n);
          dropout_rows_pair_(x_b, xd, gx, r0, d);
        }
      } else if (d.active) {
        xd = xdrop.narrow(0, 0, n);
        dropout_rows_(x_b, xd, r0, d);
      }
      accumulate_mm(pa, g.t(), xd, 1.0);
    }
  };
  run_blocks(nblocks, body);
  Tensor acc_A, acc_Bt;
  for (int t = 0; t < nthreads; ++t) {  // fixed order
    if (!part_A[t].defined()) continue;
    if (!acc_A.defined()) {
      acc_A = part_A[t];
      acc_Bt = part_Bt[t];
    } else {
      acc_A.add_(part_A[t]);
      acc_Bt.add_(part_Bt[t]);
    }
  }
  if (!acc_A.defined()) {  // M == 0
    acc_A = at::zeros({r, K}, acc_opts);
    acc_Bt = at::zeros({r, N}, acc_opts);
  }
  Tensor grad_A = acc_A.to(x.scalar_type());
  Tensor grad_B = acc_Bt.t().contiguous().to(x.scalar_type());
  if (need_x && M > 0) grad_x.addmm_(dy, weight);
  Tensor grad_w = need_w ? at::mm(dy.t(), x) : empty();
  Tensor grad_b = need_b ? dy.sum(0) : empty();
  return {grad_x, grad_w, grad_b, grad_A, grad_B};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlora, CPU, m) {
  m.impl("lora_linear_fwd", &lora_linear_fwd_cpu);
  m.impl("lora_linear_bwd", &lora_linear_bwd_cpu);
}

}  // namespace fastlora
