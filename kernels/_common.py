"""Pieces shared by the Triton kernel modules (still leaves: torch and triton only)."""
import contextlib
from collections import OrderedDict

import torch
import triton
import triton.language as tl  # noqa: F401  (Triton requires tl in scope of a jit function)


@triton.jit
def fmix32(h):
    # MurmurHash3's 32-bit finaliser on uint32 tensors: >> is a logical shift and * wraps mod
    # 2**32 because h is unsigned (the constants are > 2**31 so they are typed uint32 too).
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


def on_device(device: torch.device):
    """Context to launch on the tensors' GPU even if it is not the current one (no-op on CPU,
    where the interpreter runs)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


_SM_COUNT: dict = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached); 1 elsewhere (the interpreter)."""
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def lru_get(cache: OrderedDict, key, make, size: int):
    """cache[key], built by make() on a miss; keeps the `size` most recently used entries.
    Used for the per-tensor-list tables the launchers build (block / chunk tables)."""
    value = cache.get(key)
    if value is None:
        value = make()
        cache[key] = value
        if len(cache) > size:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return value
