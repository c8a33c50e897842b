"""SIFT keypoints and 32x32 patches exactly as the original ContextDesc front end (see docs/contextdesc.md).

Everything here is whole-array: the detector is OpenCV's, the sampler gathers all patches of an image with one
vectorised bilinear interpolation (edge replication), no per-keypoint Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

PATCH_SIZE = 32


@dataclass
class SiftDetectorConf:
    max_keypoints: int = 4096
    contrast_threshold: float = 0.04
    edge_threshold: float = 10.0
    n_octave_layers: int = 3
    sigma: float = 1.6
    upright: bool = False


def to_gray(image: np.ndarray) -> np.ndarray:
    if image.ndim == 3:
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return image


def detect_sift(gray: np.ndarray, conf: SiftDetectorConf = SiftDetectorConf(), descriptors: bool = False,
                mask: np.ndarray | None = None):
    """Detect SIFT keypoints; keep the ``max_keypoints`` largest (by size, largest first, as the original keeps whole
    octaves from the top). Returns a dict of arrays: ``keypoints`` (N,2), ``scales`` (sizes), ``orientations``
    (radians, OpenCV's angle converted), ``angles`` (degrees, OpenCV), ``scores`` (responses), ``octaves``, and
    ``sift`` (N,128) float32 descriptors when ``descriptors`` is set.

    ``upright`` merges the orientation duplicates OpenCV makes for one location and sets all angles to 0. ``mask``:
    (H, W) uint8 of the image's size, keypoints only where it is non-zero (found before the ``max_keypoints`` cut, so
    the whole budget goes to the unmasked part).
    """
    sift = cv2.SIFT_create(
        nfeatures=0,
        nOctaveLayers=conf.n_octave_layers,
        contrastThreshold=conf.contrast_threshold,
        edgeThreshold=conf.edge_threshold,
        sigma=conf.sigma,
    )
    kpts = sift.detect(gray, mask)
    if conf.upright and kpts:
        # OpenCV emits one keypoint per dominant orientation at the same location: keep one, angle 0
        loc = np.array([(k.pt[0], k.pt[1], k.size) for k in kpts], np.float64)
        _, first = np.unique(np.round(loc, 2), axis=0, return_index=True)
        kpts = [cv2.KeyPoint(kpts[i].pt[0], kpts[i].pt[1], kpts[i].size, 0.0, kpts[i].response, kpts[i].octave)
                for i in np.sort(first)]
    if kpts:
        sizes = np.array([k.size for k in kpts], np.float32)
        order = np.argsort(-sizes, kind="stable")
        if conf.max_keypoints and conf.max_keypoints > 0:
            order = order[: conf.max_keypoints]
        kpts = [kpts[i] for i in order]
    desc = None
    if descriptors and kpts:
        kpts, desc = sift.compute(gray, kpts)
    n = len(kpts)
    out = {
        "keypoints": np.array([k.pt for k in kpts], np.float32).reshape(n, 2),
        "scales": np.array([k.size for k in kpts], np.float32),
        "angles": np.array([k.angle for k in kpts], np.float32),
        "scores": np.array([k.response for k in kpts], np.float32),
        "octaves": np.array([k.octave for k in kpts], np.int32),
    }
    out["orientations"] = np.deg2rad(out["angles"]).astype(np.float32)
    if descriptors:
        out["sift"] = np.zeros((0, 128), np.float32) if desc is None else desc.astype(np.float32)
    return out


def fit_mask(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """A feature mask (uint8, non-zero = features allowed) resized (nearest pixel) to an image of ``shape``."""
    if mask is None:
        return None
    h, w = shape[:2]
    mask = np.asarray(mask, np.uint8)
    if mask.shape[:2] != (h, w):
        mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    return np.ascontiguousarray(mask)


def patch_radius(sizes: np.ndarray) -> np.ndarray:
    """Sampling radius of a keypoint of OpenCV size ``size``: round(3 * size/2 * sqrt(2) * 5/2)."""
    return np.round(3.0 * (np.asarray(sizes, np.float64) / 2.0) * np.sqrt(2.0) * 2.5)


def _unit_coords(n: int = PATCH_SIZE) -> np.ndarray:
    """Sample positions -1 + 2k/n, k = 0..n-1, of the original patch grid."""
    return (-1.0 + 2.0 * np.arange(n, dtype=np.float32) / n).astype(np.float32)


def sample_grids(xy: np.ndarray, radius: np.ndarray, theta: np.ndarray, n: int = PATCH_SIZE):
    """Pixel coordinates of every patch sample, as two (N, n, n) float32 arrays (x, y), u along the patch columns,
    v along its rows, as the original front end's affine grid:

        x = cx + r (cos(theta) u + sin(theta) v),   y = cy + r (-sin(theta) u + cos(theta) v)

    With theta = 360 deg - kp.angle this turns the patch's u axis to OpenCV's keypoint direction (rotation
    invariant: the same scene point seen in a rotated image gives the same patch)."""
    xy = np.asarray(xy, np.float32).reshape(-1, 2)
    r = np.asarray(radius, np.float32)[:, None, None]
    theta = np.asarray(theta, np.float32)
    c = np.cos(theta)[:, None, None] * r
    s = np.sin(theta)[:, None, None] * r
    g = _unit_coords(n)
    u, v = g[None, None, :], g[None, :, None]
    x = xy[:, 0, None, None] + c * u + s * v
    y = xy[:, 1, None, None] - s * u + c * v
    return x, y


def bilinear_sample(image: np.ndarray, x: np.ndarray, y: np.ndarray, chunk: int = 16384) -> np.ndarray:
    """Sample a 2-D image at float pixel coordinates (x, y) of shape (N, h, w): bilinear, edge replication.

    One ``cv2.remap`` call per chunk of patches (OpenCV limits a map to 32767 rows)."""
    img = np.asarray(image, np.float32)
    n = x.shape[0]
    out = np.empty(x.shape, np.float32)
    xf, yf = x.reshape(n, -1), y.reshape(n, -1)
    for i in range(0, n, chunk):
        out[i : i + chunk] = cv2.remap(
            img, xf[i : i + chunk], yf[i : i + chunk], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        ).reshape((-1,) + x.shape[1:])
    return out


def extract_patches(
    gray: np.ndarray,
    keypoints: np.ndarray,
    sizes: np.ndarray,
    angles_deg: np.ndarray | None = None,
    upright: bool = False,
    standardize: bool = True,
) -> np.ndarray:
    """All patches of an image as an (N, 32, 32) float32 array.

    ``angles_deg`` is OpenCV's ``KeyPoint.angle``; the patch is rotated by theta = 360 - angle (0 when upright).
    ``standardize`` applies the per-patch (p - mean) / std of the original front end.
    """
    n = len(keypoints)
    if n == 0:
        return np.zeros((0, PATCH_SIZE, PATCH_SIZE), np.float32)
    if upright or angles_deg is None:
        theta = np.zeros(n)
    else:
        theta = np.deg2rad(360.0 - np.asarray(angles_deg, np.float64))
    x, y = sample_grids(keypoints, patch_radius(sizes), theta)
    patches = bilinear_sample(gray, x, y)
    if standardize:
        patches = standardize_patches(patches)
    return patches.astype(np.float32)


def standardize_patches(patches: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    p = np.asarray(patches, np.float32)
    mean = p.mean(axis=(-2, -1), keepdims=True)
    std = p.std(axis=(-2, -1), keepdims=True)
    return (p - mean) / np.maximum(std, eps)
