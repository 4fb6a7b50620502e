"""numba, the kernels' decorators, float32 constants and the call wrapper."""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from torch import Tensor

try:
    import numba
except ImportError:  # the torch ops in ops.py run instead
    numba = None

from ..ops import GRAY_WEIGHTS

prange = numba.prange if numba else range  # (a global numba recognises as its parallel loop)

# float32 constants: with Python numbers numba would compute in float64, at half the vector width
F0, F1, F2, F3, F4, F6 = (np.float32(v) for v in (0, 1, 2, 3, 4, 6))
SIXTH = np.float32(1 / 6)
TINY = np.float32(np.finfo(np.float32).tiny)
WR, WG, WB = (np.float32(w) for w in GRAY_WEIGHTS)
HALF, F255 = np.float32(0.5), np.float32(255)
F13, F4_13 = np.float32(13), np.float32(4 / 13)
LEVEL_EPS = np.float32(1e-3)  # ops.posterize_'s: a level on a step must not round down
# sigma at or below which a blur is the identity (the engine's identity sigma is 1e-4; the
# strategies' smallest is 0.1); taps beyond 6.44 sigma weigh < 1e-9 of the centre (as ops.py)
SIGMA_OFF, TAP_REACH = 1e-3, 6.44


def available() -> bool:
    return numba is not None


_FORKED_FROM_OPENMP = False  # this process was forked from one running numba's OpenMP threads


def _after_fork_in_child() -> None:
    global _FORKED_FROM_OPENMP
    try:
        from numba.np.ufunc import parallel

        # (started by these kernels or by any numba code: UMAP's, a user's)
        running = parallel._is_initialized and numba.threading_layer() == "omp"
    except Exception:  # (numba's private state moved: assume the kernels can run)
        running = False
    _FORKED_FROM_OPENMP = _FORKED_FROM_OPENMP or running


if numba is not None and hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def usable_here() -> bool:
    """Whether the kernels can run in this process. Not in a process forked from one running
    numba's OpenMP threads: GNU OpenMP is not fork-safe and numba terminates such a child at
    its first parallel call (a DataLoader worker's collate_fn calling the engine after the
    parent had run it, or a UMAP). The torch ops run there instead, with a warning."""
    if numba is None:
        return False
    if not _FORKED_FROM_OPENMP:
        return True
    warnings.warn(
        "the batched augmentation engine runs in a process forked from one running numba's "
        "OpenMP threads, where its numba kernels cannot run (numba would terminate it): its "
        "torch ops run instead (same draws, float rounding apart; slower). To keep the "
        "kernels, start worker processes with multiprocessing_context='spawn' or "
        "'forkserver', or set NUMBA_THREADING_LAYER=workqueue before the first call",
        RuntimeWarning, stacklevel=2)
    return False


def jit(fn, **options):
    """numba.njit with the compiled code cached on disk (next to the module, or in numba's user
    cache, or NUMBA_CACHE_DIR); where none is writable numba refuses to cache at decoration
    time, and the kernels are compiled in each process instead (~17 s at first use on a 2-core
    machine)."""
    if numba is None:
        return fn
    try:
        return numba.njit(fn, nogil=True, cache=True, **options)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(fn, nogil=True, cache=False, **options)


def kernel(fn):
    """Parallel over images (numba.prange); fastmath lets LLVM vectorise the per-pixel loops."""
    return jit(fn, parallel=True, fastmath=True)


def exact_kernel(fn):
    """Without fastmath: IEEE float32 as the torch ops (discrete levels, pixel coordinates)."""
    return jit(fn, parallel=True)


def helper(fn):
    return jit(fn, fastmath=True)


def run(fn, x: Tensor, layout: str, *params: Tensor, **constants) -> Tensor:
    """fn(images, *params, *constants) on x's storage, in place; returns x.

    layout: "image" [N, C, H, W], "planes" [N, C, H * W] or "flat" [N, C * H * W]. Parameters
    are passed as contiguous float32 arrays."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError(f"cpu_kernels need a contiguous float32 CPU tensor, got {x.dtype} on "
                         f"{x.device} (contiguous: {x.is_contiguous()})")
    if x.numel() == 0:
        return x
    # numba runs as many threads as torch would (training sets torch's count per process)
    threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    a = x.numpy()
    if layout != "image":
        a = a.reshape(a.shape[0], -1) if layout == "flat" else a.reshape(*a.shape[:2], -1)
    arrays = (p.detach().to("cpu", torch.float32).contiguous().numpy() for p in params)
    fn(a, *arrays, *constants.values())
    # torch and numba's OpenMP layer share one libgomp (one soname, loaded once), and starting
    # numba's thread pool sets the process's OpenMP thread count to every core, which torch then
    # reads as its own: a process set to 1 thread (a per-core benchmark) or to cores - workers
    # (training) would run torch, and these kernels, on every core from then on
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return x
