"""Diagnostics: dense exact gradients (small problems), cosine similarity, the Theorem 1 /
Remark 1 descent conditions, explicit phantom matrices, and the spectral radius of ∂F/∂h.

Layouts. Functions named ``dense_*`` return *torch layout* Jacobians: rows index outputs,
``J_h[i, j] = ∂F_i/∂h_j`` (N × N) and ``J_theta[i, p] = ∂F_i/∂θ_p`` (N × P), with the whole
batch flattened into one vector of length N. The paper writes Jacobians in the transposed
(denominator) layout, ``∂F/∂h = J_hᵀ`` and ``∂F/∂θ = J_thetaᵀ`` (P × N), so that a gradient
is ``A ∂L/∂h`` with ``A`` of shape P × N. Functions that take ``dFdh``/``dFdtheta``/``A``
use the paper layout; :func:`paper_layout` converts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._state import State, StateSpec, as_tuple, detach, like
from .grad.base import _VJPAt

TensorOrSeq = Tensor | Sequence[Tensor]


def _flatcat(ts: TensorOrSeq) -> Tensor:
    if isinstance(ts, Tensor):
        return ts.reshape(-1)
    return torch.cat([t.reshape(-1) for t in ts])


def cosine_similarity(a: TensorOrSeq, b: TensorOrSeq, *, eps: float = 1e-30) -> float:
    """Cosine of the angle between two gradients (tensors or sequences of tensors, flattened).

    ``None`` entries in a sequence count as zeros (a parameter that got no gradient).
    """
    if not isinstance(a, Tensor):
        a = [torch.zeros_like(y) if x is None else x for x, y in zip(a, b)]  # type: ignore[arg-type]
    if not isinstance(b, Tensor):
        b = [torch.zeros_like(x) if y is None else y for x, y in zip(a, b)]  # type: ignore[arg-type]
    va, vb = _flatcat(a).double(), _flatcat(b).double()
    denom = va.norm() * vb.norm()
    return float((va @ vb) / denom.clamp_min(eps))


def relative_error(estimate: TensorOrSeq, reference: TensorOrSeq) -> float:
    """``||estimate - reference|| / ||reference||`` over all flattened entries."""
    e, r = _flatcat(estimate).double(), _flatcat(reference).double()
    return float((e - r).norm() / r.norm().clamp_min(1e-300))


def dense_jacobians(
    f: Callable[..., Any], z: State, inputs: Sequence[Any] = (), wrt: Sequence[Tensor] = ()
) -> tuple[Tensor, Tensor]:
    """Dense ``J_h = ∂F/∂z`` (N × N) and ``J_wrt = ∂F/∂(wrt)`` (N × P), torch layout, at ``z``.

    ``wrt`` lists the tensors (parameters of ``f`` and/or inputs) whose Jacobian is wanted, in
    order; their columns are concatenated. One backward pass per output entry: small problems only.
    """
    spec = StateSpec.of(z)
    z_req = tuple(t.detach().requires_grad_() for t in as_tuple(z))
    with torch.enable_grad():
        out = spec.check(f(like(spec, z_req), *inputs))
        y = torch.cat([o.reshape(-1) for o in out])
        n = y.numel()
        p = sum(t.numel() for t in wrt)
        J_h = torch.zeros(n, sum(t.numel() for t in z_req), dtype=y.dtype, device=y.device)
        J_w = torch.zeros(n, p, dtype=y.dtype, device=y.device)
        targets = list(z_req) + list(wrt)
        for i in range(n):
            grads = torch.autograd.grad(y[i], targets, retain_graph=True, allow_unused=True)
            row = [torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, targets)]
            nz = len(z_req)
            J_h[i] = torch.cat([r.reshape(-1) for r in row[:nz]])
            if p:
                J_w[i] = torch.cat([r.reshape(-1) for r in row[nz:]])
    return J_h, J_w


def paper_layout(J: Tensor) -> Tensor:
    """Torch-layout Jacobian -> the paper's layout (transpose)."""
    return J.transpose(0, 1)


