"""Relative-pose evaluation on image pairs with ground-truth cameras: pose AUC at 5/10/20 degrees.

Scenes: folders of ``../shared/data`` with ``images/`` and ground-truth cameras in any form :mod:`.gt` reads (a
COLMAP model, LLFF ``poses_bounds.npy``, ``transforms.json``, kapture, COTR cameras); images are matched by name. By
default the EVAL scenes of ``cd_sfm/split.yaml`` that have usable ground truth (:func:`.scenes.pose_scenes`).

Pairs: every pair of the scene whose optical axes are at most ``max_view_angle`` degrees apart (default 60: pairs
that look at the same part of the scene; on the 16-view Middlebury ring, views 22.5 and 45 degrees apart; on Strecha
all pairs but the extreme ones). ``max_view_angle=0`` takes all pairs. Of these, at most ``max_pairs`` (default 40)
per scene are evaluated, evenly spaced over the sorted list (:func:`subsample_pairs`: deterministic, spread over the
whole scene), so that a 24-image scene with 180 candidate pairs costs no more than a 10-image one.

Per pair and method: SIFT keypoints (:func:`detect_sift`, the ContextDesc settings; mapped back to the stored image
when it is downscaled, and undistorted with the ground-truth camera) on both images, each descriptor on
those keypoints, the pipeline's default matching (mutual nearest neighbour, Lowe's ratio 0.8 both ways), then the
relative pose from the matches in normalised camera coordinates, threshold ``ransac_px`` pixels divided by the mean
focal length, confidence 0.99999: by default COLMAP's LO-RANSAC essential-matrix estimation with its final
refinement (``pycolmap.estimate_essential_matrix``, seeded with ``seed``; ``estimator="colmap"``), or as SuperGlue's
evaluation does, ``cv2.findEssentialMat`` (RANSAC) and ``cv2.recoverPose`` (``estimator="opencv"``, the method up to
the 4th session of 2026-12-07; its poses move with the order of the matches, see :func:`estimate_pose`).

Errors: rotation error = angle of R_est^T R_gt; translation error = angle between the estimated and true translation
directions, min(e, 180 - e) (the sign of t is not observable from E); pose error = max of the two (inf when no pose
could be estimated). AUC@t = area under the cumulative-error curve up to t, divided by t (SuperGlue / LoFTR).
Also reported per method: matches, RANSAC inliers and correct matches (Sampson distance to the true epipolar
geometry <= ``epi_px`` pixels) per pair.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from tqdm import tqdm

from .. import geometry
from ..geometry import fundamental_from_pose, sampson_distance
from ..io import CdSfmError
from . import gt
from .gt import GTView

logger = logging.getLogger(__name__)
skew = geometry.skew  # this module's name for it before cd_sfm.geometry existed

AUC_THRESHOLDS = (5, 10, 20)


@dataclass
class PoseConf:
    max_keypoints: int = 4096
    contrast_threshold: float = 0.04  # the ContextDesc detector setting
    upright: bool = False
    max_image_size: int = 1600  # images larger than this are downscaled (keypoints mapped back to full size)
    max_view_angle: float = 60.0  # degrees between optical axes; 0: all pairs
    max_pairs: int = 40  # per scene, evenly spaced over the selected pairs; 0: all
    ransac_px: float = 1.0
    ransac_conf: float = 0.99999
    estimator: str = "colmap"  # see estimate_pose
    epi_px: float = 1.0  # Sampson distance for a correct match
    seed: int = 0
    ratio: float | None = None  # None: the pipeline's default matching (cd_sfm.config.DEFAULTS)


# --------------------------------------------------------------------------------------------------------------------
# geometry


def rotation_angle(R: np.ndarray) -> float:
    """Angle in degrees of a rotation matrix."""
    c = (np.trace(R) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def angle_between(a: np.ndarray, b: np.ndarray) -> float:
    """Angle in degrees between two vectors (nan when one is zero)."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return float("nan")
    return float(np.degrees(np.arccos(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0))))


