"""Client side: :func:`client_update` turns a train message into the reply for any PyTorch
model whose trainable parameters are the federated ones (its persistent buffers federate too,
dense: :mod:`fastlora.flower.buffers`); :func:`load_global` decodes a download (e.g. in an
evaluate handler)."""
from __future__ import annotations

import math
from typing import Callable, Dict, Mapping, Tuple, Union

import torch

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fastlora import codec
from fastlora.fl.client import decode_dense, sparsify_encode
from fastlora.fl.model import get_adapter, set_adapter
from fastlora.fl.strategies import Strategy, parse_strategy
from fastlora.fl.view import apply_download
from fastlora.ops.sparsify import new_residual
from fastlora.sparse_delta import Layout

from .buffers import Buffers, buffers_record, load_buffers, model_buffers, record_buffers
from .dp import KEY_CLIPPING_NORM, clip_payload, clipping_norm_of, refuse_flower_clipping_mod
from .wire import (BUFFERS_KEY, CONFIG_DOWN, CONFIG_DOWN_KIND, CONFIG_ERROR_FEEDBACK, CONFIG_UP_DENSITY,
                   CONFIG_VALUES, CONFIG_VIEW_FROM, CONFIG_VIEW_TO, NUM_EXAMPLES_KEY, REPLY_ARRAYS_KEY,
                   REPLY_METRICS_KEY, RESIDUAL_KEY, VIEW_KEY, VIEW_VERSION_KEY, _single_array_record, pack_payload,
                   unpack_payload, unpack_payloads)

Adapter = Dict[str, torch.Tensor]


def _message_config(msg: Message):
    configs = list(msg.content.config_records.values()) if msg.has_content() else []
    return configs[0] if len(configs) == 1 else {}


def _upload_settings(msg: Message, strategy) -> Tuple[float, str, bool]:
    if strategy is not None:   # only the upload settings matter here: any strategy will do
        s = parse_strategy(strategy) if isinstance(strategy, str) else strategy
        if not isinstance(s, Strategy):
            raise TypeError(f"strategy must be a fastlora Strategy or a spec string, got {type(s).__name__}")
        return s.up_density, s.values, s.error_feedback
    cfg = _message_config(msg)
    missing = [k for k in (CONFIG_UP_DENSITY, CONFIG_VALUES, CONFIG_ERROR_FEEDBACK) if k not in cfg]
    if missing:
        raise ValueError(f"fastlora client: the message's ConfigRecord lacks {missing} (was it sent by "
                         "fastlora.flower.SparseLoRA?); pass strategy=... to client_update")
    s = Strategy("flower-client", up_density=float(cfg[CONFIG_UP_DENSITY]), values=str(cfg[CONFIG_VALUES]),
                 error_feedback=bool(cfg[CONFIG_ERROR_FEEDBACK]))
    return s.up_density, s.values, s.error_feedback


def _model_layout(model: torch.nn.Module) -> Tuple[Layout, Adapter]:
    adapter = get_adapter(model)
    if not adapter:
        raise ValueError("fastlora client: the model has no trainable parameters (the adapter = the trainable "
                         "parameters: inject LoRA and freeze the base model)")
    return Layout.of(adapter), adapter


def _decode_download(msg: Message, layout: Layout) -> Adapter:
    if msg.has_error():
        raise ValueError(f"fastlora client: the message carries an error: {msg.error.reason}")
    payload = unpack_payload(_single_array_record(msg.content, "fastlora client"))
    try:
        return decode_dense(payload, layout)
    except codec.DecodeError as e:
        raise ValueError(
            f"fastlora client: cannot decode the server's adapter against this model's trainable parameters "
            f"({len(layout.names)} tensors, {layout.numel} entries): {e}. The server's initial arrays must "
            "be fastlora.flower.initial_arrays() of the same model (same LoRA targets, rank and trainable "
            "parameters).") from None


def _plain_arrays(msg: Message, layout: Layout) -> Tuple[Adapter, Buffers]:
    """The global tensors and buffers of an evaluate message (Flower's plain ArrayRecord of
    both: what the model's ``state_dict`` holds when its trainable parameters are all its
    parameters)."""
    tensors = _single_array_record(msg.content, "fastlora client").to_torch_state_dict()
    if any(sp.name not in tensors or tuple(tensors[sp.name].shape) != tuple(sp.shape) for sp in layout.specs):
        raise ValueError(f"fastlora client: the server's arrays ({len(tensors)} tensors) do not match this model's "
                         f"trainable parameters ({len(layout.names)} tensors, {layout.numel} entries)")
    adapter = {n: tensors[n].to(torch.float32).contiguous() for n in layout.names}
    return adapter, {n: t for n, t in tensors.items() if n not in adapter}


