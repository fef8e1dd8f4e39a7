"""Tests for fastlora.fl.report: metric files, tables, summaries and the accuracy-vs-bytes plot."""
import csv
import importlib
import json
import math
import struct
import subprocess
import sys

import pytest

from fastlora.fl import report
from fastlora.fl.report import (RECORD_FIELDS, format_density, format_mb, plot_accuracy_vs_bytes, results_table,
                                summarise, time_split_table, write_metrics)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FEDAVG = "fedavg"
FLASC = "flasc up=1/16 down=1/4"


def _rec(run, strategy, rnd, acc, loss, up, down, cum, train, comm, agg, failed=0):
    return {"run": run, "strategy": strategy, "round": rnd, "accuracy": acc, "loss": loss, "up_bytes": up,
            "down_bytes": down, "cum_bytes": cum, "dense_up_bytes": 4_000_000, "dense_down_bytes": 4_000_000,
            "clients": 10, "failed": failed, "train_s": train, "comm_s": comm, "agg_s": agg}


@pytest.fixture
def records():
    # fedavg: 4 MB up + 4 MB down a round (= the dense cost); evaluated in rounds 1 and 3 only.
    # flasc: 0.25 MB up + 1 MB down a round; best accuracy (round 2) is not the final one.
    return [
        _rec(FEDAVG, "fedavg", 1, 0.5, 1.25, 4_000_000, 4_000_000, 8_000_000, 1.0, 0.5, 0.5),
        _rec(FEDAVG, "fedavg", 2, None, None, 4_000_000, 4_000_000, 16_000_000, 1.0, 0.5, 0.5, failed=2),
        _rec(FEDAVG, "fedavg", 3, 0.7, 0.75, 4_000_000, 4_000_000, 24_000_000, 1.0, 0.5, 0.5),
        _rec(FLASC, "flasc", 1, 0.4, 1.5, 250_000, 1_000_000, 1_250_000, 1.0, 0.25, 0.25),
        _rec(FLASC, "flasc", 2, 0.6, 1.0, 250_000, 1_000_000, 2_500_000, 1.0, 0.25, 0.25),
        _rec(FLASC, "flasc", 3, 0.55, 1.125, 250_000, 1_000_000, 3_750_000, 1.0, 0.25, 0.25),
    ]


RUN_INFO = {
    FEDAVG: {"up_density": 1.0, "down": "dense", "values": "fp32"},
    FLASC: {"up_density": 0.0625, "down": "sparse 1/4", "values": "fp16"},
}


@pytest.fixture
def summaries(records):
    return summarise(records, RUN_INFO, baseline_run=FEDAVG)


# ------------------------------------------------------------------------------------------ files

