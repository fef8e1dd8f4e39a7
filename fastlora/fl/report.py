"""Reporting for federated-LoRA experiments: metric files, summary tables and an accuracy-vs-bytes plot.

Inputs are plain Python objects, so this module depends on the standard library (and the strategy
grammar's density spelling) only; matplotlib is imported lazily inside :func:`plot_accuracy_vs_bytes` (without it the plot is skipped with a warning).

*Records* are dicts, one per (strategy run, round), with the keys of :data:`RECORD_FIELDS`:

    run, strategy        str: the run's label (e.g. "flasc up=1/16 down=1/4") and its strategy name
    round                int, 1-based
    accuracy, loss       float, or None in rounds without evaluation (accuracy is a fraction in [0, 1])
    perplexity           float (a causal LM only: exp of its token-weighted eval loss; accuracy is None)
    up_bytes, down_bytes int: this round's actual encoded payload bytes
    cum_bytes            int: cumulative up + down bytes so far
    dense_up_bytes, dense_down_bytes  int: what dense fp32 would have cost this round
    clients, failed      int: clients selected / dropped
    train_s, comm_s, agg_s  float seconds: local training / sparsify+encode+decode / aggregation+server update

*Summaries* (built by :func:`summarise`) are dicts, one per run, with the keys of :data:`SUMMARY_FIELDS`.
Sizes in MB are 1e6 bytes.

Typical use::

    summaries = summarise(records, run_info, baseline_run="fedavg")
    write_metrics(records, "out/", summaries)
    print(results_table(summaries))
    print(time_split_table(records))
    plot_accuracy_vs_bytes(records, "out/accuracy_vs_bytes.png")
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

from fastlora.fl.strategies import format_density  # the spec grammar's spelling of a density

__all__ = ["RECORD_FIELDS", "SUMMARY_FIELDS", "METRICS", "write_metrics", "write_json", "results_table",
           "time_split_table", "format_density", "format_mb", "summarise", "plot_accuracy_vs_bytes"]

RECORD_FIELDS = ("run", "strategy", "round", "accuracy", "loss", "up_bytes", "down_bytes", "cum_bytes",
                 "dense_up_bytes", "dense_down_bytes", "clients", "failed", "train_s", "comm_s", "agg_s")

SUMMARY_FIELDS = ("run", "strategy", "up_density", "down", "values", "final_accuracy", "best_accuracy",
                  "final_perplexity", "best_perplexity", "mb_up", "mb_down", "dense_mb", "reduction", "rounds",
                  "seconds", "comm_share")

METRICS = ("accuracy", "perplexity")   # what a table and a plot show: a classifier's, a causal LM's

MB = 1e6


# --------------------------------------------------------------------------------------------- files

def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import, rather than flipping the process umask on every write


def _atomic_write(path: Path, write: Callable[[Any], None], binary: bool) -> None:
    """Write ``path`` via a temporary file in the same directory and ``os.replace`` (readers never see a
    partial file). The file gets the usual ``0o666 & ~umask`` mode rather than mkstemp's 0o600."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8", newline="")) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text), binary=False)


def _json_safe(value: Any) -> Any:
    """Non-finite floats (NaN, inf) become None so the output is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_metrics(records: Sequence[Mapping[str, Any]], out_dir: "str | os.PathLike[str]",
                  summaries: Optional[Sequence[Mapping[str, Any]]] = None) -> Dict[str, Path]:
    """Write ``metrics.csv`` and ``metrics.json`` into ``out_dir`` (created if needed).

    ``metrics.csv`` has one row per record; its columns are :data:`RECORD_FIELDS` in that order, followed
    by any extra keys the records carry (in first-seen order). None (and a missing key) is an empty cell;
    floats are written with ``repr`` precision, so ``float(cell)`` gives the value back.

    ``metrics.json`` is ``{"records": [...], "summaries": [...]}`` (``summaries`` is ``[]`` when not
    given). NaN/inf floats are written as null, keeping the file strict JSON.

    Both files are written atomically (temporary file + ``os.replace``). Returns
    ``{"csv": Path, "json": Path}``.
    """
    records = [dict(r) for r in records]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    columns = list(RECORD_FIELDS)
    for r in records:
        columns.extend(k for k in r if k not in columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    csv_path = out / "metrics.csv"
    _atomic_write_text(csv_path, buf.getvalue())

    payload = {"records": records, "summaries": [dict(s) for s in summaries] if summaries is not None else []}
    json_path = out / "metrics.json"
    _atomic_write_text(json_path, json.dumps(_json_safe(payload), indent=1, allow_nan=False) + "\n")
    return {"csv": csv_path, "json": json_path}


def write_json(obj: Any, path: "str | os.PathLike[str]") -> Path:
    """Write ``obj`` as strict, indented JSON to ``path`` atomically (parent folders created)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(out, json.dumps(_json_safe(obj), indent=1, allow_nan=False) + "\n")
    return out


