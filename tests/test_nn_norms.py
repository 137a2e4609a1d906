"""Spectral normalisation to a target Lipschitz constant, the weight-norm helper, and the
synthetic layer's Lipschitz constant (paper Sec. 3, L_h = 0.9)."""

import copy

import pytest
import torch
from torch import nn

import phantomdeq as pdq
from phantomdeq.models.synthetic import SyntheticF
from phantomdeq.nn import SpectralNorm, spectral_norm, update_norms, weight_norm

D = torch.float64


def _sigma(w: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(w.detach().reshape(w.shape[0], -1), ord=2)


@pytest.mark.parametrize("target", [0.5, 0.9, 3.0])
def test_exact_mode_sets_the_spectral_norm(target):
    torch.manual_seed(0)
    lin = spectral_norm(nn.Linear(7, 5, dtype=D), lipschitz=target, exact=True)
    assert float(_sigma(lin.weight)) == pytest.approx(target, rel=1e-12)
    # the layer x -> W x + b is target-Lipschitz: ||W(x-y)|| <= target ||x - y||, with equality
    # along the top right singular vector
    _, _, vh = torch.linalg.svd(lin.weight.detach())
    v = vh[0]
    assert float((lin.weight.detach() @ v).norm()) == pytest.approx(target, rel=1e-12)


def test_power_iteration_converges_to_target_with_updates():
    torch.manual_seed(1)
    lin = spectral_norm(nn.Linear(30, 20, dtype=D), lipschitz=0.9, n_power_iterations=1)
    lin.train()
    for _ in range(50):
        assert update_norms(lin) == 1
    assert float(_sigma(lin.weight)) == pytest.approx(0.9, rel=1e-6)
    # evaluating the weight never advances the iteration, in either mode; update_norms only
    # advances parametrizations in training mode
    fresh = spectral_norm(nn.Linear(30, 20, dtype=D), lipschitz=0.9, n_power_iterations=1)
    u = fresh.parametrizations.weight[0].u
    u0 = u.clone()
    for mode in (fresh.eval, fresh.train):
        mode()
        _ = fresh.weight
        assert torch.equal(u, u0)
    fresh.eval()
    assert update_norms(fresh) == 0 and torch.equal(u, u0)
    fresh.train()
    assert update_norms(fresh) == 1 and not torch.equal(u, u0)


def _one_power_step(w, u):
    v = nn.functional.normalize(w.T @ u, dim=0, eps=1e-12)
    return nn.functional.normalize(w @ v, dim=0, eps=1e-12), v


def test_the_weight_holds_still_during_a_deq_solve():
    """Width 256, ||W||_2 target 0.9, Anderson: the DEQ forward advances the power iteration
    exactly once, before the solve, and the solve converges in the same iterations (give or
    take the step a rounding difference at the tolerance costs) to the same residuals as with
    that normalised matrix held fixed (before, the map moved at every cell call and the solve
    stopped at max_iter)."""
    torch.manual_seed(0)
    width = 256
    lin = spectral_norm(nn.Linear(width, width, bias=False, dtype=D), lipschitz=0.9)

    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, z, x):
            return torch.tanh(self.lin(z) + x)

    cell = Cell()
    x = torch.randn(8, width, dtype=D)
    solver = pdq.Anderson(max_iter=50, tol=1e-8)
    deq = pdq.DEQ(cell, solver=solver, grad=pdq.UPG(k=3, lam=0.5)).train()
    sn = lin.parametrizations.weight[0]
    raw = lin.parametrizations.weight.original.detach()
    for _ in range(2):
        u_before = sn.u.clone()
        z, info = deq(torch.zeros(8, width, dtype=D), x)
        u1, v1 = _one_power_step(raw, u_before)
        assert torch.allclose(sn.u, u1, rtol=0, atol=1e-14)  # one step, not one per call
        assert torch.allclose(sn.v, v1, rtol=0, atol=1e-14)
        w_fixed = (0.9 / (u1 @ raw @ v1)) * raw
        ref = solver(lambda h, w=w_fixed: torch.tanh(h @ w.T + x), torch.zeros(8, width, dtype=D))
        assert info.result == ref.result == "converged"
        # the two weights are the same matrix rounded differently (the parametrization's sigma
        # and this one sum in other orders): a residual at the tolerance may take one step more
        assert abs(info.niter - ref.niter) <= 1
        if info.niter == ref.niter:
            assert torch.allclose(info.residual, ref.residual, rtol=1e-6, atol=1e-15)
            assert torch.allclose(info.z, ref.z, rtol=0, atol=1e-12)
        else:
            assert torch.allclose(info.z, ref.z, rtol=0, atol=1e-6)
        # the gradient pass and any later evaluation (an IFT backward) see the same weight
        u_after = sn.u.clone()
        z.sum().backward()
        assert torch.allclose(lin.weight, w_fixed, rtol=0, atol=1e-14)
        assert torch.equal(sn.u, u_after)
    deq.eval()
    u_eval = sn.u.clone()
    deq(torch.zeros(8, width, dtype=D), x)
    assert torch.equal(sn.u, u_eval)  # no update in eval mode


