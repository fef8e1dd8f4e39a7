"""Byte accounting of a SparseLoRA run: every ArrayRecord both ways, next to what Flower's
FedAvg would have sent for the same messages."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List


@dataclass
class RoundBytes:
    """Bytes of ArrayRecords (``ArrayRecord.count_bytes()``) in one round, both directions."""
    round: int
    down_bytes: int = 0          # server -> clients, train and evaluate messages
    up_bytes: int = 0            # clients -> server, every reply that carried content
    messages: int = 0
    replies: int = 0
    accepted: int = 0
    failures: int = 0
    fedavg_down_bytes: int = 0   # the same messages / replies with FedAvg's dense fp32 ArrayRecord
    fedavg_up_bytes: int = 0
    reasons: List[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.down_bytes + self.up_bytes

    @property
    def fedavg_total(self) -> int:
        return self.fedavg_down_bytes + self.fedavg_up_bytes


class CommTracker:
    """Counts, per round and in total, the bytes of every ArrayRecord a :class:`SparseLoRA`
    sends and receives (``ArrayRecord.count_bytes()``, as FlowerTune does: array data plus
    keys, not the ConfigRecords/MetricRecords or protocol framing), next to what Flower's
    plain FedAvg of the same adapter in fp32 (and the same buffers, once the server knows them)
    would have sent for the same messages."""

    def __init__(self):
        self.rounds: Dict[int, RoundBytes] = {}

    def _round(self, rnd: int) -> RoundBytes:
        if rnd not in self.rounds:
            self.rounds[rnd] = RoundBytes(rnd)
        return self.rounds[rnd]

    def sent(self, rnd: int, nbytes: int, messages: int, fedavg_per_message: int) -> None:
        """``messages`` messages of ``nbytes`` ArrayRecord bytes each (every ArrayRecord of a
        message: the payloads and the buffers)."""
        r = self._round(rnd)
        r.down_bytes += nbytes * messages
        r.fedavg_down_bytes += fedavg_per_message * messages
        r.messages += messages

    def received(self, rnd: int, nbytes: int, fedavg_bytes: int) -> None:
        r = self._round(rnd)
        r.up_bytes += nbytes
        r.fedavg_up_bytes += fedavg_bytes
        r.replies += 1

    def result(self, rnd: int, accepted: int, reasons: List[str]) -> None:
        r = self._round(rnd)
        r.accepted += accepted
        r.failures += len(reasons)
        r.reasons.extend(reasons)

    def summary(self) -> dict:
        """``{"rounds": [per-round dicts], "total": {...}}``; ``ratio`` = FedAvg bytes / ours."""
        rows = []
        for rnd in sorted(self.rounds):
            r = self.rounds[rnd]
            rows.append({"round": rnd, "down_bytes": r.down_bytes, "up_bytes": r.up_bytes, "bytes": r.total,
                         "fedavg_down_bytes": r.fedavg_down_bytes, "fedavg_up_bytes": r.fedavg_up_bytes,
                         "fedavg_bytes": r.fedavg_total, "messages": r.messages, "replies": r.replies,
                         "accepted": r.accepted, "failures": r.failures, "reasons": list(r.reasons)})
        total = {k: sum(row[k] for row in rows) for k in
                 ("down_bytes", "up_bytes", "bytes", "fedavg_down_bytes", "fedavg_up_bytes", "fedavg_bytes",
                  "messages", "replies", "accepted", "failures")}
        total["ratio"] = total["fedavg_bytes"] / total["bytes"] if total["bytes"] else float("nan")
        return {"rounds": rows, "total": total}

    def format(self) -> str:
        """One line: total bytes both ways vs FedAvg fp32."""
        t = self.summary()["total"]
        return (f"fastlora bytes: {t['bytes']:,} (down {t['down_bytes']:,}, up {t['up_bytes']:,}) over "
                f"{len(self.rounds)} rounds vs FedAvg fp32 {t['fedavg_bytes']:,} "
                f"(down {t['fedavg_down_bytes']:,}, up {t['fedavg_up_bytes']:,}): {t['ratio']:.1f}x fewer; "
                f"{t['accepted']} updates accepted, {t['failures']} rejected")
