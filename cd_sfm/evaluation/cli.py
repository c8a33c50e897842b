"""``cd-sfm eval``: benchmarks of the descriptors on the EVAL scenes of ``configs/split.yaml``.

    cd-sfm eval hpatches [--methods rootsift,local,contextdesc] [--model NAME] [--output JSON]
    cd-sfm eval pairs    [SCENE ...] ...   relative-pose AUC@5/10/20 on pairs with ground-truth cameras
    cd-sfm eval sfm      [SCENE ...] ...   reconstruction statistics (whole pipeline per method)
    cd-sfm eval report   JSON ... [--output MD]   the Markdown table of the README from saved results

Each prints its tables (methods as rows; per scene and overall) and saves the full results (per pair / per image) as
JSON. Without scenes, ``pairs`` runs on the EVAL scenes of the split with usable ground-truth cameras and ``sfm`` on
all its multi-view EVAL scenes (see ``cd_sfm/evaluation/scenes.py``). Data: ``--data``
(default: ``../shared/data`` next to the repository root, or ``$CD_SFM_DATA``). A method the model cannot provide
(``contextdesc`` without augmentation weights) is listed as absent, never replaced by another.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import subprocess
import time
from pathlib import Path

from ..io import CdSfmError
from ..config import PRECISIONS
from ..split import REPO_ROOT, default_data_root

logger = logging.getLogger(__name__)

def data_root(arg: str | None) -> Path:
    root = Path(arg) if arg else default_data_root()
    if not root.is_dir():
        raise CdSfmError(f"{root}: evaluation data not found (give --data DIR, the folder holding hpatches/, "
                         f"strecha_entry-P10_half/, ...; or set CD_SFM_DATA)")
    return root


def scene_path(root: Path, name: str) -> Path:
    p = Path(name)
    if not p.is_absolute() and not p.exists():
        p = root / name
    if not p.is_dir():
        raise CdSfmError(f"{p}: scene not found")
    return p


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001 - informative only
        return None


def meta(kind: str, args, seconds: float) -> dict:
    from .methods import model_info

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"kind": kind, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": f"{platform.node()}: {cpu}, {os.cpu_count()} cores", "model": model_info(args.model),
            "methods": args.methods, "precision": getattr(args, "precision", "fp32"), "git": _git_commit(),
            "seconds": round(seconds, 1)}


def _save(result: dict, path: str | None):
    from .hpatches import save_json

    if path:
        save_json(result, path)
        print(f"saved {path}")


# ----------------------------------------------------------------------------------------------------------------------
# commands


def cmd_hpatches(args) -> int:
    from . import hpatches as hp
    from .methods import make_describers, parse_methods

    root = scene_path(data_root(args.data), args.root or "hpatches")
    methods = parse_methods(args.methods)
    t = time.perf_counter()
    describers, absent = make_describers(methods, args.model, upright=args.upright, precision=args.precision)
    conf = hp.HPatchesConf(max_keypoints=args.max_keypoints, upright=args.upright, max_size=args.max_size)
    result = hp.evaluate_hpatches(root, describers, conf)
    result["absent"] = absent
    result["meta"] = meta("hpatches", args, time.perf_counter() - t)
    print(hp.format_table(result))
    for m, why in absent.items():
        print(f"{m:<12}absent: {why}")
    _save(result, args.output)
    return 0


def cmd_pairs(args) -> int:
    from . import pose
    from .methods import make_describers, parse_methods

    from .scenes import pose_scenes

    root = data_root(args.data)
    scenes = [scene_path(root, s) for s in args.scenes] if args.scenes else pose_scenes(root)
    methods = parse_methods(args.methods)
    t = time.perf_counter()
    describers, absent = make_describers(methods, args.model, upright=args.upright, precision=args.precision)
    conf = pose.PoseConf(max_keypoints=args.max_keypoints, upright=args.upright, max_image_size=args.max_size,
                         max_view_angle=args.max_view_angle, max_pairs=args.max_pairs, ransac_px=args.ransac_px,
                         seed=args.seed, ratio=args.ratio, estimator=args.estimator)
    result = pose.evaluate_pairs(scenes, describers, conf)
    result["absent"] = absent
    result["meta"] = meta("pairs", args, time.perf_counter() - t)
    print(pose.format_table(result))
    _save(result, args.output)
    return 0


def cmd_sfm(args) -> int:
    from . import sfm
    from .methods import parse_methods

    from .scenes import sfm_scenes, unusable_gt

    root = data_root(args.data)
    scenes = [scene_path(root, s) for s in args.scenes] if args.scenes else sfm_scenes(root)
    unusable = {root / name: why for name, why in unusable_gt().items()}
    methods = parse_methods(args.methods)
    work = Path(args.work_dir) if args.work_dir else Path(args.output or ".").resolve().parent / "sfm-work"
    conf = sfm.SfmEvalConf(max_keypoints=args.max_keypoints, max_image_size=args.max_size,
                           overwrite=not args.resume, seed=args.seed, ratio=args.ratio, seeds=args.seeds)
    t = time.perf_counter()
    result = sfm.evaluate_sfm_scenes(scenes, methods, work, args.model, conf, unusable)
    result["meta"] = meta("sfm", args, time.perf_counter() - t)
    print(sfm.format_table(result))
    _save(result, args.output)
    return 0


def cmd_report(args) -> int:
    from .report import markdown_report

    results = []
    for p in args.results:
        try:
            results.append(json.loads(Path(p).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise CdSfmError(f"{p}: cannot read evaluation results ({e})") from e
    md = markdown_report(results)
    if args.output:
        Path(args.output).write_text(md)
        print(f"saved {args.output}")
    else:
        print(md)
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# parser


def _common(p: argparse.ArgumentParser, output: str, max_size: int) -> None:
    from .methods import DEFAULT_MODEL, METHODS

    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated methods on the same keypoints (default {','.join(METHODS)})")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or folder (default {DEFAULT_MODEL})")
    p.add_argument("--data", help="folder of the evaluation scenes (default ../shared/data next to the repository)")
    p.add_argument("--output", default=output, help=f"JSON results (default {output}; '' for none)")
    p.add_argument("--max-keypoints", type=int, default=4096)
    p.add_argument("--max-size", type=int, default=max_size, help="longest image side (0: full resolution)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="inference precision of the learned methods (default fp32)")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="count", default=0)


def add_parser(subparsers):
    from .pose import ESTIMATORS
    p = subparsers.add_parser("eval", help="benchmarks: HPatches MMA, relative-pose AUC, SfM statistics",
                              description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n", 1)[1])
    sub = p.add_subparsers(dest="eval_command", metavar="{hpatches,pairs,sfm,report}")
    sub.required = True

    s = sub.add_parser("hpatches", help="MMA@1..10 px, #correct, matching score on HPatches sequences")
    s.add_argument("root", nargs="?", help="folder of sequences (default DATA/hpatches)")
    _common(s, "eval-hpatches.json", 0)
    s.add_argument("--upright", action="store_true")
    s.set_defaults(func=cmd_hpatches)

    s = sub.add_parser("pairs", help="relative-pose AUC@5/10/20 deg on pairs with ground-truth cameras")
    s.add_argument("scenes", nargs="*", help="scene folders or names under DATA (default: the split's EVAL scenes "
                                             "with usable ground-truth cameras)")
    _common(s, "eval-pairs.json", 1600)
    s.add_argument("--upright", action="store_true")
    s.add_argument("--max-view-angle", type=float, default=60.0,
                   help="pairs with optical axes at most this many degrees apart (0: all pairs)")
    s.add_argument("--max-pairs", type=int, default=40,
                   help="at most this many of them per scene, evenly spaced over the sorted pairs (0: all; default 40)")
    s.add_argument("--ransac-px", type=float, default=1.0, help="RANSAC threshold of the essential matrix (pixels)")
    s.add_argument("--estimator", default=ESTIMATORS[0], choices=ESTIMATORS,
                   help="relative pose: COLMAP's LO-RANSAC with refinement (default), or OpenCV's RANSAC (the "
                        "method before 2026-12-07's 4th session)")
    s.add_argument("--ratio", type=float, help="ratio test (default: the pipeline's matching)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_pairs)

    s = sub.add_parser("sfm", help="reconstruction statistics of a scene, the pipeline run once per method")
    s.add_argument("scenes", nargs="*", help="scene folders or names under DATA (default: the split's multi-view "
                                             "EVAL scenes)")
    _common(s, "eval-sfm.json", 1600)
    s.add_argument("--work-dir", help="where the reconstructions go (default: sfm-work next to the JSON)")
    s.add_argument("--resume", action="store_true", help="reuse features / matches already in the work folder")
    s.add_argument("--ratio", type=float, help="ratio test (default: the pipeline's matching)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--seeds", type=int, default=3,
                   help="map each scene with this many seeds (seed, seed+1, ...) on the same matches and report the "
                        "mean and range over them (default 3: one run's registrations move by several images with "
                        "the seed on hard scenes)")
    s.set_defaults(func=cmd_sfm)

    s = sub.add_parser("report", help="Markdown table (for the README) from saved evaluation JSON files")
    s.add_argument("results", nargs="+", help="JSON files of eval hpatches / pairs / sfm")
    s.add_argument("--output", help="Markdown file (default: print)")
    s.add_argument("-v", "--verbose", action="count", default=0)
    s.add_argument("-q", "--quiet", action="count", default=0)
    s.set_defaults(func=cmd_report)
    return p
