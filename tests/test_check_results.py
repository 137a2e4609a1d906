"""tools/check_results.py: every measured number of the documents has a committed source.

The checker is tested on small documents written here (what counts as a measured number, how a
source comment applies, rounding to the printed precision, the messages), and then run on the
real README.md, EXPERIMENTS.md, BENCHMARKS.md and every page under docs/: that last test is what makes `make test` fail
when a document gains a number without a source or one that differs from it."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


def _checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_results", REPO / "tools/check_results.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["check_results"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


cr = _checker()


def _numbers(line: str) -> list[str]:
    return [m.text for m in cr.measured_numbers(line)]


def test_what_counts_as_a_measured_number() -> None:
    assert _numbers("accuracy 98.89 % after 6 epochs, 83 s, 1.40× faster, 255 MiB") == [
        "98.89",
        "83",
        "1.40",
        "255",
    ]
    assert _numbers("residual 3.7e-15 and cosine 0.951; took 50–80 ms") == [
        "3.7e-15",
        "0.951",
        "50",
        "80",
    ]
    # not measurements: plain integers in prose, code, labels, notation, dates, settings
    assert _numbers("200 draws of 20 dimensions, 2 cores, batch 64") == []
    assert _numbers("`--seed 1` takes `0.5` and ```lr 2e-3```") == []
    assert _numbers("eq. (17), Table 1, Fig. 3, Sec. 3, issue 13, step 16") == []
    assert _numbers("UPG(5, 0.5) and A_{5,0.5}, NPG(5|9, 0.5), k ∈ {0.3, 0.5}") == []
    assert _numbers("on 2026-11-27 at 02:27 UTC with torch 2.13.0, 28×28 maps") == []
    assert _numbers("λ = 0.5 and tol=1e-3") == []
    assert _numbers("math $\\|W\\|_2 = 0.9$ and $(1-\\lambda) h_{t+1}$, $$x^{2.5}$$") == []
    assert _numbers("`$OUT` holds 1.5 s") == ["1.5"]  # a lone $ in code opens no math
    # table rows: every number after the first cell, integers included
    assert _numbers("| 0.5 | 0.951 | 12 | 5 (0) |") == ["0.951", "12", "5", "0"]
    assert _numbers("|---|---|") == []


def _doc(tmp_path: Path, text: str, sources: dict[str, object]) -> Path:
    for name, content in sources.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content if isinstance(content, str) else json.dumps(content))
    doc = tmp_path / "DOC.md"
    doc.write_text(text)
    return doc


def test_sourced_numbers_pass_after_rounding_and_scaling(tmp_path: Path) -> None:
    doc = _doc(
        tmp_path,
        "# Results\n\n<!-- source: results/a.json -->\n"
        "Test accuracy 98.89 % (0.988857 in the file), step 534 ms (0.5341 s), ratio 1.40×.\n\n"
        "| method | acc | time |\n|---|---|---|\n| UPG | 98.9 % | 0.53 |\n",
        {"results/a.json": {"acc": 0.988857, "step_s": 0.5341, "ratio": 1.3996}},
    )
    assert cr.check_document(doc, root=tmp_path) == []


def test_unsourced_and_wrong_numbers_are_reported_with_line_and_number(tmp_path: Path) -> None:
    doc = _doc(
        tmp_path,
        "# A\n\nAccuracy 91.2 %.\n\n<!-- source: r.json -->\nAccuracy 91.3 % and 90.0 %.\n"
        "## B\n\nno source after a heading: 0.75\n<!-- source: missing.json -->\n",
        {"r.json": {"acc": 0.912}},
    )
    problems = [str(p) for p in cr.check_document(doc, root=tmp_path)]
    assert problems[0].startswith("DOC.md:3: number(s) 91.2 without a source")
    assert "<!-- source: results/FILE -->" in problems[0]
    # 91.3 differs from 0.912 by more than half a unit of its last digit
    assert problems[1].startswith("DOC.md:6: number 91.3 not found in r.json")
    assert problems[2].startswith("DOC.md:6: number 90.0 not found in r.json")
    assert problems[3].startswith("DOC.md:9: number(s) 0.75 without a source")
    assert problems[4] == "DOC.md:10: source file 'missing.json' does not exist"
    assert len(problems) == 5


def test_code_blocks_headers_and_text_sources(tmp_path: Path) -> None:
    doc = _doc(
        tmp_path,
        "```bash\nrun --tol 1e-5 --ratio 0.75\n```\n\n    indented 3.14 ms\n\n"
        "<!-- source: log.txt -->\n| 1.5 ms | 2.5 |\n|---|---|\n| row | 12.25 |\n",
        {"log.txt": "step time 12.247 ms\n"},
    )
    assert cr.check_document(doc, root=tmp_path) == []


def test_main_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _doc(tmp_path, "Took 3.5 s.\n", {})
    assert cr.main([str(bad)]) == 1
    assert "DOC.md:1: number(s) 3.5 without a source" in capsys.readouterr().out
    assert cr.main(["--help"]) == 2
    assert cr.main([str(tmp_path / "nope.md")]) == 2


def test_the_documents_have_a_source_for_every_number() -> None:
    assert {"README.md", "EXPERIMENTS.md", "BENCHMARKS.md", "docs/guides/choosing.md"} <= set(
        cr.DOCUMENTS
    )
    problems = [str(p) for d in cr.DOCUMENTS for p in cr.check_document(REPO / d)]
    assert not problems, "\n".join(problems)
