"""LoRA over a quantized, frozen base weight (QLoRA):
``y = x @ dequant(W)^T + bias + scaling * (dropout(x) @ A^T @ B^T + lora_B_bias)``.

Ops (schemas and the weight format in csrc/lora_quantized_linear.cpp):
  fastlora::lora_quantized_linear      public op; validates, flattens leading dims, draws the
                                       dropout seed.
  fastlora::lora_quantized_linear_fwd  2-D forward, returns (y, xa) with xa = dropout(x) @ A^T.
  fastlora::lora_quantized_linear_bwd  2-D backward: grad_x through dequant(W), grad_bias,
                                       grad_lora_A, grad_lora_B (the base weight is frozen).
  fastlora::dequantize                 the full-precision weight.

Dispatch: CPU -> C++ (csrc/cpu/lora_quantized_linear_cpu.cpp: the weight dequantized panel by
panel into the GEMM, never in full); CUDA -> Triton (kernels/lora_quantized_linear.py: the weight
dequantized tile by tile inside the GEMMs' K loops, and tile by tile into the output for
dequantize; float64 activations to the reference); any other device
-> fastlora.reference. The weight's container and the quantizers are in fastlora.quantize.
"""
from __future__ import annotations

import torch

from fastlora import _library  # noqa: F401  (registers the C++ schemas and CPU kernels)
from fastlora import reference
from fastlora.ops.lora_linear import _seed_tensor
from fastlora.quantize import QuantizedWeight

_FWD = "fastlora::lora_quantized_linear_fwd"
_BWD = "fastlora::lora_quantized_linear_bwd"
_DEQ = "fastlora::dequantize"


def lora_quantized_linear(x, weight: QuantizedWeight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=True,
                          lora_B_bias=None, seed=None):
    """:func:`fastlora.lora_linear` over a quantized base weight (a :class:`fastlora.QuantizedWeight`:
    NF4 / FP4 / int8, e.g. from :func:`fastlora.quantize` or ``QuantizedWeight.from_bnb``).

    float32 / float64 x: everything in x's dtype. A float16 / bfloat16 x: the base product (and
    grad_x's base term) in x's dtype on the weight rounded to it, as bitsandbytes computes with
    its compute dtype (kernels may keep it in float32: the CPU kernel does where half GEMMs are
    slow), the LoRA branch, bias and adapter gradients in float32; y and grad_x rounded once to
    x's dtype, xa and the adapters' gradients to theirs (x's dtype, or float32 for a
    half-precision x, PEFT's default). The weight gets no gradient; ``bias`` may be trainable.
    The full-precision weight is never materialised."""
    if not isinstance(weight, QuantizedWeight):
        raise TypeError(f"fastlora.lora_quantized_linear: weight must be a fastlora.QuantizedWeight, "
                        f"got {type(weight).__name__} (quantize it with fastlora.quantize)")
    seed = _seed_tensor(seed, "fastlora.lora_quantized_linear")
    return torch.ops.fastlora.lora_quantized_linear(
        x, weight.data, weight.scales(), weight.code, weight.blocksize, list(weight.shape), bias, lora_A, lora_B,
        float(scaling), float(dropout_p), bool(training), lora_B_bias, seed)


# --- fake (meta) implementations ------------------------------------------------------------

@torch.library.register_fake(_FWD)
def _fwd_fake(x, qweight, absmax, code, blocksize, weight_shape, bias, lora_A, lora_B, scaling, dropout_p, seed,
              lora_B_bias):
    return x.new_empty(x.shape[0], weight_shape[0]), lora_A.new_empty(x.shape[0], lora_A.shape[0])


@torch.library.register_fake(_BWD)
def _bwd_fake(grad_y, x, qweight, absmax, code, blocksize, weight_shape, lora_A, lora_B, xa, scaling, dropout_p,
              seed, output_mask):
    need_x, need_b = output_mask
    return (x.new_empty(x.shape if need_x else 0), x.new_empty(weight_shape[0] if need_b else 0),
            lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape))


@torch.library.register_fake(_DEQ)
def _dequantize_fake(qweight, absmax, code, blocksize, weight_shape, dtype):
    return qweight.new_empty(tuple(weight_shape), dtype=dtype)


# --- autograd and autocast: in C++ (csrc/lora_quantized_linear.cpp, LoraQuantizedLinearFunction) --

# --- CUDA: Triton kernels (float64 goes to the reference: Triton has no fast fp64 dot) ------

