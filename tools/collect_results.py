"""Copy what the documents quote from ignored run folders (``runs/``) into small committed files
under ``results/``, and redraw the figures from those files.

    python tools/collect_results.py [--runs runs]

Reads (each part is skipped with a message when its run folder is missing):

* the ``phantomdeq ablate`` studies of EXPERIMENTS.md (:data:`STUDIES`: ``runs/table1_mnist``,
  ``runs/fig3_upg_mnist``, ``runs/fig3_npg_mnist``) -> ``results/<name>/ablation.json`` (rows,
  per-run results, paired differences by seed) and ``table.md``; then ``docs/fig3_mnist.png``
  drawn from the two Fig. 3 studies' files;
* the monitored runs (``phantomdeq train`` with ``train.monitor_compare``; :data:`MONITORED`:
  ``runs/fig2_mnist``, ``runs/shine_monitor_mnist``) -> ``results/<name>/monitor.jsonl`` (the
  monitor records), ``config.yaml`` and ``result.json``, then ``docs/<name>.png`` drawn from
  them;
* ``runs/digits_demo``, ``runs/digits_nobn`` (the digits demo config with and without precise
  BN) -> ``results/digits/*.json`` (per-epoch records, the ``eval_solver.max_iter=60``
  re-evaluation).

Every file also records the machine (CPU count, load average, torch version) it was copied on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"


def _environment() -> dict[str, Any]:
    import torch

    return {
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_at_collection": list(os.getloadavg()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "note": "2-core development VM shared by several agents; times are contended",
    }


def _records(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _write(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"wrote {path.relative_to(REPO)}")


#: ablation studies (``phantomdeq ablate`` output folders under runs/) and how they were run
STUDIES = {
    "table1_mnist": "the phantomdeq ablate loop of EXPERIMENTS.md, Ablations on MNIST",
    "fig3_upg_mnist": (
        "phantomdeq ablate --config configs/ablation/mnist_upg.yaml --grid k=1,2,3,5,7,9 "
        "--grid lam=0.3,0.5,0.7,1.0 --seeds 3 --jobs 2 --out runs/fig3_upg_mnist"
    ),
    "fig3_npg_mnist": (
        "phantomdeq ablate --config configs/ablation/mnist_npg.yaml --grid k=5,6,7,8,9 "
        "--seeds 3 --jobs 2 --out runs/fig3_npg_mnist"
    ),
}

#: monitored training runs (``train.monitor_compare``): figure and title
MONITORED = {
    "fig2_mnist": (
        "fig2_mnist.png",
        "MNIST, IFT-trained run: UPG / NPG A_{5,0.5} vs exact gradient",
    ),
    "shine_monitor_mnist": (
        "shine_monitor_mnist.png",
        "MNIST, IFT training, Broyden forward: SHINE / UPG / NPG vs exact",
    ),
}


def collect_study(runs: Path, name: str) -> list[dict[str, Any]]:
    """``results/<name>/ablation.json`` and ``table.md`` from the study folder; its rows."""
    src = runs / name
    if not (src / "runs").is_dir():
        print(f"skip: {src}/runs missing")
        return []
    from phantomdeq.experiments.report import paired_table, summarize, table_markdown

    summary = summarize(src)
    rows = summary["rows"]
    runs_out = [
        {
            "label": r["label"],
            "seed": r["seed"],
            "source": r["source"],
            "result": {k: v for k, v in r["result"].items() if k != "acc_curve"},
        }
        for r in summary["runs"]
    ]
    doc = {
        "command": STUDIES[name],
        "environment": _environment(),
        "rows": rows,
        "paired": paired_table(rows),
        "runs": runs_out,
    }
    _write(RESULTS / name / "ablation.json", doc)
    (RESULTS / name / "table.md").write_text(table_markdown(rows))
    return rows


def draw_fig3() -> None:
    """``docs/fig3_mnist.png`` from the committed Fig. 3 studies (UPG over k and λ, NPG over k)."""
    from phantomdeq.experiments.report import plot_fig3

    rows: list[dict[str, Any]] = []
    for name in ("fig3_upg_mnist", "fig3_npg_mnist"):
        path = RESULTS / name / "ablation.json"
        if path.is_file():
            rows += json.loads(path.read_text())["rows"]
    if rows and plot_fig3(rows, REPO / "docs" / "fig3_mnist.png") is not None:
        print("wrote docs/fig3_mnist.png")


def _summary(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """min / mean / median / max over the monitor records of every numeric ``monitor_*`` field
    (and the forward residual and time of those steps)."""
    import statistics

    keys = sorted({k for r in records for k in r if k.startswith("monitor_")})
    out: dict[str, dict[str, float]] = {}
    for key in [*keys, "fwd_residual", "step_time_s"]:
        vals = [float(r[key]) for r in records if isinstance(r.get(key), int | float)]
        if vals:
            out[key] = {
                "n": len(vals),
                "min": min(vals),
                "mean": statistics.fmean(vals),
                "median": statistics.median(vals),
                "max": max(vals),
            }
    return out


def _pooled(rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]]) -> dict[str, float]:
    """Per seed, the mean over rows of ``a - b`` (rows paired in order): one difference per
    seed, as :func:`paired_difference` takes them."""
    seeds = set.intersection(*(set(r["acc_by_seed"]) for r in rows_a + rows_b))
    return {
        s: sum(a["acc_by_seed"][s] - b["acc_by_seed"][s] for a, b in zip(rows_a, rows_b))
        / len(rows_a)
        for s in sorted(seeds)
    }


def fig3_claims() -> None:
    """``results/fig3_mnist/claims.json``: the paper's Fig. 3 comparisons as paired differences
    by seed (in accuracy fractions). No verdicts here: they come from ``tools/verdicts.py``
    (``results/claims.yaml`` -> ``results/verdicts.json``: paired t-tests, Holm over the whole
    family); the average over k is exploratory (chosen after seeing the data)."""
    from phantomdeq.experiments.report import paired_difference

    files = [RESULTS / n / "ablation.json" for n in ("fig3_upg_mnist", "fig3_npg_mnist")]
    if not all(f.is_file() for f in files):
        print("skip: Fig. 3 claims need both Fig. 3 studies")
        return
    upg_rows, npg_rows = (json.loads(f.read_text())["rows"] for f in files)
    upg = {(r["k"], r["lam"]): r for r in upg_rows}
    npg = {r["k"]: r for r in npg_rows}
    ks = sorted({k for k, _ in upg})
    lams = sorted({lam for _, lam in upg})
    claims: dict[str, Any] = {}

    def pair(name: str, a: dict[str, Any] | None, b: dict[str, Any] | None) -> None:
        if a is None or b is None:
            print(f"fig3 claims: {name}: a configuration is missing")
            return
        d = paired_difference(a["acc_by_seed"], b["acc_by_seed"])
        claims[name] = {"a": a["label"], "b": b["label"], **(d or {})}

    # Fig. 3a: damping -- lambda = 0.5 ahead of lambda = 1, at each k and pooled over k
    for k in ks:
        pair(f"upg_k{k}_lam0.5_minus_lam1", upg.get((k, 0.5)), upg.get((k, 1.0)))
    both = [k for k in ks if (k, 0.5) in upg and (k, 1.0) in upg]
    diffs = _pooled([upg[(k, 0.5)] for k in both], [upg[(k, 1.0)] for k in both])
    pooled = paired_difference(diffs, {s: 0.0 for s in diffs})
    claims["upg_lam0.5_minus_lam1_pooled_over_k"] = {
        **(pooled or {}),
        "exploratory": "average over k chosen after seeing the data; no verdict",
    }
    # Fig. 3b: UPG robust to k (at lambda = 0.5: no k far behind k = 5)
    for k in ks:
        if k != 5:
            pair(f"upg_k{k}_minus_k5_lam0.5", upg.get((k, 0.5)), upg.get((5, 0.5)))
    half = [k for k in ks if (k, 0.5) in upg]
    means = {k: upg[(k, 0.5)]["acc_mean"] for k in half}
    claims["upg_lam0.5_mean_spread_over_k"] = {
        "max": max(means.values()),
        "min": min(means.values()),
        "spread": max(means.values()) - min(means.values()),
        "mean_seed_std": sum(upg[(k, 0.5)]["acc_std"] or 0.0 for k in half) / len(half),
    }
    # Fig. 3b: UPG ahead of NPG, NPG unstable at larger k
    for k in sorted(npg):
        if (k, 0.5) in upg:
            pair(f"upg_minus_npg_k{k}_lam0.5", upg[(k, 0.5)], npg[k])
    claims["npg_stability"] = {
        str(k): {
            "failed": r["n_failed"],
            "runs": r["n_runs"],
            "grad_norm_median": r.get("grad_norm_median"),
            "grad_norm_max": r.get("grad_norm_max"),
            "upg_grad_norm_max": upg[(k, 0.5)].get("grad_norm_max") if (k, 0.5) in upg else None,
        }
        for k, r in sorted(npg.items())
    }
    claims["lams"], claims["ks"] = lams, ks
    _write(RESULTS / "fig3_mnist" / "claims.json", {"environment": _environment(), **claims})


def _pairs(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """For each two monitored estimators a, b (``monitor_cos_<a>``): the largest
    ``|cos_a - cos_b|`` over the measurements and the number where ``a`` is ahead."""
    names = sorted(
        k[len("monitor_cos_") :]
        for k in {k for r in records for k in r}
        if k.startswith("monitor_cos_")
    )
    out: dict[str, dict[str, float]] = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            d = [
                float(r[f"monitor_cos_{a}"]) - float(r[f"monitor_cos_{b}"])
                for r in records
                if isinstance(r.get(f"monitor_cos_{a}"), int | float)
                and isinstance(r.get(f"monitor_cos_{b}"), int | float)
            ]
            if d:
                out[f"{a}_minus_{b}"] = {
                    "n": len(d),
                    "abs_max": max(abs(x) for x in d),
                    "a_ahead": sum(x > 0 for x in d),
                }
    return out


def monitored_summaries(name: str) -> None:
    """Add ``monitor_summary`` and ``monitor_pairs`` to a committed ``results/<name>/result.json``
    from its committed ``monitor.jsonl`` (for files collected before they existed)."""
    dst = RESULTS / name
    doc = json.loads((dst / "result.json").read_text())
    monitor = _records(dst / "monitor.jsonl")
    doc["monitor_summary"] = _summary(monitor)
    doc["monitor_pairs"] = _pairs(monitor)
    _write(dst / "result.json", doc)


def collect_monitored(runs: Path, name: str) -> None:
    src = runs / name
    if not (src / "metrics.jsonl").is_file():
        print(f"skip: {src}/metrics.jsonl missing")
        return
    recs = _records(src / "metrics.jsonl")
    monitor = [r for r in recs if r.get("kind") == "step" and "monitor_cos" in r]
    epochs = [r for r in recs if r.get("kind") == "epoch"]
    dst = RESULTS / name
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "monitor.jsonl").write_text("".join(json.dumps(r) + "\n" for r in monitor))
    shutil.copyfile(src / "config.yaml", dst / "config.yaml")
    _write(
        dst / "result.json",
        {
            "environment": _environment(),
            "epochs": epochs,
            "monitor_summary": _summary(monitor),
            "monitor_pairs": _pairs(monitor),
        },
    )
    from phantomdeq.train.metrics import plot_monitor

    figure, title = MONITORED[name]
    plot_monitor(dst / "monitor.jsonl", REPO / "docs" / figure, title=title)
    print(f"wrote docs/{figure}")


def collect_digits(runs: Path) -> None:
    for name in ("digits_demo", "digits_nobn"):
        src = runs / name
        if not (src / "metrics.jsonl").is_file():
            print(f"skip: {src}/metrics.jsonl missing")
            continue
        epochs = [r for r in _records(src / "metrics.jsonl") if r.get("kind") == "epoch"]
        doc: dict[str, Any] = {"environment": _environment(), "epochs": epochs}
        for ev in sorted(src.glob("eval_*.txt")):
            text = ev.read_text()
            start = text.rfind("{")
            if start >= 0:
                try:
                    doc[ev.stem] = json.loads(text[start:])
                except json.JSONDecodeError:
                    doc[ev.stem] = text[-2000:]
        _write(RESULTS / "digits" / f"{name}.json", doc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="collect_results", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=str(REPO / "runs"), help="the run folders (default runs/)")
    args = ap.parse_args(argv)
    runs = Path(args.runs)
    for name in STUDIES:
        collect_study(runs, name)
    draw_fig3()
    fig3_claims()
    for name in MONITORED:
        collect_monitored(runs, name)
    collect_digits(runs)
    from verdicts import main as verdicts_main  # tools/verdicts.py: results/verdicts.json

    return verdicts_main([])


if __name__ == "__main__":
    sys.exit(main())
