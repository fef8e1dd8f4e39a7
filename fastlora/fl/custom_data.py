"""Your own data for the federated loop: local files read into columns, labels mapped to ids,
causal-LM samples tokenized with their loss mask.

* :func:`read_table` - a JSONL / JSON / CSV / Parquet file or a ``datasets.save_to_disk``
  folder as a :class:`Table` of columns. JSON and CSV need only the standard library; Parquet
  needs ``pyarrow`` and a saved folder ``datasets`` (both in the ``fl`` extra), imported only
  when such a file is read.
* :func:`map_labels` - label values (strings or numbers) to ids in sorted order.
* :func:`causal_lm_tokens` - token ids, attention mask and labels of a causal LM: every real
  token a target (a text column) or only the response's tokens (a prompt / response pair), -100
  everywhere else.
* :func:`fingerprint` - a digest of a file or folder, so a checkpoint knows the data it was
  trained on.

Every problem with the data is a ``ValueError`` whose message names the file and the column.
"""
from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["Table", "read_table", "map_labels", "causal_lm_tokens", "fingerprint", "FORMATS"]

FORMATS = ".jsonl / .json (JSON lines or an array of objects), .csv, .parquet, or a datasets.save_to_disk folder"
_JSON = (".jsonl", ".json", ".ndjson")
_PARQUET = (".parquet", ".pq")
_SAVED_FOLDER_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
# Splits of a saved DatasetDict: the first found trains; the first of the others evaluates.
_TRAIN_SPLITS = ("train",)
_EVAL_SPLITS = ("test", "validation", "eval")
_INT = re.compile(r"[+-]?\d+")


@dataclass
class Table:
    """Rows of a data file as columns (``{name: [value per row]}``), all of the same length.

    ``typed``: whether values keep their types (JSON, Parquet, saved folders) or are all
    strings (CSV, whose integer-looking labels :func:`map_labels` reads as numbers)."""
    columns: Dict[str, list]
    source: str
    typed: bool = True
    num_rows: int = field(init=False)

    def __post_init__(self):
        lengths = {len(v) for v in self.columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"data: the columns of {self.source} have different lengths {sorted(lengths)}")
        self.num_rows = lengths.pop() if lengths else 0

    def __len__(self) -> int:
        return self.num_rows

    def column(self, name: str, flag: str) -> list:
        """The values of column ``name`` (``flag``: the option that named it, for the message)."""
        if name not in self.columns:
            raise ValueError(f"data: no column {name!r} ({flag}) in {self.source}; its columns are: "
                             f"{', '.join(map(repr, self.columns)) or 'none'}")
        return self.columns[name]

    def texts(self, name: str, flag: str) -> List[str]:
        """Column ``name`` as strings; a missing value (null) is an error naming its row."""
        values = self.column(name, flag)
        missing = [i for i, v in enumerate(values) if v is None]
        if missing:
            raise ValueError(f"data: column {name!r} ({flag}) of {self.source} has no value in {len(missing)} "
                             f"row(s) (first: row {missing[0]})")
        return [v if isinstance(v, str) else str(v) for v in values]

    def subset(self, rows: Sequence[int]) -> "Table":
        return Table({k: [v[i] for i in rows] for k, v in self.columns.items()}, self.source, self.typed)


