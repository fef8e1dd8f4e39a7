"""fastlora.flower: the SparseLoRA strategy, the client helper and the tracker on Flower 1.42,
run three ways: in-process (InProcessGrid, no Ray), the simulation engine (Ray) and the
deployment engine (SuperLink + SuperNodes + ``flwr run`` on loopback)."""
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# Flower phones home (telemetry, update check) unless told not to; tests stay offline.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# flwr is installed by `make test` (fastlora[flower]).
from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord,  # noqa: E402
                      RecordDict)
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fastlora import codec  # noqa: E402
from fastlora.fl.client import decode_dense, sparsify_encode  # noqa: E402
from fastlora.fl.model import build_classifier, get_adapter, set_adapter, tiny_encoder  # noqa: E402
from fastlora.fl.server import ServerOptimizer  # noqa: E402
from fastlora.fl.view import ServerView  # noqa: E402
from fastlora.flower import (BUFFERS_KEY, PAYLOAD_KEY, PAYLOAD_STYPE, RESIDUAL_KEY, VIEW_KEY,  # noqa: E402
                             InProcessGrid, PayloadError, SparseLoRA, as_strategy, client_update, initial_arrays,
                             load_global, model_buffers, pack_payload, pack_payloads, run_in_process,
                             unpack_payload, unpack_payloads)
from fastlora.ops.aggregate import sparse_aggregate  # noqa: E402
from fastlora.sparse_delta import Layout  # noqa: E402

APP_DIR = Path(__file__).resolve().parents[1] / "examples" / "flower_app"
sys.path.insert(0, str(APP_DIR))

from fastlora_app import task  # noqa: E402
from fastlora_app.client_app import make_client_app  # noqa: E402
from fastlora_app.server_app import make_server_app  # noqa: E402


