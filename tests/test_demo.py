"""The demo's first part (every estimator vs the dense exact gradient) is itself a check."""

from __future__ import annotations

from phantomdeq.cli import main
from phantomdeq.experiments.demo import gradient_table


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
    assert main(["fly"]) == 2
    assert (
        "unknown command 'fly'; allowed: demo, synthetic, train, eval, cost, ablate"
        in capsys.readouterr().err
    )
    assert main([]) == 2
