"""The synthetic setting (paper Sec. 3, Fig. 1) and the Theorem 1 check, in a reduced setting.

The experiment's fast batched estimators are cross-checked against the library
(``phantomdeq.grad.UPG``/``NPG`` through ``phantomdeq.DEQ``; ``phantomdeq.diagnostics``) and
against closed forms, so a wrong estimator or a wrong condition makes a test fail.
"""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import phantomdeq as pdq
from phantomdeq.experiments import synthetic as syn
from phantomdeq.models.synthetic import SyntheticF

D = torch.float64
KS = tuple(range(1, 11))
LAMS = (0.5, 1.0)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    argv = ["--out", str(out), "--draws", "24", "--hidden", "8", "--input-dim", "4"]
    argv += ["--ks", "1-10", "--lams", "0.5,1", "--seed", "3", "--no-progress"]
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = syn.main(argv)
    return rc, buf.getvalue(), out


def test_cli_writes_every_requested_record(cli_run):
    rc, _, out = cli_run
    assert rc == 0
    records = json.loads((out / "results.json").read_text())
    assert isinstance(records, list)
    keys = {(r["method"], r["k"], r["lam"], r["exact_solution"]) for r in records}
    expected = {
        (m, k, lam, ex) for m in ("upg", "npg") for k in KS for lam in LAMS for ex in (True, False)
    }
    assert keys == expected and len(records) == len(expected)
    required = {"method", "k", "lam", "exact_solution", "cos_mean", "cos_p10", "cos_p90"}
    required |= {"condition_holds", "descent"}
    for r in records:
        assert required <= set(r)
        assert -1.0 <= r["cos_p10"] <= r["cos_p90"] <= 1.0
        assert -1.0 <= r["cos_mean"] <= 1.0
        assert 0.0 <= r["condition_holds"] <= 1.0 and 0.0 <= r["descent"] <= 1.0
        # Theorem 1: (6) implies descent draw by draw, so the shares are ordered
        assert r["descent"] >= r["condition_holds"]
    png = (out / "fig1.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["draws"] == 24


def test_cli_prints_bptt_ift_cosine_and_table(cli_run):
    _, text, _ = cli_run
    m = re.search(r"BPTT vs IFT \(Broyden, 20 it\) cosine over 24 draws: min ([0-9.]+)", text)
    assert m, text[:500]
    assert float(m.group(1)) >= 0.9999
    assert "UPG, exact h*: cosine to exact gradient, mean" in text
    assert "NPG, inexact h~ (tol 0.01)" in text


def test_upg_cosine_rises_with_k_and_is_accurate_at_k10(cli_run):
    _, _, out = cli_run
    recs = json.loads((out / "results.json").read_text())
    for lam in LAMS:
        means = [
            next(
                r["cos_mean"]
                for r in recs
                if r["method"] == "upg" and r["k"] == k and r["lam"] == lam and r["exact_solution"]
            )
            for k in KS
        ]
        assert all(b >= a - 1e-9 for a, b in zip(means, means[1:])), (lam, means)
        assert means[-1] > means[0]
    top = next(
        r
        for r in recs
        if r["method"] == "upg" and r["k"] == 10 and r["lam"] == 1.0 and r["exact_solution"]
    )
    assert top["cos_mean"] >= 0.99


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--lams", "0"], "--lams"),
        (["--lams", "0.5,-0.1"], "--lams"),
        (["--lams", "1.5"], "--lams"),
        (["--ks", "0"], "--ks"),
        (["--ks", "0-3"], "--ks"),
        (["--lipschitz", "1.0"], "--lipschitz"),
        (["--lipschitz", "1.2"], "--lipschitz"),
        (["--methods", "upg,foo"], "--methods"),
        (["--draws", "0"], "--draws"),
    ],
)
def test_invalid_options_exit_nonzero_naming_the_option(tmp_path, capsys, args, option):
    rc = syn.main(["--out", str(tmp_path / "o"), "--no-progress", *args])
    assert rc != 0
    assert option in capsys.readouterr().err
    assert not (tmp_path / "o" / "results.json").exists()


