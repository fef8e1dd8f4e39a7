"""Time split of a federated round on the demo's setup (all-MiniLM-L6-v2, LoRA r=8 on query/value,
batch 16 x 32 tokens, 4 local steps, 8 clients): local training of one client vs the
communication machinery (client: sparsify with error feedback + encode; server: decode all
uploads + sparse aggregation + the server update, and the download's top-k + encode).

    .venv/bin/python -m pytest benchmarks/test_bench_fl.py -s --benchmark-columns=median,iqr,rounds

The issue's target: the machinery costs < 5% of a round. Measured as medians in the same run;
asserted.
"""
import pytest
import torch

from fastlora import new_residual
from fastlora.bench import interleaved_medians
from fastlora.fl import data, parse_strategy
from fastlora.fl.client import ClientState, upload
from fastlora.fl.model import build_classifier, get_adapter, load_minilm, local_train, set_adapter
from fastlora.fl.server import Server

CLIENTS, STEPS, BATCH, SEQ, RANK = 8, 4, 16, 32, 8
MAX_COMM_SHARE = 0.05


class Round:
    def __init__(self):
        encoder, tok = load_minilm()
        ds = data.stdlib_docstrings(max_per_class=40)
        tokens = data.TokenData.from_texts(ds, tok, SEQ)
        self.ids, self.mask, self.labels = tokens.input_ids, tokens.attention_mask, tokens.labels
        self.model = build_classifier(encoder, ds.num_classes, rank=RANK)
        self.initial = get_adapter(self.model)
        self.strategy = parse_strategy("ef-topk:up=1/16,down=1/4")
        self.server = Server(self.strategy, self.initial, [len(self.labels)] * CLIENTS)
        self.state = ClientState(0, len(self.labels), RANK, residual=new_residual(self.initial))
        set_adapter(self.model, self.initial)
        local_train(self.model, self.ids, self.mask, self.labels, steps=2, batch_size=BATCH, lr=1e-3)
        self.local = get_adapter(self.model)
        self.payloads = {c: self.client_comm() for c in range(CLIENTS)}
        self.held = {c: -1 for c in range(CLIENTS)}

    def client_train(self):
        set_adapter(self.model, self.initial)
        return local_train(self.model, self.ids, self.mask, self.labels, steps=STEPS, batch_size=BATCH, lr=1e-3,
                           generator=torch.Generator().manual_seed(0))

    def client_comm(self):
        return upload(self.local, self.initial, self.server.layout, self.strategy, self.state)

    def server_comm(self):
        self.server.aggregate(self.payloads)
        return self.server.downloads(2, list(range(CLIENTS)), {c: 1 for c in range(CLIENTS)})


@pytest.fixture(scope="module")
def rnd():
    return Round()


@pytest.mark.parametrize("part", ["client_train", "client_comm", "server_comm"])
def test_time(benchmark, rnd, part):
    benchmark.group = f"fl round parts: MiniLM r{RANK}, {CLIENTS} clients x {STEPS} steps of {BATCH}x{SEQ}"
    benchmark.pedantic(getattr(rnd, part), rounds=5, warmup_rounds=1, iterations=1)


def test_comm_share_target(rnd, benchmark, record_property):
    t = interleaved_medians({p: getattr(rnd, p) for p in ("client_train", "client_comm", "server_comm")},
                            min_rounds=5, max_rounds=10, budget_s=20.0, warmup=1)
    round_train = CLIENTS * t["client_train"]
    round_comm = CLIENTS * t["client_comm"] + t["server_comm"]
    share = round_comm / (round_train + round_comm)
    info = {"client_train_ms": round(t["client_train"] * 1e3, 1), "client_comm_ms": round(t["client_comm"] * 1e3, 2),
            "server_comm_ms": round(t["server_comm"] * 1e3, 2), "comm_share": round(share, 4),
            "threads": torch.get_num_threads()}
    for k, v in info.items():
        record_property(k, v)
    benchmark.extra_info.update(info)
    benchmark.group = "fl targets"
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(f"\nfl round time split: {info}")
    assert share < MAX_COMM_SHARE, info
