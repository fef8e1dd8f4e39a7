"""Pure-PyTorch references for every fastlora op, one module per op family (``lora_linear``,
``lora_grouped_linear``, ``lora_quantized_linear``, ``sparsify``, ``aggregate``, ``lowrank``)
and the counter-based dropout the LoRA families share (``dropout_hash``).

These functions define the semantics. Tests compare every kernel (C++ CPU, Triton) against
them, and they are the fallback kernel on devices that have no dedicated one. They favour
clarity over speed and may allocate freely. Every public function is importable from here
(``fastlora.reference.lora_linear(...)``).
"""
from .aggregate import sparse_aggregate_
from .dropout_hash import (FMIX_C1, FMIX_C2, GOLDEN32, compute_dtype, dropout, dropout_keep_mask, dropout_scale,
                      dropout_threshold, fmix32)
from .lora_grouped_linear import check_grouped_values, lora_grouped_linear, lora_grouped_linear_backward
from .lora_linear import lora_linear, lora_linear_backward, lora_linear_with_shrink
from .lora_quantized_linear import (dequantize, lora_quantized_linear_backward,
                                    lora_quantized_linear_with_shrink)
from .lowrank import factored_sum_dense, lowrank_truncate, rsvd, rsvd_implicit, svd_factored
from .sparsify import topk_sparsify

__all__ = [
    "FMIX_C1", "FMIX_C2", "GOLDEN32", "check_grouped_values", "compute_dtype", "dequantize", "dropout",
    "dropout_keep_mask", "dropout_scale", "dropout_threshold", "factored_sum_dense", "fmix32", "lora_grouped_linear",
    "lora_grouped_linear_backward", "lora_linear", "lora_linear_backward", "lora_linear_with_shrink",
    "lora_quantized_linear_backward", "lora_quantized_linear_with_shrink", "lowrank_truncate", "rsvd",
    "rsvd_implicit", "sparse_aggregate_", "svd_factored", "topk_sparsify",
]
