"""Accuracy and bytes of fastlora's Flower strategies against Flower's own FedAvg, on a task
shaped like Flower's PyTorch app template: a small CNN trained whole (every parameter federated),
10 nodes, half of them sampled each round, 40 rounds, 1 local epoch of Adam per round.

    .venv/bin/python benchmarks/flower_cnn_experiment.py --seeds 0 1 [--rounds 40] [--strategies ...]
        [--engine inprocess|simulation]

The data is generated (no download): 10 classes of 28 x 28 images, each class a fixed random
smooth pattern, every sample its class pattern shifted by up to 3 pixels, scaled, plus noise,
split IID over the nodes (as the template's partitioner) or Dirichlet non-IID with
``--dirichlet-alpha``.

Engines (the same ServerApp and ClientApp on both):

- ``inprocess`` (default): one process, ``fastlora.flower.run_in_process`` (an
  ``InProcessGrid``; each message goes through Flower's protobuf serialisation).
- ``simulation``: Flower's simulation engine, ``flwr.simulation.run_simulation`` with the Ray
  backend (``pip install "flwr[simulation]"``), one Ray actor (``num_cpus=1``) running the
  ClientApp for every node in turn, as the in-process grid does; the ServerApp runs in a
  thread of this process. Ray's workers import this file as the module
  ``flower_cnn_experiment`` (its folder goes on their ``PYTHONPATH``) and keep the data and
  the model per worker process; node ``i`` trains on partition ``node_config["partition-id"]``.

Bytes are counted in the ServerApp, identically on both engines: the ``grid`` it is given is
wrapped (``CountingGrid``), and every message sent and every reply received adds its
``ArrayRecord.count_bytes()`` (what ``CommTracker`` counts; for FedAvg the dense float32
ArrayRecords of ``model.state_dict()``). In-process, the script also checks those counts
against the ``InProcessGrid``'s own record of the messages. Error replies carry no arrays and
are counted as ``failures`` (the script stops if there are any). Node sampling uses Python's
unseeded ``random`` (Flower's ``sample_nodes``), so the sampled nodes differ between runs and
engines; ``down_messages`` / ``up_messages`` in the JSON list every message's bytes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Iterable, List, Optional

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from fastlora.flower import SparseLoRA, client_update, initial_arrays, run_in_process  # noqa: E402

NUM_CLASSES, SIDE = 10, 28


class Net(nn.Module):
    """The template's CNN (two conv + pool, three linear layers), for 1 x 28 x 28 inputs."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, NUM_CLASSES)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = x.flatten(1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def make_data(n_train: int, n_test: int, seed: int, noise: float):
    g = torch.Generator().manual_seed(1000 + seed)
    coarse = torch.randn(NUM_CLASSES, 1, 7, 7, generator=g)
    patterns = torch.nn.functional.interpolate(coarse, size=(SIDE, SIDE), mode="bicubic", align_corners=False)

    def sample(n):
        y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        x = patterns[y].clone()
        shifts = torch.randint(-3, 4, (n, 2), generator=g)
        for i in range(n):
            x[i] = torch.roll(x[i], shifts=(int(shifts[i, 0]), int(shifts[i, 1])), dims=(1, 2))
        x = x * (0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g)) + noise * torch.randn(x.shape, generator=g)
        return x, y

    return sample(n_train), sample(n_test)


def split(labels: torch.Tensor, num_nodes: int, alpha: float, seed: int):
    g = torch.Generator().manual_seed(2000 + seed)
    if alpha <= 0:  # IID
        perm = torch.randperm(labels.numel(), generator=g)
        return [perm[i::num_nodes] for i in range(num_nodes)]
    parts = [[] for _ in range(num_nodes)]
    for c in range(NUM_CLASSES):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        p = torch.distributions.Dirichlet(torch.full((num_nodes,), alpha)).sample()
        cuts = (p.cumsum(0) * idx.numel()).round().long().tolist()
        start = 0
        for i, end in enumerate(cuts):
            parts[i].extend(idx[start:end].tolist())
            start = end
    return [torch.tensor(sorted(p), dtype=torch.long) for p in parts]


def local_train(model, x, y, *, epochs: int, batch: int, lr: float, seed: int) -> float:
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(epochs):
        perm = torch.randperm(y.numel(), generator=g)
        for i in range(0, y.numel(), batch):
            b = perm[i:i + batch]
            loss = nn.functional.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach())
    return total


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def data_config(args, seed: int) -> dict:
    """What a node needs to rebuild its data and train (plain values: it travels to Ray's workers)."""
    return {"seed": seed, "train_samples": args.train_samples, "test_samples": args.test_samples,
            "noise": args.noise, "nodes": args.nodes, "dirichlet_alpha": args.dirichlet_alpha,
            "local_epochs": args.local_epochs, "batch": args.batch, "lr": args.lr, "threads": args.threads}


