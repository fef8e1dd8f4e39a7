"""Server side: the :class:`SparseLoRA` strategy (Flower's FedAvg with fastlora payloads both
ways; dense, sparse or diff downloads; the buffers FedAvg'd dense; its state checkpointed) and
the helpers that turn a model or adapter into its initial arrays."""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from fastlora import codec
from fastlora.fl import checkpoint
from fastlora.fl.client import sparsify_encode
from fastlora.fl.model import get_adapter
from fastlora.fl.server import ServerOptimizer
from fastlora.fl.strategies import Strategy, parse_strategy
from fastlora.fl.view import ServerView
from fastlora.ops.aggregate import sparse_aggregate
from fastlora.sparse_delta import Layout

from .buffers import (Buffers, BufferSpec, buffers_record, check_buffers, model_buffers, record_buffers, spec_of,
                      weighted_mean, wire_tensor)
from .dp import KEY_CLIPPING_NORM, NORM_CHECK_RTOL, clipping_norm_of, refuse_flower_wrapper, update_norm
from .tracker import CommTracker, RoundBytes
from .wire import (BUFFERS_KEY, CONFIG_DOWN, CONFIG_DOWN_KIND, CONFIG_ERROR_FEEDBACK, CONFIG_UP_DENSITY,
                   CONFIG_VALUES, CONFIG_VIEW_FROM, CONFIG_VIEW_TO, MAX_NUM_EXAMPLES, PAYLOAD_KEY, PAYLOAD_STYPE,
                   PayloadError, pack_payload, pack_payloads, unpack_payload)

Adapter = Dict[str, torch.Tensor]
CHECKPOINT_KIND = "fastlora.flower.SparseLoRA/1"   # meta["kind"] of SparseLoRA.save_state's checkpoints


def as_strategy(strategy: Union[Strategy, str]) -> Strategy:
    """A fastlora :class:`~fastlora.fl.strategies.Strategy` from itself or a spec string
    (``"flasc:up=1/16,down=1/4"``), checked for what Flower's Message API supports."""
    if isinstance(strategy, str):
        strategy = parse_strategy(strategy)
    elif not isinstance(strategy, Strategy):
        raise TypeError(f"expected a fastlora Strategy or a spec string such as 'flasc:up=1/16', "
                        f"got {type(strategy).__name__}")
    if strategy.exact:
        raise ValueError(f"strategy {strategy.label!r}: exact (FlexLoRA) aggregation needs per-client LoRA ranks "
                         "and is not supported by fastlora.flower; use fedavg, flasc or ef-topk")
    if strategy.stale_beta:
        raise ValueError(f"strategy {strategy.label!r}: FedStale keeps a memory per client id, which a Flower "
                         "strategy does not have; use ef-topk")
    return strategy


def _float32_adapter(tensors: Mapping[str, torch.Tensor]) -> Adapter:
    return {n: t.detach().to(device="cpu", dtype=torch.float32).contiguous().clone() for n, t in tensors.items()}


