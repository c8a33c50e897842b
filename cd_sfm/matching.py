"""Descriptor matching: mutual nearest neighbours with Lowe's ratio test, vectorised, batched over image pairs.

Usage from Python, as hloc's ``match_features.main``::

    from cd_sfm import matching
    stats = matching.main(matching.confs["NN-ratio"], "out/pairs.txt", "out/features.h5", "out/matches.h5")

Output: ``matches.h5`` with one group per pair key ``names_to_pair(name0, name1)`` holding ``matches0`` (N0,) int32
(index into name1's keypoints, -1 = unmatched) and ``matching_scores0`` (N0,) float16 (``(cos + 1) / 2`` of the
match, 0 when unmatched). Pairs already in the file in either order are skipped; entries go through
:class:`~cd_sfm.io.H5Appender`, so a killed run loses nothing complete.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import h5py
import numpy as np
from .progress import tqdm

from .io import CdSfmError, H5Appender, completed_names, list_h5_names, merge_parts, names_to_pair, \
    names_to_pair_old, parse_pairs

logger = logging.getLogger(__name__)

# Named presets: ``ratio`` (Lowe's ratio test on the distances; None = off), ``mutual`` (keep only mutual nearest
# neighbours), ``distance_threshold`` (max distance of a match; None = off), ``metric`` ("l2": Euclidean distance of
# the L2-normalised descriptors, as hloc; "angle": their angle in radians, as COLMAP's matchers), and ``output``, a
# file stem for callers that name files after the preset.
confs: dict[str, dict] = {
    # the default: Lowe's 0.8 and a cross check, for SIFT / RootSIFT
    "NN-ratio": {"output": "matches-NN-mutual-ratio.8", "ratio": 0.8, "mutual": True, "distance_threshold": None},
    # COLMAP's SiftMatchingOptions defaults: max_ratio 0.8 and max_distance 0.7 on angles, cross check
    "NN-colmap": {"output": "matches-NN-colmap", "ratio": 0.8, "mutual": True, "distance_threshold": 0.7,
                  "metric": "angle"},
    # looser ratio: learned descriptors have flatter distance distributions (tune per descriptor)
    "NN-ratio-0.9": {"output": "matches-NN-mutual-ratio.9", "ratio": 0.9, "mutual": True, "distance_threshold": None},
    "NN-mutual": {"output": "matches-NN-mutual", "ratio": None, "mutual": True, "distance_threshold": None},
}

DEFAULT_CONF = {
    "ratio": 0.8,
    "mutual": True,
    "distance_threshold": None,
    "metric": "l2",
    "batch_size": 64,  # pairs matched between progress / write steps
    "cache_mb": 1024,  # LRU cache of normalised descriptors
    "block_rows": 2048,  # rows of the similarity matrix computed at once (memory: block_rows * N1 * 4 bytes)
    "num_workers": 1,  # threads matching pairs of a batch in parallel (BLAS already uses all cores)
    "cross_ratio": False,  # ratio test both ways (COLMAP's cross check); see match_descriptors
}


def resolve_conf(conf: dict | str | None) -> dict:
    if conf is None:
        conf = "NN-ratio"
    if isinstance(conf, str):
        if conf not in confs:
            raise CdSfmError(f"unknown matching preset {conf!r}; available: {', '.join(sorted(confs))}")
        conf = confs[conf]
    out = {**DEFAULT_CONF, **copy.deepcopy(dict(conf))}
    if out["metric"] not in ("l2", "angle"):
        raise CdSfmError(f"matching metric must be 'l2' or 'angle', not {out['metric']!r}")
    return out


# --------------------------------------------------------------------------------------------------------------------
# one pair


def normalize(desc: np.ndarray) -> np.ndarray:
    """(N, D) descriptors as float32 with unit L2 rows (zero rows stay zero)."""
    d = np.asarray(desc, np.float32)
    if d.ndim != 2:
        raise ValueError(f"descriptors must be (N, D), got shape {d.shape}")
    norm = np.linalg.norm(d, axis=1, keepdims=True)
    return d / np.maximum(norm, 1e-12)


def _distance(sim: np.ndarray, metric: str) -> np.ndarray:
    sim = np.clip(sim, -1.0, 1.0)
    if metric == "angle":
        return np.arccos(sim)
    return np.sqrt(np.maximum(2.0 - 2.0 * sim, 0.0))


def match_descriptors(
    d0: np.ndarray,
    d1: np.ndarray,
    ratio: float | None = 0.8,
    mutual: bool = True,
    distance_threshold: float | None = None,
    metric: str = "l2",
    normalized: bool = False,
    block_rows: int = 2048,
    cross_ratio: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Match descriptors ``d0`` (N0, D) to ``d1`` (N1, D) by nearest neighbour of their L2-normalised forms.

    A nearest neighbour j of i is kept when (all that apply): ``dist(i, j) < ratio * dist(i, second nearest)``
    (passes when N1 == 1), ``dist(i, j) <= distance_threshold``, and i is j's nearest neighbour (``mutual``).
    ``metric`` is "l2" (Euclidean) or "angle" (radians). The similarity matrix is computed ``block_rows`` rows at
    a time. ``normalized``: the inputs already have unit rows (float32). ``cross_ratio``: the ratio test must also
    pass the other way (j's nearest neighbour i against j's second nearest in ``d0``), as COLMAP's cross check does;
    it drops ambiguous matches on repeated structures.

    Returns ``matches0`` (N0,) int32 (-1 = unmatched) and ``scores0`` (N0,) float32 = (cosine + 1) / 2 (0 unmatched).
    """
    n0, n1 = len(d0), len(d1)
    matches0 = np.full(n0, -1, np.int32)
    scores0 = np.zeros(n0, np.float32)
    if n0 == 0 or n1 == 0:
        return matches0, scores0
    if not normalized:
        d0, d1 = normalize(d0), normalize(d1)
    if d0.shape[1] != d1.shape[1]:
        raise ValueError(f"descriptor sizes differ: {d0.shape[1]} and {d1.shape[1]}")
    need_second = ratio is not None and n1 > 1
    nn = np.empty(n0, np.int64)
    best = np.empty(n0, np.float32)
    second = np.full(n0, -np.inf, np.float32)
    col_best = np.full(n1, -np.inf, np.float32)
    d1t = np.ascontiguousarray(d1.T)
    for start in range(0, n0, block_rows):
        sim = d0[start : start + block_rows] @ d1t  # (b, N1)
        rows = np.arange(sim.shape[0])
        if mutual:  # column maxima (a max over axis 0 is fast; an argmax over it is not)
            np.maximum(col_best, sim.max(0), out=col_best)
        idx = sim.argmax(1)
        sl = slice(start, start + sim.shape[0])
        nn[sl] = idx
        best[sl] = sim[rows, idx]
        if need_second:
            sim[rows, idx] = -np.inf
            second[sl] = sim.max(1)
    dist = _distance(best, metric)
    keep = np.ones(n0, bool)
    if need_second:
        keep &= dist < ratio * _distance(second, metric)
    if distance_threshold is not None:
        keep &= dist <= distance_threshold
    if mutual:
        # i is j's nearest neighbour when its similarity is j's column maximum (the very same float32 values);
        # on exact ties the first such i wins, as a column argmax would decide
        is_max = best >= col_best[nn]
        cand = np.flatnonzero(is_max)
        _, first = np.unique(nn[cand], return_index=True)
        mutual_ok = np.zeros(n0, bool)
        mutual_ok[cand[first]] = True
        keep &= mutual_ok
    if cross_ratio and ratio is not None and n0 > 1:
        # second nearest of each kept j among the rows of d0 (i excluded), for the kept matches only
        cand = np.flatnonzero(keep)
        for start in range(0, len(cand), block_rows):
            c = cand[start : start + block_rows]
            cols = d0 @ d1[nn[c]].T  # (N0, len(c))
            cols[c, np.arange(len(c))] = -np.inf
            keep[c] &= dist[c] < ratio * _distance(cols.max(0), metric)
    matches0[keep] = nn[keep]
    scores0[keep] = (np.clip(best[keep], -1.0, 1.0) + 1.0) / 2.0
    return matches0, scores0