def relative_pose(R0, t0, R1, t1) -> tuple[np.ndarray, np.ndarray]:
    """cam1_from_cam0 of two world-to-camera poses (x_cam = R X + t)."""
    R = R1 @ R0.T
    return R, t1 - R @ t0


def pose_error(R_est, t_est, R_gt, t_gt) -> tuple[float, float]:
    """(rotation error, translation direction error) in degrees; the latter is sign-agnostic."""
    err_R = rotation_angle(np.asarray(R_est).T @ np.asarray(R_gt))
    e = angle_between(np.asarray(t_est).ravel(), np.asarray(t_gt).ravel())
    err_t = min(e, 180.0 - e) if np.isfinite(e) else float("inf")
    return err_R, err_t


def pose_auc(errors, thresholds=AUC_THRESHOLDS) -> list[float]:
    """Area under the recall-vs-error curve up to each threshold, normalised by it (inf / nan count as failures)."""
    errors = np.asarray(errors, np.float64)
    errors = np.where(np.isfinite(errors), errors, np.inf)
    if len(errors) == 0:
        return [0.0 for _ in thresholds]
    errors = np.sort(errors)
    recall = (np.arange(len(errors)) + 1) / len(errors)
    errors = np.r_[0.0, errors]
    recall = np.r_[0.0, recall]
    aucs = []
    for t in thresholds:
        last = np.searchsorted(errors, t)
        r = np.r_[recall[:last], recall[last - 1]]
        e = np.r_[errors[:last], t]
        aucs.append(float(np.trapezoid(r, x=e) / t))
    return aucs


def unique_correspondences(x0, x1) -> np.ndarray:
    """Indices of the correspondences whose point repeats no earlier one's in either image (SIFT gives one location
    several orientations, so a location can be matched twice): RANSAC on exact duplicates draws degenerate samples."""
    x0, x1 = np.asarray(x0), np.asarray(x1)
    if not len(x0):
        return np.zeros(0, np.int64)
    _, i0 = np.unique(x0, axis=0, return_index=True)
    _, i1 = np.unique(x1, axis=0, return_index=True)
    return np.intersect1d(i0, i1)


ESTIMATORS = ("colmap", "opencv")


def estimate_pose(x0, x1, K0, K1, thresh_px: float = 1.0, conf: float = 0.99999, seed: int = 0,
                  estimator: str = "colmap"):
    """(R, t, inlier mask) of cam1_from_cam0 from pixel correspondences, or None with fewer than 5 matches / no E.

    ``estimator``: "colmap" (the default: ``pycolmap.estimate_essential_matrix``, COLMAP's LO-RANSAC with the
    five-point solver and a final refinement on all inliers, seeded; what the pipeline's verification runs) or
    "opencv" (``cv2.findEssentialMat`` with RANSAC, then ``cv2.recoverPose``, as SuperGlue's evaluation; used up to
    the 4th session of 2026-12-07: without a refinement its pose moves with the order of the matches, by up to 13
    points of a scene's AUC@10). Correspondences repeating a point (:func:`unique_correspondences`) are left out
    (not inliers): OpenCV's five-point solver asserts on such samples."""
    if estimator not in ESTIMATORS:
        raise CdSfmError(f"pose estimator must be one of {', '.join(ESTIMATORS)}, not {estimator!r}")
    keep = unique_correspondences(x0, x1)
    if len(keep) < 5:
        return None
    f_mean = np.mean([K0[0, 0], K0[1, 1], K1[0, 0], K1[1, 1]])
    n0 = cv2.undistortPoints(np.asarray(x0, np.float64)[keep].reshape(-1, 1, 2), K0, None).reshape(-1, 2)
    n1 = cv2.undistortPoints(np.asarray(x1, np.float64)[keep].reshape(-1, 1, 2), K1, None).reshape(-1, 2)
    if estimator == "colmap":
        return _estimate_colmap(n0, n1, keep, len(x0), thresh_px / f_mean, conf, seed)
    cv2.setRNGSeed(int(seed))
    try:
        E, mask = cv2.findEssentialMat(n0, n1, np.eye(3), threshold=thresh_px / f_mean, prob=conf, method=cv2.RANSAC)
    except cv2.error as e:  # any other degenerate input: no pose, as with too few matches
        logger.warning("findEssentialMat failed on %d correspondences: %s", len(keep), str(e).strip().splitlines()[-1])
        return None
    if E is None or mask is None:
        return None
    best = None
    for i in range(0, len(E) - len(E) % 3, 3):
        _E = E[i : i + 3]
        n, R, t, m = cv2.recoverPose(_E, n0, n1, np.eye(3), 1e9, mask=mask.copy())
        if best is None or n > best[0]:
            best = (n, R, t.ravel(), mask.ravel() > 0)
    if best is None:
        return None
    inliers = np.zeros(len(x0), bool)
    inliers[keep] = best[3]
    return best[1], best[2], inliers