def _sent_buffers(msg: Message, model: torch.nn.Module) -> None:
    """Loads the global buffers a train message carries (under :data:`BUFFERS_KEY`) into
    ``model``. None (the server does not know them yet): the node keeps its own."""
    record = msg.content.array_records.get(BUFFERS_KEY)
    if record is not None:
        try:
            buffers = record_buffers(record)
        except ValueError as e:
            raise ValueError(f"fastlora client: the server's buffers: {e}") from None
        load_buffers(model, buffers)


def load_global(msg: Message, model: torch.nn.Module) -> Adapter:
    """Loads the global tensors a :class:`SparseLoRA` train or evaluate message carries into
    ``model`` (its trainable parameters), and the global buffers when it carries them (into
    its persistent buffers), and returns the tensors (float32). For evaluate handlers
    (evaluate messages carry Flower's plain ArrayRecord of the global tensors and buffers, so
    ``model.load_state_dict(msg.content["arrays"].to_torch_state_dict())`` works too,
    strictly when the trainable parameters are all the model's parameters), and used by
    :func:`client_update` for dense and sparse downloads."""
    layout, _ = _model_layout(model)
    if _message_config(msg).get(CONFIG_DOWN) == "plain":
        if msg.has_error():
            raise ValueError(f"fastlora client: the message carries an error: {msg.error.reason}")
        start, buffers = _plain_arrays(msg, layout)
        if buffers:  # none: the server does not know them yet, and the node keeps its own
            load_buffers(model, buffers)
    else:
        start = _decode_download(msg, layout)
        _sent_buffers(msg, model)
    set_adapter(model, start)
    return start


def _load_view(msg: Message, context: Context, model: torch.nn.Module) -> Adapter:
    """``diff`` download: applies the message's steps to the view this node keeps in
    ``context.state`` (or takes the resynced view), stores the result there and loads it into
    ``model``. Returns a copy (float32)."""
    if msg.has_error():
        raise ValueError(f"fastlora client: the message carries an error: {msg.error.reason}")
    layout, _ = _model_layout(model)
    cfg = _message_config(msg)
    kind, start_version, version = cfg.get(CONFIG_DOWN_KIND), cfg.get(CONFIG_VIEW_FROM), cfg.get(CONFIG_VIEW_TO)
    if kind not in ("diff", "resync") or not isinstance(version, int):
        raise ValueError(f"fastlora client: a diff download needs {CONFIG_DOWN_KIND!r} ('diff' or 'resync') and "
                         f"{CONFIG_VIEW_TO!r} in the message's ConfigRecord (sent by fastlora.flower.SparseLoRA)")
    payloads = unpack_payloads(_single_array_record(msg.content, "fastlora client"))
    held = None
    if kind == "diff":
        stored = context.state.get(VIEW_VERSION_KEY) if VIEW_VERSION_KEY in context.state else None
        held_version = stored.get("version") if isinstance(stored, ConfigRecord) else None
        if held_version != start_version or VIEW_KEY not in context.state:
            raise ValueError(f"fastlora client: the server sent the view's steps from version {start_version}, but "
                             f"this node holds {'no view' if held_version is None else f'version {held_version}'}; "
                             "the server resends the whole view to a node whose reply did not arrive")
        held = {n: t.clone().to(torch.float32) for n, t in context.state[VIEW_KEY].to_torch_state_dict().items()}
        if list(held) != list(layout.names) or any(tuple(held[sp.name].shape) != tuple(sp.shape)
                                                   for sp in layout.specs):
            raise ValueError(f"fastlora client: the view in context.state[{VIEW_KEY!r}] does not match the model's "
                             "adapter (did the model change between rounds?)")
    try:
        view = apply_download(held, kind, payloads, layout)
    except codec.DecodeError as e:
        raise ValueError(f"fastlora client: cannot decode the server's download against this model's trainable "
                         f"parameters ({len(layout.names)} tensors, {layout.numel} entries): {e}") from None
    _sent_buffers(msg, model)
    context.state[VIEW_KEY] = ArrayRecord(view)
    context.state[VIEW_VERSION_KEY] = ConfigRecord({"version": int(version)})
    set_adapter(model, view)
    return {n: t.clone() for n, t in view.items()}


def _load_residual(context: Context, key: str, like: Adapter) -> Adapter:
    if key not in context.state:
        return new_residual(like)
    rec = context.state[key]
    if not isinstance(rec, ArrayRecord):
        raise ValueError(f"fastlora client: context.state[{key!r}] is a {type(rec).__name__}, not an ArrayRecord")
    res = {n: t.clone().to(torch.float32) for n, t in rec.to_torch_state_dict().items()}
    if list(res) != list(like) or any(res[n].shape != like[n].shape for n in like):
        raise ValueError(f"fastlora client: the error-feedback residual in context.state[{key!r}] does not match "
                         "the model's adapter (did the model change between rounds?); delete it to start over")
    return res


