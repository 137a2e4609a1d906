"""One pass over the state for a solver's residual, its inner products with the stored
residuals and ``|x|`` (CPU, float32/float64).

An Anderson or Broyden iteration forms ``r = g(x) - x`` into a history slot, takes the inner
products of ``r`` with the stored residuals and the norm of ``x`` (the tracker's relative
residual). In eager ATen these are three operations and three passes over ``r``-sized data
beside the history: the subtraction (read ``g(x)`` and ``x``, write ``r``), a batched product
(read ``r`` again and the history) and a norm (read ``x`` again). On the CPU, where a state of
a few MiB streams from memory once ``f`` has run, each pass costs a state's traffic.
:func:`residual_products` does it in one pass per sample: ``g(x)`` and ``x`` are read once, in
chunks that stay in the L1 cache while the chunk's residual is written and multiplied with the
same chunk of every stored residual. Streams per call: ``2 + (n - 1)`` reads and 1 write (2
with Anderson's image copy) instead of ``n + 6`` (``n + 7``).

The kernel is a few lines of C compiled once per machine with the system C compiler
(``cc -O3 -march=native -fopenmp``, the toolchain ``torch.compile`` uses on the CPU) into a
cache folder (``PHANTOMDEQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/phantomdeq``, else
``~/.cache/phantomdeq``), keyed by the source, the compiler and the CPU. Inner products
accumulate per chunk in the state's precision and across chunks in float64, one thread per
sample, so a sample's result does not depend on the thread count or on the other samples (a
sample turned non-finite reaches no other). Where the kernel cannot run — no C compiler, a
GPU tensor, another dtype, a non-contiguous operand, ``torch.compile`` tracing, or
``PHANTOMDEQ_NATIVE=0`` — :func:`residual_products` returns None and the solver takes its
eager ATen path (the same numbers to rounding).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

#: environment variable that turns the native kernel off (``0``) or on (``1``, the default)
ENV_VAR = "PHANTOMDEQ_NATIVE"
ENV_VALUES = ("0", "1")
#: environment variable naming the folder that holds the compiled kernel
CACHE_ENV_VAR = "PHANTOMDEQ_CACHE_DIR"

_SOURCE = r"""
#include <stdint.h>
#include <stddef.h>

/* For each sample b (one thread each): r = fx - x written to hist row `slot` (and fx to y when
   y is given), dots[b, i] = <r, hist row i> for i < n (row `slot`: <r, r>), xx[b] = <x, x>.
   Chunks of CHUNK elements: the chunk of r is reused from the L1 cache by the n products.
   Partial sums per chunk in the state's precision (vectorised), summed across chunks in
   double. Rows of sample b: fx + b*fs, x + b*xs, hist + b*hs + i*ss, y + b*ys; each row's
   D elements contiguous. */
