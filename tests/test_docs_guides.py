"""The code of the documentation pages runs: every ```python block of README.md, docs/index.md
and docs/guides/*.md, each page's blocks in order in one namespace (a block right after a
``<!-- no-test -->`` line is skipped), from a temporary working directory. A block of any
language right after a ``<!-- file: NAME -->`` line is the content of the file NAME: it is
written into that directory before the page's code runs (and not run itself)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", DOCS / "index.md", *sorted((DOCS / "guides").glob("*.md"))]
SKIP = "<!-- no-test -->"
_FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
_ANY_FENCE = re.compile(r"^```[a-z]*[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
_FILE = re.compile(r"^<!-- file: (\S+) -->$")


def _marker(text: str, start: int) -> str:
    before = text[:start].rstrip().splitlines()
    return before[-1].strip() if before else ""


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of the page's python blocks that are not marked ``no-test``
    and are not file contents."""
    out = []
    for m in _FENCE.finditer(text):
        marker = _marker(text, m.start())
        if marker == SKIP or _FILE.match(marker):
            continue
        out.append((text.count("\n", 0, m.start()) + 2, m.group(1)))
    return out


def file_blocks(text: str) -> dict[str, str]:
    """``{file name: content}`` of the page's blocks marked ``<!-- file: NAME -->``."""
    out = {}
    for m in _ANY_FENCE.finditer(text):
        name = _FILE.match(_marker(text, m.start()))
        if name:
            out[name.group(1)] = m.group(1)
    return out


def test_the_guides_exist_and_each_runs_code() -> None:
    names = {p.stem for p in PAGES}
    assert {
        "wrap-your-cell",
        "choosing",
        "training",
        "reproducing",
        "migrating-from-torchdeq",
        "speed",
        "second-order",
        "train-your-own-deq",
        "train-a-deq-language-model",
    } <= names
    for page in PAGES:
        assert python_blocks(page.read_text(encoding="utf-8")), f"{page.name}: no tested code"


def test_block_extraction_honours_the_marker() -> None:
    text = "a\n```python\nx = 1\n```\n\n<!-- no-test -->\n```python\nraise SystemExit\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n")]


def test_file_blocks_are_written_not_run() -> None:
    text = "<!-- file: m.py -->\n```python\nraise SystemExit\n```\n<!-- file: c.yaml -->\n```yaml\na: 1\n```\n"
    assert python_blocks(text) == []
    assert file_blocks(text) == {"m.py": "raise SystemExit\n", "c.yaml": "a: 1\n"}


def _page(page: Path) -> object:
    """A page whose code trains a model (the trainer or the command line) is in the slow tier."""
    code = "".join(c for _, c in python_blocks(page.read_text(encoding="utf-8")))
    trains = re.search(r"run_training|Trainer\(|\.fit\(|phantomdeq\.cli|commands\.main", code)
    marks = [pytest.mark.slow] if trains else []
    return pytest.param(page, id=page.relative_to(ROOT).as_posix(), marks=marks)


@pytest.mark.parametrize("page", [_page(p) for p in PAGES])
def test_page_code_runs(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path))  # the page's files import as from its folder
    text = page.read_text(encoding="utf-8")
    for name, content in file_blocks(text).items():
        (tmp_path / name).write_text(content, encoding="utf-8")
    threads = torch.get_num_threads()
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    try:
        for line, code in python_blocks(text):
            compiled = compile(code, f"{page.relative_to(ROOT)}:{line}", "exec")
            exec(compiled, namespace)  # noqa: S102 - the documentation's own code
    finally:
        torch.set_num_threads(threads)
        for name, module in list(sys.modules.items()):  # the page's own modules
            if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
                del sys.modules[name]
