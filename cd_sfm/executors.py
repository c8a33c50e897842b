"""Where a stage's work runs: the stages (``features.extract.main``, ``matching.main``) own their loops (what to do,
resume, writing, progress) and hand each task to an executor.

An executor runs ``getattr(worker, method)(*task)`` for every task, with ``worker = worker_cls(*args)`` built where
the work runs, and yields the results:

* :class:`InProcess` (the default): one worker in this process (or the ``local_worker`` the stage already built),
  tasks on the worker's own ``parallelism`` threads inside its ``session(n)`` context, results in task order.
* :class:`cd_sfm.distributed.RayExecutor` (``--ray``): one worker per Ray actor, results as they finish. Its
  ``ships_data`` says whether tasks must carry their data (no shared file system) and ``match_batch`` how many pairs
  make a matching task.

Workers are plain classes whose constructor arguments can be pickled (``ExtractWorker`` and ``PairMatcher``).
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator


def ordered_map(fn: Callable, tasks: Iterable[tuple], workers: int = 1, depth: int = 2) -> Iterator[Any]:
    """``fn(*task)`` for every task, in order, running up to ``depth`` tasks ahead on ``workers`` threads; an
    exception is raised where its task's result would be yielded."""
    tasks = iter(tasks)
    if workers <= 1 and depth <= 1:
        for task in tasks:
            yield fn(*task)
        return
    depth = max(depth, workers)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending = []
        for task in tasks:
            pending.append(pool.submit(fn, *task))
            if len(pending) > depth:
                yield pending.pop(0).result()
        while pending:
            yield pending.pop(0).result()


class InProcess:
    """Runs a stage's tasks in this process."""

    ships_data = False
    match_batch = None  # the stage's own batch size
    remote = False

    def run(self, worker_cls, args: tuple, method: str, tasks: Iterable[tuple], num_tasks: int,
            local_worker=None) -> Iterator[Any]:
        worker = local_worker if local_worker is not None else worker_cls(*args)
        n = max(1, int(getattr(worker, "parallelism", 1) or 1))
        session = worker.session(n) if hasattr(worker, "session") else contextlib.nullcontext()
        try:
            with session:
                yield from ordered_map(getattr(worker, method), tasks, workers=n, depth=2 * n)
        finally:
            if local_worker is None and hasattr(worker, "close"):
                worker.close()