def _estimate_colmap(n0, n1, keep, n, threshold: float, conf: float, seed: int):
    """COLMAP's essential-matrix estimation on normalised points (a unit pinhole camera): the threshold is in
    normalised units."""
    import pycolmap

    cam = pycolmap.Camera(model="PINHOLE", width=2, height=2, params=[1.0, 1.0, 0.0, 0.0])
    opts = pycolmap.RANSACOptions()
    opts.max_error = float(threshold)
    opts.confidence = float(conf)
    opts.random_seed = int(seed)
    r = pycolmap.estimate_essential_matrix(n0, n1, cam, cam, opts)
    if r is None:
        return None
    rel = r["cam2_from_cam1"]
    inliers = np.zeros(n, bool)
    inliers[keep] = np.asarray(r["inlier_mask"], bool).ravel()
    return np.asarray(rel.rotation.matrix(), np.float64), np.asarray(rel.translation, np.float64), inliers


# --------------------------------------------------------------------------------------------------------------------
# ground truth


def load_gt(scene: str | Path) -> dict[str, GTView]:
    """Ground-truth cameras of a scene folder by image name (see :mod:`cd_sfm.evaluation.gt` for the forms read)."""
    return gt.load_gt(scene)


def select_pairs(views: dict[str, GTView], max_view_angle: float = 60.0) -> list[tuple[str, str]]:
    """Pairs with optical axes at most ``max_view_angle`` degrees apart (0: all) and a baseline (pairs with the same
    camera centre, e.g. a view repeated in the data, have no translation direction to evaluate)."""
    names = list(views)
    combos = list(itertools.combinations(names, 2))
    base = {p: float(np.linalg.norm(views[p[0]].center - views[p[1]].center)) for p in combos}
    scale = float(np.median(list(base.values()))) if base else 0.0
    out = []
    for a, b in combos:
        if max_view_angle and angle_between(views[a].axis, views[b].axis) > max_view_angle + 1e-6:  # 60.0000001 is 60
            continue
        if base[(a, b)] <= 1e-6 * scale:
            continue
        out.append((a, b))
    return out


def subsample_pairs(pairs: list[tuple[str, str]], max_pairs: int) -> list[tuple[str, str]]:
    """At most ``max_pairs`` of ``pairs`` (0: all), evenly spaced over the given order: deterministic, and spread
    over the whole scene rather than its first views."""
    if not max_pairs or len(pairs) <= max_pairs:
        return list(pairs)
    idx = np.floor(np.linspace(0, len(pairs) - 1, max_pairs) + 0.5).astype(int)
    return [pairs[i] for i in idx]


# --------------------------------------------------------------------------------------------------------------------
# evaluation


