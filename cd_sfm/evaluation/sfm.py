"""Reconstruction statistics of a scene, per descriptor: the whole pipeline (:func:`cd_sfm.pipeline.reconstruct`) run
once per method into ``work_dir/<scene>/<method>/``.

All methods use the same keypoints (the detector settings of ``SfmEvalConf``: ContextDesc's SIFT settings, the same
image size) and the pipeline's default pairs, matching, verification and mapper (seed 0), so only the descriptor
differs. Methods: ``rootsift`` (features preset ``rootsift``), ``local`` (``contextdesc`` with ``augment: false``),
``contextdesc`` (augmented; absent when the model has no augmentation weights); the model goes in the config's
``model`` key.

Reported: registered images, 3D points, mean track length, mean reprojection error, verified pairs, time per stage;
when the scene has ``gt_colmap/``, the reconstruction is aligned to it (similarity from the projection centres, see
:func:`cd_sfm.synthetic.compare_to_ground_truth`) and the camera position / rotation errors are reported.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..io import CdSfmError

logger = logging.getLogger(__name__)

DEFAULT_SCENE = "strecha_entry-P10_half"


@dataclass
class SfmEvalConf:
    max_keypoints: int = 4096
    contrast_threshold: float = 0.04
    max_image_size: int = 1600
    overwrite: bool = True  # recompute features and matches (times are then comparable)
    seed: int = 0


def method_config(method: str, model: str, conf: SfmEvalConf) -> dict | None:
    """Pipeline config of a method; None when the model cannot provide it (contextdesc without augment weights)."""
    det = {"max_keypoints": conf.max_keypoints, "contrast_threshold": conf.contrast_threshold}
    base = {"max_image_size": conf.max_image_size, "seed": conf.seed}
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


def gt_errors(sparse: Path, gt: Path) -> dict | None:
    """Camera errors of the model ``sparse`` after alignment to the ground truth ``gt`` (None without either)."""
    if not gt.is_dir() or not sparse.is_dir():
        return None
    import pycolmap

    from ..synthetic import compare_to_ground_truth

    gtr = pycolmap.Reconstruction(str(gt))
    centers = np.array([im.projection_center() for im in gtr.images.values()])
    spread = float(np.median(np.linalg.norm(centers - centers.mean(0), axis=1))) or 1.0
    try:
        res = compare_to_ground_truth(pycolmap.Reconstruction(str(sparse)), gtr, max_proj_center_error=0.05 * spread)
    except Exception as e:  # noqa: BLE001 - too few images to align, etc.
        logger.warning("%s: no alignment to the ground truth (%s)", sparse, e)
        return {"aligned": False}
    res["camera_spread"] = spread  # median distance of the true camera centres to their centroid (GT units)
    return res


def evaluate_sfm(scene: str | Path, methods: list[str], work_dir: str | Path, model: str = "cd-sfm-v1",
                 conf: SfmEvalConf = SfmEvalConf()) -> dict:
    """Run the pipeline per method on ``scene``; returns {"conf", "scene", "methods": {m: stats}, "absent"}."""
    from ..pipeline import reconstruct

    scene = Path(scene)
    images = image_dir_of(scene)
    if not images.is_dir():
        raise CdSfmError(f"{scene}: scene folder not found")
    work_dir = Path(work_dir) / scene.name
    out, absent = {}, {}
    for m in methods:
        mc = method_config(m, model, conf)
        if mc is None:
            absent[m] = f"model {model!r} has no augmentation weights (augment.npz)"
            logger.warning("contextdesc: %s: reported as absent", absent[m])
            continue
        logger.info("sfm %s: %s", scene.name, m)
        t = time.perf_counter()
        s = reconstruct(images, work_dir / m, mc, overwrite=conf.overwrite, progress=True)
        wall = time.perf_counter() - t
        row = {k: s.get(k) for k in ("num_images_used", "num_images_registered", "num_points3D", "mean_track_length",
                                     "mean_reprojection_error", "num_pairs", "num_verified_pairs", "num_models")}
        row["seconds"] = {**s.get("seconds", {}), "wall": round(wall, 2)}
        row["output_dir"] = str(work_dir / m)
        row["gt"] = gt_errors(work_dir / m / "sparse" / "0", scene / "gt_colmap")
        out[m] = row
    return {"conf": asdict(conf), "scene": scene.name, "model": model, "methods": out, "absent": absent}


def format_table(result: dict) -> str:
    head = (f"{'method':<13}{'reg':>8}{'points':>9}{'track':>7}{'reproj':>8}{'verif':>7}"
            f"{'pos.err':>9}{'rot.err':>9}{'time s':>8}")
    lines = [f"scene: {result['scene']}", head, "-" * len(head)]
    for m, r in result["methods"].items():
        gt = r.get("gt") or {}
        pe = gt.get("median_position_error")
        re_ = gt.get("max_rotation_error_deg")
        err = r["mean_reprojection_error"]
        lines.append(f"{m:<13}{r['num_images_registered']:>4d}/{r['num_images_used']:<3d}{r['num_points3D']:9d}"
                     f"{r['mean_track_length']:7.2f}" + (f"{err:8.3f}" if err is not None else f"{'n/a':>8}")
                     + f"{r['num_verified_pairs']:7d}" + (f"{pe:9.4f}" if pe is not None else f"{'n/a':>9}")
                     + (f"{re_:9.3f}" if re_ is not None else f"{'n/a':>9}") + f"{r['seconds']['wall']:8.1f}")
    for m, why in (result.get("absent") or {}).items():
        lines.append(f"{m:<13}absent: {why}")
    if any((r.get("gt") or {}).get("aligned") for r in result["methods"].values()):
        lines.append("pos.err: median camera position error after similarity alignment (GT units); "
                     "rot.err: max rotation error (deg)")
    return "\n".join(lines)
