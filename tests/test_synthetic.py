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


@pytest.mark.slow
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
# the batched diagnostics the experiment uses, against dense per-draw mathematics
# ---------------------------------------------------------------------------------------------


def _problem(draws=5, hidden=6, input_dim=3, seed=11):
    gen = torch.Generator().manual_seed(seed)
    model = SyntheticF(hidden, input_dim, batch=draws, generator=gen)
    x = torch.randn(draws, input_dim, generator=gen, dtype=D)
    target = torch.tanh(torch.randn(draws, hidden, generator=gen, dtype=D))
    return model, x, target


def _solve(model, x, tol):
    solver = pdq.solvers.FixedPoint(max_iter=600, tol=tol, freeze_converged=True)
    return solver(lambda h: model(h, x), torch.zeros(x.shape[0], model.hidden, dtype=D)).z


def _single(model, i):
    one = SyntheticF(model.hidden, model.input_dim)
    with torch.no_grad():
        one.weight.copy_(model.weight[i])
        one.input_weight.copy_(model.input_weight[i])
        one.bias.copy_(model.bias[i])
    return one


def test_per_sample_jacobians_are_each_draws_dense_jacobians():
    model, x, _ = _problem()
    h = _solve(model, x, 1e-10)
    J_h, J_t = pdq.diagnostics.per_sample_jacobians(model, h, (x,), list(model.parameters()))
    assert J_h.shape == (5, 6, 6) and J_t.shape == (5, 6, 6 * 6 + 6 * 3 + 6)
    for i in range(5):
        one = _single(model, i)
        xi = x[i : i + 1]
        ref_h = torch.autograd.functional.jacobian(lambda z, f=one, xi=xi: f(z, xi), h[i : i + 1])
        ref_h, ref_t = (
            ref_h.reshape(6, 6),
            pdq.diagnostics.dense_jacobians(
                one, h[i : i + 1], (x[i : i + 1],), list(one.parameters())
            )[1],
        )
        assert torch.allclose(J_h[i], ref_h, rtol=1e-12, atol=1e-14)
        assert torch.allclose(J_t[i], ref_t, rtol=1e-12, atol=1e-14)


def test_bptt_exact_gradient_matches_dense_implicit_gradient():
    """The experiment's exact gradient (library DEQ + BPTT, per-draw stopping) against eq. (4)
    with dense matrices, draw by draw: dL/dθ = J_θᵀ (I − J_h)⁻ᵀ g."""
    model, x, target = _problem()
    cfg = syn.SyntheticConfig(draws=5, hidden=6, input_dim=3, tol=1e-12, max_iter=400)
    p = syn._Problem(cfg)
    p.model, p.x, p.target = model, x, target
    p.params = list(model.parameters())
    p.deq = pdq.DEQ(model, solver=p.forward, grad=pdq.BPTT()).train()
    bptt, h, _ = p.gradient(pdq.BPTT(), p.forward)
    for i in range(5):
        one = _single(model, i)
        exact = pdq.diagnostics.exact_gradient(
            one, h[i : i + 1], (x[i : i + 1],), list(one.parameters()), h[i : i + 1] - target[i]
        )
        ref = torch.cat([e.reshape(-1) for e in exact])
        assert torch.allclose(bptt[i], ref, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("exact_solution", [True, False])
def test_batched_matrices_and_condition_match_single_draw_diagnostics(exact_solution):
    model, x, _ = _problem()
    params = list(model.parameters())
    h_star = _solve(model, x, 1e-13)
    h0 = h_star if exact_solution else _solve(model, x, 3e-2)
    dfdh_s, dfdth_s = (
        pdq.diagnostics.paper_layout(j)
        for j in pdq.diagnostics.per_sample_jacobians(model, h_star, (x,), params)
    )
    jh0, jt0 = pdq.diagnostics.per_sample_jacobians(model, h0, (x,), params)
    lam, ks = 0.7, (2, 5)
    upg = pdq.diagnostics.unrolled_matrices(model, h0, (x,), params, ks, lam, per_sample=True)
    npg = pdq.diagnostics.neumann_matrices(jh0.transpose(1, 2), jt0.transpose(1, 2), ks, lam)
    for i in (0, 3):
        one = _single(model, i)
        ps = list(one.parameters())
        dfdh, dfdth = pdq.diagnostics.dense_jacobians(one, h_star[i : i + 1], (x[i : i + 1],), ps)
        j0h, j0t = pdq.diagnostics.dense_jacobians(one, h0[i : i + 1], (x[i : i + 1],), ps)
        for k in ks:
            a_unr = pdq.diagnostics.unrolled_matrix(one, h0[i : i + 1], (x[i : i + 1],), ps, k, lam)
            a_neu = pdq.diagnostics.neumann_matrix(j0h.T, j0t.T, k, lam)
            assert torch.allclose(upg[k][i], a_unr, rtol=1e-9, atol=1e-12)
            assert torch.allclose(npg[k][i], a_neu, rtol=1e-9, atol=1e-12)
            for mats in (upg, npg):
                batched = pdq.diagnostics.descent_conditions(mats[k], dfdh_s, dfdth_s)
                ref = pdq.diagnostics.descent_condition(mats[k][i], dfdh.T, dfdth.T)
                for key in ("lhs", "rhs", "kappa"):
                    assert float(batched[key][i]) == pytest.approx(ref[key], rel=1e-8)


def test_condition_at_exact_fixed_point_has_closed_form_and_kappa():
    """At h = h*, A^neu(I − ∂F/∂h) − ∂F/∂θ = −∂F/∂θ Bᵏ (paper layout), so the lhs of (6) is
    ‖Bᵏ J_θ‖₂ (torch layout). For F = tanh(Wh + Ux + b), ∂F/∂θ has orthogonal rows of norm
    s_i·sqrt(‖h‖² + ‖x‖² + 1), s = 1 − F², so σ_min²/σ_max = c·min(s)²/max(s)."""
    model, x, _ = _problem(draws=4)
    h = _solve(model, x, 1e-14)
    jh, jt = pdq.diagnostics.per_sample_jacobians(model, h, (x,), list(model.parameters()))
    lam, k = 0.5, 4
    a = pdq.diagnostics.neumann_matrices(jh.transpose(1, 2), jt.transpose(1, 2), (k,), lam)[k]
    cond = pdq.diagnostics.descent_conditions(a, jh.transpose(1, 2), jt.transpose(1, 2))
    bk = torch.linalg.matrix_power(lam * jh + (1 - lam) * torch.eye(model.hidden, dtype=D), k)
    closed = torch.linalg.matrix_norm(torch.bmm(bk, jt), ord=2)
    assert torch.allclose(cond["lhs"], closed, rtol=1e-8)
    s = 1 - model(h, x) ** 2
    c = (h.pow(2).sum(1) + x.pow(2).sum(1) + 1).sqrt()
    assert torch.allclose(cond["rhs"], c * s.min(1).values ** 2 / s.max(1).values, rtol=1e-8)


def test_explicit_matrix_gives_the_autograd_gradient():
    result = syn.run(draws=6, hidden=5, input_dim=3, ks=(1, 4), lams=(0.5,), seed=1)
    assert result.summary["explicit_vs_autograd_max_rel_err"] < 1e-10
    assert result.summary["spectral_norm_W_max"] == pytest.approx(0.9)
    assert set(result.cosines) == {
        (m, k, 0.5, e) for m in ("upg", "npg") for k in (1, 4) for e in (True, False)
    }
    assert all(isinstance(c, np.ndarray) and c.shape == (6,) for c in result.cosines.values())
