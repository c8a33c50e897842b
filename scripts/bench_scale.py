#!/usr/bin/env python
"""How the pair, matching and database stages grow with the number of images N: exhaustive vs retrieval pairs.

No photos: descriptors are generated (global descriptors clustered into "places", local descriptors random unit
vectors), so the numbers are about the machinery, not about accuracy. For each N (default 1k, 2k, 5k, 10k) and each
pair strategy:

* pairs: the pair stage itself (``pairs.exhaustive.main`` / ``pairs.retrieval.main``, reading the global descriptors
  from their h5 file and writing pairs.txt), measured in a fresh child process: wall time, tracemalloc peak (Python and
  numpy allocations) and the child's peak RSS. Exhaustive runs above ``--max-measured-pairs`` pairs are extrapolated
  from the measured ones with the fitted power law (marked ``~``).
* global: the retrieval's global descriptors (VLAD of each image's local descriptors, codebook given): per-image cost
  measured on a sample, times N (``~``).
* match: ``matching.main`` measured on a sample of pairs with generated local descriptors (``--keypoints`` per image);
  time per pair times the number of pairs (``~``); its peak memory is that of the sample (bounded by the descriptor
  cache, independent of N).
* database: ``colmap.database.main`` (keypoints of every image + raw matches of every pair) measured in a child process
  when the pair count is at most ``--max-db-pairs``, otherwise from a linear model time = c + a N + b pairs (and
  memory likewise) fitted on the measured runs and an exhaustive calibration run (``~``).

The table prints time and peak memory per stage, N and strategy, the exhaustive / retrieval ratios, and the growth
exponent e of each series (least-squares fit of time ~ N^e over the Ns): about 2 for exhaustive, about 1 for
retrieval.

    python scripts/bench_scale.py [--ns 1000 2000 5000 10000] [--neighbors 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

MB = 2**20


# --------------------------------------------------------------------------------------------------------------------
# data generation


def image_names(n: int) -> list[str]:
    return [f"img{i:06d}.jpg" for i in range(n)]


def write_global(path: Path, n: int, dim: int, seed: int = 0, places: int | None = None) -> None:
    """Global descriptors of n images seen from n/10 places (images of a place are near one another)."""
    from cd_sfm.globaldesc import GLOBAL_KEY
    from cd_sfm.io import H5Appender

    rng = np.random.default_rng(seed)
    places = places or max(1, n // 10)
    centres = rng.normal(size=(places, dim)).astype(np.float32)
    which = rng.integers(0, places, n)
    x = centres[which] + 0.5 * rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with H5Appender(path, flush_every=4096) as out:
        for name, v in zip(image_names(n), x):
            out.add(name, {GLOBAL_KEY: v.astype(np.float16)})


def write_features(path: Path, names: list[str], n_kpts: int, dim: int = 128, seed: int = 0,
                   descriptors: bool = True) -> None:
    from cd_sfm.io import H5Appender, features_to_h5

    rng = np.random.default_rng(seed)
    with H5Appender(path, flush_every=256) as out:
        for name in names:
            d = rng.normal(size=(n_kpts, dim)).astype(np.float32)
            d /= np.linalg.norm(d, axis=1, keepdims=True)
            feats = {"keypoints": rng.uniform(0, 1000, (n_kpts, 2)), "descriptors": d if descriptors else d[:, :0],
                     "scores": np.ones(n_kpts), "image_size": np.array([1000, 1000]),
                     "scales": np.full(n_kpts, 4.0), "orientations": np.zeros(n_kpts)}
            out.add(name, features_to_h5(feats))


def write_matches(path: Path, pairs: list[tuple[str, str]], n_kpts: int, n_matches: int, seed: int = 0) -> None:
    from cd_sfm.io import H5Appender, names_to_pair

    rng = np.random.default_rng(seed)
    m0 = np.full(n_kpts, -1, np.int32)
    m0[:n_matches] = rng.permutation(n_kpts)[:n_matches]
    s0 = np.ones(n_kpts, np.float16)
    with H5Appender(path, flush_every=4096) as out:
        for a, b in pairs:
            out.add(names_to_pair(a, b), {"matches0": m0, "matching_scores0": s0})


# --------------------------------------------------------------------------------------------------------------------
# measuring in a child process


def _child(fn, args, queue):
    tracemalloc.start()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    extra = fn(*args)
    dt = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    queue.put({"seconds": dt, "tracemalloc_mb": peak / MB, "rss_mb": rss / 1024, "rss_start_mb": rss0 / 1024,
               **(extra or {})})


def measure(fn, *args) -> dict:
    """Run fn(*args) in a fresh process (spawned: no memory inherited); time and peak memory."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(fn, args, q))
    p.start()
    out = q.get()
    p.join()
    if p.exitcode:
        raise RuntimeError(f"measurement of {fn.__name__} failed ({p.exitcode})")
    return out


