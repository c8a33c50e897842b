#!/usr/bin/env python
"""Matching speed per image pair: our matcher against today's reference and COLMAP's CPU matcher, on the same real
ContextDesc descriptors, in one run.

    python scripts/bench_match.py [--images DIR] [--num 4] [--sizes 2048 4096 8192] [--reps 5] [--cache DIR]
                                  [--screen-axes 48 40 32] [--no-colmap] [--no-faiss]

Descriptors: the ``contextdesc`` preset (the shipped model, 8192 keypoints, the pipeline's default extraction) of the
first ``--num`` images of ``--images`` (default ``../shared/data/strecha_entry-P10_half/images``), extracted once into
``--cache`` (default a folder under the system temp dir) and reused; the 2k / 4k sets are the first keypoints of the
8k set (the largest first, as the extractor orders them). Pairs: every pair of those images.

Methods, all with the pipeline's default matching (mutual nearest neighbour, Lowe ratio 0.8, ``cross_ratio``), one
pair at a time on all usable cores but for the last:

* ``reference``: :func:`cd_sfm.matching.match_descriptors_reference`, the matcher as it was before the fused kernels
  (kept verbatim), BLAS with its default threads: the baseline of every ratio;
* ``fused``: :func:`cd_sfm.matching.match_descriptors` as the pipeline calls it (one pass over cache-sized tiles,
  row and column top-2 at once; the reference matcher below ``FUSED_MIN_PAIRS`` similarities);
* ``fused-screen``: the same with ``screen="auto"`` (principal-axes screen + exact rescoring, from 6144 keypoints;
  the per-image moments precomputed as ``matching.main`` caches them);
* ``screen-N`` (``--screen-axes N ...``): the screen on exactly N axes (``screen: N``), the trade-off behind
  ``auto``'s choice;
* ``fused-screen, parallel pairs``: the match stage's default: all pairs of the set with ``screen="auto"``, as many
  at once as there are usable cores, each on one thread (``matching.pair_workers``); its seconds per pair are the
  best round's time over the set divided by the number of pairs (throughput, not the latency of one pair);
* ``faiss`` (where ``faiss`` imports: ``pip install faiss-cpu``; not a dependency): the library answer to exact
  inner-product top-k on CPU, ``faiss.IndexFlatIP`` (BLAS blocks + top-k selection, its AVX2 / AVX512 build), top-2
  both ways, then the same decisions (mutual, ratio both ways);
* ``colmap``: COLMAP's CPU SIFT matcher (``pycolmap.FeatureMatcher`` with ``max_ratio`` 0.8, ``cross_check``, no
  distance limit), on the uint8 descriptors our database stores (``descriptors_to_uint8``); it is slow, so it runs
  ``--colmap-reps`` times on ``--colmap-pairs`` pairs.

Repetitions are interleaved (each round runs every method on every pair, in a rotating order) and each method keeps,
per pair, its best time (the machine is shared). Printed per size: seconds per pair (mean over the pairs of the best
times), pairs/s, the speed-up over ``reference`` measured in this run, the number of matches and the agreement with
``reference``: the share of its matches the method found too, and the share of the method's matches that
``reference`` found too (1 = the same match set).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("bench")


def cpu_description() -> str:
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name}, {len(os.sched_getaffinity(0))} cores, {' '.join(simd) or 'no AVX2'}"


def load_descriptors(images: Path, num: int, cache: Path) -> dict[str, np.ndarray]:
    import h5py

    from cd_sfm.features import extract
    from cd_sfm.images import list_images

    names = list_images(images)[:num]
    if len(names) < 2:
        raise SystemExit(f"{images}: needs at least 2 images")
    feats = cache / f"contextdesc-{images.parent.name}-{images.name}.h5"
    cache.mkdir(parents=True, exist_ok=True)
    extract.main("contextdesc", images, feats, image_list=names, progress=False)  # reuses what is there
    with h5py.File(feats, "r") as f:
        return {n: np.asarray(f[n]["descriptors"][()], np.float32).T for n in names}  # (N, D)


def agreement(m: np.ndarray, ref: np.ndarray) -> tuple[int, int]:
    """(matches in common, matches of m) of two matches0 arrays."""
    a = set(zip(np.flatnonzero(m >= 0).tolist(), m[m >= 0].tolist()))
    b = set(zip(np.flatnonzero(ref >= 0).tolist(), ref[ref >= 0].tolist()))
    return len(a & b), len(a)


def faiss_module():
    """``faiss`` on all usable cores, or None where it is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    from cd_sfm.matching import default_threads

    faiss.omp_set_num_threads(default_threads())
    return faiss


