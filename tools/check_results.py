"""Check that every measured number in the project's documents has a committed source.

    python tools/check_results.py [DOC ...]        # default: README.md EXPERIMENTS.md BENCHMARKS.md docs/**/*.md

The convention is documented at the top of ``results/README.md``. In short:

* ``<!-- source: results/a.json benchmarks/results/b.json -->`` (paths relative to the repository
  root, separated by spaces or commas) names the files the numbers below it come from. It holds
  until the next ``source`` comment or the next heading.
* A *measured number* is a number written in plain text (not in code) that has a decimal point
  or an exponent (``0.951``, ``3.7e-15``) or is followed by a unit (``99 %``, ``155 s``,
  ``640 ms``, ``1.4×``, ``255 MiB``, ``2 points``); in a range ``50–80 ms`` both ends are.
  In a table row every number after the first cell is measured, integers included.
* Not measurements, and never checked: text in code (fenced or 4-space indented blocks, inline
  backticks), math (``$...$``, ``$$...$$`` on one line), headings, HTML comments, link targets; the first cell of every table row and the
  header row (labels); dates, clock times and versions; ``N×M`` shapes; estimator notation
  ``UPG(5, 0.5)``, ``A_{5,0.5}``; a number right after ``=`` or inside ``{...}`` of a set
  (``λ = 0.5``, ``k ∈ {1, 3}``); a number right after one of :data:`LABEL_WORDS` (``eq. 17``,
  ``Table 1``, ``issue 13``).
* A measured number matches a source value ``s`` when ``|s·c − v|`` is within half a unit of
  the number's last printed digit, for a scale ``c`` in :data:`SCALES` (fractions as percent,
  seconds as milliseconds, bytes as MiB, ...). Signs are ignored. Source values: every number
  in a JSON file (keys and strings included, so ``"0.5"`` counts), every number token of any
  other text file (CSV, logs).

Exit status 0 when every measured number has a matching source, 1 otherwise (one line per
problem: ``FILE:LINE: message``), 2 for a bad command line.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "LABEL_WORDS",
    "SCALES",
    "Problem",
    "check_document",
    "main",
    "measured_numbers",
    "source_values",
]

REPO = Path(__file__).resolve().parents[1]
#: the documents checked by default: the three top-level ones and every page of the site
DOCUMENTS = (
    "README.md",
    "EXPERIMENTS.md",
    "BENCHMARKS.md",
    *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").rglob("*.md")),
)

#: words after which a number is a label, not a measurement
LABEL_WORDS = (
    "eq.",
    "eqs.",
    "equation",
    "table",
    "tables",
    "fig.",
    "figs.",
    "figure",
    "sec.",
    "section",
    "issue",
    "issues",
    "remark",
    "theorem",
    "step",
    "steps",
    "epoch",
    "seed",
    "seeds",
    "row",
    "rows",
    "part",
    "commit",
)

#: factors tried between a source value and a printed number
SCALES = (1.0, 100.0, 0.01, 1000.0, 0.001, 1.0 / 2**20, 1.0 / 2**30, 60.0, 1.0 / 60.0, 1e6)

_UNIT = r"(?:%|×|ms\b|s\b|min\b|h\b|MiB\b|GiB\b|KiB\b|MB\b|GB\b|µs\b|us\b|points?\b)"
_NUM = r"\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-−+]?\d+)?"
_NUMBER = re.compile(
    rf"(?<![\w.^/\\-])(?P<num>{_NUM})(?![\w.]*\d)(?=(?P<range>\s*[–-]\s*{_NUM})?\s*(?P<unit>{_UNIT})?)"
)
_SOURCE = re.compile(r"<!--\s*source:\s*(?P<paths>.*?)\s*-->")
_STRIP = [
    re.compile(r"<!--.*?-->"),  # HTML comments
    re.compile(r"`[^`]*`"),  # inline code
    re.compile(r"\$\$.*?\$\$|\$[^$\s][^$]*\$"),  # math: notation, not measurements
    re.compile(r"\]\([^)]*\)"),  # link targets
    re.compile(r"https?://\S+"),
    re.compile(r"\b\d{4}-\d{2}-\d{2}\b"),  # dates
    re.compile(r"\b\d{1,2}:\d{2}(?::\d{2})?\b"),  # clock times
    re.compile(r"\b\d+\.\d+\.\d+\S*"),  # versions
    re.compile(r"\b\d+(?:\s*×\s*\d+)+(?!\s*%)\b(?!\s*×)"),  # shapes 28×28, 3×32×32
    re.compile(r"\b[A-Za-z_]\w*\s*\(\s*[\d.]+(?:\s*[,|]\s*[\d.]+)*\s*\)"),  # UPG(5, 0.5)
    re.compile(r"_\{[^}]*\}"),  # A_{5,0.5}
    re.compile(r"\{[^}]*\}"),  # sets {0.3, 0.5}
    re.compile(r"[=∈]\s*[-−]?[\d.]+(?:[eE][-−+]?\d+)?"),  # assignments λ = 0.5
]
_LABEL = re.compile(
    r"(?i)(?<![\w.])(?:"
    + "|".join(re.escape(w) for w in LABEL_WORDS)
    + r")\s*\(?\d[\d.]*\)?(?:\s*(?:/|,|–|-|and|or)\s*\(?\d[\d.]*\)?)*"
)


@dataclass(frozen=True)
class Problem:
    """One unsourced or mismatched number (or a bad source comment)."""

    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclass(frozen=True)
class Measured:
    text: str  # as printed
    value: float
    half_ulp: float  # half a unit of the last printed digit


def _parse(text: str) -> Measured:
    t = text.replace(",", "").replace("−", "-")
    value = float(t)
    mant, _, exp = t.lower().partition("e")
    decimals = len(mant.partition(".")[2])
    half = 0.5 * 10.0 ** (-decimals)
    if exp:
        half *= 10.0 ** int(exp)
    return Measured(text, abs(value), half)


def _clean(line: str) -> str:
    for pattern in _STRIP:
        line = pattern.sub(" ", line)
    return _LABEL.sub(" ", line)


def measured_numbers(line: str) -> list[Measured]:
    """The measured numbers of one line of prose or one table row (see the module docstring):
    in a table row every number after the first cell counts, integers included."""
    table = line.lstrip().startswith("|")
    if table:
        cells = line.strip().strip("|").split("|")
        if all(re.fullmatch(r"\s*:?-+:?\s*", c) for c in cells):
            return []
        line = "|".join(cells[1:])  # the first cell is the row's label
    text = _clean(line)
    out = []
    for m in _NUMBER.finditer(text):
        num = m.group("num")
        has_unit = m.group("unit") is not None
        if table or "." in num or "e" in num.lower() or has_unit:
            out.append(_parse(num))
    return out


def source_values(path: Path) -> list[float]:
    """Every number in a source file (absolute values)."""
    text = path.read_text(errors="replace")
    values: list[float] = []
    if path.suffix == ".json":
        try:
            _walk(json.loads(text), values)
            return values
        except json.JSONDecodeError:
            pass
    for tok in re.findall(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", text):
        values.append(abs(float(tok)))
    return values


def _walk(node: object, out: list[float]) -> None:
    if isinstance(node, bool):
        return
    if isinstance(node, int | float):
        if math.isfinite(node):
            out.append(abs(float(node)))
    elif isinstance(node, str):
        for tok in re.findall(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", node):
            out.append(abs(float(tok)))
    elif isinstance(node, dict):
        for k, v in node.items():
            _walk(k, out)
            _walk(v, out)
    elif isinstance(node, list):
        for v in node:
            _walk(v, out)


def _matches(m: Measured, values: list[float]) -> bool:
    tol = m.half_ulp * (1 + 1e-9) + 1e-12 * m.value
    return any(abs(s * c - m.value) <= tol for s in values for c in SCALES)


def _is_header(line: str, following: str) -> bool:
    """A table's header row: a row followed by the ``|---|`` separator."""
    return line.lstrip().startswith("|") and bool(
        re.fullmatch(r"\s*\|?(\s*:?-+:?\s*\|)+\s*:?-*:?\s*", following)
    )


