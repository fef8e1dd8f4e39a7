"""Markdown tables for docs/benchmarks.md from pytest-benchmark JSON files.

    .venv/bin/python -m pytest benchmarks/test_bench_sparsify.py --benchmark-json=build/bench-sparsify.json
    .venv/bin/python benchmarks/make_tables.py build/bench-sparsify.json

One table per suite: a row per benchmark group (case), a column per implementation, each cell
the median time and its ratio to ``clone()`` of the same data (the memory-bandwidth limit)
where the case has one. Codec tables also show the payload size recorded in ``extra_info``.
"""
import json
import sys
from collections import OrderedDict


def load(path):
    with open(path) as f:
        data = json.load(f)
    groups = OrderedDict()
    for b in data["benchmarks"]:
        groups.setdefault(b["group"] or b["name"], []).append(b)
    return data.get("machine_info", {}), groups


def label(b):
    p = b.get("params") or {}
    return str(p.get("impl") or p.get("values") or b["name"])


def pivot(groups):
    """One table for a suite: a row per benchmark group, a column per implementation; each cell
    is the median in ms and, where the group has a clone() row, the ratio to it."""
    cols = []
    for rows in groups.values():
        for b in rows:
            if label(b) not in cols:
                cols.append(label(b))
    codec = any("bytes_per_entry" in b.get("extra_info", {}) for rows in groups.values() for b in rows)
    extra = ["fp16 payload bytes/entry (raw int32+fp32: 8)", "index bits/entry (entropy bound)"] if codec else []
    out = ["| case | " + " | ".join(cols + extra) + " |", "|---" * (1 + len(cols) + len(extra)) + "|"]
    for g, rows in groups.items():
        med = {label(b): b["stats"]["median"] for b in rows}
        ref = med.get("clone")
        cells = []
        for c in cols:
            if c not in med:
                cells.append("")
            elif ref:
                cells.append(f"{med[c] * 1e3:.1f} ({med[c] / ref:.2f}x)")
            else:
                cells.append(f"{med[c] * 1e3:.2f}")
        if codec:
            e = rows[0]["extra_info"]
            cells += [f"{e['bytes_per_entry']:.2f}", f"{e['index_bits_per_entry']:.2f} ({e['entropy_bits_per_entry']:.2f})"]
        out.append(f"| {g} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def split_suites(groups):
    suites = OrderedDict()
    for g, rows in groups.items():
        suites.setdefault(g.split()[0] + (" " + g.split()[1] if g.startswith("codec") else ""), OrderedDict())[g] = rows
    return suites


def main(paths):
    for path in paths:
        machine, groups = load(path)
        cpu = machine.get("cpu", {}).get("brand_raw", machine.get("processor", "?"))
        print(f"<!-- {path}: {cpu}, python {machine.get('python_version', '?')} -->")
        for name, suite in split_suites(groups).items():
            has_clone = any(label(b) == "clone" for rows in suite.values() for b in rows)
            note = "median ms; in parentheses: ratio to clone() of the same data" if has_clone else "median ms"
            print(f"**{name}** ({note})\n")
            print(pivot(suite))
            print()


if __name__ == "__main__":
    main(sys.argv[1:])