@pytest.fixture
def task_identity():
    """Flower's Message() needs a task identity (set by its engines; here by hand)."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def fresh_model(cfg):
    """A new demo model with the initial adapter (task.get_model is cached and trained)."""
    return build_classifier(tiny_encoder(seed=cfg["seed"]), cfg["num-classes"], rank=cfg["rank"], seed=cfg["seed"])


def round_of(msg):
    return int(next(iter(msg.content.config_records.values()))["server-round"])


# --- the raw-API example ------------------------------------------------------------------------

def test_ten_line_example_without_flower():
    # --- clients send sparse fp16 bytes, the server aggregates them ---
    from fastlora import new_residual
    from fastlora.fl.client import sparsify_encode
    from fastlora.ops.aggregate import sparse_aggregate
    from fastlora.sparse_delta import Layout

    global_adapter = {"lora_A": torch.randn(8, 64), "lora_B": torch.zeros(64, 8)}
    layout = Layout.of(global_adapter)                     # both sides know it: 16-byte fingerprint
    sizes, payloads = [120, 80], []
    for n in sizes:                                        # on each client, after local training:
        update = {k: 0.01 * torch.randn_like(v) for k, v in global_adapter.items()}
        residual = new_residual(update)                    # error feedback (keep it across rounds)
        payloads.append(sparsify_encode(update, layout, density=1 / 16, values="fp16", residual=residual))
    avg = sparse_aggregate(payloads, [n / sum(sizes) for n in sizes], layout=layout)   # on the server
    for k in global_adapter:
        global_adapter[k] += avg[k]
    # --- end of snippet ---
    assert all(len(p) < 1024 * 4 * 0.1 for p in payloads)  # < 10% of the fp32 bytes (1024 entries)
    dec = [decode_dense(p, layout) for p in payloads]
    for k in avg:
        ref = (0.6 * dec[0][k] + 0.4 * dec[1][k])
        torch.testing.assert_close(avg[k], ref, rtol=1e-6, atol=1e-7)
        assert int((avg[k] != 0).sum()) <= 2 * 64


# --- payload record and configuration ----------------------------------------------------------

def test_pack_unpack_payload_is_strict():
    rec = pack_payload(b"FLxyz")
    assert list(rec) == [PAYLOAD_KEY] and rec[PAYLOAD_KEY].stype == PAYLOAD_STYPE
    assert rec.count_bytes() == 5 + len(PAYLOAD_KEY)
    assert unpack_payload(rec) == b"FLxyz"
    with pytest.raises(PayloadError, match="ArrayRecord"):
        unpack_payload(RecordDict())
    with pytest.raises(PayloadError, match="exactly one Array"):
        unpack_payload(ArrayRecord({PAYLOAD_KEY: rec[PAYLOAD_KEY], "x": rec[PAYLOAD_KEY]}))
    with pytest.raises(PayloadError, match="exactly one Array"):
        unpack_payload(ArrayRecord())
    with pytest.raises(PayloadError, match="plain FedAvg"):
        unpack_payload(ArrayRecord({PAYLOAD_KEY: Array(torch.zeros(3).numpy())}))
    with pytest.raises(PayloadError, match="dtype"):
        unpack_payload(ArrayRecord({PAYLOAD_KEY: Array("float32", (5,), PAYLOAD_STYPE, b"FLxyz")}))
    with pytest.raises(PayloadError, match="shape"):
        unpack_payload(ArrayRecord({PAYLOAD_KEY: Array("uint8", (4,), PAYLOAD_STYPE, b"FLxyz")}))
    with pytest.raises(TypeError):
        pack_payload("not bytes")
    # a diff download's record: several payloads, in order
    assert unpack_payloads(pack_payloads([b"a", b"bc", b"d"])) == [b"a", b"bc", b"d"]
    assert unpack_payloads(pack_payloads([])) == [] and list(pack_payloads([b"a"])) == [PAYLOAD_KEY]
    with pytest.raises(PayloadError, match="keys"):
        unpack_payloads(ArrayRecord({PAYLOAD_KEY: rec[PAYLOAD_KEY], "fastlora.2": rec[PAYLOAD_KEY]}))


def test_strategy_configuration_errors():
    assert as_strategy("flasc:up=1/64,down=1/8").up_density == 1 / 64
    assert as_strategy("ef-topk:mode=sparse").error_feedback
    assert SparseLoRA("ef-topk").fl_strategy.down == "diff"
    for name in ("fedavg", "flasc", "ef-topk"):  # every supported name works alone
        assert SparseLoRA(name).fl_strategy.name == name
    # refused strategies suggest specs that work
    for refused in ("exact", "fedstale:mode=sparse"):
        with pytest.raises(ValueError, match="exact|FedStale") as err:
            SparseLoRA(refused)
        for suggestion in str(err.value).split("; use ")[1].replace(" or ", ", ").split(", "):
            assert SparseLoRA(suggestion.strip()).fl_strategy.name == suggestion.strip()
    with pytest.raises(ValueError, match="unknown strategy"):
        SparseLoRA("fedprox")
    with pytest.raises(ValueError, match="bad option"):
        SparseLoRA("flasc:upp=1/4")
    with pytest.raises(TypeError, match="spec string"):
        SparseLoRA(0.25)


def test_app_config_matches_defaults():
    import tomllib

    cfg = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
    assert cfg["tool"]["flwr"]["app"]["config"] == task.DEFAULTS
    with pytest.raises(ValueError, match="unknown config keys"):
        task.config({"num-rounds": 3})


# --- mode 1: in-process, no Ray ----------------------------------------------------------------

def replay(cfg, grid, optimizer):
    """The rounds of ``grid`` recomputed with fastlora's own functions: the server's download
    bytes, then decode + sparse_aggregate + optimizer on the very payloads that arrived."""
    s = as_strategy(cfg["strategy"])
    glob = get_adapter(fresh_model(cfg))
    layout = Layout.of(glob)
    view = ServerView(layout, s.down_density, s.down_values) if s.down == "diff" else None
    held = {}
    rounds = sorted({round_of(m) for m in grid.sent})
    for r in rounds:
        sent = [m for m in grid.sent if round_of(m) == r]
        replies = sorted((grid.received[grid.sent.index(m)] for m in sent),   # the server sums in node order
                         key=lambda rep: rep.metadata.src_node_id)
        if view is not None:  # the loop's diff download (fastlora.fl.view), node by node
            view.advance(glob, r)
            for m in sent:
                kind, payloads = view.download(held.pop(m.metadata.dst_node_id, None))
                assert unpack_payloads(m.content["arrays"]) == payloads
                assert m.content["config"]["fastlora-down-kind"] == kind
            held.update({rep.metadata.src_node_id: r for rep in replies if not rep.has_error()})
        else:
            if s.down == "dense":
                expected_down = sparsify_encode(glob, layout, density=1.0, values=s.down_values)
            else:
                expected_down = sparsify_encode(glob, layout, density=s.down_density, values=s.down_values,
                                                per_tensor=True)
            for m in sent:
                assert unpack_payload(m.content["arrays"]) == expected_down
        payloads = [unpack_payload(rep.content["arrays"]) for rep in replies]
        counts = [rep.content["metrics"]["num-examples"] for rep in replies]
        update = sparse_aggregate(payloads, [c / float(sum(counts)) for c in counts], layout=layout)
        optimizer.apply(glob, update)
    return glob, layout


@pytest.mark.parametrize("spec", ["flasc", "ef-topk", "ef-topk:mode=sparse,server_opt=adam,server_lr=0.01"])
def test_in_process_rounds_match_direct_computation(tmp_path, spec):
    out = tmp_path / "result.pt"
    cfg = task.config(overrides={"strategy": spec, "output": str(out)})
    t0 = time.perf_counter()
    grid = run_in_process(make_server_app(**cfg), make_client_app(), 2)
    elapsed = time.perf_counter() - t0
    res = task.load_output(out)
    assert len(grid.sent) == 4 and all(not r.has_error() for r in grid.received)
    s = as_strategy(spec)
    glob, layout = replay(cfg, grid, ServerOptimizer(s.server_optimizer, s.server_lr))
    for n in layout.names:       # bitwise: same payloads, same order, same float32 arithmetic
        assert torch.equal(res["adapter"][n], glob[n]), n
    assert res["train_metrics"][2]["fastlora-accepted"] == 2 and res["train_metrics"][2]["fastlora-failures"] == 0
    assert set(res["eval_metrics"]) == {0, 1, 2}
    # error feedback: the residual lives in each node's context.state, between rounds
    for ctx in grid.contexts.values():
        assert (RESIDUAL_KEY in ctx.state) == s.error_feedback
    print(f"in-process {spec}: {elapsed:.2f} s")


def test_diff_download_with_partial_participation_keeps_every_node_on_the_view():
    """4 nodes, 2 sampled per round: a node that rejoins gets the steps it missed (or a resync)
    and ends on the server's view bit for bit; the bytes are what the loop's ServerView sends."""
    cfg = task.config(overrides={"strategy": "ef-topk:down=1/8", "num-server-rounds": 6, "min-nodes": 2})
    strategies = []

    class Keep(SparseLoRA):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            strategies.append(self)

    app = ServerApp()

    @app.main()
    def main(grid, context):
        model = task.get_model(cfg)
        strategy = Keep(cfg["strategy"], fraction_train=0.5, min_train_nodes=2, min_available_nodes=4)
        strategy.start(grid=grid, initial_arrays=initial_arrays(task.initial_adapter(cfg)), num_rounds=6)
        del model

    import random
    random.seed(0)  # Flower samples the nodes with Python's random
    torch.manual_seed(0)
    grid = run_in_process(app, make_client_app(), 4)
    strategy = strategies[0]
    kinds = [(m.content["config"]["fastlora-down-kind"], len(m.content["arrays"])) for m in grid.sent]
    assert ("diff", 2) in kinds or ("diff", 3) in kinds, kinds  # a node that rejoined caught up
    assert all(not r.has_error() for r in grid.received)
    layout = strategy.layout
    for node, version in strategy.held.items():
        state = grid.contexts[node].state
        assert int(state["fastlora.view-version"]["version"]) == version
        if version == strategy.view.version:
            held = state[VIEW_KEY].to_torch_state_dict()
            for n in layout.names:
                assert torch.equal(held[n], strategy.view.view[n]), n
    replay(cfg, grid, ServerOptimizer())  # every download is the ServerView's


def test_diff_download_resyncs_a_node_that_lost_its_view(task_identity):
    cfg = task.config(overrides={"strategy": "ef-topk", "num-server-rounds": 3})
    grid = run_in_process(make_server_app(**cfg), make_client_app(), 2)
    assert [m.content["config"]["fastlora-down-kind"] for m in grid.sent] == ["resync"] * 2 + ["diff"] * 4
    # a node whose state was lost raises (an error reply): the server resyncs it next time
    ctx = next(iter(grid.contexts.values()))
    msg = grid.sent[-1]
    del ctx.state[VIEW_KEY]
    with pytest.raises(ValueError, match="holds no view|holds version"):
        client_update(msg, ctx, task.get_model(cfg), lambda m: 1)


def test_error_feedback_residual_persists_across_rounds():
    """sum of what a client sent + its final residual == sum of its updates (fp32 rounding)."""
    cfg = task.config(overrides={"strategy": "ef-topk:mode=sparse,up=1/32", "num-server-rounds": 3})
    trained = {}

    app = ClientApp()

    @app.train()
    def train(msg, context):
        pid = int(context.node_config["partition-id"])
        tokens, parts, _ = task.get_data(cfg, 2)
        rnd = round_of(msg)

        def train_fn(model):
            out = task.train(model, tokens, parts[pid], cfg, rnd, pid)
            trained[pid, rnd] = get_adapter(model)
            return out
        return client_update(msg, context, task.get_model(cfg), train_fn)

    grid = run_in_process(make_server_app(**cfg), app, 2)
    layout = Layout.of(get_adapter(fresh_model(cfg)))
    for node, ctx in grid.contexts.items():
        pid = int(ctx.node_config["partition-id"])
        total_update = {n: torch.zeros(s.shape) for n, s in zip(layout.names, layout.specs)}
        total_sent = {n: torch.zeros(s.shape) for n, s in zip(layout.names, layout.specs)}
        for m, rep in zip(grid.sent, grid.received):
            if m.metadata.dst_node_id != node:
                continue
            start = decode_dense(unpack_payload(m.content["arrays"]), layout)
            sent = decode_dense(unpack_payload(rep.content["arrays"]), layout)
            for n in layout.names:
                total_update[n] += trained[pid, round_of(m)][n] - start[n]
                total_sent[n] += sent[n]
        residual = ctx.state[RESIDUAL_KEY].to_torch_state_dict()
        for n in layout.names:
            torch.testing.assert_close(total_sent[n] + residual[n], total_update[n], rtol=0, atol=1e-6)
        assert sum(float(r.abs().sum()) for r in residual.values()) > 0


def dense_fedavg_client_app(cfg):
    """Flower's plain FedAvg client for the same model: dense fp32 ArrayRecords both ways."""
    app = ClientApp()

    @app.train()
    def train(msg, context):
        pid = int(context.node_config["partition-id"])
        tokens, parts, _ = task.get_data(cfg, 2)
        model = task.get_model(cfg)
        set_adapter(model, dict(msg.content["arrays"].to_torch_state_dict()))
        n, _ = task.train(model, tokens, parts[pid], cfg, round_of(msg), pid)
        return Message(RecordDict({"arrays": ArrayRecord(get_adapter(model)),
                                   "metrics": MetricRecord({"num-examples": n})}), reply_to=msg)
    return app


def test_tracker_counts_bytes_and_matches_real_fedavg():
    cfg = task.config(overrides={"strategy": "flasc"})
    strategies = {}

    def server(strategy_factory, key):
        app = ServerApp()

        @app.main()
        def main(grid, context):
            strategies[key] = st = strategy_factory()
            st.start(grid=grid, initial_arrays=initial_arrays(fresh_model(cfg)), num_rounds=2)
        return app

    ours = run_in_process(server(lambda: SparseLoRA("flasc"), "ours"), make_client_app(**cfg), 2)
    theirs = run_in_process(server(lambda: FedAvg(fraction_evaluate=0.0), "fedavg"), dense_fedavg_client_app(cfg), 2)

    def measured(grid):
        down = sum(r.count_bytes() for m in grid.sent for r in m.content.array_records.values())
        up = sum(r.count_bytes() for m in grid.received for r in m.content.array_records.values())
        return down, up

    tot = strategies["ours"].tracker.summary()["total"]
    assert (tot["down_bytes"], tot["up_bytes"]) == measured(ours)
    # a LoRA model has no persistent buffers: one ArrayRecord per message, as before buffers federated
    assert all(list(m.content.array_records) == ["arrays"] for m in ours.sent + ours.received)
    # what the tracker says FedAvg would have sent is what Flower's FedAvg did send
    assert (tot["fedavg_down_bytes"], tot["fedavg_up_bytes"]) == measured(theirs)
    assert tot["fedavg_down_bytes"] == 4 * ArrayRecord(get_adapter(fresh_model(cfg))).count_bytes()
    assert tot["ratio"] > 8 and tot["accepted"] == 4 and tot["failures"] == 0
    line = strategies["ours"].tracker.format()
    assert "vs FedAvg fp32" in line
    print(line)


