// The scan at the heart of fastlora::topk_sparsify's CPU kernel: one pass over float32 values
// that collects the candidates above a low bound. Builds for AVX-512, AVX2 and baseline
// x86-64; the one for small_gemm's level in use runs (FASTLORA_CPU_ISA caps it).
#pragma once

#include <cstdint>
#include <cstring>

namespace fastlora {
namespace sparsify_cpu {

// Keys: the bit pattern of |v| read as uint32, which for finite float32 v orders like |v|
// (denormals included, -0 == +0); keys >= kNonFiniteKey are inf or nan.
constexpr uint32_t kNonFiniteKey = 0x7F800000u;
inline uint32_t key_of(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits & 0x7FFFFFFFu;
}
// Entries past the returned count that scan_candidates may write into idx / val (the vector
// builds store whole vectors of compressed candidates).
constexpr int64_t kScanSlack = 16;

// Scans v[i] = d[i] + r[i] (d[i] alone where r is null), i in [0, n), the float32 addition of
// the reference, and writes the local index and the value of every candidate (a finite v
// with key >= lo) to idx and val in increasing order; idx and val must have room for
// n + kScanSlack entries. Returns the candidates' count. Adds the count of finite keys >= t
// to *above_t, and sets *first_nonfinite, where it is negative, to the first i whose v is
// inf or nan. n < 2^31 (the indices are int32; the op scans work items of 32768 values).
int64_t scan_candidates(const float* d, const float* r, int64_t n, uint32_t lo, uint32_t t, int32_t* idx,
                        float* val, int64_t* above_t, int64_t* first_nonfinite);

// The same with a given build: 4 (AVX-512), 3 (AVX2) or 1 (baseline); for tests, on a machine
// that has it.
int64_t scan_candidates_at(int level, const float* d, const float* r, int64_t n, uint32_t lo, uint32_t t,
                           int32_t* idx, float* val, int64_t* above_t, int64_t* first_nonfinite);

}  // namespace sparsify_cpu
}  // namespace fastlora