def use_triton(x):
    return x.dtype != torch.float64


def _fwd_cuda(x, qweight, absmax, code, blocksize, weight_shape, bias, lora_A, lora_B, scaling, dropout_p, seed,
              lora_B_bias):
    if not use_triton(x):
        return _fwd_reference(x, qweight, absmax, code, blocksize, weight_shape, bias, lora_A, lora_B, scaling,
                              dropout_p, seed, lora_B_bias)
    # The C++ checks first: the kernels trust the codes' and scales' sizes against weight_shape.
    torch.ops.fastlora._lora_quantized_linear_fwd_check(x, qweight, absmax, code, blocksize, weight_shape, bias,
                                                        lora_A, lora_B, scaling, dropout_p, seed, lora_B_bias)
    from fastlora.kernels import lora_quantized_linear as tk
    return tk.lora_quantized_forward(x, qweight, absmax, code, blocksize, weight_shape, bias, lora_A, lora_B,
                                     scaling, dropout_p, seed, lora_B_bias)


def _bwd_cuda(grad_y, x, qweight, absmax, code, blocksize, weight_shape, lora_A, lora_B, xa, scaling, dropout_p,
              seed, output_mask):
    if not use_triton(x):
        return _bwd_reference(grad_y, x, qweight, absmax, code, blocksize, weight_shape, lora_A, lora_B, xa,
                              scaling, dropout_p, seed, output_mask)
    torch.ops.fastlora._lora_quantized_linear_bwd_check(grad_y, x, qweight, absmax, code, blocksize, weight_shape,
                                                        lora_A, lora_B, xa, scaling, dropout_p, seed)
    from fastlora.kernels import lora_quantized_linear as tk
    return tk.lora_quantized_backward(grad_y, x, qweight, absmax, code, blocksize, weight_shape, lora_A, lora_B,
                                      xa, scaling, dropout_p, seed, *output_mask)


def _dequantize_cuda(qweight, absmax, code, blocksize, weight_shape, dtype):
    torch.ops.fastlora._dequantize_check(qweight, absmax, code, blocksize, weight_shape, dtype)
    from fastlora.kernels import lora_quantized_linear as tk
    return tk.dequantize(qweight, absmax, code, blocksize, weight_shape, dtype)


# Registered here rather than with decorators so the functions stay importable (the tests run
# the CUDA dispatch path on CPU tensors under the Triton interpreter).
torch.library.register_kernel(_FWD, "cuda", _fwd_cuda)
torch.library.register_kernel(_BWD, "cuda", _bwd_cuda)
torch.library.register_kernel(_DEQ, "cuda", _dequantize_cuda)


# --- any device without a kernel: the pure-PyTorch reference ----------------------------------

def _fwd_reference(x, qweight, absmax, code, blocksize, weight_shape, bias, lora_A, lora_B, scaling, dropout_p, seed,
                   lora_B_bias):
    torch.ops.fastlora._lora_quantized_linear_fwd_check(x, qweight, absmax, code, blocksize, weight_shape, bias,
                                                        lora_A, lora_B, scaling, dropout_p, seed, lora_B_bias)
    return reference.lora_quantized_linear_with_shrink(x, qweight, absmax, code, blocksize, weight_shape, bias,
                                                       lora_A, lora_B, scaling, dropout_p, int(seed.item()),
                                                       lora_B_bias)


def _bwd_reference(grad_y, x, qweight, absmax, code, blocksize, weight_shape, lora_A, lora_B, xa, scaling, dropout_p,
                   seed, output_mask):
    torch.ops.fastlora._lora_quantized_linear_bwd_check(grad_y, x, qweight, absmax, code, blocksize, weight_shape,
                                                        lora_A, lora_B, xa, scaling, dropout_p, seed)
    return reference.lora_quantized_linear_backward(grad_y, x, qweight, absmax, code, blocksize, weight_shape,
                                                    lora_A, lora_B, xa, scaling, dropout_p, int(seed.item()),
                                                    *output_mask)


def _dequantize_reference(qweight, absmax, code, blocksize, weight_shape, dtype):
    torch.ops.fastlora._dequantize_check(qweight, absmax, code, blocksize, weight_shape, dtype)
    return reference.dequantize(qweight, absmax, code, blocksize, weight_shape, dtype)


torch.library.register_kernel(_FWD, None, _fwd_reference)
torch.library.register_kernel(_BWD, None, _bwd_reference)
torch.library.register_kernel(_DEQ, None, _dequantize_reference)
