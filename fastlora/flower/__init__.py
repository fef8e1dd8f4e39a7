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
Every message carries exactly **one payload ArrayRecord** holding exactly **one Array** under
the key ``"fastlora"`` (:data:`PAYLOAD_KEY`)::

    Array(dtype="uint8", shape=(len(payload),), stype="fastlora.codec/1", data=payload)

``payload`` is one ``fastlora.codec`` payload in *fingerprint* mode: the 16-byte layout
fingerprint of the adapter (names, shapes, float32, in the model's ``named_parameters``
order of its trainable parameters), the kept entries' values (``fp32`` / ``fp16`` / ``bf16``
/ ``int8``) and their positions, and a CRC. :func:`pack_payload` / :func:`unpack_payload`
build and (strictly) check that record.

For a model with persistent buffers (BatchNorm's running statistics and step count: the
``state_dict`` entries that are not parameters, :func:`model_buffers`), train messages and
replies carry a **second ArrayRecord** under ``"fastlora.buffers"`` (:data:`BUFFERS_KEY`): one
plain Array per buffer, dense, in its own dtype (bfloat16 as float32). A model without
buffers (a LoRA model) never has one: its messages are exactly the single payload record.

* **Server -> client (train)**: ``content["arrays"]`` = the global
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
  the view in ``context.state``. Whatever the download, once the server knows the global
  buffers every train message carries them (:data:`BUFFERS_KEY`); the node loads them into
  its model before training.
* **Server -> client (evaluate, when ``fraction_evaluate > 0``)**: Flower's plain ArrayRecord
  of the global tensors (dense float32, what FedAvg sends) and the global buffers with
  :data:`CONFIG_DOWN` ``"plain"``: it stands alone, and Flower's own evaluate handlers
  (``load_state_dict`` of ``to_torch_state_dict()``, strict when the trainable parameters
  are all the model's parameters) or :func:`load_global` read it.
* **Client -> server (train reply)**: exactly one payload ArrayRecord (the payload of the
  client's *update* ``trained - downloaded``, top-``up_density`` of it plus the
  error-feedback residual, in ``values``), the buffers' ArrayRecord (the node's buffers after
  training) for a model with buffers, and exactly one MetricRecord with ``"num-examples"`` (an
  int or a finite float > 0: the aggregation weight, as in Flower's FedAvg) and, optionally,
  the user's own metrics (averaged like FedAvg's). Nothing else: a reply with a missing or
  extra record, a malformed payload (wrong layout, truncated, corrupted), buffers that are not
  the run's (other names, shapes or dtypes than the initial arrays' or, without those, the
  first accepted reply's), NaN or Inf in a floating buffer, or a bad ``num-examples`` is
  rejected, its reason logged and counted in the round's MetricRecord (``fastlora-failures``)
  and in the tracker; the other replies are aggregated. If no reply is usable the global
  adapter and buffers stay unchanged.

The server keeps the global adapter dense in float32, aggregates the accepted updates with
``fastlora.ops.aggregate.sparse_aggregate`` (weights ``n_i / sum(n)``) and applies its
server optimizer (``sgd`` with lr 1 = FedAvg, or ``adam`` = FedAdam). The global buffers are
the weighted mean of the accepted replies' buffers with the same weights (float64 sums cast
back to each dtype, integer buffers rounded to the nearest), as Flower's FedAvg. What
``aggregate_train`` returns (and ``Result.arrays`` ends as) is a :class:`GlobalArrays`: an
ordinary ArrayRecord of the dense global adapter (float32 numpy arrays) followed by the
global buffers, whose ``buffer_names`` say which are which; :func:`initial_arrays` of a model
builds one too. The compact form exists only on the wire.

Resuming: :meth:`SparseLoRA.save_state` / :meth:`SparseLoRA.load_state` checkpoint the
strategy (``fastlora.fl.checkpoint``); ``start(initial_arrays=strategy.global_arrays(), ...)``
then continues the run, its rounds numbered after the checkpoint's (``last_round``).

Error feedback: the client's residual lives in ``context.state["fastlora.residual"]`` (an
ArrayRecord of float32 tensors), which Flower's simulation and deployment engines keep
between rounds for each node.

Central differential privacy: wrap SparseLoRA in Flower's
``DifferentialPrivacyClientSideFixedClipping``. The wrapper puts the clipping norm in the train
config; :func:`client_update` then scales the update it sends (after top-k and the travel
rounding) to that L2 norm as the server decodes it, what clipping removes going back into the
error-feedback residual; the server rejects a reply above the norm and the wrapper adds its
Gaussian noise to the dense global model SparseLoRA returns. The server-side and adaptive
wrappers, Flower's ``fixedclipping_mod``, FedAdam and persistent buffers under DP are refused
with a message that says what works (docs/api/flower.md, "Central differential privacy").

Modules: ``wire`` (the records and keys), ``strategy`` (SparseLoRA, GlobalArrays,
initial_arrays), ``client`` (client_update, load_global), ``buffers`` (which buffers federate,
their record, check and mean), ``dp`` (clipping a payload, the checks against Flower's DP
pieces that cannot read payloads), ``tracker`` (CommTracker), ``inprocess`` (InProcessGrid,
run_in_process: Flower without Ray, for tests).

Strategies: any fastlora strategy (``fastlora.fl.strategies``) with a ``dense``, ``sparse``
or ``diff`` download (``ef-topk``, ``fedavg``, ``flasc``, ...), with the same semantics and
payloads as the federated loop. ``exact`` (FlexLoRA, per-client ranks) and ``fedstale``
(per-client stale memory) are refused.
"""
from .client import client_update, load_global
from .inprocess import InProcessGrid, run_in_process
from .buffers import model_buffers
from .strategy import CHECKPOINT_KIND, GlobalArrays, SparseLoRA, as_strategy, initial_arrays
from .tracker import CommTracker, RoundBytes
from .wire import (BUFFERS_KEY, CONFIG_DOWN, CONFIG_DOWN_KIND, CONFIG_ERROR_FEEDBACK, CONFIG_UP_DENSITY,
                   CONFIG_VALUES, CONFIG_VIEW_FROM, CONFIG_VIEW_TO, MAX_NUM_EXAMPLES, NUM_EXAMPLES_KEY, PAYLOAD_DTYPE,
                   PAYLOAD_KEY, PAYLOAD_STYPE, RESIDUAL_KEY, VIEW_KEY, VIEW_VERSION_KEY, PayloadError, pack_payload,
                   pack_payloads, unpack_payload, unpack_payloads)

__all__ = [
    "SparseLoRA", "CommTracker", "PayloadError", "client_update", "load_global", "pack_payload",
    "unpack_payload", "pack_payloads", "unpack_payloads", "initial_arrays", "as_strategy", "InProcessGrid",
    "run_in_process", "GlobalArrays", "model_buffers", "PAYLOAD_KEY", "PAYLOAD_DTYPE", "PAYLOAD_STYPE",
    "RESIDUAL_KEY", "NUM_EXAMPLES_KEY", "VIEW_KEY", "VIEW_VERSION_KEY", "BUFFERS_KEY", "CHECKPOINT_KIND",
    "RoundBytes", "MAX_NUM_EXAMPLES", "CONFIG_UP_DENSITY", "CONFIG_VALUES", "CONFIG_ERROR_FEEDBACK", "CONFIG_DOWN",
    "CONFIG_DOWN_KIND", "CONFIG_VIEW_FROM", "CONFIG_VIEW_TO",
]
