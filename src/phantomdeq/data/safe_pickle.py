"""A restricted unpickler for the CIFAR-10 python batches.

``pickle.load`` calls whatever global a file names, so a planted ``data_batch_1`` whose
``__reduce__`` returns ``(os.system, ("...",))`` runs a command. The real batches
(``cifar-10-python.tar.gz``, written by Python 2's cPickle with protocol 2) hold a dict of
``str`` keys (read back as ``bytes`` with ``encoding="bytes"``), a list of ``int`` labels, a
list of ``str`` file names, a ``str`` batch label and one ``uint8`` numpy array. Containers and
strings are pickle opcodes that need no global; the array needs exactly three:

* ``numpy.core.multiarray._reconstruct`` (``numpy._core.multiarray._reconstruct`` when a
  NumPy >= 2 writes the file) -- creates the empty array,
* ``numpy.ndarray`` -- the class passed to it,
* ``numpy.dtype`` -- the element type, restored with its ``__setstate__``.

A batch re-pickled by Python 3 at protocol 2 (``pickle.dump(batch, f, protocol=2)``) has no
byte-string opcode and writes every ``bytes`` value (the array's data, byte-string keys) as
``_codecs.encode(text, "latin1")`` and an empty one as ``__builtin__.bytes()``. These two are
admitted as well, but not as themselves: ``_codecs.encode`` resolves to a function that accepts
a ``str`` and the encoding ``"latin1"`` only (the one the pickler writes: it maps each character
to one byte, running no codec but Latin-1's), and ``bytes`` to one that accepts no argument and
returns ``b""``. Neither can reach any other callable.

:class:`RestrictedUnpickler` resolves only these (to the objects of the installed NumPy, never by
importing the module the file names) and refuses every other global with a :class:`DataError`
naming the file and the global. Object dtypes are refused as well: an array of Python objects
would unpickle its elements through the same gate, but a CIFAR-10 batch never holds one.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import DataError, one_line

__all__ = ["ALLOWED_GLOBALS", "RestrictedUnpickler", "load_restricted"]

_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1, dtype=np.uint8))[0]


def _plain_dtype(*args: Any) -> np.dtype[Any]:
    dt = np.dtype(*args)
    if dt.hasobject:
        raise pickle.UnpicklingError(f"object dtype {dt!r} is not allowed")
    return dt


def _latin1_bytes(*args: Any) -> bytes:
    """``_codecs.encode(text, "latin1")`` as Python 3's protocol-2 pickler writes ``bytes``."""
    if len(args) != 2 or not isinstance(args[0], str) or args[1] != "latin1":
        raise pickle.UnpicklingError(
            f"_codecs.encode is allowed only as encode(str, 'latin1'), got "
            f"{len(args)} argument(s) {tuple(type(a).__name__ for a in args)}"
        )
    return args[0].encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    """``bytes()`` as Python 3's protocol-2 pickler writes ``b""``."""
    if args:
        raise pickle.UnpicklingError(
            f"bytes is allowed only as bytes(), got {len(args)} argument(s)"
        )
    return b""


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _plain_dtype,
    ("_codecs", "encode"): _latin1_bytes,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
}
"""The ``(module, name)`` globals a CIFAR-10 batch may reference, and what they resolve to."""


class _Forbidden(pickle.UnpicklingError):
    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.qualname = f"{module}.{name}"


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` admits only :data:`ALLOWED_GLOBALS`."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _Forbidden(module, name) from None


def load_restricted(path: str | Path, what: str = "file") -> Any:
    """Unpickle ``path`` (``encoding="bytes"``, as the Python 2 batches need) through
    :class:`RestrictedUnpickler`.

    Raises:
        DataError: the file names a forbidden global (the message names the file and the
            global) or is not a readable pickle.
    """
    path = Path(path)
    fh: IO[bytes]
    with open(path, "rb") as fh:
        try:
            return RestrictedUnpickler(fh, encoding="bytes").load()
        except _Forbidden as exc:
            allowed = ", ".join(sorted({f"{m}.{n}" for m, n in ALLOWED_GLOBALS}))
            raise DataError(
                f"{path}: refusing to load this {what}: it references the global "
                f"{exc.qualname!r}, which is not allowed (allowed: {allowed})"
            ) from None
        except Exception as exc:  # malformed pickles raise many types
            raise DataError(
                f"{path}: not a readable pickled {what}: {type(exc).__name__}: {one_line(exc)}"
            ) from exc
