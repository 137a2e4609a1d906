"""DEQ-Transformer character language model: one weight-tied pre-norm block solved to its
fixed point.

Structure::

    x      = drop(LN_in(E[idx] + P[t]))            # injection [B, T, width], computed once
    z*     = f(z*, x)                              # pdq.DEQ: any solver + gradient estimator
    logits = Linear(LN_f(z*))                      # [B, T, vocab]

The cell is the explicit model's pre-norm block (:class:`~phantomdeq.models.lm_layers.Block`,
``block(z, base) = h + vdrop(MLP(LN2(h)))``, ``h = base + vdrop(Attn(LN1(z)))``, causal
attention) with the injection entering at every iteration, in one of two forms (``form=``):

* ``"postnorm"`` (default): ``f(z, x) = LN_out(block(u, base=u))``, ``u = z + x`` -- the
  pre-norm block applied to the state plus the injection (attention and MLP read
  ``LN(z + x)``), its output normalised, as the DEQ-Transformer of Bai et al. (2019) keeps its
  state normalised. The state lies on a bounded set (the LayerNorm's output), so a fixed
  point exists; ``∂f/∂z`` is the block's Jacobian ``I + ∂Δ`` scaled by ``γ_out / rms(v)`` of
  the un-normalised output ``v``, which contracts while the injection keeps ``rms(v)`` above
  the gains.
* ``"injected"``: ``f(z, x) = block(z, base=x) = x + Δ(z)`` -- the residual stream restarts
  from the injection at every iteration and ``Δ`` (attention and MLP behind LayerNorms) sees
  the state only through LayerNorms: bounded (every fixed point lies within ``sup‖Δ‖`` of
  ``x``) and, with small output projections, strongly contractive at initialisation.

In a short single-seed check on Tiny Shakespeare (width 128, context 64, AdamW, UPG(5, 0.5),
Anderson) ``postnorm`` learned faster than ``injected``, whose forward iterations also rose
faster; once trained, neither is a contraction by construction. ``norm="spectral"`` bounds
each linear map's spectral norm (it kept the iterations low there, learning slower);
``jac_reg=True`` returns the Jacobian regulariser.

Both forms are causal: attention is causal, everything else acts per position, and the 1-d
variational dropout mask is one per (sequence, feature), shared by all positions and by every
evaluation of ``f`` in a solve (:class:`~phantomdeq.nn.VariationalDropout1d`). The state is
kept as ``[B, T, width]``; solver statistics are per sequence (``info.converged``,
``info.nstep``, ``info.rel_residual`` of shape ``[B]``). Causality of the *solve*: every
evaluation of ``f`` is causal, so a fixed-budget fixed-point iteration
(``FixedPoint(max_iter=n, tol=0)``) is exactly causal while its residual falls at every step
(a solver returns each sequence's lowest-residual iterate, chosen by the whole sequence's
residual: at the rounding floor that choice, too, couples positions); a solver that mixes
iterates with per-sequence coefficients (Anderson, Broyden) or stops a sequence by its whole
residual couples positions at the level of its tolerance (the equilibrium itself is causal). Every gradient
estimator back-propagates through ``f`` alone and is exactly causal given the solution.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from phantomdeq._validate import check_choice, check_float, check_int
from phantomdeq.deq import DEQ
from phantomdeq.grad import UPG
from phantomdeq.grad.base import GradientEstimator
from phantomdeq.grad.correction import Correction
from phantomdeq.nn.dropout import VariationalDropout1d
from phantomdeq.nn.jacobian import jacobian_frobenius_hutchinson
from phantomdeq.nn.norms import spectral_norm, weight_norm
from phantomdeq.precision import AutocastCell
from phantomdeq.solvers import Anderson
from phantomdeq.solvers.base import Solver

from .lm_layers import (
    NORMS,
    Block,
    LanguageModel,
    LMHead,
    LMOutput,
    TokenEmbedding,
    check_lm_sizes,
    check_tokens,
    init_lm_weights,
)

__all__ = ["FORMS", "DEQLMCell", "DEQTransformerLM", "build"]

_MODES = ("deq", "unrolled")
FORMS = ("postnorm", "injected")
"""The forms of the equilibrium map (``form=``); the first is the default."""


class DEQLMCell(nn.Module):
    """The equilibrium map ``f(z, x)`` on ``[B, T, width]`` states, of one of two forms
    (:data:`FORMS`; the module docstring explains both):

    * ``"postnorm"``: ``f(z, x) = LN_out(block(u, base=u))``, ``u = z + x``;
    * ``"injected"``: ``f(z, x) = block(z, base=x) = x + Δ(z)``.

    Call :meth:`reset` before each solve: it samples the 1-d variational dropout masks (one per
    sequence and feature) that every evaluation of ``f`` in that solve shares.
    """

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: int,
        *,
        form: str = "postnorm",
        var_dropout: float = 0.0,
        norm: str = "none",
        lipschitz: float = 1.0,
    ) -> None:
        super().__init__()
        self.form = check_choice("form", form, FORMS, owner="DEQLMCell")
        self.block = Block(
            width,
            heads,
            mlp_ratio,
            dropout=lambda: VariationalDropout1d(var_dropout, channels_last=True),
        )
        self.ln_out = nn.LayerNorm(width) if form == "postnorm" else None
        self.norm = norm
        self.lipschitz = lipschitz

    def normalize_weights(self) -> None:
        """Apply :attr:`norm` to the block's linear layers (after initialisation)."""
        for lin in self.block.linears():
            if self.norm == "weight":
                weight_norm(lin, dim=0)
            elif self.norm == "spectral":
                spectral_norm(lin, lipschitz=self.lipschitz, mode="bound")

    def reset(self, like: Tensor, *, generator: torch.Generator | None = None) -> None:
        """Sample new dropout masks for states shaped like ``like`` (no-op in eval mode)."""
        for m in (self.block.drop1, self.block.drop2):
            if isinstance(m, VariationalDropout1d):
                m.reset(like, generator=generator)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        if self.ln_out is None:
            return self.block(z, x)
        u = z + x
        return self.ln_out(self.block(u, u))


