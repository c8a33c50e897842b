"""Undistorted images and PINHOLE models for dense reconstruction and view synthesis (``pycolmap.undistort_images``).

``export(kind, model, image_dir, output)`` writes one of three layouts, all from COLMAP's own undistorter (the code
of ``colmap image_undistorter``: every camera becomes PINHOLE, images are resampled, 2D points moved):

* ``undistorted``: exactly what ``colmap image_undistorter --output_type COLMAP`` writes: ``images/``, ``sparse/``
  (binary model), ``stereo/`` (patch-match and fusion configs) and ``run-colmap-geometric.sh`` /
  ``run-colmap-photometric.sh``; run ``colmap patch_match_stereo --workspace_path DIR`` then ``stereo_fusion`` on it;
* ``gaussian-splatting``: ``images/`` + ``sparse/0/`` (binary, PINHOLE), the folder gaussian-splatting's
  ``convert.py`` produces and ``train.py -s DIR`` reads (its reader joins ``images/`` and the image name, so names in
  sub-folders keep their sub-folders under ``images/``);
* ``openmvs``: ``images/`` + ``sparse/cameras.txt``, ``images.txt``, ``points3D.txt``: the text model OpenMVS's
  ``InterfaceCOLMAP`` reads (it accepts PINHOLE cameras only, and older releases only text files);
  ``InterfaceCOLMAP -i DIR -o DIR/scene.mvs`` then ``DensifyPointCloud DIR/scene.mvs``. pycolmap has no writer of
  OpenMVS's own ``.mvs`` archive, so that step is OpenMVS's.

``max_image_size`` limits the longest side of the undistorted images (``UndistortCameraOptions.max_image_size``).
Where the run used feature masks (``masks``), ``undistorted`` also gets them resampled into the undistorted cameras,
``masks/<image name>.png`` (:func:`undistort_masks`): ``colmap stereo_fusion --StereoFusion.mask_path DIR/masks``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ..io import CdSfmError
from . import commit, staging

logger = logging.getLogger(__name__)

LAYOUTS = ("undistorted", "gaussian-splatting", "openmvs")
MODEL_FILES = ("cameras", "images", "points3D", "rigs", "frames")


def undistort(model: Path, image_dir: Path, output: Path, max_image_size: int | None = None) -> None:
    """COLMAP's undistorter: ``output/images``, ``output/sparse``, ``output/stereo``, scripts."""
    import pycolmap

    from ..colmap import quiet_colmap

    quiet_colmap()
    rec = pycolmap.Reconstruction(str(model))
    missing = [rec.images[i].name for i in rec.reg_image_ids() if not (image_dir / rec.images[i].name).exists()]
    if missing:
        raise CdSfmError(f"{image_dir / missing[0]}: image of the model not found ({len(missing)} missing; give the "
                         f"image folder with --images)")
    opts = pycolmap.UndistortCameraOptions()
    if max_image_size:
        opts.max_image_size = int(max_image_size)
    logger.info("Undistorting %d images (COLMAP's undistorter)", rec.num_reg_images())
    pycolmap.undistort_images(str(output), str(model), str(image_dir), undistort_options=opts)
    if not (output / "sparse" / "cameras.bin").exists():
        raise CdSfmError(f"{output}: the undistorter wrote no model")
    unread = [rec.images[i].name for i in rec.reg_image_ids() if not (output / "images" / rec.images[i].name).exists()]
    if unread:  # COLMAP logs and skips an image its reader cannot decode (a format it lacks, a damaged file)
        raise CdSfmError(f"{image_dir / unread[0]}: COLMAP's undistorter could not read this image ({len(unread)} of "
                         f"{rec.num_reg_images()} not written: a damaged file, or a format COLMAP does not read)")


def undistort_masks(model: Path, undistorted: Path, mask_dir: Path, output: Path) -> list[str]:
    """The feature masks of the run (COLMAP's ``mask_path`` names, drawn on the stored pixels: see
    :func:`cd_sfm.images.read_mask`) resampled into the undistorted cameras of ``undistorted`` (nearest pixel, black
    outside the original image), as ``output/<image name>.png``: COLMAP's ``--StereoFusion.mask_path`` names, and
    nerfstudio's ``mask_path`` format (0 = ignore). Images without a mask get none. Returns the names of the images
    whose mask was written."""
    import cv2
    import numpy as np
    import pycolmap

    from ..images import find_mask, read_mask

    src = pycolmap.Reconstruction(str(model))
    dst = pycolmap.Reconstruction(str(undistorted))
    by_name = {src.images[i].name: src.images[i] for i in src.reg_image_ids()}
    written = []
    for i in dst.reg_image_ids():
        im = dst.images[i]
        path = find_mask(mask_dir, im.name)
        if path is None or im.name not in by_name:
            continue
        cam0, cam1 = src.cameras[by_name[im.name].camera_id], dst.cameras[im.camera_id]
        mask = read_mask(path, (cam0.width, cam0.height), 1, im.name)
        # every undistorted pixel centre (COLMAP: (0.5, 0.5) is the first) -> its ray -> the distorted pixel
        u, v = np.meshgrid(np.arange(cam1.width) + 0.5, np.arange(cam1.height) + 0.5)
        rays = np.asarray(cam1.cam_from_img(np.column_stack([u.ravel(), v.ravel()])), np.float64)
        xy = np.asarray(cam0.img_from_cam(np.column_stack([rays, np.ones(len(rays))])), np.float64) - 0.5
        maps = xy.reshape(cam1.height, cam1.width, 2).astype(np.float32)
        out = cv2.remap(mask, maps[..., 0], maps[..., 1], cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                        borderValue=0)
        target = output / f"{im.name}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(target), out):
            raise CdSfmError(f"{target}: cannot write the mask")
        written.append(im.name)
    logger.info("Undistorted %d masks into %s", len(written), output)
    return written


def export(kind: str, model: Path, image_dir: Path, output: Path, max_image_size: int | None = None,
           mask_dir: Path | None = None) -> dict:
    """Write the ``kind`` layout (see the module docstring) into ``output``; returns counts."""
    import pycolmap

    if kind not in LAYOUTS:
        raise CdSfmError(f"undistorted export {kind!r}: expected one of {', '.join(LAYOUTS)}")
    tmp = staging(output)
    try:
        undistort(model, image_dir, tmp, max_image_size)
        sparse = tmp / "sparse"
        rec = pycolmap.Reconstruction(str(sparse))
        masks = undistort_masks(model, sparse, mask_dir, tmp / "masks") if mask_dir and kind == "undistorted" else []
        if kind == "gaussian-splatting":
            # as gaussian-splatting's convert.py: the model moves into sparse/0, the MVS extras go
            (sparse / "0").mkdir()
            for f in list(sparse.iterdir()):
                if f.is_file():
                    f.rename(sparse / "0" / f.name)
            shutil.rmtree(tmp / "stereo", ignore_errors=True)
            for script in tmp.glob("run-colmap-*.sh"):
                script.unlink()
        elif kind == "openmvs":
            for name in MODEL_FILES:
                (sparse / f"{name}.bin").unlink(missing_ok=True)
            rec.write_text(str(sparse))
        commit(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    cams = {c.model.name for c in rec.cameras.values()}
    return {"num_images": rec.num_reg_images(), "num_points3D": rec.num_points3D(), "camera_models": sorted(cams),
            "num_masks": len(masks)}
