"""MkDocs hooks of the phantomdeq site (mkdocs.yml ``hooks:``).

* Pages generated from the code at build time, where a page holds a marker comment:
  ``<!-- phantomdeq:config-options -->`` (every training config option with its type, default
  and allowed values, from the pydantic models), ``<!-- phantomdeq:cli-help -->`` (the
  ``--help`` of every command), ``<!-- phantomdeq:presets -->`` (the shipped configs).
* Math: ``$...$`` / ``$$...$$`` (pymdownx.arithmatex, generic mode) in pages and docstrings is
  converted to MathML at build time (latex2mathml), so the site renders equations with no
  JavaScript and no network.
* The repository's ``EXPERIMENTS.md`` and ``BENCHMARKS.md`` become the site's pages
  ``experiments.md`` and ``benchmarks.md`` (:data:`ROOT_PAGES`; their ``docs/`` image paths
  rewritten), so the measured numbers live in one file each and the site shows them.
* The build fails when a public object (a name in the ``__all__`` of a module listed in
  :data:`PUBLIC_MODULES`) has no docstring or appears on no page of the API reference.
"""

from __future__ import annotations

import contextlib
import html
import importlib
import inspect
import io
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import annotated_types
from latex2mathml.converter import convert as latex_to_mathml
from mkdocs.exceptions import PluginError

#: modules whose ``__all__`` is the public API that the reference must document
PUBLIC_MODULES = (
    "phantomdeq",
    "phantomdeq.solvers",
    "phantomdeq.grad",
    "phantomdeq.diagnostics",
    "phantomdeq.nn",
    "phantomdeq.models",
    "phantomdeq.data",
    "phantomdeq.train",
    "phantomdeq.precision",
    "phantomdeq.presets",
)

_MARKERS = ("config-options", "cli-help", "presets")

#: repository files published as site pages: file at the repository root -> page in the site
ROOT_PAGES = {"EXPERIMENTS.md": "experiments.md", "BENCHMARKS.md": "benchmarks.md"}


# --------------------------------------------------------------------------- generated pages


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _constraints(metadata: list[Any]) -> list[str]:
    out = []
    for m in metadata:
        for cls, attr, op in (
            (annotated_types.Ge, "ge", "≥"),
            (annotated_types.Gt, "gt", ">"),
            (annotated_types.Le, "le", "≤"),
            (annotated_types.Lt, "lt", "<"),
        ):
            if isinstance(m, cls):
                out.append(f"{op} {getattr(m, attr)}")
        if isinstance(m, annotated_types.MinLen):
            out.append(f"length ≥ {m.min_length}")
        if isinstance(m, annotated_types.MaxLen):
            out.append(f"length ≤ {m.max_length}")
        for inner in getattr(m, "metadata", []) or []:  # a FieldInfo inside Annotated
            out += _constraints([inner])
    return out


