"""Federated LoRA on Flower (>= 1.42, Message API) with fastlora's sparse wire format.

Server side, :class:`SparseLoRA` is a ``flwr.serverapp.strategy.FedAvg`` whose messages carry
compact ``fastlora.codec`` payloads instead of dense fp32 arrays; client side,
:func:`client_update` turns a train message into the reply for any PyTorch model whose
trainable parameters are its LoRA adapter (plus, e.g., a head); :class:`CommTracker` counts
the bytes of every ArrayRecord both ways and what plain FedAvg would have sent::

    # server_app.py
    strategy = SparseLoRA()            # ef-topk: sparse both ways, error feedback both ways
    result = strategy.start(grid=grid, initial_arrays=initial_arrays(model), num_rounds=10)
    print(strategy.tracker.format())

    # client_app.py
    @app.train()
    def train(msg, context):
        return client_update(msg, context, model, lambda m: my_train(m, my_data))  # -> num examples

Wire contract (one fastlora message, either direction)
------------------------------------------------------
Every message carries exactly **one ArrayRecord** holding exactly **one Array** under the key
``"fastlora"`` (:data:`PAYLOAD_KEY`)::

    Array(dtype="uint8", shape=(len(payload),), stype="fastlora.codec/1", data=payload)

``payload`` is one ``fastlora.codec`` payload in *fingerprint* mode: the 16-byte layout
fingerprint of the adapter (names, shapes, float32, in the model's ``named_parameters``
order of its trainable parameters), the kept entries' values (``fp32`` / ``fp16`` / ``bf16``
/ ``int8``) and their positions, and a CRC. :func:`pack_payload` / :func:`unpack_payload`
build and (strictly) check that record.

* **Server -> client (train, and evaluate if enabled)**: ``content["arrays"]`` = the global
  adapter, dense (every entry, ``down_values``) or, with ``down="sparse"`` (FLASC), the
  top-``down_density`` entries of each tensor of the global adapter (zeros elsewhere: that
  sparse adapter is what the client starts from); ``content["config"]`` = FedAvg's config plus
  ``server-round`` and the upload settings :data:`CONFIG_UP_DENSITY`,
  :data:`CONFIG_VALUES`, :data:`CONFIG_ERROR_FEEDBACK` (and :data:`CONFIG_DOWN`).
  With ``down="diff"`` (stateful nodes, ``fastlora.fl.view``) each train message is the
  node's own: the top-``down_density`` steps of the server's *view* since the version the
  node holds, in order (one Array each, under ``"fastlora"``, ``"fastlora.1"``, ...; none when
  it is up to date), or the whole view dense float32 (a resync: first contact, a node whose
  last reply did not arrive, or when the missed steps would be bigger), with
  :data:`CONFIG_DOWN_KIND`, :data:`CONFIG_VIEW_FROM`, :data:`CONFIG_VIEW_TO`; the node keeps
  the view in ``context.state``. Evaluate messages of a diff strategy carry the global
  adapter dense (they stand alone).
* **Client -> server (train reply)**: exactly one ArrayRecord (the payload of the client's
  *update* ``trained - downloaded``, top-``up_density`` of it plus the error-feedback
  residual, in ``values``) and exactly one MetricRecord with ``"num-examples"`` (an int or a
  finite float > 0: the aggregation weight, as in Flower's FedAvg) and, optionally, the
  user's own metrics (averaged like FedAvg's). Nothing else: a reply with a missing or extra
  record, a malformed payload (wrong layout, truncated, corrupted), or a bad
  ``num-examples`` is rejected, its reason logged and counted in the round's MetricRecord
  (``fastlora-failures``) and in the tracker; the other replies are aggregated. If no reply
  is usable the global adapter stays unchanged.

The server keeps the global adapter dense in float32, aggregates the accepted updates with
``fastlora.ops.aggregate.sparse_aggregate`` (weights ``n_i / sum(n)``) and applies its
server optimizer (``sgd`` with lr 1 = FedAvg, or ``adam`` = FedAdam). What
``aggregate_train`` returns (and ``Result.arrays`` ends as) is that dense global adapter, as
an ordinary ArrayRecord of float32 numpy arrays; the compact form exists only on the wire.

Error feedback: the client's residual lives in ``context.state["fastlora.residual"]`` (an
ArrayRecord of float32 tensors), which Flower's simulation and deployment engines keep
between rounds for each node.

Strategies: any fastlora strategy (``fastlora.fl.strategies``) with a ``dense``, ``sparse``
or ``diff`` download (``ef-topk``, ``fedavg``, ``flasc``, ...), with the same semantics and
payloads as the federated loop. ``exact`` (FlexLoRA, per-client ranks) and ``fedstale``
(per-client stale memory) are refused.
"""
from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from fastlora import codec
from fastlora.fl.client import decode_dense, sparsify_encode
from fastlora.fl.model import get_adapter, set_adapter
from fastlora.fl.server import ServerOptimizer
from fastlora.fl.strategies import Strategy, parse_strategy
from fastlora.fl.view import ServerView, apply_download
from fastlora.ops.aggregate import sparse_aggregate
from fastlora.ops.sparsify import new_residual
from fastlora.sparse_delta import Layout

