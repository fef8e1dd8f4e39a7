// CPU kernel of fastlora::topk_sparsify (exact and approximate top-k with error feedback).
//
// Keys: for finite float32 v, the bit pattern of |v| read as uint32 orders like |v| (this
// includes denormals, and -0 == +0), so selection works on integers.
//
// Common path, two passes over the data:
//  1. read-only pass: v = delta + residual, finiteness check, and collection of the candidates
//     (flat index, v) whose key is >= a low bound `lo` estimated from a deterministic sample
//     of the keys (a few sigma below the k-th largest, so that the candidates contain the
//     top-k with overwhelming probability and are only slightly more than k). Work items are
//     fixed-size chunks of one tensor, processed in parallel, concatenated in order, so the
//     candidates come out sorted by flat index whatever the thread count.
//  2. exact threshold among the candidates (nth_element), the tie quota taken in index order,
//     then the residual update pass (residual += delta, kept entries fixed up while their
//     chunk is in cache). Nothing is written before pass 1 has checked every value.
// Fallback when the sample misled us (too few candidates, or a chunk overflowing with ties):
// an exact radix select on the key bits (11 + 12 + 8 bit histograms), then a counting and a
// compaction pass. Approximate mode keeps everything above the sampled threshold when that
// count is within +-5% of k (one pass, no selection), and otherwise falls back to exact.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_utils.h"
#include "sparsify_scan.h"

namespace fastlora {
namespace {

using at::Tensor;

constexpr int64_t kChunk = 1 << 15;             // elements per work item
using sparsify_cpu::kNonFiniteKey;
constexpr int64_t kSampleSize = 1 << 16;
constexpr int64_t kConvertBlock = 2048;          // 16-bit / float64 deltas converted per scan

using sparsify_cpu::key_of;

struct Source {
  const void* delta;
  at::ScalarType dtype;
  float* residual;  // nullptr without error feedback
  int64_t numel;
  int64_t offset;   // flat index of the first element
};

struct WorkItem {
  int src;
  int64_t begin, end;  // local range within the source
};

template <typename F>
void with_delta(const Source& s, F&& f) {
  switch (s.dtype) {
    case at::kFloat: f(static_cast<const float*>(s.delta)); break;
    case at::kDouble: f(static_cast<const double*>(s.delta)); break;
    case at::kHalf: f(static_cast<const c10::Half*>(s.delta)); break;
    case at::kBFloat16: f(static_cast<const c10::BFloat16*>(s.delta)); break;
    default: TORCH_CHECK(false, "topk_sparsify: unsupported delta dtype ", s.dtype);
  }
}

// v = float32(delta) + residual, the same float32 addition as the reference.
template <typename T>
inline float value_at(const T* d, const float* r, int64_t i) {
  float v = static_cast<float>(d[i]);
  return r ? v + r[i] : v;
}

struct Candidates {
  std::vector<int64_t> index;
  std::vector<float> value;
  int64_t nonfinite = -1;  // first local index of a non-finite value in this item
  int64_t above_t = 0;     // count of keys >= t (approximate mode's sampled threshold)
  bool overflow = false;
};

// Given each work item's count of keys above (gt) and at (eq) the threshold, the ties each one
// keeps (the quota taken in flat order) and where its selection starts in the output (pos, one
// more entry: the total).
std::pair<std::vector<int64_t>, std::vector<int64_t>> split_ties(const std::vector<int64_t>& gt,
                                                                 const std::vector<int64_t>& eq, int64_t quota) {
  const size_t ni = gt.size();
  std::vector<int64_t> pos(ni + 1, 0), take_eq(ni, 0);
  for (size_t it = 0; it < ni; ++it) {
    take_eq[it] = std::min(eq[it], quota);
    quota -= take_eq[it];
    pos[it + 1] = pos[it] + gt[it] + take_eq[it];
  }
  return {pos, take_eq};
}

class Sparsifier {
 public:
  explicit Sparsifier(const std::vector<Source>& sources) : src_(sources) {
    n_ = 0;
    for (const auto& s : src_) n_ += s.numel;
    for (int i = 0; i < static_cast<int>(src_.size()); ++i) {
      for (int64_t b = 0; b < src_[i].numel; b += kChunk) {
        items_.push_back({i, b, std::min(src_[i].numel, b + kChunk)});
      }
    }
  }

