// topk_sparsify's candidate scan (csrc/cpu/sparsify_scan.h): every build the machine runs
// (baseline, AVX2 and, where the machine has it, AVX-512) against a plain loop written here,
// with and without a residual, over lengths around the 8- and 16-lane vectors (the masked and
// scalar tails), bounds from 0 (everything is a candidate) to the non-finite key (nothing
// is), ties on the bounds, and inf / nan at the first, a middle and the last position.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "../../csrc/cpu/small_gemm.h"
#include "../../csrc/cpu/sparsify_scan.h"
#include "expect.h"

using fastlora_test::expect;
using fastlora_test::finish;
namespace sc = fastlora::sparsify_cpu;

namespace {

uint32_t key_of(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits & 0x7FFFFFFFu;
}

struct Scan {
  std::vector<int32_t> idx;
  std::vector<float> val;
  int64_t above_t = 0;
  int64_t first_nonfinite = -1;
};

Scan expected_scan(const std::vector<float>& d, const float* r, uint32_t lo, uint32_t t) {
  Scan s;
  for (size_t i = 0; i < d.size(); ++i) {
    const float v = r ? d[i] + r[i] : d[i];
    if (!std::isfinite(v)) {
      if (s.first_nonfinite < 0) s.first_nonfinite = static_cast<int64_t>(i);
      continue;
    }
    s.above_t += key_of(v) >= t;
    if (key_of(v) >= lo) {
      s.idx.push_back(static_cast<int32_t>(i));
      s.val.push_back(v);
    }
  }
  return s;
}

}  // namespace

int main() {
  const int previous = fastlora::small_gemm_isa();
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  int64_t cases = 0, bad = 0;
  std::string first;
  for (int level : {1, 3, 4}) {
    if (fastlora::small_gemm_use_isa(level) != level) continue;
    std::printf("level %d\n", level);
    for (int64_t n : {0, 1, 7, 8, 9, 15, 16, 17, 31, 33, 100, 1000, 32768}) {
      std::vector<float> d(n), r(n);
      for (auto& x : d) x = normal(rng);
      for (auto& x : r) x = 0.1f * normal(rng);
      if (n > 2) d[n / 2] = -d[n / 3];  // a tie in |v| without the residual
      // Bounds: 0, a few quantiles of |d| (the first one exactly at a key, so ties with it),
      // and the non-finite key.
      std::vector<uint32_t> bounds = {0u, sc::kNonFiniteKey};
      if (n > 0) bounds.push_back(key_of(d[n / 3]));
      bounds.push_back(key_of(1.0f));
      bounds.push_back(key_of(2.5f));
      for (int bad_values = 0; bad_values < 4; ++bad_values) {
        std::vector<float> dd = d;
        if (bad_values == 1 && n > 0) dd[n - 1] = inf;
        if (bad_values == 2 && n > 0) dd[n / 2] = nan;
        if (bad_values == 3 && n > 0) {
          dd[0] = -inf;
          dd[n - 1] = nan;
        }
        for (bool with_r : {false, true}) {
          const float* rp = with_r ? r.data() : nullptr;
          for (uint32_t lo : bounds) {
            for (uint32_t t : bounds) {
              if (t < lo) continue;
              ++cases;
              const Scan want = expected_scan(dd, rp, lo, t);
              Scan got;
              got.above_t = 5;  // the scan adds to it
              got.idx.assign(n + sc::kScanSlack, -1);
              got.val.assign(n + sc::kScanSlack, 0.0f);
              const int64_t count = sc::scan_candidates_at(level, dd.data(), rp, n, lo, t, got.idx.data(),
                                                           got.val.data(), &got.above_t, &got.first_nonfinite);
              bool ok = count == static_cast<int64_t>(want.idx.size()) && got.above_t == want.above_t + 5 &&
                        got.first_nonfinite == want.first_nonfinite;
              for (int64_t j = 0; ok && j < count; ++j) {
                ok = got.idx[j] == want.idx[j] && std::memcmp(&got.val[j], &want.val[j], sizeof(float)) == 0;
              }
              if (!ok && bad++ == 0) {
                first = "level " + std::to_string(level) + " n " + std::to_string(n) + " bad_values " +
                        std::to_string(bad_values) + " residual " + std::to_string(with_r) + " lo " +
                        std::to_string(lo) + " t " + std::to_string(t) + ": count " + std::to_string(count) +
                        " want " + std::to_string(want.idx.size()) + ", above_t " +
                        std::to_string(got.above_t - 5) + " want " + std::to_string(want.above_t) +
                        ", first non-finite " + std::to_string(got.first_nonfinite) + " want " +
                        std::to_string(want.first_nonfinite);
              }
            }
          }
        }
      }
    }
  }
  fastlora::small_gemm_use_isa(previous);
  std::printf("%lld cases\n", static_cast<long long>(cases));
  expect(cases > 0, "some cases ran");
  expect(bad == 0, "every build matches the plain loop: " + first);
  return finish();
}