def check_document(path: Path, root: Path = REPO) -> list[Problem]:
    """Every problem of one document (paths in messages relative to ``root``)."""
    name = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    problems: list[Problem] = []
    sources: list[str] = []
    cache: dict[str, list[float]] = {}
    fenced = False
    in_code = False
    lines = path.read_text().splitlines()
    for i, raw in enumerate(lines, start=1):
        if raw.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or raw.startswith(("    ", "\t")):
            continue
        if raw.startswith("#"):
            sources = []
            in_code = False
            continue
        for sm in _SOURCE.finditer(re.sub(r"`[^`]*`", " ", raw)):
            sources = [p for p in re.split(r"[\s,]+", sm.group("paths")) if p]
            for p in sources:
                if not (root / p).is_file():
                    problems.append(Problem(name, i, f"source file {p!r} does not exist"))
                elif p not in cache:
                    cache[p] = source_values(root / p)
        if _is_header(raw, lines[i] if i < len(lines) else ""):
            continue
        # inline code may run over a line break: carry an open backtick to the next line
        line = "`" + raw if in_code else raw
        in_code = line.count("`") % 2 == 1
        if in_code:
            line += "`"
        numbers = measured_numbers(line)
        if not numbers:
            continue
        if not sources:
            listed = ", ".join(n.text for n in numbers)
            problems.append(
                Problem(
                    name,
                    i,
                    f"number(s) {listed} without a source: put <!-- source: results/FILE --> "
                    f"above this table/paragraph, or a setting in `backticks` "
                    f"(convention: results/README.md)",
                )
            )
            continue
        values = [v for p in sources for v in cache.get(p, [])]
        for n in numbers:
            if not _matches(n, values):
                problems.append(
                    Problem(
                        name,
                        i,
                        f"number {n.text} not found in {', '.join(sources)} "
                        f"(to {n.half_ulp:.1g}, scales {', '.join(f'{c:g}' for c in SCALES[:5])}, ...)",
                    )
                )
    return problems


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a.startswith("-") for a in args):
        print("usage: python tools/check_results.py [DOC.md ...]", file=sys.stderr)
        return 2
    docs = [Path(a).resolve() for a in args] or [REPO / d for d in DOCUMENTS]
    problems: list[Problem] = []
    for doc in docs:
        if not doc.is_file():
            print(f"check_results: {doc}: no such document", file=sys.stderr)
            return 2
        problems += check_document(doc)
    for p in problems:
        print(p)
    checked = ", ".join(d.name for d in docs)
    if problems:
        print(f"check_results: {len(problems)} problem(s) in {checked}", file=sys.stderr)
        return 1
    print(f"check_results: every measured number in {checked} has its source")
    return 0


if __name__ == "__main__":
    sys.exit(main())
