"""Two-view geometric verification of the raw matches in a COLMAP database (fills ``two_view_geometries``).

Runs ``pycolmap.verify_matches`` (COLMAP's ``matches_importer`` verification: RANSAC on E/F/H, inlier matches and the
configuration of each pair) on the pairs of a pair list, with a ``pycolmap.TwoViewGeometryOptions`` built from the
conf. Keys of ``conf``: any attribute of ``TwoViewGeometryOptions`` (``min_num_inliers``, ``compute_relative_pose``,
...) and ``ransac``: a dict of ``RANSACOptions`` attributes (``max_error`` in pixels, ``confidence``, ...).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from ..io import CdSfmError, parse_pairs

logger = logging.getLogger(__name__)

default_conf: dict[str, Any] = {
    "min_num_inliers": 15,
    "ransac": {"max_error": 4.0, "confidence": 0.999, "max_num_trials": 10000},
}

confs = {
    "default": default_conf,
    "strict": {"min_num_inliers": 30, "ransac": {"max_error": 2.0, "confidence": 0.9999, "max_num_trials": 20000}},
}


def two_view_options(conf: dict | None):
    """A ``pycolmap.TwoViewGeometryOptions`` from a (partial) conf dict."""
    import pycolmap

    merged = {**default_conf, **(conf or {})}
    ransac = {**default_conf["ransac"], **(merged.pop("ransac", None) or {})}
    from .mapping import set_option

    opts = pycolmap.TwoViewGeometryOptions()
    for k, v in merged.items():
        if not hasattr(opts, k):
            raise CdSfmError(f"verification option {k!r}: not a TwoViewGeometryOptions attribute")
        set_option(opts, k, v, "verification option ")
    for k, v in ransac.items():
        if not hasattr(opts.ransac, k):
            raise CdSfmError(f"verification option ransac.{k!r}: not a RANSACOptions attribute")
        set_option(opts.ransac, k, v, "verification option ransac.")
    return opts


def main(conf: dict | None, database_path: str | Path, pairs_path: str | Path | None = None) -> dict:
    """Verify the matches of ``pairs_path`` (default: every matched pair in the database); returns counts:
    ``num_pairs_checked``, ``num_verified_pairs`` (at least ``min_num_inliers`` inliers), ``num_inlier_matches``."""
    import pycolmap

    database_path = Path(database_path)
    if not database_path.exists():
        raise CdSfmError(f"{database_path}: database not found")
    opts = two_view_options(conf)
    tmp_pairs = None
    if pairs_path is None:
        # every pair that has raw matches
        db = pycolmap.Database.open(str(database_path))
        try:
            id_to_name = {im.image_id: im.name for im in db.read_all_images()}
            pair_ids, _ = db.read_all_matches()
        finally:
            db.close()
        lines = []
        for pid in pair_ids:
            a, b = pycolmap.pair_id_to_image_pair(pid)
            lines.append(f"{id_to_name[a]} {id_to_name[b]}\n")
        fd, tmp_pairs = tempfile.mkstemp(prefix=".verify-pairs-", suffix=".txt", dir=database_path.parent)
        with os.fdopen(fd, "w") as f:
            f.writelines(lines)
        pairs_path = tmp_pairs
    else:
        parse_pairs(pairs_path)  # clear error on a missing or malformed file
    try:
        pycolmap.verify_matches(str(database_path), str(pairs_path), opts)
    finally:
        if tmp_pairs is not None:
            Path(tmp_pairs).unlink(missing_ok=True)
    db = pycolmap.Database.open(str(database_path))
    try:
        _, inliers = db.read_two_view_geometry_num_inliers()
        stats = {"num_pairs_checked": len(inliers),
                 "num_verified_pairs": sum(n >= opts.min_num_inliers for n in inliers),
                 "num_inlier_matches": db.num_inlier_matches()}
    finally:
        db.close()
    logger.info("Verified pairs: %d with %d inlier matches", stats["num_verified_pairs"], stats["num_inlier_matches"])
    return stats
