"""Descriptor matching: mutual nearest neighbours with Lowe's ratio test, batched over image pairs; one pass over
cache-sized tiles of the similarity matrix (numba kernels in :mod:`cd_sfm.matching_kernels`) keeps the top values of
every row and column at once, optionally after a screen on the pair's principal axes (see :func:`match_descriptors`).

Usage from Python, as hloc's ``match_features.main``::

    from cd_sfm import matching
    stats = matching.main(matching.confs["NN-ratio"], "out/pairs.txt", "out/features.h5", "out/matches.h5")

Output: ``matches.h5`` with one group per pair key ``names_to_pair(name0, name1)`` holding ``matches0`` (N0,) int32
(index into name1's keypoints, -1 = unmatched) and ``matching_scores0`` (N0,) float16 (``(cos + 1) / 2`` of the
match, 0 when unmatched). Pairs already in the file in either order are skipped; entries go through
:class:`~cd_sfm.io.H5Appender`, so a killed run loses nothing complete.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import h5py
import numpy as np

from .blas import one_blas_thread
from .io import ATTRS_KEY, CdSfmError, H5Appender, check_feature_entry, check_file_settings, completed_names, \
    entry_attrs, feature_version, file_settings, list_h5_names, merge_parts, names_to_pair, names_to_pair_old, \
    parse_pairs
from .progress import tqdm

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

SCREEN_K = 8  # candidates per row and per column the screen keeps for exact rescoring
SCREEN_ENERGY = 0.6  # the screen keeps the fewest principal axes (multiple of 8) holding this share of the energy
SCREEN_FLAT_ENERGY = 0.7  # ... and stays off when this share needs more than half of the axes (a flat spectrum)
SCREEN_MIN_KEYPOINTS = 6144  # smaller sets are matched exactly: the screen would not pay
FUSED_MIN_PAIRS = 3000 * 3000  # smaller pairs: the reference matcher (faster there: no tiles, no threads)
TILE = 512  # similarity tiles of TILE x TILE float32 (1 MiB: cache-resident)

DEFAULT_CONF = {
    "ratio": 0.8,
    "mutual": True,
    "distance_threshold": None,
    "metric": "l2",
    "batch_size": 64,  # pairs matched between progress / write steps
    "cache_mb": 1024,  # LRU cache of normalised descriptors
    "block_rows": 2048,  # rows of the similarity matrix computed at once (memory: block_rows * N1 * 4 bytes)
    "num_workers": None,  # pairs of a batch matched in parallel (None: the usable cores, each pair on one thread)
    "cross_ratio": False,  # ratio test both ways (COLMAP's cross check); see match_descriptors
    "screen": 0,  # principal-axes screen before the exact decision ("auto", an int; 0 = off, exact); see there
    "screen_k": SCREEN_K,  # candidates per row / column the screen keeps
    "threads": None,  # threads per pair (None: the usable cores / num_workers)
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


def pair_workers(conf: dict) -> int:
    """Pairs matched at once: ``num_workers``, by default (None) one per usable core, each pair on one thread. At 8k
    keypoints two pairs on one thread each went 1.15x faster than one pair on two threads at a time (2-core AVX2 CPU,
    24 pairs of four scenes): every thread of a pair keeps its own column lists (``_top_lists``), so threads within a
    pair repeat work that threads over pairs do not."""
    n = conf.get("num_workers")
    return max(1, int(n)) if n else default_threads()


def match_options(conf: dict) -> dict:
    """Keyword arguments of :func:`match_descriptors` for a resolved matching configuration (normalised input)."""
    workers = pair_workers(conf)
    threads = conf.get("threads")
    return dict(ratio=conf["ratio"], mutual=conf["mutual"], distance_threshold=conf["distance_threshold"],
                metric=conf["metric"], normalized=True, block_rows=int(conf["block_rows"]),
                cross_ratio=bool(conf.get("cross_ratio", False)), screen=conf.get("screen", 0),
                screen_k=int(conf.get("screen_k", SCREEN_K)),
                threads=int(threads) if threads else max(1, default_threads() // workers))


# --------------------------------------------------------------------------------------------------------------------
# one pair


def normalize(desc: np.ndarray) -> np.ndarray:
    """(N, D) descriptors as float32 with unit L2 rows (zero rows stay zero)."""
    d = np.ascontiguousarray(desc, np.float32)
    if d.ndim != 2:
        raise ValueError(f"descriptors must be (N, D), got shape {d.shape}")
    norm = np.linalg.norm(d, axis=1, keepdims=True)
    return d / np.maximum(norm, 1e-12)


def _distance(sim: np.ndarray, metric: str) -> np.ndarray:
    sim = np.clip(sim, -1.0, 1.0)
    if metric == "angle":
        return np.arccos(sim)
    return np.sqrt(np.maximum(2.0 - 2.0 * sim, 0.0))


def match_descriptors_reference(
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
    """The matcher as it was before the fused kernels (kept verbatim: the fallback without numba, and the reference
    of the tests and of ``scripts/bench_match.py``). Match descriptors ``d0`` (N0, D) to ``d1`` (N1, D) by nearest neighbour of their L2-normalised forms.

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
# the fused matcher (numba kernels; falls back to the reference without numba)


