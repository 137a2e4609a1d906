"""benchmarks/time_to_accuracy.py: every method of a seed starts from the same weights, data
order and dropout masks (bit for bit), the ratios and their bounds, the JSON of a tiny end to end
run, and a clean skip when TorchDEQ is absent."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from conftest import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "time_to_accuracy.py"
DIGITS = ["--set", "data.name=digits", "--set", "data.root=null"]


def _load_script() -> ModuleType:
    return load_file(SCRIPT, "time_to_accuracy_under_test")


def _record(method: str, seed: int, t: float | None, steps: int = 400) -> dict[str, Any]:
    return {
        "method": method,
        "seed": seed,
        "reached": t is not None,
        "train_s_to_target": t,
        "cpu_s_to_target": None if t is None else 2 * t,
        "steps_to_target": None if t is None else steps,
        "side_by_side": {
            "steps": 100,
            "step_time_median_s": 0.4,
            "cpu_per_step_s": 0.3 if method.startswith("pdq") else 0.5,
        },
    }


def test_summary_ratios_use_torchdeqs_faster_method_and_bound_the_unreached() -> None:
    mod = _load_script()
    cap = 1200.0
    records = [
        _record("pdq_upg", 0, 300.0),
        _record("pdq_ift", 0, None),
        _record("td_upg", 0, 600.0),
        _record("td_ift", 0, 500.0),
        _record("pdq_upg", 1, 400.0),
        _record("pdq_ift", 1, 900.0),
        _record("td_upg", 1, None),
        _record("td_ift", 1, None),
    ]
    s = mod.summarise(records, cap)
    seed0, seed1 = s["per_seed"]
    assert seed0["torchdeq_best"] == "td_ift"  # 500 s beats 600 s
    assert seed0["pdq_upg_time_ratio"] == {"value": pytest.approx(0.6), "bound": "="}
    assert seed0["pdq_upg_cpu_ratio"] == {"value": pytest.approx(0.6), "bound": "="}
    # not reached: at least the cap, so the ratio is a lower bound
    assert seed0["pdq_ift_time_ratio"] == {"value": pytest.approx(cap / 500.0), "bound": ">"}
    # TorchDEQ reached nothing in seed 1: phantomdeq's ratios are upper bounds
    assert seed1["pdq_upg_time_ratio"] == {"value": pytest.approx(400.0 / cap), "bound": "<"}
    assert seed1["pdq_upg_steps_ratio"]["value"] is None
    # over the seeds: only methods that reached the target in every seed have a mean
    over = s["over_seeds"]
    assert set(over["mean_to_target"]) == {"pdq_upg"}
    assert "torchdeq_best" not in over
    assert over["step_time_median_ratio"] == {
        "pdq_upg_over_td_upg": pytest.approx(1.0),
        "pdq_ift_over_td_ift": pytest.approx(1.0),
    }
    assert over["cpu_per_step_ratio"] == {
        "pdq_upg_over_td_upg": pytest.approx(0.6),
        "pdq_ift_over_td_ift": pytest.approx(0.6),
    }
    assert mod._fmt_ratio(seed1["pdq_upg_time_ratio"]) == "<0.33"
    assert mod._fmt_ratio(seed0["pdq_upg_time_ratio"]) == "0.60"


def test_every_method_starts_from_the_same_weights_order_and_masks() -> None:
    """The four models of a seed: equal state_dict (keys and bytes), equal first-epoch order,
    and the same loss bit for bit on the first batch through the cell (no DEQ layer) with the
    first step's dropout masks; another seed changes all three."""
    pytest.importorskip("torchdeq", reason="TorchDEQ 0.1.0 (the peer extra) is not installed")
    import torch

    mod = _load_script()
    args = argparse.Namespace(
        config=str(mod.BASE_CONFIG), sets=DIGITS[1::2], train_size=64, test_size=32
    )
    cfg = mod._config(args)
    train_ds, _, info = mod.load_data(cfg)
    data = mod.Batches(train_ds)
    get_deq = mod._import_torchdeq()
    fingerprints = {}
    for seed, methods in ((0, tuple(mod.METHODS)), (1, ("pdq_upg",))):
        mod.seed_everything(seed)
        state = {k: v.clone() for k, v in mod.build_model(cfg, info=info).state_dict().items()}
        runs = []
        for method in methods:
            model = mod.build_method(method, cfg, info, state, get_deq)
            assert list(model.state_dict()) == list(state)
            run = mod.Run(method, model, cfg, seed=seed, schedule_steps=10, n_train=len(train_ds))
            before = {k: v.clone() for k, v in model.state_dict().items()}
            run.probe(data)
            after = model.state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before)  # probe leaves no trace
            runs.append(run)
        prints = {(r.init_sha256, r.order_sha256, r.probe_loss) for r in runs}
        assert len(prints) == 1, prints
        fingerprints[seed] = prints.pop()
        assert math.isfinite(fingerprints[seed][2])
    # another seed: other weights, order and masks (so the equalities above can fail)
    assert all(a != b for a, b in zip(fingerprints[0], fingerprints[1]))
    # the TorchDEQ models really solve with TorchDEQ
    td = mod.build_method("td_upg", cfg, info, state, get_deq)
    assert isinstance(td.deq, mod.TorchDEQLayer)
    assert not isinstance(
        mod.build_method("pdq_upg", cfg, info, state, get_deq).deq, mod.TorchDEQLayer
    )


