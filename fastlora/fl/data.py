"""Data for the federated-learning demo: a real text task, client splits and a toy token task.

* :func:`stdlib_docstrings` - text classification with nothing to download: the docstrings of
  a few standard-library packages of the running Python, labelled by package. The sources are
  parsed with :mod:`ast`, never imported or executed.
* :func:`train_test_split` - stratified, seeded split into train and test indices.
* :func:`dirichlet_split` - the usual non-IID label split across clients (Hsu, Qi & Brown,
  "Measuring the effects of non-identical data distribution for federated visual
  classification", 2019); :func:`iid_split` is the IID baseline; :func:`column_split` is a
  natural partition (one client per value of a column: a user, a site, a hospital).
* :func:`split_summary` / :func:`split_lines` - clients, sizes and label skew of a split.
* :func:`synthetic_token_task` - a small learnable token-classification task for unit tests
  with tiny randomly initialised transformers.
* :func:`tokenize` / :meth:`TokenData.from_texts` - Hugging Face tokenization of a
  :class:`TextDataset`.

Everything is deterministic given its seed: randomness comes only from
``numpy.random.default_rng(seed)``, never from the global torch or numpy generators.
"""
from __future__ import annotations

import ast
import math
import os
import re
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
import torch

__all__ = [
    "STDLIB_PACKAGES",
    "TEST_DIR_NAMES",
    "TextDataset",
    "TokenData",
    "column_split",
    "dirichlet_split",
    "iid_split",
    "split_lines",
    "split_summary",
    "stdlib_docstrings",
    "synthetic_token_task",
    "tokenize",
    "train_test_split",
]

Indices = Union[torch.Tensor, np.ndarray, Sequence[int]]

#: Default classes of :func:`stdlib_docstrings`. Each is shipped with every CPython 3.8-3.13
#: source install (unlike tkinter/idlelib/turtle, which distributions such as Debian split off,
#: or distutils/lib2to3, removed in 3.12/3.13) and yields 150+ texts on each of 3.8-3.13
#: (smallest: unittest, 154 on 3.8, 162 on 3.11). The topics
#: are far enough apart (event loops, e-mail, import machinery, logging, processes, testing,
#: XML, decimal arithmetic) that the task is learnable but not trivial.
STDLIB_PACKAGES: tuple[str, ...] = (
    "asyncio",
    "email",
    "importlib",
    "logging",
    "multiprocessing",
    "unittest",
    "xml",
    "_pydecimal",
)

#: Directory names whose files :func:`stdlib_docstrings` never reads: test code is full of
#: near-duplicate boilerplate docstrings that would make the task easier and noisier.
TEST_DIR_NAMES: frozenset[str] = frozenset({"test", "tests", "idle_test"})

_PAD_ID = 0
_CLS_ID = 1
_FIRST_TOKEN_ID = 2
_MARKERS_PER_CLASS = 3
_MIN_REAL_TOKENS = 4


# --------------------------------------------------------------------------- helpers

def _as_index_array(indices: Indices, n: int, who: str) -> np.ndarray:
    """Validated 1-D int64 numpy copy of ``indices`` (each in ``[0, n)``)."""
    if isinstance(indices, torch.Tensor):
        arr = indices.detach().cpu().numpy()
    else:
        arr = np.asarray(indices)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{who}: indices must be a 1-D sequence of integers, got "
                         f"shape {arr.shape} dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= n:
        raise IndexError(f"{who}: indices must be in [0, {n}), got range "
                         f"[{arr.min()}, {arr.max()}]")
    return arr.astype(np.int64, copy=False)