# --- malformed replies -------------------------------------------------------------------------

def small_adapter():
    g = torch.Generator().manual_seed(5)
    return {"layer.lora_A.weight": torch.randn(4, 16, generator=g),
            "layer.lora_B.weight": torch.randn(16, 4, generator=g) * 0.1,
            "head.weight": torch.randn(3, 16, generator=g)}


def reply(ins, payload=None, n=10, *, arrays=None, extra=None, metrics=None):
    content = RecordDict()
    content["arrays"] = arrays if arrays is not None else pack_payload(payload)
    content["metrics"] = metrics if metrics is not None else MetricRecord({"num-examples": n})
    for k, v in (extra or {}).items():
        content[k] = v
    return Message(content, reply_to=ins)


def test_malformed_replies_are_rejected_and_the_round_continues(task_identity):
    adapter = small_adapter()
    layout = Layout.of(adapter)
    st = SparseLoRA("fedavg:up=1/4,values=fp16")
    grid = InProcessGrid(None, 2)
    ins = list(st.configure_train(1, initial_arrays(adapter), ConfigRecord(), grid))
    assert len(ins) == 2 and st.tracker.rounds[1].messages == 2
    g = torch.Generator().manual_seed(1)
    deltas = [{k: 0.01 * torch.randn(v.shape, generator=g) for k, v in adapter.items()} for _ in range(2)]
    good = [sparsify_encode(d, layout, density=0.25, values="fp16") for d in deltas]
    other = {**adapter, "head.weight": torch.zeros(4, 16)}
    wrong_layout = sparsify_encode(other, Layout.of(other), density=0.25, values="fp16")
    corrupt = bytearray(good[0])
    corrupt[len(corrupt) // 2] ^= 0x40
    m0 = ins[0]
    bad = {
        "truncated": reply(m0, good[0][:-7]),
        "corrupted": reply(m0, bytes(corrupt)),
        "wrong layout": reply(m0, wrong_layout),
        "full-layout of another": reply(m0, codec.encode(codec.decode(wrong_layout, layout=Layout.of(other)),
                                                          layout="full")),
        "garbage": reply(m0, b"\x00" * 40),
        "dense FedAvg arrays": reply(m0, arrays=ArrayRecord(adapter)),
        "no metrics": Message(RecordDict({"arrays": pack_payload(good[0])}), reply_to=m0),
        "extra config": reply(m0, good[0], extra={"c": ConfigRecord({"x": 1})}),
        "two arrays": reply(m0, good[0], extra={"more": pack_payload(good[1])}),
        "missing num-examples": reply(m0, good[0], metrics=MetricRecord({"loss": 1.0})),
        "zero": reply(m0, good[0], 0),
        "negative": reply(m0, good[0], -3),
        "nan": reply(m0, good[0], float("nan")),
        "inf": reply(m0, good[0], float("inf")),
        "huge": reply(m0, good[0], 1e300),
        "list": reply(m0, good[0], metrics=MetricRecord({"num-examples": [1, 2]})),
        "client error": Message(Error(code=2, reason="boom"), reply_to=m0),
    }
    replies = [reply(ins[0], good[0], 10), *bad.values(), reply(ins[1], good[1], 30)]
    before = {k: v.clone() for k, v in st.global_adapter.items()}
    arrays, metrics = st.aggregate_train(1, replies)
    assert metrics["fastlora-accepted"] == 2 and metrics["fastlora-failures"] == len(bad)
    expected = {k: v.clone() for k, v in before.items()}
    ServerOptimizer().apply(expected, sparse_aggregate(good, [0.25, 0.75], layout=layout))
    got = arrays.to_torch_state_dict()
    for k in layout.names:
        assert torch.equal(got[k], expected[k]) and torch.equal(st.global_adapter[k], expected[k])
    reasons = st.tracker.rounds[1].reasons
    assert len(reasons) == len(bad)
    for why in ("CRC32 mismatch", "layout fingerprint mismatch", "max_numel", "not a fastlora payload",
                "exactly one Array under key 'fastlora'", "exactly one ArrayRecord and one MetricRecord",
                "'num-examples' must be a number > 0 (and <= 2**53), got None", "got 0", "got nan",
                "got [1, 2]", "got 1e+300", "boom"):
        assert any(why in r for r in reasons), (why, reasons)

    # a node's second valid update in a round is rejected: it would count twice
    st.configure_train(3, arrays, ConfigRecord(), grid)
    before = {k: v.clone() for k, v in st.global_adapter.items()}
    _, metrics = st.aggregate_train(3, [reply(ins[0], good[0], 10), reply(ins[0], good[1], 10)])
    assert metrics["fastlora-accepted"] == 1 and "second update" in st.tracker.rounds[3].reasons[0]
    expected = {k: v.clone() for k, v in before.items()}
    ServerOptimizer().apply(expected, sparse_aggregate(good[:1], [1.0], layout=layout))
    for k in layout.names:
        assert torch.equal(st.global_adapter[k], expected[k])

    # every reply bad: no update, the global adapter stays as it was
    arrays, metrics = st.aggregate_train(2, list(bad.values()))
    assert arrays is None and metrics["fastlora-failures"] == len(bad) and metrics["fastlora-accepted"] == 0
    for k in layout.names:
        assert torch.equal(st.global_adapter[k], expected[k])
    assert st.tracker.summary()["total"]["failures"] == 2 * len(bad) + 1


def test_failing_clients_leave_the_global_adapter_unchanged():
    """End to end: every client raises or sends junk; the server finishes its rounds."""
    cfg = task.config()
    app = ClientApp()

    @app.train()
    def train(msg, context):
        if context.node_config["partition-id"] == 0:
            raise RuntimeError("client crashed")
        return Message(RecordDict({"arrays": pack_payload(b"junk"), "metrics": MetricRecord({"num-examples": 5})}),
                       reply_to=msg)

    holder = {}
    server = ServerApp()

    @server.main()
    def main(grid, context):
        holder["st"] = st = SparseLoRA("flasc")
        holder["result"] = st.start(grid=grid, initial_arrays=initial_arrays(fresh_model(cfg)), num_rounds=2)

    run_in_process(server, app, 2)
    st = holder["st"]
    init = get_adapter(fresh_model(cfg))
    assert all(torch.equal(st.global_adapter[k], init[k]) for k in init)
    assert st.tracker.summary()["total"]["failures"] == 4
    assert any("client crashed" in r for r in st.tracker.rounds[1].reasons)


def test_layout_mismatch_is_a_clear_error(task_identity):
    cfg = task.config()
    # client side: a model with another LoRA rank cannot decode the server's adapter
    st = SparseLoRA("flasc")
    grid = InProcessGrid(None, 2)
    msg = list(st.configure_train(1, initial_arrays(fresh_model(cfg)), ConfigRecord(), grid))[0]
    other = build_classifier(tiny_encoder(seed=0), cfg["num-classes"], rank=2, seed=0)
    ctx = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match="cannot decode the server's adapter against this model"):
        client_update(msg, ctx, other, lambda m: 1)
    # server side: the global arrays must keep their layout
    with pytest.raises(ValueError, match="changed layout"):
        st.configure_train(2, initial_arrays(other), ConfigRecord(), grid)
    with pytest.raises(ValueError, match="fastlora payload, not the dense adapter"):
        SparseLoRA("flasc").configure_train(1, pack_payload(b"FL"), ConfigRecord(), grid)
    # bad num_examples from the user's train function
    with pytest.raises(ValueError, match="number of training examples"):
        client_update(msg, ctx, task.get_model(cfg), lambda m: 0)


def test_client_update_upload_settings(task_identity):
    """The client follows the server's ConfigRecord, or an explicit strategy (any download mode)."""
    cfg = task.config()
    st = SparseLoRA("flasc:up=1/8")
    grid = InProcessGrid(None, 2)
    msg = list(st.configure_train(1, initial_arrays(task.initial_adapter(cfg)), ConfigRecord(), grid))[0]
    model = task.get_model(cfg)
    layout = Layout.of(get_adapter(model))
    tokens, parts, _ = task.get_data(cfg, 2)

    def train_fn(m):
        return task.train(m, tokens, parts[0], cfg, 1, 0)

    def nnz(rep):
        return codec.decode(unpack_payload(rep.content["arrays"]), layout=layout).nnz

    ctx = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    rep = client_update(msg, ctx, model, train_fn)
    assert nnz(rep) == math.floor(layout.numel / 8 + 0.5) and RESIDUAL_KEY not in ctx.state
    assert rep.content["metrics"]["num-examples"] == int(parts[0].numel())
    assert "train-loss" in rep.content["metrics"]
    rep = client_update(msg, ctx, model, train_fn, strategy="ef-topk:up=1/32")   # diff download: irrelevant here
    assert nnz(rep) == math.floor(layout.numel / 32 + 0.5) and RESIDUAL_KEY in ctx.state
    bare = Message(RecordDict({"arrays": msg.content["arrays"]}), dst_node_id=5, message_type="train")
    with pytest.raises(ValueError, match="lacks .*pass strategy="):
        client_update(bare, ctx, model, train_fn)


