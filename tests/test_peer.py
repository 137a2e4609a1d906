"""benchmarks/vs_torchdeq.py: gradient agreement with TorchDEQ 0.1.0 (when installed), an end
to end run on a tiny setting, and a clean skip when TorchDEQ is absent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from conftest import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "vs_torchdeq.py"


def _load_script() -> ModuleType:
    return load_file(SCRIPT, "vs_torchdeq_under_test")


@pytest.mark.parametrize("tuple_state", [False, True], ids=["tensor", "tuple"])
def test_gradients_agree_with_torchdeq(tuple_state: bool) -> None:
    pytest.importorskip("torchdeq")
    mod = _load_script()
    rows = mod.agreement(
        mod._import_torchdeq(), tuple_state=tuple_state, k=5, lam=0.5, device=torch.device("cpu")
    )
    assert [r["ours"] for r in rows] == ["UPG(k=5, lam=0.5)", "IFT(Anderson)"]
    for r in rows:
        assert r["forward_rel_residual"]["ours"] < 1e-10
        assert r["cosine"] > 0.999
        assert r["rel_error"] < 1e-8, r


def test_upg_and_ift_differ_so_agreement_is_informative() -> None:
    """UPG(5, 0.5) is far from the exact gradient on the agreement problem, so matching
    TorchDEQ's grad=5/tau=0.5 to 1e-8 (test above) is a real check of the semantics of k, tau."""
    pytest.importorskip("torchdeq")
    mod = _load_script()
    get_deq = mod._import_torchdeq()
    cell = mod.SmallCell(4).double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = []
    for grad in ("upg", "ift"):
        deq = mod.make_ours(
            cell, solver="anderson", iters=100, grad=grad, k=5, lam=0.5, bwd_iters=100, tol=1e-12
        )
        cell.zero_grad()
        z, _ = deq(torch.zeros_like(x), x)
        z.sum().backward()
        grads.append(
            torch.cat([p.grad.reshape(-1) for p in cell.parameters() if p.grad is not None])
        )
    assert get_deq is not None
    assert (
        float((grads[0] - grads[1]).norm() / grads[1].norm()) > 1e-3
    )  # ~3e-2 here, vs 1e-8 agreement


@pytest.mark.slow
def test_peer_script_end_to_end_tiny(tmp_path: Path) -> None:
    pytest.importorskip("torchdeq")
    out = tmp_path / "vs.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert {(r["model"], r["solver"]) for r in payload["timing"]} == {
        (m, s) for m in ("conv", "mdeq_tiny") for s in ("fixed_point", "anderson", "broyden")
    }
    for r in payload["timing"]:
        for key in ("solve_ratio", "upg_step_ratio", "ift_step_ratio"):
            assert r[key] > 0
    assert all(a["cosine"] > 0.999 for a in payload["agreement"])
    assert "gradient agreement" in proc.stdout


@pytest.mark.slow
def test_peer_script_skips_cleanly_without_torchdeq(tmp_path: Path) -> None:
    out = tmp_path / "vs.json"
    code = (
        "import runpy, sys; sys.modules['torchdeq'] = None; "  # makes `import torchdeq` fail
        f"sys.argv = [{str(SCRIPT)!r}, '--quick', '--out', {str(out)!r}]; "
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped" in proc.stdout and "TorchDEQ is not importable" in proc.stdout
    assert not out.exists()
