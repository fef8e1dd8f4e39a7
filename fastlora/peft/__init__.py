"""PEFT drop-in: PEFT's LoRA ``Linear`` layers running fastlora's fused ops.

- ``layer``: ``LoraLinear`` (a subclass of PEFT's layer whose forward runs
  ``fastlora.lora_linear`` / ``lora_grouped_linear``), and the ways in: ``patch`` /
  ``unpatch``, ``register``, ``from_pretrained``, ``fast_path_calls``, ``clear_stacked_cache``.
  Its docstring lists the fast path and the fallbacks.
  ``patch`` also swaps the model's other ``nn.Linear`` layers to
  ``fastlora.Float32ComputeLinear`` (bfloat16 / float16 in float32 where those GEMMs are
  emulated).
- ``bnb``: PEFT's bitsandbytes LoRA layers (4-bit NF4 / FP4, 8-bit: QLoRA) on
  ``fastlora.lora_quantized_linear``; ``patch`` swaps them in as well.
- ``rank``: rank tools for whole models: ``squeeze_model`` (LoRA-Squeeze), ``RankAnnealing``,
  ``replace_parameters``.
"""
from .layer import FastLoraLayerMixin, LoraLinear, clear_stacked_cache, fast_path_calls, from_pretrained, patch, register, unpatch
from .rank import RankAnnealing, replace_parameters, squeeze_model

__all__ = ["LoraLinear", "patch", "unpatch", "register", "from_pretrained", "fast_path_calls", "squeeze_model",
           "RankAnnealing", "replace_parameters", "clear_stacked_cache"]
