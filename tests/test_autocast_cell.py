"""Mixed precision: AutocastCell (a low-precision cell, a float32 state) and DEQs under the
caller's autocast. The solvers' own low-precision tests are in test_solvers.py."""

from __future__ import annotations

import pytest
import torch

import phantomdeq as pdq


class Cell(torch.nn.Module):
    def __init__(self, d=24, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(d, d, generator=gen)
        self.lin = torch.nn.Linear(d, d)
        with torch.no_grad():
            self.lin.weight.copy_(0.7 * w / torch.linalg.matrix_norm(w, 2))

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_cell_runs_f_in_low_precision_and_returns_the_state_dtype(dtype):
    seen = []

    class Probe(Cell):
        def forward(self, z, x):
            pre = self.lin(z)
            seen.append(pre.dtype)
            return torch.tanh(pre + x)

    cell = pdq.AutocastCell(Probe(), dtype=dtype)
    z = torch.zeros(3, 24)
    out = cell(z, torch.randn(3, 24))
    assert seen == [dtype] and out.dtype == torch.float32
    # tuple states: each part back to its own dtype
    two = pdq.AutocastCell(_TupleCell(Probe()), dtype=dtype)
    a, b = two((torch.zeros(3, 24), torch.zeros(3, 24, dtype=torch.float64)), torch.randn(3, 24))
    assert a.dtype == torch.float32 and b.dtype == torch.float64


class _TupleCell(torch.nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def forward(self, z, x):
        return (self.cell(z[0], x), self.cell(z[1].float(), x))


def test_autocast_cell_options_are_validated():
    with pytest.raises(TypeError, match="AutocastCell: f must be a torch.nn.Module"):
        pdq.AutocastCell(lambda z, x: z)
    with pytest.raises(TypeError, match="AutocastCell: dtype must be a torch.dtype"):
        pdq.AutocastCell(Cell(), dtype="bf16")
    with pytest.raises(ValueError, match="AutocastCell: dtype must be one of"):
        pdq.AutocastCell(Cell(), dtype=torch.float64)
    with pytest.raises(ValueError, match="AutocastCell: device_type must be"):
        pdq.AutocastCell(Cell(), device_type="tpu")


@pytest.mark.parametrize("est", ["upg", "ift", "bptt"])
def test_deq_under_an_outer_autocast_keeps_a_float32_state(est):
    """Before, Anderson's mixing ran in bf16 under the caller's autocast and the DEQ raised
    "f output has dtype torch.bfloat16, expected torch.float32"."""
    grad = {
        "upg": pdq.UPG(k=3, lam=0.5),
        "ift": pdq.IFT(solver=pdq.Anderson(max_iter=40, tol=1e-3)),
        "bptt": pdq.BPTT(),
    }[est]
    solver = pdq.FixedPoint(max_iter=60, tol=1e-2) if est == "bptt" else pdq.Anderson(tol=1e-2)
    cell = pdq.AutocastCell(Cell())
    deq = pdq.DEQ(cell, solver=solver, grad=grad)
    x = torch.randn(4, 24, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, info = deq(torch.zeros(4, 24), x)
        loss = z.square().sum()
    assert info.result == "converged" and z.dtype == torch.float32
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # close to the float32 model's gradient (bf16 cell: a few percent)
    x32 = x.detach().clone().requires_grad_()
    deq32 = pdq.DEQ(
        cell.f, solver=pdq.Anderson(max_iter=60, tol=1e-6), grad=pdq.IFT(solver=pdq.Anderson())
    )
    z32, _ = deq32(torch.zeros(4, 24), x32)
    z32.square().sum().backward()
    assert pdq.diagnostics.cosine_similarity(x.grad, x32.grad) > 0.98