# --------------------------------------------------------------------------------------------------------------------
# many pairs


class DescriptorCache:
    """Normalised float32 descriptors of the images of a feature file, least recently used dropped past ``max_mb``."""

    def __init__(self, hfile: h5py.File, max_mb: float = 1024):
        self.hfile = hfile
        self.max_bytes = max_mb * 2**20
        self.nbytes = 0
        self.loads = 0
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()

    def get(self, name: str) -> np.ndarray:
        if name in self._items:
            self._items.move_to_end(name)
            return self._items[name]
        d = normalize(self.hfile[name]["descriptors"][()].T)  # stored (D, N)
        self.loads += 1
        self._items[name] = d
        self.nbytes += d.nbytes
        while self.nbytes > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self.nbytes -= old.nbytes
        return d


def _pair_done(a: str, b: str, done: set[str]) -> bool:
    return any(k in done for k in (names_to_pair(a, b), names_to_pair(b, a), names_to_pair_old(a, b),
                                   names_to_pair_old(b, a)))


def _tile_order(pairs: list[tuple[str, str]], tile: int) -> list[tuple[str, str]]:
    """Reorder pairs tile by tile of the pair matrix so that a cache of about 2 * ``tile`` images serves each tile."""
    index = {n: i for i, n in enumerate(sorted({n for p in pairs for n in p}))}

    def key(p):
        ta, tb = index[p[0]] // tile, index[p[1]] // tile
        return (min(ta, tb), max(ta, tb))

    return sorted(pairs, key=key)  # stable: the original order inside a tile