#define CHUNK 512
#define KERNEL(NAME, T)                                                                       \
void NAME(int64_t B, int64_t D, int64_t n, int64_t slot, const T *fx, int64_t fs,           \
          const T *x, int64_t xs, T *hist, int64_t hs, int64_t ss, T *y, int64_t ys,         \
          double *dots, double *xx, int nthreads)                                             \
{                                                                                             \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                       \
    for (int64_t b = 0; b < B; ++b) {                                                         \
        const T *f = fx + b * fs, *xb = x + b * xs;                                           \
        T *r = hist + b * hs + slot * ss;                                                     \
        T *yb = y ? y + b * ys : NULL;                                                        \
        double *acc = dots + b * n;                                                           \
        double sx = 0.0;                                                                      \
        for (int64_t i = 0; i < n; ++i) acc[i] = 0.0;                                         \
        for (int64_t c0 = 0; c0 < D; c0 += CHUNK) {                                           \
            const int64_t c1 = c0 + CHUNK < D ? c0 + CHUNK : D;                               \
            T px = 0, pr = 0;                                                                 \
            _Pragma("omp simd reduction(+:px,pr)")                                            \
            for (int64_t d = c0; d < c1; ++d) {                                               \
                const T v = f[d] - xb[d];                                                     \
                r[d] = v;                                                                     \
                pr += v * v;                                                                  \
                px += xb[d] * xb[d];                                                          \
            }                                                                                 \
            if (yb) {                                                                         \
                _Pragma("omp simd")                                                           \
                for (int64_t d = c0; d < c1; ++d) yb[d] = f[d];                               \
            }                                                                                 \
            sx += (double)px;                                                                 \
            acc[slot] += (double)pr;                                                          \
            for (int64_t i = 0; i < n; ++i) {                                                 \
                if (i == slot) continue;                                                      \
                const T *h = hist + b * hs + i * ss;                                          \
                T p = 0;                                                                      \
                _Pragma("omp simd reduction(+:p)")                                            \
                for (int64_t d = c0; d < c1; ++d) p += r[d] * h[d];                           \
                acc[i] += (double)p;                                                          \
            }                                                                                 \
        }                                                                                     \
        xx[b] = sx;                                                                           \
    }                                                                                         \
}
KERNEL(residual_products_f32, float)
KERNEL(residual_products_f64, double)
"""

_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c99"]
_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib": the loaded library, or "error": why there is none


def enabled() -> bool:
    """False when ``PHANTOMDEQ_NATIVE=0`` (read at each call, so tests and users can switch)."""
    value = os.environ.get(ENV_VAR, "1").strip()
    if value not in ENV_VALUES:
        raise ValueError(f"{ENV_VAR}={value!r}: allowed values are {list(ENV_VALUES)}")
    return value == "1"


def _compiler() -> list[str] | None:
    cc = os.environ.get("CC", "").split()
    if cc and shutil.which(cc[0]):
        return cc
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    return None


def _cpu_id() -> str:
    """The CPU's model and instruction-set flags (``-march=native`` code runs only there)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def cache_dir() -> Path:
    """Where the compiled kernel is kept (see the module's docstring)."""
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "phantomdeq"


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang; or $CC) on PATH")
    version = subprocess.run(cc + ["--version"], capture_output=True, text=True, timeout=60)
    key = hashlib.sha256(
        "\n".join([_SOURCE, " ".join(cc + _FLAGS), version.stdout, _cpu_id()]).encode()
    ).hexdigest()[:20]
    folder = cache_dir()
    target = folder / f"residual_products-{key}.so"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            src = Path(tmp) / "residual_products.c"
            src.write_text(_SOURCE)
            out = Path(tmp) / target.name
            run = subprocess.run(
                cc + _FLAGS + ["-o", str(out), str(src)],
                capture_output=True,
                text=True,
                timeout=300,
            )
            if run.returncode != 0:
                raise RuntimeError(f"{cc[0]} failed: {run.stderr.strip()[:500]}")
            os.replace(out, target)  # atomic: another process sees the whole file or none
    lib = ctypes.CDLL(str(target))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for name in ("residual_products_f32", "residual_products_f64"):
        fn = getattr(lib, name)
        fn.argtypes = [i64, i64, i64, i64, ptr, i64, ptr, i64, ptr, i64, i64, ptr, i64, ptr]
        fn.argtypes += [ptr, ctypes.c_int]
        fn.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use (None where it cannot be built; the reason is
    :func:`unavailable_reason`). Thread-safe; a failed build is not retried in the process."""
    if "lib" in _state or "error" in _state:
        return _state.get("lib")  # type: ignore[return-value]
    with _lock:
        if "lib" not in _state and "error" not in _state:
            try:
                _state["lib"] = _build()
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                _state["error"] = str(exc)
    return _state.get("lib")  # type: ignore[return-value]


def unavailable_reason() -> str | None:
    """Why the native kernel is not used (None when it is available and enabled)."""
    if not enabled():
        return f"{ENV_VAR}=0"
    library()
    error = _state.get("error")
    return None if error is None else str(error)


@torch.library.custom_op("phantomdeq::residual_products", mutates_args={"hist", "y"})
def _residual_products_op(
    fx: Tensor, x: Tensor, hist: Tensor, slot: int, y: Tensor | None
) -> tuple[Tensor, Tensor]:
    # an operator (not a bare ctypes call) so that dispatch modes see it with its operands:
    # reads fx, x and the n rows of `hist` (the row `slot` is written), writes y
    lib = library()
    assert lib is not None
    b, d = fx.shape
    n = hist.shape[1]
    dots = torch.empty(b, n, dtype=torch.float64)
    xx = torch.empty(b, dtype=torch.float64)
    fn = lib.residual_products_f32 if fx.dtype == torch.float32 else lib.residual_products_f64
    fn(
        b,
        d,
        n,
        slot,
        fx.data_ptr(),
        fx.stride(0),
        x.data_ptr(),
        x.stride(0),
        hist.data_ptr(),
        hist.stride(0),
        hist.stride(1),
        None if y is None else y.data_ptr(),
        0 if y is None else y.stride(0),
        dots.data_ptr(),
        xx.data_ptr(),
        torch.get_num_threads(),
    )
    return dots.to(fx.dtype), xx.to(fx.dtype)


def _usable(fx: Tensor, x: Tensor, hist: Tensor, y: Tensor | None) -> bool:
    if fx.device.type != "cpu" or fx.dtype not in (torch.float32, torch.float64):
        return False
    if torch.compiler.is_compiling() or fx.requires_grad or x.requires_grad:
        return False
    if fx.dim() != 2 or x.shape != fx.shape or x.dtype != fx.dtype:
        return False
    if fx.stride(1) != 1 or x.stride(1) != 1:
        return False
    if hist.dim() != 3 or hist.dtype != fx.dtype or hist.device != fx.device:
        return False
    if hist.shape[0] != fx.shape[0] or hist.shape[2] != fx.shape[1] or hist.stride(2) != 1:
        return False
    if y is not None and (y.shape != fx.shape or y.dtype != fx.dtype or y.stride(1) != 1):
        return False
    return enabled() and library() is not None


def residual_products(
    fx: Tensor, x: Tensor, hist: Tensor, slot: int, y: Tensor | None = None
) -> tuple[Tensor, Tensor] | None:
    """Write ``hist[:, slot] = fx - x`` (and ``y = fx`` when given) and return ``(dots, xx)``:
    ``dots[b, i] = <hist[b, i], fx[b] - x[b]>`` for every row ``i`` of ``hist`` (``(B, n, D)``,
    row ``slot`` included: ``|r|²``) and ``xx[b] = |x[b]|²``, in ``fx``'s dtype; one pass per
    sample. None where the native kernel cannot run (the caller then computes the same with
    ATen operations). ``fx``, ``x``, ``y``: ``(B, D)``, ``hist``: ``(B, n, D)``, each contiguous
    along its last dimension (strided views of a history buffer are fine); ``hist[:, slot]``
    must not overlap ``fx``, ``x`` or ``y``."""
    if hist.dim() == 3 and not 0 <= slot < hist.shape[1]:
        raise ValueError(f"residual_products: slot {slot} outside the {hist.shape[1]} rows")
    if not _usable(fx, x, hist, y):
        return None
    return _residual_products_op(fx, x, hist, slot, y)


__all__ = [
    "CACHE_ENV_VAR",
    "ENV_VALUES",
    "ENV_VAR",
    "cache_dir",
    "enabled",
    "library",
    "residual_products",
    "unavailable_reason",
]

if sys.platform == "win32":  # no cc/-fopenmp toolchain assumed on Windows
    _state["error"] = "not built on Windows"