# --- mode 2: Flower's simulation engine (Ray) --------------------------------------------------

@pytest.mark.slow
def test_simulation_engine_matches_in_process(tmp_path, monkeypatch):
    from flwr.simulation import run_simulation

    spec = "ef-topk:mode=sparse"
    ref_out, sim_out = tmp_path / "ref.pt", tmp_path / "sim.pt"
    run_in_process(make_server_app(strategy=spec, output=str(ref_out)), make_client_app(), 2)
    # Ray's workers import the app's modules: put the app folder on their path
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(APP_DIR), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")
    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    t0 = time.perf_counter()
    run_simulation(server_app=make_server_app(strategy=spec, output=str(sim_out)),
                   client_app=make_client_app(), num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 1, "num_gpus": 0, "include_dashboard": False}})
    elapsed = time.perf_counter() - t0
    ref, sim = task.load_output(ref_out), task.load_output(sim_out)
    assert sim["bytes"]["total"]["accepted"] == 4 and sim["bytes"]["total"]["failures"] == 0
    assert sim["bytes"]["total"]["bytes"] == ref["bytes"]["total"]["bytes"]
    # Same seeds, same thread count, two clients (fp32 sums of two terms commute): the same bits,
    # which also shows that each node's error-feedback residual survived between rounds.
    for k, v in ref["adapter"].items():
        assert torch.equal(sim["adapter"][k], v), k
    print(f"simulation engine: {elapsed:.1f} s")


@pytest.mark.slow
def test_simulation_engine_demo_model(tmp_path, monkeypatch, capsys):
    """The fastlora fl demo's model and task (all-MiniLM-L6-v2, stdlib docstrings) on Flower's
    simulation engine: fastlora's payloads vs what Flower's FedAvg would have sent."""
    from flwr.simulation import run_simulation

    out = tmp_path / "minilm.safetensors"
    overrides = dict(model="minilm", strategy="flasc:up=1/16,down=1/4", **{
        "num-samples": 40, "seq-len": 32, "rank": 8, "local-steps": 2, "batch-size": 8, "eval-samples": 64,
        "num-server-rounds": 2, "output": str(out)})
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(APP_DIR), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")
    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    client_overrides = {k: v for k, v in overrides.items() if k != "output"}
    run_simulation(server_app=make_server_app(**overrides), client_app=make_client_app(**client_overrides),
                   num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 1, "num_gpus": 0, "include_dashboard": False}})
    res = task.load_output(out)
    total = res["bytes"]["total"]
    assert total["accepted"] == 4 and total["failures"] == 0
    assert res["adapter"]["head.weight"].shape == (8, 384)
    assert 0.0 <= res["eval_metrics"][2]["accuracy"] <= 1.0
    # 1/4 fp16 down + 1/16 fp16 up vs dense fp32 both ways: well over 5x fewer bytes
    assert total["fedavg_bytes"] > 5 * total["bytes"], total
    with capsys.disabled():
        print(f"\nMiniLM on Flower, 2 nodes x 2 rounds: fastlora {total['bytes']} B, "
              f"Flower FedAvg {total['fedavg_bytes']} B ({total['fedavg_bytes'] / total['bytes']:.1f}x)")


# --- mode 3: Flower's deployment engine on loopback --------------------------------------------

def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, proc, log, timeout):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"port {port} not open after {timeout} s:\n{log.read_text()[-3000:]}")


def descendants(pids):
    """Every live process below ``pids`` (Flower's SuperExec runs in its own process group)."""
    parent = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            parent[int(d.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            pass
    found, todo = set(), list(pids)
    while todo:
        p = todo.pop()
        for child, ppid in parent.items():
            if ppid == p and child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid):
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop(procs):
    """SIGTERM the process groups we started (and any descendant that left them), then SIGKILL
    what is still alive after 10 s."""
    family = descendants([p.pid for p in procs])
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for pid in family:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=5)
    while time.time() < deadline and any(alive(pid) for pid in family):
        time.sleep(0.2)
    for pid in family:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return family


