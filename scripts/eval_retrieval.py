#!/usr/bin/env python
"""Retrieval recall on the real scenes of ../shared/data (issue 6 acceptance): for each scene (and optionally all
scenes pooled into one collection), exhaustive matching + COLMAP verification gives the pairs with >= 50 verified
matches; retrieval with K neighbours per image should propose >= 90% of them. The "oracle" row ranks each image's
partners by their true verified inlier counts: the best any K-per-image retrieval can do.

    python scripts/eval_retrieval.py --work /tmp/retrieval-eval [--features rootsift] [--pooled] [--scenes a b ...]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SCENES = {
    "sacre_coeur": "sacre_coeur/mapping",
    "british_museum": "british_museum/images",
    "phototourism_samples": "phototourism_samples",
    "strecha_entry": "strecha_entry-P10_half/images",
    "temple_ring": "middlebury_templeSparseRing/images",
    "sceaux_castle": "sceaux_castle/images",
    "cyprus": "cyprus/images",
    "tum_office": "tum_fr3_long_office_household/images",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=SHARED)
    ap.add_argument("--features", default="rootsift")
    ap.add_argument("--matcher", default="NN-ratio")
    ap.add_argument("--global-confs", nargs="+", default=["vlad", "asmk"])
    ap.add_argument("--num-neighbors", type=int, default=5)
    ap.add_argument("--min-inliers", type=int, default=50)
    ap.add_argument("--scenes", nargs="*", default=list(SCENES))
    ap.add_argument("--pooled", action="store_true", help="also all the scenes as one collection")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from cd_sfm.colmap import quiet_colmap
    from cd_sfm.evaluation.retrieval import evaluate
    from cd_sfm.images import list_images

    quiet_colmap()
    runs = {s: (args.data / SCENES[s], None) for s in args.scenes}
    if args.pooled:
        names = [f"{SCENES[s]}/{n}" for s in args.scenes for n in list_images(args.data / SCENES[s])]
        runs["pooled"] = (args.data, names)
    results = {}
    for scene, (image_dir, names) in runs.items():
        r = evaluate(image_dir, args.work / f"{scene}-{args.features}", names, args.features, args.matcher,
                     args.global_confs, args.num_neighbors, args.min_inliers)
        results[scene] = r
        ref = r["reference"]
        line = f"{scene:22s} imgs {ref['images']:3d} pairs {ref['pairs']:5d} overlapping {ref['overlapping']:4d}"
        for k in ["oracle", *args.global_confs]:
            line += f" | {k} {r[k]['recall']:.3f} ({r[k]['found']}/{r[k]['positives']}, {r[k]['proposed']} prop.)"
        print(line, flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