def test_bound_mode_only_shrinks():
    small = nn.Linear(4, 4, bias=False, dtype=D)
    with torch.no_grad():
        small.weight.copy_(0.3 * torch.eye(4, dtype=D))
    before = small.weight.detach().clone()
    spectral_norm(small, lipschitz=0.9, exact=True, mode="bound")
    assert torch.allclose(small.weight, before)
    big = nn.Linear(4, 4, bias=False, dtype=D)
    with torch.no_grad():
        big.weight.copy_(torch.diag(torch.tensor([5.0, 2.0, 1.0, 0.5], dtype=D)))
    spectral_norm(big, lipschitz=0.9, exact=True, mode="bound")
    expected = torch.diag(torch.tensor([0.9, 0.36, 0.18, 0.09], dtype=D))
    assert torch.allclose(big.weight, expected, atol=1e-12)


def test_batched_matrices_are_normalised_independently():
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            scales = torch.tensor([0.1, 1.0, 10.0], dtype=D)[:, None, None]
            self.weight = nn.Parameter(torch.randn(3, 6, 4, dtype=D) * scales)

    torch.manual_seed(2)
    for exact in (True, False):
        m = spectral_norm(Holder(), lipschitz=0.7, exact=exact, n_power_iterations=10, batch_dims=1)
        for _ in range(30):
            update_norms(m)
        sig = torch.linalg.matrix_norm(m.weight.detach(), ord=2)
        assert torch.allclose(sig, torch.full((3,), 0.7, dtype=D), rtol=1e-6), (exact, sig)


def test_conv_weight_is_read_as_out_by_rest_matrix():
    torch.manual_seed(3)
    conv = spectral_norm(nn.Conv2d(3, 8, 3, dtype=D), lipschitz=1.5, exact=True)
    assert float(_sigma(conv.weight)) == pytest.approx(1.5, rel=1e-12)


def test_gradient_reaches_the_raw_weight_and_matches_finite_differences():
    torch.manual_seed(4)
    w = torch.randn(4, 3, dtype=D)
    param = SpectralNorm(w, target=0.9, exact=True)
    assert torch.autograd.gradcheck(param, (w.clone().requires_grad_(),))
    lin = spectral_norm(nn.Linear(3, 4, dtype=D), lipschitz=0.9, exact=True)
    lin(torch.randn(5, 3, dtype=D)).pow(2).sum().backward()
    raw = lin.parametrizations.weight.original
    assert raw.grad is not None and float(raw.grad.norm()) > 0
    # rescaling the raw weight does not change the normalised weight: the gradient is orthogonal
    # to the raw weight (d/ds f(s W) = <grad, W> = 0)
    assert float((raw.grad * raw.detach()).sum()) == pytest.approx(0.0, abs=1e-10)


def test_state_dict_and_deepcopy_round_trip():
    torch.manual_seed(5)
    a = spectral_norm(nn.Linear(6, 6, dtype=D), lipschitz=0.9, n_power_iterations=2)
    a.train()
    _ = a.weight
    b = spectral_norm(nn.Linear(6, 6, dtype=D), lipschitz=0.9, n_power_iterations=2)
    b.load_state_dict(a.state_dict())
    a.eval()
    b.eval()
    assert torch.allclose(a.weight, b.weight)
    c = copy.deepcopy(a)
    assert torch.allclose(c.weight, a.weight)


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"lipschitz": 0.0}, "lipschitz"),
        ({"lipschitz": float("inf")}, "lipschitz"),
        ({"n_power_iterations": 0}, "n_power_iterations"),
        ({"mode": "clip"}, "mode"),
        ({"batch_dims": -1}, "batch_dims"),
        ({"batch_dims": 1}, "batch_dims"),
    ],
)
def test_invalid_spectral_norm_options_raise(kwargs, word):
    with pytest.raises(ValueError, match=word):
        spectral_norm(nn.Linear(3, 3, dtype=D), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"lipschitz": "0.9"}, "lipschitz"),
        ({"n_power_iterations": 1.5}, "n_power_iterations"),
        ({"mode": None}, "mode"),
        ({"batch_dims": 0.0}, "batch_dims"),
        ({"exact": 1}, "exact"),
    ],
)
def test_wrongly_typed_spectral_norm_options_raise_type_error(kwargs, word):
    with pytest.raises(TypeError, match=word):
        spectral_norm(nn.Linear(3, 3, dtype=D), **kwargs)
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        update_norms("lin")


