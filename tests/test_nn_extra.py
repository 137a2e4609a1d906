"""Variational dropout semantics and the Hutchinson Jacobian-norm estimator."""

from __future__ import annotations

import math
from typing import cast

import pytest
import torch

from phantomdeq.nn.dropout import VariationalDropout2d, reset_variational_dropout
from phantomdeq.nn.jacobian import jacobian_frobenius_hutchinson

# ----------------------------------------------------------------------------- dropout


def test_dropout_identity_in_eval_and_with_p0() -> None:
    x = torch.randn(3, 4, 5, 5)
    d = VariationalDropout2d(0.5).eval()
    assert d.reset(x) is None
    assert torch.equal(d(x), x)
    d0 = VariationalDropout2d(0.0).train()
    d0.reset(x)
    assert torch.equal(d0(x), x)


def test_dropout_requires_reset_in_train() -> None:
    d = VariationalDropout2d(0.3).train()
    with pytest.raises(RuntimeError, match="reset"):
        d(torch.randn(2, 3, 4, 4))


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_rejects_bad_p(p: float) -> None:
    with pytest.raises(ValueError, match="p must be"):
        VariationalDropout2d(p)


def test_dropout_mask_reused_until_reset() -> None:
    torch.manual_seed(0)
    d = VariationalDropout2d(0.5).train()
    x = torch.randn(8, 16, 3, 3)
    d.reset(x)
    y1, y2 = d(x), d(2 * x)
    assert torch.equal(2 * y1, y2)  # same mask, linear in x
    d.reset(x)
    assert not torch.equal(d(x), y1)  # a new mask (P(equal) = 2^-128)


@pytest.mark.parametrize("spatial", [True, False])
def test_dropout_mask_values_and_rate(spatial: bool) -> None:
    p = 0.25
    d = VariationalDropout2d(p, spatial=spatial).train()
    g = torch.Generator().manual_seed(1)
    x = torch.ones(64, 32, 6, 6)
    mask = d.reset(x, generator=g)
    assert mask is not None
    y = d(x)
    vals = torch.unique(y)
    expected = torch.tensor([0.0, 1.0 / (1.0 - p)])
    assert torch.allclose(vals, expected[: vals.numel()] if vals.numel() < 2 else expected)
    if spatial:
        assert mask.shape == (64, 32, 1, 1)
        # the same value at every pixel of a channel
        assert torch.equal(y, y[:, :, :1, :1].expand_as(y))
    else:
        assert mask.shape == x.shape
    n = mask.numel()
    dropped = float((mask == 0).float().mean())
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_dropout_generator_reproducible_and_reset_helper() -> None:
    net = torch.nn.Sequential(VariationalDropout2d(0.5), VariationalDropout2d(0.5)).train()
    reset_variational_dropout(net, (4, 3, 2, 2), generator=torch.Generator().manual_seed(7))
    m1 = [cast(torch.Tensor, m.mask).clone() for m in net if isinstance(m, VariationalDropout2d)]
    reset_variational_dropout(net, (4, 3, 2, 2), generator=torch.Generator().manual_seed(7))
    m2 = [cast(torch.Tensor, m.mask) for m in net if isinstance(m, VariationalDropout2d)]
    assert all(torch.equal(a, b) for a, b in zip(m1, m2))


def test_nn_wrong_types_are_type_errors() -> None:
    with pytest.raises(TypeError, match="VariationalDropout2d: p must be a finite number"):
        VariationalDropout2d("0.1")
    with pytest.raises(TypeError, match="VariationalDropout2d: spatial must be True or False"):
        VariationalDropout2d(0.1, spatial=1)
    z = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(TypeError, match="n_samples must be an integer"):
        jacobian_frobenius_hutchinson(z * 2, z, 1.0)
    with pytest.raises(TypeError, match="distribution must be one of"):
        jacobian_frobenius_hutchinson(z * 2, z, 1, distribution=0)


def test_dropout_reset_rejects_non_4d() -> None:
    with pytest.raises(ValueError, match="4-d"):
        VariationalDropout2d(0.1).reset((3, 4))


# ----------------------------------------------------------------------------- Hutchinson


def _tolerance(a_mat: torch.Tensor, n_probes: int, numel_per_probe: int) -> float:
    # For Gaussian v, Var ||A^T v||^2 = 2 ||A A^T||_F^2; Rademacher has smaller variance.
    sd = math.sqrt(2.0) * float(torch.linalg.matrix_norm(a_mat @ a_mat.T)) / math.sqrt(n_probes)
    return 5.0 * sd / numel_per_probe


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_hutchinson_matches_exact_frobenius_of_linear_map(distribution: str) -> None:
    torch.manual_seed(0)
    n, m, b, s = 6, 5, 400, 10
    a_mat = torch.randn(m, n, dtype=torch.float64)
    z = torch.randn(b, n, dtype=torch.float64, requires_grad=True)
    fz = z @ a_mat.T  # per sample J = A, whole-batch J = blockdiag(A, ..., A)
    est = jacobian_frobenius_hutchinson(
        fz, z, s, create_graph=False, distribution=distribution,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    exact = float(a_mat.pow(2).sum()) / n  # b * ||A||_F^2 / (b * n)
    assert abs(float(est) - exact) < _tolerance(a_mat, b * s, n)
    assert abs(float(est) - exact) / exact < 0.1


def test_hutchinson_tuple_state_and_nonlinear_map() -> None:
    torch.manual_seed(1)
    w1 = torch.randn(3, 4, dtype=torch.float64)
    w2 = torch.randn(2, 4, dtype=torch.float64)
    z1 = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(1, 2, dtype=torch.float64, requires_grad=True)

    def f(a: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(a @ w1 + c @ w2)
        return h[:, :2] * 2.0, torch.sin(h)

    jac = torch.autograd.functional.jacobian(lambda a, c: torch.cat(f(a, c), dim=1), (z1, z2))
    exact = sum(float(j.pow(2).sum()) for j in jac) / 5.0
    # 4000 identical rows: the batch Jacobian is block diagonal, each block the one above.
    b1 = z1.detach().expand(4000, 3).clone().requires_grad_(True)
    b2 = z2.detach().expand(4000, 2).clone().requires_grad_(True)
    est = jacobian_frobenius_hutchinson(
        f(b1, b2), (b1, b2), 5, create_graph=False, generator=torch.Generator().manual_seed(0)
    )
    assert abs(float(est) - exact) / exact < 0.05


def test_hutchinson_is_differentiable_with_create_graph() -> None:
    torch.manual_seed(2)
    n = 4
    a_mat = torch.randn(n, n, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2000, n, dtype=torch.float64, requires_grad=True)
    est = jacobian_frobenius_hutchinson(z @ a_mat.T, z, 1, create_graph=True)
    (g,) = torch.autograd.grad(est, a_mat)
    # d/dA ||A||_F^2 / n = 2A / n; the estimate's gradient is unbiased for it.
    expected = 2 * a_mat.detach() / n
    assert torch.allclose(g, expected, atol=0.2 * float(expected.abs().max()))


def test_hutchinson_validation() -> None:
    z = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="n_samples"):
        jacobian_frobenius_hutchinson(z * 2, z, 0)
    with pytest.raises(ValueError, match="distribution"):
        jacobian_frobenius_hutchinson(z * 2, z, 1, distribution="uniform")
    with pytest.raises(ValueError, match="require grad"):
        jacobian_frobenius_hutchinson(z * 2, z.detach(), 1)
