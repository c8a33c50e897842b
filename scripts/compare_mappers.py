#!/usr/bin/env python
"""Both mappers on the same verified database, judged without and with ground truth: the measurements behind the
mapping rule of ``cd_sfm.colmap.mapping`` (README, "Pairs and mapping"; measurements in docs/mapping.md).

    python scripts/compare_mappers.py OUT_DIR [OUT_DIR ...] [--scene DIR] [--json out.json]

Each ``OUT_DIR`` is a ``cd-sfm reconstruct`` output (its ``database.db``; the image folder from its
``summary.json``, its mapper options from ``config.yaml``). Incremental and global mapping run once each (seed 0, no
fallback) into temporary folders. Per mapper: registered images, 3D points, agreement with the two-view geometries
(``colmap.consistency``) and, where the scene has ground-truth cameras (``--scene``, default the image folder's parent; ``evaluation.gt``), the relative pose
accuracy@10 over all pairs and over the model's own pairs (``evaluation.sfm.relative_pose_errors``). ``weak``: the
share of its images that observe fewer 3D points than the incremental mapper needs to register an image
(``abs_pose_min_num_inliers``, 30), and the accuracy of its pairs that hold a weak image (``weak@10``); then the same columns for the model as the pipeline keeps it,
weak images taken out (``mapping.prune_weak_images``). Last column: the model the pipeline's choice keeps
(``mapping._choose`` on the pruned models: trusted, and more images only with more points).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def compare(out_dir: Path, scene: Path | None = None) -> dict:
    from cd_sfm import config
    from cd_sfm.colmap import mapping
    from cd_sfm.colmap.consistency import agreement
    from cd_sfm.evaluation.sfm import camera_spread, relative_pose_errors, scene_gt
    from cd_sfm.io import CdSfmError

    summary = json.loads((out_dir / "summary.json").read_text())
    images = Path(summary["image_dir"])
    db = out_dir / "database.db"
    scene = scene or (images.parent if images.name == "images" else images)
    try:
        views = scene_gt(scene)
    except CdSfmError as e:  # ground truth that does not fit the images: compare without it
        print(f"{out_dir}: no ground truth ({e})", file=sys.stderr)
        views = None
    spread = camera_spread(views) if views else 1.0
    settings = config.resolve(out_dir / "config.yaml").mapping if (out_dir / "config.yaml").exists() else None
    tried, rows = [], {}
    for mapper in ("incremental", "global"):
        tmp = Path(tempfile.mkdtemp(prefix="cd-sfm-mappers-"))
        try:
            opts = settings.options_of(mapper) if settings else {}
            rec, _ = mapping.main({"mapper": mapper, "options": opts, "seed": 0, "fallback": False, "retries": 0,
                                   "min_image_points": 0}, db, images, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        row = {"registered": rec.num_reg_images() if rec else 0, "points": rec.num_points3D() if rec else 0,
               "agreement": agreement(rec, db)["agreeing_pairs"] if rec else None}
        weak = _weak_images(rec, mapping.MIN_IMAGE_POINTS) if rec is not None else set()
        row["weak"] = len(weak) / row["registered"] if row["registered"] else None
        if views and rec is not None:
            rp = relative_pose_errors(rec, views, spread)
            row["acc10_all"] = rp["pose_accuracy"]["10"]
            row["acc10_registered"] = rp["registered_pose_accuracy"]["10"]
            strong = relative_pose_errors(rec, {k: v for k, v in views.items() if k not in weak}, spread)
            n_all, n_strong = rp["pairs_registered"], strong["pairs_registered"]
            a_all, a_strong = rp["registered_pose_accuracy"]["10"], strong["registered_pose_accuracy"]["10"]
            row["acc10_weak"] = ((a_all * n_all - a_strong * n_strong) / (n_all - n_strong)
                                 if n_all > n_strong and a_strong is not None else None)
        # the model as the pipeline keeps it (mapping.prune_weak_images)
        pruned = {"registered": 0, "points": 0, "agreement": None}
        if rec is not None:
            mapping.prune_weak_images(rec, mapping.MIN_IMAGE_POINTS)
            if rec.num_reg_images() >= 2:
                pruned = {"registered": rec.num_reg_images(), "points": rec.num_points3D(),
                          "agreement": agreement(rec, db)["agreeing_pairs"]}
                if views:
                    rp = relative_pose_errors(rec, views, spread)
                    pruned["acc10_all"] = rp["pose_accuracy"]["10"]
                    pruned["acc10_registered"] = rp["registered_pose_accuracy"]["10"]
        row["pruned"] = pruned
        rows[mapper] = row
        tried.append({"mapper": mapper, "seed": 0, **pruned})
    kept = mapping._choose(tried)["mapper"]
    return {"output_dir": str(out_dir), "scene": str(scene), "ground_truth": bool(views), "mappers": rows,
            "kept": kept}


def _weak_images(rec, min_points: int) -> set[str]:
    """Names of the registered images that observe fewer than ``min_points`` 3D points."""
    return {rec.images[i].name for i in rec.reg_image_ids() if rec.images[i].num_points3D < min_points}


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outputs", nargs="+", type=Path, help="cd-sfm reconstruct output folders")
    ap.add_argument("--scene", type=Path, help="scene folder with the ground truth (default: the images' parent)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    results = []
    print(f"{'output':<40}{'mapper':<12}{'images':>7}{'points':>7}{'agree':>6}{'weak':>6}{'acc@10':>7}{'own@10':>7}"
          f"{'weak@10':>8}  | pruned:{'images':>7}{'points':>7}{'agree':>6}{'acc@10':>7}{'own@10':>7}  kept")
    for out in args.outputs:
        r = compare(out, args.scene)
        results.append(r)
        for mapper, row in r["mappers"].items():
            pr = row["pruned"]
            print(f"{str(out)[-39:]:<40}{mapper:<12}{row['registered']:>7}{row['points']:>7}"
                  f"{_fmt(row['agreement']):>6}{_fmt(row['weak']):>6}{_fmt(row.get('acc10_all')):>7}"
                  f"{_fmt(row.get('acc10_registered')):>7}{_fmt(row.get('acc10_weak')):>8}  |        "
                  f"{pr['registered']:>7}{pr['points']:>7}{_fmt(pr['agreement']):>6}{_fmt(pr.get('acc10_all')):>7}"
                  f"{_fmt(pr.get('acc10_registered')):>7}  {'<-' if mapper == r['kept'] else ''}", flush=True)
    print("acc@10: share of all image pairs within 10 deg of the true relative pose; own@10: of the model's own "
          "pairs; - : no ground truth")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
