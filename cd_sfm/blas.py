"""One BLAS thread inside a block, for code whose results must not depend on BLAS's thread count (OpenBLAS rounds a
product differently with another number of threads) or whose own threads already share the cores.

Every thread that enters :func:`one_blas_thread` sets the limit itself and restores it on leaving: with the OpenBLAS
that numpy ships (0.3.31) a limit set in one thread does not hold for the products of another, so a block entered
by two threads at once needs both to set it (measured: one shared limit gave different bits in the second thread's
products; a limit per thread gave the same bits in 19 of 20 runs: a thread leaving its block may restore the count
another thread's block runs under, so code that needs the same bits every time also holds a lock, as
``models.augment_numpy`` does). Without ``threadpoolctl`` it does nothing.
"""

from __future__ import annotations

import contextlib
import threading

_LOCK = threading.Lock()
_CONTROLLER = None  # threadpoolctl.ThreadpoolController, made on first use (after numpy has loaded its BLAS); False


def one_blas_thread():
    """A context manager: BLAS on one thread in this thread until the block ends."""
    global _CONTROLLER
    with _LOCK:
        if _CONTROLLER is None:
            try:
                from threadpoolctl import ThreadpoolController

                _CONTROLLER = ThreadpoolController()
            except ImportError:  # pragma: no cover - a dependency; kept for stripped installs
                _CONTROLLER = False
    if _CONTROLLER:
        return _CONTROLLER.limit(limits=1, user_api="blas")
    return contextlib.nullcontext()
