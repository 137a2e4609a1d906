"""tools/collect_results.py, Fig. 2 part: the per-run summary of the gradient monitor's records
(which measurements count, the statistics of each estimator, the gradient in use under its own
label) and the figure drawn from committed run folders."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path
from types import ModuleType

import pytest

from conftest import load_file

REPO = Path(__file__).resolve().parents[1]


def _collector() -> ModuleType:
    return load_file(REPO / "tools/collect_results.py", "collect_results")


cr = _collector()


def _record(step: int, cos: float, ratio: float, npg: float, residual: float) -> dict[str, float]:
    return {
        "kind": "step",
        "step": step,
        "fwd_residual": 0.01 * step,
        "step_time_s": 1.0,
        "monitor_cos": cos,
        "monitor_norm_ratio": ratio,
        "monitor_time_s": 2.0,
        "monitor_exact_residual": residual,
        "monitor_cos_npg_k5_lam0.5": npg,
        "monitor_norm_ratio_npg_k5_lam0.5": ratio / 2,
    }


RECORDS = [
    _record(1, -0.2, 0.01, 0.1, 0.4),  # exact solve not converged: left out
    _record(6, 0.5, 0.5, 0.6, 1e-4),
    _record(11, 0.9, 0.8, 0.7, 1e-7),
    _record(16, 0.95, 1.2, 0.97, float("nan")),  # no residual logged: left out
]


def test_run_summary_counts_only_converged_exact_solves() -> None:
    s = cr.fig2_run_summary(RECORDS, "upg_k5_lam0.5")
    assert s["measurements"] == 4
    assert (s["first_step"], s["last_step"]) == (1, 16)
    assert s["exact_unconverged"] == 2
    assert s["exact_unconverged_steps"] == [1, 16]
    assert s["converged"] == 2 and s["first_converged_step"] == 6
    assert s["exact_residual_max"] == pytest.approx(1e-4)
    used = s["estimators"]["upg_k5_lam0.5"]
    assert used["in_use"] and used["n"] == 2
    assert used["cos"]["min"] == pytest.approx(0.5)
    assert used["cos"]["max"] == pytest.approx(0.9)
    assert used["cos"]["mean"] == pytest.approx(0.7)
    assert used["norm_ratio"]["mean"] == pytest.approx(0.65)
    assert used["cos_below_0.9"] == 1
    npg = s["estimators"]["npg_k5_lam0.5"]
    assert not npg["in_use"]
    assert npg["cos"]["mean"] == pytest.approx(statistics.fmean([0.6, 0.7]))
    assert npg["norm_ratio"]["max"] == pytest.approx(0.4)
    assert s["fwd_residual"]["min"] == pytest.approx(0.06)
    assert s["fwd_residual"]["max"] == pytest.approx(0.11)
    # the gradient in use against the compared one, over the same two measurements
    pair = s["pairs"]["npg_k5_lam0.5_minus_upg_k5_lam0.5"]
    assert pair["n"] == 2
    assert pair["abs_max"] == pytest.approx(0.2)
    assert pair["a_ahead"] == 1


def test_pairs_compare_the_compared_estimators() -> None:
    recs = [
        {**r, "monitor_cos_upg_k5_lam0.5": r["monitor_cos_npg_k5_lam0.5"] + d}
        for r, d in zip(RECORDS, (0.0, 0.01, -0.03, 0.0))
    ]
    s = cr.fig2_run_summary(recs, "ift")
    assert set(s["pairs"]) == {
        "ift_minus_npg_k5_lam0.5",
        "ift_minus_upg_k5_lam0.5",
        "npg_k5_lam0.5_minus_upg_k5_lam0.5",
    }
    pair = s["pairs"]["npg_k5_lam0.5_minus_upg_k5_lam0.5"]
    assert pair["n"] == 2
    assert pair["abs_max"] == pytest.approx(0.03)
    assert pair["a_ahead"] == 1


def test_summary_and_figure_from_committed_run_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("matplotlib")
    pytest.importorskip("yaml")
    monkeypatch.setattr(cr, "RESULTS", tmp_path / "results")
    for row, shift in (("ift", 5), ("upg", 0)):  # the IFT run measures from step 6 on
        dst = tmp_path / "results" / "fig2_mnist" / row
        dst.mkdir(parents=True)
        shutil.copyfile(REPO / f"configs/ablation/mnist_{row}.yaml", dst / "config.yaml")
        recs = [{**r, "step": r["step"] + shift} for r in RECORDS]
        (dst / "monitor.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        (dst / "result.json").write_text(json.dumps({"epochs": [{"test_acc": 0.9}]}))
    doc = cr.fig2_summary()
    assert doc is not None
    assert set(doc["runs"]) == {"ift", "upg"}
    assert doc["runs"]["ift"]["in_use"] == "ift"
    assert doc["runs"]["upg"]["in_use"] == "upg_k5_lam0.5"
    assert doc["runs"]["upg"]["test_acc"] == 0.9
    # the UPG run restricted to the steps the IFT run measures (from its first step on), and
    # its earlier measurements one by one
    late = doc["runs"]["upg"]["from_step_6"]
    assert late["measurements"] == 3 and late["exact_unconverged"] == 1
    assert late["estimators"]["upg_k5_lam0.5"]["cos"]["min"] == pytest.approx(0.5)
    (early,) = doc["runs"]["upg"]["before_step_6"]
    assert early["step"] == 1 and early["exact_residual"] == pytest.approx(0.4)
    assert early["cos_upg_k5_lam0.5"] == pytest.approx(-0.2)
    assert early["cos_npg_k5_lam0.5"] == pytest.approx(0.1)
    assert doc["runs"]["ift"]["before_step_6"] == []
    written = json.loads((tmp_path / "results/fig2_mnist/summary.json").read_text())
    assert written["runs"]["upg"]["estimators"] == doc["runs"]["upg"]["estimators"]
    out = cr.draw_fig2(tmp_path / "fig2.png")
    assert out is not None and out.stat().st_size > 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_committed_run_gives_no_summary_and_no_figure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cr, "RESULTS", tmp_path / "results")
    assert cr.fig2_summary() is None
    assert cr.draw_fig2(tmp_path / "fig2.png") is None
    assert not (tmp_path / "fig2.png").exists()


def test_monitor_transparency_compares_the_runs_step_by_step(tmp_path: Path) -> None:
    def write(path: Path, losses: list[float], acc: float) -> Path:
        recs = [{"kind": "step", "step": i + 1, "train_loss": v} for i, v in enumerate(losses)]
        recs.append({"kind": "epoch", "test_acc": acc})
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
        return path

    a = write(tmp_path / "a.jsonl", [2.0, 1.5, 1.25], 0.9)
    same = write(tmp_path / "b.jsonl", [2.0, 1.5, 1.25], 0.9)
    off = write(tmp_path / "c.jsonl", [2.0, 1.5, 1.0], 0.8)
    doc = cr.monitor_transparency(a, same)
    assert doc is not None
    assert doc["steps_compared"] == doc["steps_identical_train_loss"] == 3
    assert doc["max_abs_train_loss_diff"] == 0.0
    doc = cr.monitor_transparency(a, off)
    assert doc is not None
    assert doc["steps_identical_train_loss"] == 2
    assert doc["max_abs_train_loss_diff"] == pytest.approx(0.25)
    assert (doc["test_acc_monitored"], doc["test_acc_unmonitored"]) == (0.9, 0.8)
    assert cr.monitor_transparency(a, tmp_path / "missing.jsonl") is None


def test_seeds_summary_pools_complete_seeds_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("yaml")
    monkeypatch.setattr(cr, "RESULTS", tmp_path / "results")
    assert cr.fig2_seeds_summary() is None

    def commit(seed: int, row: str, shift: float) -> None:
        dst = cr._fig2_dir(seed, row)
        dst.mkdir(parents=True)
        shutil.copyfile(REPO / f"configs/ablation/mnist_{row}.yaml", dst / "config.yaml")
        first = 6 if row == "ift" else 1  # the IFT run measures from step 6 on
        recs = [
            {**r, "monitor_cos": r["monitor_cos"] + shift} for r in RECORDS if r["step"] >= first
        ]
        if row == "ift":  # the IFT run compares both phantom gradients
            recs = [{**r, "monitor_cos_upg_k5_lam0.5": 0.65} for r in recs]
        (dst / "monitor.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        (dst / "result.json").write_text(json.dumps({"epochs": [{"test_acc": 0.8 + shift}]}))

    for row in ("ift", "upg", "npg"):
        commit(0, row, 0.0)
        commit(1, row, 0.02)
    commit(2, "ift", 0.0)  # seed 2 incomplete: left out
    doc = cr.fig2_seeds_summary()
    assert doc is not None and set(doc["seeds"]) == {"0", "1"}
    s0 = doc["seeds"]["0"]
    assert s0["from_step"] == 6
    upg = s0["runs"]["upg"]
    # from step 6 on, converged exact solves only: steps 6 and 11 (16 has no residual)
    assert upg["measurements"] == 3 and upg["exact_unconverged"] == 1
    assert upg["estimators"]["upg_k5_lam0.5"]["cos_min"] == pytest.approx(0.5)
    assert upg["estimators"]["upg_k5_lam0.5"]["cos_mean"] == pytest.approx(0.7)
    # NPG (0.6, 0.7) against UPG in use (0.5, 0.9): closer once of two
    assert (upg["npg_closer_than_upg"], upg["npg_upg_compared"]) == (1, 2)
    pooled = doc["pooled"]["upg"]
    assert pooled["seeds"] == 2
    assert pooled["test_acc_mean"] == pytest.approx(0.81)
    assert pooled["cos_mean_over_seeds"]["upg_k5_lam0.5"] == pytest.approx(
        statistics.fmean([0.7, 0.72])
    )
    assert pooled["npg_closer_than_upg"] == 1 + 1 and pooled["npg_upg_compared"] == 4
    # the IFT run: NPG (0.6, 0.7) against the compared UPG (0.65): closer once per seed
    ift = doc["pooled"]["ift"]
    assert (ift["npg_closer_than_upg"], ift["npg_upg_compared"]) == (2, 4)
