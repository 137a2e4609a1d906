"""The demo's first part: every estimator vs the dense exact gradient (itself a check), and
whole training steps timed against IFT with IFT's backward iterations beside them."""

from __future__ import annotations

import math

from phantomdeq.cli import main
from phantomdeq.experiments.demo import (
    STEP_ESTIMATORS,
    gradient_table,
    run_core_demo,
    speed_verdict,
    training_step_times,
)


def test_demo_gradient_table_agrees_with_the_mathematics():
    rows = {r["estimator"]: r for r in gradient_table()}
    for name in ("IFT (FixedPoint backward)", "IFT (Broyden backward)", "BPTT (60 iterations)"):
        assert rows[name]["rel_error"] < 1e-8, name
    assert rows["UPG k=10 lam=1"]["rel_error"] < 1e-3
    assert rows["UPG k=1 lam=1 (one-step)"]["rel_error"] == rows["OneStep"]["rel_error"]
    assert rows["UPG k=5 lam=0.5"]["cosine"] > rows["OneStep"]["cosine"]
    assert (
        abs(rows["UPG k=5 lam=0.5 ckpt"]["rel_error"] - rows["UPG k=5 lam=0.5"]["rel_error"])
        < 1e-12
    )


def test_cli_rejects_unknown_command(capsys):
    from phantomdeq.cli import COMMANDS

    assert main(["fly"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'fly'; allowed: " in err
    allowed = err.split("allowed: ")[1].strip().split(", ")
    assert allowed == list(COMMANDS) and {"train", "eval", "sample", "demo"} <= set(allowed)
    assert main([]) == 2


def test_demo_times_whole_training_steps_with_ift_backward_iterations():
    """Part 1's timing: whole training steps, IFT's backward iterations beside the times; the
    MDEQ-Tiny backward solve needs many iterations, the contractive cell's a few."""
    rows = {s: training_step_times(s, repeats=1) for s in ("mdeq_tiny", "contractive")}
    for setting, table in rows.items():
        assert [r["estimator"] for r in table] == list(STEP_ESTIMATORS), setting
        ift, *others = table
        assert isinstance(ift["ift_iters"], int) and ift["ift_iters"] >= 1
        assert ift["vs_ift"] == 1.0
        assert all(r["ift_iters"] is None for r in others)
        for r in table:
            assert math.isfinite(r["step_ms"]) and r["step_ms"] >= r["backward_ms"] > 0
    # the settings are what the demo says they are: many backward products vs a few
    assert rows["contractive"][0]["ift_converged"] and rows["contractive"][0]["ift_iters"] <= 5
    assert rows["mdeq_tiny"][0]["ift_iters"] >= 4 * rows["contractive"][0]["ift_iters"]


def test_speed_verdict_follows_the_table():
    def table(ratio):
        return [
            {"estimator": "IFT", "vs_ift": 1.0, "ift_iters": 3, "ift_converged": True},
            {"estimator": "UPG k=5 lam=0.5", "vs_ift": ratio, "ift_iters": None},
        ]

    slow = speed_verdict(table(1.3))
    assert "NOT faster" in slow and "1.30x" in slow and "3 iterations" in slow
    fast = speed_verdict(table(0.5))
    assert "NOT" not in fast and "faster" in fast and "0.50x" in fast


def test_core_demo_prints_no_disclaimer_against_its_table(capsys):
    run_core_demo(repeats=1)
    out = capsys.readouterr().out
    assert "IFT bwd it." in out and "speed claim" not in out.lower()
    assert out.count("faster") >= 2  # a verdict per setting
