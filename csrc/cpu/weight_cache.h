// Float32 copies of half-precision base weights, kept across calls.
//
// Where a bfloat16 / float16 layer runs on float32 copies (half_via_float32, cpu_utils.h), its
// weight is converted on every forward and backward: 2 x 19 ms per step at 4096^2 (a fresh
// 64 MiB buffer's page faults, most of the cost), 1.4-1.56x the float32 step at M = 256. A LoRA
// base weight is frozen, so its copy is made once and reused while the weight is unchanged.
//
// A copy is reused only while its weight has the same storage (held weakly: a freed weight's
// entry is dropped, never matched by a new tensor at the same address), offset, sizes, strides,
// version counter (every in-place write through the tensor or a view of it: optimizer steps,
// load_state_dict, copy_) and sampled values (a write through `.data`, which the version counter
// does not see: a non-safe PEFT merge). Copies of freed weights are dropped at the next call. The cache only fills up to its byte limit (default a
// quarter of the physical memory; FASTLORA_WEIGHT_CACHE_MB, or set_weight_cache_limit): past it,
// the remaining weights are converted per call as before, so a model larger than the limit keeps
// a stable part of its layers cached rather than evicting in a cycle.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace fastlora {

// w as float32: the cached copy of a contiguous bfloat16 / float16 weight (made and stored on a
// miss when it fits the limit), else w.to(float32). Callers must not write to the result.
at::Tensor float32_weight(const at::Tensor& w);

// The byte limit (>= 0; 0 disables the cache); setting a lower one drops copies over it.
int64_t weight_cache_limit();
int64_t set_weight_cache_limit(int64_t bytes);  // returns the previous limit
// Bytes and entries held now (copies of weights freed since the last call included).
int64_t weight_cache_bytes();
int64_t weight_cache_entries();
void clear_weight_cache();

}  // namespace fastlora
