"""Server side: the :class:`SparseLoRA` strategy (Flower's FedAvg with fastlora payloads both
ways; dense, sparse or diff downloads) and the helpers that turn a model or adapter into its
initial arrays."""
from __future__ import annotations

import logging
import math
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from fastlora import codec
from fastlora.fl.client import sparsify_encode
from fastlora.fl.model import get_adapter
from fastlora.fl.server import ServerOptimizer
from fastlora.fl.strategies import Strategy, parse_strategy
from fastlora.fl.view import ServerView
from fastlora.ops.aggregate import sparse_aggregate
from fastlora.sparse_delta import Layout

from .tracker import CommTracker
from .wire import (CONFIG_DOWN, CONFIG_DOWN_KIND, CONFIG_ERROR_FEEDBACK, CONFIG_UP_DENSITY, CONFIG_VALUES,
                   CONFIG_VIEW_FROM, CONFIG_VIEW_TO, MAX_NUM_EXAMPLES, PAYLOAD_KEY, PAYLOAD_STYPE, PayloadError,
                   pack_payload, pack_payloads, unpack_payload)

Adapter = Dict[str, torch.Tensor]


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


def initial_arrays(model_or_adapter) -> ArrayRecord:
    """The ``initial_arrays`` for :meth:`SparseLoRA.start`: the model's adapter (its trainable
    parameters, float32, ``named_parameters`` order) as a plain ArrayRecord, or a given
    ``{name: tensor}`` adapter."""
    if isinstance(model_or_adapter, torch.nn.Module):
        adapter = get_adapter(model_or_adapter)
    else:
        adapter = _float32_adapter(model_or_adapter)
    if not adapter:
        raise ValueError("the model has no trainable parameters: inject LoRA adapters (and freeze the base) first")
    return ArrayRecord(adapter)


def _adapter_from_arrays(arrays: ArrayRecord) -> Adapter:
    if not isinstance(arrays, ArrayRecord) or not len(arrays):
        raise ValueError("SparseLoRA: the global arrays must be a non-empty ArrayRecord of the adapter's tensors "
                         "(fastlora.flower.initial_arrays(model))")
    if PAYLOAD_KEY in arrays and arrays[PAYLOAD_KEY].stype == PAYLOAD_STYPE:
        raise ValueError("SparseLoRA: the global arrays hold a fastlora payload, not the dense adapter; pass "
                         "fastlora.flower.initial_arrays(model)")
    out = {}
    for name, arr in arrays.items():
        try:
            t = torch.from_numpy(arr.numpy().copy())
        except TypeError as e:
            raise ValueError(f"SparseLoRA: global array {name!r}: {e}") from None
        if not t.is_floating_point():
            raise ValueError(f"SparseLoRA: global array {name!r} has dtype {t.dtype}, expected floating point")
        out[name] = t.to(torch.float32).contiguous()
    return out


