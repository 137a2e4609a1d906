"""`phantomdeq cost` (paper Table 2): end to end on a tiny setting, the CPU peak-memory meter
against known allocations, and option validation. No timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import phantomdeq as pdq
from phantomdeq.experiments import cost, measure

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cost_quick_end_to_end_writes_every_method(tmp_path: Path) -> None:
    out = tmp_path / "cost"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "phantomdeq",
            "cost",
            "--model",
            "mdeq_tiny",
            "--quick",
            "--threads",
            "1",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((out / "cost.json").read_text())
    recs = {r["method"]: r for r in payload["records"]}
    expected = {m.name for m in cost.method_specs((1, 3, 5, 9))}
    assert set(recs) == expected
    # 5 IFT (FixedPoint, Anderson, Broyden, GMRES, BiCGStab) + 4 UPG + 4 UPG-ckpt + 4 NPG +
    # OneStep + BPTT + SHINE
    assert len(expected) == 20
    for r in recs.values():
        assert r["step_ms"] > 0 and r["backward_ms"] > 0 and r["solve_ms"] > 0
        assert r["peak_mb"] > 0 and r["memory_method"] == "profiler_cpu_allocator_events"
        assert r["batch"] == 2 and r["model"] == "mdeq_tiny"
    assert recs["ift_broyden"]["step_ratio"] == pytest.approx(1.0)
    # Table 2, measured: UPG keeps k steps of activations, its checkpointed variant only the
    # k step inputs, NPG none (its memory does not depend on k)
    assert recs["upg_k9"]["peak_mb"] > recs["upg_k5"]["peak_mb"] > recs["upg_k1"]["peak_mb"]
    assert recs["upg_k9"]["graph_mb"] > 3 * recs["upg_k1"]["graph_mb"]
    assert recs["upg_ckpt_k9"]["peak_mb"] < 0.5 * recs["upg_k9"]["peak_mb"]
    assert recs["npg_k9"]["graph_mb"] == pytest.approx(recs["npg_k1"]["graph_mb"], rel=0.05)
    png = (out / "cost.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "speed-up vs ift_broyden" in proc.stdout


def test_cpu_peak_memory_counts_live_tensor_bytes() -> None:
    mib = 2**20

    def fn() -> None:
        a = torch.empty(4 * mib, dtype=torch.uint8)
        a.fill_(1)
        del a
        with torch.profiler.record_function("phantomdeq.mark.after_free"):
            pass
        b = torch.empty(mib, dtype=torch.uint8)
        c = torch.empty(mib, dtype=torch.uint8)
        b.fill_(0)
        c.fill_(0)

    prof = measure.cpu_peak_memory(fn, marks=("after_free",))
    assert 4 * mib <= prof.peak_bytes < 4 * mib + 64 * 1024  # the 4 MiB block, not 4 + 2
    assert prof.at_marks["after_free"] < 64 * 1024  # the block was freed before the mark


def test_timed_solver_is_the_same_solver_with_marks() -> None:
    class Marks:
        def __init__(self) -> None:
            self.names: list[str] = []

        def mark(self, name: str) -> None:
            self.names.append(name)

    marks = Marks()
    base = pdq.FixedPoint(max_iter=40, tol=1e-10, damping=0.7)
    timed = measure.timed_solver(base, marks)
    # a wrapper conforming to the solver protocol (no generated subclass); it unrolls when the
    # wrapped solver does, so DEQ accepts it for BPTT too
    assert isinstance(timed, pdq.UnrollingSolver) and timed.solver is base
    assert not isinstance(measure.timed_solver(pdq.Anderson(), marks), pdq.UnrollingSolver)
    pdq.DEQ(torch.nn.Identity(), solver=timed, grad=pdq.BPTT())
    z0 = torch.zeros(3, 2, dtype=torch.float64)
    sol = timed(lambda z: 0.5 * torch.cos(z), z0)
    ref = base(lambda z: 0.5 * torch.cos(z), z0)
    assert marks.names == ["solve_start", "solve_end"]
    assert torch.equal(sol.z, ref.z)
    # the fixed point of z = cos(z)/2 is 0.4501836...
    assert torch.allclose(sol.z, torch.full_like(z0, 0.45018361129487355), atol=1e-8)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--solver", "newton"], "--solver"),
        (["--amp", "fp8"], "--amp"),
        (["--methods", "upg_k5,magic"], "allowed"),
        (["--ks", "0,2"], "--ks"),
        (["--batch", "0"], "--batch"),
    ],
)
def test_bad_options_exit_2_naming_the_option(tmp_path: Path, capsys, argv, needle) -> None:
    assert cost.main(["--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("phantomdeq cost: error: ")
    assert needle in err[0]


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"CostConfig[\s\S]*reference must be one of"):
        cost.CostConfig(reference="nope")
    with pytest.raises(ValueError, match=r"CostConfig\s+model\s+Value error, must be one of"):
        cost.CostConfig(model="resnet")


def test_execution_modes_are_validated() -> None:
    with pytest.raises(ValueError, match=r"'graph' \(CUDA graphs\) needs device='cuda'"):
        cost.CostConfig(modes=("eager", "graph"))
    with pytest.raises(ValueError, match=r"CostConfig[\s\S]*modes must be distinct entries of"):
        cost.CostConfig(modes=("eager", "fast"))
    with pytest.raises(ValueError, match=r"CostConfig[\s\S]*modes must be distinct entries of"):
        cost.CostConfig(modes=("eager", "eager"))
    assert cost.CostConfig(modes=("compile", "eager")).modes == ("compile", "eager")


def test_a_cross_field_refusal_is_one_readable_line(tmp_path: Path, capsys) -> None:
    """A check across fields (model validator) names the option without dumping every value."""
    assert cost.main(["--out", str(tmp_path), "--modes", "eager,graph"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == "phantomdeq cost: error: modes: 'graph' (CUDA graphs) needs device='cuda'"
