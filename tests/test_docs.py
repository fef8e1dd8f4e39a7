"""The documentation's promises, checked: README.md and every docs/**/*.md.

1. Snippets run. Every fenced block whose info string is ``python`` runs, in a fresh namespace
   (``exec`` of the block alone: it must define every tensor it uses), with a time limit of
   ``BLOCK_TIMEOUT_S`` seconds, in one child Python process for all blocks (so no block changes
   this process's state: thread counts, ``fastlora.use_cpu_isa``, ...), whose working directory
   is a temporary folder (files a snippet writes land there). A block is skipped only when the
   line right before its opening fence is ``<!-- not-run: REASON -->`` with a non-empty
   REASON; such blocks must still compile, and there are at most ``MAX_NOT_RUN`` of them
   (snippets that need a Flower grid / context, a pretrained model download or a GPU).

2. Front-page figures name their command. In README.md, a *performance figure* is any match of
   ``FIGURE_RE``: a factor written ``<number>x`` (``1.34x``, ``11x``), a duration
   ``<number> ms`` / ``<number> s`` / ``<number> min`` (space optional), or
   ``<number> times``. Text is cut into *blocks*: a heading line; a run of consecutive
   non-blank lines (a paragraph, a list, a table); a fenced block. Fenced blocks tagged
   ``python``, ``bash``, ``sh``, ``shell`` or ``console`` are code (their numbers are
   arguments, not results) and are not checked; other fenced blocks (``text``, untagged:
   program output) are. HTML comments are ignored. A block holding a figure passes when a
   *command* appears (a) in the block itself, (b) in the block right before it, or (c) in the
   heading of the section it belongs to (the nearest heading above it). A command is an inline
   code span (single backticks) of at least two words whose first word, after any leading
   ``NAME=value`` environment assignments, is, or is a path ending in, one of ``COMMANDS``
   (e.g. ``make bench-lora``, ``.venv/bin/fastlora bench --budget 20``,
   ``FASTLORA_CPU_ISA=avx2 .venv/bin/python -m pytest ...``).

3. Links resolve. Every relative link target (inline ``[text](target)``, images, and
   reference definitions ``[label]: target``; outside code) in README.md and docs/ names an
   existing file or folder inside the repository; a ``#fragment`` on a Markdown target (or a
   bare ``#fragment``) must be the GitHub anchor of one of its headings. ``http(s):`` and
   ``mailto:`` links are not fetched.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK_TIMEOUT_S = 60
TOTAL_TIMEOUT_S = 300
MAX_NOT_RUN = 4
COMMANDS = {"make", "fastlora", "python", "python3", "pytest", "pip", "flwr", "cmake"}
CODE_LANGS = {"python", "py", "bash", "sh", "shell", "console"}

FENCE_RE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)")
NOT_RUN_RE = re.compile(r"^\s*<!--\s*not-run:\s*(\S.*?)\s*-->\s*$")
FIGURE_RE = re.compile(r"(?<![\w./-])\d+(?:\.\d+)?(?:x\b|\s?(?:ms|s|min)\b|\s+times\b)")
CODE_SPAN_RE = re.compile(r"(`+)(.+?)\1")
LINK_RE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_DEF_RE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
HEADING_RE = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def doc_files():
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# --- parsing ---------------------------------------------------------------------------------

def parse(text: str):
    """Splits Markdown into a list of parts: ("fence", lang, first_line_no, lines, line_before)
    and ("text", line_no, line) for every line outside fences (line numbers 1-based)."""
    lines = text.split("\n")
    parts, i = [], 0
    while i < len(lines):
        m = FENCE_RE.match(lines[i])
        if m:
            marker, lang = m.group(1), m.group(2).lower()
            j = i + 1
            while j < len(lines) and not re.match(r"^ {0,3}" + re.escape(marker[0]) + "{" + str(len(marker)) + r",}\s*$",
                                                  lines[j]):
                j += 1
            parts.append(("fence", lang, i + 2, lines[i + 1:j], lines[i - 1] if i > 0 else ""))
            i = j + 1
        else:
            parts.append(("text", i + 1, lines[i]))
            i += 1
    return parts


def python_blocks():
    """[(id, code, not_run_reason or None)] for every ```python block of the documentation."""
    out = []
    for path in doc_files():
        for part in parse(path.read_text(encoding="utf-8")):
            if part[0] == "fence" and part[1] in ("python", "py"):
                _, _, line, body, before = part
                m = NOT_RUN_RE.match(before)
                out.append((f"{rel(path)}:{line}", "\n".join(body) + "\n", m.group(1) if m else None))
    return out


def strip_comments(text: str) -> str:
    return re.sub(r"<!--.*?-->", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)


def blocks_of(text: str):
    """Blocks (see the module docstring, rule 2) as dicts: kind ("heading", "text", "fence"),
    lang, first line number, text."""
    blocks, cur = [], None

    def flush():
        nonlocal cur
        if cur:
            blocks.append(cur)
        cur = None

    for part in parse(strip_comments(text)):
        if part[0] == "fence":
            flush()
            blocks.append({"kind": "fence", "lang": part[1], "line": part[2] - 1, "text": "\n".join(part[3])})
            continue
        _, no, line = part
        if not line.strip():
            flush()
        elif HEADING_RE.match(line):
            flush()
            blocks.append({"kind": "heading", "lang": "", "line": no, "text": line})
        elif cur is None:
            cur = {"kind": "text", "lang": "", "line": no, "text": line}
        else:
            cur["text"] += "\n" + line
    flush()
    return blocks


def is_command(span: str) -> bool:
    words = span.split()
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words = words[1:]
    return len(words) >= 2 and words[0].rsplit("/", 1)[-1] in COMMANDS


def names_command(text: str) -> bool:
    return any(is_command(m.group(2)) for m in CODE_SPAN_RE.finditer(text))


def unnamed_figures(text: str):
    """[(line, figure, block excerpt)] of performance figures whose block breaks rule 2."""
    bad, heading = [], None
    blocks = blocks_of(text)
    for i, b in enumerate(blocks):
        if b["kind"] == "heading":
            heading = b
            continue
        if b["kind"] == "fence" and b["lang"] in CODE_LANGS:
            continue
        figures = FIGURE_RE.findall(CODE_SPAN_RE.sub(" ", b["text"]))
        if not figures:
            continue
        prev = blocks[i - 1] if i > 0 else None
        if (names_command(b["text"]) or (prev is not None and names_command(prev["text"]))
                or (heading is not None and names_command(heading["text"]))):
            continue
        bad.append((b["line"], figures[0], b["text"].split("\n")[0][:100]))
    return bad


def github_anchors(text: str):
    """The anchors GitHub gives the headings of a Markdown text."""
    seen, anchors = {}, set()
    for part in parse(text):
        if part[0] != "text":
            continue
        m = HEADING_RE.match(part[2])
        if not m:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(2))       # links -> their text
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def broken_links(path: Path):
    """[(line, target, why)] for the relative links of ``path`` that do not resolve."""
    bad = []
    for part in parse(path.read_text(encoding="utf-8")):
        if part[0] != "text":
            continue
        _, no, line = part
        line = CODE_SPAN_RE.sub(" ", line)
        targets = [m.group(1) for m in LINK_RE.finditer(line)]
        m = REF_DEF_RE.match(line)
        if m:
            targets.append(m.group(1))
        for target in targets:
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):        # http:, https:, mailto:, ...
                continue
            file_part, _, fragment = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if ROOT not in dest.parents and dest != ROOT:
                bad.append((no, target, "points outside the repository"))
            elif not dest.exists():
                bad.append((no, target, "no such file or folder"))
            elif fragment and dest.suffix == ".md" and fragment not in github_anchors(dest.read_text(encoding="utf-8")):
                bad.append((no, target, f"no heading with anchor #{fragment} in {rel(dest)}"))
    return bad


# --- 1. snippets -----------------------------------------------------------------------------

BLOCKS = python_blocks()
RUNNABLE = [(bid, code) for bid, code, reason in BLOCKS if reason is None]


def _run_blocks(blocks, timeout_s=BLOCK_TIMEOUT_S):
    """Runs ``blocks`` [(id, code)] in a child process (see rule 1); {id: {"error", "seconds"}}."""
    with tempfile.TemporaryDirectory(prefix="fastlora-docs-") as tmp:
        inp, out = Path(tmp) / "blocks.json", Path(tmp) / "results.json"
        inp.write_text(json.dumps([{"id": b, "code": c, "timeout": timeout_s} for b, c in blocks]))
        work = Path(tmp) / "cwd"
        work.mkdir()
        env = dict(os.environ)
        if not env.get("FASTLORA_TEST_GPU"):
            env.setdefault("TRITON_INTERPRET", "1")
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(inp), str(out)],
                              cwd=work, env=env, capture_output=True, text=True, timeout=TOTAL_TIMEOUT_S)
        results = json.loads(out.read_text()) if out.exists() else {}
        for b, _ in blocks:
            if b not in results:
                results[b] = {"error": f"the worker stopped before this block (exit code {proc.returncode}):\n"
                                       f"{proc.stderr[-4000:]}", "seconds": None}
        return results


_RESULTS = None


def _results():
    global _RESULTS
    if _RESULTS is None:
        _RESULTS = _run_blocks(RUNNABLE)
    return _RESULTS


def _worker(inp: str, out: str) -> None:
    import signal
    import time
    import traceback

    def on_alarm(signum, frame):
        raise TimeoutError("the block ran past its time limit")

    signal.signal(signal.SIGALRM, on_alarm)
    results = {}
    for item in json.loads(Path(inp).read_text()):
        namespace = {"__name__": "__docs__"}
        t0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, float(item["timeout"]))
        try:
            exec(compile(item["code"], item["id"], "exec"), namespace)
            error = None
        except BaseException:  # noqa: BLE001 - any failure of a snippet is reported, not raised
            error = traceback.format_exc()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        results[item["id"]] = {"error": error, "seconds": round(time.perf_counter() - t0, 2)}
        Path(out).write_text(json.dumps(results))     # after every block: a crash still reports the others


import pytest  # noqa: E402


@pytest.mark.parametrize("block_id", [b for b, _ in RUNNABLE])
def test_python_block_runs(block_id):
    result = _results()[block_id]
    assert result["error"] is None, f"{block_id} failed:\n{result['error']}"


def test_not_run_blocks_are_few_marked_and_compile():
    skipped = [(b, code, reason) for b, code, reason in BLOCKS if reason is not None]
    assert len(skipped) <= MAX_NOT_RUN, f"too many not-run blocks: {[b for b, _, _ in skipped]}"
    for b, code, _ in skipped:
        compile(code, b, "exec")


def test_there_are_snippets_to_run():
    files = {b.split(":")[0] for b, _ in RUNNABLE}
    assert "README.md" in files and any(f.startswith("docs/") for f in files)


def test_runner_reports_failures_and_time_limits():
    res = _run_blocks([("ok", "x = 1\n"), ("fails", "raise ValueError('boom')\n"),
                       ("fresh", "assert 'x' not in globals()\n"), ("slow", "import time\ntime.sleep(30)\n")],
                      timeout_s=0.2)
    assert res["ok"]["error"] is None and res["fresh"]["error"] is None
    assert "boom" in res["fails"]["error"] and "TimeoutError" in res["slow"]["error"]


# --- 2. front-page figures name their command ------------------------------------------------

def test_readme_figures_name_their_command():
    bad = unnamed_figures((ROOT / "README.md").read_text(encoding="utf-8"))
    assert not bad, "README.md figures without a command in their block, the block before or the section " \
                    "heading:\n" + "\n".join(f"  line {n}: {fig!r} in {text!r}" for n, fig, text in bad)


def test_figure_rule_itself():
    text = "\n".join([
        "# Title", "",                                                  # 1
        "fastlora is 3.5x faster than X.", "",                          # 3: unnamed, flagged
        "Measured with `make bench-lora`:", "",                         # 5
        "| a | b |", "|---|---|", "| 1 | 2.0x |", "",                   # 7: the block before names it
        "## Speed — `.venv/bin/python -m pytest benchmarks/x.py -s`", "",
        "It takes 12 ms.", "",                                          # 13: the heading names it
        "## Other", "",                                                 # 15
        "```bash", "fastlora bench --budget 20   # 20 s", "```", "",   # 17: code, not checked
        "```text", "| run | 11x |", "```", "",                          # 21: output, flagged
        "Build (`FASTLORA_CPU_ISA=avx2 pip install .`): ~30 s.", "",   # 25: its own block names it
        "Plain text.", "",                                              # 27
        "`fastlora` alone is 2x.", "",                                  # 29: one word is not a command
        "<!-- 9x in a comment -->", "",                                 # 31: comments are ignored
    ])
    bad = unnamed_figures(text)
    assert [(n, fig) for n, fig, _ in bad] == [(3, "3.5x"), (21, "11x"), (29, "2x")]
    assert FIGURE_RE.findall("fp32 2x2 M=8 4096 x 4096 0x1F 1.5x 3 s 10 min 2 times") == ["1.5x", "3 s", "10 min",
                                                                                          "2 times"]


# --- 3. links --------------------------------------------------------------------------------

@pytest.mark.parametrize("path", doc_files(), ids=rel)
def test_relative_links_resolve(path):
    bad = broken_links(path)
    assert not bad, f"{rel(path)}: broken links:\n" + "\n".join(f"  line {n}: {t} ({why})" for n, t, why in bad)


def test_github_anchors():
    assert github_anchors("# A `b.c` — d\n## A `b.c` — d\n### Low-rank: `rsvd`, x\n") == {
        "a-bc--d", "a-bc--d-1", "low-rank-rsvd-x"}


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    _worker(sys.argv[2], sys.argv[3])
