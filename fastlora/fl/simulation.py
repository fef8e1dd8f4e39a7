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
from fastlora.fl.data import split_lines
from fastlora.fl.model import (base_summary, build_classifier, build_hf_model, evaluate, evaluate_lm, get_adapter, hf_task_type,
                               load_hf_config, load_minilm, local_train, set_adapter, tiny_encoder)
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
    """Data, clients and the model, prepared once and shared by every strategy of a run.

    ``labels``: ``(N,)`` classes, or ``(N, L)`` a causal LM's target tokens (-100: none).
    ``split_info``: what :func:`prepare` decided, as saved in ``split.json`` (the split, each
    client's size and label skew, the label mapping, notes on what was dropped)."""
    config: FLConfig
    model: torch.nn.Module
    initial_adapter: Dict[str, torch.Tensor]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    client_indices: List[torch.Tensor]
    eval_indices: torch.Tensor
    label_names: List[str]
    task_type: str = "classify"           # classify | causal-lm
    split_info: Optional[dict] = None
    data_fingerprint: Optional[str] = None  # SHA-256 of the data files (a checkpoint's identity)

    @property
    def client_sizes(self) -> List[int]:
        return [int(i.numel()) for i in self.client_indices]

    @property
    def num_samples(self) -> int:
        return int(self.input_ids.shape[0])


