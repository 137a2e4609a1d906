"""Copy what the documents quote from ignored run folders (``runs/``) into small committed files
under ``results/``, and redraw the figures from those files.

    python tools/collect_results.py [--runs runs]

Reads (each part is skipped with a message when its run folder is missing):

* the ``phantomdeq ablate`` studies of EXPERIMENTS.md (:data:`STUDIES`: ``runs/table1_mnist``,
  ``runs/fig3_upg_mnist``, ``runs/fig3_npg_mnist``) -> ``results/<name>/ablation.json`` (rows,
  per-run results, paired differences by seed) and ``table.md``; then ``docs/fig3_mnist.png``
  drawn from the two Fig. 3 studies' files;
* the Fig. 2 runs (:data:`FIG2`: ``runs/fig2_mnist/<row>``, one ``phantomdeq train`` run per
  trained estimator with the gradient monitor on) -> ``results/fig2_mnist/<row>/monitor.jsonl``
  (the monitor records), ``config.yaml`` and ``result.json``; then
  ``results/fig2_mnist/summary.json`` and ``docs/fig2_mnist.png``, drawn from the committed
  files (so both are remade from ``results/`` alone);
* the other monitored runs (``train.monitor_compare``; :data:`MONITORED`:
  ``runs/shine_monitor_mnist``) -> ``results/<name>/monitor.jsonl``, ``config.yaml`` and
  ``result.json``, then ``docs/<name>.png`` drawn from them;
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
import statistics
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
    print(f"wrote {_shown(path)}")


def _shown(path: Path) -> Path:
    """``path`` relative to the repository when it is inside it."""
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


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

#: Fig. 2: one monitored run per trained estimator (the Table 1 preset
#: ``configs/ablation/mnist_<row>.yaml``, seed 0) -> its title in the figure. In each run the
#: monitor measures the gradient in use and the other phantom gradient(s) against the exact one.
FIG2 = {
    "ift": "IFT-trained (Anderson x10 backward)",
    "upg": "UPG A_{5,0.5}-trained",
    "npg": "NPG A_{5,0.5}-trained",
}
#: what each Fig. 2 run measures beside the gradient in use (``train.monitor_compare``)
FIG2_COMPARE = {
    "ift": "[{name: upg, k: 5, lam: 0.5}, {name: npg, k: 5, lam: 0.5}]",
    "upg": "[{name: npg, k: 5, lam: 0.5}]",
    "npg": "[{name: upg, k: 5, lam: 0.5}]",
}
#: an exact (monitor) backward solve that ended above this residual did not give the exact
#: gradient: its measurement is drawn as such and left out of the summary statistics
UNCONVERGED = 1e-3

#: other monitored training runs (``train.monitor_compare``): figure and title
MONITORED = {
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


def _collect_monitored_run(src: Path, dst: Path) -> bool:
    """Copy a monitored run's monitor records, config and per-epoch results from ``src`` (a run
    folder) to ``dst``; False (and a message) when the run is missing."""
    if not (src / "metrics.jsonl").is_file():
        print(f"skip: {src}/metrics.jsonl missing")
        return False
    recs = _records(src / "metrics.jsonl")
    monitor = [r for r in recs if r.get("kind") == "step" and "monitor_cos" in r]
    epochs = [r for r in recs if r.get("kind") == "epoch"]
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
    return True


def collect_monitored(runs: Path, name: str) -> None:
    dst = RESULTS / name
    if not _collect_monitored_run(runs / name, dst):
        return
    from phantomdeq.train.metrics import plot_monitor

    figure, title = MONITORED[name]
    plot_monitor(dst / "monitor.jsonl", REPO / "docs" / figure, title=title)
    print(f"wrote docs/{figure}")


def _used_label(config_path: Path) -> str:
    """The monitor label (``upg_k5_lam0.5``, ``ift``) of the estimator a run trained with."""
    import yaml

    from phantomdeq.train import config_from_dict
    from phantomdeq.train.config import monitor_label

    return monitor_label(config_from_dict(yaml.safe_load(config_path.read_text())).grad)


def _stats(vals: list[float]) -> dict[str, float]:
    return {
        "min": min(vals),
        "mean": statistics.fmean(vals),
        "median": statistics.median(vals),
        "max": max(vals),
    }


def _estimator_stats(records: list[dict[str, Any]], used: str) -> dict[str, Any]:
    """Per estimator (the gradient in use under its own label, then the compared ones): min /
    mean / median / max of its cosine to the exact gradient and of its norm ratio."""
    labels = sorted(
        {k[len("monitor_cos_") :] for r in records for k in r if k.startswith("monitor_cos_")}
    )
    keys = {used: ("monitor_cos", "monitor_norm_ratio")}
    keys.update({a: (f"monitor_cos_{a}", f"monitor_norm_ratio_{a}") for a in labels})
    out: dict[str, Any] = {}
    for label, (cos_key, ratio_key) in keys.items():
        cos = [float(r[cos_key]) for r in records if isinstance(r.get(cos_key), int | float)]
        ratio = [float(r[ratio_key]) for r in records if isinstance(r.get(ratio_key), int | float)]
        if cos:
            out[label] = {
                "in_use": label == used,
                "n": len(cos),
                "cos": _stats(cos),
                "norm_ratio": _stats(ratio) if ratio else None,
                "cos_below_0.9": sum(c < 0.9 for c in cos),
            }
    return out


def fig2_run_summary(records: list[dict[str, Any]], used: str) -> dict[str, Any]:
    """One Fig. 2 run's measurements: which steps, how many exact solves did not converge
    (residual above :data:`UNCONVERGED`), and per estimator the cosine and norm-ratio statistics
    over the measurements whose exact solve converged -- all of them, and those from the
    first step the IFT-trained run measures (after its pretraining) on."""
    res = [_num_or_nan(r.get("monitor_exact_residual")) for r in records]
    good = [r for r, v in zip(records, res) if v <= UNCONVERGED]
    bad = [r for r, v in zip(records, res) if not v <= UNCONVERGED]
    good_res = [v for v in res if v <= UNCONVERGED]
    fwd = [float(r["fwd_residual"]) for r in good if isinstance(r.get("fwd_residual"), int | float)]
    out: dict[str, Any] = {
        "in_use": used,
        "measurements": len(records),
        "first_step": min(int(r["step"]) for r in records),
        "last_step": max(int(r["step"]) for r in records),
        "exact_unconverged": len(bad),
        "exact_unconverged_steps": [int(r["step"]) for r in bad],
        "exact_unconverged_residual_max": max(
            (_num_or_nan(r.get("monitor_exact_residual")) for r in bad), default=None
        ),
        "converged": len(good),
        "first_converged_step": min((int(r["step"]) for r in good), default=None),
        "exact_residual_max": max(good_res, default=None),
        "fwd_residual": _stats(fwd) if fwd else None,
        "estimators": _estimator_stats(good, used),
        # every two estimators, the one in use included (under its own label)
        "pairs": _pairs([{f"monitor_cos_{used}": r.get("monitor_cos"), **r} for r in good]),
        "monitor_time_s": _stats([float(r["monitor_time_s"]) for r in records]),
        "step_time_s": _stats([float(r["step_time_s"]) for r in records]),
    }
    return out


def _num_or_nan(v: Any) -> float:
    return float(v) if isinstance(v, int | float) else float("nan")


def fig2_summary() -> dict[str, Any] | None:
    """``results/fig2_mnist/summary.json`` from the committed Fig. 2 runs
    (``results/fig2_mnist/<row>/``); None when none is committed."""
    runs: dict[str, Any] = {}
    for row in FIG2:
        src = RESULTS / "fig2_mnist" / row
        if not (src / "monitor.jsonl").is_file():
            continue
        records = _records(src / "monitor.jsonl")
        summary = fig2_run_summary(records, _used_label(src / "config.yaml"))
        epochs = json.loads((src / "result.json").read_text()).get("epochs", [])
        runs[row] = {
            "title": FIG2[row],
            "config": f"configs/ablation/mnist_{row}.yaml",
            "monitor_compare": FIG2_COMPARE[row],
            "test_acc": epochs[-1].get("test_acc") if epochs else None,
            "monitor_time_total_s": epochs[-1].get("monitor_time_s") if epochs else None,
            **summary,
        }
    if not runs:
        print("skip: no Fig. 2 run in results/fig2_mnist/")
        return None
    if "ift" in runs:  # the steps the IFT-trained run measures (after its pretraining)
        start_step = runs["ift"]["first_step"]
        for row, doc in runs.items():
            records = _records(RESULTS / "fig2_mnist" / row / "monitor.jsonl")
            late = fig2_run_summary(
                [r for r in records if int(r["step"]) >= start_step], doc["in_use"]
            )
            doc[f"from_step_{start_step}"] = {
                k: late[k]
                for k in (
                    "measurements",
                    "exact_unconverged",
                    "exact_residual_max",
                    "fwd_residual",
                    "estimators",
                    "pairs",
                )
            }
            # the measurements before it, one by one (the phantom-trained runs' first steps)
            doc[f"before_step_{start_step}"] = [
                {
                    "step": int(r["step"]),
                    "exact_residual": _num_or_nan(r.get("monitor_exact_residual")),
                    "fwd_residual": _num_or_nan(r.get("fwd_residual")),
                    f"cos_{doc['in_use']}": _num_or_nan(r.get("monitor_cos")),
                    **{
                        k[len("monitor_") :]: _num_or_nan(v)
                        for k, v in r.items()
                        if k.startswith("monitor_cos_")
                    },
                }
                for r in records
                if int(r["step"]) < start_step
            ]
    doc = {
        "about": (
            "Fig. 2 on MNIST: per trained estimator (seed 0), the cosine and norm ratio "
            "||g|| / ||g_exact|| of the gradient in use and of the compared phantom gradients "
            "against the exact implicit gradient (IFT, Broyden 60 iterations, tol 1e-6), every "
            "5 steps; statistics over the measurements whose exact backward solve converged "
            f"(residual <= {UNCONVERGED:g}); written by tools/collect_results.py from "
            "results/fig2_mnist/<row>/"
        ),
        "unconverged_residual": UNCONVERGED,
        "command": (
            "phantomdeq train --config configs/ablation/mnist_<row>.yaml --out "
            "runs/fig2_mnist/<row> --set data.root=/work/shared/data/mnist "
            "--set train.num_threads=1 --set train.monitor_every=5 "
            "--set 'train.monitor_compare=<monitor_compare>' (OMP_NUM_THREADS=1, one run at a time)"
        ),
        "runs": runs,
    }
    _write(RESULTS / "fig2_mnist" / "summary.json", doc)
    return doc


#: the seeds of the Fig. 2 runs beyond seed 0 (``runs/fig2_mnist_seeds/s<seed>/<row>`` ->
#: ``results/fig2_mnist/seeds/s<seed>/<row>/``; seed 0 is ``results/fig2_mnist/<row>/``)
FIG2_SEEDS = (1, 2)


def _fig2_dir(seed: int, row: str) -> Path:
    base = RESULTS / "fig2_mnist"
    return base / row if seed == 0 else base / "seeds" / f"s{seed}" / row


def collect_fig2_seeds(runs: Path) -> None:
    """The Fig. 2 runs at the seeds of :data:`FIG2_SEEDS` -> ``results/fig2_mnist/seeds/``."""
    for seed in FIG2_SEEDS:
        for row in FIG2:
            _collect_monitored_run(
                runs / "fig2_mnist_seeds" / f"s{seed}" / row, _fig2_dir(seed, row)
            )


def fig2_seeds_summary() -> dict[str, Any] | None:
    """``results/fig2_mnist/seeds.json``: for every seed whose three Fig. 2 runs are committed,
    per run the cosine statistics of each measured gradient from the first step the IFT-trained
    run of that seed measures (after its pretraining) on, over the measurements whose exact
    solve converged, how often NPG was closer to the exact gradient than UPG, and the test
    accuracy; over the seeds, the same pooled. None when no seed is complete."""
    seeds: dict[str, Any] = {}
    for seed in (0, *FIG2_SEEDS):
        dirs = {row: _fig2_dir(seed, row) for row in FIG2}
        if not all((d / "monitor.jsonl").is_file() for d in dirs.values()):
            continue
        start = min(int(r["step"]) for r in _records(dirs["ift"] / "monitor.jsonl"))
        runs: dict[str, Any] = {}
        for row, d in dirs.items():
            used = _used_label(d / "config.yaml")
            records = [r for r in _records(d / "monitor.jsonl") if int(r["step"]) >= start]
            summary = fig2_run_summary(records, used)
            epochs = json.loads((d / "result.json").read_text()).get("epochs", [])
            pair = summary["pairs"].get("npg_k5_lam0.5_minus_upg_k5_lam0.5")
            runs[row] = {
                "in_use": used,
                "test_acc": epochs[-1].get("test_acc") if epochs else None,
                "measurements": summary["measurements"],
                "exact_unconverged": summary["exact_unconverged"],
                "exact_residual_max": summary["exact_residual_max"],
                "fwd_residual": summary["fwd_residual"],
                "estimators": {
                    label: {
                        "in_use": est["in_use"],
                        "n": est["n"],
                        "cos_min": est["cos"]["min"],
                        "cos_mean": est["cos"]["mean"],
                        "norm_ratio_mean": (est["norm_ratio"] or {}).get("mean"),
                        "cos_below_0.9": est["cos_below_0.9"],
                    }
                    for label, est in summary["estimators"].items()
                },
                "npg_closer_than_upg": None if pair is None else pair["a_ahead"],
                "npg_upg_compared": None if pair is None else pair["n"],
            }
        seeds[str(seed)] = {"from_step": start, "runs": runs}
    if not seeds:
        print("skip: no seed with all three Fig. 2 runs committed")
        return None
    pooled: dict[str, Any] = {}
    for row in FIG2:
        rows = [seeds[s]["runs"][row] for s in seeds]
        labels = sorted({label for r in rows for label in r["estimators"]})
        pooled[row] = {
            "seeds": len(rows),
            "test_acc_mean": statistics.fmean(r["test_acc"] for r in rows),
            "cos_mean_over_seeds": {
                label: statistics.fmean(
                    r["estimators"][label]["cos_mean"] for r in rows if label in r["estimators"]
                )
                for label in labels
            },
            "cos_min_over_seeds": {
                label: min(
                    r["estimators"][label]["cos_min"] for r in rows if label in r["estimators"]
                )
                for label in labels
            },
            "npg_closer_than_upg": sum(r["npg_closer_than_upg"] or 0 for r in rows),
            "npg_upg_compared": sum(r["npg_upg_compared"] or 0 for r in rows),
        }
    doc = {
        "about": (
            "Fig. 2 on MNIST over seeds: per seed and trained estimator, the cosine to the exact "
            "implicit gradient (IFT, Broyden 60 iterations, tol 1e-6) of the gradient in use and "
            "of the compared phantom gradients, from the first step the seed's IFT-trained run "
            f"measures on, over the measurements whose exact solve converged (residual <= "
            f"{UNCONVERGED:g}); written by tools/collect_results.py from results/fig2_mnist/"
            "<row>/ (seed 0) and results/fig2_mnist/seeds/s<seed>/<row>/"
        ),
        "command": (
            "the seed-0 command of results/fig2_mnist/summary.json with --set train.seed=<seed> "
            "--out runs/fig2_mnist_seeds/s<seed>/<row> (two runs at a time, one thread each)"
        ),
        "seeds": seeds,
        "pooled": pooled,
    }
    _write(RESULTS / "fig2_mnist" / "seeds.json", doc)
    return doc


#: colour of each estimator in the Fig. 2 figure (monitor label -> matplotlib colour)
FIG2_COLORS = {"ift": "C0", "upg_k5_lam0.5": "C3", "npg_k5_lam0.5": "C2"}
FIG2_NAMES = {"ift": "IFT", "upg_k5_lam0.5": "UPG A_{5,0.5}", "npg_k5_lam0.5": "NPG A_{5,0.5}"}


def draw_fig2(out: Path | None = None) -> Path | None:
    """``docs/fig2_mnist.png`` from the committed Fig. 2 runs: one column per trained estimator,
    the cosine to the exact gradient (top) and the norm ratio (bottom) of the gradient in use
    (filled circles, thick) and of the compared phantom gradients (squares); measurements whose
    exact backward solve did not converge are crossed out (there the reference is not exact),
    and a run's unrolled pretraining steps (not measured) are shaded.
    Returns the path, or None when no run is committed or matplotlib is missing."""
    import yaml

    out = REPO / "docs" / "fig2_mnist.png" if out is None else out
    panels = []
    for row, title in FIG2.items():
        src = RESULTS / "fig2_mnist" / row
        if (src / "monitor.jsonl").is_file():
            config = yaml.safe_load((src / "config.yaml").read_text())
            pretrain = int(config.get("train", {}).get("pretrain_steps", 0) or 0)
            used = _used_label(src / "config.yaml")
            panels.append((title, used, pretrain, _records(src / "monitor.jsonl")))
    if not panels:
        return None
    try:
        from phantomdeq._plot import saved_figure

        with saved_figure(
            out,
            2,
            len(panels),
            figsize=(4.2 * len(panels), 6.4),
            sharex="all",
            sharey="row",
            squeeze=False,
        ) as (fig, axes):
            for col, (title, used, pretrain, records) in enumerate(panels):
                _draw_fig2_column(axes[0][col], axes[1][col], title, used, pretrain, records)
            fig.suptitle(
                "Fig. 2 on MNIST (MDEQ-Tiny at 14x14, 125 steps, seed 0): "
                "gradients vs the exact implicit gradient",
                fontsize=10,
            )
    except ImportError:  # matplotlib is optional (the `plots` extra)
        return None
    print(f"wrote {_shown(out)}")
    return out


def _draw_fig2_column(
    ax: Any, ax2: Any, title: str, used: str, pretrain: int, records: list[dict[str, Any]]
) -> None:
    steps = [int(r["step"]) for r in records]
    bad = [
        i
        for i, r in enumerate(records)
        if not _num_or_nan(r.get("monitor_exact_residual")) <= UNCONVERGED
    ]
    labels = sorted(
        {k[len("monitor_cos_") :] for r in records for k in r if k.startswith("monitor_cos_")}
    )
    series = [(used, "monitor_cos", "monitor_norm_ratio", True)] + [
        (a, f"monitor_cos_{a}", f"monitor_norm_ratio_{a}", False) for a in labels
    ]
    for label, cos_key, ratio_key, in_use in series:
        cos = [_num_or_nan(r.get(cos_key)) for r in records]
        ratio = [_num_or_nan(r.get(ratio_key)) for r in records]
        name = FIG2_NAMES.get(label, label) + (" (in use)" if in_use else "")
        style: dict[str, Any] = (
            {"marker": "o", "lw": 2.2, "ms": 5, "zorder": 3}
            if in_use
            else {"marker": "s", "lw": 1.0, "ms": 3, "zorder": 4}
        )
        color = FIG2_COLORS.get(label)
        ax.plot(steps, cos, color=color, label=name, **style)
        ax2.semilogy(steps, ratio, color=color, label=name, **style)
        if bad:
            ax.plot([steps[i] for i in bad], [cos[i] for i in bad], "kx", ms=8, zorder=5)
    if bad:
        ax.plot([], [], "kx", ms=8, label=f"exact solve not converged (res. > {UNCONVERGED:g})")
    for a in (ax, ax2):
        if pretrain:
            a.axvspan(0, pretrain, color="0.85", zorder=0)
        a.axhline(1.0, color="k", lw=0.6)
        a.set_xlabel("training step")
        a.grid(alpha=0.3)
    if pretrain:
        ax.text(
            pretrain / 2,
            0.5,
            "unrolled\npretraining\n(not measured)",
            ha="center",
            va="center",
            fontsize=7,
            color="0.3",
        )
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("cosine to the exact gradient")
    ax.legend(loc="lower right", fontsize=7)
    ax2.set_ylabel("||g|| / ||g_exact||")
    ax2.legend(loc="lower right", fontsize=7)


def collect_fig2(runs: Path) -> None:
    """The Fig. 2 runs (``runs/fig2_mnist/<row>``) -> ``results/fig2_mnist/<row>/``, and the
    check that the monitor changes no update (``runs/fig2_mnist/upg_unmonitored``, the UPG run
    without the monitor) -> ``results/fig2_mnist/unmonitored_check.json``."""
    for row in FIG2:
        _collect_monitored_run(runs / "fig2_mnist" / row, RESULTS / "fig2_mnist" / row)
    doc = monitor_transparency(
        runs / "fig2_mnist" / "upg" / "metrics.jsonl",
        runs / "fig2_mnist" / "upg_unmonitored" / "metrics.jsonl",
    )
    if doc is not None:
        doc["command"] = (
            "phantomdeq train --config configs/ablation/mnist_upg.yaml --out "
            "runs/fig2_mnist/upg_unmonitored --set data.root=/work/shared/data/mnist "
            "--set train.num_threads=1 (the UPG Fig. 2 run without train.monitor_*)"
        )
        _write(RESULTS / "fig2_mnist" / "unmonitored_check.json", doc)


def monitor_transparency(monitored: Path, unmonitored: Path) -> dict[str, Any] | None:
    """Step by step, a monitored run's training loss against the same run without the monitor
    (the monitor must change no update), and both runs' final test accuracy; None when either
    metrics file is missing."""
    if not (monitored.is_file() and unmonitored.is_file()):
        print(f"skip: {monitored} or {unmonitored} missing")
        return None
    a, b = _records(monitored), _records(unmonitored)
    sa = {int(r["step"]): r for r in a if r.get("kind") == "step"}
    sb = {int(r["step"]): r for r in b if r.get("kind") == "step"}
    common = sorted(set(sa) & set(sb))
    diffs = [abs(float(sa[s]["train_loss"]) - float(sb[s]["train_loss"])) for s in common]
    ends = [[r for r in recs if r.get("kind") == "epoch"] for recs in (a, b)]
    return {
        "steps_monitored": len(sa),
        "steps_unmonitored": len(sb),
        "steps_compared": len(common),
        "steps_identical_train_loss": sum(d == 0.0 for d in diffs),
        "max_abs_train_loss_diff": max(diffs, default=None),
        "test_acc_monitored": ends[0][-1].get("test_acc") if ends[0] else None,
        "test_acc_unmonitored": ends[1][-1].get("test_acc") if ends[1] else None,
    }


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
    collect_fig2(runs)
    fig2_summary()
    draw_fig2()
    collect_fig2_seeds(runs)
    fig2_seeds_summary()
    for name in MONITORED:
        collect_monitored(runs, name)
    collect_digits(runs)
    from verdicts import main as verdicts_main  # tools/verdicts.py: results/verdicts.json

    return verdicts_main([])


if __name__ == "__main__":
    sys.exit(main())