# jobs (module level, so that spawned children can import them)


def job_exhaustive(n: int, out: str) -> dict:
    from cd_sfm.pairs import exhaustive

    return {"pairs": len(exhaustive.main(image_names(n), out))}


def job_retrieval(n: int, gpath: str, out: str, k: int) -> dict:
    from cd_sfm.pairs import retrieval

    return {"pairs": len(retrieval.main({"num_neighbors": k}, image_names(n), gpath, out))}


def job_match(pairs_path: str, feats: str, matches: str) -> dict:
    from cd_sfm import matching

    st = matching.main("NN-ratio", pairs_path, feats, matches, progress=False)
    return {"pairs": st["matched"]}


def job_database(db: str, feats: str, pairs_path: str, matches: str) -> dict:
    import logging

    from cd_sfm.colmap import database, quiet_colmap

    logging.getLogger("cd_sfm").setLevel(logging.WARNING)
    quiet_colmap(logging.WARNING)
    st = database.main({"descriptor_uint8": "none", "camera_mode": "single"}, db, feats, None, pairs_path, matches)
    return {"pairs": st["num_pairs"]}


def job_vlad(feats: str, names: list[str], k: int) -> dict:
    from cd_sfm import globaldesc as gd

    conf = gd.GlobalConf(method="vlad", num_clusters=k)
    arrays = gd.learn_local_model(Path(feats), names, conf)
    t = time.perf_counter()
    for _, d in gd.iter_local_descriptors(Path(feats), names):
        gd.local_global_descriptor(d, arrays, conf)
    return {"per_image_s": (time.perf_counter() - t) / len(names)}


# --------------------------------------------------------------------------------------------------------------------