def implicit_jacobian(J_h: Tensor, J_theta: Tensor) -> Tensor:
    """``dz*/dθ = (I − J_h)⁻¹ J_θ`` (torch layout, N × P), eq. (2)."""
    eye = torch.eye(J_h.shape[0], dtype=J_h.dtype, device=J_h.device)
    return torch.linalg.solve(eye - J_h, J_theta)


def _split(vec: Tensor, like_ts: Sequence[Tensor]) -> list[Tensor]:
    out, start = [], 0
    for t in like_ts:
        out.append(vec[start : start + t.numel()].view_as(t))
        start += t.numel()
    return out


def exact_gradient(
    f: Callable[..., Any],
    z_star: State,
    inputs: Sequence[Any],
    wrt: Sequence[Tensor],
    grad_z: State,
) -> list[Tensor]:
    """Exact implicit gradient (eq. 4) by dense linear algebra:
    ``dL/dwrt = J_wrtᵀ (I − J_h)⁻ᵀ dL/dz``. Returns one tensor per entry of ``wrt``."""
    J_h, J_w = dense_jacobians(f, z_star, inputs, wrt)
    g = _flatcat(as_tuple(grad_z)).to(J_h.dtype)
    eye = torch.eye(J_h.shape[0], dtype=J_h.dtype, device=J_h.device)
    v = torch.linalg.solve((eye - J_h).transpose(0, 1), g)
    return _split(J_w.transpose(0, 1) @ v, wrt)


def neumann_matrix(dFdh: Tensor, dFdtheta: Tensor, k: int, lam: float) -> Tensor:
    """``A^neu_{k,λ} = λ ∂F/∂θ (I + B + … + B^{k−1})``, ``B = λ ∂F/∂h + (1 − λ) I`` (eq. 18),
    paper layout (``dFdh`` N × N, ``dFdtheta`` P × N; returns P × N)."""
    n = dFdh.shape[0]
    eye = torch.eye(n, dtype=dFdh.dtype, device=dFdh.device)
    B = lam * dFdh + (1.0 - lam) * eye
    S = eye.clone()
    P = eye.clone()
    for _ in range(k - 1):
        P = P @ B
        S = S + P
    return lam * dFdtheta @ S


def unrolled_matrix(
    f: Callable[..., Any],
    z_star: State,
    inputs: Sequence[Any],
    wrt: Sequence[Tensor],
    k: int,
    lam: float,
) -> Tensor:
    """``A^unr_{k,λ}`` of eq. (17) in the paper layout (P × N), from dense Jacobians along the
    damped trajectory ``h_0 = z*``, ``h_{t+1} = λ F(h_t) + (1 − λ) h_t``:
    ``A = λ Σ_t ∂F/∂θ|_{h_t} Π_{s=t+1}^{k−1} (λ ∂F/∂h|_{h_s} + (1 − λ) I)``."""
    spec = StateSpec.of(z_star)
    h = detach(z_star)
    jac: list[tuple[Tensor, Tensor]] = []
    for _ in range(k):
        J_h, J_w = dense_jacobians(f, h, inputs, wrt)
        jac.append((paper_layout(J_h), paper_layout(J_w)))
        with torch.no_grad():
            fh = spec.check(f(h, *inputs))
            h = like(spec, [lam * a + (1 - lam) * b for a, b in zip(fh, as_tuple(h))])
    n = jac[0][0].shape[0]
    eye = torch.eye(n, dtype=jac[0][0].dtype, device=jac[0][0].device)
    A = torch.zeros_like(jac[0][1])
    tail = eye.clone()  # Π_{s=t+1}^{k-1} B_s, built from the right
    for t in range(k - 1, -1, -1):
        dFdh_t, dFdth_t = jac[t]
        A = A + lam * dFdth_t @ tail
        tail = (lam * dFdh_t + (1.0 - lam) * eye) @ tail
    return A


