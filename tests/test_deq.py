"""The DEQ module: modes, module plumbing and input validation."""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch

import phantomdeq as pdq
from core_problems import SmallCell, inner, make_problem, state_target

ESTIMATORS = {
    "ift": lambda: pdq.IFT(),
    "upg": lambda: pdq.UPG(k=5, lam=0.5),
    "upg_ckpt": lambda: pdq.UPG(k=3, lam=0.5, checkpoint=True),
    "npg": lambda: pdq.NPG(k=5, lam=0.5),
    "onestep": lambda: pdq.OneStep(),
    "bptt": lambda: pdq.BPTT(),
}


@pytest.mark.parametrize("est", ESTIMATORS)
def test_train_mode_gradients_reach_parameters_and_inputs(est, tuple_state):
    cell, x = make_problem(tuple_state)
    deq = pdq.DEQ(cell, solver=pdq.FixedPoint(max_iter=60, tol=1e-8), grad=ESTIMATORS[est]())
    z, info = deq(cell.z0(3), x)
    inner(z, state_target(z)).backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    for name, p in cell.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all()


def test_eval_and_no_grad_return_the_plain_solution(tuple_state):
    cell, x = make_problem(tuple_state)
    deq = pdq.DEQ(cell, solver=pdq.FixedPoint(max_iter=60, tol=1e-10), grad=pdq.UPG(k=5, lam=0.5))
    with torch.no_grad():
        z, info = deq(cell.z0(3), x)
    parts = z if isinstance(z, tuple) else (z,)
    assert all(not p.requires_grad for p in parts)
    deq.eval()
    z2, info2 = deq(cell.z0(3), x)
    parts2 = z2 if isinstance(z2, tuple) else (z2,)
    assert all(not p.requires_grad for p in parts2)
    for a, b in zip(parts, parts2):
        assert torch.equal(a, b)


def test_eval_solver_is_used_in_eval_mode():
    cell, x = make_problem(False)
    deq = pdq.DEQ(
        cell,
        solver=pdq.FixedPoint(max_iter=2, tol=1e-12),
        grad=pdq.UPG(k=2, lam=0.5),
        eval_solver=pdq.Anderson(max_iter=50, tol=1e-10),
    )
    _, info_train = deq(cell.z0(3), x)
    deq.eval()
    _, info_eval = deq(cell.z0(3), x)
    assert info_train.niter == 2
    assert info_eval.result == "converged"


def test_module_plumbing_deepcopy_pickle_state_dict_to():
    cell, x = make_problem(True)
    deq = pdq.DEQ(
        cell,
        solver=pdq.Broyden(max_iter=40, tol=1e-10),
        grad=pdq.IFT(solver=pdq.Anderson(max_iter=40, tol=1e-10)),
    )
    z, _ = deq(cell.z0(3), x)
    inner(z, state_target(z)).backward()  # fills grad.last_backward: must not break pickling
    clone = copy.deepcopy(deq)
    buf = io.BytesIO()
    torch.save(deq, buf)
    restored = pickle.loads(pickle.dumps(deq))
    fresh = pdq.DEQ(SmallCell(True, seed=5), solver=pdq.FixedPoint(), grad=pdq.NPG())
    fresh.load_state_dict(deq.state_dict())
    deq.eval()
    ref, _ = deq(cell.z0(3), x)
    for other in (clone, restored):
        other.eval()
        out, _ = other(cell.z0(3), x)
        assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(out, ref))
    assert set(deq.state_dict()) == {f"f.{n}" for n, _ in cell.named_parameters()}
    moved = deq.to(torch.float32)
    z32, _ = moved(tuple(t.float() for t in cell.z0(3)), x.detach().float())
    assert z32[0].dtype == torch.float32


@pytest.mark.parametrize(
    "factory,message",
    [
        (lambda: pdq.UPG(k=0), "k must be an integer >= 1"),
        (lambda: pdq.UPG(k=2.5), "k must be an integer >= 1"),
        (lambda: pdq.UPG(lam=0.0), "lam must be in (0, 1]"),
        (lambda: pdq.UPG(lam=1.5), "lam must be in (0, 1]"),
        (lambda: pdq.NPG(lam=-0.1), "lam must be in (0, 1]"),
        (lambda: pdq.NPG(k=0), "k must be an integer >= 1"),
        (lambda: pdq.NPG(lam=math.nan), "lam must be a number in (0, 1]"),
        (
            lambda: pdq.grad.from_name("exact"),
            "unknown gradient estimator 'exact'; allowed: ift, upg, npg, onestep, bptt",
        ),
        (lambda: pdq.grad.from_name("upg", kk=3), "unknown option(s) ['kk']"),
        (
            lambda: pdq.DEQ(
                SmallCell(False), solver=pdq.Anderson(), grad=pdq.UPG(), on_nonfinite="ignore"
            ),
            "DEQ: on_nonfinite must be one of ('raise', 'warn'), got 'ignore'",
        ),
    ],
)
def test_bad_options_are_rejected_with_the_field_name(factory, message):
    with pytest.raises(ValueError) as err:
        factory()
    assert message in str(err.value)


def _deq(**kw):
    opts = {"solver": pdq.Anderson(), "grad": pdq.UPG()}
    opts.update(kw)
    return pdq.DEQ(SmallCell(False), **opts)


