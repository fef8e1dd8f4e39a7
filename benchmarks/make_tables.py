"""Markdown tables for the README from pytest-benchmark JSON files.

    .venv/bin/python -m pytest benchmarks/test_bench_sparsify.py --benchmark-json=build/bench-sparsify.json
    .venv/bin/python benchmarks/make_tables.py build/bench-sparsify.json

One table per benchmark group: median time of each implementation and its ratio to the
group's reference row (``clone`` where the group has one: the memory-bandwidth limit).
Codec groups also show the payload size columns recorded in ``extra_info``.
"""
import json
import sys
from collections import OrderedDict


def load(path):
    with open(path) as f:
        data = json.load(f)
    groups = OrderedDict()
    for b in data["benchmarks"]:
        groups.setdefault(b["group"], []).append(b)
    return data.get("machine_info", {}), groups


def label(b):
    p = b.get("params") or {}
    return str(p.get("impl") or p.get("values") or b["name"])


def table(group, rows):
    med = {label(b): b["stats"]["median"] for b in rows}
    ref = med.get("clone")
    out = [f"**{group}**", ""]
    if rows and "bytes_per_entry" in rows[0].get("extra_info", {}):
        out += ["| values | median ms | bytes/entry (raw int32+fp32: 8) | index bits/entry | entropy bound |",
                "|---|---|---|---|---|"]
        for b in rows:
            e = b["extra_info"]
            out.append(f"| {label(b)} | {b['stats']['median'] * 1e3:.2f} | {e['bytes_per_entry']:.2f} | "
                       f"{e['index_bits_per_entry']:.2f} | {e['entropy_bits_per_entry']:.2f} |")
    else:
        out += ["| implementation | median ms | x clone |" if ref else "| implementation | median ms |",
                "|---|---|---|" if ref else "|---|---|"]
        for name, t in med.items():
            out.append(f"| {name} | {t * 1e3:.1f} | {t / ref:.2f} |" if ref else f"| {name} | {t * 1e3:.1f} |")
    return "\n".join(out)


def main(paths):
    for path in paths:
        machine, groups = load(path)
        cpu = machine.get("cpu", {}).get("brand_raw", machine.get("processor", "?"))
        print(f"<!-- {path}: {cpu}, python {machine.get('python_version', '?')} -->")
        for g, rows in groups.items():
            print(table(g, rows))
            print()


if __name__ == "__main__":
    main(sys.argv[1:])
