"""The CPU kernel that forms a solver's residual with its history products and |x| in one pass
(solvers/residual_kernel.py): against float64 math, per-sample isolation, independence of the
thread count, every fallback to the eager path, and the solvers' iterates with and without it."""

from __future__ import annotations

import pytest
import torch

import phantomdeq as pdq
from phantomdeq.solvers import residual_kernel as native


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setenv(native.ENV_VAR, "1")
    reason = native.unavailable_reason()
    if reason is not None:
        pytest.skip(f"native kernel unavailable here: {reason}")
    return native


def _history(dtype, b=5, m=4, d=1537, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gy = torch.randn(b, m, 2, d, dtype=dtype, generator=gen)
    fx = torch.randn(b, d, dtype=dtype, generator=gen)
    x = torch.randn(b, d, dtype=dtype, generator=gen)
    return gy, fx, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n, slot", [(1, 0), (3, 2), (4, 0), (4, 3)])
@pytest.mark.parametrize("with_image", [True, False])
def test_matches_float64_math_on_strided_history(kernel, dtype, n, slot, with_image):
    # Anderson's layout: residual and image of each slot side by side, (B, m, 2, D); D not a
    # multiple of the kernel's chunk or vector width
    gy, fx, x = _history(dtype)
    before = gy.clone()
    out = kernel.residual_products(
        fx, x, gy[:, :n, 0], slot, gy[:, slot, 1] if with_image else None
    )
    assert out is not None
    dots, xx = out
    assert dots.dtype == dtype and xx.dtype == dtype and dots.shape == (5, n)
    expect = before.clone()
    expect[:, slot, 0] = fx - x  # the same IEEE subtraction: bit for bit
    if with_image:
        expect[:, slot, 1] = fx
    assert torch.equal(gy, expect)  # nothing else written
    r = (fx - x).double()
    ref = torch.einsum("bd,bnd->bn", r, expect[:, :n, 0].double())
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    scale = r.norm(dim=1, keepdim=True) * expect[:, :n, 0].double().norm(dim=2)
    assert ((dots.double() - ref).abs() <= tol * scale).all()
    xref = x.double().square().sum(1)
    assert torch.allclose(xx.double(), xref, rtol=tol, atol=0)


def test_a_non_finite_sample_reaches_no_other_and_threads_do_not_matter(kernel):
    gy, fx, x = _history(torch.float32, b=6)
    clean = gy.clone()
    dots0, xx0 = kernel.residual_products(fx, x, clean[:, :4, 0], 1, clean[:, 1, 1])
    bad_fx = fx.clone()
    bad_fx[2, 7] = float("nan")
    bad_x = x.clone()
    bad_x[4, 0] = float("inf")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        dirty = gy.clone()
        dots1, xx1 = kernel.residual_products(bad_fx, bad_x, dirty[:, :4, 0], 1, dirty[:, 1, 1])
    finally:
        torch.set_num_threads(threads)
    ok = [0, 1, 3, 5]
    # bit for bit: one thread per sample, a fixed order of summation, whatever the thread count
    assert torch.equal(dots1[ok], dots0[ok]) and torch.equal(xx1[ok], xx0[ok])
    assert torch.equal(dirty[ok], clean[ok])
    assert not torch.isfinite(dots1[2]).all() and not torch.isfinite(xx1[4])


def test_falls_back_to_none_where_it_cannot_run(kernel, monkeypatch):
    gy, fx, x = _history(torch.float32)
    hist = gy[:, :3, 0]
    assert kernel.residual_products(fx.half(), x.half(), hist.half(), 0) is None  # dtype
    assert kernel.residual_products(fx, x.double(), hist, 0) is None  # mixed dtypes
    assert kernel.residual_products(fx.t().contiguous().t(), x, hist, 0) is None  # strides
    assert kernel.residual_products(fx.requires_grad_(), x, hist, 0) is None  # autograd
    fx = fx.detach()
    monkeypatch.setenv(native.ENV_VAR, "0")
    assert kernel.residual_products(fx, x, hist, 0) is None
    assert kernel.unavailable_reason() == f"{native.ENV_VAR}=0"
    monkeypatch.setenv(native.ENV_VAR, "yes")
    with pytest.raises(ValueError, match=native.ENV_VAR) as err:
        kernel.residual_products(fx, x, hist, 0)
    assert "'0'" in str(err.value) and "'1'" in str(err.value)
    monkeypatch.setenv(native.ENV_VAR, "1")
    with pytest.raises(ValueError, match="slot 3"):
        kernel.residual_products(fx, x, hist, 3)


def test_build_failures_leave_the_eager_path(monkeypatch, tmp_path):
    monkeypatch.setenv(native.ENV_VAR, "1")
    monkeypatch.setenv(native.CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_compiler", lambda: None)
    assert native.library() is None
    assert "no C compiler" in (native.unavailable_reason() or "")
    f, z0 = _contraction(torch.float64)
    sol = pdq.Anderson(max_iter=40, tol=1e-10)(f, z0)
    assert sol.converged.all()
    # a compiler that fails: its message is the reason, nothing left in the cache
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.undo()
    if native._compiler() is None:
        pytest.skip("no C compiler here")
    monkeypatch.setenv(native.CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_FLAGS", [*native._FLAGS, "-fno-such-flag-phantomdeq"])
    assert native.library() is None
    assert "failed" in (native.unavailable_reason() or "")
    assert not list((tmp_path / "cache").glob("*.so"))


def test_builds_once_into_the_cache_folder(monkeypatch, tmp_path):
    if native._compiler() is None:
        pytest.skip("no C compiler here")
    monkeypatch.setenv(native.ENV_VAR, "1")
    monkeypatch.setenv(native.CACHE_ENV_VAR, str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    assert native.library() is not None
    built = list(tmp_path.glob("residual_products-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_state", {})
    assert native.library() is not None  # loaded from the cache, not rebuilt
    assert built[0].stat().st_mtime_ns == stamp


def _contraction(dtype, b=3, d=700, seed=1):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d, d, dtype=torch.float64, generator=gen)
    w = (0.8 * w / torch.linalg.matrix_norm(w, ord=2)).to(dtype)
    c = torch.randn(b, d, dtype=dtype, generator=gen)

    def f(z):
        return torch.tanh(z @ w.T + c)

    return f, torch.zeros(b, d, dtype=dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize(
    "make",
    [
        lambda: pdq.Anderson(max_iter=25, tol=0.0, m=5),
        lambda: pdq.Anderson(max_iter=25, tol=0.0, m=3, beta=0.7),
        lambda: pdq.Broyden(max_iter=20, tol=0.0),
    ],
    ids=["anderson", "anderson-damped", "broyden"],
)
def test_solver_iterates_with_and_without_the_kernel_agree_to_rounding(
    kernel, monkeypatch, make, dtype, tol
):
    f, z0 = _contraction(dtype)
    seen: dict[str, list[torch.Tensor]] = {"1": [], "0": []}
    for flag in ("1", "0"):
        monkeypatch.setenv(native.ENV_VAR, flag)

        def traced(z, flag=flag):
            seen[flag].append(z.detach().clone())
            return f(z)

        sol = make()(traced, z0)
        seen[flag].append(sol.z)
    assert len(seen["1"]) == len(seen["0"])
    for a, b in zip(seen["1"], seen["0"], strict=True):
        assert torch.allclose(a, b, rtol=0, atol=tol * max(1.0, b.abs().max().item()))
