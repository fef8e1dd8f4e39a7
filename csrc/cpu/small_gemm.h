// Register-tiled GEMM for the thin products of the LoRA kernels, where one dimension is the
// rank r (1..64): g = dY @ B, d lora_B^T += xa^T @ dY, d lora_A += g^T @ dropout(x), the LoRA
// term g @ A of dX, and the forward's shrink. Called on L2-resident blocks of rows from inside
// the kernels' parallel regions (single-threaded, no allocation, no dispatch): through ATen
// each of these calls cost microseconds of op overhead per 64-row block, and the BLAS ran
// these shapes at 55-74 GFLOP/s per thread against ~93 for the base GEMM (measured on this
// project's 2-core Zen 4 machine; README, "LoRA linear" benchmarks, for the effect). Also
// rsvd's float32 passes over a tall matrix A with an l-column sketch (A X, A^T Y), split into
// row blocks by the caller (csrc/cpu/lowrank_cpu.cpp, sketch_product).
//
// Leaf code: raw pointers only, nothing from the rest of the package.
#pragma once

#include <cstdint>

namespace fastlora {

// C = alpha * (A @ B) + (accumulate ? C : 0), all row-major except A, which is read through
// strides so that a transposed operand needs no copy: A(i, p) = a[i * a_row + p * a_col].
// Shapes: A m x k, B k x n (row stride ldb), C m x n (row stride ldc). n is the vectorised
// dimension: make it the long contiguous one (or pad it to a multiple of 16 floats / 8
// doubles). Sums in the input type with fused multiply-adds; the order of the k sum is fixed,
// so results do not depend on threading.
void small_gemm(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t a_row, int64_t a_col,
                const float* b, int64_t ldb, bool accumulate, float* c, int64_t ldc);
void small_gemm(int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t a_row, int64_t a_col,
                const double* b, int64_t ldb, bool accumulate, double* c, int64_t ldc);

// The same product on bfloat16 operands with float32 sums, for the rank-r products of bfloat16
// LoRA layers: C = alpha * (A @ B) + (accumulate ? C : 0), C float32, k = 2 * k2. Both operands
// come in pairs along k (bfloat16 bit patterns): A's pair (i, p), its values for k = 2p (low
// half) and 2p + 1 (high half), is the two adjacent bfloat16 at a[i * a_row + p * a_col] (a row-
// major A has a_col = 2, any alignment); B is packed with its rows interleaved in pairs, b[p * ldb
// + j] = B(2p, j) | B(2p + 1, j) << 16 (pack_bf16_row_pairs). With AVX512-BF16 (vdpbf16ps, whose
// products and sums round to nearest even and flush subnormals) twice the multiply-adds per
// instruction of the float32 kernel; with AMX-BF16 (level 5) a row-major A (a_col = 2) runs in
// tiles (tdpbf16ps, 16 x 16 x 32 per instruction); elsewhere a portable float32 loop with the
// same sums.
// prefetch: memory the caller reads next (the next block of an operand it converts as it
// streams), fetched into L2 a little at a time while the products run, so that its reads from
// memory overlap the arithmetic instead of following it.
struct PrefetchRegion {
  const void* base = nullptr;  // rows of `bytes` bytes, `stride` bytes apart
  int64_t rows = 0, bytes = 0, stride = 0;
};
void small_gemm_bf16(int64_t m, int64_t n, int64_t k2, float alpha, const uint16_t* a, int64_t a_row,
                     int64_t a_col, const uint32_t* b, int64_t ldb, bool accumulate, float* c, int64_t ldc,
                     const PrefetchRegion& prefetch = {});
// Whether small_gemm_bf16 runs the AVX512-BF16 build here (the CPU has it and level 4 is in use),
// and whether it runs a row-major A (a_col = 2) in AMX tiles (level 5).
bool small_gemm_bf16_native();
bool small_gemm_bf16_amx();
// dst[p * ldd + j] = src(2p, j) | src(2p + 1, j) << 16 for the rows x cols bfloat16 matrix src
// (row stride ld): the B operand of small_gemm_bf16. An odd last row is paired with zeros.
void pack_bf16_row_pairs(const uint16_t* src, int64_t rows, int64_t cols, int64_t ld, uint32_t* dst, int64_t ldd);

// The x86-64 level whose build small_gemm runs: 5 (AVX-512 with AMX-BF16: small_gemm_bf16 in AMX
// tiles, the rest as at 4), 4 (AVX-512), 3 (AVX2 + FMA) or 1 (baseline, and every non-x86 or
// non-GCC build). small_gemm_use_isa switches to another level, capped at what the machine has,
// and returns the level now in use: for tests, which check every build the machine can run.
int small_gemm_isa();
int small_gemm_use_isa(int level);
// Whether bfloat16 GEMMs run natively here: the CPU has AVX512-BF16 or AMX-BF16 and the level
// in use is 4 (a cap below AVX-512 stands for a machine without them). Without them ATen's
// bfloat16 GEMMs are emulated, 100x or more slower than float32 ones.
bool native_bf16_gemm();
// Whether ATen's float16 GEMMs run natively here: torch says oneDNN has them (AVX512-FP16: Xeons
// since Sapphire Rapids; they accumulate in float32, at least at the float32 rate on half the
// bytes) and the level in use is at least 4 (a cap below AVX-512 stands for a CPU without them).
bool native_fp16_gemm();

// The cap that the environment variable FASTLORA_CPU_ISA (amx | avx512 | avx2 | baseline | auto)
// puts on the level at load time: 5, 4, 3 or 1 (5 = no cap).
int requested_level();
// Whether this process may run AMX-BF16 tiles: the CPU has them (with AVX512-BF16) and Linux
// granted the tile state (checked once).
bool machine_has_amx_bf16();

// Elements per SIMD register of the widest vector unit small_gemm targets (64 bytes); pad the
// vectorised dimension to a multiple of this to avoid the scalar column tail.
template <typename T>
constexpr int64_t small_gemm_lanes() {
  return 64 / static_cast<int64_t>(sizeof(T));
}

}  // namespace fastlora
