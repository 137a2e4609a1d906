"""Question: is ``phantomdeq synthetic`` (paper Fig. 1 + Theorem 1) computed by the library as
fast as the hand-written version it replaced, and does it give the same numbers?

Runs the experiment with two versions of phantomdeq side by side, alternating, each in its own
process (``python -m phantomdeq synthetic`` with ``PYTHONPATH`` set to a ``src`` directory):
the baseline (another checkout's ``src``, e.g. ``git archive <rev> src | tar -x -C /tmp/base``)
and this checkout. The run time is the experiment's own ``seconds`` (summary.json: set-up of
the draws to the last record, without the interpreter start and the figures). Also compares
the two results.json: every record's keys and values (max relative difference per field).

    OMP_NUM_THREADS=1 python benchmarks/synthetic_ab.py --baseline /tmp/base/src \
        [--repeats 3] [--out benchmarks/results/synthetic_ab.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table, write_json  # noqa: E402

HERE = Path(__file__).resolve().parents[1] / "src"


def run_once(src: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "phantomdeq", "synthetic", "--out", str(out), "--no-progress"]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return {
        "seconds": json.loads((out / "summary.json").read_text())["seconds"],
        "records": json.loads((out / "results.json").read_text()),
    }


def compare(a: list[dict], b: list[dict]) -> dict[str, float]:
    """Max relative difference per numeric field; raises if keys, order or labels differ."""
    if [list(r) for r in a] != [list(r) for r in b]:
        raise SystemExit("results.json records differ in keys or order")
    worst: dict[str, float] = {}
    for ra, rb in zip(a, b):
        for key, va in ra.items():
            vb = rb[key]
            if isinstance(va, float) and isinstance(vb, float):
                rel = abs(va - vb) / max(abs(va), 1e-300)
                worst[key] = max(worst.get(key, 0.0), rel)
            elif va != vb:
                raise SystemExit(f"results.json: {key} differs: {va!r} vs {vb!r}")
    return worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, required=True, help="the baseline's src directory")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    times: dict[str, list[float]] = {"baseline": [], "this": []}
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name, src in (("baseline", args.baseline), ("this", HERE)):
                res = run_once(src.resolve(), Path(tmp) / f"{name}{i}")
                times[name].append(res["seconds"])
                results[name] = res["records"]
    worst = compare(results["baseline"], results["this"])
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [[k, f"{med[k]:.1f}", " ".join(f"{t:.1f}" for t in times[k])] for k in times]
    print_table(["version", "median s", "runs (s)"], rows)
    print(f"ratio this / baseline: {med['this'] / med['baseline']:.2f}")
    print("max relative difference per field: " + json.dumps(worst))
    if args.out is not None:
        payload = {
            "machine": machine(),
            "seconds": times,
            "median_s": med,
            "ratio": med["this"] / med["baseline"],
            "max_rel_diff": worst,
        }
        write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
