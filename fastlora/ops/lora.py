"""Fused LoRA linear: ``y = x @ W^T + bias + scaling * (dropout(x) @ A^T @ B^T + lora_B_bias)``.

Ops (schemas in csrc/lora_linear.cpp):
  fastlora::lora_linear      public op; validates, flattens leading dims, draws the dropout
                             seed from torch's generator (torch.manual_seed reproduces runs).
  fastlora::lora_linear_fwd  2-D forward, returns (y, xa) with xa = dropout(x) @ A^T.
  fastlora::lora_linear_bwd  2-D backward, all gradients in one pass.

Dispatch: CPU -> C++ (csrc/cpu/lora_linear_cpu.cpp); CUDA -> Triton (kernels/lora_linear.py);
any other device -> fastlora.reference. The dropout mask is regenerated from the seed in
backward, so the activations saved for backward are only x and the M x r tensor xa.
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
        seed: optional dropout seed (int or one-element int64 CPU tensor); by default drawn
            from torch's default generator, so ``torch.manual_seed`` makes runs reproducible.

    Returns ``(..., out_features)`` in x's dtype. All tensors must share x's dtype (float32,
    float64, float16 or bfloat16) and device; mismatches raise ValueError/TypeError naming
    the argument.
    """
    if isinstance(seed, int):
        seed = torch.tensor(seed, dtype=torch.int64)
    return torch.ops.fastlora.lora_linear(x, weight, bias, lora_A, lora_B, float(scaling),
                                          float(dropout_p), bool(training), lora_B_bias, seed)


def _effective_bias(bias, lora_B_bias, scaling):
    if lora_B_bias is None:
        return bias
    if bias is None:
        return lora_B_bias * scaling
    return bias + lora_B_bias * scaling


# --- fake (meta) implementations: shapes only, so torch.compile can trace the ops ----------

@torch.library.register_fake(_FWD)
def _fwd_fake(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_B_bias):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


@torch.library.register_fake(_BWD)
def _bwd_fake(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, output_mask):
    need_x, need_w, need_b = output_mask
    return (grad_y.new_empty(x.shape if need_x else 0),
            grad_y.new_empty(weight.shape if need_w else 0),
            grad_y.new_empty(weight.shape[0] if need_b else 0),
            grad_y.new_empty(lora_A.shape), grad_y.new_empty(lora_B.shape))


# --- autograd -------------------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_B_bias = inputs
    _, xa = output
    ctx.mark_non_differentiable(xa)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    # Only x and the M x r shrink are activations; weight, A, B are parameters anyway and
    # the dropout mask is regenerated from the seed.
    ctx.save_for_backward(x, weight, lora_A, lora_B, xa, seed)


def _backward(ctx, grad_y, _grad_xa):
    x, weight, lora_A, lora_B, xa, seed = ctx.saved_tensors
    nx, nw, nb, nA, nB, _, _, _, nBb = ctx.needs_input_grad
    if grad_y is None:
        return (None,) * 9
    # A frozen base weight never pays for the dW GEMM (output_mask).
    gx, gw, gb, gA, gB = torch.ops.fastlora.lora_linear_bwd(
        grad_y, x, weight, lora_A, lora_B, xa, ctx.scaling, ctx.dropout_p, seed,
        [nx, nw, nb or nBb])
    return (gx if nx else None, gw if nw else None, gb if nb else None,
            gA if nA else None, gB if nB else None, None, None, None,
            gb * ctx.scaling if nBb else None)


torch.library.register_autograd(_FWD, _backward, setup_context=_setup_context)


# --- CUDA: Triton kernels (float64 goes to the reference: Triton has no fast fp64 dot) ------

def _use_triton(x):
    return x.dtype != torch.float64


def _fwd_cuda(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_B_bias):
    if not _use_triton(x):
        return _fwd_reference(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_B_bias)
    from fastlora.kernels import lora_linear as tk
    s = int(seed.item())
    xa = tk.lora_shrink(x, lora_A, dropout_p, s)
    y = tk.lora_forward(x, weight, _effective_bias(bias, lora_B_bias, scaling), xa, lora_B, scaling)
    return y, xa


def _bwd_cuda(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, output_mask):
    if not _use_triton(x):
        return _bwd_reference(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, output_mask)
    from fastlora.kernels import lora_linear as tk
    return tk.lora_backward(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p,
                            int(seed.item()), *output_mask)


# --- any other device: the pure-PyTorch reference -------------------------------------------

def _fwd_reference(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_B_bias):
    return reference.lora_linear_with_shrink(x, weight, bias, lora_A, lora_B, scaling, dropout_p,
                                             int(seed.item()), lora_B_bias)


def _bwd_reference(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, output_mask):
    return reference.lora_linear_backward(grad_y, x, weight, lora_A, lora_B, xa, scaling,
                                          dropout_p, int(seed.item()), *output_mask)


# Registered here rather than with decorators so the functions stay importable (the tests run
# the CUDA dispatch path on CPU tensors under the Triton interpreter).
torch.library.register_kernel(_FWD, "cuda", _fwd_cuda)
torch.library.register_kernel(_BWD, "cuda", _bwd_cuda)
torch.library.impl(_FWD, "default", _fwd_reference)
torch.library.impl(_BWD, "default", _bwd_reference)
