// small_gemm (csrc/cpu/small_gemm.h) against a float64 triple loop over shapes that hit every
// tile path: row tails of the 4/8/16-row tiles, column tails narrower than a vector, k chunk
// boundaries, k = 0, transposed A, accumulate, and padded leading dimensions, on every
// instruction-set build the machine can run. The tolerance is the
// standard bound for a k-term dot product in the input type, (k + 2) u sum |alpha a b| + |C| u.
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "../../csrc/cpu/small_gemm.h"
#include "expect.h"

using fastlora_test::expect;
using fastlora_test::finish;

namespace {

template <typename T>
void check_type(const char* type_name) {
  const double u = std::numeric_limits<T>::epsilon() / 2;
  std::mt19937 rng(0);
  std::normal_distribution<double> normal;
  const int64_t ms[] = {0, 1, 3, 4, 5, 6, 7, 8, 13, 17, 33};
  const int64_t ns[] = {0, 1, 7, 8, 16, 17, 24, 32, 33, 48, 65, 300};
  const int64_t ks[] = {0, 1, 15, 64, 65, 129, 300};
  for (bool transposed_a : {false, true}) {
    for (bool accumulate : {false, true}) {
      int64_t cases = 0, bad = 0;
      std::string first_bad;
      for (int64_t m : ms) {
        for (int64_t n : ns) {
          for (int64_t k : ks) {
            // Leading dimensions padded by 3 so no stride equals the logical width.
            const int64_t lda = (transposed_a ? m : k) + 3, ldb = n + 3, ldc = n + 3;
            std::vector<T> a((transposed_a ? k : m) * lda + 1), b(k * ldb + 1), c(m * ldc + 1);
            for (auto& v : a) v = static_cast<T>(normal(rng));
            for (auto& v : b) v = static_cast<T>(normal(rng));
            for (auto& v : c) v = static_cast<T>(normal(rng));
            const std::vector<T> c0 = c;
            const T alpha = static_cast<T>(0.75);
            const int64_t a_row = transposed_a ? 1 : lda, a_col = transposed_a ? lda : 1;
            fastlora::small_gemm(m, n, k, alpha, a.data(), a_row, a_col, b.data(), ldb, accumulate, c.data(), ldc);
            ++cases;
            bool ok = true;
            for (int64_t i = 0; i < m && ok; ++i) {
              for (int64_t j = 0; j < n && ok; ++j) {
                double exact = 0, mag = 0;
                for (int64_t p = 0; p < k; ++p) {
                  const double t = static_cast<double>(a[i * a_row + p * a_col]) * static_cast<double>(b[p * ldb + j]);
                  exact += t;
                  mag += std::fabs(t);
                }
                const double prev = accumulate ? static_cast<double>(c0[i * ldc + j]) : 0.0;
                const double want = static_cast<double>(alpha) * exact + prev;
                const double tol = (k + 2) * u * static_cast<double>(alpha) * mag + 2 * u * std::fabs(prev) + 1e-300;
                ok = std::fabs(static_cast<double>(c[i * ldc + j]) - want) <= tol;
              }
            }
            // Entries outside the m x n window (the padding) are never written.
            for (int64_t i = 0; i < m && ok; ++i) {
              for (int64_t j = n; j < ldc && ok; ++j) ok = c[i * ldc + j] == c0[i * ldc + j];
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
      expect(bad == 0, std::string("small_gemm<") + type_name + "> isa level " +
                           std::to_string(fastlora::small_gemm_isa()) + " transposed_a=" + (transposed_a ? "1" : "0") +
                           " accumulate=" + (accumulate ? "1" : "0") + ": " + std::to_string(cases - bad) + "/" +
                           std::to_string(cases) + " shapes within the dot-product error bound" + first_bad);
    }
  }
}

}  // namespace

int main() {
  // Every build this machine can run (AVX-512, AVX2 + FMA, baseline), highest first.
  const int best = fastlora::small_gemm_isa();
  for (int level : {4, 3, 1}) {
    if (level > best || fastlora::small_gemm_use_isa(level) != level) continue;
    check_type<float>("float");
    check_type<double>("double");
  }
  fastlora::small_gemm_use_isa(best);
  return finish();
}
