"""Reference of the ``lora_quantized_linear`` family and ``fastlora::dequantize``."""
from __future__ import annotations

import torch

from .dropout_hash import compute_dtype, dropout


def dequantize(qweight, absmax, code, blocksize, weight_shape, dtype=torch.float32):
    """Reference of ``fastlora::dequantize``: ``W.flat[f] = code[q(f)] * absmax[f // blocksize]``
    (the float32 product, then dtype); 4-bit codes two per byte, the even element high."""
    n_out, n_in = weight_shape
    n = n_out * n_in
    q = qweight.reshape(-1)
    if code.numel() == 16:
        q = torch.stack([q >> 4, q & 0xF], dim=1).reshape(-1)[:n]
    scales = absmax.repeat_interleave(blocksize)[:n]
    return (code[q.long()] * scales).reshape(n_out, n_in).to(dtype)


def _quantized_base(x2d, qweight, absmax, code, blocksize, weight_shape, ct):
    """x @ dequant(W)^T in the compute dtype ct: for a float16 / bfloat16 x, the product in x's
    dtype on the weight rounded to it (bitsandbytes' compute dtype), then ct."""
    if x2d.dtype in (torch.float16, torch.bfloat16):
        w = dequantize(qweight, absmax, code, blocksize, weight_shape, x2d.dtype)
        return (x2d @ w.t()).to(ct)
    return x2d.to(ct) @ dequantize(qweight, absmax, code, blocksize, weight_shape, ct).t()


def lora_quantized_linear_with_shrink(x2d, qweight, absmax, code, blocksize, weight_shape, bias, lora_A, lora_B,
                                      scaling, dropout_p, seed, lora_B_bias=None):
    """Reference of ``fastlora::lora_quantized_linear_fwd``: (y, xa). The base product as
    ``_quantized_base`` (in x's dtype for a half-precision x, as bitsandbytes computes it;
    float32 / float64 otherwise); the bias and the LoRA branch in float32 (float64 for a float64
    x) on x cast to it, added to the base product and rounded once: y to x's dtype, xa to the
    adapters'. (A kernel may keep a half-precision x's base product in float32, before or after
    the half-precision products: closer to the exact result. The CPU kernel computes it in
    float32 where half GEMMs are slow; the Triton kernel multiplies in half precision and adds
    the epilogue to the float32 accumulator without rounding it first.)"""
    ct = compute_dtype(x2d.dtype)
    xa = dropout(x2d.to(ct), dropout_p, seed) @ lora_A.to(ct).t()
    y = _quantized_base(x2d, qweight, absmax, code, blocksize, weight_shape, ct) + (xa @ lora_B.to(ct).t()) * scaling
    if bias is not None:
        y = y + bias.to(ct)
    if lora_B_bias is not None:
        y = y + lora_B_bias.to(ct) * scaling
    return y.to(x2d.dtype), xa.to(lora_A.dtype)


def lora_quantized_linear_backward(grad_y, x2d, qweight, absmax, code, blocksize, weight_shape, lora_A, lora_B, xa,
                                   scaling, dropout_p, seed, need_x=True, need_bias=False):
    """Reference of ``fastlora::lora_quantized_linear_bwd``: (grad_x, grad_bias, grad_lora_A,
    grad_lora_B), computed as the forward is (the base term of grad_x as ``_quantized_base``,
    the rest in float32 / float64, rounded once); entries not requested are empty tensors. The
    base weight is frozen: no gradient."""
    ct = compute_dtype(x2d.dtype)
    gy = grad_y.to(ct)
    g = (gy @ lora_B.to(ct)) * scaling
    grad_A = g.t() @ dropout(x2d.to(ct), dropout_p, seed)
    grad_B = (gy.t() @ xa.to(ct)) * scaling
    grad_x = grad_y.new_empty(0)
    if need_x:
        lora_in = g @ lora_A.to(ct)
        if dropout_p > 0.0:
            lora_in = dropout(lora_in, dropout_p, seed)
        n_out, n_in = weight_shape
        # dY @ W = (W^T @ dY^T)^T: the same product as the forward's with the weight transposed
        w_t = dequantize(qweight, absmax, code, blocksize, weight_shape,
                         grad_y.dtype if grad_y.dtype in (torch.float16, torch.bfloat16) else ct)
        base = (grad_y.to(w_t.dtype) @ w_t).to(ct)
        grad_x = (base + lora_in).to(x2d.dtype)
    grad_b = gy.sum(0).to(x2d.dtype) if need_bias else grad_y.new_empty(0)
    return grad_x, grad_b, grad_A.to(lora_A.dtype), grad_B.to(lora_A.dtype)
