"""The federated loop on one machine: clients train in turn on one shared model, every byte
that would cross the network is a real ``fastlora.codec`` payload and is counted.

Reproducibility: every random choice is a function of ``(seed, what, round, client)`` (client
selection, failures, minibatch order, dropout), so a run resumed from its checkpoint after
round t does exactly what the uninterrupted run did in rounds t+1.. and ends bitwise equal.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from fastlora.ops.sparsify import new_residual
from fastlora.fl import checkpoint
from fastlora.fl.client import ClientState, decode_dense, sparsify_encode, upload
from fastlora.fl.config import FLConfig
from fastlora.fl.model import (build_classifier, evaluate, get_adapter, load_minilm, local_train, set_adapter,
                               tiny_encoder)
from fastlora.fl.server import Server, pad_rank, truncate_rank
from fastlora.fl.strategies import Strategy, parse_strategy
from fastlora.fl.view import apply_download


class TrainingDiverged(ValueError):
    """Local training produced a non-finite loss or adapter (learning rate too high)."""


def derive_seed(seed: int, *parts) -> int:
    """A 63-bit seed from ``seed`` and labels (stable across runs, platforms and Python's hash
    randomisation)."""
    h = hashlib.blake2b(repr((int(seed),) + tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def generator(seed: int, *parts) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *parts))


@dataclass
class Experiment:
    """Data, clients and the model, prepared once and shared by every strategy of a run."""
    config: FLConfig
    model: torch.nn.Module
    initial_adapter: Dict[str, torch.Tensor]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    client_indices: List[torch.Tensor]
    eval_indices: torch.Tensor
    label_names: List[str]

    @property
    def client_sizes(self) -> List[int]:
        return [int(i.numel()) for i in self.client_indices]


def prepare(config: FLConfig) -> Experiment:
    """Loads (or synthesises) the data, splits it non-IID across clients and builds the model."""
    from fastlora.fl import data

    if config.threads:
        torch.set_num_threads(config.threads)
    if config.task == "stdlib":
        ds = data.stdlib_docstrings(max_per_class=config.max_per_class, seed=config.seed)
        label_names = list(ds.label_names)
        num_labels = len(label_names)
    else:
        num_labels = config.num_classes
        label_names = [f"class{i}" for i in range(num_labels)]
    if config.model == "minilm":
        encoder, tokenizer = load_minilm()
    else:
        encoder, tokenizer = tiny_encoder(seed=config.seed), None
    if config.task == "stdlib":
        if tokenizer is None:
            raise ValueError("the stdlib task needs a pretrained tokenizer: use --model minilm")
        tokens = data.TokenData.from_texts(ds, tokenizer, config.max_length)
    else:
        vocab = encoder.config.vocab_size
        tokens = data.synthetic_token_task(config.num_samples, num_labels, vocab_size=vocab,
                                           seq_len=min(config.max_length, encoder.config.max_position_embeddings),
                                           seed=config.seed)
    train_idx, test_idx = data.train_test_split(tokens.labels, config.test_fraction, config.seed)
    if test_idx.numel() == 0:
        raise ValueError(f"the test split is empty ({int(tokens.labels.numel())} samples, test_fraction "
                         f"{config.test_fraction:g}): use more samples or a larger test_fraction")
    parts = data.dirichlet_split(tokens.labels[train_idx], config.num_clients, config.dirichlet_alpha, config.seed)
    client_indices = [train_idx[p] for p in parts]
    g = generator(config.seed, "eval-subset")
    eval_idx = test_idx[torch.randperm(test_idx.numel(), generator=g)[:config.eval_samples]].sort().values
    model = build_classifier(encoder, num_labels, rank=config.rank, alpha=config.lora_alpha,
                             dropout=config.lora_dropout, target_modules=config.target_modules, seed=config.seed)
    return Experiment(config, model, get_adapter(model), tokens.input_ids, tokens.attention_mask, tokens.labels,
                      client_indices, eval_idx, label_names)


def run_strategy(exp: Experiment, strategy: Strategy, run_dir: Optional[Path] = None, *, resume: bool = False,
                 progress: bool = True, stop_after: Optional[int] = None,
                 on_round: Optional[Callable[[dict], None]] = None,
                 until: Optional[Callable[[dict], bool]] = None) -> dict:
    """Runs one strategy for ``config.rounds`` rounds (or until round ``stop_after``, to test
    resuming, or through the first round whose record satisfies ``until``, e.g. an accuracy
    target; a resumed run whose records already satisfy it runs nothing). With ``run_dir`` a
    checkpoint is written after every round (``run_dir/checkpoint.safetensors``) and
    ``resume=True`` continues from it.

    Returns ``{"records": [...], "adapter": final global adapter, "server": Server,
    "clients": [ClientState]}``; a record per round (see :mod:`fastlora.fl.report`)."""
    cfg = exp.config
    model = exp.model
    ranks = cfg.ranks() if strategy.exact else None
    server = Server(strategy, exp.initial_adapter, exp.client_sizes, ranks,
                    initial_seed=cfg.seed if cfg.initial == "seed" else None)
    layout = server.layout
    clients = [ClientState(c, n, (ranks[c] if ranks else server.rank)) for c, n in enumerate(exp.client_sizes)]
    if strategy.error_feedback:
        for st in clients:
            st.residual = new_residual(exp.initial_adapter)
    records: List[dict] = []
    label = strategy.label
    start = 1
    ckpt = Path(run_dir) / "checkpoint.safetensors" if run_dir is not None else None
    # what determines this run's results (not: which other strategies run, thread count)
    identity = {"config": {k: v for k, v in cfg.to_dict().items() if k not in ("strategies", "threads")},
                "strategy": strategy.to_dict()}
    if resume and ckpt is not None and ckpt.exists():
        tensors, meta = checkpoint.load(ckpt)
        if meta.get("identity") != identity:
            raise checkpoint.CheckpointError(
                f"{ckpt} was written by a different configuration or strategy; use another output folder "
                "or run without --resume to start over")
        server.load_state(tensors, meta["server"])
        for st in clients:
            cm = meta["clients"][st.cid]
            st.held_version = int(cm["held_version"])
            if strategy.error_feedback:
                st.residual = {n: tensors[f"client.{st.cid}.residual.{n}"].clone() for n in layout.names}
            if cm["has_held"]:
                st.held = {n: tensors[f"client.{st.cid}.held.{n}"].clone() for n in layout.names}
        records = list(meta["records"])
        start = int(meta["round"]) + 1

    numel = layout.numel
    last = cfg.rounds if stop_after is None else min(stop_after, cfg.rounds)
    if until is not None and any(until(r) for r in records):
        last = start - 1
    bar = None
    if progress and start <= last:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.rounds, initial=start - 1, desc=label, unit="round", leave=True, dynamic_ncols=True)
    cum = records[-1]["cum_bytes"] if records else 0
    for rnd in range(start, last + 1):
        g = generator(cfg.seed, "select", rnd)
        m = max(1, round(cfg.participation * cfg.num_clients))
        selected = sorted(torch.randperm(cfg.num_clients, generator=g)[:m].tolist())
        n_fail = int(round(cfg.client_dropout * m))
        failing = set(selected[i] for i in torch.randperm(m, generator=g)[:n_fail].tolist())
        t_train = t_comm = t_agg = 0.0

        t0 = time.perf_counter()
        downloads = server.downloads(rnd, selected, {st.cid: st.held_version for st in clients})
        t_comm += time.perf_counter() - t0
        down_bytes = sum(len(p) for c in selected for p in downloads[c][1])
        uploads: Dict[int, bytes] = {}
        train_losses = []
        for c in selected:
            st = clients[c]
            kind, payloads = downloads[c]
            payload = payloads[0] if len(payloads) == 1 else None
            t0 = time.perf_counter()
            client_layout = server.layout_for_rank(st.rank) if strategy.exact else layout
            if kind == "seed":
                if int.from_bytes(payload, "little") != cfg.seed:
                    raise RuntimeError("round-1 seed message does not carry this run's seed")
                # exp.initial_adapter is what build_classifier(..., seed=cfg.seed) gives: the
                # same bits on every client (tests/test_fl.py checks it), so use it directly.
                start_adapter = {n: t.clone() for n, t in exp.initial_adapter.items()}
                if strategy.exact:
                    start_adapter = truncate_rank(start_adapter, st.rank, server.pairs)
                elif strategy.down == "diff":
                    st.held = {n: t.clone() for n, t in start_adapter.items()}
            elif kind in ("diff", "resync"):
                st.held = apply_download(st.held, kind, payloads, layout)
                start_adapter = {n: t.clone() for n, t in st.held.items()}
            else:
                start_adapter = decode_dense(payload, client_layout)
            if st.held is not None:  # diff download: every kind above updated what it holds
                st.held_version = rnd
            t_comm += time.perf_counter() - t0
            if c in failing:
                continue  # it received the download, then dropped out mid-round: nothing arrives
            if strategy.exact:
                start_adapter = pad_rank(start_adapter, exp.initial_adapter, server.pairs)
            t0 = time.perf_counter()
            set_adapter(model, start_adapter)
            idx = exp.client_indices[c]
            torch.manual_seed(derive_seed(cfg.seed, "train", rnd, c))  # dropout inside the model
            train_losses.append(local_train(model, exp.input_ids[idx], exp.attention_mask[idx], exp.labels[idx],
                                            steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr,
                                            optimizer=cfg.local_optimizer,
                                            generator=generator(cfg.seed, "batches", rnd, c)))
            local = get_adapter(model)
            if not (math.isfinite(train_losses[-1]) and all(bool(torch.isfinite(t).all()) for t in local.values())):
                # Stop before this round's checkpoint: the last one written holds the last good round.
                raise TrainingDiverged(
                    f"{strategy.label}: client {c}'s local training went non-finite in round {rnd} (mean loss "
                    f"{train_losses[-1]:.3g}); lower the learning rate (lr={cfg.lr:g}). The checkpoint of the last "
                    "completed round is kept.")
            t_train += time.perf_counter() - t0
            t0 = time.perf_counter()
            if strategy.exact:
                uploads[c] = _exact_upload(local, st.rank, server, strategy)
            else:
                uploads[c] = upload(local, start_adapter, layout, strategy, st)
            t_comm += time.perf_counter() - t0
        up_bytes = sum(len(p) for p in uploads.values())

        t0 = time.perf_counter()
        server.aggregate(uploads)
        t_agg += time.perf_counter() - t0

        accuracy = loss = None
        if rnd % cfg.eval_every == 0 or rnd == cfg.rounds:
            set_adapter(model, server.global_adapter)
            e = exp.eval_indices
            accuracy, loss = evaluate(model, exp.input_ids[e], exp.attention_mask[e], exp.labels[e])
        cum += up_bytes + down_bytes
        rec = {"run": label, "strategy": strategy.name, "round": rnd, "accuracy": accuracy, "loss": loss,
               "up_bytes": up_bytes, "down_bytes": down_bytes, "cum_bytes": cum,
               "dense_up_bytes": 4 * numel * len(uploads), "dense_down_bytes": 4 * numel * m,  # fp32
               "clients": m, "failed": len(failing),
               "train_loss": sum(train_losses) / len(train_losses) if train_losses else None,
               "train_s": t_train, "comm_s": t_comm, "agg_s": t_agg}
        records.append(rec)
        if ckpt is not None:
            _save(ckpt, identity, rnd, records, server, clients, strategy)
        if on_round is not None:
            on_round(rec)
        if bar is not None:
            post = {"MB": f"{cum / 1e6:.2f}"}
            if accuracy is not None:
                post["acc"] = f"{100 * accuracy:.1f}%"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
        if until is not None and until(rec):
            break
    if bar is not None:
        bar.close()
    return {"records": records, "adapter": server.global_adapter, "server": server, "clients": clients}


def _exact_upload(local, rank, server: Server, strategy: Strategy) -> bytes:
    """FlexLoRA upload: the client's LoRA factors at its own rank (and the head), dense."""
    for a, b in server.pairs.values():
        # zero-padded components get exactly zero gradients and stay zero: check, don't assume
        if local[a][rank:].count_nonzero() or local[b][:, rank:].count_nonzero():
            raise RuntimeError(f"rank-{rank} client changed LoRA components beyond its rank in {a}")
    mine = truncate_rank(local, rank, server.pairs)
    lay = server.layout_for_rank(rank)
    return sparsify_encode({n: mine[n] for n in lay.names}, lay, density=1.0, values=strategy.values)


