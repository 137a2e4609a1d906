"""Check that every measured number in the project's documents is bound to one committed value.

    python3 tools/check_results.py [DOC ...]   # default: README.md EXPERIMENTS.md BENCHMARKS.md docs/**/*.md
    python3 tools/check_results.py --bind      # (re)bind the numbers of the default documents

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
* **Every measured number is bound to one value**: ``results/bindings.json`` maps each document
  line (its text with the measured numbers masked, plus which occurrence of that text) to one
  binding per number, ``FILE#KEY*SCALE``: ``FILE`` one of the files its ``source`` comment
  names, ``KEY`` a JSON pointer (``/rows/3/acc_mean``; a JSON Lines file is an array of its
  lines; ``@i`` the i-th number inside a string, ``@key`` a numeric key; in a text file ``@i``
  the i-th number token), ``SCALE`` one factor of :data:`SCALES` (``100``: a fraction printed
  as percent). The printed number must be that value times that scale rounded to the printed
  precision: strictly within half a unit of its last digit, or equal to Python's own rounding of
  it at that precision. Signs are ignored. A number with no binding, or whose binding names a
  file its source comment does not, is a problem.
* ``--bind`` keeps every binding that still holds and binds each unbound number to a value of
  its cited files that it matches (preferring scale 1, then 100, 1000, 1/100, ...; a plain
  number over one inside a string; the shorter key); it lists the numbers that matched several
  different values (review those) and those that matched none (fix the number or the source).

Exit status 0 when every measured number is bound and matches, 1 otherwise (one line per
problem: ``FILE:LINE: message``), 2 for a bad command line.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BINDINGS",
    "LABEL_WORDS",
    "SCALES",
    "Problem",
    "bind_documents",
    "check_document",
    "line_key",
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

#: the scales a binding may name, in the order ``--bind`` prefers them
SCALES = {
    "1": 1.0,
    "100": 100.0,
    "1000": 1000.0,
    "1/100": 0.01,
    "1/1000": 0.001,
    "1/2^20": 1.0 / 2**20,
    "1/2^30": 1.0 / 2**30,
    "60": 60.0,
    "1/60": 1.0 / 60.0,
    "1e6": 1e6,
}
#: the scales ``--bind`` tries first for a number printed with each unit (then all the others)
UNIT_SCALES = {
    "": ("1", "100"),
    "%": ("100", "1"),
    "point": ("100", "1"),
    "points": ("100", "1"),
    "×": ("1",),
    "ms": ("1", "1000"),
    "s": ("1", "1/1000", "60", "1/60"),
    "min": ("1", "1/60", "60"),
    "h": ("1", "1/60"),
    "MiB": ("1", "1/2^20"),
    "MB": ("1", "1/2^20"),
    "GiB": ("1", "1/2^30"),
    "GB": ("1", "1/2^30"),
    "KiB": ("1",),
    "µs": ("1", "1e6", "1000"),
    "us": ("1", "1e6", "1000"),
}
#: where a document's numbers are bound to their values
BINDINGS = "results/bindings.json"

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
    """One unbound or mismatched number (or a bad source comment)."""

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
    unit: str = ""  # the unit printed after it, if any


def _parse(text: str, unit: str = "") -> Measured:
    t = text.replace(",", "").replace("−", "-")
    value = float(t)
    mant, _, exp = t.lower().partition("e")
    decimals = len(mant.partition(".")[2])
    half = 0.5 * 10.0 ** (-decimals)
    if exp:
        half *= 10.0 ** int(exp)
    return Measured(text, abs(value), half, unit)


def _clean(line: str) -> str:
    for pattern in _STRIP:
        line = pattern.sub(" ", line)
    return _LABEL.sub(" ", line)


def _measured(line: str) -> tuple[str, list[tuple[Measured, int, int]]]:
    """The cleaned text of a line and its measured numbers with their spans in that text."""
    table = line.lstrip().startswith("|")
    if table:
        cells = line.strip().strip("|").split("|")
        if all(re.fullmatch(r"\s*:?-+:?\s*", c) for c in cells):
            return "", []
        # the first cell is the row's label: kept in the line's key, never a measurement
        label, line = cells[0], "|".join(cells[1:])
    text = _clean(line)
    out = []
    for m in _NUMBER.finditer(text):
        num = m.group("num")
        has_unit = m.group("unit") is not None
        if table or "." in num or "e" in num.lower() or has_unit:
            out.append((_parse(num, m.group("unit") or ""), m.start("num"), m.end("num")))
    if table:
        shift = len(label) + 1
        text = label + "|" + text
        out = [(n, a + shift, b + shift) for n, a, b in out]
    return text, out


def measured_numbers(line: str) -> list[Measured]:
    """The measured numbers of one line of prose or one table row (see the module docstring):
    in a table row every number after the first cell counts, integers included."""
    return [n for n, _, _ in _measured(line)[1]]


def line_key(line: str) -> str:
    """The line's text with its measured numbers masked (``#``) and spaces collapsed: what a
    binding is keyed by, so that it survives edits of the numbers but not of the words."""
    text, spans = _measured(line)
    for _, a, b in reversed(spans):
        text = text[:a] + "#" + text[b:]
    return " ".join(text.split())


#: a number token of a string or a text file (not a digit of a name such as ``seed0``, ``f3a``)
_TOKEN = re.compile(r"(?<![A-Za-z_\d.])[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?!\d)")


def _pointer(parts: list[str]) -> str:
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


def source_values(path: Path) -> dict[str, float]:
    """Every number of a source file by key (absolute values; see the module docstring)."""
    text = path.read_text(errors="replace")
    out: dict[str, float] = {}
    if path.suffix == ".json":
        try:
            _walk(json.loads(text), [], out)
            return out
        except json.JSONDecodeError:
            pass
    if path.suffix == ".jsonl":
        for i, line in enumerate(text.splitlines()):
            try:
                _walk(json.loads(line), [str(i)], out)
            except json.JSONDecodeError:
                continue
        return out
    for i, tok in enumerate(_TOKEN.findall(text)):
        out[f"@{i}"] = abs(float(tok))
    return out


def _walk(node: object, parts: list[str], out: dict[str, float]) -> None:
    if isinstance(node, bool):
        return
    if isinstance(node, int | float):
        if math.isfinite(node):
            out[_pointer(parts)] = abs(float(node))
    elif isinstance(node, str):
        for i, tok in enumerate(_TOKEN.findall(node)):
            out[f"{_pointer(parts)}@{i}"] = abs(float(tok))
    elif isinstance(node, dict):
        for k, v in node.items():
            if _TOKEN.fullmatch(str(k)):
                out[f"{_pointer([*parts, str(k)])}@key"] = abs(float(k))
            _walk(v, [*parts, str(k)], out)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _walk(v, [*parts, str(i)], out)


def _agrees(m: Measured, value: float) -> bool:
    """``value`` printed at ``m``'s precision is ``m``: strictly within half a unit of the last
    printed digit, or equal to Python's rounding of it (which settles exact halves)."""
    if abs(value - m.value) < m.half_ulp * (1 - 1e-6):
        return True
    mant, _, exp = m.text.replace(",", "").replace("−", "-").lower().partition("e")
    decimals = len(mant.partition(".")[2])
    shown = f"{value:.{decimals}e}" if exp else f"{value:.{decimals}f}"
    return float(shown) == m.value


