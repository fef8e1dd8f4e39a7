// Small helpers shared by the CPU kernels of the LoRA op families.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "small_gemm.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>

// For an out-of-line loop over values: builds for AVX-512, AVX2 and baseline x86-64, the one
// for the machine picked at load time, so the loop is vectorised where the machine allows
// while the binary still runs on any x86-64 (the extension is built for baseline).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTLORA_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTLORA_VECTOR_CLONES
#endif

namespace fastlora {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// An uninitialised array of n T, for scratch that a kernel writes in full before reading it
// (std::vector's zeroing is one more pass over memory: with the LoRA kernels' few hundred KiB
// of per-call scratch, ~5% of a decode-sized bfloat16 step).
template <typename T>
std::unique_ptr<T[]> uninitialized(int64_t n) {
  return std::unique_ptr<T[]>(new T[static_cast<size_t>(std::max<int64_t>(n, 0))]);
}

// Whether a kernel on `dtype` runs the float32 kernels on float32 copies, its results rounded
// once: float16 (ATen has no fast float16 CPU GEMM: dY @ W took 10.8 s at M = 512, in = out =
// 2048 on AVX-512 Zen 4, 29 ms through float32) and bfloat16 without native bf16 GEMMs
// (native_bf16_gemm, small_gemm.h).
inline bool half_via_float32(at::ScalarType dtype) {
  return dtype == at::kHalf || (dtype == at::kBFloat16 && !native_bf16_gemm());
}
// Rows from which a float16 forward without a row-streaming path for its weight (lora_linear's
// half_decode takes the smaller batches it can) goes through float32 too: below it ATen's
// float16 GEMM stays cheaper than converting a weight whose copy is not kept (cache off or
// full): 20 ms at in = out = 4096, against ~0.7 ms per row. Emulated bfloat16 GEMMs are slower
// still (a 4096^2 layer's fwd+bwd took 1 s at M = 8 on an AVX2 EPYC): always converted.
constexpr int64_t kHalfViaFloatMinRows = 32;

// Whether ATen's float32 BLAS is MKL on an Intel CPU, where it picks kernels tuned for the
// CPU's vector level (on AMD it runs slower code): there it beats small_gemm on some of the shapes
// where small_gemm wins elsewhere (rsvd's passes from AVX2 up, lora_linear's fused dY @ W with
// AVX-512). The kernels' level stands for the machine: capped (FASTLORA_CPU_ISA, as make test-isa
// and the AVX2 benchmarks run with MKL capped too), the capped level's plan is taken.
// blas_plan_override(): -1 (the machine decides), 0 or 1 (as if the BLAS were or were not so
// tuned): set by tests (fastlora::_set_blas_avx512_plan) so that both plans run on any machine.
inline std::atomic<int>& blas_plan_override() {
  static std::atomic<int> value{-1};
  return value;
}
inline bool blas_is_mkl_on_intel() {
  const int forced = blas_plan_override().load(std::memory_order_relaxed);
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool intel = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") != 0;
  }();
#else
  const bool intel = false;
#endif
  static const bool mkl = at::hasMKL();  // a torch built on another BLAS (OpenBLAS) is not tuned so
  return forced >= 0 ? forced == 1 : intel && mkl;
}
// Whether ATen's float32 BLAS runs AVX-512 kernels here: MKL on an Intel CPU with the kernels
// not capped below AVX-512.
inline bool blas_has_avx512_sgemm() { return blas_is_mkl_on_intel() && small_gemm_isa() >= 4; }

// A row stride of at least `cols` elements of `size` bytes whose byte length is not a multiple
// of 4 KiB, for buffers that AMX tiles load: a tile load reads 16 rows, and at 4 KiB multiples
// all 16 fall in one L1 set, which holds 12 lines. Measured (Xeon, interleaved): rsvd's A^T Y
// pass 4.3-4.6 ms at 4096^2, l = 48, against 5.2-5.4; the bfloat16 LoRA backward's own part
// 0.51 vs 0.55 ms (M = 512, 2048^2) and 8.3 vs 8.7 ms (M = 2048, 4096^2, r = 64).
inline int64_t tile_row_stride(int64_t cols, int64_t size) {
  const int64_t bytes = cols * size;
  return bytes >= 4096 && bytes % 4096 == 0 ? cols + 64 / size : cols;
}

// t itself when its rows are contiguous (last stride 1: the BLAS takes any leading stride),
// otherwise a contiguous copy.
inline at::Tensor row_major(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// Accumulation type of a kernel on scalar_t: float64 for double, float32 otherwise (also for
// float16 / bfloat16, which are rounded once at the end, as in the reference).
template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// dst[j * ld_dst + i] = src[i * ld_src + j] for a rows x cols source. Four source rows at a
// time: they are read as four sequential streams (which the hardware prefetcher follows) and
// each destination row gets four adjacent elements. Walking a column of the source instead
// steps by the row stride, which for power-of-two widths maps every load to one L1 set:
// measured 7x slower on a 64 x 1024 float block (180 vs 25 us), which is what the backward
// transposes per block of dY.
template <typename T>
void transpose_into(const T* src, int64_t rows, int64_t cols, int64_t ld_src, T* dst, int64_t ld_dst) {
  constexpr int64_t kR = 4;
  int64_t i0 = 0;
  for (; i0 + kR <= rows; i0 += kR) {
    const T* s = src + i0 * ld_src;
    for (int64_t j = 0; j < cols; ++j) {
      T* o = dst + j * ld_dst + i0;
      for (int64_t i = 0; i < kR; ++i) o[i] = s[i * ld_src + j];
    }
  }
  for (; i0 < rows; ++i0) {
    for (int64_t j = 0; j < cols; ++j) dst[j * ld_dst + i0] = src[i0 * ld_src + j];
  }
}

// A row-major copy of the transpose of a 2-D tensor, through transpose_into (ATen's strided
// copy took 84 us for a 4096 x 16 bfloat16 lora_B, more than the LoRA work of a decode step).
inline at::Tensor transposed_copy(const at::Tensor& t) {
  const at::Tensor src = row_major(t);
  at::Tensor out = at::empty({src.size(1), src.size(0)}, src.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "fastlora_transposed_copy", [&] {
    transpose_into(src.const_data_ptr<scalar_t>(), src.size(0), src.size(1), src.stride(0),
                   out.mutable_data_ptr<scalar_t>(), src.size(0));
  });
  return out;
}

// The float32 value of a bfloat16 bit pattern: exact (a bfloat16 is the top half of a float32),
// integer ops only, so loops over it vectorize.
inline float bf16_bits_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// The bfloat16 bit pattern nearest to f (ties to even, as torch rounds; NaN stays NaN): integer
// ops only, so loops over it vectorize (c10's conversion does not).
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return f != f ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
}

// out = bfloat16(float(out) + add), elementwise, both contiguous and of one shape: the float32
// branch added to the rounded bf16 base product and rounded once (round to nearest even, as
// torch rounds; NaN stays NaN). ATen's mixed-dtype add_ took 3.5 ms for 1024 x 1376 on 2 threads
// (Zen 4), as long as the base GEMM itself; this loop vectorizes (integer ops only).
inline void add_float_into_bf16(at::Tensor& out, const at::Tensor& add) {
  uint16_t* o = reinterpret_cast<uint16_t*>(out.mutable_data_ptr<at::BFloat16>());
  const float* a = add.const_data_ptr<float>();
  at::parallel_for(0, out.numel(), int64_t{1} << 15, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) o[i] = float_to_bf16_bits(bf16_bits_to_float(o[i]) + a[i]);
  });
}

}  // namespace fastlora