def faiss_match(faiss, d0: np.ndarray, d1: np.ndarray, ratio: float) -> np.ndarray:
    """Exact top-2 of unit descriptors both ways with ``IndexFlatIP``, then mutual nearest neighbours and Lowe's
    ratio on the distances both ways (the pipeline's default decisions); matches0 (-1 = none)."""
    def top2(db, queries):
        index = faiss.IndexFlatIP(db.shape[1])
        index.add(db)
        sim, idx = index.search(queries, 2)
        return np.sqrt(np.maximum(2.0 - 2.0 * sim, 0.0)), idx

    d01, n01 = top2(d1, d0)
    d10, n10 = top2(d0, d1)
    nn = n01[:, 0]
    keep = (nn >= 0) & (n10[nn, 0] == np.arange(len(d0)))
    keep &= (d01[:, 0] < ratio * d01[:, 1]) & (d10[nn, 0] < ratio * d10[nn, 1])
    return np.where(keep, nn, -1).astype(np.int32)


def colmap_matcher():
    import pycolmap

    o = pycolmap.FeatureMatchingOptions()
    o.sift.max_ratio = 0.8
    o.sift.cross_check = True
    o.sift.max_distance = 4.0  # radians: no limit (the pipeline's default has none)
    o.max_num_matches = 1 << 20
    return pycolmap.FeatureMatcher.create(o, pycolmap.Device.cpu)