def test_command_line_entry_point_rejects_bad_lipschitz(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "phantomdeq",
            "synthetic",
            "--out",
            str(tmp_path),
            "--lipschitz",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--lipschitz" in proc.stderr


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="lams"):
        syn.SyntheticConfig(lams=(0.0,))
    with pytest.raises(ValueError, match="ks"):
        syn.SyntheticConfig(ks=(0, 1))
    with pytest.raises(ValueError, match="methods"):
        syn.SyntheticConfig(methods=("ift",))
    with pytest.raises(ValueError, match="unknown option"):
        syn.run(draws=2, bogus=1)


# ---------------------------------------------------------------------------------------------
# cross-checks of the fast path against the library and against the mathematics
# ---------------------------------------------------------------------------------------------


def _problem(draws=5, hidden=6, input_dim=3, seed=11):
    gen = torch.Generator().manual_seed(seed)
    model = SyntheticF(hidden, input_dim, batch=draws, generator=gen)
    x = torch.randn(draws, input_dim, generator=gen, dtype=D)
    target = torch.tanh(torch.randn(draws, hidden, generator=gen, dtype=D))
    return model, x, target


def _library_gradient(model, x, target, estimator):
    deq = pdq.DEQ(model, solver=pdq.solvers.FixedPoint(max_iter=400, tol=1e-13), grad=estimator)
    deq.train()
    z, _ = deq(torch.zeros(x.shape[0], model.hidden, dtype=D), x)
    params = list(model.parameters())
    grads = torch.autograd.grad(0.5 * (z - target).pow(2).sum(), params)
    return syn._flat(grads, params)


@pytest.mark.parametrize("lam", [0.3, 1.0])
def test_fast_phantom_gradients_match_the_library_estimators(lam):
    model, x, target = _problem()
    h_star, stats = syn._fixed_point(model, x, tol=1e-13, max_iter=400)
    assert stats["converged"] == 1.0
    ks = (1, 3, 7)
    upg = syn._upg_gradients(model, x, target, h_star, lam, ks)
    npg = syn._npg_gradients(model, x, target, h_star, lam, ks)
    for k in ks:
        lib_u = _library_gradient(model, x, target, pdq.grad.UPG(k=k, lam=lam))
        lib_n = _library_gradient(model, x, target, pdq.grad.NPG(k=k, lam=lam))
        assert torch.allclose(upg[k], lib_u, rtol=1e-8, atol=1e-11)
        assert torch.allclose(npg[k], lib_n, rtol=1e-8, atol=1e-11)


def test_bptt_exact_gradient_matches_dense_implicit_gradient():
    model, x, target = _problem()
    with torch.enable_grad():
        h, _ = syn._fixed_point(model, x, tol=1e-12, max_iter=400)
        params = list(model.parameters())
        bptt = syn._flat(torch.autograd.grad(syn._loss(h, target), params), params)
    # eq. (4) with dense matrices, draw by draw: dL/dθ = J_θᵀ (I − J_h)⁻ᵀ g
    jh, jt, _ = syn._jacobians(model, h.detach(), x)
    g = h.detach() - target
    eye = torch.eye(model.hidden, dtype=D)
    v = torch.linalg.solve((eye - jh).transpose(1, 2), g.unsqueeze(-1))
    exact = torch.bmm(jt.transpose(1, 2), v).squeeze(-1)
    assert torch.allclose(bptt, exact, rtol=1e-8, atol=1e-11)


def _single(model, i):
    one = SyntheticF(model.hidden, model.input_dim)
    with torch.no_grad():
        one.weight.copy_(model.weight[i])
        one.input_weight.copy_(model.input_weight[i])
        one.bias.copy_(model.bias[i])
    return one


