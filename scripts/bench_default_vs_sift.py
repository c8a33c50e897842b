#!/usr/bin/env python
"""The default pipeline (ContextDesc) against ``--features sift`` on the same folders, in one run (issue 13's goal:
the default within 1.2x of ``--features sift``).

    python scripts/bench_default_vs_sift.py [--scene DIR ...] [--model NAME ...] [--repeat 1] [--json out.json]
                                            [-- extra flags]

Each scene is reconstructed by fresh ``cd-sfm reconstruct`` processes, the two settings alternating (default first,
then sift, then again with ``--repeat``), each into a new folder, timed from process start to exit. Prints per scene:
images registered, 3D points, mean track length, seconds per stage and in all, and the ratio default / sift of the
median total times; then the ratio over all scenes (sum of medians). Default scenes: the README's EVAL scenes
(strecha_entry-P10_half, middlebury_templeSparseRing, sceaux_castle) under ``../shared/data``. ``--model NAME``
(repeatable) adds the default pipeline with that ContextDesc model as a setting of its own (e.g. the previous
shipped model beside the new default), same folders, same run. Before the timed runs every setting reconstructs the
smallest scene once, untimed (``--no-warmup`` skips it): the first process after an install compiles numba's matching
kernels into their cache (seconds), which no later run pays.
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
DATA = ROOT.parent / "shared" / "data"
DEFAULT_SCENES = [DATA / "strecha_entry-P10_half" / "images", DATA / "middlebury_templeSparseRing" / "images",
                  DATA / "sceaux_castle" / "images"]
SETTINGS = {"default": [], "sift": ["--features", "sift"]}


def run(images: Path, out: Path, flags: list[str]) -> dict:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "cd_sfm.cli", "reconstruct", str(images), str(out), "-q", *flags],
                       capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{images}: cd-sfm {' '.join(flags)} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    s = json.loads((out / "summary.json").read_text())
    return {"registered": s["num_images_registered"], "used": s["num_images_used"], "points3D": s["num_points3D"],
            "track_length": s["mean_track_length"], "seconds": seconds, "stages": s["seconds"],
            "precision": s.get("precision"), "mapper": s.get("mapper_used")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scene", type=Path, action="append", help="image folder (repeatable)")
    parser.add_argument("--model", action="append", default=[], help="also the default with this model (repeatable)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--no-warmup", action="store_true", help="no untimed first run of each setting")
    parser.add_argument("extra", nargs="*", help="extra flags for both settings (after --)")
    args = parser.parse_args()
    scenes = args.scene or DEFAULT_SCENES
    missing = [s for s in scenes if not s.is_dir()]
    if missing:
        print(f"{missing[0]}: image folder not found", file=sys.stderr)
        return 2
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")
    flags = sorted({f for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")
                    for f in ln.split()[2:] if f.startswith(("avx512_vnni", "avx512_bf16", "amx", "avx2"))})
    print(f"CPU: {cpu} ({', '.join(flags)})")
    settings = {**SETTINGS, **{f"model:{m}": ["--model", m] for m in args.model}}
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_default_") as tmp:
        if not args.no_warmup:
            smallest = min(scenes, key=lambda s: sum(f.stat().st_size for f in s.iterdir() if f.is_file()))
            for k, f in settings.items():
                run(smallest, Path(tmp) / f"warmup_{k}", f + args.extra)
            print(f"warm-up: one untimed run of each setting on {smallest.parent.name}", flush=True)
        for scene in scenes:
            rows = {k: [] for k in settings}
            for i in range(args.repeat):
                for k, f in settings.items():
                    rows[k].append(run(scene, Path(tmp) / f"{scene.parent.name}_{k}{i}", f + args.extra))
                    r = rows[k][-1]
                    print(f"{scene.parent.name} {k:8s} run {i + 1}: {r['registered']}/{r['used']} images, "
                          f"{r['points3D']} points, {r['seconds']:.1f} s ("
                          + ", ".join(f"{s} {v:.1f}" for s, v in r["stages"].items() if s != "total") + ")",
                          flush=True)
            med = {k: statistics.median(r["seconds"] for r in v) for k, v in rows.items()}
            results[str(scene)] = {"runs": rows, "median_seconds": med, "ratio": med["default"] / med["sift"]}
            print(f"{scene.parent.name}: default / sift = {results[str(scene)]['ratio']:.2f}")
    total = {k: sum(r["median_seconds"][k] for r in results.values()) for k in settings}
    ratio = total["default"] / total["sift"]
    print(f"all scenes: default {total['default']:.1f} s, sift {total['sift']:.1f} s, ratio {ratio:.2f} "
          f"(goal <= 1.2: {'met' if ratio <= 1.2 else 'not met'})")
    for k in settings:
        if k.startswith("model:"):
            print(f"all scenes: {k} {total[k]:.1f} s, ratio to sift {total[k] / total['sift']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "flags": flags, "scenes": results, "ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