@pytest.mark.slow
def test_deployment_engine_on_loopback(tmp_path):
    bindir = Path(sys.executable).parent
    for exe in ("flower-superlink", "flower-supernode", "flwr"):
        if not (bindir / exe).exists() and shutil.which(exe) is None:
            pytest.fail(f"{exe} not found: install fastlora[flower] (flwr provides it)")
    spec = "ef-topk:mode=sparse"
    home = tmp_path / "flwr_home"
    home.mkdir()
    link_port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link_port}"\n'
        'insecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "PYTHONUNBUFFERED": "1"}
    env["PATH"] = os.pathsep.join([str(bindir), env.get("PATH", "")])
    out = tmp_path / "deploy.pt"
    procs, logs = [], []

    def start(name, args):
        log = tmp_path / f"{name}.log"
        logs.append(log)
        p = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                             start_new_session=True)
        procs.append(p)
        return p, log

    t0 = time.perf_counter()
    try:
        link, link_log = start("superlink", [str(bindir / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                             "--port", str(link_port), "--disable-runtime-dependency-installation"])
        wait_for_port(link_port, link, link_log, 60)
        for i in range(2):
            start(f"supernode{i}", [str(bindir / "flower-supernode"), "--insecure", "--superlink",
                                    f"127.0.0.1:{link_port}", "--host", "127.0.0.1", "--port", str(free_port()),
                                    "--node-config", f"partition-id={i} num-partitions=2"])
        try:
            run = subprocess.run([str(bindir / "flwr"), "run", str(APP_DIR), "loopback", "--run-config",
                                  f"strategy='{spec}' output='{out}'", "--stream"],
                                 env=env, cwd=tmp_path, capture_output=True, text=True, timeout=150)
            said = f"flwr run exit {run.returncode}\n{run.stdout[-4000:]}\n{run.stderr[-2000:]}"
        except subprocess.TimeoutExpired as e:
            said = f"flwr run timed out after 150 s\n{(e.stdout or b'')[-4000:]!r}"
        assert out.exists(), said + "".join(f"\n--- {p.name}\n{p.read_text()[-2500:]}" for p in logs)
    finally:
        family = stop(procs)
    elapsed = time.perf_counter() - t0
    assert all(p.poll() is not None for p in procs)
    time.sleep(0.5)
    assert not [pid for pid in family if alive(pid)], "leftover Flower processes"
    ref_out = tmp_path / "ref.pt"
    run_in_process(make_server_app(strategy=spec, output=str(ref_out)), make_client_app(), 2)
    ref, dep = task.load_output(ref_out), task.load_output(out)
    assert dep["bytes"]["total"]["accepted"] == 4 and dep["bytes"]["total"]["failures"] == 0
    # Separate processes, same seeds and thread count: the same bits as in-process (which also
    # shows that each SuperNode kept its node's error-feedback residual between rounds).
    for k, v in ref["adapter"].items():
        assert torch.equal(dep["adapter"][k], v), k
    assert math.isfinite(dep["eval_metrics"][2]["loss"])
    print(f"deployment engine: {elapsed:.1f} s")


# --- Flower's own handlers and misconfigurations ---------------------------------------------------

def test_federated_evaluate_with_flowers_own_evaluate_handler():
    """fraction_evaluate > 0: evaluate messages carry Flower's plain ArrayRecord of the global
    tensors, so a template-style handler (load_state_dict of to_torch_state_dict) works, and so
    does load_global."""
    cfg = task.config(overrides={"strategy": "ef-topk", "num-server-rounds": 2})
    seen = []
    example = make_client_app()
    app = ClientApp()

    @app.train()
    def train(msg, context):
        return example(msg, context)

    @app.evaluate()
    def evaluate(msg, context):
        model = fresh_model(cfg)
        tensors = msg.content["arrays"].to_torch_state_dict()
        model.load_state_dict(tensors, strict=False)  # Flower's template handler (adapter keys only)
        assert torch.equal(load_global(msg, fresh_model(cfg))["head.weight"], tensors["head.weight"])
        seen.append(set(tensors))
        return Message(RecordDict({"metrics": MetricRecord({"accuracy": 0.5, "num-examples": 4})}), reply_to=msg)

    holder = {}
    server = ServerApp()

    @server.main()
    def main(grid, context):
        st = holder["st"] = SparseLoRA("ef-topk", fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=2,
                                       min_evaluate_nodes=2, min_available_nodes=2)
        holder["result"] = st.start(grid=grid, initial_arrays=initial_arrays(task.initial_adapter(cfg)),
                                    num_rounds=2)

    run_in_process(server, app, 2)
    assert len(seen) == 4 and seen[0] == set(holder["st"].layout.names)
    assert holder["result"].evaluate_metrics_clientapp[2]["accuracy"] == 0.5


def test_initial_arrays_of_another_model_raise():
    """A server whose initial arrays no node can decode (e.g. the whole state_dict of a LoRA
    model instead of its trainable parameters) stops with the reason, not 0 updates."""
    cfg = task.config(overrides={"strategy": "ef-topk", "num-server-rounds": 2})
    model = fresh_model(cfg)
    server = ServerApp()

    @server.main()
    def main(grid, context):
        SparseLoRA(fraction_train=1.0, min_train_nodes=2, min_available_nodes=2).start(
            grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=2)

    with pytest.raises(ValueError, match="every node failed to decode"):
        run_in_process(server, make_client_app(), 2)


def test_nodes_with_a_4bit_base():
    """QLoRA on Flower: each node's frozen base in NF4 (fastlora.quantize_model through the
    app's `base` key); only the adapter travels, so the round runs as with a float32 base."""
    import fastlora
    import fastlora.peft

    cfg = task.config(overrides={"strategy": "ef-topk", "base": "nf4"})
    grid = run_in_process(make_server_app(**cfg), make_client_app(), 2)
    assert len(grid.sent) == 4 and all(not r.has_error() for r in grid.received)
    # the 4-bit layers' scales are buffers of the frozen base: they do not travel
    assert all(BUFFERS_KEY not in m.content.array_records for m in grid.sent + grid.received)
    model = task.get_model(cfg)
    assert any(isinstance(m, fastlora.QuantizedLinear) for m in model.modules())
    assert fastlora.peft.fast_path_calls(model) > 0
    with pytest.raises(ValueError, match="base must be"):
        task.config(overrides={"base": "nf3"})


# --- non-trainable buffers (BatchNorm statistics) ------------------------------------------------

class BNNet(torch.nn.Module):
    """conv + BatchNorm + linear: every parameter trainable; BatchNorm's running statistics
    (float32) and step count (int64) are persistent buffers, as in Flower's CNN templates."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def bn_net(seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return BNNet()


BN_SIZES = (16, 24, 40)   # examples per node: FedAvg weights 0.2, 0.3, 0.5


def bn_train(model, pid, rnd):
    """2 + pid SGD steps in train mode on the node's own data (its own BatchNorm statistics)."""
    g = torch.Generator().manual_seed(100 * pid + rnd)
    n = BN_SIZES[pid]
    x = torch.randn(n, 1, 8, 8, generator=g) * (1 + pid) + pid
    y = torch.randint(0, 3, (n,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for xb, yb in zip(x.chunk(2 + pid), y.chunk(2 + pid)):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    return n


def fedavg_buffers(replies):
    """The FedAvg of the buffers the replies carry, computed here independently."""
    counts = [rep.content["metrics"]["num-examples"] for rep in replies]
    sets = [rep.content[BUFFERS_KEY].to_torch_state_dict() for rep in replies]
    out = {}
    for k, v in sets[0].items():
        mean = sum(c * s[k].double() for c, s in zip(counts, sets)) / sum(counts)
        out[k] = mean.to(v.dtype) if v.is_floating_point() else mean.round().to(v.dtype)
    return out


def assert_buffers_equal(got, expected):
    assert list(got) == list(expected)
    for k, v in expected.items():
        if v.is_floating_point():
            torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(got[k], v), (k, got[k], v)


@pytest.mark.parametrize("spec", ["ef-topk", "flasc"])   # diff download, sparse download
def test_batchnorm_buffers_federate_like_fedavg(spec):
    models = {pid: bn_net(seed=10 + pid) for pid in range(3)}   # one model per node: nothing shared
    started, evaluated, globals_, holder = {}, [], {}, {}
    app = ClientApp()

    @app.train()
    def train(msg, context):
        pid, rnd = int(context.node_config["partition-id"]), round_of(msg)

        def train_fn(model):
            started[pid, rnd] = {k: v.clone() for k, v in model_buffers(model).items()}   # after the download
            return bn_train(model, pid, rnd)
        return client_update(msg, context, models[pid], train_fn)

    @app.evaluate()
    def evaluate(msg, context):
        model = bn_net(seed=99)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())   # Flower's template handler: strict
        evaluated.append((round_of(msg), {k: v.clone() for k, v in model_buffers(model).items()}))
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1, "accuracy": 0.0})}), reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid, context):
        def keep(rnd, arrays):   # Flower's centralised evaluation hook sees the global arrays of every round
            globals_[rnd] = {k: v.clone() for k, v in arrays.to_torch_state_dict().items()}

        st = holder["st"] = SparseLoRA(spec, fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=3,
                                       min_evaluate_nodes=3, min_available_nodes=3)
        holder["result"] = st.start(grid=grid, initial_arrays=initial_arrays(bn_net()), num_rounds=2,
                                    evaluate_fn=keep)

    grid = run_in_process(server, app, 3)
    st, result = holder["st"], holder["result"]
    buffer_names = list(model_buffers(bn_net()))
    assert buffer_names == ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]
    assert st.buffer_spec is not None and [n for n, _, _ in st.buffer_spec] == buffer_names
    train_msgs = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(train_msgs) == 6 and all(not r.has_error() for r in grid.received)
    assert all(BUFFERS_KEY in m.content.array_records for m in train_msgs)
    init = model_buffers(bn_net())
    for rnd in (1, 2):
        replies = sorted((grid.received[grid.sent.index(m)] for m in train_msgs if round_of(m) == rnd),
                         key=lambda rep: rep.metadata.src_node_id)
        assert all(BUFFERS_KEY in rep.content.array_records for rep in replies)
        expected = fedavg_buffers(replies)
        assert_buffers_equal({n: globals_[rnd][n] for n in buffer_names}, expected)
        # what each node started round rnd from: the initial model's buffers, then round 1's FedAvg
        start = init if rnd == 1 else {n: globals_[1][n] for n in buffer_names}
        for pid in range(3):
            for n in buffer_names:
                assert torch.equal(started[pid, rnd][n], start[n]), (pid, rnd, n)
        # the evaluate handler's strict load got the same global buffers
        for r, got in evaluated:
            if r == rnd:
                assert_buffers_equal(got, {n: globals_[rnd][n] for n in buffer_names})
    # num_batches_tracked: 2, 3, 4 steps from 0 -> 3.3 rounds to 3; then 5, 6, 7 -> 6.3 -> 6
    assert int(globals_[1]["bn.num_batches_tracked"]) == 3 and int(globals_[2]["bn.num_batches_tracked"]) == 6
    assert len(evaluated) == 6
    # Result.arrays is the whole state_dict: a strict load gives the global tensors and buffers
    final = bn_net(seed=5)
    final.load_state_dict(result.arrays.to_torch_state_dict())
    for n, p in final.named_parameters():
        assert torch.equal(p.detach(), st.global_adapter[n]), n
    assert_buffers_equal(model_buffers(final), st.global_buffers)
    # bytes: both ways, every ArrayRecord (payloads + buffers); FedAvg's figure is the state_dict's
    tot = st.tracker.summary()["total"]
    down = sum(r.count_bytes() for m in grid.sent for r in m.content.array_records.values())
    up = sum(r.count_bytes() for m in grid.received for r in m.content.array_records.values())
    assert (tot["down_bytes"], tot["up_bytes"]) == (down, up)
    state_bytes = ArrayRecord(bn_net().state_dict()).count_bytes()
    assert tot["fedavg_down_bytes"] == 12 * state_bytes and tot["fedavg_up_bytes"] == 6 * state_bytes