def _labels_array(labels: torch.Tensor, who: str) -> np.ndarray:
    """Validated numpy view of a 1-D integer label tensor."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{who}: labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype.is_complex \
            or labels.dtype == torch.bool:
        raise ValueError(f"{who}: labels must be a 1-D integer tensor, got shape "
                         f"{tuple(labels.shape)} dtype {labels.dtype}")
    return labels.detach().cpu().numpy().astype(np.int64, copy=False)


def _index_tensors(groups: Sequence[np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(np.sort(np.asarray(g, dtype=np.int64))) for g in groups]


# --------------------------------------------------------------------------- datasets

@dataclass
class TextDataset:
    """Texts with integer class labels.

    Attributes:
        texts: the samples.
        labels: int64 tensor of shape ``(len(texts),)``, values in ``[0, num_classes)``.
        label_names: name of each class; ``label_names[k]`` names label ``k``.
    """

    texts: list[str]
    labels: torch.Tensor
    label_names: list[str]

    def __post_init__(self) -> None:
        if not isinstance(self.labels, torch.Tensor) or self.labels.dtype != torch.int64 \
                or self.labels.dim() != 1:
            raise ValueError("TextDataset: labels must be a 1-D int64 tensor, got "
                             f"{getattr(self.labels, 'dtype', type(self.labels))} of shape "
                             f"{tuple(getattr(self.labels, 'shape', ()))}")
        if self.labels.numel() != len(self.texts):
            raise ValueError(f"TextDataset: {len(self.texts)} texts but "
                             f"{self.labels.numel()} labels")
        if self.labels.numel() and (int(self.labels.min()) < 0
                                    or int(self.labels.max()) >= len(self.label_names)):
            raise ValueError(f"TextDataset: labels must be in [0, {len(self.label_names)}), got "
                             f"[{int(self.labels.min())}, {int(self.labels.max())}]")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(label_names)``), including ones with no samples here."""
        return len(self.label_names)

    def subset(self, indices: Indices) -> "TextDataset":
        """The samples at ``indices``, in that order (same ``label_names``)."""
        idx = _as_index_array(indices, len(self), "TextDataset.subset")
        return TextDataset(texts=[self.texts[i] for i in idx.tolist()],
                           labels=self.labels[torch.from_numpy(idx)].clone(),
                           label_names=list(self.label_names))

    def class_counts(self) -> torch.Tensor:
        """int64 tensor of shape ``(num_classes,)``: samples per class."""
        return torch.bincount(self.labels, minlength=self.num_classes)