  int64_t numel() const { return n_; }

  // Deterministic strided sample of keys (unsorted; callers select the ranks they need).
  std::vector<uint32_t> sample_keys() const {
    const int64_t S = std::min(n_, kSampleSize);
    std::vector<uint32_t> keys(S);
    int si = 0;
    for (int64_t j = 0; j < S; ++j) {
      const int64_t g = static_cast<int64_t>((static_cast<double>(j) + 0.5) * n_ / S);
      while (g >= src_[si].offset + src_[si].numel) ++si;
      const Source& s = src_[si];
      with_delta(s, [&](auto* d) { keys[j] = key_of(value_at(d, s.residual, g - s.offset)); });
    }
    return keys;
  }

  // Runs f(item index, item) over the work items in parallel.
  template <typename F>
  void parallel_items(const F& f) const {
    at::parallel_for(0, static_cast<int64_t>(items_.size()), 1, [&](int64_t b, int64_t e) {
      for (int64_t it = b; it < e; ++it) f(it, items_[it]);
    });
  }

  // Calls g(local index, v, key) for every element of a work item, in flat order.
  template <typename G>
  void for_each_value(const WorkItem& w, const G& g) const {
    const Source& s = src_[w.src];
    with_delta(s, [&](auto* d) {
      for (int64_t i = w.begin; i < w.end; ++i) {
        const float v = value_at(d, s.residual, i);
        g(i, v, key_of(v));
      }
    });
  }

  // Pass 1: read-only; candidates with key >= lo, count >= t, first non-finite per item.
  // The scan itself is sparsify_scan's (vector builds); a float16 / bfloat16 / float64 delta
  // is converted to float32 a block at a time first.
  std::vector<Candidates> collect(uint32_t lo, uint32_t t) const {
    std::vector<Candidates> out(items_.size());
    at::parallel_for(0, static_cast<int64_t>(items_.size()), 1, [&](int64_t ib, int64_t ie) {
      // Scratch for one item's candidates (room for the scan's overrun), and converted deltas.
      auto index = uninitialized<int32_t>(kChunk + sparsify_cpu::kScanSlack);
      auto value = uninitialized<float>(kChunk + sparsify_cpu::kScanSlack);
      std::unique_ptr<float[]> converted;
      for (int64_t it = ib; it < ie; ++it) {
        const WorkItem& w = items_[it];
        const Source& s = src_[w.src];
        Candidates& c = out[it];
        const int64_t len = w.end - w.begin;
        const float* r = s.residual ? s.residual + w.begin : nullptr;
        int64_t count = 0;
        if (s.dtype == at::kFloat) {
          count = sparsify_cpu::scan_candidates(static_cast<const float*>(s.delta) + w.begin, r, len, lo, t,
                                                index.get(), value.get(), &c.above_t, &c.nonfinite);
        } else {
          if (!converted) converted = uninitialized<float>(kConvertBlock);
          for (int64_t b = 0; b < len; b += kConvertBlock) {
            const int64_t n = std::min(kConvertBlock, len - b);
            with_delta(s, [&](auto* d) {
              for (int64_t j = 0; j < n; ++j) converted[j] = static_cast<float>(d[w.begin + b + j]);
            });
            int64_t nonfinite = -1;
            const int64_t got = sparsify_cpu::scan_candidates(converted.get(), r ? r + b : nullptr, n, lo, t,
                                                              index.get() + count, value.get() + count,
                                                              &c.above_t, &nonfinite);
            for (int64_t j = count; j < count + got; ++j) index[j] += static_cast<int32_t>(b);
            if (nonfinite >= 0 && c.nonfinite < 0) c.nonfinite = b + nonfinite;
            count += got;
          }
        }
        if (c.nonfinite >= 0) c.nonfinite += w.begin;
        // More candidates than this means the sample misled us (the fallback takes over).
        const int64_t cap = len / 4 + 64;
        c.overflow = count > cap;
        count = std::min(count, cap);
        c.index.resize(count);
        c.value.assign(value.get(), value.get() + count);
        const int64_t first = s.offset + w.begin;
        for (int64_t j = 0; j < count; ++j) c.index[j] = first + index[j];
      }
    });
    return out;
  }