_DATA: dict = {}
_MODEL: List[nn.Module] = []


def task_data(cfg: dict):
    """``((xtr, ytr), (xte, yte), parts)`` for ``cfg``, built once per process (the server's,
    and each Ray worker's) and cached; leaves the global torch RNG as it was."""
    key = tuple(sorted(cfg.items()))
    if key not in _DATA:
        seed = cfg["seed"]
        with torch.random.fork_rng():
            torch.manual_seed(seed)   # the Dirichlet split draws from the global RNG
            (xtr, ytr), (xte, yte) = make_data(cfg["train_samples"], cfg["test_samples"], seed, cfg["noise"])
            parts = split(ytr, cfg["nodes"], cfg["dirichlet_alpha"], seed)
        _DATA.clear()
        _DATA[key] = ((xtr, ytr), (xte, yte), parts)
    return _DATA[key]


def client_model() -> nn.Module:
    """The ClientApp's model, one per process: every round loads all its parameters (it has no
    buffers), so nothing carries over between nodes or rounds."""
    if not _MODEL:
        with torch.random.fork_rng():
            _MODEL.append(Net())
    return _MODEL[0]


def make_client_app(spec: str, cfg: dict) -> ClientApp:
    client = ClientApp()

    def train_fn_for(pid: int, rnd: int):
        (xtr, ytr), _, parts = task_data(cfg)

        def train_fn(m):
            idx = parts[pid]
            local_train(m, xtr[idx], ytr[idx], epochs=cfg["local_epochs"], batch=cfg["batch"], lr=cfg["lr"],
                        seed=hash((cfg["seed"], rnd, pid)) & 0xFFFFFFFF)
            return int(idx.numel())
        return train_fn

    @client.train()
    def train(msg: Message, context: Context):
        torch.set_num_threads(cfg["threads"])   # Ray sets OMP_NUM_THREADS=1 in its workers
        pid = int(context.node_config["partition-id"])
        train_fn = train_fn_for(pid, int(msg.content["config"]["server-round"]))
        model = client_model()
        if spec == "flower-fedavg":
            model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
            n = train_fn(model)
            return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                       "metrics": MetricRecord({"num-examples": n})}), reply_to=msg)
        return client_update(msg, context, model, train_fn)

    return client


def _array_bytes(msg: Message) -> int:
    return sum(rec.count_bytes() for rec in msg.content.array_records.values())


