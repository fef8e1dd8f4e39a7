"""Client side of a round: turn the downloaded bytes into a starting adapter, and the trained
adapter into upload bytes (sparsified with error feedback, encoded with ``fastlora.codec``).

Local training itself is in :mod:`fastlora.fl.model`; the simulation drives one model for all
clients in turn (see :mod:`fastlora.fl.simulation`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from fastlora import codec
from fastlora.error_feedback import compress
from fastlora.sparse_delta import Layout, SparseDelta
from fastlora.fl.strategies import Strategy

Adapter = Dict[str, torch.Tensor]

VALUE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float32}


@dataclass
class ClientState:
    """What a client keeps between rounds."""
    cid: int
    num_samples: int
    rank: int                                  # LoRA rank this client trains (exact strategy)
    residual: Optional[Adapter] = None         # error feedback: what it has not sent yet
    held: Optional[Adapter] = None             # diff download: the adapter it holds
    held_version: int = -1                     # diff download: round of the view it holds


def sparsify_encode(delta: Adapter, layout: Layout, *, density: float, values: str,
                    residual: Optional[Adapter] = None, per_tensor: bool = False) -> bytes:
    """Top-``density`` of ``delta`` (+ ``residual``, updated in place), encoded in fingerprint
    mode. Everything the payload does not carry exactly (dropped entries, value rounding,
    int8 quantisation) stays in the residual when there is one. A kept value that does not
    fit the format (fp16 above 65504, ...) raises ValueError before anything changes.

    ``per_tensor``: every tensor keeps its own top-``density`` (instead of one global top-k).
    Needed when the entries of different tensors live on different scales, as in an adapter
    itself (FLASC's sparse download): a global top-k of a LoRA adapter keeps the random lora_A
    and the head and drops the small lora_B, so clients would train a model without LoRA.

    The loop's spelling of :func:`fastlora.error_feedback.compress`, the core that
    :class:`fastlora.ErrorFeedback` (the raw-API object) runs too."""
    budget = dict(k=layout.numel) if density >= 1.0 else dict(density=density, per_tensor=per_tensor)
    return compress(delta, layout, values=values, residual=residual, overflow="raise", layout_mode="fingerprint",
                    who="sparsify_encode", **budget)


def add_sparse(adapter: Adapter, sd: SparseDelta) -> Adapter:
    """``adapter += dense(sd)`` in place (float32), touching only the kept entries."""
    for name, (idx, val) in sd.split().items():
        if idx.numel():
            adapter[name].view(-1).index_add_(0, idx, val.to(torch.float32))
    return adapter


def decode_dense(payload: bytes, layout: Layout) -> Adapter:
    """Decodes ``payload`` into a dense float32 adapter (zeros where it carries nothing)."""
    sd = codec.decode(payload, layout=layout)
    dense = sd.to_dense(torch.float32)
    return dense if layout.is_dict else {"": dense}


def upload(local: Adapter, start: Adapter, layout: Layout, strategy: Strategy, state: ClientState) -> bytes:
    """The client's upload for a non-exact strategy: its update ``local - start``."""
    delta = {n: local[n] - start[n] for n in layout.names}
    residual = state.residual if strategy.error_feedback else None
    return sparsify_encode(delta, layout, density=strategy.up_density, values=strategy.values, residual=residual)