def _read_json(path: Path) -> Table:
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"data: {path} is not valid JSON ({e})") from None
        numbered = list(enumerate(rows, 1))
    else:  # JSON lines: one object per line, blank lines skipped
        numbered = []
        for no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    numbered.append((no, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"data: line {no} of {path} is not JSON ({e.msg})") from None
    columns: Dict[str, list] = {}
    for i, (no, row) in enumerate(numbered):
        if not isinstance(row, dict):
            raise ValueError(f"data: {'item' if text.lstrip().startswith('[') else 'line'} {no} of {path} is "
                             f"a JSON {type(row).__name__}, not an object of column values")
        for k in row:
            if k not in columns:
                columns[k] = [None] * i   # a column first seen here is missing in the rows before
        for k, v in columns.items():
            v.append(row.get(k))
    return Table(columns, str(path))


def _read_csv(path: Path) -> Table:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise ValueError(f"data: {path} has no header row (a CSV file's first row names its columns)")
        names = list(reader.fieldnames)
        columns: Dict[str, list] = {n: [] for n in names}
        for row in reader:
            if None in row:
                raise ValueError(f"data: row {reader.line_num} of {path} has more cells than the header "
                                 f"names ({len(names)})")
            for n in names:
                v = row[n]
                columns[n].append(None if v is None else v)
    return Table(columns, str(path), typed=False)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _need(module: str, what: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"data: reading {what} needs the {module.split('.')[0]} package: pip install "
                         f"{module.split('.')[0]} (it is in fastlora's fl extra)") from None


def _read_parquet(path: Path) -> Table:
    pq = _need("pyarrow.parquet", f"a Parquet file ({path})")
    try:
        return Table(pq.read_table(str(path)).to_pydict(), str(path))
    except Exception as e:  # noqa: BLE001 - pyarrow's errors have no common base worth naming
        raise ValueError(f"data: cannot read {path} as Parquet: {_first_line(e)}") from None


def _read_saved(path: Path) -> Tuple[Table, Optional[Table]]:
    datasets = _need("datasets", f"a datasets.save_to_disk folder ({path})")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"data: cannot load {path} with datasets.load_from_disk: {_first_line(e)}") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        train = next((s for s in _TRAIN_SPLITS if s in ds), None)
        if train is None:
            if len(splits) != 1:
                raise ValueError(f"data: {path} holds the splits {splits}; fastlora fl trains on 'train' (and "
                                 f"evaluates on one of {list(_EVAL_SPLITS)})")
            train = splits[0]
        ev = next((s for s in _EVAL_SPLITS if s in ds), None)
        return (Table(ds[train].to_dict(), f"{path} [{train}]"),
                Table(ds[ev].to_dict(), f"{path} [{ev}]") if ev else None)
    return Table(ds.to_dict(), str(path)), None


