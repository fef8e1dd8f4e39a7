"""Configuration of a federated experiment: one flat dataclass, presets, and TOML loading."""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import List, Optional, Tuple, Union

from fastlora.fl.strategies import parse_strategy

MODELS = ("minilm", "tiny")             # built in; any other value is a Hugging Face model folder or hub id
TASKS = ("stdlib", "synthetic")
INITIAL_MODES = ("seed", "download")
# The frozen base's linear layers: as loaded, or quantized on each client (fastlora.quantize_model).
BASES = ("fp32", "nf4", "int8")
TASK_TYPES = ("auto", "classify", "causal-lm")
MODEL_DTYPES = ("float32", "bfloat16")
SPLIT_FORMS = "auto, iid, dirichlet, dirichlet:ALPHA or column:NAME"


@dataclass
class FLConfig:
    """Every knob of ``fastlora fl`` (flags and TOML keys have the same names, ``-`` or ``_``)."""
    # what runs
    strategies: List[str] = field(default_factory=lambda: ["fedavg", "flasc", "ef-topk"])
    # minilm (pretrained, pip package) | tiny (random, tests) | a Hugging Face model folder, or a
    # hub id already in the local cache (never downloaded)
    model: str = "minilm"
    task: str = "stdlib"                  # stdlib docstrings by package | synthetic tokens (unused with data)
    task_type: str = "auto"               # auto (from the model's config, then the columns) | classify | causal-lm
    # your own data (replaces task): a JSONL / CSV / Parquet file or a datasets.save_to_disk folder
    data: Optional[str] = None
    eval_file: Optional[str] = None       # evaluation data (same format); default: a test_fraction held out
    text_column: Optional[str] = None     # default "text" (a causal LM with a prompt/response pair takes none)
    label_column: Optional[str] = None    # classification; default "label"
    prompt_column: Optional[str] = None   # causal LM: loss on the response tokens only
    response_column: Optional[str] = None
    dtype: str = "float32"                # base weights of a Hugging Face model: float32 | bfloat16
    base: str = "fp32"                    # the frozen base's linear layers: fp32 (as loaded) | nf4 | int8 (QLoRA)
    # federation
    num_clients: int = 10
    participation: float = 0.5            # fraction of clients selected per round (seeded)
    client_dropout: float = 0.0           # fraction of the selected that fail mid-round
    rounds: int = 10
    dirichlet_alpha: float = 0.5          # non-IID label split; large = IID
    # auto (dirichlet for classification, iid for a causal LM) | iid | dirichlet | dirichlet:ALPHA
    # (= dirichlet with dirichlet_alpha ALPHA) | column:NAME (one client per value of a data column)
    split: str = "auto"
    min_client_size: int = 1              # clients with fewer training samples are dropped (with a note)
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
    # module names (a name matches every module whose path ends with it) or all-linear; default
    # query,value for minilm / tiny, all-linear for a Hugging Face model
    target_modules: Optional[List[str]] = None
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
        if self.target_modules is None:
            self.target_modules = ["query", "value"] if self.model in MODELS else ["all-linear"]
        if isinstance(self.split, str) and self.split.startswith("dirichlet:"):
            # one spelling for one split: dirichlet:ALPHA is dirichlet with dirichlet_alpha ALPHA
            from fractions import Fraction
            try:
                self.dirichlet_alpha = float(Fraction(self.split.partition(":")[2]))
            except (ValueError, ZeroDivisionError):
                raise ValueError(f"config: split {self.split!r}: ALPHA must be a number > 0") from None
            self.split = "dirichlet"
        self.validate()

    @property
    def builtin_model(self) -> bool:
        """minilm or tiny (else the model is a Hugging Face model folder or hub id)."""
        return self.model in MODELS

    @property
    def split_column(self) -> Optional[str]:
        """NAME of a column:NAME split, else None."""
        return self.split.partition(":")[2] if self.split.startswith("column:") else None

    def validate(self) -> "FLConfig":
        def need(cond, msg):
            if not cond:
                raise ValueError(f"config: {msg}")
        need(isinstance(self.model, str) and self.model.strip(),
             f"model must be one of {MODELS} or a Hugging Face model folder, got {self.model!r}")
        need(self.task in TASKS, f"task must be one of {TASKS}, got {self.task!r}")
        need(self.data is not None or self.task != "stdlib" or self.model != "tiny",
             f"the stdlib task needs the pretrained model's tokenizer: model must be minilm (or a Hugging Face "
             f"model folder), got {self.model!r} (or use task synthetic)")
        self._validate_data()
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

    def _validate_data(self) -> None:
        """The keys of your own model and data: what each needs and what excludes what."""
        def need(cond, msg):
            if not cond:
                raise ValueError(f"config: {msg}")
        columns = ("text_column", "label_column", "prompt_column", "response_column")
        for name in ("data", "eval_file") + columns:
            v = getattr(self, name)
            need(v is None or (isinstance(v, str) and v.strip()), f"{name} must be a non-empty string, got {v!r}")
        need(self.task_type in TASK_TYPES, f"task_type must be one of {TASK_TYPES}, got {self.task_type!r}")
        need(self.dtype in MODEL_DTYPES, f"dtype must be one of {MODEL_DTYPES}, got {self.dtype!r}")
        need(self.base in BASES, f"base must be one of {BASES}, got {self.base!r}")
        need(isinstance(self.target_modules, list) and self.target_modules
             and all(isinstance(t, str) and t.strip() for t in self.target_modules),
             f"target_modules must be a non-empty list of module names, got {self.target_modules!r}")
        need("all-linear" not in self.target_modules or self.target_modules == ["all-linear"],
             f"target_modules: all-linear stands alone, got {self.target_modules}")
        need(isinstance(self.min_client_size, int) and self.min_client_size >= 1,
             f"min_client_size must be an int >= 1, got {self.min_client_size!r}")
        need(isinstance(self.split, str) and (self.split in ("auto", "iid", "dirichlet")
                                              or (self.split_column or "").strip()),
             f"split must be one of {SPLIT_FORMS}, got {self.split!r}")
        if self.data is None:
            given = [n for n in ("eval_file",) + columns if getattr(self, n) is not None]
            need(not given, f"{', '.join(given)} describe(s) your data: set data (--data FILE_OR_DIR) too")
            need(self.split_column is None, f"split {self.split!r} splits by a column of your data: set data too")
            need(self.task_type != "causal-lm", "a causal LM trains on your data: set data (--data FILE_OR_DIR); "
                                                "the stdlib and synthetic tasks are classification tasks")
        if self.builtin_model:
            need(self.task_type in ("auto", "classify"),
                 f"model {self.model} is a classifier; a causal LM needs a Hugging Face model folder")
            need(self.dtype == "float32", f"model {self.model} runs in float32; dtype applies to a Hugging Face "
                                          f"model folder")
            need(self.data is None or self.model == "minilm",
                 "model tiny has no tokenizer to read your data with: use minilm or a Hugging Face model folder")
            need(self.prompt_column is None, f"prompt_column / response_column are for a causal LM; model "
                                             f"{self.model} is a classifier")
        pair = (self.prompt_column, self.response_column)
        need((pair[0] is None) == (pair[1] is None),
             "prompt_column and response_column go together (loss on the response tokens of each prompt)")
        if pair[0] is not None:
            need(self.text_column is None, "give either text_column or a prompt_column + response_column pair")
            need(self.label_column is None, "label_column is for classification; prompt_column + response_column "
                                            "are for a causal LM")
            need(self.task_type != "classify", "prompt_column + response_column are for task_type causal-lm")
        need(self.label_column is None or self.task_type != "causal-lm",
             "label_column is for classification, not task_type causal-lm")

    def identity(self) -> dict:
        """What determines a run's results, as a checkpoint records it (not: which strategies run,
        thread count). Keys added after the first checkpoints were written are left out while
        they hold their defaults, so those checkpoints still resume."""
        out = {k: v for k, v in self.to_dict().items() if k not in ("strategies", "threads")}
        for k, default in LATER_DEFAULTS.items():
            if out.get(k) == default:
                del out[k]
        return out

    def ranks(self) -> Optional[List[int]]:
        """Rank of each client (client_ranks cycled), or None when all train at ``rank``."""
        if not self.client_ranks:
            return None
        return [self.client_ranks[i % len(self.client_ranks)] for i in range(self.num_clients)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "FLConfig":
        return FLConfig(**{**self.to_dict(), **changes})


LATER_DEFAULTS = dict(task_type="auto", data=None, eval_file=None, text_column=None, label_column=None,
                      prompt_column=None, response_column=None, dtype="float32", split="auto", min_client_size=1,
                      base="fp32")

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
    if name == "target_modules":
        proto = []
    elif proto is None:  # the optional strings (data, columns): empty unsets
        return None if value == "" else value
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
