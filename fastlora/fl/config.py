"""Configuration of a federated experiment: one flat dataclass, presets, and TOML loading."""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import List, Optional, Tuple, Union

from fastlora.fl.strategies import parse_strategy

MODELS = ("minilm", "tiny")
TASKS = ("stdlib", "synthetic")
INITIAL_MODES = ("seed", "download")


@dataclass
class FLConfig:
    """Every knob of ``fastlora fl`` (flags and TOML keys have the same names, ``-`` or ``_``)."""
    # what runs
    strategies: List[str] = field(default_factory=lambda: ["fedavg", "flasc", "ef-topk"])
    model: str = "minilm"                 # minilm (pretrained, pip package) | tiny (random, tests)
    task: str = "stdlib"                  # stdlib docstrings by package | synthetic tokens
    # federation
    num_clients: int = 10
    participation: float = 0.5            # fraction of clients selected per round (seeded)
    client_dropout: float = 0.0           # fraction of the selected that fail mid-round
    rounds: int = 10
    dirichlet_alpha: float = 0.5          # non-IID label split; large = IID
    client_ranks: Optional[List[int]] = None   # per client, cycled (exact strategy only)
    # local training
    local_steps: int = 5
    batch_size: int = 16
    lr: float = 1e-3
    local_optimizer: str = "adamw"
    # LoRA
    rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["query", "value"])
    # data
    max_length: int = 32
    max_per_class: int = 400              # stdlib task: docstrings per package
    num_samples: int = 1200               # synthetic task
    num_classes: int = 6                  # synthetic task
    test_fraction: float = 0.2
    eval_samples: int = 600               # evaluation uses at most this many test samples
    eval_every: int = 1
    # run
    seed: int = 0
    # How clients get the round-1 adapter. "seed": every party builds it from `seed` (LoRA's A
    # and the head are seeded, B is zero): the server sends the 8-byte seed, counted. "download":
    # the server sends it dense fp32 (2.5 MB for the demo's 8 clients). Same for every strategy.
    initial: str = "seed"
    threads: int = 0                      # torch CPU threads (0: torch's default)

    def __post_init__(self):
        self.validate()

    def validate(self) -> "FLConfig":
        def need(cond, msg):
            if not cond:
                raise ValueError(f"config: {msg}")
        need(self.model in MODELS, f"model must be one of {MODELS}, got {self.model!r}")
        need(self.task in TASKS, f"task must be one of {TASKS}, got {self.task!r}")
        need(self.task != "stdlib" or self.model == "minilm",
             f"the stdlib task needs the pretrained model's tokenizer: model must be minilm, got {self.model!r} "
             f"(or use task synthetic)")
        need(isinstance(self.strategies, list) and self.strategies, "strategies must be a non-empty list")
        labels = [parse_strategy(s).label for s in self.strategies]
        need(len(set(labels)) == len(labels), f"the same strategy appears twice in {self.strategies}")
        need(self.num_clients >= 1, f"num_clients must be >= 1, got {self.num_clients}")
        need(0.0 < self.participation <= 1.0, f"participation must be in (0, 1], got {self.participation}")
        need(0.0 <= self.client_dropout < 1.0, f"client_dropout must be in [0, 1), got {self.client_dropout}")
        need(self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}")
        need(math.isfinite(self.dirichlet_alpha) and self.dirichlet_alpha > 0,
             f"dirichlet_alpha must be > 0, got {self.dirichlet_alpha}")
        need(self.local_steps >= 1 and self.batch_size >= 1, "local_steps and batch_size must be >= 1")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.local_optimizer in ("adamw", "sgd"), f"local_optimizer must be adamw or sgd, got {self.local_optimizer!r}")
        need(self.rank >= 1, f"rank must be >= 1, got {self.rank}")
        need(math.isfinite(self.lora_alpha) and self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}")
        need(math.isfinite(self.lr), f"lr must be finite, got {self.lr}")
        need(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.client_ranks is not None:
            need(isinstance(self.client_ranks, list) and self.client_ranks
                 and all(isinstance(r, int) and 1 <= r <= self.rank for r in self.client_ranks),
                 f"client_ranks must be a list of ints in [1, rank={self.rank}], got {self.client_ranks}")
        need(0.0 < self.test_fraction < 1.0, f"test_fraction must be in (0, 1), got {self.test_fraction}")
        need(self.max_length >= 4, f"max_length must be >= 4, got {self.max_length}")
        need(self.eval_samples >= 1 and self.eval_every >= 1, "eval_samples and eval_every must be >= 1")
        need(self.num_classes >= 2 and self.num_samples >= self.num_classes, "synthetic task needs >= 2 classes")
        need(self.threads >= 0, f"threads must be >= 0, got {self.threads}")
        need(isinstance(self.seed, int) and 0 <= self.seed < 2 ** 63, f"seed must be an int in [0, 2^63), got {self.seed}")
        need(self.initial in INITIAL_MODES, f"initial must be one of {INITIAL_MODES}, got {self.initial!r}")
        return self

    def ranks(self) -> Optional[List[int]]:
        """Rank of each client (client_ranks cycled), or None when all train at ``rank``."""
        if not self.client_ranks:
            return None
        return [self.client_ranks[i % len(self.client_ranks)] for i in range(self.num_clients)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "FLConfig":
        return FLConfig(**{**self.to_dict(), **changes})


PRESETS = {
    # The README's first command: a pretrained MiniLM, real text, dense vs sparse side by side,
    # in a few minutes on 2 CPU cores.
    "demo": dict(strategies=["fedavg", "flasc", "ef-topk:up=1/4,down=1/4,values=int8,down_values=int8"],
                 num_clients=8, participation=1.0,
                 rounds=8, local_steps=4, batch_size=16, lr=2e-3, max_length=32, max_per_class=300,
                 eval_samples=400),
    # Seconds, no pretrained model: a random tiny BERT on a synthetic token task.
    "quick": dict(model="tiny", task="synthetic", strategies=["fedavg", "flasc", "ef-topk", "exact", "fedstale"],
                  num_clients=6, rounds=10, local_steps=10, lr=3e-2, num_samples=600, eval_samples=200),
}


def field_names() -> Tuple[str, ...]:
    return tuple(f.name for f in fields(FLConfig))


def coerce(name: str, value):
    """Converts a flag / TOML value to the field's type (lists from comma-separated strings)."""
    default = {f.name: f for f in fields(FLConfig)}[name]
    proto = default.default if default.default is not dataclasses.MISSING else default.default_factory()
    if name == "client_ranks":
        if value is None or value == "":
            return None
        items = value.split(",") if isinstance(value, str) else list(value)
        return [int(v) for v in items]
    if isinstance(proto, list):
        items = value.split(",") if isinstance(value, str) else list(value)
        return [str(v).strip() for v in items if str(v).strip()]
    if isinstance(proto, bool):
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
    if isinstance(value, bool):
        raise ValueError(f"config: {name} must be a number, got the boolean {value}")
    if isinstance(proto, int):
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"config: {name} must be an integer, got {value}")
        return int(value)
    if isinstance(proto, float):
        from fractions import Fraction
        return float(Fraction(value)) if isinstance(value, str) else float(value)
    return value


def load_toml(path: Union[str, Path]) -> dict:
    """Reads a TOML file of config keys (top level or under ``[fl]``); unknown keys are errors."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on older Pythons only
        import tomli as tomllib
    with open(path, "rb") as f:
        data = tomllib.load(f)
    if "fl" in data and isinstance(data["fl"], dict):
        data = data["fl"]
    return normalise(data, source=str(path))


def normalise(raw: dict, source: str = "config") -> dict:
    names = field_names()
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name == "preset":
            out["preset"] = value
            continue
        if name not in names:
            raise ValueError(f"{source}: unknown key {key!r}; valid keys: {', '.join(names)}")
        try:
            out[name] = coerce(name, value)
        except ZeroDivisionError:
            raise ValueError(f"{source}: bad value for {key!r}: {value!r} divides by zero") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: bad value for {key!r}: {e}") from None
    return out


def make_config(preset: Optional[str] = None, **overrides) -> FLConfig:
    """A config from a preset (``demo``, ``quick``) plus overrides."""
    base = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        base = dict(PRESETS[preset])
    base.update(overrides)
    return FLConfig(**base)
