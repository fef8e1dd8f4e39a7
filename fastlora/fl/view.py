"""The stateful (``diff``) download, shared by the federated loop and the Flower strategy.

The server keeps a *view*: the adapter an up-to-date client holds. Each round it moves the view
towards the global adapter by the top-k of ``global - view`` (what it leaves out stays in that
gap: the server's error feedback) and records that step's payload. A client that holds version
``v`` of the view gets every step after ``v``, in order (``"diff"``: a round's diff for a client
that was there last round, the few missed ones for a client that rejoins); when those add up to
more bytes than the whole view in float32, or the client holds nothing (or something the
server no longer knows), it gets the view itself, dense float32 (``"resync"``, exact). Either
way the client ends with the server's view bit for bit: it applies the same decoded steps to
the same float32 values in the same order (:func:`apply_download`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from fastlora import codec
from fastlora.fl.client import add_sparse, decode_dense, sparsify_encode
from fastlora.sparse_delta import Layout

Adapter = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class Step:
    """One move of the view: applied to version ``start`` it gives version ``end``."""
    start: int
    end: int
    payload: bytes


class ServerView:
    """Server side of the ``diff`` download (see the module docstring).

    ``density`` / ``values``: the top-k fraction and value format of each step.
    """

    def __init__(self, layout: Layout, density: float, values: str):
        self.layout, self.density, self.values = layout, float(density), values
        self.view: Optional[Adapter] = None
        self.version = -1
        self.steps: List[Step] = []
        self._resync: Optional[Tuple[int, bytes]] = None
        # A resync is a dense float32 payload: 4 bytes per entry plus a small header.
        self.resync_bytes = 4 * layout.numel

    def start(self, adapter: Mapping[str, torch.Tensor], version: int) -> None:
        """The view becomes ``adapter`` (clients get it by a resync, or already hold it)."""
        self.view = {n: adapter[n].detach().to(torch.float32).clone() for n in self.layout.names}
        self.version = int(version)
        self.steps = []
        self._resync = None

    def advance(self, global_adapter: Mapping[str, torch.Tensor], version: int) -> None:
        """Moves the view one step towards ``global_adapter`` and calls the result ``version``;
        the first call takes the adapter itself."""
        if self.view is None:
            self.start(global_adapter, version)
            return
        gap = {n: global_adapter[n] - self.view[n] for n in self.layout.names}
        payload = sparsify_encode(gap, self.layout, density=self.density, values=self.values)
        add_sparse(self.view, codec.decode(payload, layout=self.layout))  # exactly what clients apply
        self.steps.append(Step(self.version, int(version), payload))
        self.version = int(version)
        self._resync = None
        # Steps that no client would take (a resync is cheaper from before them) are dropped.
        kept, total = [], 0
        for step in reversed(self.steps):
            total += len(step.payload)
            if total > self.resync_bytes:
                break
            kept.append(step)
        self.steps = kept[::-1]

    def resync_payload(self) -> bytes:
        if self._resync is None or self._resync[0] != self.version:
            self._resync = (self.version, sparsify_encode(self.view, self.layout, density=1.0, values="fp32"))
        return self._resync[1]

    def download(self, held_version: Optional[int]) -> Tuple[str, List[bytes]]:
        """``("diff", [payloads in order])`` for a client holding ``held_version`` of the view
        when the steps since then are known and cheaper than a resync, else ``("resync",
        [dense float32 view])``."""
        if self.view is None:
            raise RuntimeError("ServerView.download before the first advance")
        if held_version is not None and held_version >= 0:
            chain = [s for s in self.steps if s.end > held_version]
            if held_version == self.version:
                return "diff", []
            if chain and chain[0].start == held_version:
                if sum(len(s.payload) for s in chain) <= self.resync_bytes:
                    return "diff", [s.payload for s in chain]
        return "resync", [self.resync_payload()]

    # -- checkpoint state -------------------------------------------------------------------
    def state(self, prefix: str = "view") -> Tuple[Dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able meta) that :meth:`load_state` restores exactly."""
        tensors: Dict[str, torch.Tensor] = {}
        if self.view is not None:
            tensors.update({f"{prefix}.{n}": t for n, t in self.view.items()})
        for i, s in enumerate(self.steps):
            tensors[f"{prefix}.step.{i}"] = torch.frombuffer(bytearray(s.payload), dtype=torch.uint8)
        meta = {"version": self.version, "has_view": self.view is not None,
                "steps": [[s.start, s.end] for s in self.steps]}
        return tensors, meta

    def load_state(self, tensors: Mapping[str, torch.Tensor], meta: Mapping, prefix: str = "view") -> None:
        self.view = ({n: tensors[f"{prefix}.{n}"].to(torch.float32).clone() for n in self.layout.names}
                     if meta["has_view"] else None)
        self.version = int(meta["version"])
        self.steps = [Step(int(a), int(b), tensors[f"{prefix}.step.{i}"].to(torch.uint8).numpy().tobytes())
                      for i, (a, b) in enumerate(meta["steps"])]
        self._resync = None


def apply_download(held: Optional[Adapter], kind: str, payloads: Sequence[bytes], layout: Layout) -> Adapter:
    """Client side: the view after a ``diff`` download (``held`` updated in place and returned)
    or a ``resync`` (a new float32 adapter)."""
    if kind == "resync":
        if len(payloads) != 1:
            raise ValueError(f"a resync carries one payload, got {len(payloads)}")
        return decode_dense(payloads[0], layout)
    if kind != "diff":
        raise ValueError(f"unknown download kind {kind!r}")
    if held is None:
        raise ValueError("a diff download needs the view this client holds, and it holds none")
    for p in payloads:
        add_sparse(held, codec.decode(p, layout=layout))
    return held