def _dense_fp32_record_bytes(adapter: Adapter) -> int:
    """What Flower's FedAvg sends per message for this adapter: ``ArrayRecord(state_dict)``
    of float32 numpy arrays (``.npy`` bytes with their headers, plus the keys)."""
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
            tensors as Flower's plain ArrayRecord (dense float32, as FedAvg's), so Flower's
            own evaluate handlers work unchanged (or use :func:`load_global`).
        Other keyword arguments are FedAvg's (fraction_train, min_train_nodes,
        min_available_nodes, weighted_by_key, arrayrecord_key, configrecord_key,
        train_metrics_aggr_fn, evaluate_metrics_aggr_fn).
    """

    def __init__(self, strategy: Union[Strategy, str] = "ef-topk", *, tracker: Optional[CommTracker] = None,
                 fraction_evaluate: float = 0.0, **fedavg_kwargs):
        self.fl_strategy = as_strategy(strategy)
        super().__init__(fraction_evaluate=fraction_evaluate, **fedavg_kwargs)
        self.tracker = tracker if tracker is not None else CommTracker()
        self.optimizer = ServerOptimizer(self.fl_strategy.server_optimizer, self.fl_strategy.server_lr)
        self.layout: Optional[Layout] = None
        self.global_adapter: Optional[Adapter] = None
        self._returned: Optional[ArrayRecord] = None      # the ArrayRecord we last returned
        self._fedavg_bytes = 0
        # diff download: the view up-to-date nodes hold, and which version each node holds (set
        # when its train reply is accepted: it applied the download before training)
        self.view: Optional[ServerView] = None
        self.held: Dict[int, int] = {}
        self._sent_versions: Dict[int, int] = {}

    def summary(self) -> None:
        super().summary()
        s = self.fl_strategy
        log(logging.INFO, "\t└──> fastlora: %s (upload %s%s, download %s %s)", s.label, s.values,
            ", error feedback" if s.error_feedback else "", s.down_label, s.down_values)

    # -- state ------------------------------------------------------------------------------
    def _sync_global(self, arrays: ArrayRecord) -> None:
        """Takes ``arrays`` (what Strategy.start passes: the initial arrays, then what
        aggregate_train returned) as the global adapter."""
        if arrays is self._returned and self.global_adapter is not None:
            return
        adapter = _adapter_from_arrays(arrays)
        layout = Layout.of(adapter)
        if self.layout is None:
            self.layout = layout
            self._fedavg_bytes = _dense_fp32_record_bytes(adapter)
            if self.fl_strategy.down == "diff":
                self.view = ServerView(layout, self.fl_strategy.down_density, self.fl_strategy.down_values)
        elif layout != self.layout:
            raise ValueError(f"SparseLoRA: the global arrays changed layout between rounds: {layout!r} vs "
                             f"{self.layout!r}")
        self.global_adapter = adapter
        self._returned = None

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

    def _diff_messages(self, server_round: int, messages: List[Message]) -> List[Message]:
        """One message per sampled node with its own download: the view's steps since the
        version it holds, or the whole view (fastlora.fl.view)."""
        self.view.advance(self.global_adapter, server_round)
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
            out.append(Message(RecordDict({self.arrayrecord_key: record, self.configrecord_key: config}),
                               message_type=msg.metadata.message_type, dst_node_id=node))
            self.tracker.sent(server_round, record, 1, self._fedavg_bytes)
            self._sent_versions[node] = self.view.version
        return out

    def _track_sent(self, server_round: int, messages: list, record: ArrayRecord) -> list:
        if messages:
            self.tracker.sent(server_round, record, len(messages), self._fedavg_bytes)
        return messages

    # -- Strategy API ---------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._sync_global(arrays)
        if self.fraction_train == 0.0:
            return []
        if self.view is not None:
            messages = list(super().configure_train(server_round, ArrayRecord(), self._config(config), grid))
            return self._diff_messages(server_round, messages)
        record = pack_payload(self.download_payload())
        messages = list(super().configure_train(server_round, record, self._config(config), grid))
        return self._track_sent(server_round, messages, record)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        self._sync_global(arrays)
        # Evaluate messages carry the global tensors as Flower's plain ArrayRecord (dense float32,
        # what FedAvg sends): they stand alone, and Flower's own evaluate handlers
        # (``model.load_state_dict(msg.content["arrays"].to_torch_state_dict())``) work on them.
        record = ArrayRecord({n: self.global_adapter[n] for n in self.layout.names})
        messages = list(super().configure_evaluate(server_round, record, self._config(config, "plain"), grid))
        return self._track_sent(server_round, messages, record)

    def check_reply(self, msg: Message):
        """``(SparseDelta, num_examples)`` of a train reply, or raises ValueError with the
        reason it is rejected."""
        if msg.has_error():
            raise ValueError(f"client error (code {msg.error.code}): {msg.error.reason}")
        content = msg.content
        arrays = list(content.array_records.values())
        metrics = list(content.metric_records.values())
        configs = list(content.config_records.values())
        if len(arrays) != 1 or len(metrics) != 1 or configs:
            raise ValueError(f"expected exactly one ArrayRecord and one MetricRecord, got {len(arrays)} "
                             f"ArrayRecord(s), {len(metrics)} MetricRecord(s), {len(configs)} ConfigRecord(s)")
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
        return sd, n

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> Tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        if self.layout is None:
            raise RuntimeError("SparseLoRA.aggregate_train before configure_train: the strategy has no global "
                               "adapter yet (run it with strategy.start(...))")
        # Node-id order: the float32 sums do not depend on the order in which replies arrived.
        replies = sorted(replies, key=lambda m: m.metadata.src_node_id)
        accepted, counts, contents, reasons = [], [], [], []
        seen = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_content():
                nbytes = sum(r.count_bytes() for r in msg.content.array_records.values())
                self.tracker.received(server_round, nbytes, self._fedavg_bytes)
            try:
                sd, n = self.check_reply(msg)
                if node in seen:  # one update per node and round: a second would count twice
                    raise ValueError("a second update from this node in this round (the first one counts)")
                seen.add(node)
            except Exception as e:  # noqa: BLE001  a bad reply must never stop the round
                why = str(e) if isinstance(e, ValueError) else f"unexpected {type(e).__name__}: {e}"
                reason = f"node {node}: {why}"
                log(logging.WARNING, "SparseLoRA round %s: rejected the reply of %s", server_round, reason)
                reasons.append(reason)
                continue
            accepted.append(sd)
            counts.append(n)
            contents.append(msg.content)
            if node in self._sent_versions:
                self.held[node] = self._sent_versions[node]
        self.tracker.result(server_round, len(accepted), reasons)
        log(logging.INFO, "aggregate_train: %d updates accepted, %d rejected", len(accepted), len(reasons))

        metrics = MetricRecord()
        if contents:
            try:
                metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
            except Exception as e:  # user metrics that do not average: report ours anyway
                log(logging.WARNING, "SparseLoRA: could not aggregate the clients' metrics: %s", e)
                metrics = MetricRecord()
        rb = self.tracker.rounds[server_round]
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
                raise ValueError(f"SparseLoRA round {server_round}: every node failed to decode the download "
                                 f"against its model, e.g. {undecodable[0]}")
            log(logging.WARNING, "SparseLoRA round %s: no usable update; the global adapter is unchanged",
                server_round)
            return None, metrics
        total = float(sum(counts))
        weights = [c / total for c in counts]
        update = sparse_aggregate(accepted, weights, layout=self.layout)
        self.optimizer.apply(self.global_adapter, update)
        self._returned = ArrayRecord({n: self.global_adapter[n] for n in self.layout.names})
        return self._returned, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        replies = list(replies)
        for msg in replies:
            if msg.has_content():
                nbytes = sum(r.count_bytes() for r in msg.content.array_records.values())
                if nbytes:
                    self.tracker.received(server_round, nbytes, 0)
        return super().aggregate_evaluate(server_round, replies)

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: Optional[ConfigRecord] = None, evaluate_config: Optional[ConfigRecord] = None,
              evaluate_fn=None):
        """FedAvg's ``start``; logs the tracker's summary line at the end."""
        result = super().start(grid=grid, initial_arrays=initial_arrays, num_rounds=num_rounds, timeout=timeout,
                               train_config=train_config, evaluate_config=evaluate_config, evaluate_fn=evaluate_fn)
        log(logging.INFO, "%s", self.tracker.format())
        return result
