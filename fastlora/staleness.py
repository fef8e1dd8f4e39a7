"""Stale updates for partial participation: FedStale.

Rodio & Neglia, "FedStale: leveraging stale client updates in federated learning" (2024).
The server remembers each client's last update h_j. In a round with participants S, fresh
updates Delta_i (i in S) are combined with the stale memory:

    Delta = sum_{i in S} w_i (Delta_i - beta * h_i)  +  beta * sum_{j=1..N} u_j h_j

then h_i <- Delta_i for i in S. beta = 0 is FedAvg over the participants; beta = 1 is FedVARP
(Jhunjhunwala et al., 2022), which removes the participation-sampling variance; values in
between trade the variance of FedAvg against the staleness bias of FedVARP. w_i default to
1/|S| and u_j to 1/N (pass FedAvg's sample-size fractions for heterogeneous clients). A
client never seen has h_j = 0.

Summation order (bitwise reproducible, see fastlora.ops.aggregate): fresh updates in
ascending client id, then -beta * w_i * h_i for participants with a memory, then
beta * u_j * h_j over all remembered clients in ascending id.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Union

import torch

from fastlora import codec
from fastlora.ops.aggregate import sparse_aggregate
from fastlora.sparse_delta import Layout, SparseDelta

Payload = Union[SparseDelta, bytes, bytearray, memoryview]


class StaleUpdates:
    """FedStale memory and aggregation (see module docstring for the formula)."""

    def __init__(self, layout: Layout, num_clients: int, beta: float = 0.5,
                 stale_weights: Optional[Mapping[int, float]] = None):
        if not 0.0 <= float(beta) <= 1.0:
            raise ValueError(f"StaleUpdates: beta must be in [0, 1], got {beta}")
        if num_clients <= 0:
            raise ValueError(f"StaleUpdates: num_clients must be positive, got {num_clients}")
        self.layout = layout
        self.num_clients = int(num_clients)
        self.beta = float(beta)
        self.stale_weights = dict(stale_weights) if stale_weights is not None else None
        self.memory: Dict[int, SparseDelta] = {}

    def _u(self, j: int) -> float:
        return self.stale_weights.get(j, 0.0) if self.stale_weights is not None else 1.0 / self.num_clients

    def aggregate(self, fresh: Mapping[int, Payload], weights: Optional[Mapping[int, float]] = None,
                  out=None):
        """Combines this round's fresh updates {client_id: update} with the stale memory and
        returns the aggregate (dense, in the layout's dtypes, or added into ``out``); then
        stores the fresh updates as the clients' memory."""
        ids = sorted(fresh)
        for i in ids:
            if not 0 <= i < self.num_clients:
                raise ValueError(f"StaleUpdates: client id {i} outside [0, {self.num_clients})")
        decoded = {i: self._decode(i, fresh[i]) for i in ids}
        w = {i: (float(weights[i]) if weights is not None else 1.0 / len(ids)) for i in ids} if ids else {}
        deltas, ws = [], []
        for i in ids:
            deltas.append(decoded[i])
            ws.append(w[i])
        if self.beta > 0.0:
            for i in ids:
                if i in self.memory:
                    deltas.append(self.memory[i])
                    ws.append(-self.beta * w[i])
            for j in sorted(self.memory):
                u = self._u(j)
                if u != 0.0:
                    deltas.append(self.memory[j])
                    ws.append(self.beta * u)
        result = sparse_aggregate(deltas, torch.tensor(ws, dtype=torch.float32), out=out, layout=self.layout)
        self.memory.update(decoded)
        return result

    def _decode(self, client: int, d: Payload) -> SparseDelta:
        if isinstance(d, SparseDelta):
            if d.layout != self.layout:
                raise ValueError(f"StaleUpdates: client {client}: layout differs from the server's")
            return d
        try:
            return codec.decode(d, layout=self.layout)
        except codec.DecodeError as e:
            raise ValueError(f"StaleUpdates: client {client}: cannot decode payload: {e}") from None
