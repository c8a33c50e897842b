"""A COLMAP 3.x copy of our database: ``database.db`` as pycolmap 4.2 writes it, converted to COLMAP 3.8's schema.

No COLMAP 3.x release opens a 4.x database: 3.x's ``images`` table has seven pose-prior columns (``prior_qw`` ...
``prior_tz``) that 4.x dropped (its inserts then fail with "SQL logic error"), 4.x adds ``rigs`` / ``frames`` /
``frame_data`` / ``pose_priors`` tables, a ``type`` column in ``descriptors`` and ``camera1`` / ``camera2`` in
``two_view_geometries``. :func:`convert` creates an empty database in the 3.8 schema (:data:`SCHEMA`, as
``colmap database_creator`` 3.8 makes it, ``user_version`` 3800) and copies cameras, images, keypoints, descriptors,
matches and two-view geometries into it with their ids, through the standard library's ``sqlite3``:

* blobs are the same in both versions (keypoints (N, 4|6) float32, descriptors (N, 128) uint8, matches (N, 2)
  uint32, params / F / E / H / qvec (w, x, y, z) / tvec float64; pair ids ``id1 * 2147483647 + id2``);
* pose priors (4.x ``pose_priors.position`` of an image) go to ``prior_tx, prior_ty, prior_tz`` as 3.x's feature
  extractor stored GPS positions there; the rest of the priors stay NULL (what 3.x writes for "no prior");
* the 4.x two-view configuration ``CALIBRATED_RIG`` (9) becomes ``CALIBRATED`` (2); the others are the same numbers;
* camera models 3.x does not know (model ids above 10, e.g. ``SIMPLE_DIVISION``) are refused with one line;
  descriptors that are not SIFT-type uint8 rows (4.x ALIKED / LoMa float descriptors) are left out with a warning.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

from ..io import CdSfmError

logger = logging.getLogger(__name__)

USER_VERSION = 3800
MAX_MODEL_ID = 10  # THIN_PRISM_FISHEYE, the last camera model of COLMAP 3.8
CALIBRATED, CALIBRATED_RIG = 2, 9
SIFT_TYPE = 0

# COLMAP 3.8's schema (``sqlite3 db .schema`` of a database made by ``colmap database_creator`` 3.8)
SCHEMA = [
    "CREATE TABLE IF NOT EXISTS cameras (camera_id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL, model INTEGER NOT NULL, "
    "width INTEGER NOT NULL, height INTEGER NOT NULL, params BLOB, prior_focal_length INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS images (image_id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL, name TEXT NOT NULL UNIQUE, "
    "camera_id INTEGER NOT NULL, prior_qw REAL, prior_qx REAL, prior_qy REAL, prior_qz REAL, prior_tx REAL, "
    "prior_ty REAL, prior_tz REAL, CONSTRAINT image_id_check CHECK(image_id >= 0 and image_id < 2147483647), "
    "FOREIGN KEY(camera_id) REFERENCES cameras(camera_id))",
    "CREATE UNIQUE INDEX IF NOT EXISTS index_name ON images(name)",
    "CREATE TABLE IF NOT EXISTS keypoints (image_id INTEGER PRIMARY KEY NOT NULL, rows INTEGER NOT NULL, "
    "cols INTEGER NOT NULL, data BLOB, FOREIGN KEY(image_id) REFERENCES images(image_id) ON DELETE CASCADE)",
    "CREATE TABLE IF NOT EXISTS descriptors (image_id INTEGER PRIMARY KEY NOT NULL, rows INTEGER NOT NULL, "
    "cols INTEGER NOT NULL, data BLOB, FOREIGN KEY(image_id) REFERENCES images(image_id) ON DELETE CASCADE)",
    "CREATE TABLE IF NOT EXISTS matches (pair_id INTEGER PRIMARY KEY NOT NULL, rows INTEGER NOT NULL, "
    "cols INTEGER NOT NULL, data BLOB)",
    "CREATE TABLE IF NOT EXISTS two_view_geometries (pair_id INTEGER PRIMARY KEY NOT NULL, rows INTEGER NOT NULL, "
    "cols INTEGER NOT NULL, data BLOB, config INTEGER NOT NULL, F BLOB, E BLOB, H BLOB, qvec BLOB, tvec BLOB)",
]


def _tables(con: sqlite3.Connection) -> dict[str, set[str]]:
    names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return {n: {r[1] for r in con.execute(f"PRAGMA table_info({n})")} for n in names}


def _position_priors(src: sqlite3.Connection, tables: dict) -> dict[int, tuple[float, float, float]]:
    """image_id -> prior position from 4.x ``pose_priors`` rows of camera data (empty when there are none)."""
    import numpy as np

    if "pose_priors" not in tables:
        return {}
    out = {}
    for data_id, sensor_type, blob in src.execute(
            "SELECT corr_data_id, corr_sensor_type, position FROM pose_priors"):
        if sensor_type != 0 or blob is None:  # 0: SensorType.CAMERA, whose data ids are image ids
            continue
        pos = np.frombuffer(blob, np.float64)
        if pos.size == 3 and np.isfinite(pos).all():
            out[int(data_id)] = tuple(float(v) for v in pos)
    return out


def convert(src_path: str | Path, dst_path: str | Path) -> dict:
    """Write ``dst_path`` (replacing it) as a COLMAP 3.8 database holding the rows of ``src_path`` (a pycolmap 4.x
    database); returns the counts copied."""
    src_path, dst_path = Path(src_path), Path(dst_path)
    if not src_path.exists():
        raise CdSfmError(f"{src_path}: database not found (run `cd-sfm sfm` first)")
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst_path.with_name(f".{dst_path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    stats = {"num_cameras": 0, "num_images": 0, "num_keypoints": 0, "num_descriptors": 0, "num_matched_pairs": 0,
             "num_two_view_geometries": 0, "num_pose_priors": 0, "num_descriptors_skipped": 0}
    try:
        src = sqlite3.connect(f"file:{src_path}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise CdSfmError(f"{src_path}: cannot open the database ({e})") from e
    try:
        try:
            tables = _tables(src)
        except sqlite3.DatabaseError as e:
            raise CdSfmError(f"{src_path}: not a COLMAP database ({e})") from e
        missing = {"cameras", "images", "keypoints", "descriptors", "matches", "two_view_geometries"} - set(tables)
        if missing:
            raise CdSfmError(f"{src_path}: not a COLMAP database (no table {', '.join(sorted(missing))})")
        bad = src.execute(f"SELECT camera_id, model FROM cameras WHERE model > {MAX_MODEL_ID} OR model < 0").fetchone()
        if bad:
            raise CdSfmError(f"{src_path}: camera {bad[0]} has model id {bad[1]}, which COLMAP 3.x does not know; "
                             f"map with a classic model (e.g. --camera-model SIMPLE_RADIAL)")
        dst = sqlite3.connect(tmp)
        try:
            for stmt in SCHEMA:
                dst.execute(stmt)
            dst.execute(f"PRAGMA user_version = {USER_VERSION}")
            _copy(src, dst, tables, stats)
            dst.commit()
        finally:
            dst.close()
        os.replace(tmp, dst_path)
    finally:
        src.close()
        tmp.unlink(missing_ok=True)
    if stats["num_descriptors_skipped"]:
        logger.warning("%s: %d images have descriptors COLMAP 3.x cannot read (not SIFT-type uint8); left out",
                       src_path, stats["num_descriptors_skipped"])
    logger.info("COLMAP 3.x database %s: %d cameras, %d images, %d matched pairs, %d two-view geometries", dst_path,
                stats["num_cameras"], stats["num_images"], stats["num_matched_pairs"],
                stats["num_two_view_geometries"])
    return stats


def _copy(src: sqlite3.Connection, dst: sqlite3.Connection, tables: dict, stats: dict) -> None:
    rows = src.execute("SELECT camera_id, model, width, height, params, prior_focal_length FROM cameras").fetchall()
    dst.executemany("INSERT INTO cameras VALUES (?, ?, ?, ?, ?, ?)", rows)
    stats["num_cameras"] = len(rows)

    priors = _position_priors(src, tables)
    images = src.execute("SELECT image_id, name, camera_id FROM images ORDER BY image_id").fetchall()
    dst.executemany("INSERT INTO images VALUES (?, ?, ?, NULL, NULL, NULL, NULL, ?, ?, ?)",
                    [(i, n, c, *priors.get(i, (None, None, None))) for i, n, c in images])
    stats["num_images"] = len(images)
    stats["num_pose_priors"] = sum(i in priors for i, _, _ in images)

    rows = src.execute("SELECT image_id, rows, cols, data FROM keypoints").fetchall()
    dst.executemany("INSERT INTO keypoints VALUES (?, ?, ?, ?)", rows)
    stats["num_keypoints"] = sum(r[1] for r in rows)

    has_type = "type" in tables["descriptors"]
    query = "SELECT image_id, rows, cols, data" + (", type" if has_type else ", 0") + " FROM descriptors"
    keep, skipped = [], 0
    for image_id, nrows, ncols, data, dtype in src.execute(query):
        # SIFT-type rows are uint8: rows * cols bytes (a float descriptor has 4 bytes per entry)
        if dtype != SIFT_TYPE or (data is not None and len(data) != nrows * ncols):
            skipped += 1
            continue
        keep.append((image_id, nrows, ncols, data))
    dst.executemany("INSERT INTO descriptors VALUES (?, ?, ?, ?)", keep)
    stats["num_descriptors"], stats["num_descriptors_skipped"] = len(keep), skipped

    rows = src.execute("SELECT pair_id, rows, cols, data FROM matches").fetchall()
    dst.executemany("INSERT INTO matches VALUES (?, ?, ?, ?)", rows)
    stats["num_matched_pairs"] = sum(r[1] > 0 for r in rows)

    rows = [(p, r, c, d, CALIBRATED if cfg == CALIBRATED_RIG else cfg, F, E, H, q, t) for p, r, c, d, cfg, F, E, H, q, t
            in src.execute("SELECT pair_id, rows, cols, data, config, F, E, H, qvec, tvec FROM two_view_geometries")]
    dst.executemany("INSERT INTO two_view_geometries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    stats["num_two_view_geometries"] = len(rows)