def test_bad_buffers_are_rejected_and_the_round_continues(task_identity):
    """Initial arrays of the trainable tensors only: the first accepted reply fixes the run's
    buffers; a reply whose buffers differ (names, shape, dtype) or hold NaN / Inf is rejected
    with its reason, the others are FedAvg'd."""
    model = bn_net()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    layout = Layout.of(params)
    st = SparseLoRA("fedavg")
    grid = InProcessGrid(None, 3)
    # node-id order (the order the server checks replies in): the first accepted reply is ins[0]'s
    ins = sorted(st.configure_train(1, initial_arrays(params), ConfigRecord(), grid),
                 key=lambda m: m.metadata.dst_node_id)
    assert st.buffer_spec is None and all(BUFFERS_KEY not in m.content.array_records for m in ins)
    g = torch.Generator().manual_seed(3)
    payloads = [sparsify_encode({k: 0.01 * torch.randn(v.shape, generator=g) for k, v in params.items()}, layout,
                                density=1.0, values="fp32") for _ in range(2)]
    own = [{"bn.running_mean": torch.randn(4, generator=g), "bn.running_var": torch.rand(4, generator=g) + 0.5,
            "bn.num_batches_tracked": torch.tensor(k, dtype=torch.int64)} for k in (2, 5)]

    def with_buffers(ins_msg, payload, n, buffers):
        rep = reply(ins_msg, payload, n)
        if buffers is not None:
            rep.content[BUFFERS_KEY] = ArrayRecord(buffers)
        return rep

    nan = dict(own[1], **{"bn.running_var": torch.tensor([1.0, float("nan"), 1.0, 1.0])})
    bad = {
        "shape": with_buffers(ins[2], payloads[1], 5, dict(own[1], **{"bn.running_mean": torch.zeros(5)})),
        "nan": with_buffers(ins[2], payloads[1], 5, nan),
        "inf": with_buffers(ins[2], payloads[1], 5, dict(own[1], **{"bn.running_mean": torch.full((4,), math.inf)})),
        "dtype": with_buffers(ins[2], payloads[1], 5, dict(own[1], **{"bn.running_mean": torch.zeros(4).double()})),
        "extra": with_buffers(ins[2], payloads[1], 5, dict(own[1], **{"bn.other": torch.zeros(1)})),
        "missing": with_buffers(ins[2], payloads[1], 5, None),
    }
    replies = [with_buffers(ins[0], payloads[0], 10, own[0]), *bad.values(),
               with_buffers(ins[1], payloads[1], 30, own[1])]
    arrays, metrics = st.aggregate_train(1, replies)
    assert metrics["fastlora-accepted"] == 2 and metrics["fastlora-failures"] == len(bad)
    reasons = st.tracker.rounds[1].reasons
    for why in ("buffer 'bn.running_mean' is torch.float32 (5,), expected torch.float32 (4,)",
                "buffer 'bn.running_var' holds NaN or Inf", "buffer 'bn.running_mean' holds NaN or Inf",
                "is torch.float64 (4,), expected torch.float32", "unexpected ['bn.other']", "carries none"):
        assert any(why in r for r in reasons), (why, reasons)
    expected = {"bn.running_mean": (0.25 * own[0]["bn.running_mean"].double()
                                    + 0.75 * own[1]["bn.running_mean"].double()).float(),
                "bn.running_var": (0.25 * own[0]["bn.running_var"].double()
                                   + 0.75 * own[1]["bn.running_var"].double()).float(),
                "bn.num_batches_tracked": torch.tensor(4)}     # 0.25 * 2 + 0.75 * 5 = 4.25
    assert_buffers_equal(st.global_buffers, expected)
    # what aggregate_train returns (Result.arrays): the tensors and the buffers, a strict state_dict
    assert set(arrays.buffer_names) == set(expected)
    bn_net(seed=1).load_state_dict(arrays.to_torch_state_dict())
    # the next round's train messages carry the global buffers
    msgs = list(st.configure_train(2, arrays, ConfigRecord(), grid))
    assert_buffers_equal(msgs[0].content[BUFFERS_KEY].to_torch_state_dict(), expected)


def test_model_buffers_rules():
    """Persistent buffers federate (bfloat16 as float32, exactly); non-persistent buffers and a
    4-bit base's scales (fastlora.QuantizedLinear) do not."""
    import fastlora
    from fastlora.flower.buffers import buffers_record, load_buffers, record_buffers

    bn = torch.nn.BatchNorm1d(3).to(torch.bfloat16)
    bn.running_mean.copy_(torch.tensor([0.1, -2.5, 3.0]))
    bn.register_buffer("scratch", torch.zeros(2), persistent=False)
    assert list(model_buffers(bn)) == ["running_mean", "running_var", "num_batches_tracked"]
    record = buffers_record(model_buffers(bn))
    assert record["running_mean"].dtype == "float32" and record["num_batches_tracked"].dtype == "int64"
    other = torch.nn.BatchNorm1d(3).to(torch.bfloat16)
    load_buffers(other, record_buffers(record))
    assert torch.equal(other.running_mean, bn.running_mean) and other.running_mean.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="missing"):
        load_buffers(torch.nn.BatchNorm1d(3), {"running_mean": torch.zeros(3)})
    with pytest.raises(ValueError, match="shape"):
        load_buffers(torch.nn.BatchNorm1d(3), dict(model_buffers(torch.nn.BatchNorm1d(4))))
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64))
    fastlora.quantize_model(net, "nf4")
    assert isinstance(net[0], fastlora.QuantizedLinear) and list(model_buffers(net)) == [
        "1.running_mean", "1.running_var", "1.num_batches_tracked"]


# --- the strategy's checkpoint (a restarted server resumes) ------------------------------------

def checkpointed_server(spec, rounds, kept, *, save=None, load=None, forget_nodes=False):
    """The example app's server with ``SparseLoRA.save_state`` after its rounds, or
    ``load_state`` before them (a restarted server)."""
    cfg = task.config(overrides={"strategy": spec})
    app = ServerApp()

    @app.main()
    def main(grid, context):
        st = SparseLoRA(spec, fraction_train=1.0, min_train_nodes=2, min_available_nodes=2)
        if load is not None:
            st.load_state(load, forget_nodes=forget_nodes)
            arrays = st.global_arrays()
        else:
            arrays = initial_arrays(task.initial_adapter(cfg))
        kept["result"] = st.start(grid=grid, initial_arrays=arrays, num_rounds=rounds)
        if save is not None:
            st.save_state(save)
        kept["st"] = st
    return app


@pytest.mark.parametrize("spec", ["ef-topk", "ef-topk:server_opt=adam,server_lr=0.01"])
def test_resumed_server_matches_the_straight_run(tmp_path, spec):
    kept = {}
    straight = run_in_process(checkpointed_server(spec, 4, kept), make_client_app(), 2)
    ref = kept["st"]
    ckpt = tmp_path / "server.safetensors"
    grid = run_in_process(checkpointed_server(spec, 2, kept, save=ckpt), make_client_app(), 2)
    grid.run_server(checkpointed_server(spec, 2, kept, load=ckpt))   # the same nodes, their state kept
    st = kept["st"]
    assert st.last_round == 4 and list(kept["result"].train_metrics_clientapp) == [1, 2]
    for n in ref.layout.names:   # bit for bit
        assert torch.equal(st.global_adapter[n], ref.global_adapter[n]), n
    # the nodes saw rounds 3 and 4 and got the same downloads (diffs from the versions they held)
    assert [round_of(m) for m in grid.sent] == [round_of(m) for m in straight.sent] == [1, 1, 2, 2, 3, 3, 4, 4]
    for a, b in zip(grid.sent, straight.sent):
        assert unpack_payloads(a.content["arrays"]) == unpack_payloads(b.content["arrays"])
        assert a.content["config"]["fastlora-down-kind"] == b.content["config"]["fastlora-down-kind"]
    assert st.held == ref.held and st.view.version == ref.view.version == 4
    assert st.tracker.summary() == ref.tracker.summary()
    assert st.optimizer.step_count == ref.optimizer.step_count
    for k, v in ref.optimizer.state_tensors().items():
        assert torch.equal(st.optimizer.state_tensors()[k], v), k
    # nodes that lost their state: forget_nodes resyncs them instead of sending steps they cannot apply
    fresh = run_in_process(checkpointed_server(spec, 2, kept, load=ckpt, forget_nodes=True), make_client_app(), 2)
    assert [m.content["config"]["fastlora-down-kind"] for m in fresh.sent] == ["resync"] * 2 + ["diff"] * 2
    assert all(not r.has_error() for r in fresh.received)