@dataclass
class TokenData:
    """Tokenized samples ready for a sequence-classification model.

    Attributes:
        input_ids: int64 tensor ``(N, L)``.
        attention_mask: int64 tensor ``(N, L)``; 1 on real tokens, 0 on padding.
        labels: int64 tensor ``(N,)``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("input_ids", "attention_mask", "labels"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
                raise ValueError(f"TokenData: {name} must be an int64 tensor, got "
                                 f"{getattr(t, 'dtype', type(t).__name__)}")
        if self.input_ids.dim() != 2 or self.attention_mask.shape != self.input_ids.shape:
            raise ValueError("TokenData: input_ids and attention_mask must both be (N, L), got "
                             f"{tuple(self.input_ids.shape)} and "
                             f"{tuple(self.attention_mask.shape)}")
        if self.labels.shape != (self.input_ids.shape[0],):
            raise ValueError(f"TokenData: labels must be ({self.input_ids.shape[0]},), got "
                             f"{tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: Indices) -> "TokenData":
        """The samples at ``indices``, in that order."""
        idx = torch.from_numpy(_as_index_array(indices, len(self), "TokenData.subset"))
        return TokenData(self.input_ids[idx].clone(), self.attention_mask[idx].clone(),
                         self.labels[idx].clone())

    @classmethod
    def from_texts(cls, ds: TextDataset, tokenizer, max_length: int) -> "TokenData":
        """Tokenize ``ds.texts`` with a Hugging Face tokenizer (see :func:`tokenize`)."""
        input_ids, attention_mask = tokenize(ds.texts, tokenizer, max_length)
        return cls(input_ids, attention_mask, ds.labels.clone())


# --------------------------------------------------------------------------- stdlib task

def _package_files(root: Path, name: str) -> list[Path]:
    """Source files of stdlib package/module ``name`` under ``root``, test dirs excluded."""
    if not name or not all(part.isidentifier() for part in name.split(".")):
        raise ValueError(f"stdlib_docstrings: {name!r} is not a package name")
    base = root.joinpath(*name.split("."))
    if base.is_dir():
        files = []
        for path in base.rglob("*.py"):
            rel = path.relative_to(base)
            if not TEST_DIR_NAMES.intersection(rel.parts[:-1]):
                files.append(path)
        # Sorting by the relative POSIX path makes the walk independent of the file system's
        # directory order and of the platform's path separator.
        return sorted(files, key=lambda p: p.relative_to(base).as_posix())
    module = base.with_name(base.name + ".py")
    if module.is_file():
        return [module]
    raise ValueError(f"stdlib_docstrings: unknown standard-library package {name!r}: "
                     f"neither the directory {base} nor the file {module} exists")


def _docstring_nodes(node: ast.AST) -> Iterator[ast.AST]:
    # ast.walk is breadth-first; this depth-first walk yields docstrings in source order.
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        yield node
    for child in ast.iter_child_nodes(node):
        yield from _docstring_nodes(child)


def _file_docstrings(path: Path) -> list[str] | None:
    """Raw docstrings of the module, classes and functions in ``path``; None if unparsable."""
    try:
        source = path.read_bytes()
        # Old or odd files may trigger SyntaxWarning/DeprecationWarning (invalid escapes);
        # they are parsed, not run, so those warnings mean nothing here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(source, filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        # ValueError: source with NUL bytes. Parsing bytes lets ast honour PEP 263 coding
        # cookies; a file that still cannot be decoded or parsed has nothing to give.
        return None
    docs = []
    for node in _docstring_nodes(tree):
        doc = ast.get_docstring(node, clean=True)
        if doc:
            docs.append(doc)
    return docs


_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def _first_paragraph(doc: str) -> str:
    return " ".join(_PARAGRAPH_BREAK.split(doc.strip(), maxsplit=1)[0].split())


def _stdlib_root(stdlib_dir: str | os.PathLike | None) -> Path:
    root = Path(sysconfig.get_paths()["stdlib"] if stdlib_dir is None else stdlib_dir)
    # os.py is imported at every interpreter start-up, so a stdlib with sources always has it;
    # its absence means a zipped, .pyc-only or otherwise stripped installation.
    if not (root / "os.py").is_file():
        raise FileNotFoundError(
            f"stdlib_docstrings: standard-library sources not found: {root / 'os.py'} does not "
            "exist. This Python seems to be installed without its .py sources (a zipped, "
            ".pyc-only or embeddable distribution); use a Python with the full standard "
            "library sources, or pass stdlib_dir=...")
    return root


def stdlib_docstrings(packages: Sequence[str] = STDLIB_PACKAGES, *,
                      max_per_class: int | None = 400, min_words: int = 4, seed: int = 0,
                      stdlib_dir: str | os.PathLike | None = None) -> TextDataset:
    """Docstrings of standard-library packages, labelled by package: a text task with no download.

    Every ``.py`` file of each package (``<stdlib>/<name>/**/*.py``, or the single module
    ``<stdlib>/<name>.py``; a dotted name such as ``"xml.etree"`` names a subpackage) is read in
    sorted order and parsed with :mod:`ast` - never imported or executed. Files under
    directories named in :data:`TEST_DIR_NAMES` are skipped, and so are files that do not parse
    or decode. From the module, class and function docstrings the first paragraph is kept, with
    whitespace collapsed; texts with fewer than ``min_words`` words are dropped. A text repeated
    within one package is kept once; a text found in two or more packages is dropped from all of
    them, since its label would be ambiguous.

    Args:
        packages: one class per package; the label of a text is the index of its package.
        max_per_class: cap on texts per class. A larger class keeps a random subset (drawn with
            ``numpy.random.default_rng(seed)``, classes in order) in its original order.
            None keeps everything.
        min_words: minimum number of whitespace-separated words.
        seed: seed of the subsampling.
        stdlib_dir: where the standard-library sources are; default
            ``sysconfig.get_paths()["stdlib"]`` of the running Python.

    Returns:
        A :class:`TextDataset` grouped by class (all of class 0, then class 1, ...), each class
        in source order, with ``label_names = list(packages)``.

    Raises:
        FileNotFoundError: the standard-library sources are not installed.
        ValueError: an unknown, repeated or overlapping package name, bad arguments, or a
            package that yields no text.
    """
    packages = list(packages)
    if not packages:
        raise ValueError("stdlib_docstrings: packages is empty")
    if len(set(packages)) != len(packages):
        raise ValueError(f"stdlib_docstrings: packages contains duplicates: {packages}")
    for a in packages:
        for b in packages:
            if a != b and b.startswith(a + "."):
                raise ValueError(f"stdlib_docstrings: {b!r} is inside {a!r}; the classes would "
                                 "share files")
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"stdlib_docstrings: max_per_class must be >= 1 or None, "
                         f"got {max_per_class}")
    if min_words < 1:
        raise ValueError(f"stdlib_docstrings: min_words must be >= 1, got {min_words}")

    root = _stdlib_root(stdlib_dir)
    files = {name: _package_files(root, name) for name in packages}

    per_class: list[list[str]] = []
    num_parsed: list[int] = []
    for name in packages:
        # A dict keeps the first occurrence's position, so duplicates within a package
        # collapse without reordering.
        texts: dict[str, None] = {}
        parsed = 0
        for path in files[name]:
            docs = _file_docstrings(path)
            if docs is None:
                continue
            parsed += 1
            for doc in docs:
                text = _first_paragraph(doc)
                if len(text.split()) >= min_words:
                    texts.setdefault(text, None)
        per_class.append(list(texts))
        num_parsed.append(parsed)

    seen_in: dict[str, int] = {}
    for texts in per_class:
        for text in texts:
            seen_in[text] = seen_in.get(text, 0) + 1
    per_class = [[t for t in texts if seen_in[t] == 1] for texts in per_class]

    rng = np.random.default_rng(seed)
    all_texts: list[str] = []
    all_labels: list[int] = []
    for label, (name, texts) in enumerate(zip(packages, per_class)):
        if not texts:
            raise ValueError(
                f"stdlib_docstrings: package {name!r} yielded no docstring with >= {min_words} "
                f"words not shared with another package ({len(files[name])} source files, "
                f"{num_parsed[label]} parsed)")
        if max_per_class is not None and len(texts) > max_per_class:
            keep = np.sort(rng.choice(len(texts), size=max_per_class, replace=False))
            texts = [texts[i] for i in keep.tolist()]
        all_texts.extend(texts)
        all_labels.extend([label] * len(texts))
    return TextDataset(texts=all_texts, labels=torch.tensor(all_labels, dtype=torch.int64),
                       label_names=packages)


# --------------------------------------------------------------------------- splits

def train_test_split(labels: torch.Tensor, test_fraction: float,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified split of ``range(len(labels))`` into train and test indices.

    Each class sends ``round(test_fraction * n_c)`` of its ``n_c`` samples (chosen with
    ``numpy.random.default_rng(seed)``) to the test side, clamped so that a class with at least
    two samples has at least one on each side; a class with a single sample goes to train.

    Returns:
        ``(train_idx, test_idx)``: sorted int64 tensors partitioning ``range(len(labels))``.
    """
    y = _labels_array(labels, "train_test_split")
    test_fraction = float(test_fraction)
    if not (0.0 < test_fraction < 1.0):
        raise ValueError(f"train_test_split: test_fraction must be in (0, 1), "
                         f"got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n = idx.size
        # floor(x + 0.5) rather than round(): Python's round() goes to even on ties.
        n_test = int(math.floor(test_fraction * n + 0.5))
        n_test = min(max(n_test, 1), n - 1) if n >= 2 else 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    if not train:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty.clone()
    tr, te = _index_tensors([np.concatenate(train), np.concatenate(test)])
    return tr, te


def dirichlet_split(labels: torch.Tensor, num_clients: int, alpha: float, seed: int, *,
                    min_size: int = 1, max_tries: int = 100) -> list[torch.Tensor]:
    """Non-IID label split across clients with Dirichlet class proportions (Hsu et al., 2019).

    For each class (ascending label) its indices are shuffled and cut into ``num_clients``
    consecutive pieces with sizes proportional to ``p ~ Dirichlet(alpha * ones(num_clients))``.
    Small ``alpha`` gives each client few classes; large ``alpha`` approaches an IID split. If
    some client ends with fewer than ``min_size`` samples, the whole split is drawn again from
    the continuing random stream, up to ``max_tries`` times.

    Args:
        labels: 1-D integer tensor of class labels.
        num_clients: number of clients (>= 1).
        alpha: Dirichlet concentration (> 0, finite).
        seed: seed of ``numpy.random.default_rng``; the split is a function of it.
        min_size: minimum number of samples per client.
        max_tries: number of draws before giving up.

    Returns:
        ``num_clients`` sorted int64 index tensors partitioning ``range(len(labels))``.

    Raises:
        ValueError: bad arguments, or no draw met ``min_size`` within ``max_tries``.
    """
    y = _labels_array(labels, "dirichlet_split")
    alpha = float(alpha)
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"dirichlet_split: alpha must be positive and finite, got {alpha}")
    if num_clients < 1:
        raise ValueError(f"dirichlet_split: num_clients must be >= 1, got {num_clients}")
    if min_size < 0:
        raise ValueError(f"dirichlet_split: min_size must be >= 0, got {min_size}")
    if max_tries < 1:
        raise ValueError(f"dirichlet_split: max_tries must be >= 1, got {max_tries}")
    if num_clients * min_size > y.size:
        raise ValueError(f"dirichlet_split: {num_clients} clients x min_size {min_size} needs "
                         f"{num_clients * min_size} samples, only {y.size} available")

    rng = np.random.default_rng(seed)
    class_indices = [np.flatnonzero(y == c) for c in np.unique(y)]
    sizes: list[int] = []
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in class_indices:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(num_clients, alpha))
            if not np.all(np.isfinite(p)) or p.sum() <= 0:
                # Tiny alpha can underflow every component; Dirichlet(alpha -> 0) tends to a
                # one-hot vector at a uniformly random position, so use that.
                p = np.zeros(num_clients)
                p[rng.integers(num_clients)] = 1.0
            # Cutting at rounded cumulative fractions keeps the rounding error of every piece
            # below one sample instead of letting it pile up on the last client.
            cuts = np.round(np.cumsum(p)[:-1] / p.sum() * idx.size).astype(np.int64)
            for client, piece in enumerate(np.split(idx, np.clip(cuts, 0, idx.size))):
                parts[client].append(piece)
        groups = [np.concatenate(ps) if ps else np.zeros(0, dtype=np.int64) for ps in parts]
        sizes = [g.size for g in groups]
        if min(sizes) >= min_size:
            return _index_tensors(groups)
    raise ValueError(
        f"dirichlet_split: no split gave every client >= {min_size} samples in {max_tries} "
        f"draws (alpha={alpha}, num_clients={num_clients}, {y.size} samples; last draw's "
        f"smallest client had {min(sizes)}); raise alpha or lower num_clients or min_size")


