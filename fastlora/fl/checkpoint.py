"""Run checkpoints: one safetensors file per run, tensors as tensors and the rest as JSON in
the file's metadata, with a SHA-256 digest of every tensor and of the metadata (safetensors has
no checksum: a flipped bit would otherwise resume silently into another run). No pickle
anywhere, and the file is replaced atomically (written, synced, renamed), so a run killed while
saving keeps its previous checkpoint."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Tuple

import torch

FORMAT = "fastlora.fl.checkpoint/2"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (unreadable, another format, another configuration,
    corrupted: a tensor or the metadata that does not match its digest)."""


def _tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (safetensors itself has no checksum)."""
    h = hashlib.sha256()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def save(path: Path, tensors: Dict[str, torch.Tensor], meta: dict) -> None:
    """Writes ``tensors`` and the JSON-able ``meta`` with a digest of each, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # safetensors refuses tensors that share memory or are non-contiguous: store copies
    contiguous = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    meta_text = json.dumps(meta, sort_keys=True)
    digests = json.dumps({"tensors": {k: _tensor_digest(v) for k, v in contiguous.items()},
                          "meta": _text_digest(meta_text)}, sort_keys=True)
    save_file(contiguous, str(tmp), metadata={"format": FORMAT, "meta": meta_text, "digests": digests})
    with open(tmp, "rb+") as f:  # on disk before the rename makes it the checkpoint
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path) -> Tuple[Dict[str, torch.Tensor], dict]:
    """``(tensors, meta)`` of a checkpoint written by :func:`save`, every tensor and the
    metadata checked against their digests; any mismatch raises :class:`CheckpointError`
    naming what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fastlora federated checkpoint of this version (format "
                              f"{header.get('format')!r}, expected {FORMAT!r}); start the run over in another folder")
    try:
        digests = json.loads(header["digests"])
        expected = dict(digests["tensors"])
        meta_text = header["meta"]
        meta = json.loads(meta_text)
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: corrupt checkpoint metadata ({type(e).__name__}: {e})") from None
    if _text_digest(meta_text) != digests.get("meta"):
        raise CheckpointError(f"{path}: the metadata does not match its digest (edited or corrupted)")
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{path}: tensors missing {missing[:3]} / unexpected {extra[:3]}")
    for name, t in tensors.items():
        if _tensor_digest(t) != expected[name]:
            raise CheckpointError(f"{path}: tensor {name!r} does not match its digest (corrupted)")
    return tensors, meta