@pytest.mark.parametrize("exact_solution", [True, False])
def test_explicit_matrices_and_condition_match_diagnostics(exact_solution):
    model, x, _ = _problem()
    h_star, _ = syn._fixed_point(model, x, tol=1e-13, max_iter=400)
    h0 = h_star if exact_solution else syn._fixed_point(model, x, tol=3e-2, max_iter=400)[0]
    jh_star, jt_star, _ = syn._jacobians(model, h_star, x)
    lam, ks = 0.7, (2, 5)
    upg = syn._upg_matrices(model, x, h0, lam, ks)
    npg = syn._npg_matrices(model, x, h0, lam, ks)
    for i in (0, 3):
        one = _single(model, i)
        params = list(one.parameters())
        dfdh, dfdth = pdq.diagnostics.dense_jacobians(
            one, h_star[i : i + 1], (x[i : i + 1],), params
        )
        jh0, jt0 = pdq.diagnostics.dense_jacobians(one, h0[i : i + 1], (x[i : i + 1],), params)
        for k in ks:
            a_unr = pdq.diagnostics.unrolled_matrix(
                one, h0[i : i + 1], (x[i : i + 1],), params, k, lam
            )
            a_neu = pdq.diagnostics.neumann_matrix(jh0.T, jt0.T, k, lam)
            assert torch.allclose(upg[k][i].T, a_unr, rtol=1e-9, atol=1e-12)
            assert torch.allclose(npg[k][i].T, a_neu, rtol=1e-9, atol=1e-12)
            for mats in (upg, npg):
                lhs, rhs = syn._theorem1(mats[k], jh_star, jt_star)
                ref = pdq.diagnostics.descent_condition(mats[k][i].T, dfdh.T, dfdth.T)
                assert float(lhs[i]) == pytest.approx(ref["lhs"], rel=1e-8)
                assert float(rhs[i]) == pytest.approx(ref["rhs"], rel=1e-8)


def test_condition_at_exact_fixed_point_has_closed_form_and_kappa():
    """At h = h*, A^neu(I − ∂F/∂h) − ∂F/∂θ = −∂F/∂θ Bᵏ (paper layout), so the lhs of (6) is
    ‖Bᵏ J_θ‖₂ (torch layout). For F = tanh(Wh + Ux + b), ∂F/∂θ has orthogonal rows of norm
    s_i·sqrt(‖h‖² + ‖x‖² + 1), s = 1 − F², so σ_min²/σ_max = c·min(s)²/max(s)."""
    model, x, _ = _problem(draws=4)
    h, _ = syn._fixed_point(model, x, tol=1e-14, max_iter=600)
    jh, jt, fh = syn._jacobians(model, h, x)
    lam, k = 0.5, 4
    a = syn._npg_matrices(model, x, h, lam, (k,))[k]
    lhs, rhs = syn._theorem1(a, jh, jt)
    bk = torch.linalg.matrix_power(lam * jh + (1 - lam) * torch.eye(model.hidden, dtype=D), k)
    closed = torch.linalg.matrix_norm(torch.bmm(bk, jt), ord=2)
    assert torch.allclose(lhs, closed, rtol=1e-8)
    s = 1 - fh**2
    c = (h.pow(2).sum(1) + x.pow(2).sum(1) + 1).sqrt()
    assert torch.allclose(rhs, c * s.min(1).values ** 2 / s.max(1).values, rtol=1e-8)


def test_explicit_matrix_gives_the_autograd_gradient():
    result = syn.run(draws=6, hidden=5, input_dim=3, ks=(1, 4), lams=(0.5,), seed=1)
    assert result.summary["explicit_vs_autograd_max_rel_err"] < 1e-10
    assert result.summary["spectral_norm_W_max"] == pytest.approx(0.9)
    assert set(result.cosines) == {
        (m, k, 0.5, e) for m in ("upg", "npg") for k in (1, 4) for e in (True, False)
    }
    assert all(isinstance(c, np.ndarray) and c.shape == (6,) for c in result.cosines.values())
