"""How well a reconstruction agrees with the verified two-view geometries of its database: a check that needs no
ground truth, used to choose between mapping attempts (incremental with other seeds, global).

For every verified pair whose two images the model registered, the model's relative pose gives an essential matrix
E = [t]x R (``cam2_from_cam1`` of the two images' poses); the pair's inlier matches (found by RANSAC in the
database, independently of the model), undistorted with the model's cameras, should satisfy it. The Sampson
distance of each match, in pixels (normalised distance times the mean focal length), is compared with
``threshold_px``. A model with wrong poses (e.g. a global solve that collapsed a low-texture ring) leaves most inliers
far from its epipolar lines even when its own reprojection error is small, because its points were triangulated to
fit the wrong poses.

``agreement(rec, database_path)`` returns the number of pairs checked, the median over pairs of the share of inliers
within the threshold, and the share of pairs where at least half of the inliers are.
"""

from __future__ import annotations

import numpy as np

from ..geometry import sampson_distance, skew


def _pose(image):
    p = image.cam_from_world
    return p() if callable(p) else p


def agreement(rec, database_path, threshold_px: float = 4.0, max_pairs: int = 3000, seed: int = 0) -> dict:
    """Epipolar agreement of ``rec`` (a ``pycolmap.Reconstruction``) with the verified pairs of its database."""
    import pycolmap

    out = {"pairs": 0, "median_inlier_share": None, "agreeing_pairs": None}
    if rec is None or rec.num_reg_images() < 2:
        return out
    registered = {i for i in rec.reg_image_ids()}
    db = pycolmap.Database.open(str(database_path))
    try:
        pair_ids, geoms = db.read_two_view_geometries()
        todo = []
        for pid, g in zip(pair_ids, geoms):
            a, b = pycolmap.pair_id_to_image_pair(pid)
            if a in registered and b in registered and len(g.inlier_matches) >= 8:
                todo.append((a, b, np.asarray(g.inlier_matches)))
        if len(todo) > max_pairs:
            keep = np.random.default_rng(seed).choice(len(todo), max_pairs, replace=False)
            todo = [todo[i] for i in sorted(keep)]
        kps = {i: np.asarray(db.read_keypoints(i))[:, :2] for i in {x for a, b, _ in todo for x in (a, b)}}
    finally:
        db.close()
    shares = []
    for a, b, inl in todo:
        ia, ib = rec.images[a], rec.images[b]
        ca, cb = rec.cameras[ia.camera_id], rec.cameras[ib.camera_id]
        pa, pb = _pose(ia), _pose(ib)
        rel = pb * pa.inverse()  # cam_b_from_cam_a
        R = np.asarray(rel.rotation.matrix(), np.float64)
        t = np.asarray(rel.translation, np.float64)
        if np.linalg.norm(t) < 1e-12:
            continue
        E = skew(t / np.linalg.norm(t)) @ R
        x1 = np.asarray(ca.cam_from_img(kps[a][inl[:, 0]]), np.float64)
        x2 = np.asarray(cb.cam_from_img(kps[b][inl[:, 1]]), np.float64)
        focal = 0.5 * (float(np.mean(ca.focal_length_x)) + float(np.mean(cb.focal_length_x)))
        err = sampson_distance(E, x1, x2) * focal
        shares.append(float(np.mean(err <= threshold_px)))
    if not shares:
        return out
    shares = np.asarray(shares)
    return {"pairs": int(len(shares)), "median_inlier_share": float(np.median(shares)),
            "agreeing_pairs": float(np.mean(shares >= 0.5))}