def test_missing_weight_name_raises():
    with pytest.raises(ValueError, match="name"):
        spectral_norm(nn.Linear(3, 3, dtype=D), "kernel")


def test_weight_norm_helper():
    torch.manual_seed(6)
    lin = nn.Linear(5, 4, dtype=D)
    w0 = lin.weight.detach().clone()
    weight_norm(lin)
    assert torch.allclose(lin.weight, w0)
    g = lin.parametrizations.weight.original0
    v = lin.parametrizations.weight.original1
    assert torch.allclose(g.squeeze(1), w0.norm(dim=1))
    with torch.no_grad():
        g.mul_(2.0)
    assert torch.allclose(lin.weight, 2.0 * w0)  # magnitude scales, direction is kept
    assert torch.allclose(v, w0)
    with pytest.raises(ValueError, match="dim"):
        weight_norm(nn.Linear(3, 3, dtype=D), dim=5)
    whole = weight_norm(nn.Linear(3, 2, dtype=D), dim=None)
    g_all = whole.parametrizations.weight.original0
    assert float(g_all.detach()) == pytest.approx(float(whole.weight.detach().norm()))  # Frobenius


@pytest.mark.parametrize(("activation", "w_norm"), [("tanh", 0.9), ("sigmoid", 3.6), ("relu", 0.9)])
def test_synthetic_layer_is_lipschitz_0_9(activation, w_norm):
    gen = torch.Generator().manual_seed(7)
    f = SyntheticF(12, 5, lipschitz=0.9, activation=activation, generator=gen)
    assert float(torch.linalg.matrix_norm(f.weight.detach(), ord=2)) == pytest.approx(w_norm)
    x = torch.randn(400, 5, generator=gen, dtype=D)
    h1 = torch.randn(400, 12, generator=gen, dtype=D) * 0.3
    h2 = h1 + torch.randn(400, 12, generator=gen, dtype=D) * 1e-3
    with torch.no_grad():
        ratio = (f(h1, x) - f(h2, x)).norm(dim=1) / (h1 - h2).norm(dim=1)
    assert float(ratio.max()) <= 0.9 + 1e-12
    assert float(ratio.max()) > 0.3  # and not trivially smaller


def test_synthetic_batched_draws_and_trainable_norm():
    gen = torch.Generator().manual_seed(8)
    f = SyntheticF(6, 3, batch=5, generator=gen)
    sig = torch.linalg.matrix_norm(f.weight.detach(), ord=2)
    assert torch.allclose(sig, torch.full((5,), 0.9, dtype=D))
    h, x = torch.randn(5, 6, dtype=D), torch.randn(5, 3, dtype=D)
    # sample i uses problem i
    single = SyntheticF(6, 3)
    with torch.no_grad():
        single.weight.copy_(f.weight[2])
        single.input_weight.copy_(f.input_weight[2])
        single.bias.copy_(f.bias[2])
        assert torch.allclose(f(h, x)[2], single(h[2:3], x[2:3])[0])
    t = SyntheticF(6, 3, trainable_norm=True)
    with torch.no_grad():
        t.parametrizations.weight.original.mul_(7.0)
    assert float(torch.linalg.matrix_norm(t.weight.detach(), ord=2)) == pytest.approx(0.9)
    t(h, x).sum().backward()
    assert t.parametrizations.weight.original.grad is not None


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"hidden": 4.0}, "hidden"),
        ({"lipschitz": "0.9"}, "lipschitz"),
        ({"activation": 1}, "activation"),
    ],
)
def test_synthetic_wrong_types(kwargs, word):
    opts = {"hidden": 4, "input_dim": 2, **kwargs}
    with pytest.raises(TypeError, match=word):
        SyntheticF(**opts)


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"lipschitz": 1.0}, "lipschitz"),
        ({"lipschitz": 0.0}, "lipschitz"),
        ({"activation": "gelu"}, "activation"),
        ({"batch": 0}, "batch"),
    ],
)
def test_synthetic_invalid_options(kwargs, word):
    with pytest.raises(ValueError, match=word):
        SyntheticF(4, 2, **kwargs)
