"""Collect the DEQ language-model study (tools/lm_study.sh) into results/lm_shakespeare/.

    python tools/lm_study.py [RUNS_DIR ...] [--no-eval]

For every run folder in the RUNS_DIRs (default runs/lm_study; the exploratory runs made after
the study's results were seen, e.g. runs/lm_explore, may be given too -- they are drawn and
tabulated, never part of a verdict): its last checkpoint evaluated on the
WHOLE validation split (``phantomdeq eval --checkpoint RUN/last.pt --set data.test_size=null``,
cached in results/lm_shakespeare/full_val.json), the evaluation curve (every 250 steps, 500
validation windows), CPU and wall seconds per step, tokens per CPU-second, forward iterations.
Writes results/lm_shakespeare/study.json, verdicts.json (the rule and claims of claims.yaml),
runs/<name>.jsonl (the epoch records and every 50th step record) and docs/lm_shakespeare.png;
prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from verdicts import holm, paired_test, seeds_needed, verdict  # noqa: E402

OUT = ROOT / "results" / "lm_shakespeare"
FIGURE = ROOT / "docs" / "lm_shakespeare.png"
GROUPS = {  # run-name prefix -> (label, colour)
    "deq_upg_jr": ("DEQ, UPG(5, 0.5) + Jacobian reg. (exploratory)", "tab:purple"),
    "deq_ift_jr": ("DEQ, IFT + Jacobian reg. (exploratory)", "tab:brown"),
    "deq_upg": ("DEQ, UPG(5, 0.5)", "tab:blue"),
    "deq_npg": ("DEQ, NPG(5, 0.5)", "tab:green"),
    "deq_ift": ("DEQ, IFT", "tab:red"),
    "explicit_ref": ("explicit 4 blocks, 2,000 steps", "tab:gray"),
    "explicit": ("explicit 4 blocks", "tab:orange"),
}


def group_of(name: str) -> str:
    for prefix in GROUPS:  # explicit_ref before explicit: dict order
        if name.startswith(prefix + "_s"):
            return prefix
    raise ValueError(f"run {name!r}: unknown group")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def full_validation(run: Path, cache: dict[str, Any], evaluate: bool) -> dict[str, Any] | None:
    key = run.name
    stamp = (run / "last.pt").stat().st_mtime_ns if (run / "last.pt").is_file() else None
    hit = cache.get(key)
    if hit is not None and hit.get("last_pt_mtime_ns") == stamp:
        return hit
    if not evaluate or stamp is None:
        return hit
    cmd = [
        sys.executable, "-m", "phantomdeq", "eval", "--checkpoint", str(run / "last.pt"),
        "--set", "data.test_size=null", "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        print(f"{key}: eval failed: {done.stderr.strip()}", file=sys.stderr)
        return hit
    report = json.loads(done.stdout)
    report.pop("meaning", None)
    report["last_pt_mtime_ns"] = stamp
    return report


def summarise(run: Path, full: dict[str, Any] | None) -> dict[str, Any]:
    rows = read_jsonl(run / "metrics.jsonl")
    steps = [r for r in rows if r["kind"] == "step"]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    last = epochs[-1] if epochs else {}
    n_steps = int(last.get("step", 0))
    tokens = n_steps * cfg["data"]["batch_size"] * cfg["data"]["context"]
    cpu, wall = float(last.get("train_cpu_s", math.nan)), float(last.get("train_time_s", math.nan))
    deq = [r["fwd_nstep"] for r in steps if isinstance(r.get("fwd_nstep"), int | float)]
    conv = [r["fwd_converged"] for r in steps if isinstance(r.get("fwd_converged"), int | float)]
    return {
        "group": group_of(run.name),
        "seed": cfg["train"]["seed"],
        "grad": cfg["grad"]["name"] if "deq" in run.name else None,
        "model": cfg["model"]["target"],
        "steps": n_steps,
        "epochs_done": len(epochs),
        "epochs_planned": cfg["train"]["epochs"],
        "finished": len(epochs) == cfg["train"]["epochs"],
        "train_cpu_s": cpu,
        "train_time_s": wall,
        "cpu_s_per_step": cpu / max(n_steps, 1),
        "wall_s_per_step": wall / max(n_steps, 1),
        "tokens_per_cpu_s": tokens / cpu if cpu > 0 else math.nan,
        "fwd_nstep_first_100": _mean(deq[:10]),
        "fwd_nstep_last_100": _mean(deq[-10:]),
        "fwd_converged_last_50_min": min(conv[-5:]) if conv else None,
        "fwd_converged_last_50_max": max(conv[-5:]) if conv else None,
        "val_loss_500_windows": [
            {
                "step": r["step"],
                "train_cpu_s": r.get("train_cpu_s"),
                "train_time_s": r.get("train_time_s"),
                "val_loss": r["test_loss"],
                "val_fwd_nstep": r.get("test_fwd_nstep"),
                "val_fwd_converged": r.get("test_fwd_converged"),
            }
            for r in epochs
            if "test_loss" in r
        ],
        "val_loss_full": None if full is None else full["test_loss"],
        "val_bpc_full": None if full is None else full["test_bpc"],
        "val_tokens_full": None if full is None else full["test_n"],
        "val_fwd_nstep_full": None if full is None else full.get("test_fwd_nstep"),
        "val_fwd_converged_full": None if full is None else full.get("test_fwd_converged"),
    }


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def decide(claims: dict[str, Any], runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The claims' verdicts by the rule of claims.yaml."""

    def value(group: str, seed: int) -> float | None:
        for r in runs.values():
            if r["group"] == group and r["seed"] == seed and r["finished"]:
                return r["val_loss_full"]
        return None

    out: list[dict[str, Any]] = []
    for c in claims["claims"]:
        diffs: list[float] = []
        for s in claims["seeds"]:
            a = value(c["a"], s)
            if a is None:
                continue
            if "b" in c:
                b = value(c["b"], s)
                if b is None:
                    continue
                diffs.append(a - b - float(c.get("margin", 0.0)))
            else:
                diffs.append(a - float(c["threshold"]))
        entry: dict[str, Any] = {"id": c["id"], "goal": c["goal"], "d": c["d"], "values": diffs}
        entry.update(paired_test(diffs) if len(diffs) >= 2 else {"n": len(diffs)})
        out.append(entry)
    testable = [e for e in out if e.get("n", 0) >= 2]
    rejected = holm([e["p"] for e in testable], claims["alpha"])
    m = max(len(testable), 1)
    for e, rej in zip(testable, rejected):
        spec = next(c for c in claims["claims"] if c["id"] == e["id"])
        direction = -1 if spec["direction"] == "less" else 1
        e["holm_rejected"] = rej
        e["verdict"] = verdict(e["mean"], rej, direction)
        if e.get("sd", 0) > 0:
            e["seeds_needed_for_observed_mean"] = seeds_needed(
                e["sd"], e["mean"], m, claims["alpha"], claims["power"]
            )
    for e in out:
        e.setdefault("verdict", f"no verdict (n = {e.get('n', 0)})")
    return {"alpha": claims["alpha"], "family_size": len(testable), "claims": out}


