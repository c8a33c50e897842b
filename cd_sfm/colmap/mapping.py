"""Sparse reconstruction from a verified COLMAP database: incremental (default) or global mapping through pycolmap.

``main(conf, database_path, image_dir, output_dir)`` writes ``output_dir/sparse/0`` (COLMAP binary model; the largest
model when mapping splits into several, the others as ``sparse/1``, ``sparse/2``, ...) and ``output_dir/points.ply``,
and returns the chosen ``pycolmap.Reconstruction`` (or ``None``) with statistics.

Options go through pycolmap's option objects: ``conf["options"]`` is a dict of attributes of
``pycolmap.IncrementalPipelineOptions`` (``mapper: incremental``) or ``pycolmap.GlobalPipelineOptions``
(``mapper: global``); nested option objects take nested dicts (e.g. ``{"mapper": {"init_min_num_inliers": 50}}``).
The models are first written to a temporary folder, then moved into place, so ``sparse/`` is never half written.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from ..io import CdSfmError

logger = logging.getLogger(__name__)

MAPPERS = ("incremental", "global")

default_conf: dict[str, Any] = {"mapper": "incremental", "options": {}, "seed": 0}

confs = {
    "incremental": {"mapper": "incremental", "options": {}},
    "global": {"mapper": "global", "options": {}},
    # many images: fewer global bundle adjustments, the rest unchanged
    "large": {"mapper": "incremental", "options": {"ba_global_frames_ratio": 1.4, "ba_global_points_ratio": 1.4}},
}


def _apply(obj, values: dict, where: str) -> None:
    for k, v in values.items():
        if not hasattr(obj, k):
            raise CdSfmError(f"mapping option {where}{k!r}: not an attribute of {type(obj).__name__}")
        if isinstance(v, dict):
            _apply(getattr(obj, k), v, f"{where}{k}.")
        else:
            setattr(obj, k, v)


def pipeline_options(conf: dict):
    """The pycolmap options object for ``conf`` (``IncrementalPipelineOptions`` or ``GlobalPipelineOptions``)."""
    import pycolmap

    mapper = conf.get("mapper", "incremental")
    if mapper == "incremental":
        opts = pycolmap.IncrementalPipelineOptions()
    elif mapper == "global":
        opts = pycolmap.GlobalPipelineOptions()
    else:
        raise CdSfmError(f"mapper {mapper!r}: expected one of {', '.join(MAPPERS)}")
    _apply(opts, conf.get("options") or {}, "")
    seed = conf.get("seed")
    if seed is not None and int(seed) >= 0:
        opts.random_seed = int(seed)
    return opts


def model_stats(rec) -> dict:
    """Statistics of a reconstruction, JSON-friendly."""
    if rec is None:
        return {"num_registered": 0, "num_points3D": 0, "mean_track_length": 0.0, "mean_reprojection_error": None,
                "mean_observations_per_image": 0.0}
    return {
        "num_registered": rec.num_reg_images(),
        "num_points3D": rec.num_points3D(),
        "mean_track_length": float(rec.compute_mean_track_length()) if rec.num_points3D() else 0.0,
        "mean_reprojection_error": float(rec.compute_mean_reprojection_error()) if rec.num_points3D() else None,
        "mean_observations_per_image": float(rec.compute_mean_observations_per_reg_image())
        if rec.num_reg_images() else 0.0,
    }


def main(conf: dict | None, database_path: str | Path, image_dir: str | Path, output_dir: str | Path) -> tuple:
    """Map ``database_path``; returns ``(reconstruction or None, stats)``. See the module docstring for outputs."""
    import pycolmap

    conf = {**default_conf, **(conf or {})}
    database_path, image_dir, output_dir = Path(database_path), Path(image_dir), Path(output_dir)
    if not database_path.exists():
        raise CdSfmError(f"{database_path}: database not found")
    opts = pipeline_options(conf)
    if conf.get("seed") is not None and int(conf["seed"]) >= 0:
        pycolmap.set_random_seed(int(conf["seed"]))
    sparse = output_dir / "sparse"
    tmp = output_dir / ".sparse.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    logger.info("Mapping (%s) ...", conf["mapper"])
    try:
        if conf["mapper"] == "incremental":
            models = pycolmap.incremental_mapping(str(database_path), str(image_dir), str(tmp), opts)
        else:
            models = pycolmap.global_mapping(str(database_path), str(image_dir), str(tmp), opts)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    models = dict(models or {})
    ranked = sorted(models.values(), key=lambda r: (r.num_reg_images(), r.num_points3D()), reverse=True)
    # rewrite the models in rank order: sparse/0 is the largest
    staged = output_dir / ".sparse.new"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    for i, rec in enumerate(ranked):
        (staged / str(i)).mkdir()
        rec.write_binary(str(staged / str(i)))
    shutil.rmtree(tmp, ignore_errors=True)
    old = output_dir / ".sparse.old"
    shutil.rmtree(old, ignore_errors=True)
    if sparse.exists():
        sparse.rename(old)
    staged.rename(sparse)
    shutil.rmtree(old, ignore_errors=True)
    best = ranked[0] if ranked else None
    ply = output_dir / "points.ply"
    if best is not None:
        ply_tmp = output_dir / ".points.ply.tmp"
        best.export_PLY(str(ply_tmp))
        ply_tmp.replace(ply)
    else:
        ply.unlink(missing_ok=True)
    stats = model_stats(best)
    stats.update(num_models=len(ranked), mapper=conf["mapper"], seconds=time.perf_counter() - t0)
    if best is not None:
        stats["registered"] = sorted(best.images[i].name for i in best.reg_image_ids())
    else:
        stats["registered"] = []
    logger.info("Mapping: %d models, the largest with %d images and %d points", len(ranked), stats["num_registered"],
                stats["num_points3D"])
    return best, stats
