"""Optional Ray execution of feature extraction and matching (``--ray auto|local|ADDRESS``).

:class:`RayExecutor` is an executor (:mod:`cd_sfm.executors`) that the stages' own loops (``features.extract.main``,
``matching.main``) hand their tasks to: each worker (``ExtractWorker``, ``PairMatcher``) is a Ray actor in its own
process that builds its feature backend (models loaded once) or opens the feature file once, then serves many images
or pairs. Results stream back to the driver as they finish; the driver alone writes ``features.h5`` /
``matches.h5`` (so resume, settings checks and crash safety are those of the in-process stages) and, later, the
database. The driver builds the feature backend once before the workers start and pins its run-time choices
(ContextDesc's ``precision: auto``) in the workers' settings, so every image of a run is described the same way.

Data reach the workers from a shared file system by default (a local cluster, or nodes mounting the same folders);
``ship_data=True`` sends image bytes and descriptors from the driver instead, for clusters without one. Worker nodes
need cd_sfm installed (or ``runtime_env``, e.g. ``{"pip": [...]}`` / ``{"py_modules": [...]}``, passed to Ray).

Nothing here imports Ray until a function is called: Ray is the optional extra ``pip install 'cd_sfm[ray]'``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields
from typing import Any, Iterable, Iterator

from .io import CdSfmError

logger = logging.getLogger(__name__)


@dataclass
class RayConf:
    address: str = "auto"  # auto: a running cluster if there is one, else a local one | local | ray://host:port | host:port
    num_workers: int | None = None  # actors; default: the cluster's CPUs / cpus_per_worker
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    in_flight: int = 2  # tasks queued per worker (keeps workers busy while the driver writes)
    ship_data: bool = False  # send image bytes / descriptors from the driver (no shared file system)
    match_batch: int = 32  # pairs per matching task
    num_cpus: int | None = None  # CPUs of a local cluster started here (default: all)
    runtime_env: dict | None = None  # Ray runtime_env for a remote cluster, e.g. {"pip": ["cd_sfm[ray]"]}

    @classmethod
    def from_any(cls, conf: "RayConf | dict | str | None") -> "RayConf":
        if conf is None:
            return cls()
        if isinstance(conf, cls):
            return conf
        if isinstance(conf, str):
            return cls(address=conf)
        known = {f.name for f in fields(cls)}
        unknown = set(conf) - known
        if unknown:
            raise CdSfmError(f"unknown Ray option(s): {', '.join(sorted(unknown))}")
        return cls(**conf)


def require_ray():
    try:
        import ray
    except ImportError as e:
        raise CdSfmError("--ray needs Ray, an optional extra: pip install 'cd_sfm[ray]' (or pip install 'ray>=2.9')") from e
    return ray


def init(conf: RayConf | dict | str | None = None):
    """Connect to (or start) a Ray cluster as ``conf.address`` says; a no-op when Ray is already initialised."""
    conf = RayConf.from_any(conf)
    ray = require_ray()
    if ray.is_initialized():
        return ray
    import signal
    import threading

    on_term = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        return _init(ray, conf)
    finally:  # ray.init installs its own SIGTERM handler; keep the caller's (the CLI stops cleanly on SIGTERM)
        if callable(on_term) and signal.getsignal(signal.SIGTERM) is not on_term:
            signal.signal(signal.SIGTERM, on_term)


def _runtime_env(conf: RayConf) -> dict:
    """The workers' environment: the caller's ``runtime_env`` plus TensorFlow's log level (its start-up lines stay
    silent in every worker unless ``-v``)."""
    env = dict(conf.runtime_env or {})
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        env["env_vars"] = {"TF_CPP_MIN_LOG_LEVEL": os.environ["TF_CPP_MIN_LOG_LEVEL"], **(env.get("env_vars") or {})}
    return env


def _init(ray, conf: RayConf):
    # a local cluster's workers inherit this process's environment (TensorFlow's log level included)
    local = dict(num_cpus=conf.num_cpus, include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
    address = (conf.address or "local").strip()
    if address == "local":
        ray.init(**local)
    elif address == "auto":
        try:
            ray.init(address="auto", logging_level=logging.WARNING, runtime_env=_runtime_env(conf))
            logger.info("Connected to the running Ray cluster")
        except (ConnectionError, RuntimeError, ValueError):
            logger.info("No running Ray cluster found; starting a local one")
            ray.init(**local)
    else:
        try:
            ray.init(address=address, logging_level=logging.WARNING, runtime_env=_runtime_env(conf))
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise CdSfmError(f"--ray {address}: cannot connect to a Ray cluster ({e})") from e
    return ray


def _num_workers(ray, conf: RayConf, n_tasks: int) -> int:
    if conf.num_workers:
        n = conf.num_workers
    else:
        cpus = ray.cluster_resources().get("CPU", 1)
        n = int(cpus // max(conf.cpus_per_worker, 1e-3)) or 1
        if conf.gpus_per_worker:
            n = min(n, int(ray.cluster_resources().get("GPU", 0) // conf.gpus_per_worker) or 1)
    return max(1, min(n, n_tasks))


def _stream(ray, actors: list, method: str, tasks: Iterable[tuple], in_flight: int) -> Iterator[Any]:
    """Run ``actor.<method>.remote(*task)`` over ``tasks``, keeping up to ``in_flight`` tasks queued per actor and
    yielding results in completion order (bounded memory on the driver)."""
    tasks = iter(tasks)
    pending: dict = {}  # ObjectRef -> actor index
    load = [0] * len(actors)

    def submit(i: int) -> bool:
        task = next(tasks, None)
        if task is None:
            return False
        ref = getattr(actors[i], method).remote(*task)
        pending[ref] = i
        load[i] += 1
        return True

    for _ in range(max(1, in_flight)):
        for i in range(len(actors)):
            submit(i)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        ref = ready[0]
        i = pending.pop(ref)
        load[i] -= 1
        result = ray.get(ref)
        submit(i)
        yield result


def _actor_class(ray, cls, conf: RayConf):
    return ray.remote(num_cpus=conf.cpus_per_worker, num_gpus=conf.gpus_per_worker or None, max_restarts=1,
                      max_task_retries=1)(cls)


# --------------------------------------------------------------------------------------------------------------------
# the executor


class RayExecutor:
    """Runs a stage's tasks on Ray actors (:mod:`cd_sfm.executors`): ``worker_cls(*args)`` is built in each actor's
    process (models loaded once per actor), tasks are streamed with up to ``in_flight`` queued per actor, results
    come back as they finish; the actors are killed when the stage's loop ends. A ``CdSfmError`` raised by a worker
    is raised again here, as the in-process stage would raise it."""

    remote = True

    def __init__(self, conf: RayConf | dict | str | None = None):
        self.conf = RayConf.from_any(conf)

    @property
    def ships_data(self) -> bool:
        return bool(self.conf.ship_data)

    @property
    def match_batch(self) -> int:
        return max(1, int(self.conf.match_batch))

    def run(self, worker_cls, args: tuple, method: str, tasks, num_tasks: int, local_worker=None) -> Iterator[Any]:
        ray = init(self.conf)
        n = _num_workers(ray, self.conf, num_tasks)
        logger.info("%s: %d task(s) on %d Ray worker(s)", worker_cls.__name__, num_tasks, n)
        Actor = _actor_class(ray, worker_cls, self.conf)
        actors = [Actor.remote(*args) for _ in range(n)]
        try:
            yield from _stream(ray, actors, method, tasks, self.conf.in_flight)
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, CdSfmError):
                raise CdSfmError(str(cause)) from None
            raise
        finally:
            for a in actors:
                ray.kill(a)


def shutdown() -> None:
    """Disconnect from Ray (stops a local cluster this process started); a no-op without Ray."""
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