def _common_cpu(a: str, b: str) -> tuple[int, tuple[float, float]]:
    """The last step both runs recorded (every 50th step is kept) and each run's training CPU
    seconds up to it."""
    rec = {
        name: {
            r["step"]: r["train_cpu_s"]
            for r in read_jsonl(OUT / "runs" / f"{name}.jsonl")
            if r["kind"] == "step" and "train_cpu_s" in r
        }
        for name in (a, b)
    }
    common = max(set(rec[a]) & set(rec[b]))
    return common, (rec[a][common], rec[b][common])


def measurements(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def first(group: str) -> dict[str, Any] | None:
        return next((r for r in runs.values() if r["group"] == group and r["seed"] == 0), None)

    upg, ift, npg, ref = first("deq_upg"), first("deq_ift"), first("deq_npg"), first("explicit_ref")
    out: dict[str, Any] = {}

    def step_time(a: str, b: str, **extra: Any) -> dict[str, Any]:
        common, cpu = _common_cpu(a, b)
        return {
            "steps_compared": common,
            "upg_cpu_s_per_step": cpu[0] / common,
            "ift_cpu_s_per_step": cpu[1] / common,
            "ratio": cpu[0] / cpu[1],
            "n": 1,
            **extra,
        }

    if upg and ift:  # over the steps both trained (the IFT run stopped early)
        out["lm_upg_vs_ift_step_time"] = step_time("deq_upg_s0", "deq_ift_s0")
    if first("deq_upg_jr") and first("deq_ift_jr"):  # exploratory, both Jacobian-regularised
        out["lm_upg_vs_ift_step_time_jacobian_regularised"] = step_time(
            "deq_upg_jr_s0", "deq_ift_jr_s0", exploratory=True
        )
    if upg and npg and upg["val_loss_full"] is not None and npg["val_loss_full"] is not None:
        out["lm_npg_vs_upg_val_loss"] = {
            "npg": npg["val_loss_full"],
            "upg": upg["val_loss_full"],
            "difference": npg["val_loss_full"] - upg["val_loss_full"],
            "n": 1,
        }
    if ref and ref["val_loss_full"] is not None:
        out["lm_explicit_reference_2000_steps"] = {
            "val_loss": ref["val_loss_full"],
            "reported": 1.88,
            "difference": ref["val_loss_full"] - 1.88,
            "n": 1,
        }
    return out


def derived(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-seed gaps and ratios the text quotes (seeds 0, 1, 2)."""
    ref = runs.get("explicit_ref_s0")
    gaps_steps, gaps_time, step_ratio, deq_min, exp_min = [], [], [], [], []
    for s in (0, 1, 2):
        deq, exp = runs.get(f"deq_upg_s{s}"), runs.get(f"explicit_s{s}")
        if deq is None or exp is None or deq["val_loss_full"] is None:
            continue
        if ref is not None and ref["val_loss_full"] is not None:
            gaps_steps.append(deq["val_loss_full"] - ref["val_loss_full"])
        gaps_time.append(deq["val_loss_full"] - exp["val_loss_full"])
        step_ratio.append(deq["cpu_s_per_step"] / exp["cpu_s_per_step"])
        deq_min.append(deq["train_cpu_s"] / 60)
        exp_min.append(exp["train_cpu_s"] / 60)
    return {
        "deq_upg_minus_explicit_reference_2000_steps": gaps_steps,
        "deq_upg_minus_explicit_same_seed": gaps_time,
        "deq_upg_over_explicit_cpu_s_per_step": step_ratio,
        "deq_upg_cpu_minutes": deq_min,
        "explicit_cpu_minutes": exp_min,
    }


def parameter_counts(vocab_size: int = 65, context: int = 64) -> dict[str, int]:
    """Parameters of the two presets' models (Tiny Shakespeare has 65 characters)."""
    from phantomdeq.models.deq_lm import DEQTransformerLM
    from phantomdeq.models.transformer import TransformerLM

    def count(m: Any) -> int:
        return sum(p.numel() for p in m.parameters())

    deq = DEQTransformerLM(vocab_size, width=128, heads=4, context=context)
    exp = TransformerLM(vocab_size, layers=4, width=128, heads=4, context=context)
    return {
        "deq_total": count(deq),
        "deq_cell": count(deq.deq),
        "explicit_total": count(exp),
        "explicit_blocks": count(exp.blocks),
        "embedding_and_head": count(exp.embed) + count(exp.head),
    }


def draw(runs: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    seen: set[str] = set()
    for name in sorted(runs):
        r = runs[name]
        label, colour = GROUPS[r["group"]]
        pts = r["val_loss_500_windows"]
        lab = None if label in seen else label
        seen.add(label)
        style = "--" if r["group"] == "explicit_ref" else "-"
        axes[0].plot(
            [p["train_cpu_s"] / 60 for p in pts], [p["val_loss"] for p in pts],
            style, marker="o", ms=2.5, color=colour, label=lab, lw=1.1,
        )  # fmt: skip
        axes[1].plot(
            [p["step"] for p in pts], [p["val_loss"] for p in pts],
            style, marker="o", ms=2.5, color=colour, label=lab, lw=1.1,
        )  # fmt: skip
        its = [(p["step"], p["val_fwd_nstep"]) for p in pts if p.get("val_fwd_nstep") is not None]
        its = [(s, n) for s, n in its if isinstance(n, int | float) and math.isfinite(n)]
        if its:
            axes[2].plot(*zip(*its), marker="o", ms=2.5, color=colour, label=lab, lw=1.1)
    for ax in axes[:2]:
        ax.axhline(1.88, color="k", lw=0.6, ls=":")
        ax.set_ylim(1.4, 2.6)
        ax.set_ylabel("validation loss (500 windows, nats/char)")
    axes[0].set_xlabel("training CPU minutes (one thread)")
    axes[0].set_title("validation loss against training time")
    axes[1].set_xlabel("step (batch 12 x 64 characters)")
    axes[1].set_title("validation loss against step")
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("eval forward iterations (Anderson, tol 1e-4, max 40)")
    axes[2].set_title("DEQ: iterations to the fixed point")
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", type=Path, default=[ROOT / "runs" / "lm_study"])
    p.add_argument("--no-eval", action="store_true", help="use cached full-validation numbers only")
    p.add_argument("--jobs", type=int, default=2, help="evaluations run at a time")
    args = p.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    cache_path = OUT / "full_val.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    runs: dict[str, dict[str, Any]] = {}
    folders = [d for r in args.runs for d in sorted(r.iterdir()) if (d / "metrics.jsonl").is_file()]
    lock = threading.Lock()

    def evaluated(run: Path) -> dict[str, Any] | None:
        with lock:
            known = dict(cache)
        full = full_validation(run, known, not args.no_eval)
        with lock:  # keep what is done: a long evaluation pass may be cut short
            if full is not None:
                cache[run.name] = full
            cache_path.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
        return full

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        fulls = list(pool.map(evaluated, folders))
    for run, full in zip(folders, fulls):
        runs[run.name] = summarise(run, full)
        keep = [
            r
            for r in read_jsonl(run / "metrics.jsonl")
            if r["kind"] == "epoch" or (r["kind"] == "step" and r["step"] % 50 == 0)
        ]
        (OUT / "runs").mkdir(exist_ok=True)
        (OUT / "runs" / f"{run.name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
        (OUT / "runs" / f"{run.name}.config.yaml").write_text((run / "config.yaml").read_text())
    cache_path.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
    claims = yaml.safe_load((OUT / "claims.yaml").read_text())
    study = {
        "command": "bash tools/lm_study.sh runs/lm_study && python tools/lm_study.py runs/lm_study "
        "runs/lm_explore",
        "exploratory_command": "phantomdeq train --config configs/deq_lm_shakespeare.yaml --out "
        "runs/lm_explore/deq_{upg,ift}_jr_s0 --set train.seed=0 --set train.epochs=8 --set "
        "train.num_threads=1 --set data.test_size=500 --set grad.name={upg,ift} --set "
        "train.jac_reg_weight=2.0",
        "parameters": parameter_counts(),
        "runs": runs,
        "measurements": measurements(runs),
        "derived": derived(runs),
    }
    (OUT / "study.json").write_text(json.dumps(study, indent=1) + "\n")
    (OUT / "verdicts.json").write_text(json.dumps(decide(claims, runs), indent=1) + "\n")
    draw(runs, FIGURE)
    print(f"{'run':<18} {'steps':>6} {'cpu s':>7} {'cpu s/step':>10} {'tok/cpu-s':>9} "
          f"{'val(500)':>8} {'val(full)':>9} {'it first/last':>13}")  # fmt: skip
    for name, rec in runs.items():
        windows = rec["val_loss_500_windows"]
        last_val = windows[-1]["val_loss"] if windows else math.nan
        full_val = rec["val_loss_full"] if rec["val_loss_full"] is not None else math.nan
        print(
            f"{name:<18} {rec['steps']:>6} {rec['train_cpu_s']:>7.0f} "
            f"{rec['cpu_s_per_step']:>10.3f} {rec['tokens_per_cpu_s']:>9.0f} {last_val:>8.4f} "
            f"{full_val:>9.4f} {rec['fwd_nstep_first_100']:>6.1f}/{rec['fwd_nstep_last_100']:<6.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
