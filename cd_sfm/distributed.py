"""Optional Ray execution of feature extraction and matching (``--ray auto|local|ADDRESS``).

Each worker is a Ray actor in its own process that builds its feature backend (models loaded once) or opens the
feature file once, then serves many images or pairs. Results stream back to the driver as they finish; the driver
alone writes ``features.h5`` / ``matches.h5`` through :class:`~cd_sfm.io.H5Appender` (so resume and crash safety are
those of the in-process stages) and, later, the database. Per image / per pair the work is the very code of the
in-process stages (``features.extract``, ``matching.match_descriptors``), so the outputs are identical.

Data reach the workers from a shared file system by default (a local cluster, or nodes mounting the same folders);
``ship_data=True`` sends image bytes and descriptors from the driver instead, for clusters without one. Worker nodes
need cd_sfm installed (or ``runtime_env``, e.g. ``{"pip": [...]}`` / ``{"py_modules": [...]}``, passed to Ray).

Nothing here imports Ray until a function is called: Ray is the optional extra ``pip install 'cd_sfm[ray]'``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from .progress import tqdm

from .io import CdSfmError, H5Appender, completed_names, merge_parts

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
# feature extraction


class ExtractWorker:
    """Ray actor: holds one built backend (its models loaded once) and extracts images on request."""

    def __init__(self, conf: dict):
        from .features import extract as ex

        self.conf = ex.resolve_conf(conf)
        self.backend = ex.make_backend(self.conf)

    def extract(self, name: str, path: str, data: bytes | None = None) -> tuple[str, Any]:
        """(name, stored feature dict) or (name, CdSfmError message) for an unreadable image."""
        tmp = None
        try:
            if data is not None:
                fd, tmp = tempfile.mkstemp(suffix=Path(name).suffix)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            from .features.extract import extract_image

            return name, extract_image(self.backend, self.conf, Path(tmp or path))
        except CdSfmError as e:  # an unreadable image: reported with its real path, skipped by the driver
            return name, str(e).replace(tmp, path) if tmp else str(e)
        finally:
            if tmp:
                Path(tmp).unlink(missing_ok=True)

    def precision_used(self):
        return getattr(self.backend, "precision_used", None)


def _image_names(image_dir: Path, image_list, skipped: dict[str, str]) -> list[str]:
    from .images import list_images

    if image_list is None:
        return list_images(image_dir, skipped=skipped)
    if isinstance(image_list, (str, Path)):
        p = Path(image_list)
        if not p.exists():
            raise CdSfmError(f"{p}: image list not found")
        image_list = [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return list(dict.fromkeys(Path(n).as_posix() for n in image_list))


def extract(conf: dict | str, image_dir: str | Path, feature_path: str | Path, image_list=None,
            overwrite: bool = False, ray_conf: RayConf | dict | str | None = None, progress: bool = True) -> dict:
    """``features.extract.main`` on a Ray cluster: same arguments and statistics, same ``features.h5``."""
    from .features import extract as ex

    t0 = time.monotonic()
    rconf = RayConf.from_any(ray_conf)
    conf = ex.resolve_conf(conf)
    image_dir, feature_path = Path(image_dir), Path(feature_path)
    skipped: dict[str, str] = {}
    names = _image_names(image_dir, image_list, skipped)
    done = set() if overwrite else completed_names(feature_path)
    todo = [n for n in names if n not in done]
    reused = len(names) - len(todo)
    extracted, no_keypoints, precision = 0, [], None
    if todo:
        ray = init(rconf)
        n = _num_workers(ray, rconf, len(todo))
        logger.info("Extracting %s features of %d image(s) with %d Ray worker(s)", conf["backend"], len(todo), n)
        Worker = _actor_class(ray, ExtractWorker, rconf)
        actors = [Worker.remote(conf) for _ in range(n)]
        precision = ray.get(actors[0].precision_used.remote())

        def tasks():
            for name in todo:
                path = image_dir / name
                data = None
                if rconf.ship_data:
                    try:
                        data = path.read_bytes()
                    except OSError as e:
                        data = b""
                        logger.debug("cannot read %s: %s", path, e)
                yield name, str(path), data

        try:
            with H5Appender(feature_path, flush_every=16) as out:
                bar = tqdm(total=len(todo), desc="extract (ray)", unit="img", disable=not progress)
                for name, result in _stream(ray, actors, "extract", tasks(), rconf.in_flight):
                    bar.update(1)
                    if isinstance(result, str):
                        logger.warning("Skipping %s", result)
                        skipped[name] = result
                        continue
                    if len(result["keypoints"]) == 0:
                        logger.warning("%s: no keypoints found", image_dir / name)
                        no_keypoints.append(name)
                    out.add(name, result)
                    extracted += 1
                bar.close()
        finally:
            for a in actors:
                ray.kill(a)
    else:
        merge_parts(feature_path)
    stats = {"extracted": extracted, "reused": reused, "skipped": skipped, "no_keypoints": no_keypoints,
             "seconds": time.monotonic() - t0, "feature_path": str(feature_path), "precision": precision}
    logger.info("Features (Ray): %d extracted, %d reused, %d skipped (%.1f s)", extracted, reused, len(skipped),
                stats["seconds"])
    return stats


# --------------------------------------------------------------------------------------------------------------------
# matching


class MatchWorker:
    """Ray actor: matches batches of pairs; reads descriptors from the shared feature file (opened once, with an LRU
    cache) or takes the ones the driver ships."""

    def __init__(self, conf: dict, features_path: str | None):
        from . import matching

        self.conf = matching.resolve_conf(conf)
        self.opts = matching.match_options(self.conf)
        self.cache = None
        if features_path is not None:
            import h5py

            self.hfile = h5py.File(features_path, "r", libver="latest")
            self.cache = matching.DescriptorCache(self.hfile, self.conf["cache_mb"])

    def match(self, batch: list[tuple[str, str]], shipped: dict[str, np.ndarray] | None = None) -> list:
        from . import matching

        def get(name):
            if shipped is not None:
                return matching.normalize(shipped[name].T)  # stored (D, N), as DescriptorCache reads it
            return self.cache.get(name)

        out = []
        for a, b in batch:
            d0, d1 = get(a), get(b)
            if d0.shape[1] != d1.shape[1] and len(d0) and len(d1):
                return [("error", f"descriptors of {a} and {b} differ in size ({d0.shape[1]} vs {d1.shape[1]}); "
                                  "mixed feature types?")]
            m0, s0 = matching.match_descriptors(d0, d1, **self.opts)
            out.append(((a, b), m0, s0.astype(np.float16)))
        return out


def _match_todo(pairs_path, features_path: Path, matches_path: Path, overwrite: bool):
    """The pairs to match, as ``matching.main`` selects them: (todo, reused, skipped)."""
    from . import matching
    from .io import list_h5_names, names_to_pair, parse_pairs

    pairs = parse_pairs(pairs_path) if isinstance(pairs_path, (str, Path)) else [tuple(p) for p in pairs_path]
    seen, unique = set(), []
    for a, b in pairs:
        k = (a, b) if a < b else (b, a)
        if a != b and k not in seen:
            seen.add(k)
            unique.append((a, b))
    if not features_path.exists():
        raise CdSfmError(f"{features_path}: feature file not found (run the extraction first)")
    merge_parts(features_path)
    have = set(list_h5_names(features_path))
    done = set() if overwrite else completed_names(matches_path)
    todo, skipped, reused = [], {}, 0
    for a, b in unique:
        if done and matching._pair_done(a, b, done):
            reused += 1
            continue
        missing = [n for n in (a, b) if n not in have]
        if missing:
            skipped[names_to_pair(a, b)] = f"no features for {missing[0]}"
            continue
        todo.append((a, b))
    return todo, reused, skipped


def match(conf: dict | str, pairs_path, features_path: str | Path, matches_path: str | Path, overwrite: bool = False,
          ray_conf: RayConf | dict | str | None = None, progress: bool = True) -> dict:
    """``matching.main`` on a Ray cluster: same arguments and statistics, same ``matches.h5``."""
    import h5py

    from . import matching
    from .io import names_to_pair

    t0 = time.monotonic()
    rconf = RayConf.from_any(ray_conf)
    conf = matching.resolve_conf(conf)
    features_path, matches_path = Path(features_path), Path(matches_path)
    todo, reused, skipped = _match_todo(pairs_path, features_path, matches_path, overwrite)
    if skipped:
        logger.warning("Skipping %d pair(s) whose images have no features (e.g. %s)", len(skipped),
                       next(iter(skipped.values())))
    matched, total = 0, 0
    if todo:
        ray = init(rconf)
        bs = max(1, int(rconf.match_batch))
        # tile order: consecutive pairs share images, so each worker's cache (or each shipped batch) stays small
        todo = matching._tile_order(todo, max(1, bs // 2))
        batches = [todo[i : i + bs] for i in range(0, len(todo), bs)]
        n = _num_workers(ray, rconf, len(batches))
        logger.info("Matching %d pair(s) with %d Ray worker(s)", len(todo), n)
        Worker = _actor_class(ray, MatchWorker, rconf)
        actors = [Worker.remote(conf, None if rconf.ship_data else str(features_path.resolve())) for _ in range(n)]
        hfile = h5py.File(features_path, "r", libver="latest") if rconf.ship_data else None

        def tasks():
            for batch in batches:
                if hfile is None:
                    yield (batch,)
                else:
                    names = dict.fromkeys(x for p in batch for x in p)
                    yield batch, {x: hfile[x]["descriptors"][()] for x in names}

        try:
            with H5Appender(matches_path, flush_every=1024, flush_seconds=30) as out, \
                    tqdm(total=len(todo), desc="match (ray)", unit="pair", disable=not progress) as bar:
                for results in _stream(ray, actors, "match", tasks(), rconf.in_flight):
                    if results and results[0][0] == "error":
                        raise CdSfmError(f"{features_path}: {results[0][1]}")
                    for (a, b), m0, s0 in results:
                        out.add(names_to_pair(a, b), {"matches0": m0, "matching_scores0": s0})
                        total += int((m0 >= 0).sum())
                        matched += 1
                    bar.update(len(results))
        finally:
            if hfile is not None:
                hfile.close()
            for a in actors:
                ray.kill(a)
    else:
        merge_parts(matches_path)
    stats = {"matched": matched, "reused": reused, "skipped": skipped,
             "num_matches_mean": total / matched if matched else 0.0, "seconds": time.monotonic() - t0,
             "matches_path": str(matches_path)}
    logger.info("Matches (Ray): %d pair(s) matched (%.0f matches on average), %d reused, %d skipped (%.1f s)",
                matched, stats["num_matches_mean"], reused, len(skipped), stats["seconds"])
    return stats


def shutdown() -> None:
    """Disconnect from Ray (stops a local cluster this process started); a no-op without Ray."""
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
