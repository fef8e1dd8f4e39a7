"""fastlora: fast, communication-efficient federated LoRA for PyTorch.

Ops live under ``torch.ops.fastlora`` and are wrapped here with docstrings:

    fastlora.lora_linear     fused LoRA linear layer (forward + backward)
    fastlora.linear          F.linear whose bf16 / fp16 CPU products run in float32 where those GEMMs are emulated
    fastlora.patch_linears   a model's nn.Linear layers on fastlora.linear (Float32ComputeLinear)
    fastlora.lora_grouped_linear  one LoRA layer call for a batch mixing several adapters
    fastlora.lora_quantized_linear  fused LoRA linear over a 4-bit (NF4 / FP4) or int8 base (QLoRA)
    fastlora.quantize        quantize a weight to NF4 / FP4 / int8 (bitsandbytes' layout) -> QuantizedWeight
    fastlora.QuantizedLinear a frozen quantized linear layer (fastlora.quantize_model swaps a model's in)
    fastlora.topk_sparsify   top-k sparsification with error feedback -> SparseDelta
    fastlora.codec           wire format for SparseDelta (encode / decode)
    fastlora.ErrorFeedback   client-side error-feedback compression: top-k + rounding + encode, residual kept
    fastlora.sparse_aggregate  weighted sum of many clients' sparse updates
    fastlora.rsvd            randomized SVD (dense, batched, or an implicit FactoredSum)
    fastlora.svd_factored    exact SVD of (sums of) factored products B @ A
    fastlora.lowrank_truncate best rank-r factors of (sums of) factored products B @ A
    fastlora.squeeze         LoRA-Squeeze: re-factorise a LoRA pair at a new rank
    fastlora.aggregate_lora  exact aggregation of clients' LoRA pairs, cut to a rank
    fastlora.cpu_isa         the CPU kernels' instruction-set build (FASTLORA_CPU_ISA caps it)
"""
from fastlora.ops import (FactoredSum, aggregate_lora, linear, lora_grouped_linear, lora_linear, lora_quantized_linear,
                          lowrank_truncate, new_residual, rsvd, sparse_aggregate, squeeze, stack_lora_adapters, svd_factored,
                          topk_sparsify)
from fastlora.quantize import QuantizedWeight, quantize
from fastlora.quantized_linear import QuantizedLinear, quantize_model
from fastlora.float32_compute import Float32ComputeLinear, patch_linears, unpatch_linears
from fastlora import codec, cpu
from fastlora.error_feedback import ErrorFeedback
from fastlora.cpu import cpu_isa, use_cpu_isa
from fastlora.sparse_delta import Layout, SparseDelta

cpu.check_environment()

__version__ = "0.1.0"
__all__ = ["codec", "linear", "lora_linear", "lora_grouped_linear", "lora_quantized_linear", "quantize", "QuantizedWeight",
           "QuantizedLinear", "quantize_model", "Float32ComputeLinear", "patch_linears", "unpatch_linears",
           "stack_lora_adapters", "topk_sparsify", "sparse_aggregate",
           "new_residual", "ErrorFeedback", "SparseDelta", "Layout", "rsvd", "svd_factored", "lowrank_truncate", "squeeze", "aggregate_lora", "FactoredSum", "cpu_isa", "use_cpu_isa", "__version__"]
