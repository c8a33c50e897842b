"""Geometry helpers shared by the feature backends, the evaluation, the mapping checks and the trainers (numpy only):
unit vectors, the keypoint coordinates the augmentation network reads, two-view geometry."""

from __future__ import annotations

import numpy as np


def l2_normalize(x, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """``x`` scaled to unit L2 norm along ``axis`` (zero vectors stay zero)."""
    x = np.asarray(x)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), eps)


def normalized_keypoints(xy, width: float, height: float) -> np.ndarray:
    """(N, 2) pixel coordinates -> [-1, 1] about the image centre, as the augmentation network reads them
    (``kpt_xy`` of the official graphs)."""
    xy = np.asarray(xy, np.float32).reshape(-1, 2)
    half = np.array([width / 2, height / 2], np.float32)
    return ((xy - half) / half).astype(np.float32)


def skew(v) -> np.ndarray:
    x, y, z = np.asarray(v, np.float64).ravel()
    return np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]], np.float64)


def sampson_distance(F, x0, x1) -> np.ndarray:
    """Sampson distance of correspondences (N, 2) to x1^T F x0 = 0, in the units of the coordinates (pixels for a
    fundamental matrix, normalised units for an essential matrix)."""
    if len(x0) == 0:
        return np.zeros(0)
    h0 = np.concatenate([x0, np.ones((len(x0), 1))], 1)
    h1 = np.concatenate([x1, np.ones((len(x1), 1))], 1)
    Fx0 = h0 @ np.asarray(F).T
    Ftx1 = h1 @ np.asarray(F)
    num = np.sum(h1 * Fx0, 1) ** 2
    den = Fx0[:, 0] ** 2 + Fx0[:, 1] ** 2 + Ftx1[:, 0] ** 2 + Ftx1[:, 1] ** 2
    return np.sqrt(num / np.maximum(den, 1e-30))


def fundamental_from_pose(K0, K1, R, t) -> np.ndarray:
    """F of cam1_from_cam0 = (R, t) with intrinsics K0, K1 (x1^T F x0 = 0 in pixels)."""
    E = skew(t) @ R
    return np.linalg.inv(K1).T @ E @ np.linalg.inv(K0)
