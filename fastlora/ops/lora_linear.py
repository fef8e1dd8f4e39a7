"""Fused LoRA linear: ``y = x @ W^T + bias + scaling * (dropout(x) @ A^T @ B^T + lora_B_bias)``.

Ops (schemas in csrc/lora_linear.cpp):
  fastlora::lora_linear      public op; validates, flattens leading dims, draws the dropout
                             seed from torch's generator (torch.manual_seed reproduces runs).
  fastlora::lora_linear_fwd  2-D forward, returns (y, xa) with xa = dropout(x) @ A^T.
  fastlora::lora_linear_bwd  2-D backward, all gradients in one pass.

Dispatch: CPU -> C++ (csrc/cpu/lora_linear_{fwd,bwd}_cpu.cpp); CUDA -> cuBLAS base products and the
rank-r work in Triton (kernels/lora_linear.py);
any other device -> fastlora.reference. The dropout mask is regenerated from the seed in
backward, so the activations saved for backward are only x and the M x r tensor xa.

Mixed-adapter batches (PEFT's ``adapter_names``) are the sibling family
``fastlora.ops.lora_grouped_linear``.
"""
from __future__ import annotations

import torch

from fastlora import _library  # noqa: F401  (registers the C++ schemas and CPU kernels)
from fastlora import reference

_FWD = "fastlora::lora_linear_fwd"
_BWD = "fastlora::lora_linear_bwd"


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=True,
                lora_B_bias=None, seed=None):
    """PEFT's LoRA Linear forward (and backward) as one fused op.

    Args:
        x: input ``(..., in_features)``; any leading dims, any strides.
        weight: frozen or trainable base weight ``(out_features, in_features)``.
        bias: base bias ``(out_features,)`` or None.
        lora_A: ``(r, in_features)``; lora_B: ``(out_features, r)``.
        scaling: LoRA scaling (``lora_alpha / r``, or ``/ sqrt(r)`` for rsLoRA).
        dropout_p: dropout probability on the LoRA branch input only, as in PEFT.
        training: dropout is applied only when True.
        lora_B_bias: optional bias of the lora_B layer (PEFT's ``lora_bias=True``).
        seed: optional dropout seed (int, or one-element int64 tensor on the CPU or on x's
            device); by default drawn on x's device from torch's default generator for it, so
            ``torch.manual_seed`` makes runs reproducible.

    Returns ``(..., out_features)`` in x's dtype. x, weight and bias share one dtype (float32,
    float64, float16 or bfloat16); the LoRA weights (lora_A, lora_B, lora_B_bias) share x's
    dtype or, for a float16 / bfloat16 x, float32: PEFT's default for half-precision models,
    computed PEFT's way (the LoRA branch in float32 on x cast to float32, added to the base
    output in float32 and rounded to x's dtype; float32 gradients for the float32 weights).
    Every tensor is on x's device. Mismatches raise ValueError/TypeError naming the argument.
    """
    seed = _seed_tensor(seed, "fastlora.lora_linear")
    return torch.ops.fastlora.lora_linear(x, weight, bias, lora_A, lora_B, float(scaling),
                                          float(dropout_p), bool(training), lora_B_bias, seed)


def _seed_tensor(seed, fn: str):
    """None, a one-element int64 tensor (checked by the op), or an int in int64's range."""
    if seed is None or isinstance(seed, torch.Tensor):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{fn}: seed must be an int or a one-element int64 tensor, got {type(seed).__name__}")
    if not -2 ** 63 <= seed < 2 ** 63:
        raise ValueError(f"{fn}: seed must fit in int64, got {seed}")
    return torch.tensor(seed, dtype=torch.int64)


def _effective_bias(bias, lora_B_bias, scaling):
    if lora_B_bias is None:
        return bias
    if bias is None:
        return lora_B_bias * scaling
    return bias + lora_B_bias * scaling


# --- fake (meta) implementations: shapes only, so torch.compile can trace the ops ----------

@torch.library.register_fake(_FWD)
def _fwd_fake(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_B_bias):
    return x.new_empty(x.shape[0], weight.shape[0]), lora_A.new_empty(x.shape[0], lora_A.shape[0])


def gradients_fake(grad_y, x, weight, lora_A, lora_B, output_mask):
    """(grad_x, grad_weight, grad_bias, grad_lora_A, grad_lora_B) of either LoRA family's
    backward op; a gradient not asked for by output_mask is an empty tensor."""
    need_x, need_w, need_b = output_mask
    return (grad_y.new_empty(x.shape if need_x else 0),
            grad_y.new_empty(weight.shape if need_w else 0),
            grad_y.new_empty(weight.shape[0] if need_b else 0),
            lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape))


@torch.library.register_fake(_BWD)
def _bwd_fake(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, output_mask):
    return gradients_fake(grad_y, x, weight, lora_A, lora_B, output_mask)


# --- autograd: in C++ (csrc/lora_linear.cpp, LoraLinearFunction), registered for every device --

# --- CUDA: Triton kernels (float64 goes to the reference: Triton has no fast fp64 dot) ------

def use_triton(x):
    return x.dtype != torch.float64


def _fwd_cuda(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_B_bias):
    if not use_triton(x):
        return _fwd_reference(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_B_bias)
    torch.ops.fastlora._lora_linear_fwd_check(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_B_bias)
    from fastlora.kernels import lora_linear as tk
    # The seed tensor as it is: the kernels read it on the device (no host sync; capturable).
    return tk.lora_linear_forward(x, weight, _effective_bias(bias, lora_B_bias, scaling), lora_A, lora_B,
                                  scaling, dropout_p, seed)


def _bwd_cuda(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, output_mask):
    if not use_triton(x):
        return _bwd_reference(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, output_mask)
    torch.ops.fastlora._lora_linear_bwd_check(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed)
    from fastlora.kernels import lora_linear as tk
    return tk.lora_backward(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, *output_mask)


# --- any other device: the pure-PyTorch reference -------------------------------------------

def _fwd_reference(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_B_bias):
    torch.ops.fastlora._lora_linear_fwd_check(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_B_bias)
    return reference.lora_linear_with_shrink(x, weight, bias, lora_A, lora_B, scaling, dropout_p,
                                             int(seed.item()), lora_B_bias)


def _bwd_reference(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, output_mask):
    torch.ops.fastlora._lora_linear_bwd_check(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed)
    return reference.lora_linear_backward(grad_y, x, weight, lora_A, lora_B, xa, scaling,
                                          dropout_p, int(seed.item()), *output_mask)


# Registered here rather than with decorators so the functions stay importable (the tests run
# the CUDA dispatch path on CPU tensors under the Triton interpreter).
torch.library.register_kernel(_FWD, "cuda", _fwd_cuda)
torch.library.register_kernel(_BWD, "cuda", _bwd_cuda)
torch.library.register_kernel(_FWD, None, _fwd_reference)
torch.library.register_kernel(_BWD, None, _bwd_reference)


# --- autocast: in C++ (csrc/lora_linear.cpp, lora_linear_autocast), for the public op and
# the forward op it calls; the same rule as fastlora.ops._autocast
