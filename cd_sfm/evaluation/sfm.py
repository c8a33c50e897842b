"""Reconstruction statistics of a scene, per descriptor: the whole pipeline (:func:`cd_sfm.pipeline.reconstruct`) run
once per method into ``work_dir/<scene>/<method>/``.

All methods use the same keypoints (the detector settings of ``SfmEvalConf``: ContextDesc's SIFT settings, the same
image size) and the pipeline's default pairs, matching, verification and mapper (seed 0; ``seeds`` > 1 maps each
scene again with the next seeds on the same matches, and :func:`over_seeds` gives the spread), so only the descriptor
differs. Methods: ``rootsift`` (features preset ``rootsift``), ``local`` (``contextdesc`` with ``augment: false``),
``contextdesc`` (augmented; absent when the model has no augmentation weights); the model goes in the config's
``model`` key.

Reported per scene: registered images, 3D points, mean track length, mean reprojection error, verified pairs, time
per stage; when the scene has usable ground-truth cameras (:mod:`.gt`: any form it reads; not the split's
``gt_unusable``), the reconstruction is aligned to them (similarity from the projection centres, see
:func:`cd_sfm.synthetic.compare_to_ground_truth`) and the camera position / rotation errors are reported; the
position error also relative to the spread of the true cameras (median distance to their centroid), comparable across
scenes; and, with no alignment, the relative pose of every pair of images against the true one
(:func:`relative_pose_errors`: rotation and translation-direction errors, and the share of all pairs within 5 / 10 /
20 degrees, unregistered images failing theirs, and of the model's own pairs). Overall per method (:func:`overall`):
registered / used images and points summed, track length and reprojection error averaged over the scenes with a
reconstruction, the median over the scenes with ground truth of the relative position error and of the largest
rotation error, the mean over those scenes of both relative pose accuracies, total time.

Scenes: by default every multi-view EVAL scene of the split (:func:`.scenes.sfm_scenes`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..io import CdSfmError
from ..models.registry import DEFAULT_MODEL

logger = logging.getLogger(__name__)


@dataclass
class SfmEvalConf:
    max_keypoints: int = 4096
    contrast_threshold: float = 0.04
    max_image_size: int = 1600
    overwrite: bool = True  # recompute features and matches (times are then comparable)
    seed: int = 0
    ratio: float | None = None  # ratio test of the matching; None: the pipeline's default
    seeds: int = 3  # mapping runs per scene and method, seeds seed .. seed + seeds - 1 (features and matches reused)


def method_config(method: str, model: str, conf: SfmEvalConf, seed: int | None = None) -> dict | None:
    """Pipeline config of a method (mapping ``seed``, default ``conf.seed``); None when the model cannot provide it
    (contextdesc without augment weights)."""
    det = {"max_keypoints": conf.max_keypoints, "contrast_threshold": conf.contrast_threshold}
    base = {"max_image_size": conf.max_image_size, "seed": conf.seed if seed is None else int(seed)}
    if conf.ratio is not None:
        from ..config import DEFAULTS

        base["matching_options"] = {**DEFAULTS["matching_options"], "ratio": float(conf.ratio)}
    if method == "rootsift":
        return {**base, "features": "rootsift", "features_options": det}
    if method in ("local", "contextdesc"):
        augment = method == "contextdesc"
        if augment:
            from ..models import registry

            if registry.resolve(model).path("augment") is None:
                return None
        return {**base, "features": "contextdesc", "features_options": det, "model": model, "augment": augment}
    raise CdSfmError(f"unknown method {method!r}")


def image_dir_of(scene: Path) -> Path:
    d = scene / "images"
    return d if d.is_dir() else scene


POSE_THRESHOLDS_DEG = (5, 10, 20)  # relative pose accuracy thresholds (rotation and translation direction)
MIN_BASELINE = 0.01  # of the camera spread: below it a true pair's translation direction is not compared


def camera_spread(views: dict) -> float:
    """Median distance of the true camera centres to their centroid (GT units; 1 when they coincide): the scale that
    makes position errors comparable across scenes."""
    centers = np.array([v.center for v in views.values()])
    return float(np.median(np.linalg.norm(centers - centers.mean(0), axis=1))) or 1.0


def relative_pose_errors(rec, views: dict, spread: float = 1.0) -> dict:
    """Alignment-free camera errors: for every pair of ground-truth images, the model's relative pose (camera a from
    camera b) against the true one, as the rotation error and the angle between the translation directions (degrees;
    not compared where the true baseline is under ``MIN_BASELINE`` of ``spread``). ``pose_accuracy``: the share of
    *all* pairs (an image the model left out fails its pairs) whose larger error is below each of
    ``POSE_THRESHOLDS_DEG``, as IMC's relative-pose accuracy; ``registered_pose_accuracy``: the same share of the
    pairs the model holds (its precision: a smaller right model scores 1); medians over the pairs the model holds.

    Unlike the camera positions after a similarity alignment, this sees cameras in the right place looking the wrong
    way (object rings, where a flipped camera keeps its centre) and needs no well-conditioned alignment."""
    from itertools import combinations

    from ..synthetic import rotation_angle_deg

    poses = {}
    for i in rec.reg_image_ids():
        im = rec.images[i]
        if im.name in views:
            T = im.cam_from_world()
            poses[im.name] = (np.asarray(T.rotation.matrix(), np.float64), np.asarray(T.translation, np.float64))
    names = sorted(views)
    rot, tra, worst = [], [], []
    for a, b in combinations(names, 2):
        if a not in poses or b not in poses:
            continue
        (Ra, ta), (Rb, tb) = poses[a], poses[b]
        va, vb = views[a], views[b]
        R, Rg = Ra @ Rb.T, va.R @ vb.R.T
        t, tg = ta - R @ tb, va.t - Rg @ vb.t
        er = rotation_angle_deg(R @ Rg.T)
        et = 0.0
        if np.linalg.norm(tg) >= MIN_BASELINE * spread:
            c = float(t @ tg) / max(np.linalg.norm(t) * np.linalg.norm(tg), 1e-12)
            et = float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))
        rot.append(er)
        tra.append(et)
        worst.append(max(er, et))
    total = len(names) * (len(names) - 1) // 2
    worst = np.asarray(worst)
    return {"pairs": total, "pairs_registered": len(worst),
            "rotation_error_median_deg": float(np.median(rot)) if rot else None,
            "translation_error_median_deg": float(np.median(tra)) if tra else None,
            "pose_accuracy": {str(th): float((worst < th).sum() / total) if total else None
                              for th in POSE_THRESHOLDS_DEG},
            "registered_pose_accuracy": {str(th): float((worst < th).mean()) if len(worst) else None
                                         for th in POSE_THRESHOLDS_DEG}}


def gt_errors(sparse: Path, views: dict | None) -> dict | None:
    """Camera errors of the model ``sparse`` against the ground-truth views (:func:`.gt.load_gt`; None without
    either): after alignment (positions, rotations) and pair by pair without one (:func:`relative_pose_errors`)."""
    if not views or not sparse.is_dir():
        return None
    import pycolmap

    from ..synthetic import compare_to_ground_truth
    from .gt import to_reconstruction

    gtr = to_reconstruction(views)
    spread = camera_spread(views)
    rec = pycolmap.Reconstruction(str(sparse))
    relative = relative_pose_errors(rec, views, spread)
    try:
        res = compare_to_ground_truth(rec, gtr, max_proj_center_error=0.05 * spread)
    except Exception as e:  # noqa: BLE001 - too few images to align, etc.
        logger.warning("%s: no alignment to the ground truth (%s)", sparse, e)
        return {"aligned": False, "relative_pose": relative}
    res["camera_spread"] = spread
    if res.get("median_position_error") is not None:
        res["relative_position_error"] = res["median_position_error"] / spread
    res["relative_pose"] = relative
    return res


def scene_gt(scene: Path, unusable: dict[Path, str] | None = None) -> dict | None:
    """The scene's ground-truth views, or None (no ground truth, or its folder is a key of ``unusable``)."""
    from .gt import has_gt, load_gt

    if not has_gt(scene):
        return None
    why = {Path(k).resolve(): w for k, w in (unusable or {}).items()}.get(scene.resolve())
    if why:
        logger.info("%s: ground truth not used (%s)", scene.name, why)
        return None
    return load_gt(scene)