@dataclass(frozen=True)
class Binding:
    file: str
    key: str
    scale: str

    def __str__(self) -> str:
        return f"{self.file}#{self.key}*{self.scale}"

    @staticmethod
    def parse(text: str) -> Binding:
        rest, _, scale = text.rpartition("*")
        file, _, key = rest.partition("#")
        if not file or scale not in SCALES:
            raise ValueError(
                f"bad binding {text!r}: want FILE#KEY*SCALE, SCALE one of {', '.join(SCALES)}"
            )
        return Binding(file, key, scale)


def _is_header(line: str, following: str) -> bool:
    """A table's header row: a row followed by the ``|---|`` separator."""
    return line.lstrip().startswith("|") and bool(
        re.fullmatch(r"\s*\|?(\s*:?-+:?\s*\|)+\s*:?-*:?\s*", following)
    )


@dataclass
class _Line:
    number: int  # 1-based
    key: str
    occurrence: int
    numbers: list[Measured]
    sources: list[str]
    context: str = ""  # the line, the line before it and its table's header: words for --bind
    block: int = 0  # lines under the same source comment share a block
    near: list[str] = dataclasses.field(default_factory=list)  # per number: words for --bind
    labels: list[set[float]] = dataclasses.field(default_factory=list)  # per number: see _labels


