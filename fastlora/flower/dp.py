"""Central differential privacy on Flower with compact payloads: the node clips what it sends
(Flower's ``DifferentialPrivacyClientSideFixedClipping`` puts the clipping norm in the train
config and adds the Gaussian noise to the aggregate), and the checks that stop the Flower DP
pieces that cannot read fastlora payloads early, with a message that names what works.

Flower's client-side clipping lives in a client mod (``fixedclipping_mod``) that clips the
reply's dense arrays minus the downloaded ones; fastlora's replies are payload bytes, so
:func:`fastlora.flower.client_update` clips the update itself (:func:`clip_payload`) and
refuses to run under that mod. The server-side wrappers clip the replies' dense arrays on the
server, and the adaptive ones need per-node clipping bits that ``client_update`` does not
report: :func:`refuse_flower_wrapper` stops :class:`~fastlora.flower.SparseLoRA` under them."""
from __future__ import annotations

import itertools
import math
import sys
from typing import Mapping, Optional

import torch

from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.serverapp.strategy import (DifferentialPrivacyClientSideAdaptiveClipping,
                                     DifferentialPrivacyServerSideAdaptiveClipping,
                                     DifferentialPrivacyServerSideFixedClipping)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fastlora import codec
from fastlora.fl.client import add_sparse
from fastlora.sparse_delta import Layout, SparseDelta

__all__ = ["KEY_CLIPPING_NORM", "clipping_norm_of", "update_norm", "clip_payload", "refuse_flower_clipping_mod",
           "refuse_flower_wrapper"]

# A reply's norm as the server recomputes it may differ from the node's in the last float64
# bits (another summation order); the server's check allows that much and no more.
NORM_CHECK_RTOL = 1e-9

_CLIENT_SIDE = "DifferentialPrivacyClientSideFixedClipping(SparseLoRA(...), noise_multiplier, clipping_norm, " \
               "num_sampled_clients)"


def clipping_norm_of(config: Mapping, who: str) -> Optional[float]:
    """The clipping norm Flower's client-side DP wrappers put in the train config
    (``KEY_CLIPPING_NORM``), or None when there is none (no DP)."""
    if KEY_CLIPPING_NORM not in config:
        return None
    c = config[KEY_CLIPPING_NORM]
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 0:
        raise ValueError(f"{who}: the clipping norm {KEY_CLIPPING_NORM!r} in the train config must be a finite "
                         f"number > 0, got {c!r}")
    return float(c)


def update_norm(sd: SparseDelta) -> float:
    """The L2 norm of the update a decoded payload carries (float64 sum of its values)."""
    return float(torch.linalg.vector_norm(sd.values.to(torch.float64)))


def clip_payload(payload: bytes, layout: Layout, clipping_norm: float, residual=None) -> bytes:
    """``payload`` with its update scaled to L2 norm <= ``clipping_norm`` (unchanged when it is
    already), re-encoded in the payload's own format (values, int8 block, layout mode). The
    bound holds for what the server decodes: the scaled float32 values are encoded, decoded
    and measured, and aimed lower when rounding to the travel format pushed them over.
    ``residual`` (error feedback, float32 dict in ``layout``, or None): what clipping removes
    is added to it, so that nothing is lost, only sent later (and clipped again then)."""
    sd = codec.decode(payload, layout=layout)
    norm = update_norm(sd)
    if norm <= clipping_norm:
        return payload
    info = codec.inspect(payload, layout=layout)
    fmt = dict(values=info["values"], layout=info["layout_mode"])
    if info["int8_block"]:
        fmt["int8_block"] = info["int8_block"]
    sent = sd.values.to(torch.float32)
    scale = clipping_norm / norm
    for attempt in itertools.count():
        clipped = codec.encode(SparseDelta.from_valid(sd.indices, sent * scale, layout), **fmt)
        out = codec.decode(clipped, layout=layout)
        got = update_norm(out)
        if got <= clipping_norm:
            break
        # Rounding to the travel format (fp16, bf16, int8) pushed the norm over the bound: aim
        # lower, by a margin that doubles with each try. It reaches the whole scale at the 13th
        # (scale 0: zeros, norm 0), so the loop ends; in practice one retry is enough.
        scale *= clipping_norm / got * (1.0 - 2.0 ** (attempt - 12))
    if residual is not None:
        add_sparse(residual, SparseDelta.from_valid(sd.indices, sent - out.values.to(torch.float32), layout))
    return clipped


def refuse_flower_clipping_mod(who: str) -> None:
    """Raises when Flower's ``fixedclipping_mod`` / ``adaptiveclipping_mod`` wraps this call.
    They clip the reply's arrays as dense numpy arrays, which a fastlora payload is not: after
    the training they would fail with Flower's "Unsupported serialization type" (or clip the
    payload's bytes). Flower gives a handler no list of the mods around it, so this looks for
    the mods' own code on the call stack (compared by identity, not by name)."""
    mods = {fixedclipping_mod.__code__: "fixedclipping_mod", adaptiveclipping_mod.__code__: "adaptiveclipping_mod"}
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code in mods:
            raise ValueError(f"{who}: remove Flower's {mods[frame.f_code]} from the ClientApp's mods: it clips dense "
                             "arrays and cannot read fastlora payloads. client_update clips the update it sends "
                             f"itself when the train config carries {KEY_CLIPPING_NORM!r} (server: {_CLIENT_SIDE})")
        frame = frame.f_back


def refuse_flower_wrapper(strategy) -> None:
    """Raises when ``strategy``'s method that calls this was called by one of Flower's DP
    wrappers that cannot work with compact payloads. Flower's wrappers only call the strategy
    they wrap (``self.strategy.configure_train(...)``), so the caller is the first frame up the
    stack whose ``self`` is another object; a strategy run directly has none of those there."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_locals.get("self") is strategy:
        frame = frame.f_back
    caller = frame.f_locals.get("self") if frame is not None else None
    name = type(caller).__name__
    if isinstance(caller, (DifferentialPrivacyServerSideFixedClipping, DifferentialPrivacyServerSideAdaptiveClipping)):
        raise ValueError(f"SparseLoRA cannot run under Flower's {name}: it clips each reply's dense arrays "
                         "minus the global model on the server, and SparseLoRA's replies are compact fastlora "
                         "payloads (it would fail after the first round's training). Clip on the nodes instead: "
                         f"{_CLIENT_SIDE}, whose clipping norm fastlora.flower.client_update applies to the "
                         "update it sends (no client mod)")
    if isinstance(caller, DifferentialPrivacyClientSideAdaptiveClipping):
        raise ValueError(f"SparseLoRA cannot run under Flower's {name}: it needs each node's clipping bit "
                         "(adaptiveclipping_mod's 'norm_bit'), which fastlora.flower.client_update does not "
                         f"report; use fixed clipping: {_CLIENT_SIDE}")
