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


def export(kind: str, model: Path, image_dir: Path, output: Path, max_image_size: int | None = None) -> dict:
    """Write the ``kind`` layout (see the module docstring) into ``output``; returns counts."""
    import pycolmap

    if kind not in LAYOUTS:
        raise CdSfmError(f"undistorted export {kind!r}: expected one of {', '.join(LAYOUTS)}")
    tmp = staging(output)
    try:
        undistort(model, image_dir, tmp, max_image_size)
        sparse = tmp / "sparse"
        rec = pycolmap.Reconstruction(str(sparse))
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
    return {"num_images": rec.num_reg_images(), "num_points3D": rec.num_points3D(), "camera_models": sorted(cams)}
