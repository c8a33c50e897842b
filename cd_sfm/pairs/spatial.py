"""Pairs by camera position, as COLMAP's spatial matcher makes them: each image with its ``num_neighbors`` nearest
images within ``max_distance`` metres, the positions being the images' EXIF GPS positions (east-north-up metres
around their mean; heights ignored by default, as COLMAP's ``ignore_z``: consumer GPS altitude is the least accurate
coordinate). For aerial surveys and walks where photos carry GPS. Images without a position get no spatial pairs
(union with another source: ``--pairs spatial+retrieval``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from . import Pair, save, unique_pairs

logger = logging.getLogger(__name__)

MAX_DISTANCE = 100.0  # metres, COLMAP's SpatialPairingOptions.max_distance


def gps_positions(image_dir: str | Path, names: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """{name: (latitude, longitude, altitude)} of the images whose EXIF has a GPS position (header reads only)."""
    from ..images import image_info
    from ..io import CdSfmError

    out = {}
    for n in names:
        try:
            gps = image_info(Path(image_dir) / n).gps
        except CdSfmError:  # unreadable: the extract stage skips it with its reason
            continue
        if gps is not None:
            out[n] = gps
    return out


def main(names: Sequence[str], positions: dict[str, tuple[float, float, float]], output_path: str | Path | None = None,
         num_neighbors: int = 20, max_distance: float = MAX_DISTANCE, ignore_z: bool = True) -> list[Pair]:
    """Each image of ``names`` that has a position with its ``num_neighbors`` nearest within ``max_distance``."""
    import pycolmap
    from scipy.spatial import cKDTree

    have = [n for n in dict.fromkeys(names) if n in positions]
    if len(have) < len(names):
        logger.info("Spatial pairs: %d of %d images have a GPS position; the others get none", len(have), len(names))
    if len(have) < 2:
        logger.warning("Spatial pairs: fewer than 2 images with a GPS position, no pairs")
        return save([], output_path)
    lla = np.array([positions[n] for n in have], np.float64)
    xyz = np.asarray(pycolmap.GPSTransform().ellipsoid_to_enu(lla, *lla.mean(axis=0)), np.float64)
    if ignore_z:
        xyz[:, 2] = 0.0
    k = min(int(num_neighbors) + 1, len(have))  # the image itself comes first
    dist, idx = cKDTree(xyz).query(xyz, k=k, distance_upper_bound=float(max_distance))
    dist, idx = dist.reshape(len(have), k), idx.reshape(len(have), k)
    rows, cols = np.nonzero(np.isfinite(dist) & (idx != np.arange(len(have))[:, None]))
    pairs = unique_pairs((have[i], have[idx[i, j]]) for i, j in zip(rows, cols))
    logger.info("Spatial pairs: %d from %d images with GPS (%d neighbours within %g m)", len(pairs), len(have),
                num_neighbors, max_distance)
    return save(pairs, output_path)