def _labels(line: str, header: str) -> list[set[float]]:
    """Per measured number of a table row, the numbers of its row label and column header
    (``| 0.5 | ... |`` under ``k = 10``: {0.5, 10}), which name the record it comes from."""
    text, spans = _measured(line)
    if not line.lstrip().startswith("|"):
        return [set() for _ in spans]
    heads = header.strip().strip("|").split("|") if header else []
    label = line.strip().strip("|").split("|")[0]
    out = []
    for _, a, _ in spans:
        col = text[:a].count("|")
        words = label + " " + (heads[col] if col < len(heads) else "")
        out.append({_round(float(t)) for t in re.findall(r"(?<![\w.])\d+(?:\.\d+)?", words)})
    return out


def _round(v: float) -> float:
    return float(f"{v:.9g}")


def _near(line: str, header: str) -> list[str]:
    """Per measured number, the words that name it: in a table row its column's header cell and
    the row's first cell; in prose the text since the previous number."""
    text, spans = _measured(line)
    if line.lstrip().startswith("|"):
        heads = header.strip().strip("|").split("|") if header else []
        label = line.strip().strip("|").split("|")[0]
        out = []
        for _, a, _ in spans:
            col = text[:a].count("|")  # cells before it in the cleaned row (label included)
            out.append(label + " " + (heads[col] if col < len(heads) else ""))
        return out
    out, last = [], 0
    for _, a, b in spans:
        segment = text[last:a]
        # the second end of a range (or any number right after another) shares the first's words
        out.append(segment if re.search(r"[A-Za-z]", segment) or not out else out[-1])
        last = b
    return out


def _scan(path: Path, root: Path, name: str, problems: list[Problem]) -> list[_Line]:
    """The lines of a document that hold measured numbers, with their sources; missing source
    files and numbers without a source comment go to ``problems``."""
    out: list[_Line] = []
    sources: list[str] = []
    seen: dict[str, int] = {}
    header = ""
    block = 0
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
            block += 1
            continue
        if not raw.lstrip().startswith("|"):
            header = ""
        for sm in _SOURCE.finditer(re.sub(r"`[^`]*`", " ", raw)):
            block += 1
            sources = [p for p in re.split(r"[\s,]+", sm.group("paths")) if p]
            for p in sources:
                if not (root / p).is_file():
                    problems.append(Problem(name, i, f"source file {p!r} does not exist"))
        if _is_header(raw, lines[i] if i < len(lines) else ""):
            header = raw
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
        key = line_key(line)
        occ = seen.get(key, 0)
        seen[key] = occ + 1
        context = " ".join((lines[i - 2] if i > 1 else "", raw, header))
        near = _near(line, header)
        labels = _labels(line, header)
        out.append(_Line(i, key, occ, numbers, list(sources), context, block, near, labels))
    return out