def _save(path, identity, rnd, records, server: Server, clients: List[ClientState], strategy: Strategy):
    tensors = dict(server.state_tensors())
    cmeta = []
    for st in clients:
        if st.residual is not None:
            tensors.update({f"client.{st.cid}.residual.{n}": t for n, t in st.residual.items()})
        has_held = st.held is not None
        if has_held:
            tensors.update({f"client.{st.cid}.held.{n}": t for n, t in st.held.items()})
        cmeta.append({"held_version": st.held_version, "has_held": has_held})
    meta = {"identity": identity, "round": rnd, "records": records, "server": server.state_meta(),
            "clients": cmeta}
    checkpoint.save(path, tensors, meta)


def run_slug(strategy: Strategy) -> str:
    """A folder name for a strategy's run: ``flasc_up-1-16_down-sparse-1-4_fp16``."""
    out = []
    for ch in strategy.label.replace("=", "-").replace("/", "-").replace(" ", "_"):
        out.append(ch if ch.isalnum() or ch in "-_." else "-")
    return "".join(out)


def run(config: FLConfig, out_dir: Optional[Path] = None, *, resume: bool = False, progress: bool = True,
        log: Callable[[str], None] = print) -> dict:
    """Runs every strategy of ``config`` on one prepared experiment. With ``out_dir``: a folder
    per strategy with its checkpoint, then ``metrics.csv``, ``metrics.json`` and
    ``accuracy_vs_bytes.png``. Returns ``{"records", "summaries", "table", "time_table",
    "files"}``; the results table compares every run with the dense fedavg run, if any."""
    from fastlora.fl import report

    strategies = [parse_strategy(s) for s in config.strategies]
    labels = [s.label for s in strategies]
    if len(set(labels)) != len(labels):
        raise ValueError(f"config: the same strategy appears twice in {config.strategies}")
    t0 = time.perf_counter()
    exp = prepare(config)
    log(f"# {len(exp.client_indices)} clients, {int(exp.labels.numel())} samples, {len(exp.label_names)} classes "
        f"({config.task}), model {config.model}, adapter {sum(t.numel() for t in exp.initial_adapter.values())} "
        f"parameters; prepared in {time.perf_counter() - t0:.1f} s")
    records: List[dict] = []
    for s in strategies:
        run_dir = Path(out_dir) / run_slug(s) if out_dir is not None else None
        res = run_strategy(exp, s, run_dir, resume=resume, progress=progress)
        records.extend(res["records"])
    baseline = next((s.label for s in strategies if s.name == "fedavg" and s.up_density == 1.0
                     and s.down == "dense" and s.values == "fp32"), None)
    info = {s.label: {"strategy": s.name, "up_density": None if s.exact else s.up_density,
                      "down": s.down_label, "values": s.values} for s in strategies}
    summaries = report.summarise(records, info, baseline_run=baseline)
    result = {"records": records, "summaries": summaries, "table": report.results_table(summaries),
              "time_table": report.time_split_table(records), "files": {}}
    if out_dir is not None:
        result["files"] = dict(report.write_metrics(records, out_dir, summaries))
        png = report.plot_accuracy_vs_bytes(records, Path(out_dir) / "accuracy_vs_bytes.png",
                                            title=f"{config.model} on {config.task}: accuracy vs bytes")
        if png is not None:
            result["files"]["plot"] = png
    return result