def test_csv_round_trips(records, tmp_path):
    paths = write_metrics(records, tmp_path / "a" / "b")  # nested out_dir is created
    assert paths["csv"] == tmp_path / "a" / "b" / "metrics.csv"
    with open(paths["csv"], newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == list(RECORD_FIELDS)
    assert len(rows) == len(records)
    for row, rec in zip(rows, records):
        for key, value in rec.items():
            cell = row[key]
            if value is None:
                assert cell == ""
            elif isinstance(value, str):
                assert cell == value
            elif isinstance(value, int):
                assert int(cell) == value
            else:
                assert float(cell) == value  # exact: floats are written at repr precision
    # atomic writes leave no temporary files behind
    assert sorted(p.name for p in paths["csv"].parent.iterdir()) == ["metrics.csv", "metrics.json"]


def test_csv_extra_keys_go_after_the_standard_columns(records, tmp_path):
    records[0]["lr"] = 0.01
    paths = write_metrics(records, tmp_path)
    with open(paths["csv"], newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == list(RECORD_FIELDS) + ["lr"]
    assert rows[0]["lr"] == "0.01" and rows[1]["lr"] == ""


def test_json_loads(records, summaries, tmp_path):
    paths = write_metrics(records, tmp_path, summaries)
    data = json.loads(paths["json"].read_text())
    assert set(data) == {"records", "summaries"}
    assert data["records"] == records
    assert data["summaries"] == summaries

    # without summaries: still an object, with an empty summaries list; overwriting works
    records[0]["loss"] = float("nan")  # non-finite -> null, so the file stays strict JSON
    paths = write_metrics(records, tmp_path)
    text = paths["json"].read_text()
    assert "NaN" not in text
    data = json.loads(text)
    assert data["summaries"] == []
    assert data["records"][0]["loss"] is None
    assert data["records"][1:] == records[1:]


# ------------------------------------------------------------------------------------- formatting

@pytest.mark.parametrize("d, text", [(1.0, "1"), (0.0625, "1/16"), (0.3, "0.3"), (0.25, "1/4"), (1 / 3, "1/3"),
                                     (0.1, "1/10"), (0.4, "0.4"), (0.015, "0.015"), (None, "-")])
def test_format_density(d, text):
    assert format_density(d) == text


@pytest.mark.parametrize("mb, text", [(1234.4, "1234"), (123.44, "123"), (12.34, "12.3"), (12.0, "12.0"),
                                      (1.234, "1.23"), (0.4561, "0.456"), (0.75, "0.750"), (0.01234, "0.0123"),
                                      (0.0, "0"), (None, "-")])
def test_format_mb(mb, text):
    assert format_mb(mb) == text


# -------------------------------------------------------------------------------------- summaries

def test_summarise_by_hand(summaries):
    assert [s["run"] for s in summaries] == [FEDAVG, FLASC]  # first-seen order
    fed, fl = summaries
    assert list(fed) == list(report.SUMMARY_FIELDS)

    assert fed["strategy"] == "fedavg" and fl["strategy"] == "flasc"  # from the records
    assert (fl["up_density"], fl["down"], fl["values"]) == (0.0625, "sparse 1/4", "fp16")  # from run_info

    assert fed["final_accuracy"] == 0.7 and fed["best_accuracy"] == 0.7  # round 2 (None) skipped
    assert fl["final_accuracy"] == 0.55 and fl["best_accuracy"] == 0.6

    assert fed["mb_up"] == pytest.approx(12.0) and fed["mb_down"] == pytest.approx(12.0)
    assert fl["mb_up"] == pytest.approx(0.75) and fl["mb_down"] == pytest.approx(3.0)
    assert fed["dense_mb"] == pytest.approx(24.0) and fl["dense_mb"] == pytest.approx(24.0)

    assert fed["reduction"] == pytest.approx(1.0)
    assert fl["reduction"] == pytest.approx(24.0 / 3.75)  # 6.4x

    assert fed["rounds"] == 3 and fl["rounds"] == 3
    assert fed["seconds"] == pytest.approx(6.0) and fl["seconds"] == pytest.approx(4.5)
    assert fed["comm_share"] == pytest.approx(1.5 / 6.0) and fl["comm_share"] == pytest.approx(0.75 / 4.5)


def test_summarise_without_baseline_or_run_info(records):
    out = summarise(list(reversed(records)), {})  # record order does not matter: sorted by round
    fl = next(s for s in out if s["run"] == FLASC)
    assert fl["reduction"] is None
    assert fl["final_accuracy"] == 0.55
    assert (fl["up_density"], fl["down"], fl["values"]) == (None, None, None)
    assert fl["strategy"] == "flasc"


def test_summarise_errors(records):
    with pytest.raises(ValueError, match="empty"):
        summarise([], RUN_INFO)
    with pytest.raises(ValueError, match="baseline_run 'nope'"):
        summarise(records, RUN_INFO, baseline_run="nope")
    del records[2]["cum_bytes"]
    with pytest.raises(ValueError, match="cum_bytes"):
        summarise(records, RUN_INFO)
    records[2]["cum_bytes"] = 0
    records[0]["accuracy"] = 50.0  # a percentage instead of a fraction
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        summarise(records, RUN_INFO)


# ------------------------------------------------------------------------------------------ tables

def _assert_aligned(table, n_rows):
    lines = table.splitlines()
    assert len(lines) == 2 + n_rows
    assert len({len(line) for line in lines}) == 1, table
    assert all(line.startswith("|") and line.endswith("|") for line in lines)
    assert set(lines[1]) <= set("|-:")
    # every line has its pipes at the same columns
    assert len({tuple(i for i, ch in enumerate(line) if ch == "|") for line in lines}) == 1, table
    return lines


def test_results_table(summaries):
    table = results_table(summaries)
    lines = _assert_aligned(table, 2)
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["run", "up density", "down", "values", "final acc", "MB up", "MB down",
                      "reduction vs fedavg"]
    fed = [c.strip() for c in lines[2].strip("|").split("|")]
    fl = [c.strip() for c in lines[3].strip("|").split("|")]
    assert fed == [FEDAVG, "1", "dense", "fp32", "70.0%", "12.0", "12.0", "1.0x"]
    assert fl == [FLASC, "1/16", "sparse 1/4", "fp16", "55.0%", "0.750", "3.00", "6.4x"]


def test_results_table_missing_values(summaries):
    summaries[1]["reduction"] = None
    summaries[1]["final_accuracy"] = None
    table = results_table(summaries)
    lines = _assert_aligned(table, 2)
    fl = [c.strip() for c in lines[3].strip("|").split("|")]
    assert fl[4] == "-" and fl[7] == "-"
    with pytest.raises(ValueError, match="empty"):
        results_table([])


def test_time_split_table(records):
    table = time_split_table(records)
    lines = _assert_aligned(table, 2)
    fed = [c.strip() for c in lines[2].strip("|").split("|")]
    fl = [c.strip() for c in lines[3].strip("|").split("|")]
    assert fed == [FEDAVG, "3.00", "1.50", "1.50", "6.00", "25.0%"]
    assert fl == [FLASC, "3.00", "0.75", "0.75", "4.50", "16.7%"]
    with pytest.raises(ValueError, match="empty"):
        time_split_table([])


# -------------------------------------------------------------------------------------------- plot

def test_plot_writes_png(records, tmp_path):
    import matplotlib  # noqa: F401  (a test dependency: the plot must be exercised)
    pyplot_loaded = "matplotlib.pyplot" in sys.modules
    out = plot_accuracy_vs_bytes(records, tmp_path / "plots" / "acc.png", title="accuracy vs bytes")
    assert out == tmp_path / "plots" / "acc.png"
    data = out.read_bytes()
    assert len(data) > 1000
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (840, 540)  # 7 x 4.5 inches at 120 dpi
    assert ("matplotlib.pyplot" in sys.modules) == pyplot_loaded  # no pyplot / global state involved
    assert [p.name for p in out.parent.iterdir()] == ["acc.png"]  # no temp file left


def test_plot_without_matplotlib_returns_none_with_warning(records, tmp_path, monkeypatch):
    try:  # make the submodules cached, if possible: blocking the top-level package must still win
        importlib.import_module("matplotlib.backends.backend_agg")
        importlib.import_module("matplotlib.figure")
    except ImportError:
        pass
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.warns(UserWarning, match="pip install matplotlib"):
        out = plot_accuracy_vs_bytes(records, tmp_path / "acc.png")
    assert out is None
    assert not (tmp_path / "acc.png").exists()


def test_plot_errors(records, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        plot_accuracy_vs_bytes([], tmp_path / "x.png")
    for r in records:
        r["accuracy"] = None
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_accuracy_vs_bytes(records, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_module_imports_without_matplotlib():
    # In a fresh interpreter: importing the module (and the package) leaves matplotlib unimported.
    code = ("import sys, fastlora.fl.report\n"
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_no_nan_from_zero_time(records):
    for r in records:
        r["train_s"] = r["comm_s"] = r["agg_s"] = 0.0
    s = summarise(records, RUN_INFO)
    assert all(x["comm_share"] is None and x["seconds"] == 0 for x in s)
    assert "-" in time_split_table(records)
    assert not any(isinstance(v, float) and math.isnan(v) for x in s for v in x.values())
