"""Federated strategies, selectable by name, each a set of choices about what travels.

=========  ==============================================================================
name       what it does (paper)
=========  ==============================================================================
fedavg     Dense LoRA federated averaging, the baseline: clients download the whole global
           adapter and upload their whole update, fp32 both ways. McMahan et al., AISTATS
           2017; for LoRA, Zhang et al., "Towards Building the Federated GPT", ICASSP 2024.
flasc      FLASC (Kuo et al., "Federated LoRA with Sparse Communication", 2024), the paper's
           baseline: the client downloads the top ``down`` fraction of the global adapter's
           entries, trains densely, and uploads the top ``up`` fraction of its update (no
           error feedback: what it drops is lost). Defaults: up 1/16, down 1/4, fp16 values.
ef-topk    The recommended strategy (fastlora.flower.SparseLoRA's default). CELLM-style sparse
           upload with error feedback (Stich et al., NeurIPS 2018; "CELLM", 2024): what the
           client does not send stays in its residual and is sent in later rounds; download:
           the stateful ``diff`` mode (below), whose gap is the server's error feedback.
           Defaults: up 1/8, down 1/16 diff, fp16 values both ways.
exact      FlexLoRA-style exact aggregation (Bai et al., "Federated Fine-tuning of Large
           Language Models under Heterogeneous Tasks and Client Resources", 2024): clients
           (possibly of different LoRA ranks) upload their LoRA factors; the server
           aggregates the products sum_i w_i B_i A_i and re-factorises them with
           ``fastlora.aggregate_lora``; each client downloads the leading r_i components.
           Dense fp32 both ways.
fedstale   FedStale (Rodio & Neglia, 2024) on top of ef-topk: the server also reuses the last
           update of clients that were not selected (``beta`` weighs the stale memory), which
           reduces the variance of partial participation.
=========  ==============================================================================

Download modes:

* ``dense``  — the whole global adapter, every round.
* ``sparse`` — FLASC: the top-k of the global adapter itself, per tensor (every tensor keeps
  the same fraction: lora_B is orders of magnitude smaller than lora_A early on, and a global
  top-k would drop it whole); clients start from it.
* ``diff``   — stateful clients (cross-silo): the server tracks what an up-to-date client holds
  (its *view*) and sends the top-k of ``global - view``; what it does not send stays in that
  gap (the server's error feedback) and goes out in later rounds. A client that missed
  rounds gets the steps it missed, in order, or, when they add up to more than the view
  itself (or it holds nothing), a dense float32 resync of the view (counted in the bytes);
  see ``fastlora.fl.view``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Dict, Optional

VALUE_FORMATS = ("fp32", "bf16", "fp16", "int8")
DOWNLOAD_MODES = ("dense", "sparse", "diff")
SERVER_OPTIMIZERS = ("sgd", "adam")



def format_density(d: Optional[float]) -> str:
    """Format an update density: ``1.0 -> "1"``, ``0.0625 -> "1/16"``, ``0.3 -> "0.3"``, None -> ``"-"``.

    A density is written as ``1/n`` when ``1/d`` is (to within float rounding) an integer ``n > 1``,
    otherwise with 3 significant digits.
    """
    if d is None:
        return "-"
    d = float(d)
    if not math.isfinite(d) or d <= 0:
        return f"{d:g}"
    inv = 1.0 / d
    n = round(inv)
    if n >= 1 and abs(inv - n) <= 1e-9 * n:
        return "1" if n == 1 else f"1/{n}"
    return f"{d:.3g}"


@dataclass(frozen=True)
class Strategy:
    """What a strategy sends and how the server combines it (see the module docstring)."""
    name: str
    up_density: float = 1.0          # fraction of the update's entries a client uploads
    error_feedback: bool = False     # client keeps what it did not send (residual)
    values: str = "fp32"             # upload value format (fastlora.codec)
    down: str = "dense"              # download mode: dense | sparse | diff
    down_density: float = 1.0        # fraction of entries per download (sparse / diff)
    down_values: str = "fp32"        # download value format
    exact: bool = False              # FlexLoRA-style product aggregation
    stale_beta: float = 0.0          # FedStale weight of the stale memory (0 = off)
    server_optimizer: str = "sgd"    # sgd (lr 1 = FedAvg) | adam (FedAdam, Reddi et al. 2021)
    server_lr: float = 1.0

    def __post_init__(self):
        for field in ("up_density", "down_density"):
            d = getattr(self, field)
            if not (isinstance(d, (int, float)) and 0.0 < d <= 1.0):
                raise ValueError(f"strategy {self.name}: {field} must be in (0, 1], got {d!r}")
        for field in ("values", "down_values"):
            if getattr(self, field) not in VALUE_FORMATS:
                raise ValueError(f"strategy {self.name}: {field} must be one of {VALUE_FORMATS}, "
                                 f"got {getattr(self, field)!r}")
        if self.down not in DOWNLOAD_MODES:
            raise ValueError(f"strategy {self.name}: down must be one of {DOWNLOAD_MODES}, got {self.down!r}")
        if self.server_optimizer not in SERVER_OPTIMIZERS:
            raise ValueError(f"strategy {self.name}: server_optimizer must be one of {SERVER_OPTIMIZERS}, "
                             f"got {self.server_optimizer!r}")
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            raise ValueError(f"strategy {self.name}: server_lr must be positive, got {self.server_lr!r}")
        if not 0.0 <= self.stale_beta <= 1.0:
            raise ValueError(f"strategy {self.name}: beta must be in [0, 1], got {self.stale_beta!r}")
        if self.exact and (self.up_density != 1.0 or self.down != "dense" or self.error_feedback
                           or self.stale_beta or self.server_optimizer != "sgd" or self.server_lr != 1.0):
            raise ValueError(f"strategy {self.name}: exact aggregation sends dense factors and has no server "
                             "optimizer; it takes no up/down/ef/beta/server options")
        if self.down == "dense" and self.down_density != 1.0:
            raise ValueError(f"strategy {self.name}: a dense download sends every entry (down density 1); for "
                             f"a partial download use mode=sparse or mode=diff (down='sparse' / 'diff' on a "
                             f"Strategy), e.g. '{self.name}:mode=diff,down={format_density(self.down_density)}'")

    @property
    def label(self) -> str:
        """A short unique description naming what travels each way and in which value format,
        e.g. ``flasc up=1/16 fp16 down=sparse 1/4 fp16``."""
        parts = [self.name]
        if not self.exact:
            parts.append(f"up={format_density(self.up_density)} {self.values}")
            parts.append(f"down={self.down_label} {self.down_values}")
        else:
            parts.append(self.values)
        if self.stale_beta:
            parts.append(f"beta={self.stale_beta:g}")
        if self.server_optimizer != "sgd" or self.server_lr != 1.0:
            parts.append(f"{self.server_optimizer} lr={self.server_lr:g}")
        return " ".join(parts)

    @property
    def down_label(self) -> str:
        return "dense" if self.down == "dense" else f"{self.down} {format_density(self.down_density)}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: Dict[str, Dict] = {
    "fedavg": {},
    "flasc": dict(up_density=1 / 16, down="sparse", down_density=1 / 4, values="fp16", down_values="fp16"),
    # ef-topk's defaults are the best accuracy per byte measured on Flower's app-template task
    # (benchmarks/flower_cnn_experiment.py, docs/benchmarks.md): 9.7x fewer bytes than FedAvg at -0.7 point.
    "ef-topk": dict(up_density=1 / 8, error_feedback=True, down="diff", down_density=1 / 16, values="fp16",
                    down_values="fp16"),
    "exact": dict(exact=True),
    "fedstale": dict(up_density=1 / 8, error_feedback=True, down="diff", down_density=1 / 16, values="fp16",
                     down_values="fp16", stale_beta=0.5),
}

# spec keys -> Strategy fields
_KEYS = {"up": "up_density", "down": "down_density", "mode": "down", "values": "values",
         "down_values": "down_values", "ef": "error_feedback", "beta": "stale_beta",
         "server_opt": "server_optimizer", "server_lr": "server_lr"}


def parse_strategy(spec: str) -> Strategy:
    """``name`` or ``name:key=value,...`` (keys: up, down, mode, values, down_values, ef, beta,
    server_opt, server_lr), e.g. ``flasc:up=1/64,down=1/4`` or ``ef-topk:up=1/16,mode=sparse``.
    Densities accept fractions (``1/16``) or decimals."""
    name, _, rest = spec.strip().partition(":")
    if name not in PRESETS:
        raise ValueError(f"unknown strategy {name!r}; choose from {sorted(PRESETS)}")
    fields = dict(PRESETS[name])
    given = set()
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in _KEYS:
            raise ValueError(f"strategy {spec!r}: bad option {item!r}; options are key=value with key in "
                             f"{sorted(_KEYS)}")
        field = _KEYS[key]
        if field in ("up_density", "down_density", "stale_beta", "server_lr"):
            try:
                fields[field] = float(Fraction(value))
            except (ValueError, ZeroDivisionError):
                raise ValueError(f"strategy {spec!r}: {key} must be a number or a fraction, got {value!r}") from None
        elif field == "error_feedback":
            if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(f"strategy {spec!r}: ef must be true/false, got {value!r}")
            fields[field] = value.lower() in ("1", "true", "yes", "on")
        else:
            fields[field] = value
        given.add(field)
    if fields.get("down", "dense") == "dense":
        if "down" not in given and fields.get("down_density", 1.0) < 1:
            fields["down"] = "sparse"  # down=1/4 on a dense-download strategy: FLASC's sparse download
        elif "down" in given and "down_density" not in given:
            fields["down_density"] = 1.0  # mode=dense alone: the preset's partial density does not apply
    return Strategy(name=name, **fields)
