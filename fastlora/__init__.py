"""fastlora: fast, communication-efficient federated LoRA for PyTorch.

Ops live under ``torch.ops.fastlora`` and are wrapped here with docstrings:

    fastlora.lora_linear     fused LoRA linear layer (forward + backward)
    fastlora.topk_sparsify   top-k sparsification with error feedback -> SparseDelta
    fastlora.codec           wire format for SparseDelta (encode / decode)
"""
from fastlora.ops import lora_linear, new_residual, topk_sparsify
from fastlora.sparse_delta import Layout, SparseDelta

__version__ = "0.1.0"
__all__ = ["lora_linear", "topk_sparsify", "new_residual", "SparseDelta", "Layout", "__version__"]
