"""Grouped LoRA linear over mixed-adapter batches (PEFT's ``adapter_names``):
``fastlora.lora_grouped_linear``, punica SGMV-style.

Ops (schemas in csrc/lora_grouped_linear.cpp):
  fastlora::lora_grouped_linear      public op; validates shapes / dtypes / devices.
  fastlora::lora_grouped_linear_fwd  2-D kernel op; per device: CPU -> C++
                                     (csrc/cpu/lora_grouped_linear_cpu.cpp), CUDA -> Triton
                                     (kernels/lora_grouped_linear.py), else -> fastlora.reference.
  fastlora::lora_grouped_linear_bwd  its gradients: fastlora.reference (index ops, small GEMMs
                                     per adapter) on every device; on CPU, float16, and bfloat16
                                     without native bf16 GEMMs, are computed in float32 (torch's
                                     GEMMs in those dtypes are slow there), as the forward.
The forward is the fast part (mixed batches are an inference feature); the backward makes the
op usable under autograd and torch.compile (an op, so that data-dependent code stays opaque).
"""
from __future__ import annotations

import torch

from fastlora import _library  # noqa: F401  (registers the C++ schemas and CPU kernels)
from fastlora import cpu, reference
from fastlora.ops._autocast import register_autocast
from fastlora.ops.lora_linear import gradients_fake, use_triton

_GFWD = "fastlora::lora_grouped_linear_fwd"
_GBWD = "fastlora::lora_grouped_linear_bwd"


def stack_lora_adapters(lora_As, lora_Bs):
    """Stack per-adapter LoRA pairs for ``lora_grouped_linear``: lora_As[k] (r_k, in),
    lora_Bs[k] (out, r_k) -> (lora_A (K, r_max, in), lora_B (K, out, r_max), ranks (K,) int64),
    zero-padded to r_max. Build it once and pass the three tensors on every call (the stacking
    copies every adapter). Differentiable (cat/pad), so gradients reach the per-adapter
    tensors."""
    if len(lora_As) != len(lora_Bs):
        raise ValueError(f"fastlora.lora_grouped_linear: got {len(lora_As)} lora_As but {len(lora_Bs)} lora_Bs")
    if not lora_As:
        raise ValueError("fastlora.lora_grouped_linear: at least one adapter is needed to stack "
                         "(pass pre-stacked (0, r, in) / (0, out, r) tensors for none)")
    for k, (A, B) in enumerate(zip(lora_As, lora_Bs)):
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"fastlora.lora_grouped_linear: adapter {k}: lora_A must be (r, in) and lora_B "
                             f"(out, r) with the same r, got {tuple(A.shape)} and {tuple(B.shape)}")
    ranks = [A.shape[0] for A in lora_As]
    r_max = max(ranks)
    pad = torch.nn.functional.pad
    A = torch.stack([pad(a, (0, 0, 0, r_max - a.shape[0])) for a in lora_As])
    B = torch.stack([pad(b, (0, r_max - b.shape[1])) for b in lora_Bs])
    return A, B, torch.tensor(ranks, dtype=torch.int64)


def lora_grouped_linear(x, weight, bias, lora_As, lora_Bs, scalings, row_adapter, ranks=None):
    """LoRA Linear over a mixed-adapter batch (PEFT's ``adapter_names=[...]``) in one op:

        y[i] = x[i] @ W^T + bias + s_a * (x[i] @ A_a^T) @ B_a^T,   a = row_adapter[i]

    and ``y[i] = x[i] @ W^T + bias`` where ``row_adapter[i] == -1`` (PEFT's ``"__base__"``).

    Args:
        x: input ``(..., in_features)``; any leading dims, any strides.
        weight, bias: base layer ``(out, in)`` and ``(out,)`` or None.
        lora_As, lora_Bs: lists of per-adapter ``(r_k, in)`` / ``(out, r_k)`` tensors (ranks
            may differ), or pre-stacked ``(K, r_max, in)`` / ``(K, out, r_max)`` tensors (see
            ``stack_lora_adapters``: stack once, reuse on every call).
        scalings: per-adapter scalings (list of floats or a ``(K,)`` float tensor).
        row_adapter: adapter id per row: a tensor or list of shape ``x.shape[:-1]``, or of shape
            ``(x.shape[0],)`` (one id per sample, expanded over the other leading dims).
        ranks: with pre-stacked tensors, the actual rank of each adapter (``(K,)`` int64;
            default r_max for all); columns past it are never read.

    Returns ``(..., out_features)`` in x's dtype. No dropout (an inference feature, as PEFT's
    mixed batches). Differentiable (backward by index ops per adapter).
    """
    if isinstance(lora_As, (list, tuple)):
        if ranks is not None:
            raise ValueError("fastlora.lora_grouped_linear: ranks is only for pre-stacked lora_A / lora_B")
        lora_A, lora_B, ranks = stack_lora_adapters(lora_As, lora_Bs)
    else:
        lora_A, lora_B = lora_As, lora_Bs
        if ranks is None and isinstance(lora_A, torch.Tensor) and lora_A.dim() == 3:
            ranks = torch.full((lora_A.shape[0],), lora_A.shape[1], dtype=torch.int64)
    if not isinstance(scalings, torch.Tensor):
        scalings = torch.tensor([float(s) for s in scalings], dtype=torch.float32)
    if not isinstance(ranks, torch.Tensor):
        ranks = torch.tensor(ranks, dtype=torch.int64)
    if x.dim() < 1:
        raise ValueError("fastlora.lora_grouped_linear: x must have at least 1 dim (..., in_features)")
    lead = x.shape[:-1]
    rows = x.shape[:-1].numel()
    if not isinstance(row_adapter, torch.Tensor):
        row_adapter = torch.tensor(row_adapter, dtype=torch.int64, device=x.device)
    if tuple(row_adapter.shape) == tuple(lead):
        row_adapter = row_adapter.reshape(rows)
    elif x.dim() > 2 and tuple(row_adapter.shape) == (x.shape[0],):
        row_adapter = row_adapter.repeat_interleave(rows // max(x.shape[0], 1))
    else:
        raise ValueError(f"fastlora.lora_grouped_linear: row_adapter must have shape x.shape[:-1]={tuple(lead)} "
                         f"(one adapter id per row) or ({x.shape[0] if x.dim() > 1 else rows},) (one per "
                         f"sample), got {tuple(row_adapter.shape)}")
    y = torch.ops.fastlora.lora_grouped_linear(x.reshape(rows, x.shape[-1]), weight, bias, lora_A, lora_B,
                                               scalings, ranks, row_adapter)
    return y.view(*lead, y.shape[-1])


@torch.library.register_fake(_GFWD)
def _grouped_fake(x, weight, bias, lora_A, lora_B, scalings, ranks, row_adapter):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.register_fake(_GBWD)
def _grouped_bwd_fake(grad_y, x, weight, lora_A, lora_B, scalings, ranks, row_adapter, output_mask):
    return gradients_fake(grad_y, x, weight, lora_A, lora_B, output_mask)


def _grouped_setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scalings, ranks, row_adapter = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, scalings, ranks, row_adapter)