def prepare(config: FLConfig) -> Experiment:
    """Loads the data (a built-in task, or your own: ``config.data``), splits it across clients
    (``config.split``) and builds the model (minilm / tiny, or a Hugging Face model folder with
    LoRA). What had to give (clients dropped, samples that do not fit, the number of clients a
    column split gives) is in ``exp.split_info["notes"]``."""
    from fastlora.fl import data

    if config.threads:
        torch.set_num_threads(config.threads)
    notes: List[str] = []
    task_type, source, model_info = "classify", None, None
    if not config.builtin_model:
        # the model's config says what it is: read before the data, whose columns must fit it
        source, hf_config = load_hf_config(config.model)
        task_type = hf_task_type(hf_config, config)
        if config.data is None and task_type != "classify":
            raise ValueError("a causal LM trains on your data: set data (--data FILE_OR_DIR); the stdlib and "
                             "synthetic tasks are classification tasks")
    rows = _custom_rows(config, task_type) if config.data is not None else None
    if rows is not None:
        label_names = rows["label_names"]
    elif config.task == "stdlib":
        ds = data.stdlib_docstrings(max_per_class=config.max_per_class, seed=config.seed)
        label_names = list(ds.label_names)
    else:
        label_names = [f"class{i}" for i in range(config.num_classes)]
    num_labels = len(label_names)

    if config.model == "minilm":
        encoder, tokenizer = load_minilm()
        model_config = encoder.config
    elif config.model == "tiny":
        encoder, tokenizer = tiny_encoder(seed=config.seed), None
        model_config = encoder.config
    else:
        hf_model, tokenizer, model_info = build_hf_model(config, source, task_type, label_names or None)
        model_config = hf_model.model.config

    n_train = None            # with evaluation rows of their own: the first n_train samples train
    groups = None             # column split: the client value of each training row
    if rows is None and config.task == "stdlib":
        if tokenizer is None:
            raise ValueError("the stdlib task needs a pretrained tokenizer: use --model minilm")
        tokens = data.TokenData.from_texts(ds, tokenizer, config.max_length)
        input_ids, mask, labels = tokens.input_ids, tokens.attention_mask, tokens.labels
    elif rows is None:
        tokens = data.synthetic_token_task(
            config.num_samples, num_labels, vocab_size=model_config.vocab_size,
            seq_len=min(config.max_length, getattr(model_config, "max_position_embeddings", config.max_length)),
            seed=config.seed)
        input_ids, mask, labels = tokens.input_ids, tokens.attention_mask, tokens.labels
        if tokenizer is not None and tokenizer.pad_token_id not in (None, 0):
            # the task pads with id 0; a classifier that pools the last token finds it by the pad id
            input_ids = input_ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    else:
        max_length = config.max_length
        limits = [getattr(model_config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
        limits = [v for v in limits if isinstance(v, int) and 0 < v < 10 ** 6]   # tokenizers say 1e30 for "none"
        if limits and max_length > min(limits):
            max_length = min(limits)   # longer rows would index past the model's position embeddings
            notes.append(f"max_length={config.max_length} is more than the model takes: samples are cut at "
                         f"{max_length} tokens")
        input_ids, mask, labels, n_train, groups = _custom_tokens(rows, tokenizer, max_length, task_type, notes)

    if n_train is not None:
        train_idx, test_idx = torch.arange(n_train), torch.arange(n_train, input_ids.shape[0])
    else:
        # held out per client for a column split (each client keeps part of its own data back),
        # per class otherwise, and at random for a causal LM
        if groups is not None:
            strata = torch.empty(input_ids.shape[0], dtype=torch.int64)
            for k, idx in enumerate(data.column_split(groups)[1]):
                strata[idx] = k
        elif task_type == "classify":
            strata = labels
        else:
            strata = torch.zeros(input_ids.shape[0], dtype=torch.int64)
        train_idx, test_idx = data.train_test_split(strata, config.test_fraction, config.seed)
        if test_idx.numel() == 0:
            raise ValueError(f"the test split is empty ({int(input_ids.shape[0])} samples, test_fraction "
                             f"{config.test_fraction:g}): use more samples or a larger test_fraction")
        if groups is not None:
            groups = [groups[i] for i in train_idx.tolist()]
    class_labels = labels[train_idx] if task_type == "classify" else None
    parts, names, split_name = _split_clients(config, int(train_idx.numel()), class_labels, groups, notes)
    if len(parts) != config.num_clients:
        config = config.replace(num_clients=len(parts))
    client_indices = [train_idx[p] for p in parts]
    g = generator(config.seed, "eval-subset")
    eval_idx = test_idx[torch.randperm(test_idx.numel(), generator=g)[:config.eval_samples]].sort().values
    if config.builtin_model:
        model = build_classifier(encoder, num_labels, rank=config.rank, alpha=config.lora_alpha,
                                 dropout=config.lora_dropout, target_modules=config.target_modules, seed=config.seed,
                                 base=config.base)
    else:
        model = hf_model
    clients = data.split_summary(parts, class_labels, label_names if task_type == "classify" else None, names)
    if config.eval_file is not None:
        evaluation = f"eval_file {config.eval_file}"
    elif n_train is not None:
        evaluation = "the data's evaluation split"
    else:
        evaluation = f"held out: test_fraction {config.test_fraction:g}, seed {config.seed}"
    info = {"task_type": task_type, "split": split_name, "num_clients": len(parts), "clients": clients,
            "train_samples": int(train_idx.numel()), "eval_samples": int(eval_idx.numel()), "eval": evaluation,
            "notes": notes}
    if task_type == "classify":
        info["labels"] = list(rows["label_values"]) if rows is not None else list(label_names)
        if rows is not None:
            info["label_column"] = rows["label_column"]
    if model_info is not None:
        info["model"] = model_info
    info["base"] = base_summary(model, config.base)
    fp = None
    if config.data is not None:
        from fastlora.fl.custom_data import fingerprint
        fp = fingerprint(config.data) + ("" if config.eval_file is None else ":" + fingerprint(config.eval_file))
    return Experiment(config, model, get_adapter(model), input_ids, mask, labels, client_indices, eval_idx,
                      label_names, task_type, info, fp)


def _custom_rows(config: FLConfig, task_type: str) -> dict:
    """Reads your data and checks its columns (before the model loads: errors come fast). For
    classification, maps the labels to ids (sorted values)."""
    from fastlora.fl import custom_data as cd

    train, folder_eval = cd.read_table(config.data)
    ev = folder_eval
    if config.eval_file is not None:
        main, split = cd.read_table(config.eval_file)
        ev = split or main
    out = {"train": train, "eval": ev, "label_names": [], "label_values": [], "label_column": None}

    def flag(name, default):
        return name if getattr(config, name) is not None else f"{name}, default {default!r}"

    tables = [t for t in (train, ev) if t is not None]
    if task_type == "classify":
        text, label = config.text_column or "text", config.label_column or "label"
        out["texts"] = [t.texts(text, flag("text_column", "text")) for t in tables]
        ids, eval_ids, classes = cd.map_labels(train, label, flag("label_column", "label"), ev)
        out["ids"] = [ids] + ([eval_ids] if ev is not None else [])
        out["label_values"], out["label_column"] = classes, label
        out["label_names"] = [str(v) for v in classes]
    elif config.prompt_column is not None:
        out["prompts"] = [t.texts(config.prompt_column, "prompt_column") for t in tables]
        out["responses"] = [t.texts(config.response_column, "response_column") for t in tables]
    else:
        out["texts"] = [t.texts(config.text_column or "text", flag("text_column", "text")) for t in tables]
    column = config.split_column
    out["groups"] = None
    if column is not None:
        values = list(train.column(column, f"split column:{column}"))
        missing = [i for i, v in enumerate(values) if v is None or v == ""]
        if missing:
            raise ValueError(f"data: column {column!r} (split column:{column}) of {train.source} has no value in "
                             f"{len(missing)} row(s) (first: row {missing[0]}); every row needs a client")
        out["groups"] = values
    return out


def _custom_tokens(rows: dict, tokenizer, max_length: int, task_type: str, notes: List[str]):
    """``(input_ids, attention_mask, labels, n_train or None, column values of the training
    rows or None)``: training rows first, then the evaluation rows if the data has its own."""
    from fastlora.fl import custom_data as cd
    from fastlora.fl import data

    has_eval = rows["eval"] is not None
    groups = rows["groups"]
    if task_type == "classify":
        texts = [t for part in rows["texts"] for t in part]
        ids, mask = data.tokenize(texts, tokenizer, max_length)
        labels = torch.cat(rows["ids"])
        n_train = len(rows["texts"][0])
    else:
        if "prompts" in rows:
            kw = {"prompts": [t for p in rows["prompts"] for t in p],
                  "responses": [t for p in rows["responses"] for t in p]}
            sizes = [len(p) for p in rows["prompts"]]
        else:
            kw = {"texts": [t for p in rows["texts"] for t in p]}
            sizes = [len(p) for p in rows["texts"]]
        ids, mask, labels, kept = cd.causal_lm_tokens(tokenizer, max_length, **kw)
        kept_train = kept[:sizes[0]]
        n_train = int(kept_train.sum())
        lost = [sizes[0] - n_train] + ([sizes[1] - int(kept[sizes[0]:].sum())] if has_eval else [])
        for what, n_lost, n in zip(("training", "evaluation"), lost, sizes):
            if n_lost == n:
                raise ValueError(f"no {what} sample has a target token within max_length={max_length} "
                                 "(a prompt that fills it, or an empty text): raise max_length")
            if n_lost:
                notes.append(f"{n_lost} of {n} {what} samples have no target token within max_length="
                             f"{max_length} (a prompt that fills it, or an empty text) and are left out")
        if groups is not None:
            groups = [v for v, k in zip(groups, kept_train.tolist()) if k]
    return ids, mask, labels, (n_train if has_eval else None), groups


def _split_clients(config: FLConfig, n: int, labels: Optional[torch.Tensor], groups: Optional[list],
                   notes: List[str]):
    """``(parts, client values or None, split name)``: the clients' indices into the ``n``
    training rows, those below ``min_client_size`` dropped (with a note)."""
    from fastlora.fl import data

    kind, names = config.split, None
    if kind == "auto":
        kind = "dirichlet" if labels is not None else "iid"
    if kind == "dirichlet":
        if labels is None:
            raise ValueError("split dirichlet skews the labels across clients, and a causal LM has none: use "
                             "split iid or column:NAME")
        parts = data.dirichlet_split(labels, config.num_clients, config.dirichlet_alpha, config.seed)
        kind = f"dirichlet:{config.dirichlet_alpha:g}"
    elif kind == "iid":
        parts = data.iid_split(n, config.num_clients, config.seed)
    else:
        names, parts = data.column_split(groups)
        if len(names) != config.num_clients:
            notes.append(f"split {kind} gives {len(names)} clients (one per value); num_clients="
                         f"{config.num_clients} is not used")
    small = [c for c, p in enumerate(parts) if p.numel() < config.min_client_size]
    if len(small) == len(parts):
        raise ValueError(f"no client has min_client_size={config.min_client_size} training samples or more "
                         f"(sizes {sorted(int(p.numel()) for p in parts)}); lower min_client_size")
    if small:
        who = [f"{names[c] if names is not None else c} ({int(parts[c].numel())})" for c in small]
        notes.append(f"{len(small)} client(s) with fewer than min_client_size={config.min_client_size} training "
                     f"samples dropped: {', '.join(who[:10])}{' ...' if len(who) > 10 else ''}")
        parts = [p for c, p in enumerate(parts) if c not in small]
        names = [v for c, v in enumerate(names) if c not in small] if names is not None else None
    return parts, names, kind


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
    identity = {"config": cfg.identity(), "strategy": strategy.to_dict()}
    if exp.data_fingerprint is not None:
        identity["data"] = exp.data_fingerprint   # the same file names with other contents: another run
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
    lm = exp.task_type == "causal-lm"   # metric: loss and perplexity on the eval set, not accuracy
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

        accuracy = loss = perplexity = None
        if rnd % cfg.eval_every == 0 or rnd == cfg.rounds:
            set_adapter(model, server.global_adapter)
            e = exp.eval_indices
            if lm:
                loss = evaluate_lm(model, exp.input_ids[e], exp.attention_mask[e], exp.labels[e])
                perplexity = math.exp(loss) if loss < 700 else math.inf   # exp overflows above ~709
            else:
                accuracy, loss = evaluate(model, exp.input_ids[e], exp.attention_mask[e], exp.labels[e])
        cum += up_bytes + down_bytes
        rec = {"run": label, "strategy": strategy.name, "round": rnd, "accuracy": accuracy, "loss": loss,
               **({"perplexity": perplexity} if lm else {}),
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
            if perplexity is not None:
                post["ppl"] = f"{perplexity:.3g}"
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
    per strategy with its checkpoint, ``split.json`` (the clients, their sizes and label skew,
    the label mapping: :attr:`Experiment.split_info`), then ``metrics.csv``, ``metrics.json``
    and ``accuracy_vs_bytes.png`` (a causal LM: ``perplexity_vs_bytes.png``). Returns
    ``{"records", "summaries", "table", "time_table", "files", "split"}``; the results table
    compares every run with the dense fedavg run, if any."""
    from fastlora.fl import report

    strategies = [parse_strategy(s) for s in config.strategies]
    labels = [s.label for s in strategies]
    if len(set(labels)) != len(labels):
        raise ValueError(f"config: the same strategy appears twice in {config.strategies}")
    t0 = time.perf_counter()
    exp = prepare(config)
    if config.data is None:
        what = f"{len(exp.label_names)} classes ({config.task})"
    else:
        what = (f"{len(exp.label_names)} classes" if exp.task_type == "classify" else "causal LM") + f" ({config.data})"
    log(f"# {len(exp.client_indices)} clients, {exp.num_samples} samples, {what}, model {config.model}, adapter "
        f"{sum(t.numel() for t in exp.initial_adapter.values())} parameters; prepared in "
        f"{time.perf_counter() - t0:.1f} s")
    split = exp.split_info
    base = split.get("base")
    if base and base["linear_weight_bytes_fp32"]:
        log(f"# base {base['format']}: each client holds {base['linear_weight_bytes'] / 2 ** 20:.2f} MiB of frozen "
            f"linear weights ({base['linear_weight_bytes_fp32'] / 2 ** 20:.2f} MiB in float32)")
    for note in split["notes"]:
        log(f"# note: {note}")
    lines = split_lines(split["clients"], column=exp.config.split_column)
    log(f"# split {split['split']}: {lines[0]}; evaluation: {split['eval_samples']} samples ({split['eval']})")
    for line in lines[1:]:
        log(f"# {line}")
    split_file = None
    if out_dir is not None:
        split_file = report.write_json(split, Path(out_dir) / "split.json")
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
    metric = "perplexity" if exp.task_type == "causal-lm" else "accuracy"
    result = {"records": records, "summaries": summaries, "table": report.results_table(summaries, metric=metric),
              "time_table": report.time_split_table(records), "files": {}, "split": exp.split_info}
    if out_dir is not None:
        result["files"] = dict(report.write_metrics(records, out_dir, summaries))
        result["files"]["split"] = split_file
        task = config.task if config.data is None else Path(config.data).name
        png = report.plot_accuracy_vs_bytes(records, Path(out_dir) / f"{metric}_vs_bytes.png", metric=metric,
                                            title=f"{Path(config.model).name} on {task}: {metric} vs bytes")
        if png is not None:
            result["files"]["plot"] = png
    return result
