// The decode-sized kernels of csrc/cpu/rows_dot.h, their AVX2 build and (where the machine has
// AVX-512) their 16-lane one, against a float64 loop: rows_dot_add (float32, bfloat16 and
// float16 weights, which must agree bitwise, the 16-bit ones on their float32 copies; and
// rows_dot_add_tall, the shrink's four-row tiles, bitwise equal to float32 rows_dot_add) and
// rows_axpy_add (bfloat16 and float16, bitwise alike on the same values; a column range split at
// any group boundary must give the same bits), over row counts that hit every register block
// (4 x-rows and 2 or 4 W-rows, 4 or 8 dY-rows, and their tails), K around the 16-column groups (the
// zero-padded tail group) and padded leading dimensions. The kernels run from level 3 (AVX2 +
// FMA + F16C) up; on a machine without it there is nothing to test.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "../../csrc/cpu/rows_dot.h"
#include "../../csrc/cpu/small_gemm.h"
#include "expect.h"

using fastlora_test::expect;
using fastlora_test::finish;
namespace lc = fastlora::lora_cpu;

namespace {

float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

uint16_t float_to_bf16_truncated(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return static_cast<uint16_t>(bits >> 16);
}

// A float exactly representable in both bfloat16 and float16: 8 significant bits, exponent
// well inside float16's normal range.
float both_formats(std::mt19937& rng) {
  std::uniform_int_distribution<int> mant(128, 255), expo(-6, 3), sign(0, 1);
  return std::ldexp(static_cast<float>(mant(rng)), expo(rng) - 7) * (sign(rng) ? -1.0f : 1.0f);
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), sizeof(float) * a.size()) == 0;
}

}  // namespace

