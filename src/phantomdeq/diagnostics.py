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

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._state import State, StateSpec, as_tuple, detach, like
from .grad.base import VJPAt

TensorOrSeq = Tensor | Sequence[Tensor]


def _flatcat(ts: TensorOrSeq) -> Tensor:
    if isinstance(ts, Tensor):
        return ts.reshape(-1)
    return torch.cat([t.reshape(-1) for t in ts])


def cosine_similarity(a: TensorOrSeq, b: TensorOrSeq, *, eps: float = 1e-30) -> float:
    """Cosine of the angle between two gradients (tensors or sequences of tensors, flattened).

    ``None`` entries in a sequence count as zeros (a parameter that got no gradient).
    """
    va, vb = _flatcat(_zeros_for_none(a, b)).double(), _flatcat(_zeros_for_none(b, a)).double()
    denom = va.norm() * vb.norm()
    return float((va @ vb) / denom.clamp_min(eps))


def per_sample_cosine(a: TensorOrSeq, b: TensorOrSeq) -> Tensor:
    """Row-wise cosine ``(B,)`` of per-sample gradients: every tensor has a leading batch
    dimension (per-sample parameters, e.g. batched weights, or per-sample inputs) and is
    flattened per row; ``None`` entries count as zeros. A zero row gives cosine 0."""
    va, vb = _rows(_zeros_for_none(a, b)), _rows(_zeros_for_none(b, a))
    den = torch.linalg.vector_norm(va, dim=1) * torch.linalg.vector_norm(vb, dim=1)
    num = (va * vb).sum(dim=1)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0)


def _zeros_for_none(a: TensorOrSeq, b: TensorOrSeq) -> TensorOrSeq:
    if isinstance(a, Tensor):
        return a
    return [torch.zeros_like(y) if x is None else x for x, y in zip(a, b)]


def _rows(ts: TensorOrSeq) -> Tensor:
    """``[B, P]``: each tensor flattened per leading (batch) index, concatenated."""
    if isinstance(ts, Tensor):
        return ts.reshape(ts.shape[0], -1)
    return torch.cat([t.reshape(t.shape[0], -1) for t in ts], dim=1)


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


def per_sample_jacobians(
    f: Callable[..., Any], z: Tensor, inputs: Sequence[Any] = (), wrt: Sequence[Tensor] = ()
) -> tuple[Tensor, Tensor]:
    """Per-sample dense Jacobians at ``z`` (B × N): ``J_h`` (B × N × N) and ``J_wrt``
    (B × N × P), torch layout, by N batched vector-Jacobian products -- the whole batch at once.

    Needs ``f`` to treat samples independently and every tensor in ``wrt`` to have the batch as
    its leading dimension with sample ``b`` depending on row ``b`` only (per-sample inputs, or
    per-sample parameters such as batched weights); ``P`` counts one row of each.
    """
    z_req = z.detach().requires_grad_()
    with torch.enable_grad():
        y = f(z_req, *inputs)
        if not isinstance(y, Tensor) or y.shape != z.shape or z.dim() != 2:
            raise ValueError(
                f"per_sample_jacobians: needs a (B, N) tensor state and f(z) of the same shape, "
                f"got {tuple(z.shape)} -> {getattr(y, 'shape', type(y).__name__)}"
            )
        rows_h, rows_w = [], []
        eye = torch.eye(z.shape[1], dtype=y.dtype, device=y.device)
        for i in range(z.shape[1]):
            gh, *gw = torch.autograd.grad(
                y, [z_req, *wrt], eye[i].expand_as(y), retain_graph=True, allow_unused=True
            )
            rows_h.append(gh)
            rows_w.append(_rows(_zeros_for_none(gw, list(wrt))) if wrt else y.new_zeros(len(y), 0))
    return torch.stack(rows_h, 1), torch.stack(rows_w, 1)