def main(
    conf: dict | str,
    pairs_path: str | Path | Iterable[tuple[str, str]],
    features_path: str | Path,
    matches_path: str | Path,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Match every pair of ``pairs_path`` (a pair file, or a list of name pairs) with the descriptors of
    ``features_path`` into ``matches_path``.

    Pairs already in ``matches_path`` (in either order) are reused unless ``overwrite``; self pairs and repeats are
    dropped; pairs with an image missing from the feature file are skipped and listed.

    Returns ``{"matched": n, "reused": n, "skipped": {pair_key: reason}, "num_matches_mean": x, "seconds": s,
    "matches_path": str}``.
    """
    t0 = time.monotonic()
    conf = resolve_conf(conf)
    features_path, matches_path = Path(features_path), Path(matches_path)
    if isinstance(pairs_path, (str, Path)):
        pairs = parse_pairs(pairs_path)
    else:
        pairs = [tuple(p) for p in pairs_path]
    seen: set[tuple[str, str]] = set()
    unique = []
    for a, b in pairs:
        k = (a, b) if a < b else (b, a)
        if a != b and k not in seen:
            seen.add(k)
            unique.append((a, b))
    if not features_path.exists():
        raise CdSfmError(f"{features_path}: feature file not found (run the extraction first)")
    merge_parts(features_path)  # entries a killed extraction left in part files
    try:
        have = set(list_h5_names(features_path))
    except OSError as e:
        raise CdSfmError(f"{features_path}: unreadable feature file ({e})") from e

    done = set() if overwrite else completed_names(matches_path)
    skipped: dict[str, str] = {}
    todo = []
    reused = 0
    for a, b in unique:
        if done and _pair_done(a, b, done):
            reused += 1
            continue
        missing = [n for n in (a, b) if n not in have]
        if missing:
            skipped[names_to_pair(a, b)] = f"no features for {missing[0]}"
            continue
        todo.append((a, b))
    if reused:
        logger.info("Reusing the matches of %d pair(s) already in %s", reused, matches_path)
    if skipped:
        logger.warning("Skipping %d pair(s) whose images have no features (e.g. %s)", len(skipped),
                       next(iter(skipped.values())))

    matched = 0
    total_matches = 0
    if todo:
        opts = dict(ratio=conf["ratio"], mutual=conf["mutual"], distance_threshold=conf["distance_threshold"],
                    metric=conf["metric"], normalized=True, block_rows=int(conf["block_rows"]),
                    cross_ratio=bool(conf.get("cross_ratio", False)))
        with h5py.File(features_path, "r", libver="latest") as hfile:
            # size the tiles so that two tiles of images fit in the cache
            shape = hfile[todo[0][0]]["descriptors"].shape
            per_image = max(1, shape[0] * max(shape[1], 1) * 4)
            capacity = max(2, int(conf["cache_mb"] * 2**20 // per_image))
            todo = _tile_order(todo, max(1, capacity // 2))
            cache = DescriptorCache(hfile, conf["cache_mb"])
            logger.info("Matching %d pair(s) into %s", len(todo), matches_path)
            workers = max(1, int(conf["num_workers"]))
            pool = ThreadPoolExecutor(workers) if workers > 1 else None
            try:
                with H5Appender(matches_path, flush_every=1024, flush_seconds=30) as out, \
                        tqdm(total=len(todo), desc="match", unit="pair", disable=not progress) as bar:
                    bs = max(1, int(conf["batch_size"]))
                    for i in range(0, len(todo), bs):
                        batch = todo[i : i + bs]
                        descs = [(cache.get(a), cache.get(b)) for a, b in batch]
                        for (a, b), (d0, d1) in zip(batch, descs):
                            if d0.shape[1] != d1.shape[1] and len(d0) and len(d1):
                                raise CdSfmError(f"{features_path}: descriptors of {a} and {b} differ in size "
                                                 f"({d0.shape[1]} vs {d1.shape[1]}); mixed feature types?")

                        def run(ds):
                            return match_descriptors(ds[0], ds[1], **opts)

                        results = pool.map(run, descs) if pool else map(run, descs)
                        for (a, b), (m0, s0) in zip(batch, results):
                            out.add(names_to_pair(a, b), {"matches0": m0, "matching_scores0": s0.astype(np.float16)})
                            total_matches += int((m0 >= 0).sum())
                            matched += 1
                        bar.update(len(batch))
            finally:
                if pool:
                    pool.shutdown()
        logger.debug("Descriptor cache: %d loads for %d pairs", cache.loads, len(todo))
    else:
        merge_parts(matches_path)
    stats = {
        "matched": matched,
        "reused": reused,
        "skipped": skipped,
        "num_matches_mean": total_matches / matched if matched else 0.0,
        "seconds": time.monotonic() - t0,
        "matches_path": str(matches_path),
    }
    logger.info("Matches: %d pair(s) matched (%.0f matches on average), %d reused, %d skipped (%.1f s)", matched,
                stats["num_matches_mean"], reused, len(skipped), stats["seconds"])
    return stats