class _Sources:
    """Source files' values by key, read once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache: dict[str, dict[str, float]] = {}
        self.sorted: dict[str, list[tuple[float, str]]] = {}
        self.records: dict[str, dict[str, set[float]]] = {}

    def fields(self, file: str, record: str) -> set[float]:
        """The values of a record's own numeric fields (``/rows/3/k``, not deeper)."""
        if file not in self.records:
            by: dict[str, set[float]] = {}
            for k, v in self.values(file).items():
                if "@" in k:
                    continue
                parent, _, _ = k.rpartition("/")
                by.setdefault(parent, set()).add(_round(v))
            self.records[file] = by
        return self.records[file].get(record, set())

    def values(self, file: str) -> dict[str, float]:
        if file not in self.cache:
            p = self.root / file
            self.cache[file] = source_values(p) if p.is_file() else {}
        return self.cache[file]

    def candidates(self, m: Measured, files: list[str]) -> list[Binding]:
        """Every binding among ``files`` that ``m`` agrees with, best first."""
        found: list[tuple[tuple[int, int, bool, int, int], Binding]] = []
        for fi, file in enumerate(files):
            if file not in self.sorted:
                self.sorted[file] = sorted((v, k) for k, v in self.values(file).items())
            entries = self.sorted[file]
            for si, (sname, c) in enumerate(SCALES.items()):
                lo = bisect.bisect_left(entries, ((m.value - m.half_ulp) / c * (1 - 1e-9),))
                hi = bisect.bisect_right(
                    entries, ((m.value + m.half_ulp) / c * (1 + 1e-9), "\uffff")
                )
                for v, k in entries[lo:hi]:
                    if _agrees(m, v * c):
                        preferred = UNIT_SCALES.get(m.unit, ("1",))
                        tier = preferred.index(sname) if sname in preferred else len(SCALES)
                        rank = (tier, si, "@" in k, fi, len(k))
                        found.append((rank, Binding(file, k, sname)))
        return [b for _, b in sorted(found, key=lambda t: (t[0], str(t[1])))]

    def preferred(self, m: Measured, b: Binding) -> bool:
        """Whether ``b``'s scale is one ``--bind`` tries first for ``m``'s unit."""
        return b.scale in UNIT_SCALES.get(m.unit, ("1",))


def _load_bindings(root: Path) -> dict[str, dict[str, list[list[str]]]]:
    p = root / BINDINGS
    if not p.is_file():
        return {}
    return json.loads(p.read_text()).get("documents", {})


def _check_line(ln: _Line, bound: list[str] | None, src: _Sources, name: str) -> list[Problem]:
    listed = ", ".join(n.text for n in ln.numbers)
    if bound is None or len(bound) != len(ln.numbers):
        return [
            Problem(
                name,
                ln.number,
                f"number(s) {listed} not bound to a value: run python3 tools/check_results.py --bind "
                f"(convention: results/README.md)",
            )
        ]
    problems = []
    for n, text in zip(ln.numbers, bound, strict=True):
        try:
            b = Binding.parse(text)
        except ValueError as e:
            problems.append(Problem(name, ln.number, f"number {n.text}: {e}"))
            continue
        if b.file not in ln.sources:
            problems.append(
                Problem(
                    name,
                    ln.number,
                    f"number {n.text} is bound to {b.file}, which the source comment does not name",
                )
            )
            continue
        value = src.values(b.file).get(b.key)
        if value is None:
            problems.append(Problem(name, ln.number, f"number {n.text}: {b} does not exist"))
            continue
        shown = value * SCALES[b.scale]
        if not _agrees(n, shown):
            problems.append(
                Problem(
                    name, ln.number, f"number {n.text} differs from its value {shown:.6g} ({b})"
                )
            )
    return problems


def check_document(
    path: Path,
    root: Path = REPO,
    name: str | None = None,
    bindings: dict[str, dict[str, list[list[str]]]] | None = None,
) -> list[Problem]:
    """Every problem of one document (paths in messages relative to ``root``; ``name``: the
    document's name in the bindings, by default its path relative to ``root``)."""
    if name is None:
        name = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
    bound = (_load_bindings(root) if bindings is None else bindings).get(name, {})
    problems: list[Problem] = []
    src = _Sources(root)
    for ln in _scan(path, root, name, problems):
        occurrences = bound.get(ln.key, [])
        entry = occurrences[ln.occurrence] if ln.occurrence < len(occurrences) else None
        problems += _check_line(ln, entry, src, name)
    return sorted(problems, key=lambda p: p.line)


