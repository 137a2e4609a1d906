"""Layers shared by the character language models (:mod:`phantomdeq.models.deq_lm` and
:mod:`phantomdeq.models.transformer`): causal self-attention, the MLP, the pre-norm block, the
token + position embedding (the DEQ's injection), the output head, the output record and
sampling.

The block is one function of two arguments, ``block(z, base)``::

    h   = base + drop(Attn(LN1(z)))          # causal multi-head self-attention
    out = h    + drop(MLP(LN2(h)))           # GELU MLP of width mlp_ratio * width

The explicit Transformer calls it with ``base = z`` (the usual pre-norm residual block); the
DEQ cell calls it with ``base = x``, the injection, so ``f(z, x) = x + Δ(z)`` (see
:mod:`phantomdeq.models.deq_lm`). Both thereby have the same parameters per block.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phantomdeq._validate import check_float, check_int
from phantomdeq.solvers.base import Solution

__all__ = [
    "NORMS",
    "Block",
    "CausalSelfAttention",
    "LMHead",
    "LMOutput",
    "LanguageModel",
    "MLP",
    "TokenEmbedding",
    "check_lm_sizes",
    "check_tokens",
    "init_lm_weights",
    "sample_tokens",
]

NORMS = ("none", "weight", "spectral")
"""The weight normalisations of a block's linear layers (``norm=``)."""


@dataclass
class LMOutput:
    """Result of a language model's ``forward``.

    Attributes:
        logits: next-token scores ``[B, T, vocab_size]``.
        info: the DEQ solve's :class:`phantomdeq.Solution` (per-sequence fields of shape
            ``[B]``); None for the explicit Transformer and in ``mode="unrolled"``.
        jac_loss: the Hutchinson estimate of ``||∂f/∂z||_F^2 / numel(z)`` (``jac_reg=True``).
        state: the final state ``[B, T, width]`` (the DEQ's equilibrium, or the last block's
            output before the final LayerNorm).
        state_logits: under fixed-point correction, the logits of every supervised state,
            earliest first (the last is ``logits``); else None.
        state_weights: their loss weights (None without correction).
    """

    logits: Tensor
    info: Solution | None = None
    jac_loss: Tensor | None = None
    state: Tensor | None = None
    state_logits: list[Tensor] | None = None
    state_weights: list[float] | None = None


def check_lm_sizes(
    owner: str, vocab_size: int, width: int, heads: int, context: int, mlp_ratio: int
) -> None:
    """Validate the sizes shared by both models (``width`` divisible by ``heads``)."""
    for name, v in (
        ("vocab_size", vocab_size),
        ("width", width),
        ("heads", heads),
        ("context", context),
        ("mlp_ratio", mlp_ratio),
    ):
        check_int(name, v, minimum=1, owner=owner)
    if width % heads:
        raise ValueError(
            f"{owner}: width must be divisible by heads, got width={width}, heads={heads}"
        )


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention on ``[B, T, width]`` via
    :func:`torch.nn.functional.scaled_dot_product_attention` (``is_causal=True``): position
    ``t`` attends to positions ``<= t`` only."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        shape = (b, t, self.heads, c // self.heads)
        q, k, v = (u.view(shape).transpose(1, 2) for u in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    """``Linear(width, ratio * width) -> GELU -> Linear(ratio * width, width)``, per position."""

    def __init__(self, width: int, ratio: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, ratio * width)
        self.proj = nn.Linear(ratio * width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """The pre-norm Transformer block as a map of the state ``z`` and a residual base:
    ``h = base + drop1(Attn(LN1(z)))``, ``out = h + drop2(MLP(LN2(h)))``.

    ``drop1`` and ``drop2`` are the given modules (``nn.Dropout`` in the explicit model,
    :class:`~phantomdeq.nn.VariationalDropout1d` in the DEQ cell).
    """

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: int,
        *,
        dropout: Callable[[], nn.Module] = nn.Identity,
    ) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.drop1 = dropout()
        self.ln2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio)
        self.drop2 = dropout()

    def linears(self) -> list[nn.Linear]:
        """The block's linear layers (the ones ``norm=`` normalises)."""
        return [self.attn.qkv, self.attn.proj, self.mlp.fc, self.mlp.proj]

    def forward(self, z: Tensor, base: Tensor) -> Tensor:
        h = base + self.drop1(self.attn(self.ln1(z)))
        return h + self.drop2(self.mlp(self.ln2(h)))


