"""Model-ready batches ``(x, y)`` on a device for explicit lists of sample indices.

:class:`BatchLoader` takes the index batches a trainer has already drawn (its per-epoch order,
sharded over ranks) and yields normalised inputs in the model dtype. Three kinds of data set:

* **in-memory tensors** (``images``/``labels`` tensors and ``normalize``: digits, MNIST,
  CIFAR-10): each batch is a slice of the tensors, moved to the device and normalised there.
  No ``DataLoader``: slicing a few hundred small images costs microseconds, far less than
  handing them to worker processes and collating them back (measured in
  ``benchmarks/loader_throughput.py``); their augmentation is batched on the device by the
  trainer (:func:`phantomdeq.data.augment_batch`).
* **streaming** (a ``load(index, seed) -> (uint8 image, label)`` method and ``normalize``, e.g.
  :class:`~phantomdeq.data.imagefolder.ImageFolderDataset`): a ``torch.utils.data.DataLoader``
  decodes and transforms items in ``num_workers`` processes (persistent across epochs, with
  prefetching and pinned memory when the device is CUDA); ``uint8`` batches travel to the
  device, where they are normalised.
* **computed** (a ``batch(index, *, epoch, seed) -> (x, y)`` method, e.g. the text windows of
  :class:`~phantomdeq.data.text.TextWindows`): each batch is computed in this process from the
  index tensor (and, in training, the epoch and seed).
* anything else indexable with ``dataset[i] -> (x, y)``: a plain ``DataLoader``.

Inputs: ``x`` is returned in the requested dtype, except ``int64``/``int32`` inputs (token
ids), which keep their dtype (ids cast to float would break embeddings and lose exactness above
2^24).

Reproducibility: with ``epoch`` given, item ``i`` is loaded with the seed ``(seed, epoch, i)``
(:func:`item_seed`), sent along with the index, so its random transform does not depend on
which worker decodes it, on ``num_workers``, on the batch it falls in or on where in the epoch a
resumed run starts. Without ``epoch`` items get no seed (the deterministic eval transform).

Errors: a :class:`~phantomdeq.data.errors.DataError` raised while loading an item (a truncated
image, say) reaches the caller as a ``DataError`` with the item's one-line message, also when it
happens in a worker process (``DataLoader`` would otherwise re-raise it with the worker's
traceback folded into a multi-line message).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import DataError

__all__ = ["BatchLoader", "item_seed"]

_MASK64 = (1 << 64) - 1


def item_seed(seed: int, epoch: int, index: int) -> tuple[int, int, int]:
    """The seed of sample ``index`` in ``epoch`` of a run seeded ``seed``: non-negative ints for
    ``numpy.random.default_rng`` (whose ``SeedSequence`` mixes them)."""
    return (int(seed) & _MASK64, int(epoch) & _MASK64, int(index) & _MASK64)


#: input dtypes that hold indices (token ids), never cast to the model dtype
INDEX_DTYPES = (torch.int64, torch.int32)


def _as_input(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` in the model dtype, except index inputs (``int64``/``int32`` token ids), which keep
    their dtype (``uint8`` images are cast as before)."""
    return x if x.dtype in INDEX_DTYPES else x.to(dtype)


class _Failure:
    """A :class:`DataError` carried out of a worker as data (its one-line message)."""

    def __init__(self, message: str) -> None:
        self.message = message