def _grouped_backward(ctx, grad_y):
    x, weight, lora_A, lora_B, scalings, ranks, row_adapter = ctx.saved_tensors
    nx, nw, nb, nA, nB = ctx.needs_input_grad[:5]
    if grad_y is None:
        return (None,) * 8
    gx, gw, gb, gA, gB = torch.ops.fastlora.lora_grouped_linear_bwd(grad_y, x, weight, lora_A, lora_B, scalings,
                                                                    ranks, row_adapter, [nx, nw, nb])
    return (gx if nx else None, gw if nw else None, gb if nb else None, gA if nA else None,
            gB if nB else None, None, None, None)


torch.library.register_autograd(_GFWD, _grouped_backward, setup_context=_grouped_setup_context)


def _grouped_cuda(x, weight, bias, lora_A, lora_B, scalings, ranks, row_adapter):
    if not use_triton(x):
        return _grouped_reference(x, weight, bias, lora_A, lora_B, scalings, ranks, row_adapter)
    torch.ops.fastlora._lora_grouped_linear_fwd_check(x, weight, bias, lora_A, lora_B, scalings, ranks, row_adapter)
    from fastlora.kernels import lora_grouped_linear as tg
    reference.check_grouped_values(ranks, row_adapter, lora_A.shape[1])
    return tg.grouped_forward(x, weight, bias, lora_A, lora_B, scalings, ranks, row_adapter)


def _grouped_reference(x, weight, bias, lora_A, lora_B, scalings, ranks, row_adapter):
    torch.ops.fastlora._lora_grouped_linear_fwd_check(x, weight, bias, lora_A, lora_B, scalings, ranks, row_adapter)
    return reference.lora_grouped_linear(x, weight, bias, lora_A, lora_B, scalings, ranks, row_adapter)


def _grouped_bwd_reference(grad_y, x, weight, lora_A, lora_B, scalings, ranks, row_adapter, output_mask):
    torch.ops.fastlora._lora_grouped_linear_bwd_check(grad_y, x, weight, lora_A, lora_B, scalings, ranks, row_adapter)
    return reference.lora_grouped_linear_backward(grad_y, x, weight, lora_A, lora_B, scalings, ranks, row_adapter,
                                                  *output_mask)


def _grouped_bwd_cpu(grad_y, x, weight, lora_A, lora_B, scalings, ranks, row_adapter, output_mask):
    if not (x.dtype == torch.float16 or (x.dtype == torch.bfloat16 and not cpu.native_bf16_matmul())):
        return _grouped_bwd_reference(grad_y, x, weight, lora_A, lora_B, scalings, ranks, row_adapter, output_mask)
    # torch's float16 CPU GEMMs have no fast kernel, nor its bfloat16 ones without AVX512-BF16 /
    # AMX (grad_y @ weight: seconds at 512 x 2048^2, as for lora_linear, whose C++ backward goes
    # through float32 the same way): compute in float32 and round the gradients once.
    torch.ops.fastlora._lora_grouped_linear_bwd_check(grad_y, x, weight, lora_A, lora_B, scalings, ranks, row_adapter)
    f = [t.float() for t in (grad_y, x, weight, lora_A, lora_B)]
    grads = reference.lora_grouped_linear_backward(*f, scalings, ranks, row_adapter, *output_mask)
    return tuple(g.to(x.dtype) for g in grads)


torch.library.register_kernel(_GFWD, "cuda", _grouped_cuda)
torch.library.register_kernel(_GFWD, None, _grouped_reference)
torch.library.register_kernel(_GBWD, "cpu", _grouped_bwd_cpu)
torch.library.register_kernel(_GBWD, None, _grouped_bwd_reference)


# --- autocast: the public op and its forward op ---------------------------------------------------
# lora_grouped_linear[_fwd](x, weight, bias, lora_A, lora_B, scalings, ranks, row_adapter)
register_autocast("lora_grouped_linear", {0, 1, 2, 3, 4})
register_autocast("lora_grouped_linear_fwd", {0, 1, 2, 3, 4})
