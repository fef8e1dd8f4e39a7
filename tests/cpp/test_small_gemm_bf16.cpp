// small_gemm_bf16 and pack_bf16_row_pairs (csrc/cpu/small_gemm.h) against a float64 triple loop
// on bfloat16 values (their products are exact in float64), over shapes that hit every tile path:
// row tails of the 8/4/2/1-row tiles, masked column tails, k chunk boundaries, k = 0, A row-major
// and pair-major, accumulate, padded leading dimensions; under the AMX-BF16 and AVX512-BF16 builds
// where the machine has them (AMX's tiles, their row / column / pair remainders) and the portable
// one, with alpha = 0.75 and alpha = 1 (AMX tiles then start from C and store to it directly).
// Tolerance: the float32 dot-product bound, (2 k2 + 2) u sum |alpha a b| + 2 u |C|; with alpha = 1
// C is a term of the running sum, (2 k2 + 2) u (sum |a b| + |C|).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "../../csrc/cpu/small_gemm.h"
#include "expect.h"

using fastlora_test::expect;
using fastlora_test::finish;

namespace {

uint16_t to_bf16(double v) {
  const float f = static_cast<float>(v);
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return static_cast<uint16_t>(bits >> 16);  // truncation: any bfloat16 value will do
}

double from_bf16(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

void check(const char* build) {
  const double u = std::numeric_limits<float>::epsilon() / 2;
  std::mt19937 rng(0);
  std::normal_distribution<double> normal;
  const int64_t ms[] = {0, 1, 2, 3, 4, 7, 8, 9, 15, 17, 32, 33, 49};  // 32 .. 49: AMX's 2 x 16-row blocks
  const int64_t ns[] = {0, 1, 15, 16, 17, 31, 32, 33, 48, 65};
  const int64_t ks[] = {0, 1, 2, 3, 127, 128, 129, 261};  // k in values; odd k packs a zero row
  for (bool pair_major : {false, true}) {
    for (int variant = 0; variant < 4; ++variant) {
      const bool accumulate = variant % 2 == 1;
      const float alpha = variant < 2 ? 0.75f : 1.0f;
      int64_t cases = 0, bad = 0;
      std::string first_bad;
      for (int64_t m : ms) {
        for (int64_t n : ns) {
          for (int64_t k : ks) {
            const int64_t k2 = (k + 1) / 2;
            // A as m x k values (zero-padded to 2 k2), stored row-major (lda) or pair-major
            // ([k2][m + 1][2]); B as k x n (ldb), packed into k2 x (n + 3) pairs.
            std::vector<double> av(m * 2 * k2, 0.0), bv(k * (n + 3));
            for (int64_t i = 0; i < m; ++i)
              for (int64_t p = 0; p < k; ++p) av[i * 2 * k2 + p] = from_bf16(to_bf16(normal(rng)));
            std::vector<uint16_t> b(k * (n + 3) + 1);
            for (auto& v : b) v = to_bf16(normal(rng));
            const int64_t lda = 2 * k2 + 3, ldm = m + 1;
            std::vector<uint16_t> a((pair_major ? k2 * ldm * 2 : m * lda) + 2);
            for (int64_t i = 0; i < m; ++i) {
              for (int64_t p = 0; p < 2 * k2; ++p) {
                const uint16_t h = to_bf16(av[i * 2 * k2 + p]);
                if (pair_major) {
                  a[(p / 2) * ldm * 2 + i * 2 + p % 2] = h;
                } else {
                  a[i * lda + p] = h;
                }
              }
            }
            const int64_t a_row = pair_major ? 2 : lda, a_col = pair_major ? 2 * ldm : 2;
            const int64_t ldb = n + 3, ldc = n + 5;
            std::vector<uint32_t> bp(k2 * ldb + 1, 0xdeadbeefu);
            fastlora::pack_bf16_row_pairs(b.data(), k, n, n + 3, bp.data(), ldb);
            std::vector<float> c(m * ldc + 1);
            for (auto& v : c) v = static_cast<float>(normal(rng));
            const std::vector<float> c0 = c;
            fastlora::small_gemm_bf16(m, n, k2, alpha, a.data(), a_row, a_col, bp.data(), ldb, accumulate, c.data(),
                                      ldc);
            ++cases;
            // A prefetch region (here the operands themselves, rows of odd lengths and strides)
            // is a hint only: the same bits.
            std::vector<float> c_pf = c0;
            const fastlora::PrefetchRegion region{b.data(), k, 2 * n + 3, 2 * (n + 3)};
            fastlora::small_gemm_bf16(m, n, k2, alpha, a.data(), a_row, a_col, bp.data(), ldb, accumulate, c_pf.data(),
                                      ldc, region);
            bool ok = c_pf == c;
            for (int64_t i = 0; i < m && ok; ++i) {
              for (int64_t j = 0; j < n && ok; ++j) {
                double exact = 0, mag = 0;
                for (int64_t p = 0; p < k; ++p) {
                  const double t = av[i * 2 * k2 + p] * from_bf16(b[p * (n + 3) + j]);
                  exact += t;
                  mag += std::fabs(t);
                }
                const double prev = accumulate ? static_cast<double>(c0[i * ldc + j]) : 0.0;
                const double want = alpha * exact + prev;
                const double tol = alpha == 1.0f ? (2 * k2 + 2) * u * (mag + std::fabs(prev)) + 1e-30
                                                 : (2 * k2 + 2) * u * alpha * mag + 2 * u * std::fabs(prev) + 1e-30;
                ok = std::fabs(static_cast<double>(c[i * ldc + j]) - want) <= tol;
              }
              for (int64_t j = n; j < ldc && ok; ++j) ok = c[i * ldc + j] == c0[i * ldc + j];  // padding untouched
            }
            if (!ok) {
              ++bad;
              if (first_bad.empty()) {
                first_bad = " first failure m=" + std::to_string(m) + " n=" + std::to_string(n) + " k=" + std::to_string(k);
              }
            }
          }
        }
      }
      expect(bad == 0, std::string("small_gemm_bf16 (") + build + ") pair_major=" + (pair_major ? "1" : "0") +
                           " accumulate=" + (accumulate ? "1" : "0") + " alpha=" + std::to_string(alpha) + ": " + std::to_string(cases - bad) + "/" +
                           std::to_string(cases) + " shapes within the dot-product error bound" + first_bad);
    }
  }
}

}  // namespace

int main() {
  const int best = fastlora::small_gemm_isa();
  if (best >= 5) check("AMX-BF16");
  fastlora::small_gemm_use_isa(4);
  if (fastlora::small_gemm_bf16_native()) check("AVX512-BF16");
  fastlora::small_gemm_use_isa(1);  // the portable build
  expect(!fastlora::small_gemm_bf16_native(), "level 1 turns the AVX512-BF16 build off");
  check("portable");
  fastlora::small_gemm_use_isa(best);
  return finish();
}
