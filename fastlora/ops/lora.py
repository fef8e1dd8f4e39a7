"""Fused LoRA linear: ``y = x @ W^T + bias + scaling * (dropout(x) @ A^T @ B^T + lora_B_bias)``.

Ops (schemas in csrc/lora_linear.cpp):
  fastlora::lora_linear      public op; validates, flattens leading dims, draws the dropout
                             seed from torch's generator (torch.manual_seed reproduces runs).
  fastlora::lora_linear_fwd  2-D forward, returns (y, xa) with xa = dropout(x) @ A^T.
  fastlora::lora_linear_bwd  2-D backward, all gradients in one pass.

Dispatch: CPU -> C++ (csrc/cpu/lora_linear_{fwd,bwd}_cpu.cpp); CUDA -> Triton (kernels/lora_linear.py);
any other device -> fastlora.reference. The dropout mask is regenerated from the seed in
backward, so the activations saved for backward are only x and the M x r tensor xa.

Mixed-adapter batches (PEFT's ``adapter_names``): ``lora_grouped_linear`` (schemas in
csrc/lora_grouped.cpp; CPU -> csrc/cpu/lora_grouped_cpu.cpp, CUDA -> kernels/lora_grouped.py),
see the second half of this module.
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


def _gradients_fake(grad_y, x, weight, lora_A, lora_B, output_mask):
    """(grad_x, grad_weight, grad_bias, grad_lora_A, grad_lora_B) of either LoRA family's
    backward op; a gradient not asked for by output_mask is an empty tensor."""
    need_x, need_w, need_b = output_mask
    return (grad_y.new_empty(x.shape if need_x else 0),
            grad_y.new_empty(weight.shape if need_w else 0),
            grad_y.new_empty(weight.shape[0] if need_b else 0),
            lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape))


@torch.library.register_fake(_BWD)
def _bwd_fake(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, output_mask):
    return _gradients_fake(grad_y, x, weight, lora_A, lora_B, output_mask)


# --- autograd -------------------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_B_bias = inputs
    _, xa = output
    ctx.mark_non_differentiable(xa)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.lora_B_bias_dtype = None if lora_B_bias is None else lora_B_bias.dtype
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
    gBb = None
    if nBb:
        # Summed in the adapters' dtype (float32 adapters on a half-precision x: grad_y's sum in
        # float32, not the base bias gradient's half-precision rounding of it).
        gBb = gb if ctx.lora_B_bias_dtype == grad_y.dtype else grad_y.sum(0, dtype=ctx.lora_B_bias_dtype)
        gBb = gBb * ctx.scaling
    return (gx if nx else None, gw if nw else None, gb if nb else None,
            gA if nA else None, gB if nB else None, None, None, None, gBb)


torch.library.register_autograd(_FWD, _backward, setup_context=_setup_context)


# --- CUDA: Triton kernels (float64 goes to the reference: Triton has no fast fp64 dot) ------

def _use_triton(x):
    return x.dtype != torch.float64


def _fwd_cuda(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_B_bias):
    if not _use_triton(x):
        return _fwd_reference(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_B_bias)
    torch.ops.fastlora._lora_linear_fwd_check(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_B_bias)
    from fastlora.kernels import lora_linear as tk
    s = int(seed.item())
    xa = tk.lora_shrink(x, lora_A, dropout_p, s)
    y = tk.lora_forward(x, weight, _effective_bias(bias, lora_B_bias, scaling), xa, lora_B, scaling)
    return y, xa


def _bwd_cuda(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, output_mask):
    if not _use_triton(x):
        return _bwd_reference(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, output_mask)
    torch.ops.fastlora._lora_linear_bwd_check(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed)
    from fastlora.kernels import lora_linear as tk
    return tk.lora_backward(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p,
                            int(seed.item()), *output_mask)


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
torch.library.impl(_FWD, "default", _fwd_reference)
torch.library.impl(_BWD, "default", _bwd_reference)


# =============================================================================================
# Mixed-adapter batches: fastlora::lora_grouped_linear (punica SGMV-style grouped LoRA)
# =============================================================================================
#
# Ops (schemas in csrc/lora_grouped.cpp):
#   fastlora::lora_grouped_linear      public op; validates shapes / dtypes / devices.
#   fastlora::lora_grouped_linear_fwd  2-D kernel op; per device: CPU -> C++
#                                      (csrc/cpu/lora_grouped_cpu.cpp), CUDA -> Triton
#                                      (kernels/lora_grouped.py), else -> fastlora.reference.
#   fastlora::lora_grouped_linear_bwd  its gradients, one composite kernel for every device
#                                      (fastlora.reference: index ops, small GEMMs per adapter).
# The forward is the fast part (mixed batches are an inference feature); the backward makes the
# op usable under autograd and torch.compile (an op, so that data-dependent code stays opaque).

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
    return _gradients_fake(grad_y, x, weight, lora_A, lora_B, output_mask)


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
    if not _use_triton(x):
        return _grouped_reference(x, weight, bias, lora_A, lora_B, scalings, ranks, row_adapter)
    torch.ops.fastlora._lora_grouped_linear_fwd_check(x, weight, bias, lora_A, lora_B, scalings, ranks, row_adapter)
    from fastlora.kernels import lora_grouped as tg
    reference.check_grouped_values(ranks, row_adapter, lora_A.shape[1])
    return tg.grouped_forward(x, weight, bias, lora_A, lora_B, scalings, ranks, row_adapter)


def _grouped_reference(x, weight, bias, lora_A, lora_B, scalings, ranks, row_adapter):
    torch.ops.fastlora._lora_grouped_linear_fwd_check(x, weight, bias, lora_A, lora_B, scalings, ranks, row_adapter)
    return reference.lora_grouped_linear(x, weight, bias, lora_A, lora_B, scalings, ranks, row_adapter)


def _grouped_bwd(grad_y, x, weight, lora_A, lora_B, scalings, ranks, row_adapter, output_mask):
    torch.ops.fastlora._lora_grouped_linear_bwd_check(grad_y, x, weight, lora_A, lora_B, scalings, ranks, row_adapter)
    if x.device.type == "cpu" and x.dtype == torch.float16:
        # torch's float16 CPU GEMMs have no fast kernel (grad_y @ weight: seconds at 512 x 2048^2,
        # as for lora_linear, whose C++ backward goes through float32 the same way): compute in
        # float32 and round the gradients once.
        f = [t.float() for t in (grad_y, x, weight, lora_A, lora_B)]
        grads = reference.lora_grouped_linear_backward(*f, scalings, ranks, row_adapter, *output_mask)
        return tuple(g.half() for g in grads)
    return reference.lora_grouped_linear_backward(grad_y, x, weight, lora_A, lora_B, scalings, ranks, row_adapter,
                                                  *output_mask)


torch.library.register_kernel(_GFWD, "cuda", _grouped_cuda)
torch.library.impl(_GFWD, "default", _grouped_reference)
torch.library.impl(_GBWD, "default", _grouped_bwd)


# --- autocast (both families) -----------------------------------------------------------------
# Under torch.autocast the forward ops run in the autocast dtype, as nn.Linear does (and so
# PEFT's LoRA modules, whose lora_A / lora_B are nn.Linear): float32 / float16 / bfloat16
# tensors on the autocast device are cast to torch.get_autocast_dtype (float64 stays), then the
# op runs with autocast off. The kernel sits above autograd, so the casts are recorded and
# float32 parameters get float32 gradients; the backward ops see the cast dtype.
_AUTOCAST_LIB = torch.library.Library("fastlora", "FRAGMENT")


def _register_autocast(op_name: str, cast_positions) -> None:
    op = getattr(torch.ops.fastlora, op_name).default
    for device_type, key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
        def kernel(_keyset, *args, _device_type=device_type):
            dtype = torch.get_autocast_dtype(_device_type)
            args = [a.to(dtype) if i in cast_positions and _autocast_eligible(a, _device_type) else a
                    for i, a in enumerate(args)]
            with torch.autocast(_device_type, enabled=False):
                return op(*args)
        _AUTOCAST_LIB.impl(op_name, kernel, key, with_keyset=True)


def _autocast_eligible(t, device_type: str) -> bool:
    return (isinstance(t, torch.Tensor) and t.device.type == device_type and t.is_floating_point()
            and t.dtype != torch.float64)


# The public ops (their argument checks want one dtype) and the forward ops they call.
# lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, lora_B_bias, seed)
_register_autocast("lora_linear", {0, 1, 2, 3, 4, 8})
# lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, lora_B_bias)
_register_autocast("lora_linear_fwd", {0, 1, 2, 3, 4, 8})
# lora_grouped_linear[_fwd](x, weight, bias, lora_A, lora_B, scalings, ranks, row_adapter)
_register_autocast("lora_grouped_linear", {0, 1, 2, 3, 4})
_register_autocast("lora_grouped_linear_fwd", {0, 1, 2, 3, 4})