def test_skips_cleanly_without_torchdeq(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mod = _load_script()
    monkeypatch.setattr(mod, "_import_torchdeq", lambda: None)
    out = tmp_path / "t.json"
    assert mod.main([*DIGITS, "--seeds", "0", "--out", str(out)]) == 0
    assert "skipped" in capsys.readouterr().out
    assert not out.exists()


def test_bad_options_are_refused() -> None:
    mod = _load_script()
    for argv in (["--methods", "pdq_upg,bogus"], ["--seeds", "a"], ["--eval-every", "0"]):
        with pytest.raises(SystemExit) as exc:
            mod.main(argv)
        assert exc.value.code == 2


@pytest.mark.slow
def test_end_to_end_tiny_two_seeds_in_two_processes(tmp_path: Path) -> None:
    """Digits (64 train / 32 test images), two seeds run by ``--jobs 2``, a target every run
    reaches at its first check, then a cap that none reaches it within."""
    pytest.importorskip("torchdeq", reason="TorchDEQ 0.1.0 (the peer extra) is not installed")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    base = [
        sys.executable,
        str(SCRIPT),
        *DIGITS,
        "--train-size",
        "64",
        "--test-size",
        "32",
        "--seeds",
        "0,1",
        "--jobs",
        "2",
        "--eval-every",
        "2",
    ]
    out = tmp_path / "reached.json"
    proc = subprocess.run(
        [*base, "--target", "1e-6", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "time / TorchDEQ best" in proc.stdout
    payload = json.loads(out.read_text())
    assert payload["kind"].startswith("smoke")
    assert payload["schedule"].startswith("interleaved")
    runs = payload["runs"]
    assert sorted((r["seed"], r["method"]) for r in runs) == sorted(
        (s, m) for s in (0, 1) for m in ("pdq_upg", "pdq_ift", "td_upg", "td_ift")
    )
    for r in runs:
        assert r["reached"] and r["result"] == "reached" and r["stopped"] == "target"
        assert r["steps_to_target"] == r["steps"] == 2
        assert 0 < r["train_s_to_target"] == r["train_s"]
        assert r["cpu_s_to_target"] > 0 and r["eval_s"] > 0
        assert r["step_time_median_s"] > 0 and r["fwd_nstep_mean"] > 0
        assert r["side_by_side"]["steps"] == 1  # step 2, the one after the warm-up step
        assert r["side_by_side"]["cpu_per_step_s"] > 0
        assert math.isfinite(r["first_loss"])
        (point,) = r["curve"]
        assert point["step"] == 2 and point["test_n"] == 32 and point["at_cap"] is False
        assert 0.0 <= point["test_acc"] <= 1.0
    for seed in (0, 1):
        same = {
            (r["init_sha256"], r["order_sha256"], r["probe_loss"])
            for r in runs
            if r["seed"] == seed
        }
        assert len(same) == 1
    assert len({r["init_sha256"] for r in runs}) == 2
    for row in payload["summary"]["per_seed"]:
        assert row["torchdeq_best"] in ("td_upg", "td_ift")
        assert row["pdq_upg_time_ratio"]["bound"] == "="
        assert row["pdq_upg_time_ratio"]["value"] > 0
    over = payload["summary"]["over_seeds"]
    assert set(over["mean_to_target"]) == {"pdq_upg", "pdq_ift", "td_upg", "td_ift"}
    assert over["pdq_upg_time_ratio"] > 0

    out = tmp_path / "capped.json"
    proc = subprocess.run(
        [*base, "--target", "1.0", "--max-steps", "3", "--methods", "pdq_upg,td_upg"]
        + ["--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert len(runs) == 4
    assert {r["side_by_side"]["steps"] for r in runs} == {2}
    for r in runs:
        assert not r["reached"] and r["steps"] == 3 and r["steps_to_target"] is None
        assert r["result"] == "not reached within cap (cap)"
        assert [p["step"] for p in r["curve"]] == [2, 3]
        assert [p["at_cap"] for p in r["curve"]] == [False, True]
