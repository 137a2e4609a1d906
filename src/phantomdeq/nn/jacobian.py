"""Hutchinson estimate of the Jacobian Frobenius norm (Jacobian regularisation).

Bai et al. (2021, "Stabilizing equilibrium models by Jacobian regularization") add
``||dF/dh||_F^2`` at the fixed point ``h*`` of eq. (1) to the loss to keep ``F`` well
conditioned.  The squared Frobenius norm is estimated without forming the Jacobian via
Hutchinson's identity: for a random vector ``v`` with ``E[v v^T] = I``,

    E_v ||v^T J||_2^2 = trace(J J^T) = ||J||_F^2,

and ``v^T J`` is one vector-Jacobian product (reverse-mode autograd call).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from phantomdeq._validate import check_choice, check_int

__all__ = ["jacobian_frobenius_hutchinson"]

_DISTRIBUTIONS = ("gaussian", "rademacher")


def _as_tuple(x: Tensor | Sequence[Tensor], name: str) -> tuple[Tensor, ...]:
    if isinstance(x, Tensor):
        return (x,)
    if isinstance(x, Sequence) and len(x) > 0 and all(isinstance(t, Tensor) for t in x):
        return tuple(x)
    raise TypeError(f"jacobian_frobenius_hutchinson: {name} must be a Tensor or a tuple of Tensors")


def jacobian_frobenius_hutchinson(
    fz: Tensor | Sequence[Tensor],
    z: Tensor | Sequence[Tensor],
    n_samples: int = 1,
    *,
    create_graph: bool = True,
    distribution: str = "gaussian",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Unbiased estimate of ``||d fz / d z||_F^2 / numel(z)``.

    Args:
        fz: output(s) of a tracked evaluation ``F(z)`` (a tensor or tuple of tensors).
        z: the input(s) that ``fz`` was computed from; must require grad.
        n_samples: number of random probe vectors averaged.
        create_graph: keep the graph of the VJPs so the estimate can be backpropagated
            (needed when it is used as a training regulariser).
        distribution: ``"gaussian"`` (standard normal probes) or ``"rademacher"`` (+-1).
        generator: optional generator for the probe vectors (on the device of ``fz``).

    Returns:
        A scalar tensor: the mean over probes of ``||v^T J||^2`` divided by the total number of
        elements of ``z`` (summed over the tuple, batch included), as in MDEQ's regulariser.
    """
    check_int("n_samples", n_samples, minimum=1, owner="jacobian_frobenius_hutchinson")
    check_choice(
        "distribution", distribution, _DISTRIBUTIONS, owner="jacobian_frobenius_hutchinson"
    )
    fzs = _as_tuple(fz, "fz")
    zs = _as_tuple(z, "z")
    if not all(t.requires_grad for t in zs):
        raise ValueError("jacobian_frobenius_hutchinson: every tensor in z must require grad")
    numel = sum(t.numel() for t in zs)
    total = fzs[0].new_zeros(())
    for s in range(n_samples):
        vs = []
        for t in fzs:
            gen_device = generator.device if generator is not None else t.device
            if distribution == "gaussian":
                v = torch.randn(t.shape, generator=generator, device=gen_device, dtype=t.dtype)
            else:
                v = torch.randint(0, 2, t.shape, generator=generator, device=gen_device)
                v = v.to(t.dtype) * 2 - 1
            vs.append(v.to(t.device))
        vjps = torch.autograd.grad(
            fzs,
            zs,
            grad_outputs=vs,
            retain_graph=create_graph or s < n_samples - 1,
            create_graph=create_graph,
            allow_unused=True,
        )
        for g in vjps:
            if g is not None:
                total = total + g.pow(2).sum()
    return total / (n_samples * numel)
