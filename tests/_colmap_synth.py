"""Helpers for the COLMAP tests: feature / match files made from a pycolmap synthetic scene, without rendering.

Every 3D point gets a random descriptor; each observation of it gets that descriptor plus a little noise, so both our
matcher and COLMAP's find the true correspondences. Keypoints are the exact projections (converted to the OpenCV
pixel convention that ``features.h5`` uses)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pycolmap

from cd_sfm.io import H5Appender, features_to_h5, names_to_pair, write_pairs


def synthetic_scene(num_images: int = 6, num_points: int = 300, seed: int = 0, width: int = 640, height: int = 480):
    pycolmap.set_random_seed(seed)
    opts = pycolmap.SyntheticDatasetOptions()
    opts.num_rigs, opts.num_cameras_per_rig, opts.num_frames_per_rig = 1, 1, num_images
    opts.num_points3D = num_points
    opts.camera_width, opts.camera_height = width, height
    opts.camera_params = [1.2 * max(width, height), width / 2, height / 2, 0.0]
    return pycolmap.synthesize_dataset(opts)


def write_feature_files(out: Path, rec, signed: bool = False, seed: int = 0, noise: float = 0.02, prefix: str = ""):
    """features.h5, pairs.txt (all pairs), matches.h5 (true correspondences); returns (names, true matches).

    Image names get ``prefix``; the h5 files are appended to (so two scenes can share them), pairs.txt is replaced."""
    rng = np.random.default_rng(seed)
    point_desc = {}
    for pid in rec.points3D:
        d = rng.normal(size=128) if signed else rng.random(128) ** 2
        point_desc[pid] = d / np.linalg.norm(d)
    by_name = {prefix + im.name: im for im in rec.images.values()}
    names = sorted(by_name)
    obs = {}
    with H5Appender(out / "features.h5") as ap:
        for n in names:
            im = by_name[n]
            pts = im.points2D
            xy = np.array([p.xy for p in pts], np.float32) - 0.5  # COLMAP -> OpenCV convention
            pids = np.array([p.point3D_id if p.has_point3D() else -1 for p in pts])
            desc = np.stack([point_desc[p] if p >= 0 else rng.normal(size=128) ** 2 for p in pids])
            desc = desc + noise * (rng.normal(size=desc.shape) if signed else np.abs(rng.normal(size=desc.shape)))
            desc /= np.linalg.norm(desc, axis=1, keepdims=True)
            obs[n] = pids
            cam = rec.cameras[im.camera_id]
            ap.add(n, features_to_h5({
                "keypoints": xy, "descriptors": desc.astype(np.float32), "scores": np.ones(len(xy), np.float32),
                "scales": rng.uniform(2, 20, len(xy)).astype(np.float32),
                "orientations": rng.uniform(-np.pi, np.pi, len(xy)).astype(np.float32),
                "image_size": np.array([cam.width, cam.height])}))
    pairs = list(itertools.combinations(names, 2))
    write_pairs(out / "pairs.txt", pairs)
    true = {}
    with H5Appender(out / "matches.h5") as ap:
        for a, b in pairs:
            pos_b = {p: j for j, p in enumerate(obs[b]) if p >= 0}
            m0 = np.array([pos_b.get(p, -1) if p >= 0 else -1 for p in obs[a]], np.int32)
            ap.add(names_to_pair(a, b), {"matches0": m0, "matching_scores0": np.ones(len(m0), np.float16)})
            idx = np.flatnonzero(m0 >= 0)
            true[(a, b)] = np.stack([idx, m0[idx]], 1)
    return names, true