class DEQTransformerLM(LanguageModel):
    """A DEQ-Transformer character language model (see the module docstring for the map).

    Args:
        vocab_size: tokens in the vocabulary.
        width: the state's feature size (embedding width).
        heads: attention heads (``width`` must be divisible by ``heads``).
        context: the longest input (learned position embeddings).
        mlp_ratio: the MLP's hidden width is ``mlp_ratio * width``.
        form: the equilibrium map, ``"postnorm"`` (default) or ``"injected"`` (:data:`FORMS`).
        dropout: ordinary dropout on the injection (computed once per forward pass).
        var_dropout: 1-d variational dropout inside the cell on the attention and MLP outputs
            (one mask per sequence and feature, shared across positions and solver iterations).
        norm: ``"none"``, ``"weight"`` (weight normalisation) or ``"spectral"`` (each linear
            map's spectral norm bounded by ``lipschitz``; power iteration advanced once per
            training forward pass) on the cell's linear layers.
        lipschitz: the spectral-norm bound with ``norm="spectral"``.
        tie_weights: the head's weight is the token embedding's.
        solver: the forward solver (default ``Anderson(max_iter=30, tol=1e-3)``).
        grad: the gradient estimator (default ``UPG(k=5, lam=0.5)``).
        eval_solver: an optional solver for eval mode.
        correction: fixed-point correction (:class:`phantomdeq.Correction`), or None.
        on_nonfinite: the DEQ's policy for sequences whose iterate turns inf/NaN (``"raise"``,
            or ``"warn"``: isolate them and keep the rest).

    Attributes:
        embed: the token + position embedding (the injection).
        deq: the :class:`phantomdeq.DEQ` around the cell.
        head: final LayerNorm and the linear map to the vocabulary.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        width: int = 128,
        heads: int = 4,
        context: int = 64,
        mlp_ratio: int = 4,
        form: str = "postnorm",
        dropout: float = 0.0,
        var_dropout: float = 0.0,
        norm: str = "none",
        lipschitz: float = 1.0,
        tie_weights: bool = False,
        solver: Solver | None = None,
        grad: GradientEstimator | None = None,
        eval_solver: Solver | None = None,
        correction: Correction | None = None,
        on_nonfinite: str = "raise",
    ) -> None:
        super().__init__()
        owner = "DEQTransformerLM"
        check_lm_sizes(owner, vocab_size, width, heads, context, mlp_ratio)
        check_float("dropout", dropout, owner=owner, low=0.0, high=1.0, high_open=True)
        check_float("var_dropout", var_dropout, owner=owner, low=0.0, high=1.0, high_open=True)
        check_choice("form", form, FORMS, owner=owner)
        check_choice("norm", norm, NORMS, owner=owner)
        check_float("lipschitz", lipschitz, owner=owner, low=0.0, low_open=True)
        if not isinstance(tie_weights, bool):
            raise TypeError(f"{owner}: tie_weights must be True or False, got {tie_weights!r}")
        self.vocab_size = vocab_size
        self.width = width
        self.heads = heads
        self.context = context
        self.embed = TokenEmbedding(vocab_size, width, context, dropout)
        cell = DEQLMCell(
            width,
            heads,
            mlp_ratio,
            form=form,
            var_dropout=var_dropout,
            norm=norm,
            lipschitz=lipschitz,
        )
        self.head = LMHead(width, vocab_size, self.embed.tok if tie_weights else None)
        init_lm_weights(self, num_blocks=1)
        init_lm_weights(cell, num_blocks=1)  # not yet registered: self.deq owns it below
        cell.normalize_weights()
        self.deq = DEQ(
            cell,
            solver=Anderson(max_iter=30, tol=1e-3) if solver is None else solver,
            grad=UPG(k=5, lam=0.5) if grad is None else grad,
            eval_solver=eval_solver,
            correction=correction,
            on_nonfinite=on_nonfinite,
        )

    @property
    def f(self) -> DEQLMCell:
        """The equilibrium cell (owned by :attr:`deq`)."""
        cell = self.deq.f
        if not isinstance(cell, DEQLMCell):
            raise TypeError(f"DEQTransformerLM.f: expected a DEQLMCell, got {type(cell).__name__}")
        return cell

    def inject(self, idx: Tensor) -> Tensor:
        """The injection ``x`` ``[B, T, width]`` of tokens ``idx`` ``[B, T]``."""
        return self.embed(check_tokens("DEQTransformerLM", idx, self.context))

    def initial_state(self, x: Tensor) -> Tensor:
        """Zeros shaped like the injection, in the cell's parameter dtype."""
        dtype = next(self.f.parameters()).dtype
        return x.new_zeros(x.shape, dtype=dtype)

    def forward(
        self,
        idx: Tensor,
        *,
        generator: torch.Generator | None = None,
        z0: Tensor | None = None,
        mode: str = "deq",
        unrolled_steps: int = 0,
        jac_reg: bool = False,
    ) -> LMOutput:
        """Next-token logits ``[B, T, vocab_size]`` for tokens ``idx`` ``[B, T]``, ``T <=
        context``, with the solve's :class:`~phantomdeq.Solution` as ``info``.

        ``generator`` drives the variational dropout masks; ``z0`` starts the solve (a
        ``[B, T, width]`` state, default zeros); ``mode="unrolled"`` applies ``f``
        ``unrolled_steps`` times from zeros with plain autograd (a weight-tied pre-training
        stage; ``info`` is None); ``jac_reg=True`` adds the Hutchinson estimate of
        ``||∂f/∂z||_F^2 / numel(z)`` at the final state. Under ``torch.autocast`` ``f`` runs
        in :class:`~phantomdeq.AutocastCell` and the state stays in the parameters' dtype.
        """
        check_choice("mode", mode, _MODES, owner="DEQTransformerLM.forward")
        x = self.inject(idx)
        start = self.initial_state(x)
        if z0 is not None:
            if not isinstance(z0, Tensor) or z0.shape != start.shape or z0.dtype != start.dtype:
                raise ValueError(
                    f"DEQTransformerLM.forward: z0 must be a tensor of shape "
                    f"{tuple(start.shape)} and dtype {start.dtype}, got "
                    f"{getattr(z0, 'shape', type(z0).__name__)}"
                )
            start = z0
        self.f.reset(start, generator=generator)
        device_type = x.device.type
        amp = torch.is_autocast_enabled(device_type)
        cell: nn.Module = self.f
        deq = self.deq
        if amp:
            cell = AutocastCell(
                cell, dtype=torch.get_autocast_dtype(device_type), device_type=device_type
            )
            deq = self.deq.with_cell(cell)
        info = None
        with torch.autocast(device_type, enabled=False) if amp else contextlib.nullcontext():
            if mode == "unrolled":
                check_int("unrolled_steps", unrolled_steps, minimum=1, owner="DEQTransformerLM")
                z = start
                for _ in range(unrolled_steps):
                    z = cell(z, x)
            else:
                z, info = deq(start, x)
            jac_loss = self._jac_loss(cell, z, x) if jac_reg else None
        logits = self.head(z)
        out = LMOutput(logits=logits, info=info, jac_loss=jac_loss, state=z)
        if info is not None and info.states is not None and info.state_weights is not None:
            out.state_logits = [*(self.head(s) for s in info.states[:-1]), logits]
            out.state_weights = list(info.state_weights)
        return out

    def _jac_loss(self, cell: nn.Module, z: Tensor, x: Tensor) -> Tensor:
        track = torch.is_grad_enabled() and self.training
        # the regulariser's gradient differentiates a vector-Jacobian product: second order,
        # which the fused CPU attention kernels lack; the math kernel has it
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            zs = z.detach().requires_grad_(True)
            fz = cell(zs, x if track else x.detach())
            loss = jacobian_frobenius_hutchinson(fz, zs, 1, create_graph=track)
        return loss if track else loss.detach()


build = DEQTransformerLM
"""The factory for ``model.target`` (the class itself: the trainer passes the options its
signature names, ``vocab_size`` from the data)."""
