// Which x86-64 instruction-set build the CPU kernels' small_gemm runs (5: AVX-512 with AMX-BF16
// tiles, 4: AVX-512, 3: AVX2 + FMA, 1: baseline), readable and switchable from Python (fastlora.cpu_isa / use_cpu_isa), so
// that tests and benchmarks can run on one machine what machines with fewer extensions run.
// Ops without tensor arguments: registered as catch-all kernels.
#include <torch/library.h>

#include "cpu/cpu_utils.h"
#include "cpu/small_gemm.h"

namespace fastlora {
namespace {

int64_t cpu_isa_level() { return small_gemm_isa(); }

int64_t use_cpu_isa_level(int64_t level) { return small_gemm_use_isa(static_cast<int>(level)); }

int64_t requested_cpu_isa_level() { return requested_level(); }

bool native_bf16() { return native_bf16_gemm(); }

bool native_fp16() { return native_fp16_gemm(); }

bool blas_avx512_sgemm() { return blas_has_avx512_sgemm(); }

bool blas_mkl_on_intel() { return blas_is_mkl_on_intel(); }

// For tests: -1 lets the machine decide whether ATen's float32 BLAS is MKL on an Intel CPU (with
// AVX-512 kernels from the avx512 level), 0 / 1 force the plan taken without / with it
// (blas_is_mkl_on_intel, blas_has_avx512_sgemm); returns the previous setting.
int64_t set_blas_avx512_plan(int64_t mode) {
  TORCH_CHECK(mode >= -1 && mode <= 1, "_set_blas_avx512_plan: mode must be -1, 0 or 1, got ", mode);
  return blas_plan_override().exchange(static_cast<int>(mode));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlora, m) {
  m.def("cpu_isa_level() -> int", &cpu_isa_level);
  m.def("use_cpu_isa_level(int level) -> int", &use_cpu_isa_level);
  m.def("requested_cpu_isa_level() -> int", &requested_cpu_isa_level);
  m.def("native_bf16_gemm() -> bool", &native_bf16);
  m.def("native_fp16_gemm() -> bool", &native_fp16);
  m.def("blas_avx512_sgemm() -> bool", &blas_avx512_sgemm);
  m.def("blas_mkl_on_intel() -> bool", &blas_mkl_on_intel);
  m.def("_set_blas_avx512_plan(int mode) -> int", &set_blas_avx512_plan);
}

}  // namespace fastlora