def _kernels():
    """The numba kernels, or None where numba is not installed (the reference matcher is used then)."""
    global _kernel_module
    if _kernel_module is None:
        try:
            from . import matching_kernels
        except ImportError:  # pragma: no cover - numba is a dependency; kept for stripped installs
            logger.warning("numba is not installed: matching falls back to the slower numpy matcher")
            matching_kernels = False
        _kernel_module = matching_kernels
    return _kernel_module or None


_kernel_module = None


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def gram(desc: np.ndarray) -> np.ndarray:
    """(D + 1, D + 1) float64 moments of (N, D) descriptors: ``[d, 1].T @ [d, 1]`` (second moments, sums, count).
    The screen's basis of a pair comes from ``gram(d0) + gram(d1)`` (pass them to :func:`match_descriptors` to
    compute them once per image)."""
    d = np.asarray(desc, np.float32)
    g = np.empty((d.shape[1] + 1,) * 2, np.float64)
    with one_blas_thread():  # the same rounding wherever it is called from
        g[:-1, :-1] = d.T @ d
    g[:-1, -1] = g[-1, :-1] = d.sum(0, dtype=np.float64)
    g[-1, -1] = len(d)
    return g


def screen_basis(g: np.ndarray, n0: int, n1: int, dims: int | str | None = "auto") -> np.ndarray | None:
    """(D, k) float32 orthonormal basis the screen projects a pair onto (None: match exactly), from the pair's
    moments ``g`` (:func:`gram`): the mean direction, then the principal axes of the centred descriptors (the mean
    carries most of the energy of non-negative descriptors such as RootSIFT and tells none of them apart). "auto":
    the fewest axes (a multiple of 8, at least D / 4) holding ``SCREEN_ENERGY`` of the centred variance; None where
    ``SCREEN_FLAT_ENERGY`` of it needs more than half of D (a flat spectrum: too few axes would tell too little)."""
    D = g.shape[0] - 1
    if dims in (None, 0, False) or min(n0, n1) < SCREEN_MIN_KEYPOINTS or g[-1, -1] <= 0:
        return None
    mean = g[:-1, -1] / g[-1, -1]
    cov = g[:-1, :-1] / g[-1, -1] - np.outer(mean, mean)
    norm = np.linalg.norm(mean)
    u = mean / norm if norm > 1e-6 else None
    if u is not None:  # the axes orthogonal to the mean
        q = np.eye(D) - np.outer(u, u)
        cov = q @ cov @ q
    w, v = np.linalg.eigh(cov)
    w, v = np.clip(w[::-1], 0, None), v[:, ::-1]
    if dims == "auto":
        if w.sum() <= 0:
            return None
        share = np.cumsum(w) / w.sum()
        if np.searchsorted(share, SCREEN_FLAT_ENERGY) + 1 > D // 2:
            return None  # too flat: a screen on few axes would miss neighbours
        k = int(np.searchsorted(share, SCREEN_ENERGY) + 1)
        k = max(-(-k // 8) * 8, D // 4)  # never fewer than a quarter (RootSIFT: 16 axes hold 70 %, too few)
    else:
        k = int(dims)
        if not 0 < k < D:
            return None
    axes = v[:, : k - 1] if u is not None else v[:, :k]
    basis = np.concatenate([u[:, None], axes], axis=1) if u is not None else axes
    return np.ascontiguousarray(basis, np.float32)


def _top_lists(kern, a, b, T, threads):
    """Row and column top-T lists (values, indices) of the similarity matrix ``a @ b.T``, tile by tile. Threads take
    interleaved row bands, each with its own column lists; the column lists come back side by side (N1, T * threads)."""
    n0, n1 = len(a), len(b)
    cols_t = [(c, np.ascontiguousarray(b[c : c + TILE].T)) for c in range(0, n1, TILE)]
    rows = _empty_lists(n0, T)
    bands = list(range(0, n0, TILE))
    threads = max(1, min(threads, len(bands)))

    def work(w):
        cols = _empty_lists(n1, T)
        buf = np.empty(TILE * TILE, np.float32)
        for r0 in bands[w::threads]:
            blk = a[r0 : r0 + TILE]
            for c0, bt in cols_t:
                S = buf[: len(blk) * bt.shape[1]].reshape(len(blk), bt.shape[1])
                np.matmul(blk, bt, out=S)
                kern.topk_tile(S, r0, c0, rows, cols)
        return cols[:2]

    if threads == 1:
        parts = [work(0)]
    else:
        with ThreadPoolExecutor(threads) as pool:
            parts = list(pool.map(work, range(threads)))
    cv = np.concatenate([p[0] for p in parts], axis=1)
    ci = np.concatenate([p[1] for p in parts], axis=1)
    return rows[0], rows[1], cv, ci


def _empty_lists(n: int, T: int) -> tuple:
    """n empty top-T lists for :func:`cd_sfm.matching_kernels.topk_tile`: values, indices, bars, slots of the bars."""
    return (np.full((n, T), -np.inf, np.float32), np.full((n, T), -1, np.int32), np.full(n, -np.inf, np.float32),
            np.zeros(n, np.int64))


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
    screen: int | str | None = 0,
    screen_k: int = SCREEN_K,
    threads: int | None = None,
    grams: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Match descriptors ``d0`` (N0, D) to ``d1`` (N1, D) by nearest neighbour of their L2-normalised forms.

    A nearest neighbour j of i is kept when (all that apply): ``dist(i, j) < ratio * dist(i, second nearest)``
    (passes when N1 == 1), ``dist(i, j) <= distance_threshold``, and i is j's nearest neighbour (``mutual``).
    ``metric`` is "l2" (Euclidean) or "angle" (radians). ``normalized``: the inputs already have unit rows (float32).
    ``cross_ratio``: the ratio test must also pass the other way (j's nearest neighbour i against j's second nearest
    in ``d0``), as COLMAP's cross check does; it drops ambiguous matches on repeated structures.

    One pass over the similarity matrix, in cache-sized tiles, keeps the top values of every row and every column at
    once (numba kernels, ``threads`` threads over row bands; default: the usable cores), so the cross ratio costs no
    second product. ``screen`` (off in this function; the pipeline's default matching options turn it on): with
    "auto" and at least ``SCREEN_MIN_KEYPOINTS`` descriptors on each side, that pass runs on the descriptors
    projected onto the pair's mean direction and principal axes (:func:`screen_basis`; 40-48 of 128 for
    cd-sfm-v2-mini's descriptors, 32 for RootSIFT), keeping ``screen_k`` candidates per row and column, whose
    exact similarities then decide: nearly the same matches, but for a candidate the projection ranked too low (on
    24 pairs of four real scenes at 8k keypoints, cd-sfm-v2-mini, one thread a pair as the match stage runs them:
    99.96 % of the exact matches found, 0.32 % extra ones whose true second neighbour the screen missed, 99.83 % found
    on the worst pair; the 0.7 share of earlier versions, 48-56 axes: 99.997 % and 0.06 %). It pays where the
    similarity product is the bottleneck (``scripts/bench_match.py``: 1.7x the exact pass on a 2-core AVX2 CPU, 1.5x
    with 0.7; on another CPU no faster). An int: that many axes; 0 / None: exact.
    ``grams``: ``(gram(d0), gram(d1))`` precomputed. Without numba, and for pairs of fewer than ``FUSED_MIN_PAIRS``
    similarities (where it is faster): :func:`match_descriptors_reference` (``block_rows`` rows at a time).

    Returns ``matches0`` (N0,) int32 (-1 = unmatched) and ``scores0`` (N0,) float32 = (cosine + 1) / 2 (0 unmatched).
    """
    kern = _kernels()
    if kern is None or len(d0) * len(d1) < FUSED_MIN_PAIRS:
        # one thread a pair (the match stage's default, pairs in parallel): BLAS threads would only oversubscribe
        with one_blas_thread() if threads == 1 else contextlib.nullcontext():
            return match_descriptors_reference(d0, d1, ratio=ratio, mutual=mutual,
                                               distance_threshold=distance_threshold, metric=metric,
                                               normalized=normalized, block_rows=block_rows, cross_ratio=cross_ratio)
    with one_blas_thread():  # our threads split the work; BLAS threads on small tiles only fight over the cores
        return _match_fused(kern, d0, d1, ratio, mutual, distance_threshold, metric, normalized, cross_ratio, screen,
                            screen_k, threads, grams)


def _match_fused(kern, d0, d1, ratio, mutual, distance_threshold, metric, normalized, cross_ratio, screen, screen_k,
                 threads, grams):
    n0, n1 = len(d0), len(d1)
    matches0 = np.full(n0, -1, np.int32)
    scores0 = np.zeros(n0, np.float32)
    if n0 == 0 or n1 == 0:
        return matches0, scores0
    if not normalized:
        d0, d1 = normalize(d0), normalize(d1)
    if d0.shape[1] != d1.shape[1]:
        raise ValueError(f"descriptors of sizes {d0.shape[1]} and {d1.shape[1]} differ")
    d0 = np.ascontiguousarray(d0, np.float32)
    d1 = np.ascontiguousarray(d1, np.float32)
    threads = default_threads() if threads is None else max(1, int(threads))
    basis = None
    if screen and min(n0, n1) >= SCREEN_MIN_KEYPOINTS:
        g = grams[0] + grams[1] if grams is not None else gram(d0) + gram(d1)
        basis = screen_basis(g, n0, n1, screen)
    if basis is not None:
        T = max(2, int(screen_k))
        _, ri, _, ci = _top_lists(kern, d0 @ basis, d1 @ basis, T, threads)
        best, nn, second, col_best, col_second = kern.screen_top2(d0, d1, ri, ci)
    else:
        rv, ri, cv, ci = _top_lists(kern, d0, d1, 2, threads)
        best, nn, second = kern.top2(rv, ri)
        col_best, _, col_second = kern.top2(cv, ci)

    # the decisions of match_descriptors_reference, on these values
    dist = _distance(best, metric)
    keep = nn >= 0
    nn = np.maximum(nn, 0)
    if ratio is not None and n1 > 1:
        keep &= dist < ratio * _distance(second, metric)
    if distance_threshold is not None:
        keep &= dist <= distance_threshold
    if mutual:
        is_max = best >= col_best[nn]
        cand = np.flatnonzero(is_max)
        _, first = np.unique(nn[cand], return_index=True)
        mutual_ok = np.zeros(n0, bool)
        mutual_ok[cand[first]] = True
        keep &= mutual_ok
    if cross_ratio and ratio is not None and n0 > 1:
        # j's best among the rows other than i: its second when i is its best, else its best
        other = np.where(best == col_best[nn], col_second[nn], col_best[nn])
        keep &= dist < ratio * _distance(other, metric)
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

    def _entry(self, name: str) -> list:
        if name in self._items:
            self._items.move_to_end(name)
            return self._items[name]
        check_feature_entry(self.hfile[name], name, self.hfile.filename, need_descriptors=True)
        d = normalize(self.hfile[name]["descriptors"][()].T)  # stored (D, N)
        self.loads += 1
        self._items[name] = entry = [d, None]
        self.nbytes += d.nbytes
        while self.nbytes > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self.nbytes -= old[0].nbytes
        return entry

    def get(self, name: str) -> np.ndarray:
        return self._entry(name)[0]

    def gram(self, name: str) -> np.ndarray:
        """:func:`gram` of the image's descriptors, computed once while the image is cached."""
        entry = self._entry(name)
        if entry[1] is None:
            entry[1] = gram(entry[0])
        return entry[1]


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


MATCH_RESULT_KEYS = ("ratio", "mutual", "distance_threshold", "metric", "cross_ratio", "screen", "screen_k")


def matching_settings(conf: dict, features_path: Path) -> dict:
    """What makes two match files comparable (stamped in ``matches.h5``, checked on resume): the options that change
    the matches, and the settings stamp of the feature file they were made from."""
    return {"matching": {k: conf.get(k) for k in MATCH_RESULT_KEYS}, "features": file_settings(features_path)}


def _stale_pairs(matches_path: Path, done: set[str], versions: dict[str, str]) -> set[str]:
    """Pair keys in the match file made from other versions of their images than those now in the feature file
    (an image replaced in place and extracted again). Entries without a record count as current."""
    by_key: dict[str, tuple[str, str]] = {}
    for n, v in versions.items():
        by_key[n.replace("/", "-")] = (n, v)
    stale = set()
    for key, attrs in entry_attrs(matches_path, done).items():
        rec = attrs.get("features")
        if rec is None or len(rec) != 2:
            continue
        parts = key.split("/")
        if len(parts) != 2 or parts[0] not in by_key or parts[1] not in by_key:
            continue
        if [by_key[parts[0]][1], by_key[parts[1]][1]] != [str(x) for x in rec]:
            stale.add(key)
    return stale


class PairMatcher:
    """Matches batches of pairs: the worker of the match stage, in this process or on a Ray actor
    (:mod:`cd_sfm.executors`). Reads descriptors from the feature file (opened once, LRU cache), or takes those the
    driver ships (``read=False``: no shared file system)."""

    def __init__(self, conf: dict, features_path: str, read: bool = True):
        self.conf = resolve_conf(conf)
        self.opts = match_options(self.conf)
        self.features_path = str(features_path)
        self.hfile = h5py.File(self.features_path, "r", libver="latest") if read else None
        self.cache = DescriptorCache(self.hfile, self.conf["cache_mb"]) if read else None
        workers = pair_workers(self.conf)
        self.pool = ThreadPoolExecutor(workers) if workers > 1 else None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        if self.hfile is not None:
            self.hfile.close()

    def match(self, batch: list[tuple[str, str]], shipped: dict[str, np.ndarray] | None = None) -> list:
        """[((name0, name1), matches0, scores0 float16)] of the batch. ``shipped``: stored (D, N) descriptors by
        image name."""
        screen = bool(self.opts["screen"])
        if shipped is not None:
            normed = {n: normalize(d.T) for n, d in shipped.items()}
            grams = {n: gram(d) for n, d in normed.items()} if screen else {}
            desc, gram_of = normed.__getitem__, grams.get
        else:
            desc, gram_of = self.cache.get, self.cache.gram
        work = []
        for a, b in batch:
            d0, d1 = desc(a), desc(b)
            if d0.shape[1] != d1.shape[1] and len(d0) and len(d1):
                raise CdSfmError(f"{self.features_path}: descriptors of {a} and {b} differ in size "
                                 f"({d0.shape[1]} vs {d1.shape[1]}); mixed feature types?")
            work.append((d0, d1, (gram_of(a), gram_of(b)) if screen else None))

        def run(w):
            return match_descriptors(w[0], w[1], grams=w[2], **self.opts)

        results = self.pool.map(run, work) if self.pool else map(run, work)
        return [(p, m0, s0.astype(np.float16)) for p, (m0, s0) in zip(batch, results)]


def main(
    conf: dict | str,
    pairs_path: str | Path | Iterable[tuple[str, str]],
    features_path: str | Path,
    matches_path: str | Path,
    overwrite: bool = False,
    progress: bool = True,
    executor=None,
) -> dict:
    """Match every pair of ``pairs_path`` (a pair file, or a list of name pairs) with the descriptors of
    ``features_path`` into ``matches_path``.

    Pairs already in ``matches_path`` (in either order) are reused unless ``overwrite``; self pairs and repeats are
    dropped; pairs with an image missing from the feature file are skipped and listed. ``executor``: where the pairs
    are matched (:mod:`cd_sfm.executors`; default: in this process).

    Returns ``{"matched": n, "reused": n, "skipped": {pair_key: reason}, "num_matches_mean": x, "seconds": s,
    "matches_path": str}``.
    """
    from .executors import InProcess
    from .pairs import unique_pairs

    t0 = time.monotonic()
    conf = resolve_conf(conf)
    executor = executor or InProcess()
    features_path, matches_path = Path(features_path), Path(matches_path)
    pairs = parse_pairs(pairs_path) if isinstance(pairs_path, (str, Path)) else [tuple(p) for p in pairs_path]
    unique = unique_pairs(pairs)
    if not features_path.exists():
        raise CdSfmError(f"{features_path}: feature file not found (run the extraction first)")
    merge_parts(features_path)  # entries a killed extraction left in part files
    try:
        have = set(list_h5_names(features_path))
    except OSError as e:
        raise CdSfmError(f"{features_path}: unreadable feature file ({e})") from e

    settings = matching_settings(conf, features_path)
    if not overwrite:
        check_file_settings(matches_path, settings, "matches")
    done = set() if overwrite else completed_names(matches_path)
    # each image's version (its file's size and time when its features were extracted): a pair is reused only if
    # both of its images are still the ones it was matched with
    versions = {n: feature_version(a) for n, a in entry_attrs(features_path, sorted({n for p in unique for n in p}
                                                                              if have else [])).items()}
    stale = _stale_pairs(matches_path, done, versions) if done else set()
    skipped: dict[str, str] = {}
    todo = []
    reused = 0
    for a, b in unique:
        if done and _pair_done(a, b, done) and names_to_pair(a, b) not in stale and names_to_pair(b, a) not in stale:
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
        bs = max(1, int(executor.match_batch or conf["batch_size"]))
        with h5py.File(features_path, "r", libver="latest") as hfile:
            for n in dict.fromkeys(x for p in todo for x in p):  # damaged entries: one line before any work
                check_feature_entry(hfile[n], n, features_path, need_descriptors=True)
            # tile order: consecutive pairs share images, so that two tiles of images fit in a worker's cache (or
            # each shipped batch stays small)
            shape = hfile[todo[0][0]]["descriptors"].shape
            per_image = max(1, shape[0] * max(shape[1], 1) * 4)
            capacity = max(2, int(conf["cache_mb"] * 2**20 // per_image))
            todo = _tile_order(todo, max(1, bs // 2 if executor.remote else capacity // 2))
            batches = [todo[i : i + bs] for i in range(0, len(todo), bs)]

            def tasks():
                for batch in batches:
                    if executor.ships_data:
                        yield batch, {x: hfile[x]["descriptors"][()] for x in dict.fromkeys(n for p in batch for n in p)}
                    else:
                        yield (batch,)

            logger.info("Matching %d pair(s) into %s", len(todo), matches_path)
            # a part file every 1024 pairs or two seconds: a killed run loses at most that much work
            with H5Appender(matches_path, flush_every=1024, flush_seconds=2.0, settings=settings) as out, \
                    tqdm(total=len(todo), desc="match", unit="pair", disable=not progress) as bar:
                for results in executor.run(PairMatcher, (conf, str(features_path.resolve()),
                                                          not executor.ships_data), "match", tasks(), len(batches)):
                    for (a, b), m0, s0 in results:
                        out.add(names_to_pair(a, b), {"matches0": m0, "matching_scores0": s0,
                                                      ATTRS_KEY: {"features": [versions.get(a, ""),
                                                                               versions.get(b, "")]}})
                        total_matches += int((m0 >= 0).sum())
                        matched += 1
                    bar.update(len(results))
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