def test_checkpoint_errors_are_clear(tmp_path, task_identity):
    from fastlora.fl import checkpoint

    kept = {}
    ckpt = tmp_path / "server.safetensors"
    with pytest.raises(RuntimeError, match="before the first round"):
        SparseLoRA().save_state(ckpt)
    run_in_process(checkpointed_server("ef-topk", 1, kept, save=ckpt), make_client_app(), 2)
    with pytest.raises(checkpoint.CheckpointError, match="another strategy"):
        SparseLoRA("flasc").load_state(ckpt)
    with pytest.raises(checkpoint.CheckpointError, match="another strategy"):
        SparseLoRA("ef-topk:server_opt=adam,server_lr=0.01").load_state(ckpt)
    # a strategy that already runs another model
    cfg = task.config()
    other = build_classifier(tiny_encoder(seed=0), cfg["num-classes"], rank=2, seed=0)
    st = SparseLoRA("ef-topk")
    st.configure_train(1, initial_arrays(other), ConfigRecord(), InProcessGrid(None, 2))
    with pytest.raises(checkpoint.CheckpointError, match="adapter of another model"):
        st.load_state(ckpt)
    # a flipped bit, another kind of checkpoint
    data = bytearray(ckpt.read_bytes())
    data[-3] ^= 0x10
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="does not match its digest"):
        SparseLoRA().load_state(corrupt)
    loop = tmp_path / "loop.safetensors"
    checkpoint.save(loop, {"global.x": torch.zeros(2)}, {"identity": {}, "round": 1})
    with pytest.raises(checkpoint.CheckpointError, match="not a SparseLoRA checkpoint"):
        SparseLoRA().load_state(loop)
    # resuming from another model than the checkpoint's
    st = SparseLoRA("ef-topk")
    st.load_state(ckpt)
    with pytest.raises(ValueError, match="pass strategy.global_arrays"):
        st.start(grid=None, initial_arrays=initial_arrays(task.initial_adapter(cfg)), num_rounds=1)



# --- central differential privacy (Flower's client-side fixed clipping wrapper) -----------------

DP_CLIP = 0.5
DP_SCALES = (1e-4, 1e-2)    # per node: its sent update's norm ~0.02 (not clipped) and ~1.9 (clipped)


def dp_model():
    """Two tensors, 81,920 trainable entries, no buffers (a LoRA-like adapter)."""
    m = torch.nn.Module()
    m.a = torch.nn.Parameter(torch.zeros(256, 160))
    m.b = torch.nn.Parameter(torch.zeros(160, 256))
    return m


def dp_client_app(*mods):
    """Each node's "training" adds its own seeded noise (scale DP_SCALES[pid]) to the adapter
    and reports 1 example: equal weights, as the DP noise's calibration assumes."""
    models = {}
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg, context):
        pid, rnd = int(context.node_config["partition-id"]), round_of(msg)
        model = models.setdefault(pid, dp_model())

        def train_fn(m):
            g = torch.Generator().manual_seed(100 * pid + rnd)
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(DP_SCALES[pid] * torch.randn(p.shape, generator=g))
            return 1
        return client_update(msg, context, model, train_fn)
    return app


def client_side_dp(noise_multiplier):
    """Flower's central DP wrapper with client-side fixed clipping at DP_CLIP, 2 nodes sampled."""
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

    return lambda st: DifferentialPrivacyClientSideFixedClipping(st, noise_multiplier, DP_CLIP, 2)


def dp_server(spec, rounds, kept, *, wrap=None, save=None, load=None):
    """SparseLoRA(spec) on 2 nodes, run directly or wrapped (``wrap(strategy)``, e.g.
    :func:`client_side_dp`); ``kept["globals"][r]``: the global arrays after round r (what
    Flower's evaluate_fn sees); ``save`` after every round, ``load`` before the first."""
    app = ServerApp()

    @app.main()
    def main(grid, context):
        st = kept["st"] = SparseLoRA(spec, fraction_train=1.0, min_train_nodes=2, min_available_nodes=2)
        arrays = initial_arrays(dp_model())
        if load is not None:
            st.load_state(load)
            arrays = st.global_arrays()
        kept["globals"] = {}

        def keep(rnd, arrays):
            kept["globals"][rnd] = arrays.to_torch_state_dict()
            if save is not None and rnd > 0:
                st.save_state(save)
        run = st if wrap is None else wrap(st)
        kept["result"] = run.start(grid=grid, initial_arrays=arrays, num_rounds=rounds, evaluate_fn=keep)
    return app


def decoded(rep, layout):
    return codec.decode(unpack_payload(rep.content["arrays"]), layout=layout)


def norm_of(sd):
    return float(torch.linalg.vector_norm(sd.values.double()))


@pytest.mark.parametrize("spec", ["ef-topk", "flasc:up=1/8"])   # error feedback + diff download; neither
def test_dp_client_side_clipping_equals_clipped_updates(spec):
    """noise 0: each node's reply is its unclipped reply (same training, same download) scaled
    to norm <= C, the clipped-away part back in its residual; the global is their mean."""
    plain, dp = {}, {}
    grid_plain = run_in_process(dp_server(spec, 1, plain), dp_client_app(), 2)
    grid_dp = run_in_process(dp_server(spec, 1, dp, wrap=client_side_dp(0.0)), dp_client_app(), 2)
    st = dp["st"]
    layout = st.layout
    assert all(not r.has_error() for r in grid_dp.received) and len(grid_dp.received) == 2
    assert all(m.content["config"]["clipping_norm"] == DP_CLIP for m in grid_dp.sent)
    assert st.tracker.summary()["total"]["failures"] == 0
    ef = as_strategy(spec).error_feedback
    clipped = 0
    def by_node(grid):   # Flower samples the nodes in random order
        return sorted(grid.received, key=lambda r: r.metadata.src_node_id)

    for a, b in zip(by_node(grid_plain), by_node(grid_dp)):   # the same updates before clipping
        node = a.metadata.src_node_id
        assert b.metadata.src_node_id == node
        sa, sb = decoded(a, layout), decoded(b, layout)
        na, nb = norm_of(sa), norm_of(sb)
        assert nb <= DP_CLIP and torch.equal(sa.indices, sb.indices)
        if na <= DP_CLIP:
            assert unpack_payload(a.content["arrays"]) == unpack_payload(b.content["arrays"])
        else:
            clipped += 1
            assert DP_CLIP * (1 - 2 ** -9) < nb
            torch.testing.assert_close(sb.values.float(), sa.values.float() * (DP_CLIP / na), rtol=2 ** -10,
                                       atol=1e-8)
        if ef:   # what clipping removed is in the residual: residual + sent is what it was
            ra = grid_plain.contexts[node].state[RESIDUAL_KEY].to_torch_state_dict()
            rb = grid_dp.contexts[node].state[RESIDUAL_KEY].to_torch_state_dict()
            da, db = sa.to_dense(torch.float32), sb.to_dense(torch.float32)
            for n in layout.names:
                torch.testing.assert_close(rb[n] + db[n], ra[n] + da[n], rtol=0, atol=1e-6)
        else:    # without error feedback the clipped-away part (and top-k's remainder) is lost
            assert RESIDUAL_KEY not in grid_dp.contexts[node].state
    assert clipped == 1
    # noise 0: the global is the initial adapter plus the mean of the clipped updates, bit for bit
    expected = get_adapter(dp_model())
    ServerOptimizer().apply(expected, sparse_aggregate([unpack_payload(r.content["arrays"]) for r in by_node(grid_dp)],
                                                       [0.5, 0.5], layout=layout))
    got = dp["result"].arrays.to_torch_state_dict()
    for n in layout.names:
        assert torch.equal(got[n], expected[n]) and torch.equal(st.global_adapter[n], expected[n]), n


def test_dp_noise_has_the_documented_std():
    """noise_multiplier z > 0: the global after round 1 is the noise-free one plus Gaussian noise
    of std z * C / m on every entry (Flower's wrapper); the run goes on from that release (3
    rounds, the diff download built from it), and the strategy holds it (global_arrays,
    save_state): not the noise-free sum."""
    quiet, noisy = {}, {}
    run_in_process(dp_server("ef-topk", 1, quiet, wrap=client_side_dp(0.0)), dp_client_app(), 2)
    grid = run_in_process(dp_server("ef-topk", 3, noisy, wrap=client_side_dp(1.0)), dp_client_app(), 2)
    st = noisy["st"]
    layout = st.layout
    std = 1.0 * DP_CLIP / 2
    diff = torch.cat([(noisy["globals"][1][n] - quiet["globals"][1][n]).flatten().double() for n in layout.names])
    assert diff.numel() == 81920
    assert abs(float(diff.mean())) < 5 * std / math.sqrt(diff.numel())
    assert abs(float(diff.std()) / std - 1) < 0.02        # the std's own standard error: 0.25%
    assert len(grid.received) == 6 and all(not r.has_error() for r in grid.received)
    assert all(norm_of(decoded(r, layout)) <= DP_CLIP for r in grid.received)
    assert st.tracker.summary()["total"]["failures"] == 0 and st.last_round == 3
    final = noisy["result"].arrays.to_torch_state_dict()
    assert all(torch.equal(st.global_adapter[n], final[n]) for n in layout.names)


