"""Small float64 problems shared by the core tests."""

from __future__ import annotations

import torch
from torch import nn


class SmallCell(nn.Module):
    """A contractive cell F(z, x) with a tensor state (B, 6) or a tuple state ((B, 2, 3), (B, 4)).

    tensor: F(z, x) = tanh(W z + U x + b)
    tuple:  F((a, c), x) = (tanh(W1 a + P c + U x), tanh(W2 c + Q a)), parts coupled both ways.
    """

    def __init__(
        self, tuple_state: bool, *, dx: int = 3, scale: float = 0.6, seed: int = 0
    ) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)

        def mat(n: int, m: int, s: float = scale) -> nn.Parameter:
            w = torch.randn(n, m, generator=gen, dtype=torch.float64)
            return nn.Parameter(s * w / torch.linalg.matrix_norm(w, 2))

        self.tuple_state = tuple_state
        if tuple_state:
            self.W1 = mat(6, 6)
            self.P = mat(6, 4, 0.3)
            self.W2 = mat(4, 4)
            self.Q = mat(4, 6, 0.3)
            self.U = mat(6, dx, 1.0)
        else:
            self.W = mat(6, 6)
            self.U = mat(6, dx, 1.0)
        self.b = nn.Parameter(0.1 * torch.randn(6, generator=gen, dtype=torch.float64))

    def forward(self, z, x):
        if self.tuple_state:
            a, c = z
            af = a.flatten(1)
            na = torch.tanh(af @ self.W1.T + c @ self.P.T + x @ self.U.T + self.b)
            nc = torch.tanh(c @ self.W2.T + af @ self.Q.T)
            return (na.reshape(a.shape), nc)
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)

    def z0(self, batch: int):
        if self.tuple_state:
            return (
                torch.zeros(batch, 2, 3, dtype=torch.float64),
                torch.zeros(batch, 4, dtype=torch.float64),
            )
        return torch.zeros(batch, 6, dtype=torch.float64)


def make_problem(tuple_state: bool, batch: int = 3, seed: int = 0):
    cell = SmallCell(tuple_state, seed=seed)
    gen = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(batch, 3, dtype=torch.float64, generator=gen).requires_grad_()
    return cell, x


def state_target(z, seed: int = 7):
    """A fixed random cotangent with the structure of z (loss = <target, z>)."""
    gen = torch.Generator().manual_seed(seed)
    if isinstance(z, tuple):
        return tuple(torch.randn(t.shape, dtype=t.dtype, generator=gen) for t in z)
    return torch.randn(z.shape, dtype=z.dtype, generator=gen)


def inner(z, t):
    if isinstance(z, tuple):
        return sum((a * b).sum() for a, b in zip(z, t))
    return (z * t).sum()