__all__ = [
    "SparseLoRA", "CommTracker", "PayloadError", "client_update", "load_global", "pack_payload",
    "unpack_payload", "pack_payloads", "unpack_payloads", "initial_arrays", "as_strategy", "InProcessGrid", "run_in_process",
    "PAYLOAD_KEY", "PAYLOAD_DTYPE", "PAYLOAD_STYPE", "RESIDUAL_KEY", "NUM_EXAMPLES_KEY",
]

PAYLOAD_KEY = "fastlora"
PAYLOAD_DTYPE = "uint8"
PAYLOAD_STYPE = "fastlora.codec/1"
RESIDUAL_KEY = "fastlora.residual"
NUM_EXAMPLES_KEY = "num-examples"
MAX_NUM_EXAMPLES = 2 ** 53          # larger weights are refused (keeps every sum of weights finite)
CONFIG_UP_DENSITY = "fastlora-up-density"
CONFIG_VALUES = "fastlora-values"
CONFIG_ERROR_FEEDBACK = "fastlora-error-feedback"
CONFIG_DOWN = "fastlora-down"
CONFIG_DOWN_KIND = "fastlora-down-kind"       # diff download: "diff" (steps) or "resync" (the view)
CONFIG_VIEW_FROM = "fastlora-view-from"       # diff download: the view version the steps apply to
CONFIG_VIEW_TO = "fastlora-view-version"      # diff download: the view version they lead to
VIEW_KEY = "fastlora.view"                    # client: context.state ArrayRecord of the view it holds
VIEW_VERSION_KEY = "fastlora.view-version"    # client: context.state ConfigRecord {"version": int}
REPLY_ARRAYS_KEY = "arrays"
REPLY_METRICS_KEY = "metrics"

Adapter = Dict[str, torch.Tensor]


class PayloadError(ValueError):
    """A record is not a valid fastlora payload record (see the module docstring)."""


# ---------------------------------------------------------------------------------------------
# payload record
# ---------------------------------------------------------------------------------------------
def pack_payload(payload: Union[bytes, bytearray, memoryview]) -> ArrayRecord:
    """The ArrayRecord that carries one ``fastlora.codec`` payload: one Array under
    :data:`PAYLOAD_KEY` (``dtype="uint8"``, ``shape=(len,)``, ``stype="fastlora.codec/1"``)."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"pack_payload expects bytes, got {type(payload).__name__}")
    data = bytes(payload)
    return ArrayRecord({PAYLOAD_KEY: Array(dtype=PAYLOAD_DTYPE, shape=(len(data),), stype=PAYLOAD_STYPE,
                                           data=data)})


def unpack_payload(record) -> bytes:
    """The payload bytes of a record made by :func:`pack_payload`. Strict: anything else (not an
    ArrayRecord, other or extra keys, another dtype/stype, a shape that disagrees with the
    data length) raises :class:`PayloadError`. The bytes themselves are checked by
    ``fastlora.codec.decode``."""
    if not isinstance(record, ArrayRecord):
        raise PayloadError(f"expected an ArrayRecord, got {type(record).__name__}")
    keys = list(record.keys())
    if keys != [PAYLOAD_KEY]:
        raise PayloadError(f"expected exactly one Array under key {PAYLOAD_KEY!r}, got keys {keys[:4]}")
    arr = record[PAYLOAD_KEY]
    if arr.stype != PAYLOAD_STYPE:
        raise PayloadError(f"Array stype is {arr.stype!r}, expected {PAYLOAD_STYPE!r} (is this a plain FedAvg "
                           "ArrayRecord? fastlora clients must reply with fastlora.flower.client_update)")
    if arr.dtype != PAYLOAD_DTYPE:
        raise PayloadError(f"Array dtype is {arr.dtype!r}, expected {PAYLOAD_DTYPE!r}")
    data = arr.data
    if not isinstance(data, bytes):
        raise PayloadError(f"Array data is {type(data).__name__}, expected bytes")
    if tuple(arr.shape) != (len(data),):
        raise PayloadError(f"Array shape {tuple(arr.shape)} disagrees with its {len(data)} data bytes")
    return data


def pack_payloads(payloads: List[bytes]) -> ArrayRecord:
    """The ArrayRecord of a ``diff`` download: one Array per payload, applied in order, under
    :data:`PAYLOAD_KEY`, ``PAYLOAD_KEY + ".1"``, ``".2"``, ... (none when the client is up to
    date); a single payload is exactly :func:`pack_payload`'s record."""
    keys = [PAYLOAD_KEY] + [f"{PAYLOAD_KEY}.{i}" for i in range(1, len(payloads))]
    return ArrayRecord({k: Array(dtype=PAYLOAD_DTYPE, shape=(len(p),), stype=PAYLOAD_STYPE, data=bytes(p))
                        for k, p in zip(keys, payloads)})