class TokenEmbedding(nn.Module):
    """``drop(LN(E[idx] + P[t]))``: learned token and position embeddings, normalised per
    position (so the injection's scale does not follow the embeddings' scale), then ordinary
    dropout (outside any solve)."""

    def __init__(self, vocab_size: int, width: int, context: int, dropout: float) -> None:
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Embedding(context, width)
        self.ln = nn.LayerNorm(width)
        self.drop = nn.Dropout(dropout)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device)
        return self.drop(self.ln(self.tok(idx) + self.pos(pos)))


class LMHead(nn.Module):
    """Final LayerNorm and a bias-free linear map to the vocabulary, optionally tied to the
    token embedding (``tied``: the head's weight *is* the embedding's)."""

    def __init__(self, width: int, vocab_size: int, tied: nn.Embedding | None = None) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab_size, bias=False)
        if tied is not None:
            self.out.weight = tied.weight

    def forward(self, z: Tensor) -> Tensor:
        return self.out(self.ln(z))


def init_lm_weights(model: nn.Module, num_blocks: int) -> None:
    """GPT-style initialisation: linear and embedding weights ``N(0, 0.02)``, biases zero,
    the residual projections (``attn.proj``, ``mlp.proj``) ``N(0, 0.02 / sqrt(2 L))``."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            std = 0.02
            if name.endswith("attn.proj") or name.endswith("mlp.proj"):
                std = 0.02 / math.sqrt(2 * num_blocks)
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)


def check_tokens(owner: str, idx: object, context: int) -> Tensor:
    """``idx`` must be a ``[B, T]`` integer tensor with ``1 <= T <= context``."""
    if not isinstance(idx, Tensor):
        raise TypeError(f"{owner}: idx must be a Tensor, got {type(idx).__name__}")
    if idx.dim() != 2 or idx.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(
            f"{owner}: idx must be a [batch, length] integer tensor, got shape "
            f"{tuple(idx.shape)} dtype {idx.dtype}"
        )
    if not 1 <= idx.shape[1] <= context:
        raise ValueError(
            f"{owner}: idx has length {idx.shape[1]}; the model's context is {context} "
            f"(1 <= length <= context)"
        )
    return idx


@torch.no_grad()
def sample_tokens(
    model: nn.Module,
    idx: Tensor,
    tokens: int,
    *,
    context: int,
    vocab_size: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Append ``tokens`` sampled tokens to ``idx`` ``[B, T]`` (returns ``[B, T + tokens]``):
    each step runs ``model`` in eval mode on the last ``context`` tokens, divides the last
    position's logits by ``temperature``, keeps the ``top_k`` largest (all: None) and draws
    from the softmax with ``generator``. The model's train/eval mode is restored."""
    owner = f"{type(model).__name__}.generate"
    if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.shape[1] < 1:
        raise ValueError(f"{owner}: idx must be a [batch, length >= 1] integer tensor")
    check_int("tokens", tokens, minimum=0, owner=owner)
    temp = check_float("temperature", temperature, owner=owner, low=0.0, low_open=True)
    if top_k is not None:
        check_int("top_k", top_k, minimum=1, owner=owner)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{owner}: generator must be a torch.Generator or None")
    was_training = model.training
    model.eval()
    try:
        out = idx
        for _ in range(tokens):
            logits = model(out[:, -context:]).logits[:, -1, :].double() / temp
            if top_k is not None and top_k < vocab_size:
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            if generator is not None and generator.device != probs.device:
                nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(probs.device)
            else:
                nxt = torch.multinomial(probs, 1, generator=generator)
            out = torch.cat([out, nxt.to(out.dtype)], dim=1)
        return out
    finally:
        model.train(was_training)


class LanguageModel(nn.Module):
    """What the language models share: ``vocab_size``, ``context`` and :meth:`generate`
    (subclasses set both attributes and return an :class:`LMOutput` from ``forward(idx)``)."""

    vocab_size: int
    context: int

    def generate(
        self,
        idx: Tensor,
        tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``idx`` ``[B, T]`` followed by ``tokens`` sampled tokens (eval mode, no gradient;
        each step reads the last ``context`` tokens). ``top_k`` keeps only the ``k`` most
        likely tokens; ``generator`` makes the draw reproducible (:func:`sample_tokens`)."""
        return sample_tokens(
            self,
            idx,
            tokens,
            context=self.context,
            vocab_size=self.vocab_size,
            temperature=temperature,
            top_k=top_k,
            generator=generator,
        )
