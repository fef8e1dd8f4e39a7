"""Server side of a round: the global adapter, what it sends (dense / sparse / diff), how it
combines the clients' payloads (sparse aggregation, FedStale, exact LoRA aggregation) and the
server optimizer (SGD or FedAdam). Every payload is real ``fastlora.codec`` bytes.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import torch

from fastlora.ops.aggregate import sparse_aggregate
from fastlora.ops.lowrank import aggregate_lora
from fastlora.sparse_delta import Layout
from fastlora.staleness import StaleUpdates
from fastlora.fl.client import decode_dense, sparsify_encode
from fastlora.fl.model import lora_pairs
from fastlora.fl.strategies import Strategy
from fastlora.fl.view import ServerView

Adapter = Dict[str, torch.Tensor]

# FedAdam (Reddi et al., "Adaptive Federated Optimization", ICLR 2021): no bias correction,
# tau is the adaptivity floor.
ADAM_BETAS = (0.9, 0.99)
ADAM_TAU = 1e-3


def truncate_rank(adapter: Adapter, rank: int, pairs: Mapping[str, Tuple[str, str]]) -> Adapter:
    """The adapter with every LoRA pair cut to its first ``rank`` components (A rows, B columns)."""
    out = dict(adapter)
    for a, b in pairs.values():
        out[a] = adapter[a][:rank].contiguous()
        out[b] = adapter[b][:, :rank].contiguous()
    return out


def pad_rank(adapter: Adapter, full: Mapping[str, torch.Tensor], pairs: Mapping[str, Tuple[str, str]]) -> Adapter:
    """Inverse of :func:`truncate_rank`: zero-pads the pairs to the shapes in ``full``."""
    out = dict(adapter)
    for a, b in pairs.values():
        r = adapter[a].shape[0]
        pa = torch.zeros_like(full[a])
        pa[:r] = adapter[a]
        pb = torch.zeros_like(full[b])
        pb[:, :r] = adapter[b]
        out[a], out[b] = pa, pb
    return out


class ServerOptimizer:
    """Applies an aggregated update (a pseudo-gradient) to the global adapter in place: ``sgd``
    (``global += lr * update``; lr 1 is FedAvg) or ``adam`` (FedAdam, Reddi et al. 2021)."""

    def __init__(self, kind: str = "sgd", lr: float = 1.0):
        if kind not in ("sgd", "adam"):
            raise ValueError(f"server optimizer must be 'sgd' or 'adam', got {kind!r}")
        self.kind, self.lr = kind, float(lr)
        self.step_count = 0
        self.m: Optional[Adapter] = None
        self.v: Optional[Adapter] = None

    @torch.no_grad()
    def apply(self, adapter: Adapter, update: Mapping[str, torch.Tensor]) -> None:
        if self.kind == "sgd":
            for n, t in adapter.items():
                t.add_(update[n], alpha=self.lr)
            return
        b1, b2 = ADAM_BETAS
        if self.m is None:
            self.m = {n: torch.zeros_like(t) for n, t in adapter.items()}
            self.v = {n: torch.zeros_like(t) for n, t in adapter.items()}
        self.step_count += 1
        for n, t in adapter.items():
            m, v, u = self.m[n], self.v[n], update[n]
            m.mul_(b1).add_(u, alpha=1 - b1)
            v.mul_(b2).addcmul_(u, u, value=1 - b2)
            t.addcdiv_(m, v.sqrt().add_(ADAM_TAU), value=self.lr)

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        if self.m is None:
            return {}
        return {**{f"opt_m.{n}": t for n, t in self.m.items()}, **{f"opt_v.{n}": t for n, t in self.v.items()}}

    def load_state(self, tensors: Mapping[str, torch.Tensor], names, step_count: int) -> None:
        self.step_count = int(step_count)
        if names and f"opt_m.{names[0]}" in tensors:
            self.m = {n: tensors[f"opt_m.{n}"].clone() for n in names}
            self.v = {n: tensors[f"opt_v.{n}"].clone() for n in names}


class Server:
    """Holds the global adapter and the server-side state of one strategy.

    ``client_sizes[i]`` is client i's number of samples: aggregation weights are
    ``n_i / sum(n)`` over the clients whose update arrived (FedAvg).
    """

    def __init__(self, strategy: Strategy, initial: Adapter, client_sizes: List[int],
                 client_ranks: Optional[List[int]] = None, initial_seed: Optional[int] = None):
        self.strategy = strategy
        # Clients build the initial adapter from this seed: round 1 sends it instead of the adapter.
        self.initial_seed = initial_seed
        self.global_adapter: Adapter = {n: t.detach().to(torch.float32).clone() for n, t in initial.items()}
        self.layout = Layout.of(self.global_adapter)
        self.client_sizes = list(client_sizes)
        self.pairs = lora_pairs(self.global_adapter)
        full_rank = {self.global_adapter[a].shape[0] for a, _ in self.pairs.values()}
        self.rank = max(full_rank) if full_rank else 0
        self.client_ranks = list(client_ranks) if client_ranks else [self.rank] * len(client_sizes)
        if len(self.client_ranks) != len(self.client_sizes):
            raise ValueError(f"{len(self.client_ranks)} client ranks for {len(self.client_sizes)} clients")
        if any(not 1 <= r <= self.rank for r in self.client_ranks):
            raise ValueError(f"client ranks must be in [1, {self.rank}], got {sorted(set(self.client_ranks))}")
        if not strategy.exact and any(r != self.rank for r in self.client_ranks):
            raise ValueError(f"heterogeneous client ranks need the 'exact' strategy (aggregate_lora), "
                             f"not {strategy.name!r}")
        self._layouts: Dict[int, Layout] = {}
        self.optimizer = ServerOptimizer(strategy.server_optimizer, strategy.server_lr)
        # diff download: what an up-to-date client holds (fastlora.fl.view)
        self.view: Optional[ServerView] = (ServerView(self.layout, strategy.down_density, strategy.down_values)
                                           if strategy.down == "diff" and not strategy.exact else None)
        self.stale: Optional[StaleUpdates] = None
        if strategy.stale_beta > 0:
            total = float(sum(self.client_sizes))
            self.stale = StaleUpdates(self.layout, len(self.client_sizes), beta=strategy.stale_beta,
                                      stale_weights={i: n / total for i, n in enumerate(self.client_sizes)})

    # -- layouts ----------------------------------------------------------------------------
    def layout_for_rank(self, rank: int) -> Layout:
        """Wire layout of a client of LoRA rank ``rank`` (exact strategy); the full layout at
        the global rank."""
        if rank == self.rank:
            return self.layout
        if rank not in self._layouts:
            self._layouts[rank] = Layout.of(truncate_rank(self.global_adapter, rank, self.pairs))
        return self._layouts[rank]

    # -- download ---------------------------------------------------------------------------
    def downloads(self, rnd: int, clients: List[int],
                  held_versions: Mapping[int, int]) -> Dict[int, Tuple[str, List[bytes]]]:
        """What each selected client receives this round: ``{cid: (kind, [payloads])}`` with
        kind ``dense`` / ``sparse`` / ``diff`` / ``resync`` / ``seed`` (round 1 with
        ``initial_seed``: the 8-byte seed, little-endian). ``diff`` carries the view's steps
        since the version the client holds, in order (fastlora.fl.view). Identical payloads are
        one bytes object (each receiver still counts its length)."""
        s = self.strategy
        if self.initial_seed is not None and rnd == 1:
            # Nothing is aggregated before round 1: the global adapter is the initial one, which
            # every client builds from the shared seed. What crosses the network is the seed.
            if s.down == "diff":
                self.view.start(self.global_adapter, rnd)
            seed = int(self.initial_seed).to_bytes(8, "little")
            return {c: ("seed", [seed]) for c in clients}
        if s.exact:
            by_rank: Dict[int, bytes] = {}
            for c in clients:
                r = self.client_ranks[c]
                if r not in by_rank:
                    by_rank[r] = self._dense_payload(truncate_rank(self.global_adapter, r, self.pairs),
                                                     self.layout_for_rank(r), s.down_values)
            return {c: ("dense", [by_rank[self.client_ranks[c]]]) for c in clients}
        if s.down == "dense":
            p = self._dense_payload(self.global_adapter, self.layout, s.down_values)
            return {c: ("dense", [p]) for c in clients}
        if s.down == "sparse":
            p = sparsify_encode(self.global_adapter, self.layout, density=s.down_density, values=s.down_values,
                                per_tensor=True)
            return {c: ("sparse", [p]) for c in clients}
        # diff: bring the view one step closer to the global adapter; each client gets the
        # steps since the version it holds, or the whole view.
        self.view.advance(self.global_adapter, rnd)
        return {c: self.view.download(held_versions.get(c, -1)) for c in clients}

    @property
    def view_version(self) -> int:
        return self.view.version if self.view is not None else -1

    @staticmethod
    def _dense_payload(adapter: Adapter, layout: Layout, values: str) -> bytes:
        return sparsify_encode({n: adapter[n] for n in layout.names}, layout, density=1.0, values=values)

    # -- aggregation ------------------------------------------------------------------------
    def aggregate(self, uploads: Mapping[int, bytes]) -> None:
        """Combines this round's uploads ``{cid: payload}`` into the global adapter. No uploads
        (every selected client failed) leaves it unchanged."""
        if not uploads:
            return
        ids = sorted(uploads)
        total = float(sum(self.client_sizes[c] for c in ids))
        weights = {c: self.client_sizes[c] / total for c in ids}
        if self.strategy.exact:
            self._aggregate_exact(ids, uploads, weights)
            return
        if self.stale is not None:
            update = self.stale.aggregate({c: uploads[c] for c in ids}, weights)
        else:
            update = sparse_aggregate([uploads[c] for c in ids], [weights[c] for c in ids], layout=self.layout)
        self._apply(update)

    def _apply(self, update: Adapter) -> None:
        self.optimizer.apply(self.global_adapter, update)

    def _aggregate_exact(self, ids, uploads, weights) -> None:
        factors = {}
        for c in ids:
            r = self.client_ranks[c]
            factors[c] = decode_dense(uploads[c], self.layout_for_rank(r))
        w = torch.tensor([weights[c] for c in ids], dtype=torch.float32)
        new = {}
        lora_names = set()
        for a, b in self.pairs.values():
            A, B = aggregate_lora([(factors[c][a], factors[c][b]) for c in ids], w, rank=self.rank)
            new[a], new[b] = A.contiguous(), B.contiguous()
            lora_names.update((a, b))
        for n in self.layout.names:
            if n not in lora_names:  # head and any other dense tensor: weighted mean
                acc = torch.zeros_like(self.global_adapter[n])
                for c in ids:
                    acc.add_(factors[c][n], alpha=weights[c])
                new[n] = acc
        self.global_adapter = {n: new[n] for n in self.layout.names}

    # -- checkpoint state -------------------------------------------------------------------
    def state_tensors(self) -> Dict[str, torch.Tensor]:
        out = {f"global.{n}": t for n, t in self.global_adapter.items()}
        out.update(self.optimizer.state_tensors())
        if self.view is not None:
            out.update(self.view.state("view")[0])
        if self.stale is not None:
            for c, sd in self.stale.memory.items():
                out[f"stale.{c}.indices"] = sd.indices
                out[f"stale.{c}.values"] = sd.values
        return out

    def state_meta(self) -> dict:
        return {"opt_step": self.optimizer.step_count,
                "view": self.view.state("view")[1] if self.view is not None else None,
                "stale_clients": sorted(self.stale.memory) if self.stale is not None else []}

    def load_state(self, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> None:
        from fastlora.sparse_delta import SparseDelta

        names = self.layout.names
        self.global_adapter = {n: tensors[f"global.{n}"].clone() for n in names}
        self.optimizer.load_state(tensors, names, meta["opt_step"])
        if self.view is not None:
            self.view.load_state(tensors, meta["view"], "view")
        if self.stale is not None:
            self.stale.memory = {int(c): SparseDelta(tensors[f"stale.{c}.indices"].clone(),
                                                     tensors[f"stale.{c}.values"].clone(), self.layout)
                                 for c in meta["stale_clients"]}