# ---------------------------------------------------------------------------------------- formatting

def format_mb(mb: Optional[float]) -> str:
    """Format a size in MB with about 3 significant digits: ``1234 -> "1234"``, ``12.34 -> "12.3"``,
    ``1.234 -> "1.23"``, ``0.4561 -> "0.456"``, ``0.01234 -> "0.0123"``; None -> ``"-"``."""
    if mb is None:
        return "-"
    mb = float(mb)
    a = abs(mb)
    if a == 0:
        return "0"
    if a >= 100:
        return f"{mb:.0f}"
    if a >= 10:
        return f"{mb:.1f}"
    if a >= 1:
        return f"{mb:.2f}"
    if a >= 0.1:
        return f"{mb:.3f}"
    return f"{mb:.3g}"


def _format_percent(x: Optional[float]) -> str:
    return "-" if x is None else f"{100.0 * x:.1f}%"


def _format_reduction(r: Optional[float]) -> str:
    return "-" if r is None else f"{r:.1f}x"


def _format_seconds(s: float) -> str:
    return f"{s:.1f}" if abs(s) >= 10 else f"{s:.2f}"


def _cell(value: Any) -> str:
    # Escape pipes so a run label cannot break the markdown table.
    return ("-" if value is None else str(value)).replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[bool]) -> str:
    """An aligned, markdown-compatible pipe table; every line has the same width."""
    head = [_cell(h) for h in header]
    body = [[_cell(c) for c in row] for row in rows]
    widths = [max([len(head[i])] + [len(r[i]) for r in body]) for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        padded = (c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right))
        return "| " + " | ".join(padded) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(widths, right)) + "|"
    return "\n".join([line(head), sep] + [line(r) for r in body])


def _format_perplexity(p: Optional[float]) -> str:
    return "-" if p is None else f"{p:.2f}" if p < 1000 else f"{p:.4g}"


def results_table(summaries: Sequence[Mapping[str, Any]], metric: str = "accuracy") -> str:
    """The results table: one row per run summary (as built by :func:`summarise`).

    Columns: run, up density (:func:`format_density`), down, values, final acc (percent, 1 decimal;
    ``metric="perplexity"``: final ppl, 2 decimals), MB up, MB down (:func:`format_mb`), reduction vs
    fedavg (``"31.2x"``, ``"-"`` when None). Missing or None values show as ``"-"``. Raises ValueError
    when ``summaries`` is empty.
    """
    summaries = list(summaries)
    if not summaries:
        raise ValueError("results_table: no run summaries to tabulate (summaries is empty)")
    if metric not in METRICS:
        raise ValueError(f"results_table: metric must be one of {METRICS}, got {metric!r}")
    if metric == "accuracy":
        name, key, fmt = "final acc", "final_accuracy", _format_percent
    else:
        name, key, fmt = "final ppl", "final_perplexity", _format_perplexity
    header = ["run", "up density", "down", "values", name, "MB up", "MB down", "reduction vs fedavg"]
    right = [False, True, False, False, True, True, True, True]
    rows = [[s.get("run"), format_density(s.get("up_density")), s.get("down"), s.get("values"),
             fmt(s.get(key)), format_mb(s.get("mb_up")), format_mb(s.get("mb_down")),
             _format_reduction(s.get("reduction"))] for s in summaries]
    return _table(header, rows, right)


# --------------------------------------------------------------------------------------- aggregation

