// Counter-based dropout mask shared bit-for-bit with fastlora/reference/dropout_hash.py and the Triton
// kernels (kernels/lora_linear.py). The mask of element (row, col) is a pure function of
// (seed, row, col), so backward regenerates it instead of storing an M x K mask, and any
// tiling or thread split produces the same mask.
#pragma once
#include <cstdint>

namespace fastlora {

constexpr uint32_t kGolden32 = 0x9E3779B9u;

inline uint32_t fmix32(uint32_t h) {  // MurmurHash3 finaliser
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

struct DropoutParams {
  bool active = false;     // false: identity (p == 0 or eval mode)
  uint32_t seed_lo = 0;
  uint32_t seed_hi = 0;
  uint32_t threshold = 0;  // keep iff (hash >> 8) >= threshold
  double scale = 1.0;      // 1 / (1 - p); 0 when p == 1 (everything dropped)

  static DropoutParams make(double p, int64_t seed) {
    DropoutParams d;
    d.active = p > 0.0;
    uint64_t s = static_cast<uint64_t>(seed);
    d.seed_lo = static_cast<uint32_t>(s & 0xFFFFFFFFu);
    d.seed_hi = static_cast<uint32_t>((s >> 32) & 0xFFFFFFFFu);
    double t = p * 16777216.0 + 0.5;
    d.threshold = t >= 16777216.0 ? (1u << 24) : static_cast<uint32_t>(t);
    d.scale = p >= 1.0 ? 0.0 : 1.0 / (1.0 - p);
    return d;
  }

  uint32_t row_hash(int64_t row) const {
    return fmix32(static_cast<uint32_t>(row) ^ seed_lo);
  }
  bool keep(uint32_t row_h, int64_t col) const {
    uint32_t u = fmix32((row_h + static_cast<uint32_t>(col) * kGolden32) ^ seed_hi);
    return (u >> 8) >= threshold;
  }
};

}  // namespace fastlora
