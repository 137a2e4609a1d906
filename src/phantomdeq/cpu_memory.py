"""Keep freed CPU tensor memory in the process instead of handing it back to the kernel.

PyTorch's CPU tensors come from the C library's ``malloc``. With glibc, a block larger than
the mmap threshold (128 KiB, growing up to 32 MiB with use) is a fresh ``mmap`` that is
unmapped when the tensor dies, so the next tensor of that size costs one page fault per 4 KiB
page touched (the kernel zero-fills each page). A DEQ's forward solve allocates and frees
states and the cell's activations every iteration, each several MiB: on the development
machine's 2 cores, 18 evaluations of the MDEQ-Tiny cell at batch 64 took 2.29 s, 1.34 s of it
in the kernel serving 357,216 page faults (``benchmarks/cpu_memory.py``,
``benchmarks/results/cpu_memory.json``).

:func:`retain_cpu_memory` sets glibc's ``M_MMAP_MAX`` to 0 (every block from the heap) and
``M_TRIM_THRESHOLD`` to its largest value (free memory is kept for reuse), the effect of
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` in the environment, applied at run time. The
process's resident memory then stays at its peak, as with a GPU caching allocator. The
``phantomdeq`` command applies it at start (``PHANTOMDEQ_CPU_MEMORY=system`` keeps the C
library's defaults); a library user calls it once, early, where it pays.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
#: glibc's defaults for them (the threshold is dynamic until set; this is its start value)
_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}
_RETAIN = {_M_TRIM_THRESHOLD: 2**31 - 1, _M_MMAP_MAX: 0}

#: environment variable read by the ``phantomdeq`` command, and its allowed values
ENV_VAR = "PHANTOMDEQ_CPU_MEMORY"
ENV_VALUES = ("retain", "system")


def _glibc() -> ctypes.CDLL | None:
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def retain_cpu_memory(enable: bool = True) -> bool:
    """Keep freed CPU memory in the process (``enable=True``) or hand it back as glibc does by
    default (``enable=False``; the mmap threshold then stays at 128 KiB instead of adapting).
    Process-wide, for allocations made afterwards.

    Returns True when the setting was applied, False where it cannot be (not glibc: macOS,
    Windows, musl), in which case nothing changed.
    """
    libc = _glibc()
    if libc is None:
        return False
    settings = _RETAIN if enable else _DEFAULTS
    return all(libc.mallopt(param, value) == 1 for param, value in settings.items())


def minor_page_faults() -> int:
    """Minor page faults of this process so far (``getrusage``): the count that
    :func:`retain_cpu_memory` brings to about zero in a steady training or solving loop
    (0 where ``getrusage`` does not exist, e.g. Windows)."""
    try:
        import resource
    except ImportError:
        return 0
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def cpu_memory_from_env(environ: dict[str, str] | None = None) -> str:
    """The policy named by ``PHANTOMDEQ_CPU_MEMORY`` (``retain`` when unset).

    Raises:
        ValueError: naming the variable and the allowed values, for any other value.
    """
    value = (os.environ if environ is None else environ).get(ENV_VAR, "retain").strip().lower()
    if value not in ENV_VALUES:
        raise ValueError(
            f"{ENV_VAR}={value!r} is not allowed; allowed values: {', '.join(ENV_VALUES)}"
        )
    return value