def read_table(path) -> Tuple[Table, Optional[Table]]:
    """``(rows, evaluation rows or None)`` of a data file or folder (see :data:`FORMATS`). A
    saved ``DatasetDict`` gives its ``train`` split and, as evaluation rows, its ``test`` /
    ``validation`` / ``eval`` split when it has one; every other source gives ``None``."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"data: no such file or folder: {path}")
    if p.is_dir():
        if not any((p / f).is_file() for f in _SAVED_FOLDER_FILES):
            raise ValueError(f"data: {path} is a folder but not a datasets.save_to_disk folder (none of "
                             f"{', '.join(_SAVED_FOLDER_FILES)}); a file must be one of {FORMATS}")
        main, ev = _read_saved(p)
    else:
        suffix = p.suffix.lower()
        readers = {**{s: _read_json for s in _JSON}, ".csv": _read_csv, **{s: _read_parquet for s in _PARQUET}}
        if suffix not in readers:
            raise ValueError(f"data: cannot tell the format of {path} from its suffix {suffix or '(none)'!r}; "
                             f"use {FORMATS}")
        try:
            main = readers[suffix](p)
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise ValueError(f"data: cannot read {path}: {_first_line(e)}") from None
        ev = None
    if len(main) == 0:
        raise ValueError(f"data: {main.source} has no rows")
    return main, ev


def _label_values(table: Table, name: str, flag: str) -> list:
    values = table.column(name, flag)
    missing = [i for i, v in enumerate(values) if v is None or v == ""]
    if missing:
        raise ValueError(f"data: label column {name!r} of {table.source} is empty in {len(missing)} row(s) "
                         f"(first: row {missing[0]})")
    if not table.typed and all(_INT.fullmatch(v.strip()) for v in values):
        return [int(v) for v in values]   # CSV cells are text; "10" must sort after "9"
    return values


def map_labels(train: Table, name: str, flag: str, eval_table: Optional[Table] = None
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor], list]:
    """``(train ids, eval ids or None, label values)``: the distinct label values of ``train``
    sorted (numbers numerically, strings lexicographically), label ``k`` = ``values[k]``.
    An evaluation label the training data lacks is an error, and so is a single class."""
    values = _label_values(train, name, flag)
    kinds = {"number" if isinstance(v, (int, float)) else type(v).__name__ for v in values}
    if len(kinds) > 1 or not kinds <= {"number", "str"}:
        raise ValueError(f"data: label column {name!r} of {train.source} mixes value types "
                         f"({', '.join(sorted(kinds))}); labels must be all strings or all numbers")
    classes = sorted(set(values))
    if len(classes) < 2:
        raise ValueError(f"data: label column {name!r} of {train.source} has a single class ({classes[0]!r}); "
                         f"classification needs at least two")
    index = {v: i for i, v in enumerate(classes)}
    ids = torch.tensor([index[v] for v in values], dtype=torch.int64)
    eval_ids = None
    if eval_table is not None:
        ev = _label_values(eval_table, name, flag)
        unknown = sorted({v for v in ev if v not in index}, key=str)
        if unknown:
            raise ValueError(f"data: the evaluation data ({eval_table.source}) has label(s) {unknown[:5]} that "
                             f"the training data lacks; its labels are {classes[:20]}")
        eval_ids = torch.tensor([index[v] for v in ev], dtype=torch.int64)
    return ids, eval_ids, classes


def causal_lm_tokens(tokenizer, max_length: int, texts: Optional[Sequence[str]] = None,
                     prompts: Optional[Sequence[str]] = None, responses: Optional[Sequence[str]] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal-LM samples: ``(input_ids, attention_mask, labels, kept)``.

    With ``texts``: each text's tokens (with the tokenizer's special tokens) and its EOS token;
    every real token is a target. With ``prompts`` and ``responses``: the prompt's tokens, then
    the response's and an EOS token; only the response's (and EOS) are targets, so the loss is
    on the response alone. Rows are cut at ``max_length``, right-padded to the longest kept
    row; labels are -100 on non-targets and padding (the model shifts them: position t's
    logits predict label t+1, so a sample needs a target after its first token).

    ``kept``: bool ``(len(samples),)``, False for a sample with no target left within
    ``max_length`` (its prompt fills it); such rows are not in the tensors."""
    if (texts is None) == (prompts is None) or (prompts is None) != (responses is None):
        raise ValueError("causal_lm_tokens: give texts, or prompts and responses")
    pad = tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    if pad is None:
        raise ValueError("causal_lm_tokens: the tokenizer has no pad token")
    tail = [] if eos is None else [eos]
    rows, targets = [], []
    if texts is not None:
        for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]:
            ids = list(ids) + (tail if not ids or ids[-1] != eos else [])
            rows.append(ids)
            targets.append(ids)
    else:
        if len(prompts) != len(responses):
            raise ValueError(f"causal_lm_tokens: {len(prompts)} prompts but {len(responses)} responses")
        p_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
        # the response is tokenized on its own so that exactly its tokens are the targets
        r_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
        for p, r in zip(p_ids, r_ids):
            r = list(r) + tail
            rows.append(list(p) + r)
            targets.append([-100] * len(p) + r)
    kept = []
    for ids, lab in zip(rows, targets):
        lab = lab[:max_length]
        kept.append(any(t != -100 for t in lab[1:]))
    keep = torch.tensor(kept, dtype=torch.bool)
    chosen = [i for i, k in enumerate(kept) if k]
    length = max((min(len(rows[i]), max_length) for i in chosen), default=1)
    n = len(chosen)
    input_ids = torch.full((n, length), pad, dtype=torch.int64)
    mask = torch.zeros((n, length), dtype=torch.int64)
    labels = torch.full((n, length), -100, dtype=torch.int64)
    for row, i in enumerate(chosen):
        ids, lab = rows[i][:max_length], targets[i][:max_length]
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
        mask[row, :len(ids)] = 1
        labels[row, :len(lab)] = torch.tensor(lab, dtype=torch.int64)
    return input_ids, mask, labels, keep


def fingerprint(path) -> str:
    """SHA-256 of a file's bytes, or of a folder's files (relative paths and bytes, sorted)."""
    p = Path(path).expanduser()
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(f.relative_to(p).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