def unpack_payloads(record) -> List[bytes]:
    """The payloads of a record made by :func:`pack_payloads`, in order (strict, as
    :func:`unpack_payload`)."""
    if not isinstance(record, ArrayRecord):
        raise PayloadError(f"expected an ArrayRecord, got {type(record).__name__}")
    keys = list(record.keys())
    expected = [PAYLOAD_KEY] + [f"{PAYLOAD_KEY}.{i}" for i in range(1, len(keys))] if keys else []
    if keys != expected:
        raise PayloadError(f"expected Arrays under keys {expected[:4]}, got keys {keys[:4]}")
    out = []
    for k in keys:
        out.append(unpack_payload(ArrayRecord({PAYLOAD_KEY: record[k]})))
    return out


def _single_array_record(content: RecordDict, who: str) -> ArrayRecord:
    records = list(content.array_records.values())
    if len(records) != 1:
        raise PayloadError(f"{who}: expected exactly one ArrayRecord, got {len(records)}")
    return records[0]


# ---------------------------------------------------------------------------------------------
# strategies and adapters
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# communication tracker
# ---------------------------------------------------------------------------------------------
@dataclass
class RoundBytes:
    """Bytes of ArrayRecords (``ArrayRecord.count_bytes()``) in one round, both directions."""
    round: int
    down_bytes: int = 0          # server -> clients, train and evaluate messages
    up_bytes: int = 0            # clients -> server, every reply that carried content
    messages: int = 0
    replies: int = 0
    accepted: int = 0
    failures: int = 0
    fedavg_down_bytes: int = 0   # the same messages / replies with FedAvg's dense fp32 ArrayRecord
    fedavg_up_bytes: int = 0
    reasons: List[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.down_bytes + self.up_bytes

    @property
    def fedavg_total(self) -> int:
        return self.fedavg_down_bytes + self.fedavg_up_bytes


class CommTracker:
    """Counts, per round and in total, the bytes of every ArrayRecord a :class:`SparseLoRA`
    sends and receives (``ArrayRecord.count_bytes()``, as FlowerTune does: array data plus
    keys, not the ConfigRecords/MetricRecords or protocol framing), next to what Flower's
    plain FedAvg of the same adapter in fp32 would have sent for the same messages."""

    def __init__(self):
        self.rounds: Dict[int, RoundBytes] = {}

    def _round(self, rnd: int) -> RoundBytes:
        if rnd not in self.rounds:
            self.rounds[rnd] = RoundBytes(rnd)
        return self.rounds[rnd]

    def sent(self, rnd: int, record: ArrayRecord, messages: int, fedavg_per_message: int) -> None:
        r = self._round(rnd)
        r.down_bytes += record.count_bytes() * messages
        r.fedavg_down_bytes += fedavg_per_message * messages
        r.messages += messages

    def received(self, rnd: int, nbytes: int, fedavg_bytes: int) -> None:
        r = self._round(rnd)
        r.up_bytes += nbytes
        r.fedavg_up_bytes += fedavg_bytes
        r.replies += 1

    def result(self, rnd: int, accepted: int, reasons: List[str]) -> None:
        r = self._round(rnd)
        r.accepted += accepted
        r.failures += len(reasons)
        r.reasons.extend(reasons)

    def summary(self) -> dict:
        """``{"rounds": [per-round dicts], "total": {...}}``; ``ratio`` = FedAvg bytes / ours."""
        rows = []
        for rnd in sorted(self.rounds):
            r = self.rounds[rnd]
            rows.append({"round": rnd, "down_bytes": r.down_bytes, "up_bytes": r.up_bytes, "bytes": r.total,
                         "fedavg_down_bytes": r.fedavg_down_bytes, "fedavg_up_bytes": r.fedavg_up_bytes,
                         "fedavg_bytes": r.fedavg_total, "messages": r.messages, "replies": r.replies,
                         "accepted": r.accepted, "failures": r.failures, "reasons": list(r.reasons)})
        total = {k: sum(row[k] for row in rows) for k in
                 ("down_bytes", "up_bytes", "bytes", "fedavg_down_bytes", "fedavg_up_bytes", "fedavg_bytes",
                  "messages", "replies", "accepted", "failures")}
        total["ratio"] = total["fedavg_bytes"] / total["bytes"] if total["bytes"] else float("nan")
        return {"rounds": rows, "total": total}

    def format(self) -> str:
        """One line: total bytes both ways vs FedAvg fp32."""
        t = self.summary()["total"]
        return (f"fastlora bytes: {t['bytes']:,} (down {t['down_bytes']:,}, up {t['up_bytes']:,}) over "
                f"{len(self.rounds)} rounds vs FedAvg fp32 {t['fedavg_bytes']:,} "
                f"(down {t['fedavg_down_bytes']:,}, up {t['fedavg_up_bytes']:,}): {t['ratio']:.1f}x fewer; "
                f"{t['accepted']} updates accepted, {t['failures']} rejected")


# ---------------------------------------------------------------------------------------------
# server: the strategy
# ---------------------------------------------------------------------------------------------
class SparseLoRA(FedAvg):
    """Flower FedAvg with fastlora payloads both ways (see the module docstring for the wire
    contract).

    Args:
        strategy: a fastlora ``Strategy`` or spec string. Default ``"ef-topk"`` (up 1/8 with
            error feedback, the stateful ``diff`` download at 1/16 with the server's error
            feedback, fp16 values both ways): the best accuracy per byte measured (README,
            Flower section). Others: ``"fedavg"``, ``"flasc"`` (the FLASC paper's baseline,
            which loses accuracy), ``"ef-topk:up=1/16,down=1/16,values=int8"``, ...; add
            ``server_opt=adam,server_lr=...`` for FedAdam.
        tracker: a :class:`CommTracker` to fill (default: a new one, ``self.tracker``).
        fraction_evaluate: default 0 (no federated evaluation; use ``evaluate_fn`` in
            ``start`` for a centralised one). When enabled, evaluate messages carry the global
            adapter exactly like train messages (decode it with :func:`load_global`).
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
        """The download of a dense / sparse strategy (and of evaluate messages): the global
        adapter, dense (also for ``diff`` strategies' evaluate messages, which must stand
        alone), or (FLASC) the top ``down_density`` of each of its tensors (per tensor, as
        ``fastlora.fl``'s server: a global top-k would keep the random lora_A and drop the
        still tiny lora_B)."""
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
        record = pack_payload(self.download_payload())
        down = "dense" if self.view is not None else None  # evaluate messages stand alone
        messages = list(super().configure_evaluate(server_round, record, self._config(config, down), grid))
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


# ---------------------------------------------------------------------------------------------
# client side
# ---------------------------------------------------------------------------------------------
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


def load_global(msg: Message, model: torch.nn.Module) -> Adapter:
    """Decodes the adapter a :class:`SparseLoRA` message carries into ``model`` (its trainable
    parameters) and returns it (float32). For evaluate handlers, and used by
    :func:`client_update`."""
    layout, _ = _model_layout(model)
    start = _decode_download(msg, layout)
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
       ``context.state[VIEW_KEY]`` (or replaces it with a resynced view) and loads that.
    2. ``train_fn(model)`` trains in place and returns the number of examples (the FedAvg
       weight), or ``(num_examples, {metric: value})``.
    3. The update ``trained - downloaded`` is sparsified (top ``up_density`` of update +
       residual when error feedback is on; the residual, i.e. what was not sent, is kept in
       ``context.state[residual_key]`` as an ArrayRecord) and encoded.
    4. Returns ``Message(RecordDict({"arrays": pack_payload(payload), "metrics":
       MetricRecord({"num-examples": n, ...})}), reply_to=msg)``.

    Upload settings come from the message's ConfigRecord (sent by :class:`SparseLoRA`) unless
    ``strategy`` (a fastlora Strategy or spec) is given. Errors (a model that does not match
    the server's layout, a bad num_examples) raise ValueError: Flower turns an exception in a
    ClientApp into an error reply, which the server counts as a failure.
    """
    density, values, error_feedback = _upload_settings(msg, strategy)
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
    if residual is not None:
        context.state[residual_key] = ArrayRecord(residual)
    metrics = MetricRecord({NUM_EXAMPLES_KEY: n if isinstance(n, float) else int(n)})
    for k, v in dict(user_metrics).items():
        if k == NUM_EXAMPLES_KEY:
            raise ValueError(f"train_fn metrics must not contain {NUM_EXAMPLES_KEY!r}")
        metrics[k] = v
    content = RecordDict({REPLY_ARRAYS_KEY: pack_payload(payload), REPLY_METRICS_KEY: metrics})
    return Message(content, reply_to=msg)


# ---------------------------------------------------------------------------------------------
# in-process engine (tests, notebooks): no Ray, no network
# ---------------------------------------------------------------------------------------------
class InProcessGrid(Grid):
    """A :class:`flwr.serverapp.Grid` that runs a ClientApp in this process, one call per
    message, for fast tests. Each node has its own persistent :class:`~flwr.app.Context`
    (``node_config`` ``partition-id`` / ``num-partitions`` as in the simulation engine).
    With ``serialize=True`` (default) every message, and the context, goes through Flower's
    protobuf serialisation both ways, as on a real wire. Exceptions in the ClientApp become
    error replies (``CLIENT_APP_RAISED_EXCEPTION``), as in Flower's engines.

    ``sent`` / ``received`` keep every message pushed and every reply, for inspection.
    Uses Flower's semi-private ``flwr.common.serde`` and ``flwr.supercore.run.Run`` (1.42).
    """

    def __init__(self, client_app, num_nodes: int, *, run_id: int = 1, run_config: Optional[dict] = None,
                 node_configs: Optional[List[dict]] = None, serialize: bool = True):
        from flwr.supercore.run import Run

        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        self.client_app = client_app
        self.serialize = serialize
        self._run = Run.create_empty(run_id)
        self.contexts: Dict[int, Context] = {}
        for i in range(num_nodes):
            node_id = 1000 + i
            node_config = {"partition-id": i, "num-partitions": num_nodes}
            if node_configs is not None:
                node_config.update(node_configs[i])
            self.contexts[node_id] = Context(run_id=run_id, node_id=node_id, node_config=node_config,
                                             state=RecordDict(), run_config=dict(run_config or {}))
        self._replies: Dict[str, Message] = {}
        self.sent: List[Message] = []
        self.received: List[Message] = []

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    @staticmethod
    def _wire(msg: Message) -> Message:
        from flwr.common.serde import message_from_proto, message_to_proto
        from flwr.proto.message_pb2 import Message as ProtoMessage

        return message_from_proto(ProtoMessage.FromString(message_to_proto(msg).SerializeToString()))

    def _call(self, msg: Message) -> Message:
        from flwr.common.constant import ErrorCode

        node = msg.metadata.dst_node_id
        if node not in self.contexts:
            return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=f"no node {node}"), reply_to=msg)
        context = self.contexts[node]
        delivered = self._wire(msg) if self.serialize else msg
        try:
            reply = self.client_app(delivered, context)
        except Exception as e:  # as Flower's engines: an error reply, the round goes on
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(e).__name__}: {e}"),
                           reply_to=msg)
        if self.serialize:
            from flwr.common.serde import context_from_proto, context_to_proto
            from flwr.proto.message_pb2 import Context as ProtoContext

            self.contexts[node] = context_from_proto(
                ProtoContext.FromString(context_to_proto(context).SerializeToString()))
            reply = self._wire(reply)
        return reply

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.sent.append(msg)
            reply = self._call(msg)
            self.received.append(reply)
            self._replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_in_process(server_app, client_app, num_nodes: int, *, run_config: Optional[dict] = None,
                   serialize: bool = True) -> InProcessGrid:
    """Runs a ServerApp against ``num_nodes`` in-process ClientApp nodes (an
    :class:`InProcessGrid`) and returns the grid (its contexts, sent and received messages).
    Sets Flower's task identity for the duration (restored afterwards)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    grid = InProcessGrid(client_app, num_nodes, run_config=run_config, serialize=serialize)
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run.run_id, SUPERLINK_NODE_ID
    try:
        ctx = Context(run_id=grid.run.run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                      run_config=dict(run_config or {}))
        t0 = time.perf_counter()
        server_app(grid, ctx)
        grid.elapsed_s = time.perf_counter() - t0
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
    return grid

