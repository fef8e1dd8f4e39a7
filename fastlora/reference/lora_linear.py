"""Reference of the ``lora_linear`` family (``fastlora::lora_linear`` / ``_fwd`` / ``_bwd``)."""
from __future__ import annotations

import torch

from .dropout_hash import dropout


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, seed=0,
                lora_B_bias=None):
    """PEFT's LoRA Linear: base(x) + scaling * lora_B(lora_A(dropout(x))).

    ``x`` may have any leading dims. ``seed`` is the dropout seed (ignored when dropout_p=0).
    Intermediate roundings follow PEFT: base output, LoRA branch and scaled LoRA branch are
    each rounded to their working dtype before the final add. Adapters in another dtype than x
    (float32 adapters on a float16 / bfloat16 model, PEFT's default) run the branch in their
    dtype on x cast to it, the sum in that dtype, cast back to x's dtype, as PEFT does.
    """
    y, _ = lora_linear_with_shrink(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, scaling,
                                   dropout_p, seed, lora_B_bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def lora_linear_with_shrink(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed,
                            lora_B_bias=None):
    """Reference of the op ``fastlora::lora_linear_fwd``: returns (y, xa) for 2-D x, where
    xa = dropout(x) @ lora_A.T (in the adapters' dtype) is the M x r activation saved for
    backward."""
    base = torch.nn.functional.linear(x2d, weight, bias)
    xa = torch.nn.functional.linear(dropout(x2d.to(lora_A.dtype), dropout_p, seed), lora_A)
    lora = torch.nn.functional.linear(xa, lora_B, lora_B_bias) * scaling
    return (base + lora).to(x2d.dtype), xa


def lora_linear_backward(grad_y, x2d, weight, lora_A, lora_B, xa, scaling, dropout_p, seed,
                         need_x=True, need_weight=False, need_bias=False):
    """Reference of ``fastlora::lora_linear_bwd``: (grad_x, grad_weight, grad_bias,
    grad_lora_A, grad_lora_B); entries not requested are empty tensors. The gradient of
    lora_B_bias is ``scaling * grad_bias`` (summed in the adapters' dtype). With adapters in
    another dtype than x, the branch's gradients are computed in the adapters' dtype on
    grad_y cast to it and the branch's term of grad_x is rounded to x's dtype before it is
    added, as autograd does through PEFT's casts."""
    gy = grad_y.to(lora_A.dtype)
    g = (gy @ lora_B) * scaling  # (M, r), shared by grad_A and grad_x
    x_drop = dropout(x2d.to(lora_A.dtype), dropout_p, seed)
    grad_A = g.t() @ x_drop
    grad_B = (gy.t() @ xa) * scaling
    grad_x = grad_y.new_empty(0)
    if need_x:
        lora_in = g @ lora_A
        if dropout_p > 0.0:
            lora_in = dropout(lora_in, dropout_p, seed)
        grad_x = grad_y @ weight + lora_in.to(grad_y.dtype)
    grad_w = grad_y.t() @ x2d if need_weight else grad_y.new_empty(0)
    grad_b = grad_y.sum(0) if need_bias else grad_y.new_empty(0)
    return grad_x, grad_w, grad_b, grad_A, grad_B
