"""Numbers the documents derive from committed measurements (ratios, shares), computed here from
the raw files so that each has a traceable source: writes ``results/derived_benchmarks.json``.

    python tools/derive_numbers.py          # rewrite results/derived_benchmarks.json

Every entry names its formula and the files it reads; ``make check-results`` checks the documents
against the output like against any other source.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "results"
OUT = REPO / "results" / "derived_benchmarks.json"


def _load(name: str) -> dict[str, Any]:
    return json.loads((BENCH / name).read_text())


def _record(doc: dict[str, Any], method: str) -> dict[str, Any]:
    for r in doc["records"]:
        if r["method"] == method:
            return r
    raise KeyError(f"no record {method!r}")


def _ours_over_torchdeq(name: str) -> dict[tuple[str, str], float]:
    """(cell, solver) -> our eager solve time / TorchDEQ's, from a solver_overhead.py file."""
    ms = {(r["cell"], r["solver"], r["mode"]): r["solve_ms"] for r in _load(name)["results"]}
    return {
        (cell, solver): v / ms[(cell, solver, "torchdeq")]
        for (cell, solver, mode), v in ms.items()
        if mode == "eager" and (cell, solver, "torchdeq") in ms
    }


def derive() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, value: float, formula: str, files: list[str]) -> None:
        out.append({"name": name, "value": value, "formula": formula, "files": files})

    h100 = _load("solver_overhead_h100.json")
    bare = h100["results"][0]["bare_ms"]
    add(
        "H100: one f evaluation (ms)",
        bare / h100["args"]["iters"],
        "bare_ms / iters",
        ["solver_overhead_h100.json"],
    )

    xo = _load("solver_overhead_cpu_xeon_2cores.json")
    broyden = next(r for r in xo["results"] if r["solver"] == "Broyden")
    add(
        "Xeon: Broyden's overhead beyond f per iteration (ms)",
        (broyden["ratio"] - 1.0) * broyden["bare_ms"] / xo["args"]["iters"],
        "(ratio - 1) * bare_ms / iters",
        ["solver_overhead_cpu_xeon_2cores.json"],
    )
    add(
        "Xeon: one f evaluation (ms)",
        broyden["bare_ms"] / xo["args"]["iters"],
        "bare_ms / iters",
        ["solver_overhead_cpu_xeon_2cores.json"],
    )

    prec = _load("precision_steps_digits_cpu.json")
    fp32 = next(r for r in prec["records"] if r["precision"] == "fp32")
    for r in prec["records"]:
        if r["precision"] != "fp32":
            add(
                f"dev CPU digits: {r['precision']} step / fp32 step",
                r["median_step_s"] / fp32["median_step_s"],
                "median_step_s / fp32 median_step_s",
                ["precision_steps_digits_cpu.json"],
            )

    target = _load("cost_tiny_target_cpu.json")
    ift, upg = _record(target, "ift_broyden"), _record(target, "upg_k5")
    add(
        "dev CPU target: IFT/UPG step, fastest repeats",
        min(ift["samples"]["step_ms"]) / min(upg["samples"]["step_ms"]),
        "min(IFT step_ms samples) / min(UPG step_ms samples)",
        ["cost_tiny_target_cpu.json"],
    )
    add(
        "dev CPU target: IFT/UPG step, medians",
        ift["step_ms"] / upg["step_ms"],
        "IFT step_ms / UPG step_ms",
        ["cost_tiny_target_cpu.json"],
    )
    add(
        "dev CPU target: UPG/IFT graph memory",
        upg["graph_mb"] / ift["graph_mb"],
        "UPG graph_mb / IFT graph_mb",
        ["cost_tiny_target_cpu.json"],
    )

    xeon = _load("cost_tiny_b64_cpu_xeon_2cores.json")
    xi, xu = _record(xeon, "ift_broyden"), _record(xeon, "upg_k5")
    add(
        "Xeon: forward-solve share of the IFT(Broyden) step (%)",
        100 * xi["solve_ms"] / xi["step_ms"],
        "100 * IFT solve_ms / IFT step_ms",
        ["cost_tiny_b64_cpu_xeon_2cores.json"],
    )
    add(
        "Xeon: UPG tracked-f time, forward - solve (ms)",
        xu["forward_ms"] - xu["solve_ms"],
        "UPG forward_ms - UPG solve_ms",
        ["cost_tiny_b64_cpu_xeon_2cores.json"],
    )
    add(
        "Xeon: IFT step / (UPG solve + tracked f), the ratio with a free UPG backward",
        xi["step_ms"] / xu["forward_ms"],
        "IFT step_ms / UPG forward_ms",
        ["cost_tiny_b64_cpu_xeon_2cores.json"],
    )

    for label, stem in (("MDEQ-Tiny", "tiny"), ("mdeq_cifar10m", "10m")):
        files = [f"cost_{stem}_{p}_h100.json" for p in ("fp32", "bf16")]
        solves = [
            r["solve_ms"]
            for f in files
            for r in _load(f)["records"]
            if r.get("solve_ms") is not None
        ]
        for fn, what in ((min, "min"), (max, "max")):
            add(
                f"H100 {label}, fp32 and bf16: 22-iteration forward solve, {what} over methods (ms)",
                fn(solves),
                f"{what}(solve_ms)",
                files,
            )
    runs = [
        "solver_overhead_cpu_2threads_run1.json",
        "solver_overhead_cpu_2threads_run3.json",
        "solver_overhead_cpu_2threads.json",
    ]
    for name in runs:
        ratios = _ours_over_torchdeq(name)
        for solver in ("FixedPoint", "Anderson", "Broyden"):
            add(
                f"dev CPU light cell, {name}: {solver} solve time ours / TorchDEQ",
                ratios[("light", solver)],
                "eager solve_ms / torchdeq solve_ms",
                [name],
            )
    main_run = _load(runs[-1])["results"]
    for cell in ("light", "mdeq"):
        eager = next(r for r in main_run if r["cell"] == cell and r["mode"] == "eager")
        comp = next(r for r in main_run if r["cell"] == cell and r["mode"] == "compile_cell")
        add(
            f"dev CPU {cell} cell: bare f loop, compiled cell faster than eager by (%)",
            100 * (1 - comp["bare_ms"] / eager["bare_ms"]),
            "100 * (1 - compile_cell bare_ms / eager bare_ms)",
            [runs[-1]],
        )
        add(
            f"dev CPU {cell} cell: one eager f evaluation (ms)",
            eager["bare_ms"] / _load(runs[-1])["args"]["iters"],
            "eager bare_ms / iters",
            [runs[-1]],
        )
    ada = _load("mnist_adaptive.json")["results"]
    fixed, auto = ada["upg_k5"], ada["upg_auto"]
    add(
        "MNIST adaptive k: UPG(auto) / UPG(5) step time",
        auto["per_epoch"][0]["step_time_s"] / fixed["per_epoch"][0]["step_time_s"],
        "upg_auto step_time_s / upg_k5 step_time_s",
        ["mnist_adaptive.json"],
    )
    add(
        "MNIST adaptive k: UPG(auto) step time over UPG(5) (%)",
        100 * (auto["per_epoch"][0]["step_time_s"] / fixed["per_epoch"][0]["step_time_s"] - 1),
        "100 * (upg_auto step_time_s / upg_k5 step_time_s - 1)",
        ["mnist_adaptive.json"],
    )
    warm = _load("mnist_warm_start.json")
    cold_e, warm_e = (warm["results"][v]["per_epoch"] for v in ("cold", "warm"))
    for c, w in zip(cold_e, warm_e):
        add(
            f"MNIST warm start, epoch {c['epoch']}: forward iterations warm vs cold (%)",
            100 * (w["fwd_nstep"] / c["fwd_nstep"] - 1),
            "100 * (warm fwd_nstep / cold fwd_nstep - 1)",
            ["mnist_warm_start.json"],
        )
    name = "mnist_warm_start_full.json"
    full = _load(name)
    cold_e, warm_e = (full["results"][v]["per_epoch"] for v in ("cold", "warm"))
    for c, w in zip(cold_e, warm_e):
        for key, what in (("fwd_nstep", "forward iterations"), ("step_time_s", "mean step time")):
            add(
                f"MNIST full split, warm start, epoch {c['epoch']}: {what} warm vs cold (%)",
                100 * (w[key] / c[key] - 1),
                f"100 * (warm {key} / cold {key} - 1)",
                [name],
            )
    add(
        "MNIST warm start: bf16 store for the full 60,000-image split (MiB)",
        60000 * 5880 * 2 / 2**20,
        "60000 samples * 5880 values * 2 bytes / 2^20",
        ["mnist_warm_start.json"],
    )
    for run in (1, 2, 3):
        name = f"solver_overhead_cpu_retain_run{run}.json"
        for (cell, solver), ratio in _ours_over_torchdeq(name).items():
            add(
                f"solver overhead, retained memory, run {run}: {cell} {solver} "
                "phantomdeq / TorchDEQ solve time",
                ratio,
                "eager solve_ms / torchdeq solve_ms",
                [name],
            )
    # appended last: the entries' positions above are bound in results/bindings.json
    for row in _load("adaptive_synthetic.json")["table"]:
        if row["method"] == "npg" and row["fixed_k"] > 1:  # k = 1: the rule never picks it
            add(
                f"synthetic adaptive k: NPG lam={row['lam']:g} target {row['target_cos_p10']:g}: "
                "auto mean VJPs vs the fixed k (%)",
                100 * (row["auto_mean_vjps"] / row["fixed_vjps"] - 1),
                "100 * (auto_mean_vjps / fixed_vjps - 1)",
                ["adaptive_synthetic.json"],
            )
    # (appended after the adaptive-k entries) the floors of the 2-thread runs above (quiet
    # machine) with the streams counted on the code (state_passes.py --baseline: this version
    # and the one before the residuals form)
    counted_name = "state_passes_broyden_residuals_1thread_cpu_clock.json"
    counted = {(r["cell"], r["solver"]): r["streams"] for r in _load(counted_name)["floors"]}
    per_solve = {
        (r["cell"], r["solver"]): r["streams_per_solve"] for r in _load(counted_name)["floors"]
    }
    add(
        "light Broyden: state streams per solve, fewer than before (%)",
        100 * (1 - per_solve[("light", "Broyden")] / per_solve[("light", "baseline Broyden")]),
        "100 * (1 - streams_per_solve / baseline streams_per_solve)",
        [counted_name],
    )
    for run in (1, 2, 3):
        name = f"state_passes_run{run}.json"
        doc = _load(name)
        f_ms = {r["cell"]: r["f_ms"] for r in doc["floors"]}
        for (cell, solver), streams in counted.items():
            add(
                f"traffic floor, 2 threads, run {run}, counted streams: {cell} {solver}",
                1.0 + streams * doc["ms_per_stream"] / f_ms[cell],
                "1 + counted streams per evaluation * ms_per_stream / f_ms",
                [name, counted_name],
            )
    return out


def main(argv: list[str] | None = None) -> int:
    if argv if argv is not None else sys.argv[1:]:
        print("usage: python tools/derive_numbers.py", file=sys.stderr)
        return 2
    doc: dict[str, Any] = {
        "about": "numbers derived from benchmarks/results/*.json by tools/derive_numbers.py",
        "entries": derive(),
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    entries: list[dict[str, Any]] = doc["entries"]
    for e in entries:
        print(f"{e['value']:12.4f}  {e['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
