"""Activation memory held by the autograd graph of each estimator, counted exactly with
saved-tensor hooks (bytes of every tensor autograd saves for the backward pass)."""

from __future__ import annotations

import torch
from torch import nn

import phantomdeq as pdq


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, z, x):
        return torch.tanh(self.c2(torch.relu(self.c1(z))) * 0.3 + x)


def saved_bytes(estimator) -> int:
    torch.manual_seed(0)
    cell = _Conv()
    x = torch.randn(2, 4, 8, 8)
    deq = pdq.DEQ(cell, solver=pdq.FixedPoint(max_iter=15, tol=0.0), grad=estimator)
    seen: dict[int, int] = {}

    def pack(t):
        seen[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z, _ = deq(torch.zeros_like(x), x)
    # parameters are not activations
    params = {id(p) for p in cell.parameters()}
    return sum(b for i, b in seen.items() if i not in params)


def test_upg_memory_grows_with_k_and_checkpoint_keeps_only_step_inputs():
    state = 2 * 4 * 8 * 8 * 4
    plain = [saved_bytes(pdq.UPG(k=k, lam=0.5)) for k in (1, 2, 4, 8)]
    ckpt = [saved_bytes(pdq.UPG(k=k, lam=0.5, checkpoint=True)) for k in (1, 2, 4, 8)]
    per_step = plain[1] - plain[0]
    assert per_step > 4 * state  # conv activations of one step (the 16-channel hidden layer)
    assert plain[3] - plain[2] == 4 * per_step  # linear in k
    ckpt_step = ckpt[1] - ckpt[0]
    assert ckpt_step <= 2 * state  # a checkpointed step keeps its input state only
    assert ckpt[3] < plain[3] / 4


def test_implicit_estimators_memory_does_not_grow_with_k():
    npg = [saved_bytes(pdq.NPG(k=k, lam=0.5)) for k in (1, 10)]
    assert npg[0] == npg[1]
    one = saved_bytes(pdq.OneStep())
    ift = saved_bytes(pdq.IFT())
    assert ift == one == npg[0]
    bptt = saved_bytes(pdq.BPTT())
    assert bptt > 10 * one  # every forward iteration is recorded