  // Raises (naming the source) if any item saw a non-finite value; called before any write.
  void check_finite(const std::vector<Candidates>& cands) const {
    for (size_t it = 0; it < cands.size(); ++it) {
      if (cands[it].nonfinite >= 0) raise_nonfinite(items_[it].src, cands[it].nonfinite);
    }
  }

  void raise_nonfinite(int si, int64_t local) const {
    const Source& s = src_[si];
    bool delta_bad = false;
    with_delta(s, [&](auto* d) { delta_bad = !std::isfinite(static_cast<float>(d[local])); });
    // Positions only: fastlora.topk_sparsify, on this error path, names the tensor by its key.
    TORCH_CHECK_VALUE(false, "topk_sparsify: non-finite value in ", delta_bad ? "delta" : "residual", "[", si,
                      "] at flat position ", local);
  }

  // Exact radix select over all keys (fallback); returns (threshold key, count of keys above it).
  std::pair<uint32_t, int64_t> radix_threshold(int64_t k) const {
    uint32_t prefix = 0;
    int64_t above = 0;  // keys strictly greater than the current prefix range
    const int shifts[3] = {20, 8, 0};
    const int widths[3] = {11, 12, 8};
    uint32_t prefix_mask = 0;
    for (int level = 0; level < 3; ++level) {
      const int shift = shifts[level];
      const int64_t bins = int64_t{1} << widths[level];
      const uint32_t bin_mask = static_cast<uint32_t>(bins - 1);
      const int nthreads = at::get_num_threads();
      std::vector<std::vector<int64_t>> hist(nthreads, std::vector<int64_t>(bins, 0));
      parallel_items([&](int64_t, const WorkItem& w) {
        auto& h = hist[at::get_thread_num()];
        for_each_value(w, [&](int64_t, float, uint32_t key) {
          if ((key & prefix_mask) == prefix) ++h[(key >> shift) & bin_mask];
        });
      });
      std::vector<int64_t> total(bins, 0);
      for (const auto& h : hist)
        for (int64_t i = 0; i < bins; ++i) total[i] += h[i];
      int64_t bin = bins - 1;
      for (; bin > 0; --bin) {
        if (above + total[bin] >= k) break;
        above += total[bin];
      }
      prefix |= static_cast<uint32_t>(bin) << shift;
      prefix_mask |= bin_mask << shift;
    }
    return {prefix, above};
  }

  // Fallback compaction: keys > T and the first `quota` keys == T in flat order.
  void compact(uint32_t T, int64_t quota, std::vector<int64_t>& idx, std::vector<float>& val) const {
    const int64_t ni = static_cast<int64_t>(items_.size());
    std::vector<int64_t> gt(ni, 0), eq(ni, 0);
    parallel_items([&](int64_t it, const WorkItem& w) {
      for_each_value(w, [&](int64_t, float, uint32_t key) {
        gt[it] += key > T;
        eq[it] += key == T;
      });
    });
    const auto split = split_ties(gt, eq, quota);
    const std::vector<int64_t>& pos = split.first;
    const std::vector<int64_t>& take_eq = split.second;
    idx.resize(pos[ni]);
    val.resize(pos[ni]);
    parallel_items([&](int64_t it, const WorkItem& w) {
      const int64_t offset = src_[w.src].offset;
      int64_t p = pos[it], left = take_eq[it];
      for_each_value(w, [&](int64_t i, float v, uint32_t key) {
        if (key > T || (key == T && left > 0)) {
          left -= key == T;
          idx[p] = offset + i;
          val[p] = v;
          ++p;
        }
      });
    });
  }