class GlobalArrays(ArrayRecord):
    """The global model as :class:`SparseLoRA` takes and returns it (``initial_arrays``,
    ``Result.arrays``, :meth:`SparseLoRA.global_arrays`): one plain ArrayRecord of the global
    tensors (float32, ``named_parameters`` order of the trainable parameters) followed by the
    global buffers (their own dtype; bfloat16 as float32), so that ``to_torch_state_dict()`` is
    the model's ``state_dict`` when its trainable parameters are all its parameters.
    ``buffer_names`` says which keys are buffers (FedAvg'd, not part of the sparse payloads);
    a plain ArrayRecord given to the strategy holds tensors only."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor]):
        clash = sorted(set(tensors) & set(buffers))
        if clash:
            raise ValueError(f"GlobalArrays: {clash[:3]} named both a tensor and a buffer")
        super().__init__({**tensors, **{n: wire_tensor(t) for n, t in buffers.items()}})
        self.buffer_names = tuple(buffers)


def initial_arrays(model_or_adapter) -> ArrayRecord:
    """The ``initial_arrays`` for :meth:`SparseLoRA.start`. Of a model: its trainable
    parameters (float32, ``named_parameters`` order) and its persistent buffers
    (:func:`fastlora.flower.buffers.model_buffers`) as :class:`GlobalArrays`, so the first
    round already sends the buffers down and the strategy knows the model's set of buffers
    (none, for a LoRA model). Of a ``{name: tensor}`` adapter: a plain ArrayRecord of it (the
    buffers' set is then the first accepted reply's)."""
    if isinstance(model_or_adapter, torch.nn.Module):
        adapter, buffers = get_adapter(model_or_adapter), model_buffers(model_or_adapter)
    else:
        adapter, buffers = _float32_adapter(model_or_adapter), None
    if not adapter:
        raise ValueError("the model has no trainable parameters: inject LoRA adapters (and freeze the base) first")
    return ArrayRecord(adapter) if buffers is None else GlobalArrays(adapter, buffers)


def _split_arrays(arrays: ArrayRecord) -> Tuple[Adapter, Optional[Buffers]]:
    """The global tensors (float32) and buffers of ``arrays``; buffers None for a plain
    ArrayRecord (tensors only)."""
    if not isinstance(arrays, ArrayRecord) or not len(arrays):
        raise ValueError("SparseLoRA: the global arrays must be a non-empty ArrayRecord of the adapter's tensors "
                         "(fastlora.flower.initial_arrays(model))")
    if PAYLOAD_KEY in arrays and arrays[PAYLOAD_KEY].stype == PAYLOAD_STYPE:
        raise ValueError("SparseLoRA: the global arrays hold a fastlora payload, not the dense adapter; pass "
                         "fastlora.flower.initial_arrays(model)")
    buffer_names = set(arrays.buffer_names) if isinstance(arrays, GlobalArrays) else set()
    adapter, buffers = {}, {}
    for name, arr in arrays.items():
        try:
            t = torch.from_numpy(arr.numpy().copy())
        except TypeError as e:
            raise ValueError(f"SparseLoRA: global array {name!r}: {e}") from None
        if name in buffer_names:
            buffers[name] = t
        elif not t.is_floating_point():
            raise ValueError(f"SparseLoRA: global array {name!r} has dtype {t.dtype}, expected floating point (a "
                             "buffer? pass fastlora.flower.initial_arrays(model), which tells the strategy which "
                             "arrays are buffers)")
        else:
            adapter[name] = t.to(torch.float32).contiguous()
    if not adapter:
        raise ValueError("SparseLoRA: the global arrays hold no trainable tensors")
    return adapter, (buffers if isinstance(arrays, GlobalArrays) else None)


def _dense_fp32_record_bytes(adapter: Adapter) -> int:
    """What Flower's FedAvg sends per message for these tensors: ``ArrayRecord(state_dict)``
    of float32 numpy arrays (``.npy`` bytes with their headers, plus the keys). The buffers
    add what their own dense record counts (``count_bytes`` sums over the Arrays)."""
    return ArrayRecord({n: t for n, t in adapter.items()}).count_bytes()


class SparseLoRA(FedAvg):
    """Flower FedAvg with fastlora payloads both ways (see the module docstring for the wire
    contract).

    Args:
        strategy: a fastlora ``Strategy`` or spec string. Default ``"ef-topk"`` (up 1/8 with
            error feedback, the stateful ``diff`` download at 1/16 with the server's error
            feedback, fp16 values both ways): the best accuracy per byte measured (docs/benchmarks.md,
            Flower section). Others: ``"fedavg"``, ``"flasc"`` (the FLASC paper's baseline,
            which loses accuracy), ``"ef-topk:up=1/16,down=1/16,values=int8"``, ...; add
            ``server_opt=adam,server_lr=...`` for FedAdam.
        tracker: a :class:`CommTracker` to fill (default: a new one, ``self.tracker``).
        fraction_evaluate: default 0 (no federated evaluation; use ``evaluate_fn`` in
            ``start`` for a centralised one). When enabled, evaluate messages carry the global
            tensors and buffers as Flower's plain ArrayRecord (dense, as FedAvg's), so Flower's
            own evaluate handlers work unchanged (or use :func:`load_global`).
        Other keyword arguments are FedAvg's (fraction_train, min_train_nodes,
        min_available_nodes, weighted_by_key, arrayrecord_key, configrecord_key,
        train_metrics_aggr_fn, evaluate_metrics_aggr_fn).

    Buffers (BatchNorm statistics, ...) are FedAvg'd dense beside the sparse payloads: the
    weighted mean of the nodes' buffers after training (float64 sums, cast back; integer
    buffers rounded), with the same weights as the update and no server optimizer; see
    ``global_buffers``. :meth:`save_state` / :meth:`load_state` checkpoint the strategy so that
    a restarted server resumes the run; rounds are numbered across ``start`` calls and
    checkpoints (``last_round``).

    Central DP: run it under Flower's ``DifferentialPrivacyClientSideFixedClipping`` (the nodes'
    :func:`~fastlora.flower.client_update` clips what it sends; replies above the clipping norm
    are rejected); the server-side and adaptive DP wrappers are refused in the first
    ``configure_train`` (see :mod:`fastlora.flower.dp`).
    """

    def __init__(self, strategy: Union[Strategy, str] = "ef-topk", *, tracker: Optional[CommTracker] = None,
                 fraction_evaluate: float = 0.0, **fedavg_kwargs):
        self.fl_strategy = as_strategy(strategy)
        super().__init__(fraction_evaluate=fraction_evaluate, **fedavg_kwargs)
        self.tracker = tracker if tracker is not None else CommTracker()
        self.optimizer = ServerOptimizer(self.fl_strategy.server_optimizer, self.fl_strategy.server_lr)
        self.layout: Optional[Layout] = None
        self.global_adapter: Optional[Adapter] = None
        # The global buffers and their names/shapes/dtypes: None until known (from
        # initial_arrays(model), else the first accepted reply), () for a model without any.
        self.global_buffers: Buffers = {}
        self.buffer_spec: Optional[BufferSpec] = None
        self._buffers_out: Optional[ArrayRecord] = None   # the dense record of global_buffers sent down
        self._returned: Optional[ArrayRecord] = None      # the ArrayRecord we last returned
        self._fedavg_tensor_bytes = 0
        # Flower's start numbers its rounds from 1; the strategy numbers them across starts and
        # checkpoints (the view's versions, the nodes' server-round and the tracker need that).
        self.last_round = 0
        self._round_offset = 0
        # diff download: the view up-to-date nodes hold, and which version each node holds (set
        # when its train reply is accepted: it applied the download before training)
        self.view: Optional[ServerView] = None
        self.held: Dict[int, int] = {}
        self._sent_versions: Dict[int, int] = {}
        # central DP (Flower's client-side clipping wrapper): this round's clipping norm (None:
        # no DP) and how many nodes it sampled (the noise is calibrated for a weight of 1/m)
        self._clipping_norm: Optional[float] = None
        self._sampled = 0

    def summary(self) -> None:
        super().summary()
        s = self.fl_strategy
        log(logging.INFO, "\t└──> fastlora: %s (upload %s%s, download %s %s)", s.label, s.values,
            ", error feedback" if s.error_feedback else "", s.down_label, s.down_values)

    # -- state ------------------------------------------------------------------------------
    def _round(self, server_round: int) -> int:
        return server_round + self._round_offset

    @property
    def _fedavg_bytes(self) -> int:
        """What Flower's FedAvg sends per message: the tensors in float32 and the buffers."""
        return self._fedavg_tensor_bytes + self._buffer_bytes()

    def _buffer_bytes(self) -> int:
        return self._buffers_out.count_bytes() if self._buffers_out is not None else 0

    def _set_buffers(self, buffers: Buffers) -> None:
        self.global_buffers = buffers
        self.buffer_spec = spec_of(buffers)
        self._buffers_out = buffers_record(buffers) if buffers else None

    def _sync_global(self, arrays: ArrayRecord) -> None:
        """Takes ``arrays`` (what Strategy.start passes: the initial arrays, then what
        aggregate_train returned) as the global tensors (and buffers, from GlobalArrays)."""
        if arrays is self._returned and self.global_adapter is not None:
            return
        adapter, buffers = _split_arrays(arrays)
        layout = Layout.of(adapter)
        if self.layout is None:
            self.layout = layout
            self._fedavg_tensor_bytes = _dense_fp32_record_bytes(adapter)
            if self.fl_strategy.down == "diff":
                self.view = ServerView(layout, self.fl_strategy.down_density, self.fl_strategy.down_values)
        elif layout != self.layout:
            raise ValueError(f"SparseLoRA: the global arrays changed layout between rounds: {layout!r} vs "
                             f"{self.layout!r}")
        if buffers is not None and self.buffer_spec is not None and spec_of(buffers) != self.buffer_spec:
            raise ValueError(f"SparseLoRA: the global arrays' buffers {spec_of(buffers)} are not this run's "
                             f"{self.buffer_spec}")
        self.global_adapter = adapter
        if buffers is not None:
            self._set_buffers(buffers)
        self._returned = None

    def global_arrays(self) -> "GlobalArrays":
        """The global model now: its tensors and buffers (e.g. the ``initial_arrays`` of a
        ``start`` that resumes after :meth:`load_state`)."""
        if self.global_adapter is None:
            raise RuntimeError("SparseLoRA.global_arrays: no global model yet (start the strategy or load_state)")
        return GlobalArrays({n: self.global_adapter[n] for n in self.layout.names}, self.global_buffers)

    def download_payload(self) -> bytes:
        """The train download of a dense / sparse strategy (a diff strategy's are per node,
        from its view): the global adapter, dense, or (FLASC) the top ``down_density`` of each
        of its tensors (per tensor, as ``fastlora.fl``'s server: a global top-k would keep the
        random lora_A and drop the still tiny lora_B)."""
        s = self.fl_strategy
        adapter = {n: self.global_adapter[n] for n in self.layout.names}
        if s.down != "sparse":
            return sparsify_encode(adapter, self.layout, density=1.0, values=s.down_values)
        return sparsify_encode(adapter, self.layout, density=s.down_density, values=s.down_values, per_tensor=True)

    def _config(self, config: ConfigRecord, down: Optional[str] = None) -> ConfigRecord:
        s = self.fl_strategy
        out = ConfigRecord(dict(config))
        out[CONFIG_UP_DENSITY] = float(s.up_density)
        out[CONFIG_VALUES] = s.values
        out[CONFIG_ERROR_FEEDBACK] = bool(s.error_feedback)
        out[CONFIG_DOWN] = down or s.down
        return out

    def _add_buffers(self, content: RecordDict) -> None:
        """Every train message carries the global buffers, dense (they are small), once known."""
        if self._buffers_out is not None:
            content[BUFFERS_KEY] = self._buffers_out

    def _diff_messages(self, rnd: int, messages: List[Message]) -> List[Message]:
        """One message per sampled node with its own download: the view's steps since the
        version it holds, or the whole view (fastlora.fl.view)."""
        self.view.advance(self.global_adapter, rnd)
        out = []
        self._sent_versions = {}
        for msg in messages:
            node = msg.metadata.dst_node_id
            held = self.held.pop(node, None)  # set again when its reply is accepted
            kind, payloads = self.view.download(held)
            config = ConfigRecord(dict(msg.content[self.configrecord_key]))
            config[CONFIG_DOWN_KIND] = kind
            config[CONFIG_VIEW_FROM] = int(held) if kind == "diff" else -1
            config[CONFIG_VIEW_TO] = self.view.version
            record = pack_payloads(payloads)
            content = RecordDict({self.arrayrecord_key: record, self.configrecord_key: config})
            self._add_buffers(content)
            out.append(Message(content, message_type=msg.metadata.message_type, dst_node_id=node))
            self.tracker.sent(rnd, record.count_bytes() + self._buffer_bytes(), 1, self._fedavg_bytes)
            self._sent_versions[node] = self.view.version
        return out

    def _track_sent(self, rnd: int, messages: list, nbytes: int) -> list:
        if messages:
            self.tracker.sent(rnd, nbytes, len(messages), self._fedavg_bytes)
        return messages

    # -- Strategy API ---------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        refuse_flower_wrapper(self)
        if server_round == 1:
            # Flower's start numbers its rounds from 1: a new start (ours, or a wrapper's: Flower's
            # DP wrappers run Strategy.start, never SparseLoRA.start) goes on after the rounds done.
            self._round_offset = self.last_round
        self._sync_global(arrays)
        self._clipping_norm = clipping_norm_of(config, "SparseLoRA")
        if self._clipping_norm is not None:
            self._check_dp()
        if self.fraction_train == 0.0:
            return []
        rnd = self._round(server_round)   # what the nodes see as "server-round"
        if self.view is not None:
            messages = list(super().configure_train(rnd, ArrayRecord(), self._config(config), grid))
            messages = self._diff_messages(rnd, messages)
        else:
            record = pack_payload(self.download_payload())
            messages = list(super().configure_train(rnd, record, self._config(config), grid))
            for msg in messages:
                self._add_buffers(msg.content)
            self._track_sent(rnd, messages, record.count_bytes() + self._buffer_bytes())
        self._sampled = len(messages)
        return messages

    def _check_dp(self) -> None:
        """What central DP with client-side clipping needs of this run, checked before the
        first message goes out. The noise Flower's wrapper adds to the aggregated arrays
        protects a release whose sensitivity to one node is its clipped update times its
        weight: true of FedAvg's step (sgd), not of FedAdam's (its step is normalised by
        moments built from the un-noised updates). Buffers travel dense and unclipped."""
        if self.fl_strategy.server_optimizer != "sgd":
            raise ValueError(f"SparseLoRA {self.fl_strategy.label!r} under central DP ({KEY_CLIPPING_NORM!r} in the "
                             f"train config): server_opt={self.fl_strategy.server_optimizer} is not covered by "
                             "the noise Flower's DP wrapper adds after the server step (its step is not bounded by "
                             "the clipped updates); use the sgd server optimizer (the default, FedAvg)")
        if self.buffer_spec:
            raise ValueError(f"SparseLoRA under central DP ({KEY_CLIPPING_NORM!r} in the train config): the model's "
                             f"persistent buffers ({[n for n, _, _ in self.buffer_spec][:3]}) would be averaged "
                             "dense and unclipped, outside the DP guarantee; use a model without them (LayerNorm, "
                             "GroupNorm, BatchNorm(track_running_stats=False))")

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        # Synced even without evaluation: under Flower's DP wrappers ``arrays`` is the noised
        # aggregate, and from here on (evaluate_fn, save_state, global_arrays) the strategy must
        # hold that release, not the un-noised sum it returned.
        self._sync_global(arrays)
        if self.fraction_evaluate == 0.0:
            return []
        rnd = self._round(server_round)
        # Evaluate messages carry the global tensors and buffers as Flower's plain ArrayRecord
        # (dense, what FedAvg sends): they stand alone, and Flower's own evaluate handlers
        # (``model.load_state_dict(msg.content["arrays"].to_torch_state_dict())``) work on them.
        record = ArrayRecord({**{n: self.global_adapter[n] for n in self.layout.names}, **self.global_buffers})
        messages = list(super().configure_evaluate(rnd, record, self._config(config, "plain"), grid))
        return self._track_sent(rnd, messages, record.count_bytes())

    def check_reply(self, msg: Message):
        """``(SparseDelta, num_examples, buffers)`` of a train reply (``buffers``: ``{}`` when
        it carries none), or raises ValueError with the reason it is rejected."""
        if msg.has_error():
            raise ValueError(f"client error (code {msg.error.code}): {msg.error.reason}")
        content = msg.content
        arrays = [r for k, r in content.array_records.items() if k != BUFFERS_KEY]
        metrics = list(content.metric_records.values())
        configs = list(content.config_records.values())
        if len(arrays) != 1 or len(metrics) != 1 or configs:
            raise ValueError(f"expected exactly one ArrayRecord and one MetricRecord (besides the buffers under "
                             f"{BUFFERS_KEY!r}), got {len(arrays)} ArrayRecord(s), {len(metrics)} MetricRecord(s), "
                             f"{len(configs)} ConfigRecord(s)")
        n = metrics[0].get(self.weighted_by_key)
        if (n is None or isinstance(n, bool) or not isinstance(n, (int, float))
                or not math.isfinite(n) or not 0 < n <= MAX_NUM_EXAMPLES):
            raise ValueError(f"MetricRecord {self.weighted_by_key!r} must be a number > 0 (and <= 2**53), "
                             f"got {n!r}")
        try:
            payload = unpack_payload(arrays[0])
            sd = codec.decode(payload, layout=self.layout, max_numel=self.layout.numel)
        except (PayloadError, codec.DecodeError) as e:
            raise ValueError(f"bad payload: {e}") from None
        if self._clipping_norm is not None:
            # The node clips (that is what bounds its contribution); this check catches one that
            # does not, e.g. a client that is not fastlora.flower.client_update.
            norm = update_norm(sd)
            if norm > self._clipping_norm * (1 + NORM_CHECK_RTOL):
                raise ValueError(f"the update's L2 norm {norm:.6g} is above the clipping norm "
                                 f"{self._clipping_norm:.6g} (central DP): the node did not clip it (does it reply "
                                 "with fastlora.flower.client_update?)")
        return sd, n, self._reply_buffers(content.array_records.get(BUFFERS_KEY))

    def _reply_buffers(self, record: Optional[ArrayRecord]) -> Buffers:
        """The buffers of a reply, checked against this run's set (the first accepted reply's
        when the server does not know it yet)."""
        if record is None:
            if self.buffer_spec:
                raise ValueError(f"bad buffers: the reply carries none (ArrayRecord {BUFFERS_KEY!r}), this run's "
                                 f"model has {len(self.buffer_spec)}")
            return {}
        try:
            buffers = record_buffers(record)
            check_buffers(buffers, self.buffer_spec if self.buffer_spec is not None else spec_of(buffers))
        except ValueError as e:
            raise ValueError(f"bad buffers: {e}") from None
        return buffers

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> Tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        if self.layout is None:
            raise RuntimeError("SparseLoRA.aggregate_train before configure_train: the strategy has no global "
                               "adapter yet (run it with strategy.start(...))")
        rnd = self._round(server_round)
        # Node-id order: the float32 sums do not depend on the order in which replies arrived.
        replies = sorted(replies, key=lambda m: m.metadata.src_node_id)
        accepted, counts, buffer_sets, contents, reasons, sizes = [], [], [], [], [], []
        seen = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_content():
                sizes.append(sum(r.count_bytes() for r in msg.content.array_records.values()))
            try:
                sd, n, buffers = self.check_reply(msg)
                if node in seen:  # one update per node and round: a second would count twice
                    raise ValueError("a second update from this node in this round (the first one counts)")
                seen.add(node)
            except Exception as e:  # noqa: BLE001  a bad reply must never stop the round
                why = str(e) if isinstance(e, ValueError) else f"unexpected {type(e).__name__}: {e}"
                reason = f"node {node}: {why}"
                log(logging.WARNING, "SparseLoRA round %s: rejected the reply of %s", rnd, reason)
                reasons.append(reason)
                continue
            if self.buffer_spec is None:  # the first accepted reply fixes the run's set of buffers
                self.buffer_spec = spec_of(buffers)
            accepted.append(sd)
            counts.append(n)
            buffer_sets.append(buffers)
            contents.append(msg.content)
            if node in self._sent_versions:
                self.held[node] = self._sent_versions[node]
        self.last_round = rnd
        if accepted:
            total = float(sum(counts))
            weights = [c / total for c in counts]
            if self._clipping_norm is not None and max(weights) * self._sampled > 1 + 1e-12:
                log(logging.WARNING, "SparseLoRA round %s (central DP): an accepted update weighs %.4g, more than "
                    "1/%d (1 / the nodes sampled), which the DP noise std (noise_multiplier * clipping_norm / "
                    "num_sampled_clients) assumes: make every node report the same num-examples (return 1 from "
                    "train_fn) and check that every sampled node's update arrives", rnd, max(weights),
                    self._sampled)
            update = sparse_aggregate(accepted, weights, layout=self.layout)
            self.optimizer.apply(self.global_adapter, update)
            if self.buffer_spec:
                self._set_buffers(weighted_mean(buffer_sets, weights))
        # after the buffers: FedAvg's figure counts them from the round the server knows them
        for nbytes in sizes:
            self.tracker.received(rnd, nbytes, self._fedavg_bytes)
        self.tracker.result(rnd, len(accepted), reasons)
        log(logging.INFO, "aggregate_train: %d updates accepted, %d rejected", len(accepted), len(reasons))

        metrics = MetricRecord()
        if contents:
            try:
                metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
            except Exception as e:  # user metrics that do not average: report ours anyway
                log(logging.WARNING, "SparseLoRA: could not aggregate the clients' metrics: %s", e)
                metrics = MetricRecord()
        rb = self.tracker.rounds[rnd]
        metrics["fastlora-accepted"] = len(accepted)
        metrics["fastlora-failures"] = len(reasons)
        metrics["fastlora-down-bytes"] = rb.down_bytes
        metrics["fastlora-up-bytes"] = rb.up_bytes
        metrics["fastlora-fedavg-bytes"] = rb.fedavg_total
        if not accepted:
            undecodable = [r for r in reasons if "cannot decode the server's" in r]
            if replies and len(undecodable) == len(replies):
                # Not a transient failure: no node can read what this server sends (initial
                # arrays of another model, or of more than its trainable parameters).
                raise ValueError(f"SparseLoRA round {rnd}: every node failed to decode the download "
                                 f"against its model, e.g. {undecodable[0]}")
            log(logging.WARNING, "SparseLoRA round %s: no usable update; the global adapter is unchanged", rnd)
            return None, metrics
        self._returned = self.global_arrays()
        return self._returned, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        replies = list(replies)
        for msg in replies:
            if msg.has_content():
                nbytes = sum(r.count_bytes() for r in msg.content.array_records.values())
                if nbytes:
                    self.tracker.received(self._round(server_round), nbytes, 0)
        return super().aggregate_evaluate(server_round, replies)

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: Optional[ConfigRecord] = None, evaluate_config: Optional[ConfigRecord] = None,
              evaluate_fn=None):
        """FedAvg's ``start`` for ``num_rounds`` more rounds; logs the tracker's summary line at
        the end. A strategy that already holds a global model (from :meth:`load_state` or an
        earlier ``start``) continues: ``initial_arrays`` must be that model
        (:meth:`global_arrays`), and the rounds go on from ``last_round + 1`` (in the nodes'
        ``server-round``, the view's versions and the tracker; Flower's ``Result`` and log
        number this call's rounds from 1)."""
        if self.global_adapter is not None:
            self._check_continues(initial_arrays)
            self._returned = initial_arrays
        result = super().start(grid=grid, initial_arrays=initial_arrays, num_rounds=num_rounds, timeout=timeout,
                               train_config=train_config, evaluate_config=evaluate_config, evaluate_fn=evaluate_fn)
        log(logging.INFO, "%s", self.tracker.format())
        return result

    def _check_continues(self, arrays: ArrayRecord) -> None:
        adapter, buffers = _split_arrays(arrays)
        same = list(adapter) == list(self.layout.names) and all(
            torch.equal(adapter[n], self.global_adapter[n]) for n in adapter)
        if buffers is not None:
            same = same and list(buffers) == list(self.global_buffers) and all(
                torch.equal(buffers[n], self.global_buffers[n]) for n in buffers)
        if not same:
            raise ValueError(f"SparseLoRA.start: this strategy holds the global model of round {self.last_round} "
                             "(from load_state or an earlier start), and initial_arrays is another model; pass "
                             "strategy.global_arrays() to continue, or use a new SparseLoRA to start over")

    # -- checkpoint -------------------------------------------------------------------------
    def save_state(self, path: Union[str, Path]) -> None:
        """Writes what a restarted server needs to resume this run to ``path`` (one
        ``fastlora.fl.checkpoint`` file: safetensors with a digest of every tensor, JSON
        metadata, no pickle, replaced atomically): the global tensors and buffers, the server
        optimizer's state (FedAdam's moments and step), the diff download's view and its
        steps, the view version each node holds, the layout, the strategy spec, the last round
        and the tracker's rounds. Call it between rounds (e.g. from ``evaluate_fn``, which
        Flower calls after every round) or after ``start`` returns."""
        if self.global_adapter is None:
            raise RuntimeError("SparseLoRA.save_state before the first round: there is no state to save yet")
        tensors = {f"global.{n}": self.global_adapter[n] for n in self.layout.names}
        tensors.update({f"buffer.{n}": t for n, t in self.global_buffers.items()})
        tensors.update(self.optimizer.state_tensors())
        view_meta = None
        if self.view is not None:
            view_tensors, view_meta = self.view.state("view")
            tensors.update(view_tensors)
        meta = {"kind": CHECKPOINT_KIND, "strategy": self.fl_strategy.to_dict(), "layout": self.layout.to_json_obj(),
                "buffers": None if self.buffer_spec is None else list(self.global_buffers),
                "round": self.last_round, "opt_step": self.optimizer.step_count, "view": view_meta,
                "held": sorted([node, version] for node, version in self.held.items()),
                "tracker": [dataclasses.asdict(r) for _, r in sorted(self.tracker.rounds.items())]}
        checkpoint.save(Path(path), tensors, meta)

    def load_state(self, path: Union[str, Path], *, forget_nodes: bool = False) -> None:
        """Restores what :meth:`save_state` wrote into this strategy (a new one, built with the
        same strategy spec); then ``start(grid, initial_arrays=strategy.global_arrays(),
        num_rounds=<rounds left>)`` resumes the run. Raises
        ``fastlora.fl.checkpoint.CheckpointError`` for a corrupted file (a digest mismatch),
        another kind of checkpoint, another strategy spec or another model's layout / buffers.

        ``forget_nodes``: the nodes lost their ``context.state`` too (a new Flower run that
        does not keep it): a diff strategy then sends each node the whole view on first contact
        (instead of steps from a version it no longer holds, which it would refuse).
        """
        path = Path(path)
        tensors, meta = checkpoint.load(path)
        if meta.get("kind") != CHECKPOINT_KIND:
            raise checkpoint.CheckpointError(f"{path} is not a SparseLoRA checkpoint (kind {meta.get('kind')!r}, "
                                             f"expected {CHECKPOINT_KIND!r})")
        if meta.get("strategy") != self.fl_strategy.to_dict():
            raise checkpoint.CheckpointError(
                f"{path} was written by a SparseLoRA of another strategy ({meta.get('strategy')}); this one runs "
                f"{self.fl_strategy.label!r}: build it with the spec the checkpoint was written with")
        try:
            layout = Layout.from_json_obj(meta["layout"])
            adapter = {n: tensors[f"global.{n}"].clone() for n in layout.names}
            buffers = None if meta["buffers"] is None else {n: tensors[f"buffer.{n}"].clone() for n in meta["buffers"]}
            optimizer = ServerOptimizer(self.fl_strategy.server_optimizer, self.fl_strategy.server_lr)
            optimizer.load_state(tensors, layout.names, meta["opt_step"])
            view = None
            if self.fl_strategy.down == "diff":
                view = ServerView(layout, self.fl_strategy.down_density, self.fl_strategy.down_values)
                view.load_state(tensors, meta["view"], "view")
            held = {} if forget_nodes else {int(node): int(version) for node, version in meta["held"]}
            rounds = {int(r["round"]): RoundBytes(**r) for r in meta["tracker"]}
            last_round = int(meta["round"])
        except (KeyError, TypeError, ValueError) as e:
            raise checkpoint.CheckpointError(f"{path}: incomplete SparseLoRA checkpoint "
                                             f"({type(e).__name__}: {e})") from None
        if self.layout is not None and layout != self.layout:
            raise checkpoint.CheckpointError(f"{path} holds the adapter of another model: {layout!r}, this strategy "
                                             f"runs {self.layout!r}")
        if buffers is not None and self.buffer_spec is not None and spec_of(buffers) != self.buffer_spec:
            raise checkpoint.CheckpointError(f"{path} holds the buffers of another model: {spec_of(buffers)}, this "
                                             f"strategy runs {self.buffer_spec}")
        # everything read and checked: replace the state
        self.layout, self.global_adapter = layout, adapter
        self._fedavg_tensor_bytes = _dense_fp32_record_bytes(adapter)
        self.global_buffers, self.buffer_spec, self._buffers_out = {}, None, None
        if buffers is not None:
            self._set_buffers(buffers)
        self.optimizer, self.view, self.held, self._sent_versions = optimizer, view, held, {}
        self.tracker.rounds = rounds
        self.last_round = last_round
        self._returned = None
