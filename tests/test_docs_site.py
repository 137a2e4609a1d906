"""The documentation site's generated parts (docs/hooks/phantomdeq_site.py): the config
option tables cover every option with its default and allowed values, math becomes MathML, and
the completeness check finds a public object the API reference leaves out. (`make docs` /
`make test` build the whole site with warnings as errors.)"""

from __future__ import annotations

import typing
from pathlib import Path
from types import ModuleType

import pytest
from pydantic import BaseModel

import phantomdeq.nn as nn_mod
from conftest import load_file
from phantomdeq.train.config import Config

pytest.importorskip("mkdocs")
pytest.importorskip("latex2mathml")

HOOKS = Path(__file__).resolve().parents[1] / "docs" / "hooks" / "phantomdeq_site.py"


def _hooks() -> ModuleType:
    return load_file(HOOKS, "phantomdeq_site_hooks")


def _keys(model: type[BaseModel], prefix: str) -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        out.append(f"{prefix}.{name}")
        for arg in typing.get_args(field.annotation) or (field.annotation,):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                out += _keys(arg, f"{prefix}.{name}")
    return out


def test_every_config_option_has_a_row() -> None:
    text = _hooks().config_options_markdown()
    rows = {
        line.split("|")[1].strip().strip("`"): line
        for line in text.splitlines()
        if line.startswith("| `")
    }
    for section, field in Config.model_fields.items():
        args = typing.get_args(field.annotation) or (field.annotation,)
        model = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:  # a top-level key (plugins)
            assert section in rows, f"{section} missing from the config options page"
            continue
        for key in _keys(model, section):
            assert key in rows, f"{key} missing from the config options page"
    assert "| `train.precision` | str | `fp32` | `fp32`, `bf16`, `fp16` |" in text
    assert "| `optim.lr` | float | `0.1` | > 0 |" in text
    assert rows["grad.k"].rstrip(" |").endswith("(estimators.md#phantomdeq.grad.NPG)")  # used by


def test_math_becomes_mathml() -> None:
    hooks = _hooks()

    class Page:
        class file:  # noqa: N801 - mimics mkdocs' page.file
            src_uri = "x.md"

    html = (
        '<p>a <span class="arithmatex">\\(h^\\star = F(h^\\star)\\)</span></p>'
        '<div class="arithmatex">\\[\\frac{\\partial L}{\\partial \\theta} &lt; 1\\]</div>'
    )
    out = hooks.on_page_content(html, Page, None, None)
    assert "arithmatex" not in out
    assert out.count("<math") == 2 and 'display="block"' in out
    assert "<mfrac>" in out and "<mo>&#x0003C;</mo>" in out  # the escaped "<" is an operator


def test_completeness_check_names_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hooks = _hooks()
    monkeypatch.setattr(hooks, "PUBLIC_MODULES", ("phantomdeq.nn",))
    ref = tmp_path / "reference"
    ref.mkdir()
    shown = [n for n in nn_mod.__all__ if n != "update_norms"]
    ref.joinpath("nn.html").write_text(
        "".join(f'<h2 id="phantomdeq.nn.{n}">{n}</h2>' for n in shown)
    )
    assert hooks.undocumented(str(tmp_path)) == [
        "phantomdeq.nn.update_norms: on no page of the API reference"
    ]
    ref.joinpath("more.html").write_text('<h2 id="phantomdeq.nn.norms.update_norms">x</h2>')
    assert hooks.undocumented(str(tmp_path)) == []  # found under its defining module's name
