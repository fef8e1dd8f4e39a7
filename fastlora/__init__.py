"""fastlora: fast, communication-efficient federated LoRA for PyTorch.

Ops live under ``torch.ops.fastlora`` and are wrapped here with docstrings:

    fastlora.lora_linear   fused LoRA linear layer (forward + backward)
"""
from fastlora.ops import lora_linear

__version__ = "0.1.0"
__all__ = ["lora_linear", "__version__"]