_STOP = {"records", "rows", "result", "results", "runs", "summary", "json", "jsonl", "key", "txt"}


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z][a-z0-9]*", text.lower()) if len(w) >= 2}


@functools.cache
def _key_tokens(file: str, key: str) -> frozenset[str]:
    return frozenset(_words(Path(file).stem + " " + key.replace("_", " ")) - _STOP)


def _overlap(b: Binding, words: set[str]) -> int:
    """How many words of the binding's file name and key appear in the line's context."""
    tokens = _key_tokens(b.file, b.key)
    hits = 0
    for t in tokens:
        if any(
            w == t or (min(len(w), len(t)) >= 3 and (w.startswith(t) or t.startswith(w)))
            for w in words
        ):
            hits += 1
    return hits - (2 if "config" in tokens else 0)


@functools.cache
def _pattern_of(file: str, key: str, scale: str) -> str:
    return f"{file}#{re.sub(r'/[0-9]+', '/#', key)}*{scale}"


@functools.cache
def _record(key: str) -> str:
    """The record a key belongs to: up to its last list index (``/rows/3/acc`` -> ``/rows/3``),
    else its parent."""
    parts = key.split("@")[0].split("/")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i].isdigit():
            return "/".join(parts[: i + 1])
    return "/".join(parts[:-1])


def _pattern(b: Binding) -> str:
    return _pattern_of(b.file, b.key, b.scale)