def iid_split(n: int, num_clients: int, seed: int) -> list[torch.Tensor]:
    """IID split of ``range(n)``: a seeded shuffle cut into ``num_clients`` near-equal parts.

    Returns:
        ``num_clients`` sorted int64 index tensors partitioning ``range(n)``; sizes differ by
        at most one.
    """
    if num_clients < 1:
        raise ValueError(f"iid_split: num_clients must be >= 1, got {num_clients}")
    if n < num_clients:
        raise ValueError(f"iid_split: {n} samples cannot give each of {num_clients} clients one")
    perm = np.random.default_rng(seed).permutation(n)
    return _index_tensors(np.array_split(perm, num_clients))


def column_split(values: Sequence) -> tuple[list, list[torch.Tensor]]:
    """Natural split of ``range(len(values))``: one client per distinct value.

    Returns:
        ``(client values, index tensors)``: the distinct values sorted (numbers numerically,
        anything else by its string) and, for each, the sorted int64 indices of its rows.

    Raises:
        ValueError: a missing value (None or ``""``); every row needs a client.
    """
    values = list(values)
    missing = [i for i, v in enumerate(values) if v is None or v == ""]
    if missing:
        raise ValueError(f"column_split: {len(missing)} row(s) have no value (first: row {missing[0]}); "
                         "every row needs a client")
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    keys = sorted(set(values), key=(lambda v: v) if numeric else (lambda v: str(v)))
    rows: dict = {k: [] for k in keys}
    for i, v in enumerate(values):
        rows[v].append(i)
    return keys, _index_tensors([np.asarray(rows[k], dtype=np.int64) for k in keys])


