#!/usr/bin/env python
"""``cd-sfm reconstruct --features sift`` against COLMAP's own pipeline on the same folder of photos.

    python scripts/bench_sift_pipeline.py [--images DIR] [--repeat 1] [--json results.json] [-- extra cd-sfm flags]

Both run as fresh processes, one after the other, with all cores:

* ours: ``cd-sfm reconstruct IMAGES OUT --features sift`` (OpenCV SIFT, our matcher, pycolmap verification and
  incremental mapping), timed from process start to exit;
* COLMAP: ``pycolmap.extract_features`` (its SIFT, default options, CPU) + ``pycolmap.match_exhaustive`` +
  ``pycolmap.incremental_mapping``, in one process, timed the same way.

Reports images registered in the largest model, 3D points, wall seconds and the time ratio ours / COLMAP, and checks
the acceptance rule of issue 3: ours registers at least as many images in at most twice the time. Default images:
``../shared/data/sacre_coeur/mapping``. With ``--repeat N`` the two alternate N times and the medians are compared
(the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "sacre_coeur" / "mapping"

COLMAP_SCRIPT = r"""
import json, sys, pycolmap
pycolmap.logging.minloglevel = 2
images, out = sys.argv[1], sys.argv[2]
db = out + "/database.db"
pycolmap.extract_features(db, images)
pycolmap.match_exhaustive(db)
models = pycolmap.incremental_mapping(db, images, out)
best = max(models.values(), key=lambda r: r.num_reg_images(), default=None)
print(json.dumps({"registered": best.num_reg_images() if best else 0,
                  "points3D": best.num_points3D() if best else 0, "models": len(models)}))
"""


def run_ours(images: Path, out: Path, extra: list[str]) -> dict:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "cd_sfm.cli", "reconstruct", str(images), str(out), "--features", "sift",
                        "-q", *extra], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"cd-sfm failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    s = json.loads((out / "summary.json").read_text())
    return {"registered": s["num_images_registered"], "points3D": s["num_points3D"], "models": s["num_models"],
            "seconds": seconds, "stages": s["seconds"]}


def run_colmap(images: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", COLMAP_SCRIPT, str(images), str(out)], capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"pycolmap pipeline failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["seconds"] = seconds
    return res


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("extra", nargs="*", help="extra flags for cd-sfm reconstruct (after --)")
    args = parser.parse_args()
    if not args.images.is_dir():
        print(f"{args.images}: image folder not found", file=sys.stderr)
        return 2
    import pycolmap

    ours, colmap = [], []
    with tempfile.TemporaryDirectory(prefix="bench_sift_") as tmp:
        for i in range(args.repeat):
            colmap.append(run_colmap(args.images, Path(tmp) / f"colmap{i}"))
            ours.append(run_ours(args.images, Path(tmp) / f"ours{i}", args.extra))
            print(f"run {i + 1}: cd-sfm {ours[-1]['registered']} images in {ours[-1]['seconds']:.1f} s | "
                  f"COLMAP {colmap[-1]['registered']} images in {colmap[-1]['seconds']:.1f} s", flush=True)

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    result = {
        "images": str(args.images),
        "pycolmap": pycolmap.__version__,
        "repeat": args.repeat,
        "ours": {"registered": med(ours, "registered"), "points3D": med(ours, "points3D"),
                 "seconds": med(ours, "seconds"), "runs": ours},
        "colmap": {"registered": med(colmap, "registered"), "points3D": med(colmap, "points3D"),
                   "seconds": med(colmap, "seconds"), "runs": colmap},
    }
    result["time_ratio"] = result["ours"]["seconds"] / result["colmap"]["seconds"]
    result["pass"] = bool(result["ours"]["registered"] >= result["colmap"]["registered"] and result["time_ratio"] <= 2)
    print(f"{'':10s} {'registered':>10s} {'3D points':>10s} {'seconds':>8s}")
    for k, label in (("ours", "cd-sfm"), ("colmap", "COLMAP")):
        r = result[k]
        print(f"{label:10s} {r['registered']:>10g} {r['points3D']:>10g} {r['seconds']:>8.1f}")
    stages = ", ".join(f"{k} {v:.1f}" for k, v in ours[-1]["stages"].items())
    print(f"time ratio cd-sfm / COLMAP: {result['time_ratio']:.2f} (cd-sfm stages, last run: {stages})")
    print("acceptance (registered >= COLMAP, time <= 2x):", "PASS" if result["pass"] else "FAIL")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
