"""Bundled demo data: a synthetic scene rendered by COLMAP itself, with ground-truth cameras.

The package ships no photos. ``render_scene`` asks ``pycolmap.synthesize_dataset`` for a random scene (3D points in a
unit ball, cameras on a sphere of radius 5 looking at it, one SIMPLE_RADIAL camera) and
``pycolmap.synthesize_images`` to draw it: every 3D point becomes a textured patch (the same random texture in every
view) at its projection, so feature detectors and matchers have something real to work on. Seeded, hence
reproducible. Writes ``<out>/images/*.png`` and the ground truth as a COLMAP binary model in ``<out>/gt/``.

``compare_to_ground_truth`` aligns a reconstruction to the ground truth (similarity from the projection centres,
``pycolmap.align_reconstructions_via_proj_centers``) and reports rotation / position errors per image.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class SyntheticScene:
    image_dir: Path
    gt_dir: Path
    names: list[str]


def render_scene(
    out_dir: str | Path,
    num_images: int = 10,
    num_points: int = 500,
    width: int = 1024,
    height: int = 768,
    seed: int = 0,
    focal_factor: float = 2.0,
    patch_radius: int = 15,
    overwrite: bool = True,
) -> SyntheticScene:
    """Render the demo scene into ``out_dir`` (``images/`` + ``gt/``); returns the paths and image names.

    ``focal_factor``: focal length in units of the longest image side (2.0: the ball of points spans about 90 % of
    the image height at 4:3). Wider views or more points crowd the point patches (``patch_radius`` pixels), which then
    overlap differently in every view and match worse: 1024x768 with 500 points and 640x480 with 200 points and
    radius 12 give 100+ verified matches per pair.
    """
    import pycolmap

    out_dir = Path(out_dir)
    image_dir, gt_dir = out_dir / "images", out_dir / "gt"
    if image_dir.exists() and gt_dir.exists() and not overwrite:
        rec = pycolmap.Reconstruction(str(gt_dir))
        return SyntheticScene(image_dir, gt_dir, sorted(im.name for im in rec.images.values()))
    for d in (image_dir, gt_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    pycolmap.set_random_seed(int(seed))
    opts = pycolmap.SyntheticDatasetOptions()
    opts.num_rigs = 1
    opts.num_cameras_per_rig = 1
    opts.num_frames_per_rig = int(num_images)
    opts.num_points3D = int(num_points)
    opts.camera_width, opts.camera_height = int(width), int(height)
    f = focal_factor * max(width, height)
    opts.camera_params = [f, width / 2.0, height / 2.0, 0.02]
    rec = pycolmap.synthesize_dataset(opts)
    image_opts = pycolmap.SyntheticImageOptions()
    image_opts.feature_patch_radius = int(patch_radius)
    pycolmap.synthesize_images(image_opts, rec, str(image_dir))
    rec.write_binary(str(gt_dir))
    names = sorted(im.name for im in rec.images.values())
    logger.info("Rendered %d synthetic images (%dx%d, %d points) into %s", len(names), width, height, num_points,
                image_dir)
    return SyntheticScene(image_dir, gt_dir, names)


def rotation_angle_deg(R: np.ndarray) -> float:
    """The angle (degrees) of the rotation matrix ``R``."""
    c = (np.trace(R) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def compare_to_ground_truth(rec, gt, max_proj_center_error: float = 0.5) -> dict:
    """Align ``rec`` to ``gt`` and return per-image errors (rotation in degrees, position in ground-truth units).

    ``rec`` and ``gt`` are ``pycolmap.Reconstruction`` objects (or paths to models). Only images registered in
    ``rec`` are compared; ``aligned`` is False when no similarity could be estimated.
    """
    import pycolmap

    if not isinstance(rec, pycolmap.Reconstruction):
        rec = pycolmap.Reconstruction(str(rec))
    if not isinstance(gt, pycolmap.Reconstruction):
        gt = pycolmap.Reconstruction(str(gt))
    sim = pycolmap.align_reconstructions_via_proj_centers(rec, gt, max_proj_center_error)
    if sim is None:
        return {"aligned": False, "num_compared": 0}
    aligned = pycolmap.Reconstruction(rec)
    aligned.transform(sim)
    gt_by_name = {im.name: im for im in gt.images.values()}
    rot_err, pos_err = [], []
    for image_id in aligned.reg_image_ids():
        im = aligned.images[image_id]
        ref = gt_by_name.get(im.name)
        if ref is None:
            continue
        R = im.cam_from_world().rotation.matrix()
        R_gt = ref.cam_from_world().rotation.matrix()
        rot_err.append(rotation_angle_deg(R @ R_gt.T))
        pos_err.append(float(np.linalg.norm(im.projection_center() - ref.projection_center())))
    scene_size = float(np.median([np.linalg.norm(im.projection_center()) for im in gt.images.values()]))
    return {
        "aligned": True,
        "num_compared": len(rot_err),
        "max_rotation_error_deg": max(rot_err) if rot_err else None,
        "max_position_error": max(pos_err) if pos_err else None,
        "median_position_error": float(np.median(pos_err)) if pos_err else None,
        "scene_radius": scene_size,
        "scale": float(sim.scale),
    }