  // Final pass: residual = v everywhere, then residual = v - sent at kept entries.
  void update_residuals(const std::vector<int64_t>& idx, const std::vector<float>& sent_f32) const {
    if (src_.empty() || src_[0].residual == nullptr) return;
    parallel_items([&](int64_t, const WorkItem& w) {
      const Source& s = src_[w.src];
      float* r = s.residual;
      with_delta(s, [&](auto* d) {
        for (int64_t i = w.begin; i < w.end; ++i) r[i] = static_cast<float>(d[i]) + r[i];
      });
      const int64_t g0 = s.offset + w.begin, g1 = s.offset + w.end;
      auto lo = std::lower_bound(idx.begin(), idx.end(), g0);
      auto hi = std::lower_bound(lo, idx.end(), g1);
      for (auto p = lo; p != hi; ++p) r[*p - s.offset] -= sent_f32[p - idx.begin()];
    });
  }

 private:
  std::vector<Source> src_;
  std::vector<WorkItem> items_;
  int64_t n_ = 0;
};

// Selects among ordered candidates: keys > T, then ties up to the quota, in flat order. Work
// items in parallel: each counts its keys above and at T, the quota of ties goes to the items
// in flat order, and each writes its selection at its offset.
void select_from_candidates(const std::vector<Candidates>& cands, int64_t k, bool keep_all_ties, uint32_t T,
                            std::vector<int64_t>& idx, std::vector<float>& val) {
  const int64_t ni = static_cast<int64_t>(cands.size());
  std::vector<int64_t> gt(ni, 0), eq(ni, 0);
  at::parallel_for(0, ni, 1, [&](int64_t b, int64_t e) {
    for (int64_t it = b; it < e; ++it) {
      int64_t g = 0, q = 0;
      for (float v : cands[it].value) {
        const uint32_t key = key_of(v);
        g += key > T;
        q += key == T;
      }
      gt[it] = g;
      eq[it] = q;
    }
  });
  int64_t quota = keep_all_ties ? std::numeric_limits<int64_t>::max() : k;
  if (!keep_all_ties) {
    for (int64_t it = 0; it < ni; ++it) quota -= gt[it];
  }
  const auto split = split_ties(gt, eq, quota);
  const std::vector<int64_t>& pos = split.first;
  const std::vector<int64_t>& take_eq = split.second;
  idx.resize(pos[ni]);
  val.resize(pos[ni]);
  at::parallel_for(0, ni, 1, [&](int64_t b, int64_t e) {
    for (int64_t it = b; it < e; ++it) {
      const Candidates& c = cands[it];
      int64_t p = pos[it], left = take_eq[it];
      for (size_t j = 0; j < c.value.size(); ++j) {
        const uint32_t key = key_of(c.value[j]);
        if (key > T || (key == T && left > 0)) {
          left -= key == T;
          idx[p] = c.index[j];
          val[p] = c.value[j];
          ++p;
        }
      }
    }
  });
}

// The k-th largest key among the candidates (1 <= k <= their count): a parallel histogram of
// the keys' top 16 bits finds the bin that holds it, then a selection among that bin's keys
// (a few thousand at most for any smooth distribution, all of them for heavy ties). A
// selection over all candidates (std::nth_element) was serial: ~9 ms of a 40 ms call at 16M
// values, 10% density.
uint32_t kth_largest_candidate_key(const std::vector<Candidates>& cands, int64_t k) {
  constexpr int kShift = 15;  // keys are below 2^31: 16 bits of bin
  constexpr int64_t kBins = int64_t{1} << 16;
  const int64_t ni = static_cast<int64_t>(cands.size());
  int64_t total = 0;
  for (const auto& c : cands) total += static_cast<int64_t>(c.value.size());
  if (total < kBins) {  // fewer candidates than bins: zeroing the histograms would cost more
    std::vector<uint32_t> keys;
    keys.reserve(total);
    for (const auto& c : cands)
      for (float v : c.value) keys.push_back(key_of(v));
    std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end(), std::greater<uint32_t>());
    return keys[k - 1];
  }
  const int nthreads = std::max(1, at::get_num_threads());
  std::vector<std::vector<int64_t>> hist(nthreads);
  at::parallel_for(0, ni, 1, [&](int64_t b, int64_t e) {
    auto& h = hist[at::get_thread_num()];
    if (h.empty()) h.assign(kBins, 0);
    for (int64_t it = b; it < e; ++it)
      for (float v : cands[it].value) ++h[key_of(v) >> kShift];
  });
  int64_t above = 0, bin = kBins - 1;
  for (; bin >= 0; --bin) {
    int64_t n = 0;
    for (const auto& h : hist)
      if (!h.empty()) n += h[bin];
    if (above + n >= k) break;
    above += n;
  }
  std::vector<std::vector<uint32_t>> in_bin(nthreads);
  at::parallel_for(0, ni, 1, [&](int64_t b, int64_t e) {
    auto& mine = in_bin[at::get_thread_num()];
    for (int64_t it = b; it < e; ++it)
      for (float v : cands[it].value)
        if ((key_of(v) >> kShift) == static_cast<uint32_t>(bin)) mine.push_back(key_of(v));
  });
  std::vector<uint32_t> keys;
  for (const auto& part : in_bin) keys.insert(keys.end(), part.begin(), part.end());
  const int64_t rank = k - above - 1;  // within the bin, descending
  std::nth_element(keys.begin(), keys.begin() + rank, keys.end(), std::greater<uint32_t>());
  return keys[rank];
}

std::tuple<Tensor, Tensor> topk_sparsify_cpu(at::TensorList deltas, at::TensorList residuals, int64_t k,
                                             bool approx, at::ScalarType value_dtype) {
  TORCH_CHECK_VALUE(residuals.empty() || residuals.size() == deltas.size(),
                    "topk_sparsify: residuals must be empty or match deltas one to one");
  TORCH_CHECK_VALUE(k >= 0, "topk_sparsify: k must be >= 0, got ", k);
  TORCH_CHECK_TYPE(value_dtype == at::kFloat || value_dtype == at::kHalf || value_dtype == at::kBFloat16,
                   "topk_sparsify: value_dtype must be float32, float16 or bfloat16, got ", value_dtype);
  std::vector<Tensor> keep_alive;
  std::vector<Source> sources;
  int64_t offset = 0;
  for (size_t i = 0; i < deltas.size(); ++i) {
    Tensor d = deltas[i].contiguous();
    keep_alive.push_back(d);
    float* r = nullptr;
    if (!residuals.empty()) {
      const Tensor& res = residuals[i];
      TORCH_CHECK_TYPE(res.scalar_type() == at::kFloat, "topk_sparsify: residual[", i, "] must be float32, got ",
                       res.scalar_type());
      TORCH_CHECK_VALUE(res.numel() == d.numel(), "topk_sparsify: residual[", i, "] has ", res.numel(),
                        " elements but delta[", i, "] has ", d.numel());
      TORCH_CHECK_VALUE(res.is_contiguous(), "topk_sparsify: residual[", i, "] must be contiguous (updated in place)");
      r = res.data_ptr<float>();
    }
    sources.push_back({d.const_data_ptr(), d.scalar_type(), r, d.numel(), offset});
    offset += d.numel();
  }
  Sparsifier sp(sources);
  const int64_t n = sp.numel();
  k = std::min(k, n);

  std::vector<int64_t> idx;
  std::vector<float> val;
  if (k == 0 || k == n) {
    // Nothing to select; every value is still checked before anything is written.
    sp.check_finite(sp.collect(kNonFiniteKey, kNonFiniteKey));
    if (k == n) sp.compact(0, n, idx, val);
  } else {
    std::vector<uint32_t> sample = sp.sample_keys();
    // The two ranks we need (descending order), by selection rather than a full sort of the
    // sample: a sort of 64k keys alone would cost ~3 ms, more than a pass over 1M entries.
    auto key_at_rank = [&sample](int64_t rank) {
      std::nth_element(sample.begin(), sample.begin() + rank, sample.end(), std::greater<uint32_t>());
      return sample[rank];
    };
    const double S = static_cast<double>(sample.size());
    const double q = static_cast<double>(k) / n;
    const double mean = q * S;
    const double rank_lo = mean + 6.0 * std::sqrt(mean * (1.0 - q)) + 16.0;
    const int64_t rank_t = std::min<int64_t>(static_cast<int64_t>(mean), sample.size() - 1);
    bool done = false;
    // Candidates are worth it only while they stay a small fraction of the data.
    if (rank_lo < S * 0.2) {
      // Clamped so that non-finite keys are always collected (and reported).
      const uint32_t lo = std::min(key_at_rank(static_cast<int64_t>(rank_lo)), kNonFiniteKey);
      const uint32_t t = std::min(key_at_rank(rank_t), kNonFiniteKey);
      auto cands = sp.collect(lo, t);
      sp.check_finite(cands);
      int64_t total = 0, above_t = 0;
      bool overflow = false;
      for (const auto& c : cands) {
        total += c.value.size();
        above_t += c.above_t;
        overflow |= c.overflow;
      }
      if (!overflow && total >= k) {
        if (approx && above_t >= static_cast<int64_t>(0.95 * k) && above_t <= static_cast<int64_t>(1.05 * k) + 1) {
          // Keep every key >= t (written as key > t - 1 with all ties kept).
          select_from_candidates(cands, k, /*keep_all_ties=*/true, t == 0 ? 0 : t - 1, idx, val);
        } else {
          select_from_candidates(cands, k, false, kth_largest_candidate_key(cands, k), idx, val);
        }
        done = true;
      }
    } else {
      auto cands = sp.collect(kNonFiniteKey, kNonFiniteKey);  // finiteness check only
      sp.check_finite(cands);
    }
    if (!done) {
      auto [T, above] = sp.radix_threshold(k);
      sp.compact(T, k - above, idx, val);
    }
  }

  // Round the kept values to the travel dtype first, so the rounding error stays in the residual.
  const int64_t nnz = static_cast<int64_t>(idx.size());
  Tensor indices = at::empty({nnz}, at::TensorOptions().dtype(at::kLong));
  Tensor values = at::empty({nnz}, at::TensorOptions().dtype(value_dtype));
  std::memcpy(indices.data_ptr<int64_t>(), idx.data(), nnz * sizeof(int64_t));
  std::vector<float> sent(nnz);
  // In parallel; the first kept value (in flat order) that overflows is the one reported.
  constexpr int64_t kRoundChunk = 1 << 16;
  std::vector<int64_t> first_bad(ceil_div(nnz, kRoundChunk), nnz);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value_dtype, "topk_sparsify_values", [&] {
    scalar_t* out = values.data_ptr<scalar_t>();
    at::parallel_for(0, static_cast<int64_t>(first_bad.size()), 1, [&](int64_t cb, int64_t ce) {
      for (int64_t chunk = cb; chunk < ce; ++chunk) {
        const int64_t j1 = std::min(nnz, (chunk + 1) * kRoundChunk);
        for (int64_t j = chunk * kRoundChunk; j < j1; ++j) {
          out[j] = static_cast<scalar_t>(val[j]);
          sent[j] = static_cast<float>(out[j]);
          if (!std::isfinite(sent[j]) && first_bad[chunk] == nnz) first_bad[chunk] = j;
        }
      }
    });
    const int64_t j = first_bad.empty() ? nnz : *std::min_element(first_bad.begin(), first_bad.end());
    // A kept value beyond the travel dtype's range would travel as inf and leave -inf in the
    // residual: refuse before anything (the residual included) is written.
    TORCH_CHECK_VALUE(j == nnz, "topk_sparsify: the kept value ", j < nnz ? val[j] : 0.0f, " (flat index ",
                      j < nnz ? idx[j] : 0, ") overflows torch.", value_dtype == at::kHalf ? "float16" : "bfloat16",
                      " (largest finite ", static_cast<double>(std::numeric_limits<scalar_t>::max()),
                      "); nothing was changed, the residual included: send float32 values or scale the update");
  });
  sp.update_residuals(idx, sent);
  return {indices, values};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlora, CPU, m) {
  m.impl("topk_sparsify", &topk_sparsify_cpu);
}

}  // namespace fastlora
