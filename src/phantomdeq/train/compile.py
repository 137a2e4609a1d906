"""``train.compile: true``: the model through ``torch.compile``, in place.

Compiled in place (:meth:`torch.nn.Module.compile`), so parameter names, ``state_dict`` keys and
checkpoints are those of the eager model. The cell of every :class:`~phantomdeq.DEQ` inside is
compiled on its own as well: a solve with a convergence test (``tol > 0``) runs its loop
eagerly (see :meth:`phantomdeq.SolverBase.__call__`), and there the cell stays compiled; a
fixed-budget solve (``tol = 0``) is traced whole into the model's graph.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from phantomdeq.deq import DEQ

__all__ = ["compile_model"]


def compile_model(net: nn.Module, **options: Any) -> nn.Module:
    """Compile ``net`` and the cells of its DEQs in place (``options`` go to
    ``torch.compile``, e.g. ``backend``); returns ``net``."""
    for module in net.modules():
        if isinstance(module, DEQ) and isinstance(module.f, nn.Module):
            module.f.compile(**options)
    net.compile(**options)
    return net
