"""fastlora's torch ops, one module per op family. Each module holds the op's Python wrapper,
its fake (meta) implementation, its autograd formula and its per-device dispatch (C++ on CPU,
Triton/CUDA on GPU, the pure-PyTorch reference anywhere else)."""
from fastlora.ops.lora_grouped_linear import lora_grouped_linear, stack_lora_adapters
from fastlora.ops.lora_linear import lora_linear
from fastlora.ops.linear import linear
from fastlora.ops.lora_quantized_linear import lora_quantized_linear
from fastlora.ops.aggregate import sparse_aggregate
from fastlora.ops.sparsify import new_residual, topk_sparsify
from fastlora.ops.lowrank import FactoredSum, aggregate_lora, lowrank_truncate, rsvd, squeeze, svd_factored

__all__ = ["FactoredSum", "aggregate_lora", "linear", "lora_grouped_linear", "lora_linear", "lora_quantized_linear", "lowrank_truncate", "new_residual", "rsvd",
           "sparse_aggregate", "squeeze", "stack_lora_adapters", "svd_factored", "topk_sparsify"]
