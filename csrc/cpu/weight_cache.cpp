// See weight_cache.h.
#include "weight_cache.h"

#include <c10/core/InferenceMode.h>
#include <c10/core/StorageImpl.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/library.h>

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

namespace fastlora {
namespace {

// The memory this process may use: the physical memory, or a cgroup's (container's) limit when
// lower.
int64_t usable_memory_bytes() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  int64_t bytes = pages > 0 && page > 0 ? static_cast<int64_t>(pages) * page : 0;
  for (const char* path : {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"}) {
    std::ifstream in(path);
    std::string value;
    if (in >> value && !value.empty() && value != "max") {
      char* end = nullptr;
      const long long limit = std::strtoll(value.c_str(), &end, 10);
      if (end != nullptr && *end == '\0' && limit > 0 && (bytes == 0 || limit < bytes)) bytes = limit;
    }
  }
  return bytes;
}

// FASTLORA_WEIGHT_CACHE_MB (MiB, 0 = off; fastlora's Python import rejects other values), else a
// quarter of the usable memory.
int64_t default_limit() {
  if (const char* mb = std::getenv("FASTLORA_WEIGHT_CACHE_MB")) {
    char* end = nullptr;
    const long long value = std::strtoll(mb, &end, 10);
    if (end != mb && *end == '\0' && value >= 0) return std::min<long long>(value, INT64_MAX >> 20) << 20;
  }
  return usable_memory_bytes() / 4;
}

// A weight's identity apart from its storage: where it starts and its geometry.
struct Key {
  const void* storage;
  int64_t offset;
  at::ScalarType dtype;
  bool operator<(const Key& o) const {
    return std::tie(storage, offset, dtype) < std::tie(o.storage, o.offset, o.dtype);
  }
};

struct Entry {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  std::vector<int64_t> sizes;
  int64_t version;
  uint64_t fingerprint;
  at::Tensor copy;
};

// A hash of up to 64 elements spread over the weight (and its last one): sees writes that
// bypass the version counter (`.data`) whenever they change a sampled value. ~64 loads.
uint64_t fingerprint(const at::Tensor& w) {
  const auto* bits = static_cast<const uint16_t*>(w.const_data_ptr());
  const int64_t n = w.numel();
  constexpr int64_t kSamples = 64;
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (int64_t i = 0; i < kSamples; ++i) {
    const int64_t at = n == 1 ? 0 : i * (n - 1) / (kSamples - 1);
    h = (h ^ bits[at]) * 1099511628211ull;
  }
  return h;
}

struct Cache {
  std::mutex mutex;
  std::map<Key, Entry> entries;
  int64_t bytes = 0;
  int64_t limit = default_limit();

  // Drops entries whose weights were freed; with the mutex held.
  void sweep() {
    for (auto it = entries.begin(); it != entries.end();) {
      if (it->second.storage.expired()) {
        bytes -= static_cast<int64_t>(it->second.copy.nbytes());
        it = entries.erase(it);
      } else {
        ++it;
      }
    }
  }
  void erase(std::map<Key, Entry>::iterator it) {
    bytes -= static_cast<int64_t>(it->second.copy.nbytes());
    entries.erase(it);
  }
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: no tensor frees after libtorch's teardown
  return *c;
}

bool cacheable(const at::Tensor& w) {
  return (w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf) && w.device().is_cpu() &&
         w.is_contiguous() && w.numel() > 0 && w.has_storage() && !w.is_inference() &&
         w.layout() == at::kStrided;
}

}  // namespace

at::Tensor float32_weight(const at::Tensor& w) {
  if (!cacheable(w)) return w.to(at::kFloat);
  Cache& c = cache();
  const Key key{w.storage().unsafeGetStorageImpl(), w.storage_offset(), w.scalar_type()};
  const int64_t version = w._version();
  const uint64_t print = fingerprint(w);
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    if (c.limit == 0) return w.to(at::kFloat);
    // Copies of weights freed since the last call go now (a few hundred atomic loads at most),
    // so a deleted model's copies do not outlive it by more than one call.
    c.sweep();
    auto it = c.entries.find(key);
    if (it != c.entries.end()) {
      const Entry& e = it->second;
      // A live storage at the key's address is this weight's own (the weak reference keeps a
      // freed one's address from being reused while the entry exists).
      if (!e.storage.expired() && e.version == version && e.fingerprint == print && e.sizes == w.sizes().vec()) {
        return e.copy;
      }
      c.erase(it);  // stale: the weight was written to (or resized) since
    }
  }
  at::Tensor copy;
  {
    // A normal tensor even when made under torch.inference_mode(): fastlora.linear's autograd
    // saves the copy for backward, which an inference tensor cannot be.
    c10::InferenceMode normal_tensors(false);
    copy = w.to(at::kFloat);
  }
  const int64_t nbytes = static_cast<int64_t>(copy.nbytes());
  std::lock_guard<std::mutex> lock(c.mutex);
  if (c.bytes + nbytes <= c.limit && c.entries.count(key) == 0) {
    c.entries.emplace(key, Entry{c10::weak_intrusive_ptr<c10::StorageImpl>(w.storage().getWeakStorageImpl()),
                                 w.sizes().vec(), version, print, copy});
    c.bytes += nbytes;
  }
  return copy;
}

int64_t weight_cache_limit() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return c.limit;
}

int64_t set_weight_cache_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "fastlora: the weight cache limit must be >= 0 bytes, got ", bytes);
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  const int64_t previous = c.limit;
  c.limit = bytes;
  c.sweep();
  while (c.bytes > c.limit) c.erase(std::prev(c.entries.end()));
  return previous;
}

int64_t weight_cache_bytes() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return c.bytes;
}

int64_t weight_cache_entries() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return static_cast<int64_t>(c.entries.size());
}

void clear_weight_cache() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  c.entries.clear();
  c.bytes = 0;
}

namespace {
int64_t set_limit_op(int64_t bytes) { return set_weight_cache_limit(bytes); }
int64_t limit_op() { return weight_cache_limit(); }
std::tuple<int64_t, int64_t> usage_op() { return {weight_cache_entries(), weight_cache_bytes()}; }
void clear_op() { clear_weight_cache(); }

// The op behind fastlora.linear's float32 route (fastlora/ops/linear.py): a half-precision
// weight's kept float32 copy. Only half-precision weights: a float32 one would come back as
// itself, an alias the schema does not declare. The result may be the cached tensor shared with
// the LoRA ops, so it is never written to (F.linear only reads it).
at::Tensor float32_weight_op(const at::Tensor& weight) {
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kBFloat16 || weight.scalar_type() == at::kHalf,
                   "fastlora.float32_weight: weight must be bfloat16 or float16, got ", weight.scalar_type());
  return float32_weight(weight);
}
}  // namespace

// Ops without tensor arguments: registered as catch-all kernels (fastlora.cpu wraps them).
TORCH_LIBRARY_FRAGMENT(fastlora, m) {
  m.def("weight_cache_limit() -> int", &limit_op);
  m.def("set_weight_cache_limit(int bytes) -> int", &set_limit_op);
  m.def("weight_cache_usage() -> (int, int)", &usage_op);
  m.def("clear_weight_cache() -> ()", &clear_op);
  m.def("float32_weight(Tensor weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastlora, CPU, m) { m.impl("float32_weight", &float32_weight_op); }

}  // namespace fastlora
