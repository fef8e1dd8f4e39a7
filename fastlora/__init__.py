"""fastlora: fast, communication-efficient federated LoRA for PyTorch.

Ops live under ``torch.ops.fastlora`` and are wrapped here with docstrings:

    fastlora.lora_linear     fused LoRA linear layer (forward + backward)
    fastlora.topk_sparsify   top-k sparsification with error feedback -> SparseDelta
    fastlora.codec           wire format for SparseDelta (encode / decode)
    fastlora.sparse_aggregate  weighted sum of many clients' sparse updates
"""
from fastlora.ops import lora_linear, new_residual, sparse_aggregate, topk_sparsify
from fastlora import codec
from fastlora.sparse_delta import Layout, SparseDelta

__version__ = "0.1.0"
__all__ = ["codec", "lora_linear", "topk_sparsify", "sparse_aggregate", "new_residual", "SparseDelta", "Layout", "__version__"]
