"""The state streams each solver makes per iteration (benchmarks/_streams.py, the counts
benchmarks/state_passes.py turns into its floor): the counter against operations of known
traffic, and the solvers against the counts their docstrings and BENCHMARKS.md state."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import phantomdeq as pdq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _streams import StreamCounter, count_solve  # noqa: E402

B, D = 2, 4096  # D far above any small per-sample matrix (max_iter² entries), so they count 0


def test_the_counter_counts_reads_and_writes_of_whole_states():
    x, y = torch.randn(B, D), torch.randn(B, D)
    hist = torch.randn(B, 5, D)
    buf = torch.empty(B, D)
    counter = StreamCounter(B * D)
    with counter:
        torch.sub(x, y, out=buf)  # read 2, write 1
        counter.mark()
        buf.copy_(x)  # read 1, write 1
        counter.mark()
        torch.linalg.vector_norm(x, dim=1)  # read 1 (the (B,) result counts 0)
        counter.mark()
        buf.add_(x)  # in place: read 2, write 1
        counter.mark()
        torch.bmm(hist[:, 0:1], hist.transpose(1, 2))  # a row (1) and 5 slots, small result
        counter.mark()
        torch.baddbmm(x.unsqueeze(1), torch.ones(B, 1, 5), hist)  # read 1 + 5, write 1
        counter.mark()
        hist[:, 2].view(B, 64, 64).transpose(1, 2)  # views: nothing moves
        torch.empty(B, 3, D)  # an allocation: nothing moves
        counter.mark()
        f = counter.paused(lambda t: t * 2.0)
        f(x)  # paused (an f evaluation): not counted, and it opens a segment
    assert counter.segments == [3.0, 2.0, 1.0, 3.0, 6.0, 7.0, 0.0, 0.0, 0.0]


def _problem(batch: int = 1):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(batch, D, dtype=torch.float64, generator=gen)
    c = torch.randn(batch, D, dtype=torch.float64, generator=gen)

    def f(z):  # elementwise, contractive, nonlinear: no solver reaches 0 within the budget
        return 0.9 * torch.tanh(w * z + c)

    return f, torch.zeros(batch, D, dtype=torch.float64)


def _per_iteration(solver) -> list[float]:
    """Streams after each evaluation of f but the last (setup and the final record apart), with
    a batch of one, so that the tracker never selects the best iterate per sample (a
    ``torch.where`` over the state, 3 streams, in an iteration where some samples improved
    and others did not)."""
    f, z0 = _problem()
    counter = count_solve(solver, f, z0)
    return counter.segments[1:-1]


def test_fixed_point_streams_five_states_per_iteration():
    # diff = f(x) - x (3), |diff| (1), |x| (1); the next x is f(x) itself
    got = _per_iteration(pdq.FixedPoint(max_iter=10, tol=0.0))
    assert got == [5.0] * 9


def test_anderson_streams_17_states_per_iteration_with_5_slots():
    # [G, Y] = [f(x) - x, f(x)] (4), Gram row over the n slots (n + 1), |x| (1), mixing over the
    # n image slots into the next x (n + 1): 2n + 7, 17 once the 5 slots are full. After the
    # first evaluation (n = 1) the next x is a copy of the image slot (2): 4 + 2 + 1 + 2 = 9
    got = _per_iteration(pdq.Anderson(max_iter=12, tol=0.0, m=5))
    n = [min(k + 1, 5) for k in range(11)]
    assert got == [9.0] + [2.0 * k + 7 for k in n[1:]]


def test_broyden_full_memory_streams_2j_plus_11_states_at_iteration_j():
    # after evaluation 0: r_0 into its slot (3), |r_0| and |x_0| (2), x_1 = x_0 + r_0 (3): 8.
    # iteration j: r_{j+1} = f(x) - x into its slot (3), one product of r_{j+1} with the j + 2
    # stored residuals (j + 3), |x| (1), x + Σ c_l r_l over the j + 2 residuals (j + 4)
    got = _per_iteration(pdq.Broyden(max_iter=14, tol=0.0))
    assert got == [8.0] + [2.0 * j + 11 for j in range(12)]


@pytest.mark.parametrize("memory", [None, 3])
def test_broyden_last_evaluation_and_setup(memory):
    # setup: the flat copy of z0 (read 1, write 1); after the last evaluation: its residual
    # (3) and the two norms (2), no new step
    f, z0 = _problem()
    counter = count_solve(pdq.Broyden(max_iter=8, tol=0.0, memory=memory), f, z0)
    assert len(counter.segments) == 9
    assert counter.segments[0] == 2.0
    assert counter.segments[-1] == 5.0