def client_update(msg: Message, context: Context, model: torch.nn.Module,
                  train_fn: Callable[[torch.nn.Module], Union[int, Tuple[int, Mapping[str, float]]]], *,
                  strategy: Union[Strategy, str, None] = None, residual_key: str = RESIDUAL_KEY) -> Message:
    """One client round on Flower: decode the download into ``model``'s adapter, train, reply.

    1. The message's single payload ArrayRecord is decoded against ``model``'s trainable
       parameters (the adapter, float32, ``named_parameters`` order) and loaded into them. A
       ``diff`` download applies its steps to the view this node keeps in
       ``context.state[VIEW_KEY]`` (or replaces it with a resynced view) and loads that. The
       global buffers, when the message carries them (``BUFFERS_KEY``), are loaded into the
       model's persistent buffers (:func:`fastlora.flower.buffers.model_buffers`).
    2. ``train_fn(model)`` trains in place and returns the number of examples (the FedAvg
       weight), or ``(num_examples, {metric: value})``.
    3. The update ``trained - downloaded`` is sparsified (top ``up_density`` of update +
       residual when error feedback is on; the residual, i.e. what was not sent, is kept in
       ``context.state[residual_key]`` as an ArrayRecord) and encoded. When the message's
       ConfigRecord carries Flower's clipping norm ``C`` (``"clipping_norm"``, put there by
       ``DifferentialPrivacyClientSideFixedClipping``), the update that is sent (after top-k and
       the travel rounding) is scaled to L2 norm <= ``C`` as the server decodes it; what that
       removes goes back into the residual (with error feedback) or is lost (without). A model
       with persistent buffers is refused then (they would travel unclipped), and so is Flower's
       ``fixedclipping_mod`` around this call (it cannot read payloads; see docs/api/flower.md).
    4. Returns ``Message(RecordDict({"arrays": pack_payload(payload), "metrics":
       MetricRecord({"num-examples": n, ...})}), reply_to=msg)``, plus, for a model with
       persistent buffers, their values after training, dense in their own dtype, as an
       ArrayRecord under ``BUFFERS_KEY`` (``"fastlora.buffers"``).

    Upload settings come from the message's ConfigRecord (sent by :class:`SparseLoRA`) unless
    ``strategy`` (a fastlora Strategy or spec) is given. Errors (a model that does not match
    the server's layout, a bad num_examples) raise ValueError: Flower turns an exception in a
    ClientApp into an error reply, which the server counts as a failure.
    """
    density, values, error_feedback = _upload_settings(msg, strategy)
    clipping_norm = clipping_norm_of(_message_config(msg), "fastlora client")
    if clipping_norm is not None:
        refuse_flower_clipping_mod("fastlora client")
        buffers = model_buffers(model)
        if buffers:
            raise ValueError(f"fastlora client: the train config carries {KEY_CLIPPING_NORM!r} (central DP), but the "
                             f"model has persistent buffers ({list(buffers)[:3]}) that would travel dense and "
                             "unclipped, outside the DP guarantee; use a model without them (LayerNorm, GroupNorm, "
                             "BatchNorm(track_running_stats=False))")
    if _message_config(msg).get(CONFIG_DOWN) == "diff":
        start = _load_view(msg, context, model)
    else:
        start = load_global(msg, model)
    layout = Layout.of(start)
    out = train_fn(model)
    user_metrics: Mapping[str, float] = {}
    if isinstance(out, tuple):
        if len(out) != 2:
            raise ValueError("train_fn must return num_examples or (num_examples, metrics)")
        out, user_metrics = out
    n = out
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0:
        raise ValueError(f"train_fn must return the number of training examples (> 0), got {n!r}")
    trained = get_adapter(model)
    if list(trained) != list(start):
        raise ValueError("train_fn changed which parameters are trainable; the adapter layout must stay fixed")
    delta = {name: trained[name] - start[name] for name in layout.names}
    residual = None
    if error_feedback:
        residual = _load_residual(context, residual_key, start)
    payload = sparsify_encode(delta, layout, density=density, values=values, residual=residual)
    if clipping_norm is not None:
        payload = clip_payload(payload, layout, clipping_norm, residual)
    if residual is not None:
        context.state[residual_key] = ArrayRecord(residual)
    metrics = MetricRecord({NUM_EXAMPLES_KEY: n if isinstance(n, float) else int(n)})
    for k, v in dict(user_metrics).items():
        if k == NUM_EXAMPLES_KEY:
            raise ValueError(f"train_fn metrics must not contain {NUM_EXAMPLES_KEY!r}")
        metrics[k] = v
    content = RecordDict({REPLY_ARRAYS_KEY: pack_payload(payload), REPLY_METRICS_KEY: metrics})
    buffers = model_buffers(model)
    if buffers:  # a model without buffers replies exactly as before: one ArrayRecord
        content[BUFFERS_KEY] = buffers_record(buffers)
    return Message(content, reply_to=msg)
