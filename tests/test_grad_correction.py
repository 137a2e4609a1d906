"""Fixed-point correction (Bai et al., CVPR 2022) against the mathematics: the recorded states are
the solver's iterates, and the gradient of the weighted loss over the states is the weighted sum
of the eq. (17) matrices from each earlier state plus the estimator's own matrix at the solution
(dense Jacobians, float64)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import phantomdeq as pdq
from core_problems import inner, make_problem, state_target
from phantomdeq import diagnostics as D
from phantomdeq.train import config_from_dict
from phantomdeq.train.sections import ConfigError


def _flat(z):
    return torch.cat([p.reshape(-1) for p in (z if isinstance(z, tuple) else (z,))])


def _close(a, b):
    parts = zip(a, b) if isinstance(a, tuple) else [(a, b)]
    return all(torch.allclose(u, v, rtol=0, atol=1e-14) for u, v in parts)


@pytest.mark.parametrize("grad", ["upg", "npg", "ift"])
def test_one_state_is_exactly_the_plain_estimator(grad, tuple_state):
    cell, x = make_problem(tuple_state)
    est = {
        "upg": lambda: pdq.UPG(k=3, lam=0.6),
        "npg": lambda: pdq.NPG(k=4, lam=0.6),
        "ift": lambda: pdq.IFT(solver=pdq.FixedPoint(max_iter=200, tol=1e-13)),
    }[grad]
    out = []
    for corr in (None, pdq.Correction(states=1, gamma=0.5)):
        deq = pdq.DEQ(
            cell, solver=pdq.Anderson(max_iter=50, tol=1e-12), grad=est(), correction=corr
        )
        z, info = deq(cell.z0(x.shape[0]), x)
        t = state_target(z)
        out.append(torch.autograd.grad(inner(z, t), [*cell.parameters(), x]))
        if corr is not None:
            assert info.states is not None and len(info.states) == 1
            assert info.states[0] is z and info.state_weights == [1.0]
        else:
            assert info.states is None
    assert all(torch.equal(a, b) for a, b in zip(*out))


@pytest.mark.parametrize("grad", ["upg", "npg"])
def test_corrected_gradient_is_the_weighted_sum_of_per_state_estimators(grad, tuple_state):
    cell, x = make_problem(tuple_state)
    lam, gamma = 0.6, 0.5
    k = 3 if grad == "upg" else 4  # the earlier states get UPG with the estimator's k and λ
    est = pdq.UPG(k=k, lam=lam) if grad == "upg" else pdq.NPG(k=k, lam=lam)
    # a fixed budget of 9 evaluations: states at the inputs of evaluations 4 and 7, i.e. the
    # plain fixed-point iterates F^3(z0) and F^6(z0)
    solver = pdq.FixedPoint(max_iter=9, tol=0.0)
    deq = pdq.DEQ(cell, solver=solver, grad=est, correction=pdq.Correction(states=3, gamma=gamma))
    z, info = deq(cell.z0(x.shape[0]), x)
    assert info.state_weights == [gamma**2, gamma, 1.0]
    assert len(info.states) == 3 and info.states[-1] is z
    targets = [state_target(z, seed=s) for s in (11, 12, 13)]
    wrt = [*cell.parameters(), x]
    loss = pdq.grad.corrected_loss(
        lambda s: inner(s, targets[_index(info.states, s)]), info.states, info.state_weights
    )
    grads = torch.autograd.grad(loss, wrt)
    # the states, by plain iteration from z0
    h, iterates = cell.z0(x.shape[0]), {}
    with torch.no_grad():
        for n in range(1, 7):
            h = cell(h, x)
            iterates[n] = h
    expected = torch.zeros(sum(p.numel() for p in wrt), dtype=torch.float64)
    for w, n, t in zip(info.state_weights[:2], (3, 6), targets[:2]):
        A = D.unrolled_matrix(cell, iterates[n], (x,), wrt, k, lam)
        expected += w * (A @ _flat(t))
    if grad == "upg":
        A = D.unrolled_matrix(cell, info.z, (x,), wrt, k, lam)
    else:
        J_h, J_w = D.dense_jacobians(cell, info.z, (x,), wrt)
        A = D.neumann_matrix(D.paper_layout(J_h), D.paper_layout(J_w), k, lam)
    expected += A @ _flat(targets[2])
    assert D.relative_error(grads, expected) <= 1e-10
    # the per-state terms matter: dropping an earlier state changes the gradient
    A3 = D.unrolled_matrix(cell, iterates[3], (x,), wrt, k, lam)
    assert D.relative_error(grads, expected - gamma**2 * (A3 @ _flat(targets[0]))) > 1e-3


def _index(states, s):
    return next(i for i, u in enumerate(states) if u is s)


def test_an_early_stopped_solve_records_iterates_it_visited():
    # a solve that converges long before its budget: the states are spread over the
    # evaluations it made (earlier they were all set to the solution)
    cell, x = make_problem(False)
    x = x[:1]  # one sample: no converged sample is held still while others iterate
    solver = pdq.FixedPoint(max_iter=200, tol=1e-6)  # stops after ~30 evaluations
    deq = pdq.DEQ(
        cell, solver=solver, grad=pdq.UPG(k=1, lam=1.0), correction=pdq.Correction(states=4)
    )
    z, info = deq(cell.z0(1), x)
    assert info.niter < 100
    # the plain fixed-point iterates F^j(z0); a state's UPG(1, 1) output is F(state), so a
    # recorded iterate F^(e-1)(z0) (evaluation e's input) shows as F^e(z0)
    h, iterates = cell.z0(1), []
    with torch.no_grad():
        for _ in range(info.niter + 2):
            iterates.append(h)
            h = cell(h, x)
    found = []
    for s in info.states[:-1]:
        js = [j for j, it in enumerate(iterates) if _close(s.detach(), it)]
        assert js, "a recorded state is not an iterate of the solve"
        found.append(js[0])
    # three distinct iterates in trajectory order, none of them the solution, spread out:
    # the inputs of evaluations floor(m T / 4) + 1 of the T evaluations the solve made
    assert found == sorted(found) and len(set(found)) == 3
    assert all(not _close(s.detach(), z.detach()) for s in info.states[:-1])
    assert found[0] >= 2 and found[-1] >= info.niter // 2


def test_state_recorder_spaces_states_over_the_evaluations_made():
    corr = pdq.Correction(states=4)

    def run(t):
        rec = corr.recorder(lambda z: z, max_iter=1000)
        for e in range(1, t + 1):
            rec(torch.tensor(float(e)))  # the input of evaluation e is e
        return rec

    # T = 14 <= 4 N: exactly the inputs of evaluations floor(m T / N) + 1
    rec = run(14)
    assert rec.evaluations() == [4, 8, 11] == corr.evaluations(14)
    assert [float(s) for s in rec.states(torch.tensor(0.0))] == [4.0, 8.0, 11.0]
    # T = 1000: at most 4 N inputs kept; each state the kept input nearest to its target
    rec = run(1000)
    assert len(rec.kept) <= 16
    got = rec.evaluations()
    assert got == sorted(got) and len(set(got)) == 3
    for e, target in zip(got, corr.evaluations(1000)):
        assert abs(e - target) <= rec.stride // 2
        assert float(rec.kept[e]) == e  # a visited input, not the solution
    # fewer evaluations than states: refused, naming the setting and the count
    with pytest.raises(RuntimeError, match=r"Correction\(states=4\).*only 2 time"):
        run(2).states(torch.tensor(0.0))


def test_recorded_states_are_the_iterates(tuple_state):
    cell, x = make_problem(tuple_state)
    deq = pdq.DEQ(
        cell,
        solver=pdq.FixedPoint(max_iter=8, tol=0.0),
        grad=pdq.UPG(k=1, lam=1.0),
        correction=pdq.Correction(states=2),
    )
    z, info = deq(cell.z0(x.shape[0]), x)
    # evaluation 5's input: F^4(z0); its UPG(1, 1) output is F(F^4(z0)) = F^5(z0)
    h = cell.z0(x.shape[0])
    with torch.no_grad():
        for _ in range(5):
            h = cell(h, x)
    assert _close(
        tuple(s.detach() for s in info.states[0]) if tuple_state else info.states[0].detach(), h
    )


@pytest.mark.parametrize(
    "factory,error,message",
    [
        (
            lambda: pdq.Correction(states=0),
            ValueError,
            "Correction: states must be an integer >= 1",
        ),
        (lambda: pdq.Correction(states=2.0), TypeError, "Correction: states must be an integer"),
        (lambda: pdq.Correction(gamma=0.0), ValueError, "Correction: gamma must be in (0.0, 1.0]"),
        (lambda: pdq.Correction(gamma=1.5), ValueError, "Correction: gamma must be in (0.0, 1.0]"),
        (lambda: pdq.Correction(gamma=math.nan), ValueError, "gamma must be a finite number"),
        (
            lambda: pdq.DEQ(
                make_problem(False)[0],
                solver=pdq.Anderson(),
                grad=pdq.IFT(),
                correction=pdq.Correction(states=2),
            ),
            TypeError,
            "needs grad=UPG(...) or NPG(...), got IFT",
        ),
        (
            lambda: pdq.DEQ(
                make_problem(False)[0],
                solver=pdq.Anderson(max_iter=10, tol=0),
                grad=pdq.UPG(),
                correction=pdq.Correction(states=2),
                cuda_graph=True,
            ),
            ValueError,
            "correction records states inside the solve",
        ),
        (
            lambda: pdq.DEQ(
                make_problem(False)[0], solver=pdq.Anderson(), grad=pdq.UPG(), correction=3
            ),
            TypeError,
            "DEQ: correction must be None or a phantomdeq.grad.Correction",
        ),
    ],
)
def test_correction_options_are_validated(factory, error, message):
    with pytest.raises(error) as info:
        factory()
    assert message in str(info.value)


def _raw(**grad):
    return {"grad": grad, "data": {"name": "digits"}, "model": {"name": "mdeq_tiny"}}


@pytest.mark.parametrize(
    "grad,message",
    [
        ({"correction": {"states": 0}}, r"grad\.correction\.states"),
        ({"correction": {"gamma": 0.0}}, r"grad\.correction\.gamma"),
        ({"correction": {"gamma": 1.2}}, r"grad\.correction\.gamma"),
        ({"correction": {"depth": 2}}, r"grad\.correction\.depth"),
        ({"name": "ift", "correction": {"states": 2}}, r"grad\.correction\.states: .*upg or npg"),
    ],
)
def test_config_correction_is_validated(grad, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(_raw(**grad))


@pytest.mark.slow
def test_trainer_minimises_the_corrected_loss(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    from phantomdeq.train import run_training
    from phantomdeq.train.build import build_correction

    cfg = config_from_dict(_raw(name="upg", correction={"states": 3, "gamma": 0.7}))
    corr = build_correction(cfg.grad)
    assert isinstance(corr, pdq.Correction) and (corr.states, corr.gamma) == (3, 0.7)
    assert build_correction(config_from_dict(_raw(name="upg")).grad) is None
    raw = {
        "model": {"name": "mdeq_tiny", "dropout": 0.0},
        "data": {"name": "digits", "train_size": 32, "test_size": 32, "batch_size": 32},
        "solver": {"name": "anderson", "max_iter": 6, "tol": 1e-3},
        "grad": {"name": "upg", "k": 2, "lam": 0.5, "correction": {"states": 2, "gamma": 0.5}},
        "optim": {"name": "adam", "lr": 3e-3, "schedule": "constant"},
        "train": {"epochs": 2, "seed": 0, "num_threads": 1},
        "log": {"progress": False, "tensorboard": False, "plot": False},
    }
    result = run_training(raw, tmp_path, progress=False)
    assert result["steps"] == 2 and math.isfinite(result["test_loss"])


def test_a_solve_too_short_for_the_correction_is_one_line_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A solve that converges at its first check cannot supply the states a correction asks
    for: the command stops with one line naming grad.correction.states, exit status 2."""
    pytest.importorskip("yaml")
    pytest.importorskip("sklearn")
    import yaml

    from conftest import tiny_config
    from phantomdeq.cli import main as cli

    raw = tiny_config(
        solver={"name": "anderson", "max_iter": 6, "tol": 1e6},
        grad={"name": "upg", "k": 2, "lam": 0.5},
        train={"epochs": 1},
    )
    raw["grad"]["correction"] = {"states": 4}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = cli(["train", "--config", str(path), "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "grad.correction.states" in err and "Traceback" not in err