def _check_records(records: Iterable[Mapping[str, Any]], needed: Sequence[str], who: str) -> List[Mapping[str, Any]]:
    records = list(records)
    if not records:
        raise ValueError(f"{who}: no metric records given (records is empty)")
    for i, r in enumerate(records):
        missing = [k for k in needed if k not in r]
        if missing:
            raise ValueError(f"{who}: record {i} (run {r.get('run')!r}) lacks key(s) {', '.join(missing)}")
        acc = r.get("accuracy")
        if acc is not None and not 0.0 <= acc <= 1.0:
            raise ValueError(f"{who}: record {i} (run {r['run']!r}, round {r.get('round')}) has accuracy {acc!r}; "
                             "accuracy must be a fraction in [0, 1] (or None when not evaluated)")
    return records


def _by_run(records: Sequence[Mapping[str, Any]]) -> Dict[str, List[Mapping[str, Any]]]:
    """Group records by run (runs in first-seen order), each group sorted by round."""
    groups: Dict[str, List[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault(r["run"], []).append(r)
    return {run: sorted(rs, key=lambda r: r["round"]) for run, rs in groups.items()}


def _total(rs: Sequence[Mapping[str, Any]], key: str) -> float:
    return sum((r.get(key) or 0) for r in rs)


def summarise(records: Sequence[Mapping[str, Any]], run_info: Optional[Mapping[str, Mapping[str, Any]]] = None, *,
              baseline_run: Optional[str] = None) -> List[Dict[str, Any]]:
    """Build one summary dict per run (runs in first-seen order) from per-round ``records``.

    ``run_info[run]`` supplies what the records cannot: ``"up_density"``, ``"down"``, ``"values"`` and
    optionally ``"strategy"`` (default: the records' strategy). A run missing from ``run_info`` (or a key
    missing from its entry) gets None for those keys.

    Per run: ``final_accuracy`` = last non-None accuracy by round, ``best_accuracy`` = the highest (both
    None if never evaluated); ``final_perplexity`` / ``best_perplexity`` (the lowest) likewise from the
    records' ``perplexity`` (None for a classifier's records, which have none); ``mb_up``/``mb_down`` =
    summed up/down bytes / 1e6; ``dense_mb`` = summed dense fp32 bytes, both directions, / 1e6;
    ``reduction`` = total (up + down) bytes of ``baseline_run`` / this run's total (None without a
    baseline or when this run sent nothing); ``rounds`` = the highest round; ``seconds`` = sum of
    train_s + comm_s + agg_s; ``comm_share`` = comm_s total / seconds (None if seconds is 0).

    Raises ValueError for empty records, records lacking keys, accuracies outside [0, 1], or a
    ``baseline_run`` that is not among the records.
    """
    records = _check_records(records, RECORD_FIELDS, "summarise")
    run_info = run_info or {}
    groups = _by_run(records)
    if baseline_run is not None and baseline_run not in groups:
        raise ValueError(f"summarise: baseline_run {baseline_run!r} is not among the runs in the records "
                         f"({', '.join(map(repr, groups))})")
    totals = {run: _total(rs, "up_bytes") + _total(rs, "down_bytes") for run, rs in groups.items()}

    out = []
    for run, rs in groups.items():
        info = run_info.get(run, {})
        accs = [r["accuracy"] for r in rs if r["accuracy"] is not None]
        ppls = [r["perplexity"] for r in rs if r.get("perplexity") is not None]
        seconds = _total(rs, "train_s") + _total(rs, "comm_s") + _total(rs, "agg_s")
        reduction = None
        if baseline_run is not None and totals[run] > 0:
            reduction = totals[baseline_run] / totals[run]
        out.append({
            "run": run,
            "strategy": info.get("strategy", rs[0]["strategy"]),
            "up_density": info.get("up_density"),
            "down": info.get("down"),
            "values": info.get("values"),
            "final_accuracy": accs[-1] if accs else None,
            "best_accuracy": max(accs) if accs else None,
            "final_perplexity": ppls[-1] if ppls else None,
            "best_perplexity": min(ppls) if ppls else None,
            "mb_up": _total(rs, "up_bytes") / MB,
            "mb_down": _total(rs, "down_bytes") / MB,
            "dense_mb": (_total(rs, "dense_up_bytes") + _total(rs, "dense_down_bytes")) / MB,
            "reduction": reduction,
            "rounds": max(r["round"] for r in rs),
            "seconds": seconds,
            "comm_share": _total(rs, "comm_s") / seconds if seconds > 0 else None,
        })
    return out


def time_split_table(records: Sequence[Mapping[str, Any]]) -> str:
    """Per-run wall-time split: train / comm / agg / total seconds and the comm share (percent of total).

    Raises ValueError for empty records or records lacking the time keys.
    """
    records = _check_records(records, ("run", "round", "train_s", "comm_s", "agg_s"), "time_split_table")
    header = ["run", "train s", "comm s", "agg s", "total s", "comm share"]
    right = [False, True, True, True, True, True]
    rows = []
    for run, rs in _by_run(records).items():
        t, c, a = (_total(rs, k) for k in ("train_s", "comm_s", "agg_s"))
        total = t + c + a
        share = f"{100.0 * c / total:.1f}%" if total > 0 else "-"
        rows.append([run, _format_seconds(t), _format_seconds(c), _format_seconds(a), _format_seconds(total), share])
    return _table(header, rows, right)


# ----------------------------------------------------------------------------------------------- plot

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*", "h", "p")


def plot_accuracy_vs_bytes(records: Sequence[Mapping[str, Any]], path: "str | os.PathLike[str]", *,
                           title: Optional[str] = None, metric: str = "accuracy") -> Optional[Path]:
    """Plot accuracy (%) against cumulative MB communicated (up + down, log x axis), one line per run
    (``metric="perplexity"``: a causal LM's eval perplexity, log y axis, lower is better).

    Only rounds with the metric are plotted (rounds with ``cum_bytes <= 0`` cannot sit on a log axis and
    are skipped). The PNG is rendered with matplotlib's Agg canvas directly (no pyplot, no window, global
    matplotlib state untouched) and written atomically to ``path`` (parent directories are created).

    Returns the path written, or None (with a warning saying ``pip install matplotlib`` enables the
    plot) when matplotlib is not installed. Raises ValueError for empty records or when no record has
    the metric to plot -- checked before matplotlib is needed.
    """
    if metric not in METRICS:
        raise ValueError(f"plot_accuracy_vs_bytes: metric must be one of {METRICS}, got {metric!r}")
    records = _check_records(records, ("run", "round", metric, "cum_bytes"), "plot_accuracy_vs_bytes")
    scale = 100.0 if metric == "accuracy" else 1.0
    series = []
    for run, rs in _by_run(records).items():
        pts = [(r["cum_bytes"] / MB, scale * r[metric]) for r in rs
               if r[metric] is not None and r["cum_bytes"] is not None and r["cum_bytes"] > 0
               and math.isfinite(r[metric])]
        if pts:
            series.append((run, pts))
    if not series:
        raise ValueError(f"plot_accuracy_vs_bytes: no record has both a finite {metric} and a positive cum_bytes; "
                         "nothing to plot (was evaluation ever run?)")

    try:
        # Plain `import a.b` (not `from a.b import X`) so the top-level package is looked up too:
        # a `from` import succeeds from a cached submodule even when `matplotlib` itself is blocked.
        import matplotlib.backends.backend_agg
        import matplotlib.figure
        Figure = matplotlib.figure.Figure
        FigureCanvasAgg = matplotlib.backends.backend_agg.FigureCanvasAgg
    except ImportError:
        warnings.warn("matplotlib is not installed, so the accuracy-vs-bytes plot was skipped; "
                      "`pip install matplotlib` enables it", stacklevel=2)
        return None

    fig = Figure(figsize=(7.0, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, (run, pts) in enumerate(series):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker=_MARKERS[i % len(_MARKERS)], markersize=4, linewidth=1.4, label=run)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative communication, up + down (MB, log scale)")
    if metric == "accuracy":
        ax.set_ylabel("accuracy (%)")
    else:
        ax.set_yscale("log")
        ax.set_ylabel("eval perplexity (log scale, lower is better)")
    if title:
        ax.set_title(title)
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", alpha=0.15)
    ax.legend(fontsize="small", loc="best")
    fig.tight_layout()

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(out, lambda f: fig.savefig(f, format="png"), binary=True)
    return out

