"""Run checkpoints: one safetensors file per run, tensors as tensors and the rest as JSON in
the file's metadata. No pickle anywhere, and the file is replaced atomically, so a run killed
while saving keeps its previous checkpoint."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Tuple

import torch

FORMAT = "fastlora.fl.checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (unreadable, another format, another configuration)."""


def save(path: Path, tensors: Dict[str, torch.Tensor], meta: dict) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # safetensors refuses tensors that share memory or are non-contiguous: store copies
    contiguous = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    save_file(contiguous, str(tmp), metadata={"format": FORMAT, "meta": json.dumps(meta, sort_keys=True)})
    os.replace(tmp, path)


def load(path: Path) -> Tuple[Dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fastlora federated checkpoint (format {header.get('format')!r}, "
                              f"expected {FORMAT!r})")
    try:
        meta = json.loads(header["meta"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt checkpoint metadata ({e})") from None
    return tensors, meta
