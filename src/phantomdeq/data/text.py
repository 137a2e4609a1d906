"""Character-level text corpora for language modelling (e.g. Tiny Shakespeare).

:func:`load_text` reads any UTF-8 text file into a :class:`CharVocab` (its sorted unique
characters) and two ``torch.long`` token tensors: the first ``train_fraction`` (90 %) of the
characters for training, the rest for validation -- the split of the well-known
character-level setups. :class:`TextBatches` draws random ``(batch, context)`` windows from a
split with targets shifted by one, driven by its own ``torch.Generator`` whose state is saved
and restored with the run (:meth:`TextBatches.state_dict`), so a resumed run draws the same
batches as an uninterrupted one. :func:`sequential_batches` sweeps a split in consecutive
windows (a deterministic evaluation).

For a trainer that draws index batches (:mod:`phantomdeq.train`), :func:`load_text_dataset`
gives two :class:`TextWindows` data sets: the training split as ``train_size`` random windows
per epoch, drawn afresh each epoch from ``(seed, epoch)``, and the validation split as
consecutive non-overlapping windows (a fixed evaluation), with a :class:`TextInfo` description
(``vocab_size``, ``context``, the vocabulary) that a model factory reads its sizes from.

The vocabulary is saved with a run (:meth:`CharVocab.to_dict`, a JSON-able dict) and given
back to :func:`load_text` on resume: a corpus whose characters differ is refused. Every
problem raises :class:`~phantomdeq.data.DataError` (one line naming the file or option); a
missing file raises its subclass :class:`~phantomdeq.data.DataFileNotFoundError`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import DataError, DataFileNotFoundError

__all__ = [
    "CharVocab",
    "TextBatches",
    "TextCorpus",
    "TextInfo",
    "TextWindows",
    "load_text",
    "load_text_dataset",
    "read_text",
    "sequential_batches",
]

VOCAB_KIND = "char"
"""The ``kind`` entry of :meth:`CharVocab.to_dict`."""


def _shown(chars: str, limit: int = 20) -> str:
    """Characters as a short, one-line list (``'a', '\\n', ...``)."""
    items = [repr(c) for c in chars[:limit]]
    return ", ".join(items) + (", ..." if len(chars) > limit else "")


class CharVocab:
    """A character vocabulary: token ``i`` is the ``i``-th of the sorted unique characters.

    Args:
        chars: the characters, each a string of length one, unique and in sorted order (as
            :meth:`from_text` builds them).

    Two vocabularies are equal when they list the same characters in the same order (then
    they encode every text the same way).
    """

    def __init__(self, chars: Sequence[str]) -> None:
        items = list(chars)
        for c in items:
            if not isinstance(c, str) or len(c) != 1:
                raise DataError(f"CharVocab: every entry must be one character, got {c!r}")
        if not items:
            raise DataError("CharVocab: chars must not be empty")
        if items != sorted(set(items)):
            raise DataError("CharVocab: chars must be unique and sorted (CharVocab.from_text)")
        self.chars: tuple[str, ...] = tuple(items)
        self._index = {c: i for i, c in enumerate(items)}

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        """The vocabulary of ``text``'s characters (``text`` must not be empty)."""
        if not text:
            raise DataError("CharVocab.from_text: the text is empty")
        return cls(sorted(set(text)))

    @property
    def size(self) -> int:
        """The number of tokens."""
        return len(self.chars)

    def __len__(self) -> int:
        return len(self.chars)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CharVocab):
            return NotImplemented
        return self.chars == other.chars

    def __hash__(self) -> int:
        return hash(self.chars)

    def __repr__(self) -> str:
        return f"CharVocab(size={self.size})"

    def encode(self, text: str, *, where: str = "text") -> Tensor:
        """``text`` as a ``torch.long`` tensor of token ids; a character outside the vocabulary
        raises :class:`DataError` naming it and ``where``."""
        index = self._index
        try:
            ids = [index[c] for c in text]
        except KeyError:
            unknown = "".join(sorted(set(text) - set(index)))
            raise DataError(
                f"{where}: characters not in the vocabulary of {self.size}: {_shown(unknown)}"
            ) from None
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        """The text of token ids (a 1-d tensor or a sequence of ints)."""
        seq = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        try:
            return "".join(self.chars[int(i)] for i in seq)
        except IndexError:
            bad = [int(i) for i in seq if not 0 <= int(i) < self.size]
            raise DataError(
                f"CharVocab.decode: token ids {bad[:5]} are outside [0, {self.size})"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description (``{"kind": "char", "chars": [...]}``) for the run folder."""
        return {"kind": VOCAB_KIND, "chars": list(self.chars)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "vocab") -> CharVocab:
        """The vocabulary saved by :meth:`to_dict`; a malformed entry raises :class:`DataError`
        naming ``where`` and the field."""
        if not isinstance(data, Mapping):
            raise DataError(f"{where}: expected a mapping, got {type(data).__name__}")
        if data.get("kind") != VOCAB_KIND:
            raise DataError(f"{where}.kind: expected {VOCAB_KIND!r}, got {data.get('kind')!r}")
        chars = data.get("chars")
        if not isinstance(chars, list):
            raise DataError(f"{where}.chars: expected a list of characters, got {chars!r}")
        try:
            return cls(chars)
        except DataError as e:
            raise DataError(f"{where}.chars: {e}") from None

    def check_same(self, other: CharVocab, *, where: str = "vocab") -> None:
        """Raise :class:`DataError` (naming ``where``) unless ``other`` equals this one;
        ``self`` is the saved vocabulary, ``other`` the one just read."""
        if other == self:
            return
        gone = "".join(sorted(set(self.chars) - set(other.chars)))
        new = "".join(sorted(set(other.chars) - set(self.chars)))
        parts = [f"{where}: vocabulary mismatch: saved {self.size} characters, found {other.size}"]
        if new:
            parts.append(f"new: {_shown(new)}")
        if gone:
            parts.append(f"missing: {_shown(gone)}")
        raise DataError("; ".join(parts))


@dataclass(frozen=True)
class TextCorpus:
    """A text split into training and validation tokens (see :func:`load_text`).

    Attributes:
        path: the file read.
        vocab: its character vocabulary.
        train: the first ``train_fraction`` of the tokens (``torch.long``, 1-d).
        val: the remaining tokens.
    """

    path: Path
    vocab: CharVocab
    train: Tensor
    val: Tensor

    @property
    def vocab_size(self) -> int:
        """The number of tokens of :attr:`vocab`."""
        return self.vocab.size

    @property
    def num_chars(self) -> int:
        """Characters in the corpus (both splits)."""
        return int(self.train.numel() + self.val.numel())


def read_text(path: str | Path) -> str:
    """The UTF-8 text of ``path``; a missing, unreadable, empty or non-UTF-8 file raises
    :class:`DataError` naming it."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"text corpus {str(p)!r}: is a directory, not a text file")
    if not p.is_file():
        raise DataFileNotFoundError(f"text corpus {str(p)!r}: file not found")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DataError(f"text corpus {str(p)!r}: cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"text corpus {str(p)!r}: not UTF-8 text (byte {e.start}: {e.reason})"
        ) from None
    if not text:
        raise DataError(f"text corpus {str(p)!r}: the file is empty")
    return text


def load_text(
    path: str | Path,
    *,
    train_fraction: float = 0.9,
    vocab: CharVocab | Mapping[str, Any] | None = None,
) -> TextCorpus:
    """Read a UTF-8 text file into a :class:`TextCorpus`.

    Args:
        path: the text file (any UTF-8 file; Tiny Shakespeare's ``input.txt`` for the study).
        train_fraction: the share of the characters, from the start, in the training split;
            the rest (from the end) is the validation split. Both splits must be non-empty.
        vocab: the vocabulary saved with a run (a :class:`CharVocab` or its
            :meth:`~CharVocab.to_dict`), when resuming: the file's characters must be exactly
            that vocabulary's, else :class:`DataError` ("vocabulary mismatch"). None: the
            file's own vocabulary.

    Raises:
        DataError: missing file (:class:`DataFileNotFoundError`), empty file, non-UTF-8 file,
            ``train_fraction`` outside (0, 1) or leaving a split empty, vocabulary mismatch.
    """
    if isinstance(train_fraction, bool) or not isinstance(train_fraction, int | float):
        raise DataError(
            f"load_text: train_fraction must be a number in (0, 1), got {train_fraction!r}"
        )
    if not 0.0 < float(train_fraction) < 1.0:
        raise DataError(f"load_text: train_fraction must be in (0, 1), got {train_fraction!r}")
    text = read_text(path)
    found = CharVocab.from_text(text)
    if vocab is not None:
        saved = vocab if isinstance(vocab, CharVocab) else CharVocab.from_dict(vocab)
        saved.check_same(found, where=f"text corpus {str(path)!r}")
        found = saved
    data = found.encode(text, where=f"text corpus {str(path)!r}")
    n_train = int(len(data) * float(train_fraction))
    if n_train < 1 or n_train >= len(data):
        raise DataError(
            f"text corpus {str(path)!r}: {len(data)} characters leave an empty split with "
            f"train_fraction={train_fraction}"
        )
    return TextCorpus(Path(path), found, data[:n_train].clone(), data[n_train:].clone())


def _check_window(data: Tensor, batch_size: int, context: int, split: str) -> None:
    for name, v in (("batch_size", batch_size), ("context", context)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise DataError(f"{name} must be an integer >= 1, got {v!r}")
    if not isinstance(data, Tensor) or data.dim() != 1 or data.dtype != torch.long:
        raise DataError(f"the {split} split must be a 1-d torch.long tensor of token ids")
    if context + 1 > data.numel():
        raise DataError(
            f"context={context} is too long for the {split} split of {data.numel()} tokens "
            f"(a window needs context + 1 = {context + 1}); use context <= {data.numel() - 1}"
        )


class TextBatches:
    """Random windows of a token split: ``x`` ``[batch_size, context]`` and the targets ``y``,
    the same windows shifted by one token (``y[b, t] = data[s_b + t + 1]``).

    Args:
        data: a split's token ids (1-d ``torch.long``; ``TextCorpus.train``).
        batch_size: windows per batch.
        context: tokens per window (``context + 1 <= len(data)``, else :class:`DataError`).
        generator: draws the window starts (uniform over all ``len(data) - context``
            positions). Pass a seeded ``torch.Generator`` (CPU) for reproducible batches;
            default: a fresh one seeded with ``seed``.
        seed: the seed of the default generator.
        split: the split's name in error messages.

    Each :meth:`next` (also ``next(batches)``) draws one batch. :meth:`state_dict` holds the
    generator's state; :meth:`load_state_dict` restores it, so the batches after a resume are
    those an uninterrupted run would have drawn.
    """

    def __init__(
        self,
        data: Tensor,
        *,
        batch_size: int,
        context: int,
        generator: torch.Generator | None = None,
        seed: int = 0,
        split: str = "train",
    ) -> None:
        _check_window(data, batch_size, context, split)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise DataError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}"
            )
        if generator is not None and generator.device.type != "cpu":
            raise DataError(f"generator must be a CPU torch.Generator, got {generator.device}")
        self.data = data
        self.batch_size = batch_size
        self.context = context
        self.split = split
        self.generator = generator if generator is not None else torch.Generator()
        if generator is None:
            self.generator.manual_seed(int(seed))
        self._offsets = torch.arange(context + 1)

    @property
    def num_positions(self) -> int:
        """The number of distinct window starts."""
        return int(self.data.numel()) - self.context

    def next(self) -> tuple[Tensor, Tensor]:
        """One batch ``(x, y)``, both ``[batch_size, context]`` ``torch.long``."""
        starts = torch.randint(self.num_positions, (self.batch_size,), generator=self.generator)
        windows = self.data[starts[:, None] + self._offsets]
        return windows[:, :-1], windows[:, 1:]

    def __next__(self) -> tuple[Tensor, Tensor]:
        return self.next()

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self

    def state_dict(self) -> dict[str, Any]:
        """The generator's state (and the window shape, checked on load)."""
        return {
            "generator": self.generator.get_state(),
            "batch_size": self.batch_size,
            "context": self.context,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; a different ``batch_size`` or ``context`` raises
        :class:`DataError` naming it."""
        for name in ("batch_size", "context"):
            if state.get(name) != getattr(self, name):
                raise DataError(
                    f"TextBatches.load_state_dict: saved {name}={state.get(name)!r}, this "
                    f"sampler has {name}={getattr(self, name)!r}"
                )
        gen = state.get("generator")
        if not isinstance(gen, Tensor) or gen.dtype != torch.uint8:
            raise DataError("TextBatches.load_state_dict: generator must be a uint8 state tensor")
        self.generator.set_state(gen)


def sequential_batches(
    data: Tensor, *, batch_size: int, context: int, split: str = "val"
) -> Iterator[tuple[Tensor, Tensor]]:
    """Consecutive non-overlapping windows of ``data`` (``x`` and ``y`` shifted by one), in
    batches of at most ``batch_size``: every token of the split but the last partial window is
    predicted exactly once (a deterministic evaluation)."""
    _check_window(data, batch_size, context, split)
    n = (int(data.numel()) - 1) // context
    starts = torch.arange(n) * context
    offsets = torch.arange(context + 1)
    for i in range(0, n, batch_size):
        windows = data[starts[i : i + batch_size, None] + offsets]
        yield windows[:, :-1], windows[:, 1:]


# --- index-addressed windows for the trainer --------------------------------------------------


@dataclass(frozen=True)
class TextInfo:
    """What a model and trainer need to know about a text data set.

    Attributes:
        vocab_size: tokens in the vocabulary (a language model's input and output size).
        context: tokens per window (the longest input the model sees in training).
        vocab: the :class:`CharVocab` (saved with a run; needed to encode a prompt).
        name: the data set's name (``"text"``).
        num_chars: characters in the corpus (both splits).
    """

    vocab_size: int
    context: int
    vocab: CharVocab
    name: str = "text"
    num_chars: int = 0


class TextWindows:
    """A token split as a data set of ``len(self)`` windows of ``context`` tokens, addressed by
    index in batches (:meth:`batch`; :class:`phantomdeq.data.BatchLoader` calls it): ``x`` the
    window, ``y`` the same window shifted by one token.

    Args:
        data: a split's token ids (1-d ``torch.long``).
        context: tokens per window (``context + 1 <= len(data)``).
        size: the number of windows; default (None): as many non-overlapping windows as the
            split holds, ``(len(data) - 1) // context``.
        random: True: each epoch's windows start at ``size`` positions drawn uniformly (with
            replacement, as the well-known character-level setups sample) from a generator
            seeded with ``(seed, epoch)`` -- a new set every epoch, the same for the same
            epoch wherever a run resumes. False: window ``i`` is the ``i``-th of ``size``
            non-overlapping windows spread evenly over the split (all of them when ``size`` is
            None), the same at every call (an evaluation set).
        split: the split's name in error messages.
    """

    def __init__(
        self,
        data: Tensor,
        *,
        context: int,
        size: int | None = None,
        random: bool = False,
        split: str = "train",
    ) -> None:
        _check_window(data, 1, context, split)
        blocks = (int(data.numel()) - 1) // context
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise DataError(f"{split} windows: size must be None or an int >= 1, got {size!r}")
        if size is not None and not random and size > blocks:
            raise DataError(
                f"{split} windows: {size} requested but the split holds {blocks} "
                f"non-overlapping windows of {context} tokens; use at most {blocks} (or null)"
            )
        self.data = data
        self.context = context
        self.random = random
        self.split = split
        self.size = blocks if size is None else size
        self._offsets = torch.arange(context + 1)
        if not random:  # evenly spread non-overlapping blocks (all of them by default)
            picked = (torch.arange(self.size, dtype=torch.float64) * (blocks / self.size)).long()
            self._fixed = picked * context
        self._epoch_starts: tuple[tuple[int, int], Tensor] | None = None

    def __len__(self) -> int:
        return self.size

    def starts(self, epoch: int | None = None, seed: int = 0) -> Tensor:
        """The start position of every window (``[len(self)]``) in ``epoch`` (random
        windows; None: epoch 0)."""
        if not self.random:
            return self._fixed
        key = (int(seed), 0 if epoch is None else int(epoch))
        if self._epoch_starts is None or self._epoch_starts[0] != key:
            import numpy as np

            words = np.random.SeedSequence([key[0] % 2**64, key[1], 0x7E47]).generate_state(2)
            mixed = (int(words[0]) | int(words[1]) << 32) & (2**63 - 1)
            gen = torch.Generator().manual_seed(mixed)
            positions = int(self.data.numel()) - self.context
            self._epoch_starts = (key, torch.randint(positions, (self.size,), generator=gen))
        return self._epoch_starts[1]

    def batch(
        self, index: Tensor, *, epoch: int | None = None, seed: int = 0
    ) -> tuple[Tensor, Tensor]:
        """The windows ``index`` (``x``, ``y``: ``[len(index), context]`` ``torch.long``)."""
        s = self.starts(epoch, seed)[index]
        windows = self.data[s[:, None] + self._offsets]
        return windows[:, :-1], windows[:, 1:]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x, y = self.batch(torch.tensor([int(i)]))
        return x[0], y[0]


def load_text_dataset(
    path: str | Path,
    *,
    context: int,
    train_fraction: float = 0.9,
    train_size: int | None = None,
    test_size: int | None = None,
    vocab: CharVocab | Mapping[str, Any] | None = None,
) -> tuple[TextWindows, TextWindows, TextInfo]:
    """``(train, val, info)`` of a UTF-8 text file for a trainer: ``train`` draws
    ``train_size`` random windows per epoch (default: as many as the training split holds
    non-overlapping windows, i.e. about one pass over its tokens), ``val`` is ``test_size``
    evenly spread non-overlapping windows of the validation split (default: all of them).
    ``vocab``: the vocabulary saved with a run (a mismatch raises :class:`DataError`); see
    :func:`load_text` for the split and the other errors."""
    corpus = load_text(path, train_fraction=train_fraction, vocab=vocab)
    train = TextWindows(corpus.train, context=context, size=train_size, random=True)
    val = TextWindows(corpus.val, context=context, size=test_size, split="validation")
    info = TextInfo(corpus.vocab_size, context, corpus.vocab, "text", corpus.num_chars)
    return train, val, info