def _singular_range(dFdtheta: Tensor) -> tuple[float, float]:
    s = torch.linalg.svdvals(dFdtheta.double())
    return float(s.max()), float(s.min())


def descent_condition(A: Tensor, dFdh: Tensor, dFdtheta: Tensor) -> dict[str, float | bool]:
    """Theorem 1, condition (6): ``||A (I − ∂F/∂h) − ∂F/∂θ||₂ ≤ σ_min² / σ_max`` with σ the
    extreme singular values of ∂F/∂θ (paper layout; σ_min is the smallest of its min(P, N)
    singular values). Returns ``lhs``, ``rhs``, ``holds``, ``sigma_max``, ``sigma_min``, ``kappa``."""
    n = dFdh.shape[0]
    eye = torch.eye(n, dtype=dFdh.dtype, device=dFdh.device)
    lhs = float(torch.linalg.matrix_norm((A @ (eye - dFdh) - dFdtheta).double(), ord=2))
    smax, smin = _singular_range(dFdtheta)
    rhs = smin**2 / smax if smax > 0 else 0.0
    kappa = smax / smin if smin > 0 else float("inf")
    return {
        "lhs": lhs,
        "rhs": rhs,
        "holds": lhs <= rhs,
        "sigma_max": smax,
        "sigma_min": smin,
        "kappa": kappa,
    }


def remark1_condition(D: Tensor, dFdh: Tensor, dFdtheta: Tensor) -> dict[str, float | bool]:
    """Remark 1, condition (8), for ``A = ∂F/∂θ D``: ``||D (I − ∂F/∂h) − I||₂ ≤ 1/κ²``
    with κ the condition number of ∂F/∂θ."""
    n = dFdh.shape[0]
    eye = torch.eye(n, dtype=dFdh.dtype, device=dFdh.device)
    lhs = float(torch.linalg.matrix_norm((D @ (eye - dFdh) - eye).double(), ord=2))
    smax, smin = _singular_range(dFdtheta)
    kappa = smax / smin if smin > 0 else float("inf")
    rhs = 1.0 / kappa**2
    return {"lhs": lhs, "rhs": rhs, "holds": lhs <= rhs, "kappa": kappa}


def spectral_radius(
    f: Callable[..., Any],
    z: State,
    *inputs: Any,
    iters: int = 50,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-sample spectral radius of ``∂F/∂h`` at ``z`` by power iteration on ``(∂F/∂h)ᵀ``
    (same spectrum) with vector-Jacobian products — any problem size, no dense matrix.

    Returns a ``(B,)`` tensor. The estimate is the geometric mean of the per-step growth
    ``||Jᵀv_{i}|| / ||v_{i}||`` over the second half of the iterations, which converges to ρ
    also when the dominant eigenvalues are a complex pair. Assumes ``f`` treats samples
    independently (otherwise the per-sample numbers describe the batch operator's blocks).
    """
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 2:
        raise ValueError(f"spectral_radius: iters must be an integer >= 2, got {iters!r}")
    spec = StateSpec.of(z)
    z_req = tuple(t.detach().requires_grad_() for t in as_tuple(z))
    with torch.enable_grad():
        ys = spec.check(f(like(spec, z_req), *inputs))
    v = torch.randn(spec.batch, spec.dim, dtype=spec.dtype, device=spec.device, generator=generator)
    v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
    logs = []
    vjp = _VJPAt(ys, z_req, spec)
    for i in range(iters):
        w = vjp(v)
        norm = torch.linalg.vector_norm(w, dim=1)
        if i >= iters // 2:
            logs.append(torch.log(norm.clamp_min(1e-300)))
        v = w / norm.clamp_min(1e-300)[:, None]
    return torch.exp(torch.stack(logs).mean(dim=0))
