"""Adaptive phantom gradients (``UPG(k="auto")``, ``NPG(k="auto")``) against the mathematics:
the number of steps is the first one where the stated criterion holds (computed here from the
damped iteration / the dense Jacobian), the gradient is then the eq. (17) / eq. (18) matrix with
that k applied to the loss gradient, and with tol -> 0 it is the exact implicit gradient."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import phantomdeq as pdq
from core_problems import inner, make_problem, state_target
from phantomdeq import diagnostics as D
from phantomdeq.train import config_from_dict
from phantomdeq.train.sections import ConfigError


def _grads(cell, x, estimator, solver):
    deq = pdq.DEQ(cell, solver=solver, grad=estimator)
    z, info = deq(cell.z0(x.shape[0]), x)
    t = state_target(z)
    wrt = [*cell.parameters(), x]
    return list(torch.autograd.grad(inner(z, t), wrt)), info, t, wrt


def _parts(z):
    return z if isinstance(z, tuple) else (z,)


def _flat(z):
    return torch.cat([p.reshape(-1) for p in _parts(z)])


def _sample_index(z):
    """The sample of every entry of :func:`_flat` (dense Jacobians use that order)."""
    return torch.cat([torch.arange(p.shape[0]).repeat_interleave(p[0].numel()) for p in _parts(z)])


def _per_sample_norms(vec, index, batch):
    return torch.zeros(batch, dtype=vec.dtype).index_add_(0, index, vec * vec).sqrt()


def _series_ratios(cell, x, z, wrt, g, lam, k_max):
    """[inf, r_1, ..., r_{k_max-1}]: r_i = max over samples of ‖(Bᵀ)^i g‖ / ‖Σ_{i'<=i} (Bᵀ)^{i'} g‖
    with the dense Jacobian at ``z`` (B = λ ∂F/∂h + (1 − λ) I); the first term is never the
    last. The adaptive rule (UPG and NPG) takes as many terms as the first i whose ratio is
    below tol, plus one."""
    J_h, J_w = D.dense_jacobians(cell, z, (x,), wrt)
    index, batch = _sample_index(z), x.shape[0]
    w, acc, ratios = g, g.clone(), [float("inf")]
    Bt = lam * J_h.T + (1 - lam) * torch.eye(J_h.shape[0], dtype=J_h.dtype)
    for _ in range(k_max - 1):
        w = Bt @ w
        acc = acc + w
        ratio = _per_sample_norms(w, index, batch) / _per_sample_norms(acc, index, batch)
        ratios.append(float(ratio.max()))
    return ratios, J_h, J_w


def _assert_first_step_below(ratios, tol, k, k_max, rel=1e-9):
    """k is the first step whose criterion ratio is below tol (or the cap k_max): a ratio
    within ``rel`` of tol may fall on either side, since the estimator and this definition
    sum the norms in different orders."""
    assert all(r >= tol * (1 - rel) for r in ratios[: k - 1]), (k, ratios)
    if k < k_max:
        assert ratios[k - 1] < tol * (1 + rel), (k, ratios)


def test_adaptive_upg_stops_by_its_criterion_and_equals_eq17_with_that_k(tuple_state):
    """The number of steps is decided on the gradient series at h* (the quantity eq. (17)'s
    truncation error is made of), and the gradient is then bit for bit UPG(k) with that k."""
    cell, x = make_problem(tuple_state)
    # a loose solve: eq. (17)'s Jacobians along the trajectory then differ from those at h*
    solver = pdq.FixedPoint(max_iter=4, tol=1e-13)
    est = pdq.UPG(k="auto", lam=0.5, tol=0.1, k_max=40)
    grads, info, t, wrt = _grads(cell, x, est, solver)
    j = est.last_k
    assert 3 <= j < 40  # neither the first step nor the cap
    ratios, *_ = _series_ratios(cell, x, info.z, wrt, _flat(t), 0.5, 40)
    _assert_first_step_below(ratios, 0.1, j, 40)
    fixed, *_ = _grads(cell, x, pdq.UPG(k=j, lam=0.5), solver)
    assert all(torch.equal(a, b) for a, b in zip(grads, fixed))
    A = D.unrolled_matrix(cell, info.z, (x,), wrt, j, 0.5)
    assert D.relative_error(grads, A @ _flat(t)) <= 1e-10
    # a tighter tol takes more steps
    tighter = pdq.UPG(k="auto", lam=0.5, tol=1e-3, k_max=40)
    _grads(cell, x, tighter, solver)
    assert tighter.last_k > j


def test_adaptive_upg_value_is_one_damped_step(tuple_state):
    """The forward value is that of UPG(k=1), Φ(h*), whatever k the backward then chooses."""
    cell, x = make_problem(tuple_state)
    solver = pdq.FixedPoint(max_iter=4, tol=1e-13)
    z_auto, _ = pdq.DEQ(cell, solver=solver, grad=pdq.UPG(k="auto", lam=0.5))(cell.z0(3), x)
    z_one, _ = pdq.DEQ(cell, solver=solver, grad=pdq.UPG(k=1, lam=0.5))(cell.z0(3), x)
    assert all(torch.equal(a, b) for a, b in zip(_parts(z_auto), _parts(z_one)))


def test_adaptive_upg_steps_do_not_grow_with_a_tighter_forward_solve(tuple_state):
    """Issue 23: the old rule (forward differences) ran to k_max once the forward solve had
    converged to rounding level; the series rule takes the same order of steps whatever the
    forward tol, well below k_max."""
    cell, x = make_problem(tuple_state)
    ks = {}
    for fwd_tol in (1e-3, 1e-12):
        est = pdq.UPG(k="auto", lam=0.5, tol=1e-3, k_max=50)
        grads, info, t, wrt = _grads(cell, x, est, pdq.FixedPoint(max_iter=400, tol=fwd_tol))
        assert info.result == "converged"
        ks[fwd_tol] = est.last_k
        fixed, *_ = _grads(
            cell, x, pdq.UPG(k=est.last_k, lam=0.5), pdq.FixedPoint(max_iter=400, tol=fwd_tol)
        )
        assert all(torch.equal(a, b) for a, b in zip(grads, fixed))
    assert ks[1e-12] < 50
    assert abs(ks[1e-12] - ks[1e-3]) <= max(2, ks[1e-3] // 2), ks


def test_adaptive_upg_second_order_matches_fixed_k(tuple_state):
    """Under create_graph the adaptive UPG is the double backward of UPG(k) with its k."""
    cell, x = make_problem(tuple_state)
    solver = pdq.FixedPoint(max_iter=200, tol=1e-12)
    out = []
    for est in (pdq.UPG(k="auto", lam=0.7, tol=1e-2, k_max=50), None):
        if est is None:
            est = pdq.UPG(k=out[0][1], lam=0.7)
        deq = pdq.DEQ(cell, solver=solver, grad=est)
        z, _ = deq(cell.z0(x.shape[0]), x)
        (gx,) = torch.autograd.grad(inner(z, state_target(z)), [x], create_graph=True)
        (hx,) = torch.autograd.grad(gx.pow(2).sum(), [x])
        out.append((hx, est.last_k))
    assert 2 <= out[0][1] < 50
    assert torch.equal(out[0][0], out[1][0])


def test_adaptive_upg_reaches_the_parameters_of_a_closure():
    """A cell that is a plain function capturing its parameters gets them their gradient."""
    cell, x = make_problem(False)

    def closure(z, x):
        return cell(z, x)

    solver = pdq.FixedPoint(max_iter=200, tol=1e-12)
    wrt = [*cell.parameters(), x]
    got = []
    for est in (pdq.UPG(k="auto", lam=0.5), None):
        est = est or pdq.UPG(k=got[0][1], lam=0.5)
        z, _ = pdq.DEQ(closure, solver=solver, grad=est)(cell.z0(3), x)
        got.append((torch.autograd.grad(inner(z, state_target(z)), wrt), est.last_k))
    assert all(torch.equal(a, b) for a, b in zip(got[0][0], got[1][0]))


def test_adaptive_upg_with_tiny_tol_is_the_exact_gradient(tuple_state):
    cell, x = make_problem(tuple_state)
    est = pdq.UPG(k="auto", lam=0.8, tol=1e-300, k_max=150, checkpoint=True)
    grads, info, t, wrt = _grads(cell, x, est, pdq.FixedPoint(max_iter=6, tol=1e-13))
    tight = pdq.FixedPoint(max_iter=400, tol=1e-14)(lambda z: cell(z, x), cell.z0(x.shape[0]))
    exact = D.exact_gradient(cell, tight.z, (x,), wrt, t)
    assert est.last_k > 20
    assert D.relative_error(grads, exact) <= 1e-9


def test_adaptive_npg_stops_by_its_criterion_and_equals_eq18_with_that_k(tuple_state):
    cell, x = make_problem(tuple_state)
    solver = pdq.Broyden(max_iter=100, tol=1e-13)
    lam, tol = 0.6, 1e-2
    est = pdq.NPG(k="auto", lam=lam, tol=tol, k_max=60)
    grads, info, t, wrt = _grads(cell, x, est, solver)
    ratios, J_h, J_w = _series_ratios(cell, x, info.z, wrt, _flat(t), lam, 60)
    g = _flat(t)
    terms = est.last_k
    assert 3 <= terms < 60
    _assert_first_step_below(ratios, tol, terms, 60)
    fixed, *_ = _grads(cell, x, pdq.NPG(k=terms, lam=lam), solver)
    assert all(torch.equal(a, b) for a, b in zip(grads, fixed))
    A = D.neumann_matrix(D.paper_layout(J_h), D.paper_layout(J_w), terms, lam)
    assert D.relative_error(grads, A @ g) <= 1e-10


def test_adaptive_npg_with_tiny_tol_is_the_exact_gradient(tuple_state):
    cell, x = make_problem(tuple_state)
    est = pdq.NPG(k="auto", lam=1.0, tol=1e-300, k_max=200)
    grads, info, t, wrt = _grads(cell, x, est, pdq.Broyden(max_iter=100, tol=1e-14))
    exact = D.exact_gradient(cell, info.z, (x,), wrt, t)
    assert est.last_k == 200
    assert D.relative_error(grads, exact) <= 1e-10


def test_adaptive_npg_second_order_matches_fixed_k(tuple_state):
    """Under create_graph the adaptive series is the fixed-k one too (double backward)."""
    cell, x = make_problem(tuple_state)
    solver = pdq.Broyden(max_iter=100, tol=1e-13)
    out = []
    for est in (pdq.NPG(k="auto", lam=0.7, tol=1e-2, k_max=50), None):
        if est is None:
            est = pdq.NPG(k=out[0][1], lam=0.7)
        deq = pdq.DEQ(cell, solver=solver, grad=est)
        z, _ = deq(cell.z0(x.shape[0]), x)
        (gx,) = torch.autograd.grad(inner(z, state_target(z)), [x], create_graph=True)
        (hx,) = torch.autograd.grad(gx.pow(2).sum(), [x])
        out.append((hx, est.last_k))
    assert torch.equal(out[0][0], out[1][0])


@pytest.mark.parametrize(
    "factory,error,message",
    [
        (lambda: pdq.UPG(k="fast"), ValueError, "UPG: k must be an integer >= 1 or 'auto'"),
        (lambda: pdq.NPG(k=0), ValueError, "NPG: k must be an integer >= 1 or 'auto'"),
        (lambda: pdq.UPG(k="auto", tol=0.0), ValueError, "UPG: tol must be in (0.0, inf)"),
        (lambda: pdq.NPG(k="auto", tol="small"), TypeError, "NPG: tol must be a finite number"),
        (lambda: pdq.NPG(k="auto", k_max=0), ValueError, "NPG: k_max must be an integer >= 1"),
        (lambda: pdq.UPG(k="auto", k_max=2.0), TypeError, "UPG: k_max must be an integer"),
        (lambda: pdq.UPG(k=5, tol=1e-3), ValueError, "UPG: tol applies only to k='auto'"),
        (lambda: pdq.NPG(k=5, k_max=9), ValueError, "NPG: k_max applies only to k='auto'"),
    ],
)
def test_adaptive_options_are_validated(factory, error, message):
    with pytest.raises(error, match=None) as info:
        factory()
    assert message in str(info.value)


def test_adaptive_defaults_and_repr():
    est = pdq.UPG(k="auto")
    assert (est.tol, est.k_max, est.adaptive, est.last_k) == (1e-3, 30, True, None)
    assert "k='auto'" in repr(est) and "k_max=30" in repr(est)
    fixed = pdq.NPG(k=4)
    assert not fixed.adaptive and fixed.last_k == 4 and "tol" not in repr(fixed)


def test_adaptive_refused_while_compiling(monkeypatch):
    import phantomdeq.grad.adaptive as adaptive

    cell, x = make_problem(False)
    monkeypatch.setattr(adaptive, "sync_free", lambda: True)
    for est in (pdq.UPG(k="auto"), pdq.NPG(k="auto")):
        with pytest.raises(RuntimeError, match="cannot run under torch.compile"):
            pdq.DEQ(cell, solver=pdq.Anderson(), grad=est)(cell.z0(3), x)


def _raw(**grad):
    return {"grad": grad, "data": {"name": "digits"}, "model": {"name": "mdeq_tiny"}}


def test_config_takes_auto_and_names_fields():
    cfg = config_from_dict(_raw(name="npg", k="auto", tol=1e-2, k_max=12))
    from phantomdeq.train.build import build_grad

    est = build_grad(cfg.grad)
    assert isinstance(est, pdq.NPG) and (est.k, est.tol, est.k_max) == ("auto", 1e-2, 12)
    with pytest.raises(ConfigError, match=r"grad\.tol: UPG: tol applies only to k='auto'"):
        config_from_dict(_raw(name="upg", k=3, tol=1e-2))
    with pytest.raises(ConfigError, match=r"grad\.k_max: NPG: k_max must be an integer >= 1"):
        config_from_dict(_raw(name="npg", k="auto", k_max=0))
    raw = _raw(name="upg", k="auto")
    raw["train"] = {"compile": True}
    with pytest.raises(ConfigError, match=r"grad\.k: UPG\(k='auto'\) .* train\.compile"):
        config_from_dict(raw)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["upg", "npg"])
def test_trainer_logs_the_chosen_k(tmp_path: Path, name: str) -> None:
    pytest.importorskip("sklearn")
    from phantomdeq.train import run_training

    raw = {
        "model": {"name": "mdeq_tiny", "dropout": 0.0},
        "data": {"name": "digits", "train_size": 32, "test_size": 32, "batch_size": 16},
        "solver": {"name": "anderson", "max_iter": 6, "tol": 1e-3},
        "grad": {"name": name, "k": "auto", "lam": 0.5, "tol": 0.3, "k_max": 4},
        "optim": {"name": "adam", "lr": 1e-3, "schedule": "constant"},
        "train": {"epochs": 1, "seed": 0, "num_threads": 1},
        "log": {"progress": False, "tensorboard": False, "plot": False},
    }
    run_training(raw, tmp_path, progress=False)
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    ks = [r["grad_k"] for r in recs if r.get("kind") == "step"]
    assert len(ks) == 2 and all(isinstance(k, int) and 1 <= k <= 4 for k in ks)
