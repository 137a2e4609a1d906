"""Warm-started fixed points: the store keeps each sample's state under its index (through
shuffled batches and checkpoints), the estimators keep their meaning whatever the start (UPG is
eq. 17 from the solution, IFT is the exact gradient independent of the start), and a resumed
warm-started run is bit-identical to an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import phantomdeq as pdq
from core_problems import inner, make_problem, state_target
from phantomdeq import diagnostics as D
from phantomdeq.train.warm_start import WarmStartStore


def _states(n, gen):
    return (torch.randn(n, 2, 3, generator=gen), torch.randn(n, 4, generator=gen))


def test_store_keeps_each_sample_under_its_index_through_shuffles():
    gen = torch.Generator().manual_seed(0)
    n = 10
    truth = _states(n, gen)
    store = WarmStartStore(n, torch.device("cpu"), announce=False)
    assert store.get(torch.arange(3)) is None  # nothing stored yet
    order = torch.randperm(n, generator=gen)
    seen = order[:7]
    for batch in (seen[:4], seen[4:]):
        store.put(batch, tuple(t[batch] for t in truth))
    assert store.nbytes == n * (6 + 4) * 2 + n  # bfloat16 values and the seen mask
    query = torch.randperm(n, generator=gen)
    got = store.get(query, dtype=torch.float64)
    assert got is not None and got[0].dtype == torch.float64
    was_seen = torch.isin(query, seen)
    for part, t in zip(got, truth):
        want = t[query].to(torch.bfloat16).double()
        want[~was_seen] = 0.0  # never stored: the model's zero start
        assert torch.equal(part, want)
    assert torch.equal(store.seen, torch.isin(torch.arange(n), seen))
    # checkpoint round trip
    other = WarmStartStore(n, torch.device("cpu"), announce=False)
    other.load_state_dict(store.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.get(query), store.get(query)))
    # a non-finite entry is stored as 0 (a frozen sample restarts from zeros)
    bad = tuple(t[:1].clone() for t in truth)
    bad[0][0, 0, 0] = float("nan")
    store.put(torch.tensor([0]), bad)
    assert store.get(torch.tensor([0]))[0][0, 0, 0] == 0.0
    with pytest.raises(IndexError, match=r"indices must be a 1-d list in \[0, 10\)"):
        store.get(torch.tensor([10]))
    with pytest.raises(ValueError, match="holds 10 samples, this run has 11"):
        WarmStartStore(11, torch.device("cpu"), announce=False).load_state_dict(store.state_dict())


def _random_start(cell, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    z = cell.z0(batch)
    if isinstance(z, tuple):
        return tuple(torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in z)
    return torch.randn(z.shape, generator=gen, dtype=z.dtype)


def _grad_from(cell, x, z0, est, solver):
    deq = pdq.DEQ(cell, solver=solver, grad=est)
    z, info = deq(z0, x)
    t = state_target(z)
    wrt = [*cell.parameters(), x]
    return list(torch.autograd.grad(inner(z, t), wrt)), info, t, wrt


def test_upg_from_a_warm_start_is_eq17_at_the_solution(tuple_state):
    cell, x = make_problem(tuple_state)
    solver = pdq.FixedPoint(max_iter=200, tol=1e-6)
    results = []
    for z0 in (cell.z0(x.shape[0]), _random_start(cell, x.shape[0], 5)):
        grads, info, t, wrt = _grad_from(cell, x, z0, pdq.UPG(k=4, lam=0.5), solver)
        A = D.unrolled_matrix(cell, info.z, (x,), wrt, 4, 0.5)
        g = torch.cat([p.reshape(-1) for p in (t if isinstance(t, tuple) else (t,))])
        assert D.relative_error(grads, A @ g) <= 1e-10
        results.append((grads, info))
    # two starts, two (tolerance-close) solutions: close gradients, not the same numbers
    assert D.relative_error(results[0][0], results[1][0]) <= 1e-4
    assert not all(torch.equal(a, b) for a, b in zip(results[0][0], results[1][0]))


def test_ift_is_independent_of_the_start_when_converged(tuple_state):
    cell, x = make_problem(tuple_state)
    solver = pdq.FixedPoint(max_iter=400, tol=1e-13)
    out = []
    for z0 in (cell.z0(x.shape[0]), _random_start(cell, x.shape[0], 9)):
        est = pdq.IFT(solver=pdq.FixedPoint(max_iter=400, tol=1e-13))
        grads, info, t, wrt = _grad_from(cell, x, z0, est, solver)
        assert info.result == "converged"
        out.append(grads)
    exact = D.exact_gradient(cell, info.z, (x,), wrt, t)
    assert D.relative_error(out[0], out[1]) <= 1e-10
    assert D.relative_error(out[1], exact) <= 1e-10


@pytest.mark.slow
def test_trainer_starts_each_sample_at_its_last_equilibrium(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("sklearn")
    from conftest import tiny_config
    from phantomdeq.models.mdeq import MDEQ
    from phantomdeq.train import run_training

    calls: list[tuple] = []
    real = MDEQ.forward

    def forward(self, x, **kw):  # type: ignore[no-untyped-def]
        out = real(self, x, **kw)
        if kw.get("mode") == "deq" and self.training:
            calls.append((kw.get("z0"), tuple(t.detach().clone() for t in out.info.z)))
        return out

    monkeypatch.setattr(MDEQ, "forward", forward)
    raw = tiny_config(
        data={"train_size": 32, "batch_size": 16}, train={"epochs": 2, "warm_start": True}
    )
    run_training(raw, tmp_path, progress=False)
    assert len(calls) == 4
    assert calls[0][0] is None and calls[1][0] is not None  # the store exists after step 1
    # step 1 of epoch 2 and step 2 of epoch 1 share no order: map by sample index
    from phantomdeq.train.distributed import epoch_permutation

    orders = [epoch_permutation(32, 0, e) for e in (0, 1)]
    solved = {}
    for e, order in enumerate(orders):
        for b in range(2):
            idx = order[16 * b : 16 * (b + 1)]
            z0, z = calls[2 * e + b]
            if z0 is not None:
                for j, i in enumerate(idx.tolist()):
                    for part, start in zip(solved.get(i, ()), z0):
                        assert torch.equal(start[j], part.to(torch.bfloat16).float())
                    if i not in solved:  # never solved yet: zeros
                        assert all(bool((start[j] == 0).all()) for start in z0)
            for j, i in enumerate(idx.tolist()):
                solved[i] = tuple(t[j] for t in z)
    assert len(solved) == 32


@pytest.mark.slow
def test_warm_started_resume_is_bit_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("sklearn")
    from phantomdeq.train import Trainer, TrainingInterrupted, config_from_dict, run_training
    from phantomdeq.train.run_folder import load_checkpoint
    from test_checkpoint import _stop_at, assert_same_weights, resume_config, steps

    cfg = config_from_dict(resume_config(warm_start=True))
    full = tmp_path / "full"
    run_training(cfg, full, progress=False)
    part = tmp_path / "part"
    real_step = Trainer._train_step
    _stop_at(monkeypatch, 7, "signal")  # SIGINT in epoch 2: last.pt mid-epoch
    with pytest.raises(TrainingInterrupted):
        run_training(cfg, part, progress=False)
    monkeypatch.setattr(Trainer, "_train_step", real_step)
    state = load_checkpoint(part / "last.pt")
    assert state["extra"]["warm_start"]["seen"].all()
    run_training(cfg, part, resume=True, progress=False)
    assert_same_weights(full / "last.pt", part / "last.pt")
    assert [r["fwd_nstep"] for r in steps(part)] == [r["fwd_nstep"] for r in steps(full)]


@pytest.mark.slow
def test_warm_start_needs_the_same_setting_on_resume(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    from conftest import tiny_config
    from phantomdeq.train import ConfigError, run_training

    raw = tiny_config(data={"train_size": 32, "batch_size": 32}, train={"epochs": 1})
    run_training(raw, tmp_path, progress=False)
    raw["train"].update(epochs=2, warm_start=True)
    with pytest.raises(ConfigError, match="train.warm_start"):
        run_training(raw, tmp_path, resume=True, progress=False)