class CountingGrid(Grid):
    """Wraps the ServerApp's grid: every message sent and every reply received adds its
    ``ArrayRecord.count_bytes()`` (``down_messages`` / ``up_messages``, in order); error replies
    count as ``failures``. Everything else is the wrapped grid's."""

    def __init__(self, inner: Grid):
        self.inner = inner
        self.down_messages: List[int] = []
        self.up_messages: List[int] = []
        self.failures = 0

    def _sent(self, messages: List[Message]) -> None:
        self.down_messages.extend(_array_bytes(m) for m in messages)

    def _received(self, replies: List[Message]) -> None:
        for r in replies:
            if r.has_content():
                self.up_messages.append(_array_bytes(r))
            else:
                self.failures += 1

    def set_run(self, run) -> None:
        self.inner.set_run(run)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._sent(messages)
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.inner.pull_messages(message_ids))
        self._received(replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> Iterable[Message]:
        messages = list(messages)
        self._sent(messages)   # the wrapped grid's own push/pull are not these: no double count
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        self._received(replies)
        return replies


def run_engine(engine: str, server: ServerApp, client: ClientApp, num_nodes: int):
    """Runs the apps on ``engine``; returns the InProcessGrid (in-process) or None."""
    if engine == "inprocess":
        return run_in_process(server, client, num_nodes)
    from flwr.simulation import run_simulation

    here = os.path.dirname(os.path.abspath(__file__))
    # Ray's workers import this module by name (the ClientApp's functions travel by reference)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [here, os.environ.get("PYTHONPATH", "")] if p)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    run_simulation(server_app=server, client_app=client, num_supernodes=num_nodes,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 1, "num_gpus": 0, "include_dashboard": False}})
    return None


def run(spec: str, args, seed: int) -> dict:
    cfg = data_config(args, seed)
    _, (xte, yte), _ = task_data(cfg)
    torch.manual_seed(seed)
    init = Net()
    model = Net()
    history = []
    holder = {}
    client = make_client_app(spec, cfg)
    server = ServerApp()

    @server.main()
    def main(grid, context):
        grid = holder["grid"] = CountingGrid(grid)

        def evaluate(rnd, arrays):
            if spec == "flower-fedavg":
                model.load_state_dict(arrays.to_torch_state_dict())
            else:
                with torch.no_grad():
                    params = dict(model.named_parameters())
                    for n, t in arrays.to_torch_state_dict().items():
                        params[n].copy_(t)
            acc = accuracy(model, xte, yte)
            history.append(acc)
            return MetricRecord({"accuracy": acc})

        kw = dict(fraction_train=args.fraction, min_train_nodes=2, min_available_nodes=args.nodes)
        if spec == "flower-fedavg":
            strategy = FedAvg(fraction_evaluate=0.0, **kw)
            arrays = ArrayRecord(init.state_dict())
        else:
            strategy = SparseLoRA(**kw) if spec == "default" else SparseLoRA(spec, **kw)
            arrays = initial_arrays(init)
        holder["strategy"] = strategy
        strategy.start(grid=grid, initial_arrays=arrays, num_rounds=args.rounds, evaluate_fn=evaluate)

    t0 = time.perf_counter()
    in_process = run_engine(args.engine, server, client, args.nodes)
    seconds = round(time.perf_counter() - t0, 1)
    counted = holder["grid"]
    if in_process is not None:   # the wrapper counts what the InProcessGrid recorded
        assert counted.down_messages == [_array_bytes(m) for m in in_process.sent]
        assert counted.up_messages == [_array_bytes(r) for r in in_process.received if r.has_content()]
    if counted.failures:
        raise RuntimeError(f"{spec}: {counted.failures} error replies from the ClientApp on {args.engine}")
    if len(history) != args.rounds + 1:   # round 0 and every round, from the ServerApp
        raise RuntimeError(f"{spec}: {len(history)} evaluations came back, expected {args.rounds + 1}")
    strategy = holder["strategy"]
    label = spec if spec == "flower-fedavg" else strategy.fl_strategy.label
    down, up = sum(counted.down_messages), sum(counted.up_messages)
    return {"spec": spec, "label": label, "engine": args.engine, "seed": seed, "final_accuracy": history[-1],
            "best_accuracy": max(history), "accuracy": history, "down_bytes": down, "up_bytes": up,
            "bytes": down + up, "messages": len(counted.down_messages), "failures": counted.failures,
            "down_messages": counted.down_messages, "up_messages": counted.up_messages, "seconds": seconds}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--strategies", nargs="+",
                   default=["flower-fedavg", "default", "flasc", "ef-topk:mode=dense",
                            "ef-topk:up=1/16,down=1/16,values=int8,down_values=int8"])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--nodes", type=int, default=10)
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--train-samples", type=int, default=6000)
    p.add_argument("--test-samples", type=int, default=2000)
    p.add_argument("--noise", type=float, default=2.5)
    p.add_argument("--dirichlet-alpha", type=float, default=0.0, help="0 = IID (the template's split)")
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.001)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--engine", choices=["inprocess", "simulation"], default="inprocess",
                   help="inprocess: fastlora.flower.run_in_process; simulation: flwr.simulation.run_simulation (Ray)")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import logging
    logging.getLogger("flwr").setLevel(logging.WARNING)
    results = []
    for seed in args.seeds:
        for spec in args.strategies:
            r = run(spec, args, seed)
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k not in ("accuracy", "down_messages", "up_messages")}),
                  flush=True)
    print(f"\nengine: {args.engine}")
    print("| strategy | final accuracy (mean of seeds) | bytes (both ways) | fewer bytes than FedAvg |")
    print("|---|---|---|---|")
    base = [r for r in results if r["spec"] == "flower-fedavg"]
    base_bytes = sum(r["bytes"] for r in base) / len(base) if base else math.nan
    for spec in args.strategies:
        rs = [r for r in results if r["spec"] == spec]
        acc = sum(r["final_accuracy"] for r in rs) / len(rs)
        b = sum(r["bytes"] for r in rs) / len(rs)
        per_seed = ", ".join(f"{100 * r['final_accuracy']:.1f}" for r in rs)
        print(f"| {rs[0]['label']} | {100 * acc:.1f}% ({per_seed}) | {b:,.0f} | {base_bytes / b:.1f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    # Run as the module ``flower_cnn_experiment``, not ``__main__``: Ray's workers then import the
    # ClientApp's functions by name (and keep this module's data cache) instead of unpickling copies
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import flower_cnn_experiment

    sys.exit(flower_cnn_experiment.main())