def evaluate_sfm(scene: str | Path, methods: list[str], work_dir: str | Path, model: str = DEFAULT_MODEL,
                 conf: SfmEvalConf = SfmEvalConf(), unusable: dict[Path, str] | None = None) -> dict:
    """Run the pipeline per method on ``scene``; returns {"conf", "scene", "methods": {m: stats}, "absent"}.
    ``unusable``: {scene folder: reason} whose ground truth is not used (the split's ``gt_unusable``). With
    ``conf.seeds`` > 1 the mapping runs once per seed on the same features and matches; a method's stats are those of
    the first seed, with ``runs``: the stats of every seed (the mapper's seed moves registrations by several images on
    hard scenes, so compare methods over several)."""
    from ..pipeline import reconstruct

    scene = Path(scene)
    images = image_dir_of(scene)
    if not images.is_dir():
        raise CdSfmError(f"{scene}: scene folder not found")
    work_dir = Path(work_dir) / scene.name
    views = scene_gt(scene, unusable)
    out, absent = {}, {}
    for m in methods:
        mc = method_config(m, model, conf)
        if mc is None:
            absent[m] = f"model {model!r} has no augmentation weights (augment.npz)"
            logger.warning("contextdesc: %s: reported as absent", absent[m])
            continue
        runs = []
        for i in range(max(1, int(conf.seeds))):
            seed = conf.seed + i
            logger.info("sfm %s: %s%s", scene.name, m, f" (seed {seed})" if conf.seeds > 1 else "")
            t = time.perf_counter()
            s = reconstruct(images, work_dir / m, method_config(m, model, conf, seed),
                            overwrite=conf.overwrite and i == 0, progress=True)
            wall = time.perf_counter() - t
            row = {key: s.get(key) for key in ("num_images_used", "num_images_registered", "num_points3D",
                                               "mean_track_length", "mean_reprojection_error", "num_pairs",
                                               "num_verified_pairs", "num_models")}
            row["seconds"] = {**s.get("seconds", {}), "wall": round(wall, 2)}
            row["output_dir"] = str(work_dir / m)
            row["seed"] = seed
            row["gt"] = gt_errors(work_dir / m / "sparse" / "0", views)
            runs.append(row)
        out[m] = {**runs[0], "runs": runs} if len(runs) > 1 else runs[0]
    return {"conf": asdict(conf), "scene": scene.name, "model": model, "methods": out, "absent": absent}