def _read(path: Path, max_size: int):
    """(RGB, gray, (sx, sy)): the image downscaled to ``max_size`` (longest side) and the per-axis scale."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise CdSfmError(f"{path}: cannot read image")
    s = np.ones(2)
    if max_size and max(img.shape[:2]) > max_size:
        f = max_size / max(img.shape[:2])
        h, w = img.shape[:2]
        img = cv2.resize(img, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA)
        s = np.array([img.shape[1] / w, img.shape[0] / h])
    rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return rgb, cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), s


def _match_conf(conf: PoseConf) -> dict:
    from ..config import MatchingSettings

    m = MatchingSettings().matcher_conf()  # the pipeline's default matching
    if conf.ratio is not None:
        m["ratio"] = conf.ratio
    return m


def evaluate_scene(scene: str | Path, describers: dict[str, Callable], conf: PoseConf = PoseConf()) -> dict:
    """Pose errors of every selected pair of one scene for each method; see the module docstring."""
    from ..features.patches import SiftDetectorConf, detect_sift
    from ..matching import match_descriptors

    scene = Path(scene)
    views = load_gt(scene)
    img_dir = scene / "images"
    missing = [n for n in views if not (img_dir / n).is_file()]
    if missing:
        raise CdSfmError(f"{img_dir}: images of the ground truth not found: {', '.join(missing[:3])}")
    candidates = select_pairs(views, conf.max_view_angle)
    pairs = subsample_pairs(candidates, conf.max_pairs)
    logger.info("%s: %d views with ground truth, %d pairs <= %g deg apart, %d evaluated", scene.name, len(views),
                len(candidates), conf.max_view_angle, len(pairs))
    mconf = _match_conf(conf)
    mkw = {k: mconf[k] for k in ("ratio", "mutual", "distance_threshold", "metric", "cross_ratio")}
    det = SiftDetectorConf(max_keypoints=conf.max_keypoints, contrast_threshold=conf.contrast_threshold,
                           upright=conf.upright)
    needed = sorted({n for p in pairs for n in p})
    feats = {}
    for name in tqdm(needed, desc=f"features {scene.name}", unit="img"):
        rgb, gray, s = _read(img_dir / name, conf.max_image_size)
        kp = detect_sift(gray, det, descriptors=True)
        desc = {m: np.asarray(f(gray, kp, rgb), np.float32) for m, f in describers.items()}
        # keypoints in the pixel frame of the stored image (the ground truth's K), undistorted to that pinhole K
        xy = (kp["keypoints"].astype(np.float64) + 0.5) / s - 0.5
        feats[name] = (views[name].undistort(xy), views[name].K, desc)
    rows = {m: [] for m in describers}
    for a, b in tqdm(pairs, desc=f"pairs {scene.name}", unit="pair"):
        va, vb = views[a], views[b]
        R_gt, t_gt = relative_pose(va.R, va.t, vb.R, vb.t)
        xa, Ka, da = feats[a]
        xb, Kb, db = feats[b]
        F = fundamental_from_pose(Ka, Kb, R_gt, t_gt)
        for m in describers:
            m0, _ = match_descriptors(da[m], db[m], normalized=False, **mkw)
            i0 = np.flatnonzero(m0 >= 0)
            p0, p1 = xa[i0], xb[m0[i0]]
            n_correct = int((sampson_distance(F, p0, p1) <= conf.epi_px).sum())
            est = estimate_pose(p0, p1, Ka, Kb, conf.ransac_px, conf.ransac_conf, conf.seed, conf.estimator)
            if est is None:
                err_R = err_t = float("inf")
                n_inl = 0
            else:
                R, t, inl = est
                err_R, err_t = pose_error(R, t, R_gt, t_gt)
                n_inl = int(inl.sum())
            rows[m].append({"pair": [a, b], "n_kpts": [len(xa), len(xb)], "n_matches": int(len(i0)),
                            "n_correct": n_correct, "n_inliers": n_inl, "err_R": err_R, "err_t": err_t,
                            "err": max(err_R, err_t),
                            "view_angle": angle_between(va.axis, vb.axis)})
    return {"scene": scene.name, "n_views": len(views), "n_images": len(needed), "candidate_pairs": len(candidates),
            "pairs": len(pairs), "rows": rows}


def summarize(rows: list[dict]) -> dict:
    errs = [r["err"] for r in rows]
    aucs = pose_auc(errs, AUC_THRESHOLDS)
    n_matches = np.array([r["n_matches"] for r in rows], np.float64)
    n_correct = np.array([r["n_correct"] for r in rows], np.float64)
    return {
        "auc": {t: a for t, a in zip(AUC_THRESHOLDS, aucs)},
        "n_pairs": len(rows),
        "n_matches": float(n_matches.mean()) if len(rows) else 0.0,
        "n_correct": float(n_correct.mean()) if len(rows) else 0.0,
        "precision": float(n_correct.sum() / max(n_matches.sum(), 1)),
        "n_inliers": float(np.mean([r["n_inliers"] for r in rows])) if rows else 0.0,
        "median_err": float(np.median(errs)) if rows else float("inf"),
        "failures": int(sum(not np.isfinite(e) for e in errs)),
    }


def evaluate_pairs(scenes: list[str | Path], describers: dict[str, Callable], conf: PoseConf = PoseConf()) -> dict:
    """Pose AUC per scene and over all pairs of all scenes, for each method.

    Returns {"conf", "scenes": {scene: {method: summary}}, "methods": {method: summary over all pairs},
    "pair_counts": {scene: {n_views, n_images, candidate_pairs, pairs}}, "per_pair": {scene: {method: rows}}}."""
    per_scene, per_pair, counts = {}, {}, {}
    all_rows = {m: [] for m in describers}
    for scene in scenes:
        res = evaluate_scene(scene, describers, conf)
        per_pair[res["scene"]] = res["rows"]
        counts[res["scene"]] = {k: res[k] for k in ("n_views", "n_images", "candidate_pairs", "pairs")}
        per_scene[res["scene"]] = {m: summarize(r) for m, r in res["rows"].items()}
        for m, r in res["rows"].items():
            all_rows[m].extend(r)
    return {"conf": asdict(conf), "scenes": per_scene, "methods": {m: summarize(r) for m, r in all_rows.items()},
            "pair_counts": counts, "per_pair": per_pair}


def format_table(result: dict) -> str:
    head = (f"{'scene':<30}{'method':<13}" + "".join(f"{'AUC@' + str(t):>8}" for t in AUC_THRESHOLDS)
            + f"{'#pairs':>7}{'#match':>8}{'#corr':>8}{'prec':>7}{'#inl':>8}{'fail':>5}")
    lines = [head, "-" * len(head)]
    blocks = list(result["scenes"].items()) + [("ALL", result["methods"])]
    for scene, methods in blocks:
        for m, r in methods.items():
            lines.append(f"{scene:<30}{m:<13}" + "".join(f"{100 * r['auc'][t]:8.1f}" for t in AUC_THRESHOLDS)
                         + f"{r['n_pairs']:7d}{r['n_matches']:8.1f}{r['n_correct']:8.1f}{r['precision']:7.3f}"
                         + f"{r['n_inliers']:8.1f}{r['failures']:5d}")
    for m, why in (result.get("absent") or {}).items():
        lines.append(f"{'':<30}{m:<13}absent: {why}")
    counts = result.get("pair_counts") or {}
    if counts:
        lines.append("")
        lines.append(f"pairs per scene (optical axes <= {result['conf']['max_view_angle']:g} deg; at most "
                     f"{result['conf'].get('max_pairs') or 'all'} evaluated):")
        for scene, c in counts.items():
            lines.append(f"  {scene:<30}{c['n_views']:4d} views{c['candidate_pairs']:6d} pairs"
                         f"{c['pairs']:5d} evaluated")
    return "\n".join(lines)
