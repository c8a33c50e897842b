#!/usr/bin/env python
"""Validation of local models on held-out SfM image pairs (never EVAL scenes): the pairs of
``cd-sfm train mine-sfm-pairs`` whose images are held out of training (TRAIN scenes' held-out images, whole keypoint
sets, F from the SfM poses). Each model describes the stored patches; matching as the pipeline does (mutual nearest
neighbours, ratio 0.8 both ways); a match is correct when its Sampson distance under F is < 3 px. Also: keeping half
of each image's keypoints by matchability against by size (the order ``max_keypoints`` keeps), at equal counts.

    python scripts/val_sfm_pairs.py PAIRS.h5 MODEL [MODEL ...] [--max-keypoints 2048] [--json out.json]

Used to choose between training runs (docs/training.md); the same pairs for every model, in one run.
"""

from __future__ import annotations

import argparse
import json
import time

import h5py
import numpy as np

from cd_sfm.geometry import sampson_distance
from cd_sfm.matching import match_descriptors
from cd_sfm.train.pair_data import load_local_runner


def correct_matches(F, k0, k1, d0, d1, px: float = 3.0) -> tuple[int, int]:
    m0, _ = match_descriptors(d0, d1, ratio=0.8, mutual=True, cross_ratio=True)
    i = np.flatnonzero(m0 >= 0)
    if not len(i):
        return 0, 0
    e = sampson_distance(F, k0[i], k1[m0[i]])
    return int((e < px).sum()), len(i)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pairs", help=".h5 of 'cd-sfm train mine-sfm-pairs' (its validation pairs are used)")
    p.add_argument("models", nargs="+", help="model names, folders or local .npz files")
    p.add_argument("--max-keypoints", type=int, default=2048, help="the largest keypoints of each image")
    p.add_argument("--json", default="", help="write the results here")
    args = p.parse_args(argv)
    with h5py.File(args.pairs, "r") as f:
        io, F, is_val = f["img_offset"][()], f["F"][()], f["is_val"][()]
        pairs = np.flatnonzero(is_val & np.isfinite(F).all((1, 2)))
        sides = {s: (io[s], min(io[s + 1], io[s] + args.max_keypoints)) for p_ in pairs for s in (2 * p_, 2 * p_ + 1)}
        kpts = {s: f["kpts"][a:b] for s, (a, b) in sides.items()}
        patches = {s: f["patches"][a:b].astype(np.float32) for s, (a, b) in sides.items()}
    print(f"{len(pairs)} held-out pairs, up to {args.max_keypoints} keypoints per image")
    results = {}
    for name in args.models:
        runner = load_local_runner(name)
        t = time.time()
        desc = {s: runner.local(x) for s, x in patches.items()}
        seconds = time.time() - t
        out = {}
        for label, keep, order in (("all", 1.0, "size"), ("half_by_matchability", 0.5, "mb"),
                                   ("half_by_size", 0.5, "size")):
            corr = tot = 0
            for q in pairs:
                a, b = 2 * q, 2 * q + 1
                sel = {}
                for s in (a, b):
                    k = int(round(keep * len(kpts[s])))
                    sel[s] = np.arange(k) if order == "size" else np.sort(np.argsort(-desc[s][1])[:k])
                c, n = correct_matches(F[q], kpts[a][sel[a]], kpts[b][sel[b]], desc[a][0][sel[a]], desc[b][0][sel[b]])
                corr, tot = corr + c, tot + n
            out[label] = {"correct_per_pair": corr / len(pairs), "precision": corr / max(tot, 1)}
        results[name] = {**out, "describe_seconds": seconds}
        print(name, " | ".join(f"{k}: correct {v['correct_per_pair']:.1f} precision {v['precision']:.3f}"
                              for k, v in out.items()), f"| {seconds:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"pairs": args.pairs, "n_pairs": int(len(pairs)), "max_keypoints": args.max_keypoints,
                       "results": results}, fh, indent=1)
    return results


if __name__ == "__main__":
    main()
