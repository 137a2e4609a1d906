"""Keeping the profiler's native log lines off stderr.

``torch.profiler`` (libkineto) writes lines such as ``USDT:2026-11-27 21:26:37 31955:31955
SyncActivityProfilerHandler.cpp:52] profiler_start`` straight to file descriptor 2, where no
Python-level setting (``KINETO_LOG_LEVEL`` does not cover them) reaches, and c10 warns there
about blocks allocated before profiling and freed during it. :func:`without_profiler_noise`
sends descriptor 2 to a temporary file while its block runs and then writes back every line
that is not such a log line, so warnings and errors still reach the user.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

__all__ = ["NOISE", "without_profiler_noise"]

#: a libkineto log line (severity tag, timestamp, pid:tid, source file and line), or c10's
#: warning that a block allocated before profiling was freed during it -- expected here: such
#: frees carry no size and are left out of the peak on purpose (``cpu_peak_memory``)
NOISE = re.compile(
    r"^(USDT|STAGE|INFO|LOG):\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ \S+\.cpp:\d+\] "
    r"|^\[W\d{4} [\d:.]+ \S*CPUAllocator\.cpp:\d+\] Memory block of unknown size was allocated "
    r"before the profiling started"
)


@contextlib.contextmanager
def without_profiler_noise() -> Iterator[None]:
    """Run the block with file descriptor 2 captured; replay all but the profiler's log lines
    on stderr afterwards (also when the block raises)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", errors="replace")
            kept = [line for line in text.splitlines(keepends=True) if not NOISE.match(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
