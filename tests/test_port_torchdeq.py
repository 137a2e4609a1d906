"""The migration guide (docs/guides/migrating-from-torchdeq.md) against TorchDEQ 0.1.0 itself:
every option of ``get_deq``, ``apply_norm`` and the variational dropouts is named in the guide;
and TorchDEQ's minimal example and its port, both read from the guide, give the same parameter
gradients on the same weights and data for the matched settings."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

import phantomdeq as pdq

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guides" / "migrating-from-torchdeq.md"


def _code_spans(text: str) -> str:
    return " ".join(re.findall(r"`([^`\n]+)`", text))


def _torchdeq_options() -> set[str]:
    core = pytest.importorskip("torchdeq.core")
    norm = pytest.importorskip("torchdeq.norm")
    dropout = pytest.importorskip("torchdeq.dropout")
    solver = pytest.importorskip("torchdeq.solver")
    from torchdeq.norm.spectral_norm import SpectralNorm
    from torchdeq.norm.weight_norm import WeightNorm

    names: set[str] = {"core"}  # read by get_deq from its config
    skip = {"self", "kwargs", "module", "deq_args", "func", "x0", "z_init", "model"}
    for fn in (
        core.DEQBase.__init__,
        core.DEQIndexing.__init__,
        core.DEQSliced.__init__,
        core.DEQIndexing.forward,
        norm.apply_norm,
        SpectralNorm.apply,
        WeightNorm.apply,
        dropout.VariationalDropout1d.__init__,
        solver.get_solver("anderson"),
        solver.get_solver("broyden"),
        solver.get_solver("fixed_point_iter"),
    ):
        names |= set(inspect.signature(fn).parameters) - skip
    base_norm = pytest.importorskip("torchdeq.norm.base_norm")
    names |= set(dropout.__all__) | set(base_norm.__all__) | set(core.__all__)
    return names


def test_the_guide_names_every_torchdeq_option() -> None:
    spans = _code_spans(GUIDE.read_text(encoding="utf-8"))
    missing = sorted(n for n in _torchdeq_options() if not re.search(rf"\b{re.escape(n)}\b", spans))
    assert not missing, f"TorchDEQ options not named in the migration guide: {missing}"


# ----------------------------------------------------------------------------- the port

TOL = 1e-12  # absolute residual of every forward and backward solve (float64)
ITERS = 400  # enough for 1e-12 at a contraction of 0.9: 0.9^400 ~ 5e-19


def _guide_block(marker: str) -> str:
    text = GUIDE.read_text(encoding="utf-8")
    start = text.index(f"<!-- port: {marker} -->")
    m = re.compile(r"^```python[^\n]*\n(.*?)^```", re.M | re.S).search(text, start)
    assert m is not None, marker
    return m.group(1)


@pytest.fixture
def programs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Both programs of the guide, run once (in float64) in namespaces of their own."""
    pytest.importorskip("torchdeq")
    monkeypatch.chdir(tmp_path)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        spaces = []
        for marker in ("torchdeq", "phantomdeq"):
            ns: dict[str, object] = {"__name__": f"port_{marker}"}
            exec(compile(_guide_block(marker), f"{GUIDE.name}:{marker}", "exec"), ns)  # noqa: S102
            spaces.append(ns)
        yield spaces
    finally:
        torch.set_default_dtype(old)


def _grads(model, x, y):
    model.zero_grad()
    z, _ = model(x, torch.zeros_like(x))
    (z - y).square().mean().backward()
    return z.detach(), model


def test_the_port_gives_torchdeqs_gradients(programs) -> None:
    from torchdeq.norm import reset_norm

    theirs_ns, ours_ns = programs
    settings = {
        "upg": (
            {"grad": 5, "tau": 0.5},
            {"grad": pdq.UPG(k=5, lam=0.5)},
        ),
        "ift": (
            {"ift": True, "b_solver": "fixed_point_iter", "b_max_iter": ITERS, "b_tol": TOL},
            {"grad": pdq.IFT(solver=pdq.FixedPoint(max_iter=ITERS, tol=TOL, stop="abs"))},
        ),
    }
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 16, generator=gen)
    flat = {}
    for name, (td_opts, our_opts) in settings.items():
        torch.manual_seed(0)
        theirs = theirs_ns["DEQDemo"](
            16, f_solver="fixed_point_iter", f_max_iter=ITERS, f_tol=TOL, **td_opts
        )
        torch.manual_seed(0)
        ours = ours_ns["DEQDemo"](
            16, solver=pdq.FixedPoint(max_iter=ITERS, tol=TOL, stop="abs"), **our_opts
        )
        t_lin, o_lin = theirs.deq_func.lin, ours.deq_func.lin
        sn = o_lin.parametrizations.weight[0]
        pairs = {
            "weight": (t_lin.weight_orig, o_lin.parametrizations.weight.original),
            "scale": (t_lin.weight_g, sn.scale),
            "bias": (t_lin.bias, o_lin.bias),
        }
        # the same seed gives the same model: weights, learned scale and power-iteration start
        for a, b in pairs.values():
            assert torch.equal(a, b)
        assert torch.equal(t_lin.weight_u, sn.u) and torch.equal(t_lin.weight_v, sn.v)
        theirs.train()
        ours.train()
        for _ in range(30):  # settle σ: the same power steps on both (one per training step)
            reset_norm(theirs.deq_func)
            pdq.nn.update_norms(ours.deq_func)
        z_t, _ = _grads(theirs, x, y)
        z_o, _ = _grads(ours, x, y)
        assert torch.allclose(t_lin.weight, o_lin.weight, rtol=1e-12, atol=1e-14)
        # both solved to ||f(z) - z|| < 1e-12 per sample on a 0.9-contraction: states within
        # 1e-12 / (1 - 0.9) = 1e-11; the backward solve to 1e-12 adds as much to the gradient
        assert torch.allclose(z_t, z_o, rtol=0, atol=1e-10)
        for key, (a, b) in pairs.items():
            assert a.grad is not None and b.grad is not None, key
            assert torch.allclose(a.grad, b.grad, rtol=1e-8, atol=1e-10), (name, key)
        flat[name] = torch.cat([b.grad.reshape(-1) for _, b in pairs.values()])
    # the two estimators differ here, so agreeing with TorchDEQ on each is informative
    gap = (flat["upg"] - flat["ift"]).norm() / flat["ift"].norm()
    assert float(gap) > 1e-3