def split_summary(parts: Sequence[torch.Tensor], labels: torch.Tensor | None = None,
                  label_names: Sequence[str] | None = None, names: Sequence | None = None) -> list[dict]:
    """One dict per client: ``client`` (its number), ``samples``, with ``names`` its ``value``
    (a column split), and with ``labels`` (indexed by the parts' indices) the label skew:
    ``label_counts`` (``{label name: count}``, nonzero ones), ``majority_label`` and
    ``majority_share`` (the fraction of its samples with that label)."""
    out = []
    for c, idx in enumerate(parts):
        row: dict = {"client": c}
        if names is not None:
            row["value"] = names[c]
        row["samples"] = int(idx.numel())
        if labels is not None and idx.numel():
            counts = torch.bincount(labels[idx], minlength=len(label_names or ())).tolist()
            name = (lambda k: label_names[k]) if label_names is not None else str
            row["label_counts"] = {name(k): n for k, n in enumerate(counts) if n}
            top = max(range(len(counts)), key=lambda k: counts[k])
            row["majority_label"] = name(top)
            row["majority_share"] = counts[top] / idx.numel()
        out.append(row)
    return out


def split_lines(clients: Sequence[dict], column: str | None = None, max_clients: int = 12) -> list[str]:
    """Printable lines of a :func:`split_summary` (at most ``max_clients`` clients listed;
    ``column``: the name of the column whose values the clients are)."""
    sizes = [c["samples"] for c in clients]
    span = f"{min(sizes)}" if min(sizes) == max(sizes) else f"{min(sizes)}-{max(sizes)}"
    head = f"{len(clients)} client{'s' if len(clients) != 1 else ''}, {span} training samples each"
    shares = [c["majority_share"] for c in clients if "majority_share" in c]
    if shares:
        head += f"; majority-label share {100 * min(shares):.0f}%-{100 * max(shares):.0f}%"
    lines = [head]
    for c in clients[:max_clients]:
        who = f"client {c['client']}" + (f" ({column or 'value'}={c['value']})" if "value" in c else "")
        line = f"  {who}: {c['samples']} samples"
        if "majority_label" in c:
            line += f", majority label {c['majority_label']} ({100 * c['majority_share']:.0f}%)"
        lines.append(line)
    if len(clients) > max_clients:
        lines.append(f"  ... and {len(clients) - max_clients} more (all in split.json)")
    return lines


