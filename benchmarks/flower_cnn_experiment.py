"""Accuracy and bytes of fastlora's Flower strategies against Flower's own FedAvg, on a task
shaped like Flower's PyTorch app template: a small CNN trained whole (every parameter federated),
10 nodes, half of them sampled each round, 40 rounds, 1 local epoch of Adam per round.

    .venv/bin/python benchmarks/flower_cnn_experiment.py --seeds 0 1 [--rounds 40] [--strategies ...]

The data is generated (no download): 10 classes of 28 x 28 images, each class a fixed random
smooth pattern, every sample its class pattern shifted by up to 3 pixels, scaled, plus noise,
split IID over the nodes (as the template's partitioner) or Dirichlet non-IID with
``--dirichlet-alpha``. Everything runs in one process through ``fastlora.flower.InProcessGrid``
(each message goes through Flower's protobuf serialisation); bytes are
``ArrayRecord.count_bytes()`` of every message both ways (what ``CommTracker`` counts; for FedAvg
the dense float32 ArrayRecords of ``model.state_dict()``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402
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


def run(spec: str, args, seed: int) -> dict:
    torch.manual_seed(seed)
    (xtr, ytr), (xte, yte) = make_data(args.train_samples, args.test_samples, seed, args.noise)
    parts = split(ytr, args.nodes, args.dirichlet_alpha, seed)
    torch.manual_seed(seed)
    init = Net()
    model = Net()
    history = []
    counted = {"down": 0, "up": 0}

    def train_fn_for(pid, rnd):
        def train_fn(m):
            idx = parts[pid]
            local_train(m, xtr[idx], ytr[idx], epochs=args.local_epochs, batch=args.batch, lr=args.lr,
                        seed=hash((seed, rnd, pid)) & 0xFFFFFFFF)
            return int(idx.numel())
        return train_fn

    client = ClientApp()
    if spec == "flower-fedavg":
        @client.train()
        def train(msg: Message, context: Context):
            pid = int(context.node_config["partition-id"])
            model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
            n = train_fn_for(pid, int(msg.content["config"]["server-round"]))(model)
            return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                       "metrics": MetricRecord({"num-examples": n})}), reply_to=msg)
    else:
        @client.train()
        def train(msg: Message, context: Context):
            pid = int(context.node_config["partition-id"])
            return client_update(msg, context, model, train_fn_for(pid, int(msg.content["config"]["server-round"])))

    server = ServerApp()
    holder = {}

    @server.main()
    def main(grid, context):
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
    grid = run_in_process(server, client, args.nodes)
    for m in grid.sent:
        counted["down"] += sum(r.count_bytes() for r in m.content.array_records.values())
    for r in grid.received:
        if r.has_content():
            counted["up"] += sum(rec.count_bytes() for rec in r.content.array_records.values())
    strategy = holder["strategy"]
    label = spec if spec == "flower-fedavg" else strategy.fl_strategy.label
    return {"spec": spec, "label": label, "seed": seed, "final_accuracy": history[-1],
            "best_accuracy": max(history), "accuracy": history, "down_bytes": counted["down"],
            "up_bytes": counted["up"], "bytes": counted["down"] + counted["up"],
            "seconds": round(time.perf_counter() - t0, 1)}


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
            print(json.dumps({k: v for k, v in r.items() if k != "accuracy"}), flush=True)
    print("\n| strategy | final accuracy (mean of seeds) | bytes (both ways) | fewer bytes than FedAvg |")
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
    sys.exit(main())