def _mean_accuracy(poses: list[dict], key: str) -> dict:
    """{threshold: mean over the scenes of ``relative_pose_errors``' ``key`` at it} (scenes without a value left
    out; None when none has one)."""
    out = {}
    for th in map(str, POSE_THRESHOLDS_DEG):
        v = [p[key][th] for p in poses if (p.get(key) or {}).get(th) is not None]
        out[th] = float(np.mean(v)) if v else None
    return out


def overall(per_scene: dict[str, dict]) -> dict:
    """Per method over the scenes (see the module docstring)."""
    methods = list(dict.fromkeys(m for r in per_scene.values() for m in r["methods"]))
    out = {}
    for m in methods:
        rows = [r["methods"][m] for r in per_scene.values() if m in r["methods"]]
        gts = [r.get("gt") or {} for r in rows]
        rel = [g["relative_position_error"] for g in gts if g.get("relative_position_error") is not None]
        rot = [g["max_rotation_error_deg"] for g in gts if g.get("max_rotation_error_deg") is not None]
        poses = [g["relative_pose"] for g in gts if g.get("relative_pose")]

        def mean(key):  # over the scenes with a reconstruction
            v = [r[key] for r in rows if r.get(key) is not None and r["num_images_registered"]]
            return float(np.mean(v)) if v else None

        out[m] = {"scenes": len(rows),
                  "num_images_registered": int(sum(r["num_images_registered"] or 0 for r in rows)),
                  "num_images_used": int(sum(r["num_images_used"] or 0 for r in rows)),
                  "num_points3D": int(sum(r["num_points3D"] or 0 for r in rows)),
                  "mean_track_length": mean("mean_track_length"),
                  "mean_reprojection_error": mean("mean_reprojection_error"),
                  "num_verified_pairs": int(sum(r["num_verified_pairs"] or 0 for r in rows)),
                  "gt_scenes": len(rel), "gt_aligned_failed": sum(1 for g in gts if g.get("aligned") is False),
                  "median_relative_position_error": float(np.median(rel)) if rel else None,
                  "median_max_rotation_error_deg": float(np.median(rot)) if rot else None,
                  "mean_pose_accuracy": _mean_accuracy(poses, "pose_accuracy"),
                  "mean_registered_pose_accuracy": _mean_accuracy(poses, "registered_pose_accuracy"),
                  "seconds": {"wall": round(sum(r["seconds"]["wall"] for r in rows), 1)}}
    return out