class _Items(Dataset[Any]):
    """``(index, seed)`` -> ``dataset.load(index, seed)``, with data errors returned as values."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, tuple[int, int, int] | None]) -> Any:
        index, seed = key
        try:
            return self.dataset.load(index, seed)
        except DataError as exc:
            return _Failure(str(exc))


def _collate(items: list[Any]) -> tuple[Tensor, Tensor] | _Failure:
    for item in items:
        if isinstance(item, _Failure):
            return item
    images = torch.stack([x for x, _ in items])
    labels = torch.tensor([y for _, y in items], dtype=torch.long)
    return images, labels


class _EpochBatches(Sampler[list[Any]]):
    """The batch sampler of a persistent ``DataLoader``: the current pass's keyed batches."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []

    def __iter__(self) -> Iterator[list[Any]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _index_lists(batches: Sequence[Tensor | Sequence[int]]) -> list[list[int]]:
    out = []
    for b in batches:
        out.append(b.tolist() if isinstance(b, Tensor) else [int(i) for i in b])
    return out


class BatchLoader:
    """Batches of a data set for explicit index lists (see the module docstring).

    Args:
        dataset: in-memory tensor, streaming or plain indexable data set.
        num_workers: ``DataLoader`` worker processes for streaming/plain data sets (0: load in
            this process). Ignored for in-memory tensors.
        prefetch_factor: batches each worker prepares ahead.
        persistent_workers: keep the workers between passes (epochs, evaluations).
        pin_memory: page-locked batches for asynchronous copies; default: when the device of
            :meth:`iterate` is CUDA.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        persistent_workers: bool = True,
        pin_memory: bool | None = None,
    ) -> None:
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
            raise ValueError(f"BatchLoader: num_workers must be an int >= 0, got {num_workers!r}")
        if not isinstance(prefetch_factor, int) or prefetch_factor < 1:
            raise ValueError(
                f"BatchLoader: prefetch_factor must be an int >= 1, got {prefetch_factor!r}"
            )
        self.dataset = dataset
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.persistent_workers = persistent_workers
        self.pin_memory = pin_memory
        images = getattr(dataset, "images", None)
        labels = getattr(dataset, "labels", None)
        self.tensors = isinstance(images, Tensor) and isinstance(labels, Tensor)
        self.computed = not self.tensors and callable(getattr(dataset, "batch", None))
        self.streaming = (
            not self.tensors and not self.computed and callable(getattr(dataset, "load", None))
        )
        self._sampler = _EpochBatches()
        self._loader: DataLoader[Any] | None = None
        self._loader_pinned = False

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def kind(self) -> str:
        """``"tensors"``, ``"computed"``, ``"streaming"`` or ``"plain"``."""
        if self.tensors or self.computed:
            return "tensors" if self.tensors else "computed"
        return "streaming" if self.streaming else "plain"

    def _data_loader(self, pin: bool) -> DataLoader[Any]:
        if self._loader is not None and self._loader_pinned == pin:
            return self._loader
        self.close()
        workers = self.num_workers
        extra: dict[str, Any] = {}
        if workers > 0:
            extra = {
                "persistent_workers": self.persistent_workers,
                "prefetch_factor": self.prefetch_factor,
            }
        source: Dataset[Any] = _Items(self.dataset) if self.streaming else self.dataset
        self._loader = DataLoader(
            source,
            batch_sampler=self._sampler,
            num_workers=workers,
            collate_fn=_collate if self.streaming else None,
            pin_memory=pin,
            # a DataLoader draws its workers' base seed when an iterator starts: from a private
            # generator it leaves the global torch RNG (dropout, probes) untouched, so a resumed
            # run's random streams match the uninterrupted run's
            generator=torch.Generator().manual_seed(0),
            **extra,
        )
        self._loader_pinned = pin
        return self._loader

    def iterate(
        self,
        batches: Sequence[Tensor | Sequence[int]],
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        *,
        epoch: int | None = None,
        seed: int = 0,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield model-ready ``(x, y)`` on ``device`` (``x`` in ``dtype``) for each batch of
        indices. ``epoch`` (with the run's ``seed``) turns on seeded per-item transforms of
        streaming data sets; in-memory tensors are returned as stored (normalised).

        Raises:
            DataError: an item could not be loaded (one line naming its file).
        """
        device = torch.device(device)
        if self.tensors:
            yield from self._iterate_tensors(batches, device, dtype)
            return
        if self.computed:
            for idx in batches:
                index = idx if isinstance(idx, Tensor) else torch.as_tensor(idx, dtype=torch.long)
                x, y = self.dataset.batch(index, epoch=epoch, seed=seed)
                yield _as_input(x.to(device, non_blocking=True), dtype), y.to(device)
            return
        lists = _index_lists(batches)
        if self.streaming:
            for pos, b in enumerate(lists):
                if not b:
                    raise ValueError(f"BatchLoader.iterate: batch {pos} is empty")
            self._sampler.batches = [
                [(i, None if epoch is None else item_seed(seed, epoch, i)) for i in b]
                for b in lists
            ]
        else:
            self._sampler.batches = lists
        pin = self.pin_memory if self.pin_memory is not None else device.type == "cuda"
        normalize = getattr(self.dataset, "normalize", None) if self.streaming else None
        failure: str | None = None
        for batch in self._data_loader(bool(pin)):
            if isinstance(batch, _Failure):
                failure = batch.message
                break
            x, y = batch
            x = x.to(device, non_blocking=True)
            y = torch.as_tensor(y).to(device, non_blocking=True)
            if callable(normalize):
                x = normalize(x)
            yield _as_input(x, dtype), y
        if failure is not None:
            # the pass cannot go on: stop the workers now rather than whenever the traceback
            # that would keep them referenced is collected
            self.close()
            raise DataError(failure)

    def _iterate_tensors(
        self, batches: Sequence[Tensor | Sequence[int]], device: torch.device, dtype: torch.dtype
    ) -> Iterator[tuple[Tensor, Tensor]]:
        images: Tensor = self.dataset.images
        labels: Tensor = self.dataset.labels
        normalize = getattr(self.dataset, "normalize", None)
        for idx in batches:
            index = idx if isinstance(idx, Tensor) else torch.as_tensor(idx, dtype=torch.long)
            x = images[index].to(device, non_blocking=True)
            y = labels[index].to(device, non_blocking=True)
            x = normalize(x) if callable(normalize) else x
            yield _as_input(x, dtype), y

    def close(self) -> None:
        """Drop the ``DataLoader``; its worker processes stop once no pass still runs (they
        are started again by the next :meth:`iterate`)."""
        self._loader = None
