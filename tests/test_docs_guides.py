"""The code of the documentation pages runs: every ```python block of README.md, docs/index.md
and docs/guides/*.md, each page's blocks in order in one namespace (a block right after a
``<!-- no-test -->`` line is skipped), from a temporary working directory."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", DOCS / "index.md", *sorted((DOCS / "guides").glob("*.md"))]
SKIP = "<!-- no-test -->"
_FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of the page's python blocks that are not marked ``no-test``."""
    out = []
    for m in _FENCE.finditer(text):
        before = text[: m.start()].rstrip().splitlines()
        if before and before[-1].strip() == SKIP:
            continue
        out.append((text.count("\n", 0, m.start()) + 2, m.group(1)))
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
    } <= names
    for page in PAGES:
        assert python_blocks(page.read_text(encoding="utf-8")), f"{page.name}: no tested code"


def test_block_extraction_honours_the_marker() -> None:
    text = "a\n```python\nx = 1\n```\n\n<!-- no-test -->\n```python\nraise SystemExit\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n")]


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
    threads = torch.get_num_threads()
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    try:
        for line, code in python_blocks(page.read_text(encoding="utf-8")):
            compiled = compile(code, f"{page.relative_to(ROOT)}:{line}", "exec")
            exec(compiled, namespace)  # noqa: S102 - the documentation's own code
    finally:
        torch.set_num_threads(threads)