def evaluate_sfm_scenes(scenes: list[str | Path], methods: list[str], work_dir: str | Path,
                        model: str = DEFAULT_MODEL, conf: SfmEvalConf = SfmEvalConf(),
                        unusable: dict[Path, str] | None = None) -> dict:
    """:func:`evaluate_sfm` on each scene; returns {"conf", "model", "scenes": {scene: result}, "methods":
    :func:`overall`, "absent"}."""
    per_scene = {}
    for scene in scenes:
        res = evaluate_sfm(scene, methods, work_dir, model, conf, unusable)
        per_scene[res["scene"]] = res
    absent = {m: why for r in per_scene.values() for m, why in r["absent"].items()}
    out = {"conf": asdict(conf), "model": model, "scenes": per_scene, "methods": overall(per_scene),
           "absent": absent}
    if conf.seeds > 1:
        out["seeds"] = over_seeds(per_scene)
    return out


def over_seeds(per_scene: dict[str, dict]) -> dict:
    """Per method: :func:`overall` of each seed's runs (``per_seed``), and the mean, smallest and largest over the
    seeds of registered images, 3D points and the two pose accuracies @10 (``registered``, ``points``, ``acc10``,
    ``own10``: {"mean", "min", "max"})."""
    n = min(len(m.get("runs") or [m]) for r in per_scene.values() for m in r["methods"].values())
    per_seed = []
    for k in range(n):
        view = {s: {**r, "methods": {m: (row.get("runs") or [row])[k] for m, row in r["methods"].items()}}
                for s, r in per_scene.items()}
        per_seed.append(overall(view))
    out = {}
    for m in per_seed[0]:
        vals = {"registered": [o[m]["num_images_registered"] for o in per_seed],
                "points": [o[m]["num_points3D"] for o in per_seed],
                "acc10": [o[m]["mean_pose_accuracy"]["10"] for o in per_seed],
                "own10": [o[m]["mean_registered_pose_accuracy"]["10"] for o in per_seed]}
        out[m] = {"seeds": n, "per_seed": [o[m] for o in per_seed],
                  **{k: ({"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v))}
                         if all(x is not None for x in v) else None) for k, v in vals.items()}}
    return out


def spread_text(v: dict | None, spec: str) -> str:
    """``mean (min-max)`` of one of :func:`over_seeds`' values."""
    return "n/a" if v is None else f"{format(v['mean'], spec)} ({format(v['min'], spec)}-{format(v['max'], spec)})"


def _fmt(v, spec, width):
    return format(v, spec).rjust(width) if v is not None else "n/a".rjust(width)


def format_table(result: dict) -> str:
    """Per scene and overall tables of :func:`evaluate_sfm_scenes` (or one scene of :func:`evaluate_sfm`)."""
    scenes = result["scenes"] if "scenes" in result else {result["scene"]: result}
    head = (f"{'scene':<30}{'method':<13}{'reg':>8}{'points':>9}{'track':>7}{'reproj':>8}{'verif':>7}"
            f"{'pos.err':>9}{'rel.pos':>8}{'rot.err':>9}{'acc@10':>8}{'own@10':>8}{'time s':>8}")
    lines = [head, "-" * len(head)]
    for name, res in scenes.items():
        for m, r in res["methods"].items():
            gt = r.get("gt") or {}
            rel = gt.get("relative_pose") or {}
            lines.append(f"{name:<30}{m:<13}{r['num_images_registered']:>4d}/{r['num_images_used']:<3d}"
                         f"{r['num_points3D']:9d}" + _fmt(r["mean_track_length"], ".2f", 7)
                         + _fmt(r["mean_reprojection_error"], ".3f", 8) + f"{r['num_verified_pairs']:7d}"
                         + _fmt(gt.get("median_position_error"), ".4f", 9)
                         + _fmt(gt.get("relative_position_error"), ".4f", 8)
                         + _fmt(gt.get("max_rotation_error_deg"), ".3f", 9)
                         + _fmt(rel.get("pose_accuracy", {}).get("10"), ".3f", 8)
                         + _fmt(rel.get("registered_pose_accuracy", {}).get("10"), ".3f", 8)
                         + f"{r['seconds']['wall']:8.1f}")
    if "scenes" in result and len(scenes) > 1:
        for m, r in result["methods"].items():
            lines.append(f"{'ALL':<30}{m:<13}{r['num_images_registered']:>4d}/{r['num_images_used']:<3d}"
                         f"{r['num_points3D']:9d}" + _fmt(r["mean_track_length"], ".2f", 7)
                         + _fmt(r["mean_reprojection_error"], ".3f", 8) + f"{r['num_verified_pairs']:7d}"
                         + f"{'':>9}" + _fmt(r["median_relative_position_error"], ".4f", 8)
                         + _fmt(r["median_max_rotation_error_deg"], ".3f", 9)
                         + _fmt((r.get("mean_pose_accuracy") or {}).get("10"), ".3f", 8)
                         + _fmt((r.get("mean_registered_pose_accuracy") or {}).get("10"), ".3f", 8)
                         + f"{r['seconds']['wall']:8.1f}")
    for m, r in (result.get("seeds") or {}).items():
        lines.append(f"{'ALL, ' + str(r['seeds']) + ' seeds':<30}{m:<13}registered "
                     f"{spread_text(r['registered'], '.1f')}, points {spread_text(r['points'], '.0f')}, acc@10 "
                     f"{spread_text(r['acc10'], '.3f')}, own@10 {spread_text(r['own10'], '.3f')} (mean (min-max) over "
                     "the mapping seeds)")
    for m, why in (result.get("absent") or {}).items():
        lines.append(f"{'':<30}{m:<13}absent: {why}")
    lines.append("pos.err: median camera position error after similarity alignment (GT units); rel.pos: the same / "
                 "spread of the true cameras (ALL: median over scenes); rot.err: max rotation error (deg; ALL: median "
                 "over scenes); acc@10: share of all image pairs whose relative pose is within 10 deg in rotation and "
                 "translation direction, no alignment needed; own@10: the same share of the model's own pairs (its "
                 "precision) (ALL: means over scenes); n/a: no usable ground truth")
    return "\n".join(lines)