def test_dp_resumed_server_matches_the_straight_run(tmp_path):
    """Under Flower's wrapper (its start, not SparseLoRA.start) a restarted server goes on with
    rounds 3, 4 and ends where the straight run does (noise 0: the runs are comparable)."""
    straight, kept = {}, {}
    ref = run_in_process(dp_server("ef-topk", 4, straight, wrap=client_side_dp(0.0)), dp_client_app(), 2)
    ckpt = tmp_path / "server.safetensors"
    app = dp_client_app()
    grid = run_in_process(dp_server("ef-topk", 2, kept, wrap=client_side_dp(0.0), save=ckpt), app, 2)
    grid.run_server(dp_server("ef-topk", 2, kept, wrap=client_side_dp(0.0), load=ckpt))
    assert [round_of(m) for m in grid.sent] == [round_of(m) for m in ref.sent] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert all(not r.has_error() for r in grid.received)
    assert kept["st"].last_round == 4
    for n in kept["st"].layout.names:
        assert torch.equal(kept["st"].global_adapter[n], straight["st"].global_adapter[n]), n


def refused_wrappers():
    from flwr.serverapp.strategy import (DifferentialPrivacyClientSideAdaptiveClipping,
                                         DifferentialPrivacyServerSideAdaptiveClipping,
                                         DifferentialPrivacyServerSideFixedClipping)

    return {"server-side fixed": lambda st: DifferentialPrivacyServerSideFixedClipping(st, 1.0, DP_CLIP, 2),
            "server-side adaptive": lambda st: DifferentialPrivacyServerSideAdaptiveClipping(st, 0.0, 2),
            "client-side adaptive": lambda st: DifferentialPrivacyClientSideAdaptiveClipping(st, 0.0, 2)}


@pytest.mark.parametrize("kind", ["server-side fixed", "server-side adaptive", "client-side adaptive"])
def test_dp_wrappers_that_cannot_work_fail_before_the_first_message(kind):
    grid = InProcessGrid(dp_client_app(), 2)
    with pytest.raises(ValueError, match="SparseLoRA cannot run under Flower's DifferentialPrivacy") as err:
        grid.run_server(dp_server("ef-topk", 2, {}, wrap=refused_wrappers()[kind]))
    assert grid.sent == []
    # the message names what works
    assert "DifferentialPrivacyClientSideFixedClipping(SparseLoRA(...), noise_multiplier, clipping_norm" in str(
        err.value)
    print(err.value)


def test_dp_accounting_is_refused_by_flower():
    """Flower's accounted mode needs FedAvg's own aggregate_train; SparseLoRA has its own."""
    import types

    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping
    from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod

    config = PrivacyConfig(target_delta=1e-5, population_size=10, sampling_method=SamplingMethod.NO_AMPLIFICATION,
                           neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
    with pytest.raises(ValueError, match="requires a strategy using FedAvg.aggregate_train"):
        DifferentialPrivacyClientSideFixedClipping(SparseLoRA(), 1.0, DP_CLIP, 2,
                                                   accountant=types.SimpleNamespace(config=config))


def test_dp_with_flowers_fixedclipping_mod_is_a_clear_error():
    from flwr.clientapp.mod import fixedclipping_mod

    kept = {}
    grid = run_in_process(dp_server("ef-topk", 1, kept, wrap=client_side_dp(0.0)), dp_client_app(fixedclipping_mod), 2)
    reasons = [r.error.reason for r in grid.received if r.has_error()]
    assert len(reasons) == 2 and all("remove Flower's fixedclipping_mod from the ClientApp's mods" in r
                                     for r in reasons), reasons
    # refused before training: no residual kept; Flower's wrapper skips a round with an error reply
    assert all(RESIDUAL_KEY not in ctx.state for ctx in grid.contexts.values())
    st = kept["st"]
    assert st.last_round == 0 and all(not t.any() for t in st.global_adapter.values())


def test_dp_configuration_errors(task_identity, caplog):
    grid = InProcessGrid(None, 2)
    dp_config = ConfigRecord({"clipping_norm": DP_CLIP})
    # FedAdam's step is not covered by the noise added after it
    with pytest.raises(ValueError, match="server_opt=adam is not covered"):
        SparseLoRA("ef-topk:server_opt=adam,server_lr=0.01").configure_train(1, initial_arrays(dp_model()),
                                                                             dp_config, grid)
    with pytest.raises(ValueError, match="finite number > 0"):
        SparseLoRA().configure_train(1, initial_arrays(dp_model()), ConfigRecord({"clipping_norm": -1.0}), grid)
    # persistent buffers would travel unclipped: refused by the server when it knows them ...
    with pytest.raises(ValueError, match="persistent buffers .* unclipped"):
        SparseLoRA("fedavg").configure_train(1, initial_arrays(bn_net()), dp_config, grid)
    # ... and by the node
    params = {n: p.detach().clone() for n, p in bn_net().named_parameters()}
    msg = list(SparseLoRA("fedavg").configure_train(1, initial_arrays(params), dp_config, grid))[0]
    ctx = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match="persistent buffers .* unclipped"):
        client_update(msg, ctx, bn_net(), lambda m: 1)
    # a reply above the clipping norm (a node that does not clip) is rejected; the weight warning
    adapter = small_adapter()
    layout = Layout.of(adapter)
    st = SparseLoRA("fedavg:up=1/4")
    ins = list(st.configure_train(1, initial_arrays(adapter), ConfigRecord({"clipping_norm": 0.01}), grid))
    big = sparsify_encode({k: torch.ones_like(v) for k, v in adapter.items()}, layout, density=0.25, values="fp16")
    small = sparsify_encode({k: torch.full_like(v, 1e-4) for k, v in adapter.items()}, layout, density=0.25,
                            values="fp16")
    _, metrics = st.aggregate_train(1, [reply(ins[0], big, 1), reply(ins[1], small, 1)])
    assert metrics["fastlora-accepted"] == 1
    assert "above the clipping norm 0.01 (central DP): the node did not clip it" in st.tracker.rounds[1].reasons[0]
    assert "an accepted update weighs 1, more than 1/2" in caplog.text


@pytest.mark.parametrize("values", ["fp32", "fp16", "bf16", "int8"])
def test_clip_payload_bounds_the_decoded_norm(values):
    from fastlora import new_residual
    from fastlora.flower.dp import clip_payload

    adapter = small_adapter()
    layout = Layout.of(adapter)
    g = torch.Generator().manual_seed(7)
    delta = {k: torch.randn(v.shape, generator=g) for k, v in adapter.items()}
    residual = new_residual(delta)
    payload = sparsify_encode(delta, layout, density=0.5, values=values, residual=residual)
    sd = codec.decode(payload, layout=layout)
    n0 = norm_of(sd)
    for c in (0.3, 1.0, 3.0, 2 * n0):
        res = {k: r.clone() for k, r in residual.items()}
        out = clip_payload(payload, layout, c, res)
        so = codec.decode(out, layout=layout)
        assert norm_of(so) <= c and torch.equal(so.indices, sd.indices)
        assert codec.inspect(out, layout=layout)["values"] == values
        if n0 <= c:
            assert out == payload and all(torch.equal(res[k], residual[k]) for k in res)
            continue
        assert norm_of(so) > c * (1 - 2 ** -5)
        # error feedback: what was removed is in the residual
        sent, before = sd.to_dense(torch.float32), so.to_dense(torch.float32)
        for k in layout.names:
            torch.testing.assert_close(res[k] + before[k], residual[k] + sent[k], rtol=0, atol=1e-6)
    # rounding to the travel format pushes 0.3 up (fp16 0.30005): the retry sends the one below
    one = {"x": torch.tensor([2.0])}
    out = clip_payload(sparsify_encode(one, Layout.of(one), density=1.0, values="fp16"), Layout.of(one), 0.3)
    assert codec.decode(out, layout=Layout.of(one)).values.tolist() == [0.2998046875]