def colmap_match(matcher, u0: np.ndarray, u1: np.ndarray) -> np.ndarray:
    import pycolmap

    t = pycolmap.FeatureExtractorType.SIFT
    m = matcher.match(None, pycolmap.FeatureDescriptors(t, u0), None, pycolmap.FeatureDescriptors(t, u1))
    out = np.full(len(u0), -1, np.int32)
    out[m[:, 0].astype(np.int64)] = m[:, 1].astype(np.int32)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "data" / "strecha_entry-P10_half" / "images")
    ap.add_argument("--num", type=int, default=4, help="images (every pair of them is matched)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--reps", type=int, default=5, help="interleaved rounds (best time per pair)")
    ap.add_argument("--colmap-pairs", type=int, default=1)
    ap.add_argument("--colmap-reps", type=int, default=1)
    ap.add_argument("--no-colmap", action="store_true")
    ap.add_argument("--no-faiss", action="store_true", help="skip FAISS even where it is installed")
    ap.add_argument("--screen-axes", type=int, nargs="*", default=[],
                    help="also time the screen on exactly these many principal axes (methods screen-N): the "
                         "trade-off behind screen: auto")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "cd_sfm_bench_match")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("cd_sfm", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import numba

    from cd_sfm import matching
    from cd_sfm.colmap.database import descriptors_to_uint8

    if not args.images.is_dir():
        raise SystemExit(f"{args.images}: no such folder (pass --images)")
    descs = load_descriptors(args.images, args.num, args.cache)
    names = sorted(descs)
    pairs = list(itertools.combinations(names, 2))
    base = {**matching.confs["NN-ratio"], "cross_ratio": True}
    opts = matching.match_options(matching.resolve_conf({**base, "num_workers": 1}))  # one pair on every core
    stage = matching.resolve_conf({**base, "screen": "auto"})  # the match stage's default: pairs in parallel
    workers, stage_opts = matching.pair_workers(stage), matching.match_options(stage)
    ref_opts = {k: opts[k] for k in ("ratio", "mutual", "distance_threshold", "metric", "normalized", "block_rows",
                                     "cross_ratio")}
    colmap = None if args.no_colmap else colmap_matcher()
    faiss = None if args.no_faiss else faiss_module()

    print(f"# bench_match {time.strftime('%Y-%m-%d %H:%M')}, {cpu_description()}, load average "
          f"{os.getloadavg()[0]:.1f}; numpy {np.__version__}, numba {numba.__version__}; {len(pairs)} pairs of "
          f"{args.images}; {args.reps} rounds (colmap: {args.colmap_reps} on {args.colmap_pairs} pair(s))")
    print("| keypoints | method | s / pair | pairs / s | speed-up | matches | of reference's found | found in reference |")
    print("|---|---|---|---|---|---|---|---|")
    # warm up (numba compilation or cache load)
    d = matching.normalize(descs[names[0]][:2048])
    for screen in (0, "auto"):
        matching.match_descriptors(d, d, **{**opts, "screen": screen})
        matching.match_descriptors(*([matching.normalize(descs[names[0]])] * 2), **{**opts, "screen": screen})

    for n in args.sizes:
        nd = {k: matching.normalize(v[:n]) for k, v in descs.items()}
        grams = {k: matching.gram(v) for k, v in nd.items()}
        u8 = {k: descriptors_to_uint8(v, "auto") for k, v in nd.items()}
        methods = {
            "reference": lambda a, b: matching.match_descriptors_reference(nd[a], nd[b], **ref_opts)[0],
            "fused": lambda a, b: matching.match_descriptors(nd[a], nd[b], **opts)[0],
            "fused-screen": lambda a, b: matching.match_descriptors(nd[a], nd[b], grams=(grams[a], grams[b]),
                                                                  **{**opts, "screen": "auto"})[0],
        }
        for axes in args.screen_axes:
            methods[f"screen-{axes}"] = lambda a, b, axes=axes: matching.match_descriptors(
                nd[a], nd[b], grams=(grams[a], grams[b]), **{**opts, "screen": axes})[0]
        if faiss is not None:
            methods["faiss"] = lambda a, b: faiss_match(faiss, nd[a], nd[b], base["ratio"])
        if colmap is not None:
            methods["colmap"] = lambda a, b: colmap_match(colmap, u8[a], u8[b])
        best: dict[tuple[str, tuple], float] = {}
        out: dict[tuple[str, tuple], np.ndarray] = {}
        order = list(methods)
        par = "fused-screen, parallel pairs"
        best_set = np.inf
        for r in range(args.reps):
            order = order[1:] + order[:1]  # rotate
            for p in pairs:
                for m in order:
                    if m == "colmap" and (r >= args.colmap_reps or pairs.index(p) >= args.colmap_pairs):
                        continue
                    t0 = time.perf_counter()
                    res = methods[m](*p)
                    dt = time.perf_counter() - t0
                    best[m, p] = min(best.get((m, p), np.inf), dt)
                    out[m, p] = res
            t0 = time.perf_counter()
            with ThreadPoolExecutor(workers) as pool:
                res = list(pool.map(lambda p: matching.match_descriptors(
                    nd[p[0]], nd[p[1]], grams=(grams[p[0]], grams[p[1]]), **stage_opts)[0], pairs))
            best_set = min(best_set, time.perf_counter() - t0)
            for p, m0 in zip(pairs, res):
                best[par, p], out[par, p] = best_set / len(pairs), m0
        methods[par] = None
        ref_time = None
        for m in methods:
            ps = [p for p in pairs if (m, p) in best]
            sec = float(np.mean([best[m, p] for p in ps]))
            ref_sec = float(np.mean([best["reference", p] for p in ps]))
            if m == "reference":
                ref_time = sec
            common = [agreement(out[m, p], out["reference", p]) for p in ps]
            n_ref = sum(int((out["reference", p] >= 0).sum()) for p in ps)
            n_common, n_own = sum(c for c, _ in common), sum(o for _, o in common)
            own = f"{n_own / len(ps):.0f}" + (f" (reference {n_ref / len(ps):.0f})" if len(ps) < len(pairs) else "")
            print(f"| {n} | {m} | {sec:.3f} | {1 / sec:.2f} | {ref_sec / sec:.2f}x | {own} | "
                  f"{n_common / max(n_ref, 1):.4f} | {n_common / max(n_own, 1):.4f} |", flush=True)
        assert ref_time is not None
    return 0


if __name__ == "__main__":
    sys.exit(main())