def bind_documents(docs: list[Path], root: Path = REPO) -> tuple[list[Problem], list[str]]:
    """Rewrite ``root/results/bindings.json`` for ``docs``: keep the bindings that hold, bind the
    rest (see the module docstring). Returns the problems left (numbers matching no value, bad
    sources) and notes on the numbers bound among several different values.

    Among the values a number matches, it takes one at a scale its unit suggests
    (:data:`UNIT_SCALES`); then a plain number over one inside a string; then one whose record
    has fields equal to the numbers of its row label and column header (``k``, ``lam``); then
    one from the record
    (``/rows/3``) that could supply the most numbers of its table row, if that is at least half
    of them and 3; then the one whose file name and key share the most words with
    the number's own label (its column header and row label in a table, the text since the
    previous number in prose); then the most words with its line, the line before and its table's header;
    then the key pattern (record indices masked) that the most numbers under the same source
    comment also match (a table column); then the record (``/rows/3``) that could supply the
    most numbers of its line; then the file that could; then scale 1, 100, 1000, ...; the file
    named first; the shorter key."""
    old = _load_bindings(root)
    new: dict[str, dict[str, list[list[str]]]] = {
        k: v for k, v in old.items() if not any((root / k) == d for d in docs)
    }
    problems: list[Problem] = []
    notes: list[str] = []
    src = _Sources(root)
    for doc in docs:
        name = doc.relative_to(root).as_posix() if doc.is_relative_to(root) else str(doc)
        prior = old.get(name, {})
        lines = _scan(doc, root, name, problems)
        doc_lines = doc.read_text().splitlines()
        # the bindings that still hold; candidates only where a block has a number without one
        held: list[list[str | None]] = []
        for ln in lines:
            occ = prior.get(ln.key, [])
            kept = occ[ln.occurrence] if ln.occurrence < len(occ) else None
            row: list[str | None] = [None] * len(ln.numbers)
            if kept is not None and len(kept) == len(ln.numbers):
                for j, n in enumerate(ln.numbers):
                    single = _Line(ln.number, ln.key, ln.occurrence, [n], ln.sources)
                    if not _check_line(single, [kept[j]], src, name):
                        row[j] = kept[j]
            held.append(row)
        todo = {ln.block for ln, row in zip(lines, held, strict=True) if None in row}
        cands: dict[tuple[int, int], list[Binding]] = {}
        votes: dict[int, Counter[str]] = {}
        for li, ln in enumerate(lines):
            if ln.block not in todo:
                continue
            for j, n in enumerate(ln.numbers):
                cs = src.candidates(n, ln.sources)
                cands[(li, j)] = cs
                votes.setdefault(ln.block, Counter()).update({_pattern(c) for c in cs})
        out: dict[str, list[list[str]]] = {}
        for li, ln in enumerate(lines):
            if None not in held[li]:
                out.setdefault(ln.key, []).append([str(b) for b in held[li]])
                continue
            words = _words(ln.context)
            near_words = [_words(t) for t in ln.near]
            # how many numbers of the line each record (and each file) could supply
            rec_cover: Counter[tuple[str, str]] = Counter()
            file_cover: Counter[str] = Counter()
            for j in range(len(ln.numbers)):
                cs = cands[(li, j)]
                rec_cover.update({(c.file, _record(c.key)) for c in cs})
                file_cover.update({c.file for c in cs})
            # a table row's record: the one that supplies the most numbers, if that is most of them
            top = max(rec_cover.values(), default=0)
            in_table = doc_lines[ln.number - 1].lstrip().startswith("|")
            enough = top >= max(3, (len(ln.numbers) + 1) // 2)
            strong = top if in_table and enough else len(ln.numbers) + 1
            entry: list[str] = []
            for j, n in enumerate(ln.numbers):
                kept_j = held[li][j]
                if kept_j is not None:
                    entry.append(kept_j)
                    continue
                cs = cands[(li, j)]
                if not cs:
                    problems.append(
                        Problem(
                            name,
                            ln.number,
                            f"number {n.text} matches no value of {', '.join(ln.sources)}",
                        )
                    )
                    entry.append("")
                    continue
                best = max(
                    enumerate(cs),
                    key=lambda t: (
                        src.preferred(n, t[1]),
                        "@" not in t[1].key,
                        len(ln.labels[j] & src.fields(t[1].file, _record(t[1].key))),
                        rec_cover[(t[1].file, _record(t[1].key))] == strong,
                        _overlap(t[1], near_words[j]),
                        _overlap(t[1], words),
                        votes[ln.block][_pattern(t[1])],
                        rec_cover[(t[1].file, _record(t[1].key))],
                        file_cover[t[1].file],
                        -t[0],
                    ),
                )[1]
                values = {round(src.values(c.file)[c.key] * SCALES[c.scale], 12) for c in cs}
                if len(values) > 1:
                    notes.append(f"{name}:{ln.number}: {n.text} -> {best} ({len(cs)} candidates)")
                entry.append(str(best))
            out.setdefault(ln.key, []).append(entry)
        new[name] = out
    doc_out = {
        "about": (
            "Each measured number of the documents bound to one value: document -> the line's "
            "text with its numbers masked -> one list per occurrence of that text -> one "
            "FILE#KEY*SCALE per number. Written by python3 tools/check_results.py --bind; "
            "convention: results/README.md."
        ),
        "documents": {k: new[k] for k in sorted(new)},
    }
    (root / BINDINGS).parent.mkdir(parents=True, exist_ok=True)
    (root / BINDINGS).write_text(json.dumps(doc_out, indent=1, ensure_ascii=False) + "\n")
    return problems, notes


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    bind = args == ["--bind"]
    if not bind and any(a.startswith("-") for a in args):
        print("usage: python3 tools/check_results.py [DOC.md ...] | --bind", file=sys.stderr)
        return 2
    if bind:
        docs = [REPO / d for d in DOCUMENTS]
        problems, notes = bind_documents(docs)
        for note in notes:
            print(f"ambiguous: {note}")
        for p in problems:
            print(p)
        print(
            f"check_results: wrote {BINDINGS} ({len(notes)} ambiguous, {len(problems)} problem(s))"
        )
        return 1 if problems else 0
    docs = [Path(a).resolve() for a in args] or [REPO / d for d in DOCUMENTS]
    problems = []
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
    print(f"check_results: every measured number in {checked} is bound to its value")
    return 0


if __name__ == "__main__":
    sys.exit(main())