# --------------------------------------------------------------------------- token tasks

def synthetic_token_task(num_samples: int, num_classes: int, *, vocab_size: int = 128,
                         seq_len: int = 16, seed: int = 0) -> TokenData:
    """A small learnable sequence-classification task for tests with tiny transformers.

    Token ids: 0 is padding, 1 is a CLS token starting every sample, ids ``>= 2`` are content.
    Each class owns three "marker" ids (disjoint across classes, randomly chosen); the other
    content ids are noise. A sample has ``4..seq_len`` real tokens: CLS, then random noise
    ids, with 1-3 markers of its own class written at random positions; the rest of the row is
    padding (``attention_mask`` 0). Classes are balanced (sizes differ by at most one), in
    random order. The label is recoverable from which markers occur, so even a bag-of-tokens
    linear model learns it.

    Returns:
        :class:`TokenData` with ``input_ids``/``attention_mask`` of shape
        ``(num_samples, seq_len)`` and ``labels`` of shape ``(num_samples,)``.
    """
    if num_samples < 1:
        raise ValueError(f"synthetic_token_task: num_samples must be >= 1, got {num_samples}")
    if num_classes < 2:
        raise ValueError(f"synthetic_token_task: num_classes must be >= 2, got {num_classes}")
    if seq_len < _MIN_REAL_TOKENS:
        raise ValueError(f"synthetic_token_task: seq_len must be >= {_MIN_REAL_TOKENS}, "
                         f"got {seq_len}")
    num_markers = num_classes * _MARKERS_PER_CLASS
    # At least as many noise ids as markers, so noise is not a handful of repeated tokens.
    min_vocab = _FIRST_TOKEN_ID + 2 * num_markers
    if vocab_size < min_vocab:
        raise ValueError(f"synthetic_token_task: vocab_size must be >= {min_vocab} for "
                         f"{num_classes} classes, got {vocab_size}")

    rng = np.random.default_rng(seed)
    content = rng.permutation(np.arange(_FIRST_TOKEN_ID, vocab_size))
    markers = content[:num_markers].reshape(num_classes, _MARKERS_PER_CLASS)
    noise = content[num_markers:]

    labels = rng.permutation(np.arange(num_samples) % num_classes)
    lengths = rng.integers(_MIN_REAL_TOKENS, seq_len + 1, size=num_samples)
    ids = rng.choice(noise, size=(num_samples, seq_len))
    ids[:, 0] = _CLS_ID
    for i in range(num_samples):
        length = int(lengths[i])
        k = int(rng.integers(1, _MARKERS_PER_CLASS + 1))
        positions = 1 + rng.choice(length - 1, size=k, replace=False)
        ids[i, positions] = rng.choice(markers[labels[i]], size=k)
    mask = np.arange(seq_len)[None, :] < lengths[:, None]
    ids[~mask] = _PAD_ID
    return TokenData(input_ids=torch.from_numpy(ids.astype(np.int64)),
                     attention_mask=torch.from_numpy(mask.astype(np.int64)),
                     labels=torch.from_numpy(labels.astype(np.int64)))


def tokenize(texts: list[str], tokenizer, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize ``texts`` with a Hugging Face tokenizer, padded and truncated to ``max_length``.

    Args:
        texts: the strings.
        tokenizer: a ``transformers`` tokenizer (e.g. from ``AutoTokenizer.from_pretrained``),
            with a pad token.
        max_length: length of every row.

    Returns:
        ``(input_ids, attention_mask)``, int64 tensors of shape ``(len(texts), max_length)``.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("tokenize: texts is empty")
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("tokenize: texts must be strings")
    if max_length < 1:
        raise ValueError(f"tokenize: max_length must be >= 1, got {max_length}")
    if getattr(tokenizer, "pad_token", None) is None:
        raise ValueError("tokenize: the tokenizer has no pad token, so rows cannot be padded to "
                         "max_length; set one first (e.g. tokenizer.pad_token = "
                         "tokenizer.eos_token)")
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt")
    return enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64)