def paper_layout(J: Tensor) -> Tensor:
    """Torch-layout Jacobian -> the paper's layout (transpose of the last two dimensions, so
    per-sample stacks convert too)."""
    return J.transpose(-2, -1)


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
    paper layout (``dFdh`` N × N, ``dFdtheta`` P × N; returns P × N). Leading batch dimensions
    broadcast (per-sample Jacobians give per-sample matrices)."""
    return neumann_matrices(dFdh, dFdtheta, [k], lam)[k]


def neumann_matrices(
    dFdh: Tensor, dFdtheta: Tensor, ks: Sequence[int], lam: float
) -> dict[int, Tensor]:
    """:func:`neumann_matrix` for every ``k`` in ``ks`` (one pass up to ``max(ks)``)."""
    n = dFdh.shape[-1]
    eye = torch.eye(n, dtype=dFdh.dtype, device=dFdh.device)
    B = lam * dFdh + (1.0 - lam) * eye
    S, P = eye.expand_as(B).clone(), eye.expand_as(B).clone()
    out: dict[int, Tensor] = {}
    for j in range(1, max(ks) + 1):
        if j in ks:
            out[j] = lam * dFdtheta @ S
        P = P @ B
        S = S + P
    return out


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
    return unrolled_matrices(f, z_star, inputs, wrt, [k], lam)[k]


def unrolled_matrices(
    f: Callable[..., Any],
    z_star: State,
    inputs: Sequence[Any],
    wrt: Sequence[Tensor],
    ks: Sequence[int],
    lam: float,
    *,
    per_sample: bool = False,
) -> dict[int, Tensor]:
    """:func:`unrolled_matrix` for every ``k`` in ``ks``, by the recursion
    ``A_{t+1} = λ ∂F/∂θ|_{h_t} + A_t (λ ∂F/∂h|_{h_t} + (1 − λ) I)``, ``A_0 = 0`` along one
    trajectory. ``per_sample=True`` uses :func:`per_sample_jacobians` (a (B, N) state, batched
    ``wrt``) and returns B × P × N stacks."""
    spec = StateSpec.of(z_star)
    h = detach(z_star)
    A: Tensor | None = None
    out: dict[int, Tensor] = {}
    for t in range(1, max(ks) + 1):
        if per_sample:
            if not isinstance(h, Tensor):
                raise TypeError("unrolled_matrices: per_sample=True needs a tensor state")
            J_h, J_w = per_sample_jacobians(f, h, inputs, wrt)
        else:
            J_h, J_w = dense_jacobians(f, h, inputs, wrt)
        dFdh, dFdth = paper_layout(J_h), paper_layout(J_w)
        eye = torch.eye(dFdh.shape[-1], dtype=dFdh.dtype, device=dFdh.device)
        A = lam * dFdth if A is None else lam * dFdth + A @ (lam * dFdh + (1.0 - lam) * eye)
        if t in ks:
            out[t] = A
        with torch.no_grad():
            fh = spec.check(f(h, *inputs))
            h = like(spec, [lam * a + (1 - lam) * b for a, b in zip(fh, as_tuple(h))])
    return out


def _singular_range(dFdtheta: Tensor) -> tuple[float, float]:
    s = torch.linalg.svdvals(dFdtheta.double())
    return float(s.max()), float(s.min())


def descent_condition(A: Tensor, dFdh: Tensor, dFdtheta: Tensor) -> dict[str, float | bool]:
    """Theorem 1, condition (6): ``||A (I − ∂F/∂h) − ∂F/∂θ||₂ ≤ σ_min² / σ_max`` with σ the
    extreme singular values of ∂F/∂θ (paper layout; σ_min is the smallest of its min(P, N)
    singular values). Returns ``lhs``, ``rhs``, ``holds``, ``sigma_max``, ``sigma_min``, ``kappa``."""
    c = descent_conditions(A, dFdh, dFdtheta)
    return {k: bool(v) if k == "holds" else float(v) for k, v in c.items()}


def descent_conditions(
    A: Tensor, dFdh: Tensor, dFdtheta: Tensor, *, svals: Tensor | None = None
) -> dict[str, Tensor]:
    """:func:`descent_condition` batched over leading dimensions (one entry per sample of
    per-sample matrices, e.g. from :func:`per_sample_jacobians`), as tensors in float64.
    ``svals``: the singular values of ``dFdtheta`` (descending, ``torch.linalg.svdvals``) when
    already computed -- they do not depend on ``A``. The spectral norm on the left is the root of
    the largest eigenvalue of the small Gram matrix (accurate to rounding for the largest
    singular value, and much cheaper than an SVD of the tall matrix)."""
    n = dFdh.shape[-1]
    eye = torch.eye(n, dtype=dFdh.dtype, device=dFdh.device)
    m = (A @ (eye - dFdh) - dFdtheta).double()
    gram = m.mT @ m if m.shape[-2] >= m.shape[-1] else m @ m.mT
    lhs = torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0).sqrt()
    s = torch.linalg.svdvals(dFdtheta.double()) if svals is None else svals.double()
    smax, smin = s[..., 0], s[..., -1]
    rhs = torch.where(smax > 0, smin**2 / smax.clamp_min(1e-300), torch.zeros_like(smax))
    kappa = torch.where(smin > 0, smax / smin.clamp_min(1e-300), torch.full_like(smax, math.inf))
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
    vjp = VJPAt(ys, z_req, spec)
    for i in range(iters):
        w = vjp(v)
        norm = torch.linalg.vector_norm(w, dim=1)
        if i >= iters // 2:
            logs.append(torch.log(norm.clamp_min(1e-300)))
        v = w / norm.clamp_min(1e-300)[:, None]
    return torch.exp(torch.stack(logs).mean(dim=0))
