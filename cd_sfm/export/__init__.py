"""Where the result goes next: exports of a finished output folder for other tools (``cd-sfm export OUT --to KIND``).

Kinds (each writes ``OUT/export/<kind>/`` unless an output folder is given):

* ``colmap3``: ``database.db`` in the schema of COLMAP 3.x (3.8 here), converted from the pycolmap 4.2 database
  (:mod:`.colmap3`), so COLMAP 3.x's GUI, matchers and mapper open it;
* ``undistorted``: undistorted images + PINHOLE model as ``colmap image_undistorter`` writes them (``images/``,
  ``sparse/``, ``stereo/``, the ``run-colmap-*.sh`` scripts): the input of COLMAP's dense stereo (:mod:`.undistort`);
* ``gaussian-splatting``: the layout gaussian-splatting's ``train.py -s`` reads (``images/`` + ``sparse/0/`` with
  undistorted PINHOLE cameras, as its ``convert.py`` leaves it);
* ``openmvs``: the undistorted layout OpenMVS's ``InterfaceCOLMAP`` reads (``images/`` + ``sparse/cameras.txt``,
  ``images.txt``, ``points3D.txt``; PINHOLE only): ``InterfaceCOLMAP -i DIR -o DIR/scene.mvs`` makes the ``.mvs``
  project (pycolmap cannot write ``.mvs`` itself);
* ``nerfstudio``: undistorted images + ``transforms.json`` in nerfstudio's conventions (:mod:`.nerfstudio`).

Every export reads ``OUT/sparse/0`` (the largest model) and, for the image kinds, the image folder recorded in
``OUT/summary.json`` (or ``image_dir``). Results are written into a temporary folder next to the target and renamed
into place, so a killed export never leaves a half-written folder behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path

from ..io import CdSfmError, output_lock

logger = logging.getLogger(__name__)

KINDS = ("colmap3", "undistorted", "gaussian-splatting", "openmvs", "nerfstudio")
ALIASES = {"colmap": "colmap3", "colmap-3": "colmap3", "gsplat": "gaussian-splatting", "3dgs": "gaussian-splatting",
           "mvs": "openmvs", "dense": "undistorted", "nerf": "nerfstudio", "ns": "nerfstudio"}


def default_output(out_dir: str | Path, kind: str) -> Path:
    return Path(out_dir) / "export" / kind


def resolve_kind(kind: str) -> str:
    k = ALIASES.get(str(kind).lower(), str(kind).lower())
    if k not in KINDS:
        raise CdSfmError(f"export {kind!r}: expected one of {', '.join(KINDS)}")
    return k


def model_dir(out_dir: str | Path) -> Path:
    """``OUT/sparse/0``, checked."""
    path = Path(out_dir) / "sparse" / "0"
    if not (path / "cameras.bin").exists() and not (path / "cameras.txt").exists():
        raise CdSfmError(f"{path}: no reconstruction (run `cd-sfm reconstruct` or `cd-sfm sfm` first)")
    return path


def image_dir_of(out_dir: str | Path, image_dir: str | Path | None = None) -> Path:
    """The image folder: ``image_dir`` when given, else the one ``OUT/summary.json`` records."""
    if image_dir is None:
        summary = Path(out_dir) / "summary.json"
        try:
            image_dir = json.loads(summary.read_text())["image_dir"]
        except FileNotFoundError:
            raise CdSfmError(f"{summary}: not found; give the image folder with --images") from None
        except (ValueError, KeyError) as e:
            raise CdSfmError(f"{summary}: no image_dir recorded ({e}); give the image folder with --images") from None
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise CdSfmError(f"{image_dir}: image folder not found (give it with --images)")
    return image_dir


def staging(output: Path) -> Path:
    """An empty temporary folder next to ``output`` (to be put in place with :func:`commit`)."""
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, output: Path) -> Path:
    """Replace ``output`` by the finished ``tmp`` folder."""
    old = output.with_name(f".{output.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if output.exists():
        output.rename(old)
    tmp.rename(output)
    shutil.rmtree(old, ignore_errors=True)
    return output


def export(kind: str, out_dir: str | Path, output: str | Path | None = None, image_dir: str | Path | None = None,
           max_image_size: int | None = None, mask_dir: str | Path | None = None) -> dict:
    """Export the reconstruction of ``out_dir`` as ``kind`` (see the module docstring) into ``output`` (default
    ``OUT/export/<kind>``). ``max_image_size``: the longest side of undistorted images (None: full size).
    ``mask_dir``: feature masks to resample for the ``undistorted`` and ``nerfstudio`` kinds (default: the run's
    ``masks`` in ``OUT/config.yaml``, when it still exists). Returns ``{"kind", "output", ...}`` with counts of what
    was written."""
    kind = resolve_kind(kind)
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise CdSfmError(f"{out_dir}: output folder not found")
    output = Path(output) if output is not None else default_output(out_dir, kind)
    inside = output.resolve().is_relative_to(out_dir.resolve())
    with output_lock(out_dir) if inside else contextlib.nullcontext():  # not while a run rewrites the folder
        stats = _export(kind, out_dir, output, image_dir, max_image_size, masks_of(out_dir, mask_dir))
    stats.update(kind=kind, output=str(output))
    logger.info("Exported %s into %s", kind, output)
    return stats


def masks_of(out_dir: Path, mask_dir: str | Path | None = None) -> Path | None:
    """The mask folder of an export: ``mask_dir`` when given (it must exist), else the ``masks`` that
    ``OUT/config.yaml`` records when that folder still exists (None otherwise)."""
    if mask_dir is not None:
        if not Path(mask_dir).is_dir():
            raise CdSfmError(f"{mask_dir}: mask folder not found")
        return Path(mask_dir)
    from ..config import read_saved

    recorded = (read_saved(out_dir / "config.yaml") or {}).get("masks")
    if recorded and not Path(recorded).is_dir():
        logger.warning("%s: the run's mask folder is gone; exporting without masks", recorded)
        return None
    return Path(recorded) if recorded else None


def _export(kind: str, out_dir: Path, output: Path, image_dir, max_image_size, mask_dir: Path | None) -> dict:
    output.parent.mkdir(parents=True, exist_ok=True)
    if kind == "colmap3":
        from . import colmap3

        stats = colmap3.convert(out_dir / "database.db", output / "database.db")
    else:
        from . import undistort

        images = image_dir_of(out_dir, image_dir)
        if kind == "nerfstudio":
            from . import nerfstudio

            stats = nerfstudio.export(model_dir(out_dir), images, output, max_image_size=max_image_size,
                                      mask_dir=mask_dir)
        else:
            stats = undistort.export(kind, model_dir(out_dir), images, output, max_image_size=max_image_size,
                                     mask_dir=mask_dir)
    return stats