@pytest.mark.parametrize(
    "factory,message",
    [
        (lambda: _deq(grad=pdq.BPTT()), "needs solver=FixedPoint"),
        (lambda: _deq(solver="anderson"), "DEQ: solver must be a solver"),
        (lambda: _deq(solver=pdq.Anderson), "pass Anderson(...)"),
        (lambda: _deq(eval_solver=3), "DEQ: eval_solver must be a solver"),
        (lambda: _deq(solver=lambda g: g), "DEQ: solver must accept two positional arguments"),
        (lambda: _deq(grad="upg"), "DEQ: grad must be a phantomdeq.grad estimator"),
        (lambda: _deq(on_nonfinite=None), "DEQ: on_nonfinite must be one of"),
        (lambda: _deq(grad_in_eval=1), "DEQ: grad_in_eval must be True or False"),
        (lambda: pdq.DEQ(3, solver=pdq.Anderson(), grad=pdq.UPG()), "DEQ: f must be callable"),
        (lambda: pdq.IFT(solver="broyden"), "IFT: solver must be a solver"),
        (lambda: pdq.IFT(solver=lambda g: g), "IFT: solver must accept two positional arguments"),
        (lambda: pdq.IFT(warn_unconverged=1), "IFT: warn_unconverged must be True or False"),
        (lambda: pdq.IFT(pdq.FixedPoint()), "positional"),
        (
            lambda: pdq.DEQ(
                SmallCell(False),
                solver=pdq.FixedPoint(),
                eval_solver=pdq.Anderson(),
                grad=pdq.BPTT(),
                grad_in_eval=True,
            ),
            "needs eval_solver=FixedPoint",
        ),
    ],
)
def test_wrong_types_are_type_errors_naming_the_argument(factory, message):
    with pytest.raises(TypeError) as err:
        factory()
    assert message in str(err.value)


class _Bad(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, z, x):
        if self.kind == "shape":
            return torch.cat([z, z], dim=1)
        if self.kind == "dtype":
            return z.float()
        if self.kind == "structure":
            return (z, z)
        if self.kind == "tuple_len":
            return z[:1]
        return z


@pytest.mark.parametrize(
    "kind,z0,message",
    [
        (
            "shape",
            torch.zeros(2, 3, dtype=torch.float64),
            "f output has shape (2, 6), expected (2, 3)",
        ),
        (
            "dtype",
            torch.zeros(2, 3, dtype=torch.float64),
            "dtype torch.float32, expected torch.float64",
        ),
        (
            "structure",
            torch.zeros(2, 3, dtype=torch.float64),
            "f must return a Tensor like z0, got tuple",
        ),
        ("tuple_len", (torch.zeros(2, 3), torch.zeros(2, 1)), "f must return a tuple of 2 tensors"),
    ],
)
@pytest.mark.parametrize("est", ["upg", "ift"])
def test_f_returning_the_wrong_structure_is_named(kind, z0, message, est):
    deq = pdq.DEQ(_Bad(kind), solver=pdq.FixedPoint(max_iter=3), grad=ESTIMATORS[est]())
    error = TypeError if kind == "structure" else ValueError
    with pytest.raises(error) as err:
        deq(z0, None)
    assert message in str(err.value)


def test_bad_initial_state_is_named():
    deq = pdq.DEQ(_Bad("ok"), solver=pdq.FixedPoint(), grad=pdq.UPG())
    with pytest.raises(ValueError, match="same leading batch size"):
        deq((torch.zeros(2, 3), torch.zeros(3, 3)), None)
    with pytest.raises(ValueError, match="floating point"):
        deq(torch.zeros(2, 3, dtype=torch.long), None)
    # a list is refused before it reaches the cell ("too many values to unpack" deep inside)
    with pytest.raises(TypeError, match=r"z0 must be a Tensor or a tuple of Tensors, got a list"):
        deq([torch.zeros(2, 3), torch.zeros(2, 1)], None)
    # a 1-D state is not silently a batch of scalars
    with pytest.raises(ValueError, match=r"z0 has shape \(5,\).*z0.unsqueeze\(-1\)"):
        deq(torch.zeros(5), None)
    with pytest.raises(ValueError, match=r"z0\[1\] has shape \(2,\)"):
        deq((torch.zeros(2, 3), torch.zeros(2)), None)
    with pytest.raises(TypeError, match=r"z0\[1\] must be a Tensor, got int"):
        deq((torch.zeros(2, 3), 4), None)


class _Exploding(torch.nn.Module):
    def forward(self, z, x):
        return 10.0 * z + 1e308 * x


@pytest.mark.parametrize("est", ["upg", "ift", "bptt"])
def test_nonfinite_state_raises_deq_error(est):
    deq = pdq.DEQ(_Exploding(), solver=pdq.FixedPoint(max_iter=50), grad=ESTIMATORS[est]())
    x = torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(
        pdq.DEQError, match=r"non-finite values in 2 of 2 samples \(indices \[0, 1\]\)"
    ):
        deq(torch.zeros(2, 3, dtype=torch.float64), x)
    deq.on_nonfinite = "warn"
    for mode in ("train", "eval"):
        getattr(deq, mode)()
        with pytest.warns(RuntimeWarning, match="non-finite"):
            z, info = deq(torch.zeros(2, 3, dtype=torch.float64), x)
        assert info.result == "nonfinite" and info.nonfinite.all()
        assert torch.isfinite(z).all()  # the frozen iterates, never NaN


def test_ift_backward_divergence_raises_deq_error():
    """A fixed point that is found by Broyden but repels the backward iteration."""

    class Repel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.tensor(3.0, dtype=torch.float64))

        def forward(self, z, x):
            return self.a * z + x

    deq = pdq.DEQ(
        Repel(),
        solver=pdq.Broyden(max_iter=30, tol=1e-10),
        grad=pdq.IFT(solver=pdq.FixedPoint(max_iter=2000, tol=1e-10)),
    )
    z, info = deq(torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64))
    assert info.result == "converged"
    with pytest.raises(pdq.DEQError, match="IFT backward solve produced non-finite"):
        z.sum().backward()
