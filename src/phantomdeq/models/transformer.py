"""The explicit causal Transformer language model: the DEQ-LM's baseline.

``L`` distinct pre-norm blocks of the DEQ cell's width, heads and MLP ratio (each block has
exactly the DEQ cell's parameters), between the same embedding and head as
:class:`~phantomdeq.models.deq_lm.DEQTransformerLM`::

    z_0     = drop(LN_in(E[idx] + P[t]))
    z_{l+1} = h + drop(MLP_l(LN2_l(h))),  h = z_l + drop(Attn_l(LN1_l(z_l)))
    logits  = Linear(LN_f(z_L))

``forward(idx)`` returns the same :class:`~phantomdeq.models.lm_layers.LMOutput` with
``info=None`` (no solver: the trainer logs no solver statistics).
"""

from __future__ import annotations

from torch import Tensor, nn

from phantomdeq._validate import check_float, check_int

from .lm_layers import (
    Block,
    LanguageModel,
    LMHead,
    LMOutput,
    TokenEmbedding,
    check_lm_sizes,
    check_tokens,
    init_lm_weights,
)

__all__ = ["TransformerLM", "build"]


class TransformerLM(LanguageModel):
    """An explicit causal pre-norm Transformer language model with ``layers`` blocks.

    Args:
        vocab_size: tokens in the vocabulary.
        layers: the number of distinct blocks ``L``.
        width: the feature size.
        heads: attention heads (``width`` divisible by ``heads``).
        context: the longest input (learned position embeddings).
        mlp_ratio: the MLP's hidden width is ``mlp_ratio * width``.
        dropout: ordinary dropout on the embedding and on every attention and MLP output.
        tie_weights: the head's weight is the token embedding's.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        layers: int = 4,
        width: int = 128,
        heads: int = 4,
        context: int = 64,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        tie_weights: bool = False,
    ) -> None:
        super().__init__()
        owner = "TransformerLM"
        check_lm_sizes(owner, vocab_size, width, heads, context, mlp_ratio)
        check_int("layers", layers, minimum=1, owner=owner)
        check_float("dropout", dropout, owner=owner, low=0.0, high=1.0, high_open=True)
        if not isinstance(tie_weights, bool):
            raise TypeError(f"{owner}: tie_weights must be True or False, got {tie_weights!r}")
        self.vocab_size = vocab_size
        self.width = width
        self.heads = heads
        self.context = context
        self.embed = TokenEmbedding(vocab_size, width, context, dropout)
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio, dropout=lambda: nn.Dropout(dropout))
            for _ in range(layers)
        )
        self.head = LMHead(width, vocab_size, self.embed.tok if tie_weights else None)
        init_lm_weights(self, num_blocks=layers)

    def forward(self, idx: Tensor) -> LMOutput:
        """Next-token logits ``[B, T, vocab_size]`` for tokens ``idx`` ``[B, T]``, ``T <=
        context`` (``info`` is None)."""
        z = self.embed(check_tokens("TransformerLM", idx, self.context))
        for block in self.blocks:
            z = block(z, z)
        return LMOutput(logits=self.head(z), state=z)


build = TransformerLM
"""The factory for ``model.target`` (the class itself: the trainer passes the options its
signature names, ``vocab_size`` from the data)."""