int main() {
  const int previous = fastlora::small_gemm_isa();
  if (fastlora::small_gemm_use_isa(3) != 3) {
    std::printf("skipped: this machine has no AVX2 + FMA build\n");
    return finish();
  }
  expect(lc::rows_dot_available(), "rows_dot_available at level 3");
  fastlora::small_gemm_use_isa(1);
  expect(!lc::rows_dot_available(), "not at the baseline level");
  const double u = std::numeric_limits<float>::epsilon() / 2;
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  int64_t cases = 0, bad_dot = 0, bad_bits = 0, bad_tall = 0, bad_axpy = 0, bad_split = 0;
  std::string first;
  // Every build the machine runs: AVX2 (level 3) and, where it has AVX-512, the 16-lane one.
  for (int level : {3, 4}) {
    if (fastlora::small_gemm_use_isa(level) != level) continue;
    std::printf("level %d\n", level);
    for (int64_t m : {1, 2, 3, 4, 5, 7, 8, 13, 16, 22, 32}) {
      for (int64_t n : {1, 2, 3, 6, 7, 8, 17}) {
        for (int64_t K : {1, 15, 16, 17, 33, 300}) {
          ++cases;
          const int64_t ldw = K + 3, ldx = K + 5, ldo = m + 2;
          std::vector<c10::BFloat16> wh(n * ldw);
          std::vector<c10::Half> w16(n * ldw);
          std::vector<float> wf(n * ldw), x(m * ldx), dyt(n * m);
          for (int64_t e = 0; e < n * ldw; ++e) {
            wf[e] = both_formats(rng);
            wh[e] = c10::BFloat16(float_to_bf16_truncated(wf[e]), c10::BFloat16::from_bits());
            w16[e] = c10::Half(wf[e]);
            if (bf16_to_float(wh[e].x) != wf[e] || static_cast<float>(w16[e]) != wf[e]) ++bad_bits;
          }
          for (auto& v : x) v = normal(rng);
          for (auto& v : dyt) v = normal(rng);
          const std::string shape = "level " + std::to_string(level) + " m=" + std::to_string(m) +
                                    " n=" + std::to_string(n) + " K=" + std::to_string(K);

          // rows_dot_add: out(j, i) += W(j, :) . x(i, :), onto a nonzero out
          std::vector<float> xp(m * lc::rows_dot_width(K));
          lc::permute_rows_for_dot(x.data(), m, K, ldx, xp.data());
          std::vector<float> out_h(n * ldo, 0.5f), out_16(n * ldo, 0.5f), out_f(n * ldo, 0.5f);
          lc::rows_dot_add(wh.data(), ldw, n, K, xp.data(), m, out_h.data(), ldo);
          lc::rows_dot_add(w16.data(), ldw, n, K, xp.data(), m, out_16.data(), ldo);
          lc::rows_dot_add(wf.data(), ldw, n, K, xp.data(), m, out_f.data(), ldo);
          std::vector<float> out_tall(n * ldo, 0.5f);
          lc::rows_dot_add_tall(wf.data(), ldw, n, K, xp.data(), m, out_tall.data(), ldo);
          if (!same_bits(out_tall, out_f)) {
            ++bad_tall;
            if (first.empty()) first = "rows_dot_add_tall != rows_dot_add at " + shape;
          }
          if (!same_bits(out_h, out_f) || !same_bits(out_16, out_f)) {
            ++bad_bits;
            if (first.empty()) first = "rows_dot_add 16-bit != float32 at " + shape;
          }
          for (int64_t j = 0; j < n; ++j) {
            for (int64_t i = 0; i < ldo; ++i) {
              double exact = 0.5, mag = 0.5;
              if (i < m) {
                for (int64_t k = 0; k < K; ++k) {
                  const double t = static_cast<double>(wf[j * ldw + k]) * x[i * ldx + k];
                  exact += t;
                  mag += std::fabs(t);
                }
              }
              // The standard bound of a float32 dot product of K terms, (K + 2) u sum|terms| (as in
              // test_small_gemm.cpp), with the value already in out counted as one more term.
              if (std::fabs(out_f[j * ldo + i] - exact) > (K + 3) * u * mag) {
                ++bad_dot;
                if (first.empty()) first = "rows_dot_add at " + shape;
              }
            }
          }

          // rows_axpy_add: out(i, k) += sum_j dyt(j, i) W(j, k), whole and split column ranges
          std::vector<c10::BFloat16> tail(n * 16);
          std::vector<c10::Half> tail16(n * 16);
          lc::rows_axpy_tail(wh.data(), ldw, n, K, tail.data());
          lc::rows_axpy_tail(w16.data(), ldw, n, K, tail16.data());
          const bool has_tail = K % 16 != 0;
          const int64_t ldg = K + 1;
          std::vector<float> gx(m * ldg, -0.25f), gx_split(m * ldg, -0.25f), gx16(m * ldg, -0.25f);
          lc::rows_axpy_add(wh.data(), ldw, n, K, 0, K, has_tail ? tail.data() : nullptr, dyt.data(), m, gx.data(),
                            ldg);
          lc::rows_axpy_add(w16.data(), ldw, n, K, 0, K, has_tail ? tail16.data() : nullptr, dyt.data(), m,
                            gx16.data(), ldg);
          for (int64_t k0 = 0; k0 < K; k0 += 32) {
            lc::rows_axpy_add(wh.data(), ldw, n, K, k0, std::min(k0 + 32, K), has_tail ? tail.data() : nullptr,
                              dyt.data(), m, gx_split.data(), ldg);
          }
          if (!same_bits(gx, gx_split)) {
            ++bad_split;
            if (first.empty()) first = "rows_axpy_add split columns at " + shape;
          }
          if (!same_bits(gx, gx16)) {
            ++bad_bits;
            if (first.empty()) first = "rows_axpy_add float16 != bfloat16 at " + shape;
          }
          for (int64_t i = 0; i < m; ++i) {
            for (int64_t k = 0; k < ldg; ++k) {
              double exact = -0.25, mag = 0.25;
              if (k < K) {
                for (int64_t j = 0; j < n; ++j) {
                  const double t = static_cast<double>(dyt[j * m + i]) * wf[j * ldw + k];
                  exact += t;
                  mag += std::fabs(t);
                }
              }
              // n products summed in float32, then added to the value in out: the same bound with
              // n terms plus that value.
              if (std::fabs(gx[i * ldg + k] - exact) > (n + 3) * u * mag) {
                ++bad_axpy;
                if (first.empty()) first = "rows_axpy_add at " + shape;
              }
            }
          }
        }
      }
    }
  }
  expect(bad_dot == 0, "rows_dot_add within (K + 3) u sum|w x| of float64 (" + std::to_string(cases) + " shapes)");
  expect(bad_bits == 0, "rows_dot_add: a bfloat16 or float16 W gives the float32 result bitwise; rows_axpy_add "
                        "the same bits for both formats");
  expect(bad_tall == 0, "rows_dot_add_tall: the same bits as rows_dot_add on a float32 W");
  expect(bad_axpy == 0, "rows_axpy_add within (n + 3) u sum|dy w| of float64, columns past K untouched");
  expect(bad_split == 0, "rows_axpy_add: split column ranges give the same bits");
  if (!first.empty()) std::printf("first failure: %s\n", first.c_str());
  fastlora::small_gemm_use_isa(previous);
  return finish();
}
