"""The paper's synthetic implicit layer (Sec. 3, "Precision of the Phantom Gradient", Fig. 1).

``F(h, x) = σ(W h + U x + b)``: a single layer whose ``W`` is spectrally normalised so that the
Lipschitz constant of ``F`` in ``h`` is ``L_h`` (0.9 in the paper). With an activation whose
Lipschitz constant is ``c`` (tanh, relu: 1; sigmoid: 1/4), ``W`` is rescaled to
``‖W‖₂ = L_h / c``, hence ``‖F(h) − F(h')‖ ≤ c ‖W‖₂ ‖h − h'‖ = L_h ‖h − h'‖`` and the fixed point
``h* = F(h*, x)`` of eq. (1) is unique and reached by fixed-point iteration (eq. 10).

With ``batch=B`` the module holds ``B`` independent problems (weights of shape ``[B, ...]``) and
sample ``i`` of a batch is evaluated with problem ``i``; this lets an experiment draw many
problems and solve them all at once.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from phantomdeq._validate import check_bool, check_choice, check_float, check_int
from phantomdeq.nn.norms import spectral_norm

__all__ = ["ACTIVATIONS", "SyntheticF"]

#: activation name -> (function, Lipschitz constant)
ACTIVATIONS: dict[str, tuple[object, float]] = {
    "tanh": (torch.tanh, 1.0),
    "sigmoid": (torch.sigmoid, 0.25),
    "relu": (torch.relu, 1.0),
}


class SyntheticF(nn.Module):
    """``F(h, x) = σ(W h + U x + b)`` with ``‖W‖₂`` set so that ``F`` is ``lipschitz``-Lipschitz in ``h``.

    Args:
        hidden: dimension ``d_h`` of ``h``.
        input_dim: dimension ``d_x`` of ``x``.
        lipschitz: Lipschitz constant ``L_h`` of ``F`` in ``h``; must lie in ``(0, 1)`` so that
            ``F`` is a contraction (Sec. 2.1).
        activation: ``"tanh"`` (default), ``"sigmoid"`` or ``"relu"``.
        batch: ``None`` for one problem (weights ``[d_h, d_h]``...), or ``B`` for ``B``
            independent problems (weights ``[B, d_h, d_h]``...; inputs must then have batch ``B``).
        trainable_norm: keep the spectral-norm parametrization (``W`` is re-normalised at every
            access and gradients reach the raw weight, as when training). By default the
            normalisation is applied once at construction, so the parameters ``θ = (W, U, b)``
            are plain tensors with ``‖W‖₂ = L_h / c`` exactly — the setting of Fig. 1.
        bias_std: standard deviation of the initial ``b``.
        generator: random generator for the initialisation (``W, U`` i.i.d. normal).
        dtype: parameter dtype (float64 recommended for gradient-precision experiments).
    """

    def __init__(
        self,
        hidden: int,
        input_dim: int,
        *,
        lipschitz: float = 0.9,
        activation: str = "tanh",
        batch: int | None = None,
        trainable_norm: bool = False,
        bias_std: float = 0.1,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        owner = "SyntheticF"
        check_int("hidden", hidden, minimum=1, owner=owner)
        check_int("input_dim", input_dim, minimum=1, owner=owner)
        if batch is not None:
            check_int("batch", batch, minimum=1, owner=owner)
        lipschitz = check_float(
            "lipschitz", lipschitz, owner=owner, low=0.0, high=1.0, low_open=True, high_open=True
        )
        check_choice("activation", activation, tuple(ACTIVATIONS), owner=owner)
        check_float("bias_std", bias_std, owner=owner, low=0.0)
        check_bool("trainable_norm", trainable_norm, owner=owner)
        self.hidden, self.input_dim = int(hidden), int(input_dim)
        self.batch = None if batch is None else int(batch)
        self.lipschitz = lipschitz
        self.activation = activation
        self._act, act_lip = ACTIVATIONS[activation]
        lead = () if batch is None else (int(batch),)
        w = torch.randn(*lead, hidden, hidden, generator=generator, dtype=dtype)
        u = torch.randn(*lead, hidden, input_dim, generator=generator, dtype=dtype)
        b = torch.randn(*lead, hidden, generator=generator, dtype=dtype)
        self.weight = nn.Parameter(w / math.sqrt(hidden))
        self.input_weight = nn.Parameter(u / math.sqrt(input_dim))
        self.bias = nn.Parameter(b * bias_std)
        # ‖F(h) − F(h')‖ ≤ c ‖W‖₂ ‖h − h'‖  ⇒  ‖W‖₂ = L_h / c gives Lipschitz constant L_h.
        spectral_norm(
            self, "weight", lipschitz=lipschitz / act_lip, exact=True, batch_dims=len(lead)
        )
        if not trainable_norm:
            parametrize.remove_parametrizations(self, "weight", leave_parametrized=True)

    def forward(self, h: Tensor, x: Tensor) -> Tensor:
        """Evaluate ``F(h, x)`` for ``h: [N, d_h]`` and ``x: [N, d_x]`` (``N = batch`` if batched)."""
        if h.dim() != 2 or h.shape[-1] != self.hidden:
            raise ValueError(f"h must have shape [N, {self.hidden}], got {tuple(h.shape)}")
        if x.dim() != 2 or x.shape[-1] != self.input_dim or x.shape[0] != h.shape[0]:
            raise ValueError(
                f"x must have shape [{h.shape[0]}, {self.input_dim}], got {tuple(x.shape)}"
            )
        if self.batch is None:
            pre = nn.functional.linear(h, self.weight, self.bias) + x @ self.input_weight.T
        else:
            if h.shape[0] != self.batch:
                raise ValueError(
                    f"h must have batch {self.batch} (one sample per problem), got {h.shape[0]}"
                )
            pre = (
                torch.einsum("bij,bj->bi", self.weight, h)
                + torch.einsum("bij,bj->bi", self.input_weight, x)
                + self.bias
            )
        return self._act(pre)  # type: ignore[operator]

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden}, input_dim={self.input_dim}, lipschitz={self.lipschitz}, "
            f"activation={self.activation!r}, batch={self.batch}"
        )