def _describe(annotation: Any) -> tuple[str, list[str]]:
    """(type name, allowed values / constraints) of a field annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        name, allowed = _describe(args[0])
        return name, allowed + _constraints(list(args[1:]))
    if origin is typing.Literal:
        return type(args[0]).__name__, [", ".join(f"`{a}`" for a in args)]
    if origin in (typing.Union, types.UnionType):
        names, allowed = [], []
        for a in args:
            if a is type(None):
                names.append("null")
                continue
            n, al = _describe(a)
            names.append(n)
            allowed += al
        return " \\| ".join(names), allowed
    if origin in (list, tuple, dict):
        inner = [_describe(a)[0] for a in args]
        return f"{origin.__name__}[{', '.join(inner)}]", [c for a in args for c in _describe(a)[1]]
    if isinstance(annotation, type):
        return annotation.__name__, []
    return str(annotation).replace("typing.", ""), []


def _option_table(
    model: Any, prefix: str, used_by: dict[str, list[str]] | None = None
) -> tuple[str, list[tuple[str, Any]]]:
    from pydantic import BaseModel

    rows = ["| key | type | default | allowed |" + (" used by |" if used_by else ""), ""]
    rows[1] = "|---|---|---|---|" + ("---|" if used_by else "")
    nested: list[tuple[str, type]] = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        default = field.get_default(call_default_factory=True)
        sub = [
            a
            for a in (typing.get_args(ann) or (ann,))
            if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if sub:
            nested.append((f"{prefix}.{name}", sub[0]))
            kind = "section" + (" \\| null" if type(None) in typing.get_args(ann) else "")
            shown = "see below" if default is not None else "null"
            row = f"| `{prefix}.{name}` | {kind} | {shown} | [{prefix}.{name}](#{_anchor(prefix + '.' + name)}) |"
        else:
            kind, allowed = _describe(ann)
            allowed += _constraints(list(field.metadata))  # pydantic moves Annotated's here
            allowed_text = "; ".join(allowed) if allowed else "any " + kind
            if used_by is not None and not allowed:
                allowed_text = "checked by the class using it"
            if name == "name" and used_by is not None:
                allowed_text = ", ".join(f"`{n}`" for n in used_by["__names__"])
            row = f"| `{prefix}.{name}` | {kind} | `{_yaml_value(default)}` | {allowed_text} |"
        if used_by is not None:
            users = used_by.get(name)
            row += " " + (", ".join(users) if users else "all") + " |"
        rows.append(row)
    out = "\n".join(rows) + "\n"
    return out, nested


def _anchor(key: str) -> str:
    return "option-" + key.replace(".", "-").replace("_", "-")


def _registry_users(
    registry: dict[str, type], options: Any, nested: dict[str, str], page: str
) -> dict[str, list[str]]:
    """Option -> links to the reference of the classes that declare it (``__names__``: the
    registry's names)."""
    users: dict[str, list[str]] = {"__names__": list(registry)}
    for key, cls in registry.items():
        link = f"[`{key}`]({page}#{cls.__module__.rsplit('.', 1)[0]}.{cls.__name__})"
        for opt in options(key):
            users.setdefault(nested.get(opt, opt), []).append(link)
    users["name"] = []
    return users


def config_options_markdown() -> str:
    """Every section of the training config as a table (from the pydantic models)."""
    import phantomdeq.grad as grad
    import phantomdeq.solvers as solvers
    from phantomdeq.train.config import Config
    from phantomdeq.train.sections import NESTED_SOLVERS, GradSection, SolverSection

    solver_users = _registry_users(solvers.SOLVERS, solvers.options, {}, "solvers.md")
    grad_users = _registry_users(grad.ESTIMATORS, grad.options, NESTED_SOLVERS, "estimators.md")
    parts: list[str] = []
    queue: list[tuple[str, type]] = [
        (name, typing.get_args(f.annotation)[0] if typing.get_args(f.annotation) else f.annotation)
        for name, f in Config.model_fields.items()
        if name != "plugins"
    ]
    while queue:
        key, model = queue.pop(0)
        users = None
        if issubclass(model, SolverSection):
            users = solver_users
        elif issubclass(model, GradSection):
            users = grad_users
        doc = inspect.cleandoc(model.__doc__ or "")
        table, nested = _option_table(model, key, users)
        parts.append(f"### `{key}` {{#{_anchor(key)}}}\n\n{_docstring_to_markdown(doc)}\n\n{table}")
        queue[0:0] = nested
    parts.append(
        "### `plugins` {#plugins}\n\nModules imported before the rest of the config is parsed "
        "(as `python -m` finds them: the working directory first), so that the solvers and "
        "estimators they register with `phantomdeq.solvers.register` and "
        "`phantomdeq.grad.register` can be named in `solver`, `eval_solver`, "
        "`grad.backward_solver` and `grad`, with their own options as keys of that section.\n\n"
        "| key | type | default | allowed |\n|---|---|---|---|\n"
        "| `plugins` | list[str] | `[]` | importable module names |\n"
    )
    return "\n".join(parts)


def _docstring_to_markdown(doc: str) -> str:
    doc = re.sub(r":(?:class|func|mod|data|meth|attr):`~?([^`]+)`", r"`\1`", doc)
    return doc.replace("``", "`")


def cli_help_markdown() -> str:
    """The ``--help`` text of every ``phantomdeq`` command."""
    from phantomdeq import cli

    os.environ["COLUMNS"] = "100"
    parts = ["### `phantomdeq`\n\n```text\n" + cli._usage() + "\n```\n"]
    for name in cli.COMMANDS:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
            cli.main([name, "--help"])
        text = buf.getvalue().rstrip()
        if not text:
            raise PluginError(f"phantomdeq {name} --help printed nothing")
        parts.append(f"### `phantomdeq {name}`\n\n```text\n{text}\n```\n")
    return "\n".join(parts)


def presets_markdown() -> str:
    from phantomdeq.presets import preset_description, preset_names

    rows = ["| preset (`--config NAME`) | description |", "|---|---|"]
    rows += [f"| `{n}` | {preset_description(n)} |" for n in preset_names()]
    return "\n".join(rows) + "\n"


_GENERATORS = {
    "config-options": config_options_markdown,
    "cli-help": cli_help_markdown,
    "presets": presets_markdown,
}


def root_page_markdown(text: str) -> str:
    """A root document as a page at the top of the site: ``docs/x.png`` becomes ``x.png``."""
    return re.sub(r"\]\(docs/", "](", text)


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    root = Path(config["docs_dir"]).resolve().parent
    for name, uri in ROOT_PAGES.items():
        text = (root / name).read_text(encoding="utf-8")
        files.append(File.generated(config, uri, content=root_page_markdown(text)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    for marker, make in _GENERATORS.items():
        tag = f"<!-- phantomdeq:{marker} -->"
        if tag in markdown:
            markdown = markdown.replace(tag, make())
    return markdown


# --------------------------------------------------------------------------- math, roles

_INLINE = re.compile(r'<span class="arithmatex">\\\((.*?)\\\)</span>', re.S)
_BLOCK = re.compile(r'<div class="arithmatex">\\\[(.*?)\\\]</div>', re.S)
_ROLE = re.compile(r":(?:class|func|mod|data|meth|attr|exc):(<code>)~?")


def _mathml(tex: str, display: str, where: str) -> str:
    source = html.unescape(tex).strip()
    try:
        return latex_to_mathml(source, display=display)
    except Exception as exc:  # latex2mathml raises many exception types
        raise PluginError(f"{where}: cannot render math {source!r}: {exc}") from exc


def on_page_content(html_text: str, page: Any, config: Any, files: Any) -> str:
    where = page.file.src_uri
    html_text = _BLOCK.sub(lambda m: _mathml(m.group(1), "block", where), html_text)
    html_text = _INLINE.sub(lambda m: _mathml(m.group(1), "inline", where), html_text)
    if "arithmatex" in html_text:
        raise PluginError(f"{where}: math left unconverted (an unknown arithmatex form)")
    return _ROLE.sub(r"\1", html_text)


# --------------------------------------------------------------------------- completeness

_ID = re.compile(r'id="(phantomdeq(?:\.[A-Za-z_][A-Za-z0-9_]*)+)"')


def _resolve(path: str) -> Any:
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for p in parts[i:]:
                obj = getattr(obj, p)
        except AttributeError:
            return None
        return obj
    return None


def _public_names(module: types.ModuleType) -> list[str]:
    """``__all__``, or else the module's own public functions and classes."""
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    return [
        n
        for n, o in vars(module).items()
        if not n.startswith("_")
        and (inspect.isfunction(o) or inspect.isclass(o))
        and o.__module__ == module.__name__
    ]


def undocumented(site_dir: str) -> list[str]:
    """Public names without a docstring or without a place in the built API reference."""
    ids: set[str] = set()
    for page in Path(site_dir, "reference").rglob("*.html"):
        ids.update(_ID.findall(page.read_text(encoding="utf-8")))
    shown = {id(o) for o in (_resolve(i) for i in ids) if o is not None}
    problems = []
    for mod_name in PUBLIC_MODULES:
        module = importlib.import_module(mod_name)
        for name in _public_names(module):
            obj = getattr(module, name)
            if isinstance(obj, types.ModuleType):
                if not (obj.__doc__ or "").strip():
                    problems.append(f"{mod_name}.{name}: module without a docstring")
                continue
            if (inspect.isclass(obj) or callable(obj)) and not (obj.__doc__ or "").strip():
                problems.append(f"{mod_name}.{name}: no docstring")
            if id(obj) not in shown and f"{mod_name}.{name}" not in ids:
                problems.append(f"{mod_name}.{name}: on no page of the API reference")
    return problems


def on_post_build(config: Any) -> None:
    problems = undocumented(config["site_dir"])
    if problems:
        raise PluginError(
            "undocumented public objects (add a docstring / a ::: entry under docs/reference/): "
            + "; ".join(problems)
        )
