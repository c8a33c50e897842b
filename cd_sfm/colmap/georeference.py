"""Georeferencing: a model whose images carry GPS positions (EXIF, written by :mod:`.database` into the database's
``pose_priors`` as COLMAP's image reader does) is moved into local east-north-up metres by the similarity that best
fits its camera centres to those positions (``pycolmap.align_reconstruction_to_locations``, robust to outliers), as
COLMAP's ``model_aligner --ref_is_gps 1 --alignment_type enu`` does.

The ENU origin is the mean of the positions used (latitude, longitude, altitude, WGS84), recorded with the fit: x
points east, y north, z up, in metres. Nothing changes where fewer than ``min_images`` registered images have a
position, where the positions span less than ``min_span_factor`` times ``max_error`` (GPS noise would set the
scale, not the scene), or where the fit finds no consensus.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

MAX_ERROR = 10.0  # metres: consumer GPS (phones, cameras) is off by a few metres, sometimes tens
MIN_IMAGES = 3
MIN_SPAN_FACTOR = 4.0


def gps_priors(database_path: str | Path) -> dict[str, tuple[float, float, float]]:
    """{image name: (latitude, longitude, altitude)} of the WGS84 pose priors in a COLMAP 4 database."""
    import pycolmap

    db = pycolmap.Database.open(str(database_path))
    try:
        if not db.num_pose_priors():
            return {}
        names = {im.image_id: im.name for im in db.read_all_images()}
        out = {}
        for prior in db.read_all_pose_priors():
            if prior.coordinate_system == pycolmap.PosePriorCoordinateSystem.WGS84 and prior.has_position() and \
                    prior.corr_data_id.id in names:
                out[names[prior.corr_data_id.id]] = tuple(float(v) for v in prior.position)
        return out
    finally:
        db.close()


def georeference(rec, gps: dict[str, tuple[float, float, float]], max_error: float = MAX_ERROR,
                 min_images: int = MIN_IMAGES, min_span_factor: float = MIN_SPAN_FACTOR) -> dict:
    """Move ``rec`` (in place) into ENU metres around its images' GPS positions. Returns what was done:
    ``{"georeferenced": True, "origin": [lat, lon, alt], "images": n, "inliers": k, "median_error_m": e,
    "scale": s}``, or ``{"georeferenced": False, "why": ..., "images": n}``."""
    import pycolmap

    names = [rec.images[i].name for i in rec.reg_image_ids() if rec.images[i].name in gps]
    if len(names) < min_images:
        return {"georeferenced": False, "images": len(names),
                "why": f"{len(names)} registered images with a GPS position, {min_images} needed"}
    lla = np.array([gps[n] for n in names], np.float64)
    origin = lla.mean(axis=0)
    enu = np.asarray(pycolmap.GPSTransform().ellipsoid_to_enu(lla, *origin), np.float64)
    span = float(np.linalg.norm(enu.max(axis=0) - enu.min(axis=0)))
    if span < min_span_factor * max_error:
        return {"georeferenced": False, "images": len(names),
                "why": f"the GPS positions span {span:.1f} m, less than {min_span_factor:g} x the {max_error:g} m "
                       "they may be off by"}
    ransac = pycolmap.RANSACOptions(max_error=float(max_error), random_seed=0)
    sim = pycolmap.align_reconstruction_to_locations(rec, names, enu, min_common_images=min_images,
                                                     ransac_options=ransac)
    if sim is None:
        return {"georeferenced": False, "images": len(names),
                "why": f"no similarity fits {min_images} or more GPS positions within {max_error:g} m"}
    rec.transform(sim)
    by_name = {rec.images[i].name: rec.images[i] for i in rec.reg_image_ids()}
    centres = np.array([by_name[n].projection_center() for n in names])
    err = np.linalg.norm(centres - enu, axis=1)
    return {"georeferenced": True, "origin": [float(v) for v in origin], "frame": "ENU (x east, y north, z up), m",
            "images": len(names), "inliers": int((err <= max_error).sum()), "median_error_m": float(np.median(err)),
            "scale": float(sim.scale)}


def describe(g: dict) -> str:
    """The frame a :func:`georeference` result put the model in, for people: ``"east-north-up metres around 47.376887,
    8.541694, 408.0 m (8 images with GPS, median 0.11 m from their GPS positions)"``."""
    lat, lon, alt = g["origin"]
    return (f"east-north-up metres around {lat:.6f}, {lon:.6f}, {alt:.1f} m ({g['images']} images with GPS, median "
            f"{g['median_error_m']:.2f} m from their GPS positions)")