def fit_power(ns, ys) -> tuple[float, float]:
    """(exponent, coefficient) of y = c N^e, least squares in log-log."""
    ns, ys = np.asarray(ns, float), np.asarray(ys, float)
    ok = ys > 0
    if ok.sum() < 2:
        return float("nan"), float("nan")
    e, logc = np.polyfit(np.log(ns[ok]), np.log(ys[ok]), 1)
    return float(e), float(np.exp(logc))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", type=int, nargs="+", default=[1000, 2000, 5000, 10000])
    ap.add_argument("--neighbors", type=int, default=5)
    ap.add_argument("--global-dim", type=int, default=512)
    ap.add_argument("--keypoints", type=int, default=2048, help="local features per image (matching, database)")
    ap.add_argument("--matches-per-pair", type=int, default=200, help="raw matches per pair written to the database")
    ap.add_argument("--match-sample", type=int, default=60, help="pairs matched to time one pair")
    ap.add_argument("--max-measured-pairs", type=int, default=3_000_000, help="exhaustive pair lists beyond are fitted")
    ap.add_argument("--max-db-pairs", type=int, default=60_000, help="database runs beyond are fitted")
    ap.add_argument("--threads", type=int, default=1,
                    help="BLAS / OpenMP threads of the measured processes (1: stable numbers on a shared machine)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    ns = sorted(args.ns)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # inherited by the spawned measurement processes
    k = args.neighbors
    tmp = tempfile.TemporaryDirectory(dir=args.workdir)
    work = Path(tmp.name)
    print(f"# bench_scale: N = {ns}, K = {k}, global dim {args.global_dim}, {args.keypoints} keypoints/image, "
          f"{args.threads} BLAS thread(s), {os.cpu_count()} CPUs", flush=True)
    res: dict = {"pairs": {}, "global": {}, "match": {}, "database": {}}
    npairs: dict = {}

    # ---- pair generation
    for n in ns:
        gpath = work / f"global-{n}.h5"
        write_global(gpath, n, args.global_dim)
        r = measure(job_retrieval, n, str(gpath), str(work / f"pairs-retrieval-{n}.txt"), k)
        res["pairs"][("retrieval", n)] = r
        npairs[("retrieval", n)] = r["pairs"]
        npairs[("exhaustive", n)] = n * (n - 1) // 2
        if npairs[("exhaustive", n)] <= args.max_measured_pairs:
            res["pairs"][("exhaustive", n)] = measure(job_exhaustive, n, str(work / f"pairs-exhaustive-{n}.txt"))
            (work / f"pairs-exhaustive-{n}.txt").unlink()
        print(f"  pairs N={n}: retrieval {r['seconds']:.2f}s ({r['pairs']} pairs)"
              + (f", exhaustive {res['pairs'][('exhaustive', n)]['seconds']:.2f}s"
                 if ("exhaustive", n) in res["pairs"] else ""), flush=True)
    if sum(1 for (st, _) in res["pairs"] if st == "exhaustive") < 2:  # the fit needs two measured points
        for n in (300, 600):
            res["pairs"][("exhaustive", n)] = measure(job_exhaustive, n, str(work / "p.txt"))
    xs = sorted(m for (st, m) in res["pairs"] if st == "exhaustive")
    for key in ("seconds", "tracemalloc_mb", "rss_mb"):
        # fit on the number of pairs, which is what the stage is linear in
        e, c = fit_power([m * (m - 1) // 2 for m in xs], [res["pairs"][("exhaustive", m)][key] for m in xs])
        for n in ns:
            if n not in xs:
                res["pairs"].setdefault(("exhaustive", n), {"fitted": True})[key] = c * (n * (n - 1) / 2) ** e

    # ---- global descriptors (per image, times N)
    names = image_names(64)
    feats = work / "features-sample.h5"
    write_features(feats, names, args.keypoints)
    v = measure(job_vlad, str(feats), names, 64)
    for n in ns:
        res["global"][("retrieval", n)] = {"seconds": v["per_image_s"] * n, "tracemalloc_mb": v["tracemalloc_mb"],
                                           "rss_mb": v["rss_mb"], "fitted": True}

    # ---- matching: time per pair on a sample
    rng = np.random.default_rng(0)
    sample = set()
    while len(sample) < args.match_sample:
        a, b = sorted(rng.choice(len(names), 2, replace=False))
        sample.add((names[a], names[b]))
    from cd_sfm.io import write_pairs

    write_pairs(work / "pairs-sample.txt", sorted(sample))
    m = measure(job_match, str(work / "pairs-sample.txt"), str(feats), str(work / "matches-sample.h5"))
    per_pair = m["seconds"] / m["pairs"]
    for (s, n), p in npairs.items():
        res["match"][(s, n)] = {"seconds": per_pair * p, "tracemalloc_mb": m["tracemalloc_mb"], "rss_mb": m["rss_mb"],
                                "fitted": True}
    print(f"  match: {per_pair * 1e3:.1f} ms per pair ({args.keypoints} x {args.keypoints} descriptors)", flush=True)

    # ---- database: measured where small enough, else a linear model in (N, pairs); the runs are the retrieval
    # ones (about K/2..K pairs per image) and an exhaustive calibration run (many pairs per image) so both terms show
    from cd_sfm.io import parse_pairs
    from cd_sfm.pairs import exhaustive

    db_runs = []
    runs = [(s, n) for n in ns for s in ("retrieval", "exhaustive") if npairs[(s, n)] <= args.max_db_pairs]
    n_cal = int((1 + np.sqrt(1 + 8 * min(args.max_db_pairs, 45_000))) / 2)
    runs.append(("calibration", n_cal))
    for s, n in runs:
        fpath = work / f"features-kp-{n}.h5"
        if not fpath.exists():
            write_features(fpath, image_names(n), args.keypoints, descriptors=False)
        ppath = work / f"pairs-{s}-{n}.txt"
        if s != "retrieval":
            exhaustive.main(image_names(n), ppath)
        mpath = work / f"matches-{s}-{n}.h5"
        write_matches(mpath, parse_pairs(ppath), args.keypoints, args.matches_per_pair)
        r = measure(job_database, str(work / f"db-{s}-{n}.db"), str(fpath), str(ppath), str(mpath))
        if s != "calibration":
            res["database"][(s, n)] = r
        db_runs.append((n, r["pairs"], r))
        print(f"  database N={n} {s}: {r['seconds']:.2f}s, {r['pairs']} pairs", flush=True)
        for f in (mpath, work / f"db-{s}-{n}.db"):
            f.unlink(missing_ok=True)
    a_mat = np.array([[1.0, nn, pp] for nn, pp, _ in db_runs], float)
    for key in ("seconds", "tracemalloc_mb", "rss_mb"):
        coef, *_ = np.linalg.lstsq(a_mat, np.array([r[key] for *_, r in db_runs]), rcond=None)
        for (s, n), p in npairs.items():
            if (s, n) not in res["database"] or res["database"][(s, n)].get("fitted"):
                res["database"].setdefault((s, n), {"fitted": True})[key] = max(0.0, coef[0] + coef[1] * n + coef[2] * p)

    # ---- report
    def fmt(d, key):
        v = d.get(key, float("nan"))
        mark = "~" if d.get("fitted") else " "
        return f"{mark}{v:9.2f}"

    print()
    print("time [s] and peak memory [MB] (tracemalloc / RSS); ~ = extrapolated or modelled from measured runs")
    header = f"{'stage':9s} {'pairs':10s} {'N':>6s} {'#pairs':>10s} {'time':>10s} {'tracemal':>10s} {'RSS':>10s}"
    print(header)
    print("-" * len(header))
    for stage in ("pairs", "global", "match", "database"):
        for s in ("exhaustive", "retrieval"):
            for n in ns:
                if (s, n) not in res[stage]:
                    continue
                d = res[stage][(s, n)]
                print(f"{stage:9s} {s:10s} {n:6d} {npairs[(s, n)]:10d} {fmt(d, 'seconds')} {fmt(d, 'tracemalloc_mb')} "
                      f"{fmt(d, 'rss_mb')}")
    print()
    print("totals (pairs + global + match + database) and growth exponents e (time ~ N^e over the Ns)")
    totals = {}
    for s in ("exhaustive", "retrieval"):
        for n in ns:
            totals[(s, n)] = sum(res[st][(s, n)]["seconds"] for st in res if (s, n) in res[st])
    for stage in [*res, "total"]:
        line = f"{stage:9s}"
        for s in ("exhaustive", "retrieval"):
            series = totals if stage == "total" else {key: d["seconds"] for key, d in res[stage].items()}
            pts = [(n, series[(s, n)]) for n in ns if (s, n) in series]
            if len(pts) >= 2:
                e, _ = fit_power(*zip(*pts))
                line += f"  {s} e={e:4.2f}"
            mem = None if stage == "total" else [res[stage][(s, n)].get("tracemalloc_mb") for n in ns
                                                  if (s, n) in res[stage]]
            if mem and len(mem) >= 2:
                e_mem, _ = fit_power([n for n in ns if (s, n) in res[stage]], mem)
                line += f" (memory e={e_mem:4.2f})"
        print(line)
    print()
    print("exhaustive / retrieval ratios")
    for n in ns:
        parts = [f"pairs x{npairs[('exhaustive', n)] / max(npairs[('retrieval', n)], 1):.0f}"]
        for stage in res:
            if ("retrieval", n) in res[stage] and ("exhaustive", n) in res[stage]:
                parts.append(f"{stage} time x{res[stage][('exhaustive', n)]['seconds'] / max(res[stage][('retrieval', n)]['seconds'], 1e-9):.1f}")
        parts.append(f"total time x{totals[('exhaustive', n)] / max(totals[('retrieval', n)], 1e-9):.1f}")
        print(f"  N={n:6d}: " + ", ".join(parts))
    if args.json:
        out = {stage: {f"{s}:{n}": d for (s, n), d in v.items()} for stage, v in res.items()}
        out["num_pairs"] = {f"{s}:{n}": p for (s, n), p in npairs.items()}
        args.json.write_text(json.dumps(out, indent=1))
    tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
