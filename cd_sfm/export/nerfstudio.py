"""nerfstudio input: undistorted images and ``transforms.json`` in the conventions of nerfstudio's ``colmap_utils``.

``export(model, image_dir, output)`` writes ``output/images/`` (undistorted by COLMAP's undistorter, PINHOLE),
``output/transforms.json`` and ``output/sparse_pc.ply`` (the model's points, for splatfacto's initialisation), what
``ns-process-data`` leaves for ``ns-train nerfacto|splatfacto --data DIR``:

* intrinsics ``w``, ``h``, ``fl_x``, ``fl_y``, ``cx``, ``cy`` and ``camera_model: OPENCV`` with ``k1 = k2 = p1 = p2 =
  0`` (nerfstudio writes a COLMAP PINHOLE camera so), at the top level when the model has one camera, else in every
  frame;
* ``frames``: ``file_path`` (``images/<name>``), ``transform_matrix`` (4x4 camera-to-world, OpenGL camera axes: x
  right, y up, z backwards, i.e. COLMAP's camera-to-world with its y and z columns negated), ``colmap_im_id``;
* the world as nerfstudio re-orients it (``applied_transform``, the 3x4 matrix taking COLMAP world coordinates to
  the exported ones: rows (x, z, -y), so that z is up where COLMAP's first camera had y down), also applied to the
  points of ``sparse_pc.ply``;
* where the run used feature masks, ``masks/<name>.png`` resampled into the undistorted cameras and ``mask_path`` in
  their frames (nerfstudio ignores the black pixels when training).

A point X of the model then projects in frame i at ``(fl_x * x / -z + cx, -fl_y * y / -z + cy)`` with
``(x, y, z) = inverse(transform_matrix) @ (applied_transform @ X)``: the test of this module checks that against
the keypoints the points were triangulated from.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np

from ..io import atomic_write_text
from . import commit, staging

logger = logging.getLogger(__name__)

# COLMAP world (x, y, z) -> nerfstudio world (x, z, -y), as colmap_utils.colmap_to_json
APPLIED_TRANSFORM = np.array([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0]])


def camera_intrinsics(camera) -> dict:
    """nerfstudio's intrinsics keys of an undistorted (PINHOLE / SIMPLE_PINHOLE) pycolmap camera."""
    name = camera.model.name
    p = [float(v) for v in camera.params]
    if name == "PINHOLE":
        fx, fy, cx, cy = p
    elif name == "SIMPLE_PINHOLE":
        fx, cx, cy = p
        fy = fx
    else:  # the undistorter writes PINHOLE only
        raise ValueError(f"camera {camera.camera_id}: {name} is not an undistorted model")
    return {"w": int(camera.width), "h": int(camera.height), "fl_x": fx, "fl_y": fy, "cx": cx, "cy": cy,
            "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0, "camera_model": "OPENCV"}


def camera_to_world_opengl(image) -> np.ndarray:
    """4x4 camera-to-world of a pycolmap image with OpenGL camera axes, in nerfstudio's world."""
    w2c = np.eye(4)
    w2c[:3, :4] = image.cam_from_world().matrix()
    c2w = np.linalg.inv(w2c)
    c2w[:3, 1:3] *= -1  # OpenCV camera axes (y down, z forward) -> OpenGL (y up, z backward)
    A = np.eye(4)
    A[:3] = APPLIED_TRANSFORM
    return A @ c2w


def transforms(rec, masked: set[str] | None = None) -> dict:
    """The ``transforms.json`` content of an undistorted ``pycolmap.Reconstruction``; frames whose image name is in
    ``masked`` get ``mask_path: masks/<name>.png``."""
    single = len(rec.cameras) == 1
    out: dict = dict(camera_intrinsics(next(iter(rec.cameras.values())))) if single else {}
    frames = []
    for image_id in sorted(rec.reg_image_ids()):
        im = rec.images[image_id]
        frame = {"file_path": f"images/{im.name}", "transform_matrix": camera_to_world_opengl(im).tolist(),
                 "colmap_im_id": int(image_id)}
        if not single:
            frame.update(camera_intrinsics(rec.cameras[im.camera_id]))
        if masked and im.name in masked:
            frame["mask_path"] = f"masks/{im.name}.png"
        frames.append(frame)
    out["frames"] = frames
    out["applied_transform"] = APPLIED_TRANSFORM.tolist()
    out["ply_file_path"] = "sparse_pc.ply"
    return out


def write_points(rec, path: Path) -> None:
    """The model's points in nerfstudio's world (``applied_transform``) as a PLY file (COLMAP's binary x, y, z, red,
    green, blue layout, which nerfstudio reads with Open3D)."""
    import pycolmap

    moved = pycolmap.Reconstruction(rec)
    moved.transform(pycolmap.Sim3d(1.0, pycolmap.Rotation3d(APPLIED_TRANSFORM[:, :3]), APPLIED_TRANSFORM[:, 3]))
    tmp = path.with_name(f".{path.name}.tmp")
    moved.export_PLY(str(tmp))
    tmp.replace(path)


def export(model: Path, image_dir: Path, output: Path, max_image_size: int | None = None,
           mask_dir: Path | None = None) -> dict:
    import pycolmap

    from .undistort import undistort, undistort_masks

    tmp = staging(output)
    try:
        work = tmp / ".undistorted"
        undistort(model, image_dir, work, max_image_size)
        (work / "images").rename(tmp / "images")
        masked = undistort_masks(model, work / "sparse", mask_dir, tmp / "masks") if mask_dir else []
        rec = pycolmap.Reconstruction(str(work / "sparse"))
        shutil.rmtree(work)
        data = transforms(rec, set(masked))
        atomic_write_text(tmp / "transforms.json", json.dumps(data, indent=2) + "\n")
        write_points(rec, tmp / "sparse_pc.ply")
        commit(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"num_images": len(data["frames"]), "num_points3D": rec.num_points3D(), "camera_models": ["PINHOLE"],
            "num_masks": len(masked)}
