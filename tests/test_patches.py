"""SIFT keypoints and the vectorised patch sampler against per-keypoint references (the references may loop)."""

import cv2
import numpy as np
import pytest

from cd_sfm.features.patches import (
    SiftDetectorConf,
    detect_sift,
    extract_patches,
    patch_radius,
    standardize_patches,
)


def _image(h=240, w=320, seed=0):
    rng = np.random.default_rng(seed)
    img = cv2.resize(rng.uniform(0, 255, (h // 8, w // 8)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    img = cv2.GaussianBlur(img, (0, 0), 2.0)
    return cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)


def _reference_patch(img, x, y, size, angle_deg, upright=False):
    """One patch the way the docs describe it, by cv2.warpAffine: sample (u, v) = -1 + 2k/32 scaled by the radius
    and rotated by theta = 360 - angle, bilinear, edge replication."""
    r = float(np.round(3 * (size / 2) * np.sqrt(2) * 2.5))
    th = 0.0 if upright else np.deg2rad(360.0 - angle_deg)
    c, s = np.cos(th) * r, np.sin(th) * r
    k = 2.0 / 32
    # patch pixel (j, i) -> u = -1 + k j, v = -1 + k i; x = cx + c u + s v, y = cy - s u + c v
    M = np.array([[c * k, s * k, x - c - s], [-s * k, c * k, y + s - c]], np.float64)
    return cv2.warpAffine(img.astype(np.float32), M, (32, 32), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def _numpy_bilinear(img, x, y):
    img = img.astype(np.float64)
    h, w = img.shape
    x = np.clip(x, 0, w - 1)
    y = np.clip(y, 0, h - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    ax, ay = x - x0, y - y0
    return ((1 - ay) * ((1 - ax) * img[y0, x0] + ax * img[y0, x1]) + ay * ((1 - ax) * img[y1, x0] + ax * img[y1, x1]))


def test_radius_formula():
    assert patch_radius(np.array([10.0]))[0] == np.round(3 * 5 * np.sqrt(2) * 2.5) == 53


@pytest.mark.parametrize("upright", [False, True])
def test_sampler_matches_per_keypoint_reference(upright):
    img = _image()
    xy = np.array([[100.3, 80.7], [5.2, 3.1], [310.0, 230.5], [160.0, 120.0]], np.float32)
    sizes = np.array([4.0, 7.5, 12.0, 2.2], np.float32)
    angles = np.array([0.0, 37.0, 200.5, 315.0], np.float32)
    got = extract_patches(img, xy, sizes, angles, upright=upright, standardize=False)
    assert got.shape == (4, 32, 32) and got.dtype == np.float32
    for i in range(4):
        ref = _reference_patch(img, xy[i, 0], xy[i, 1], sizes[i], angles[i], upright)
        # both use OpenCV's fixed-point bilinear weights (1/32 pixel): agree to rounding
        assert np.abs(got[i] - ref).max() < 0.6, i


def test_sampler_matches_float_bilinear_reference():
    img = _image(seed=2)
    xy = np.array([[50.5, 60.25], [200.0, 100.0]], np.float32)
    sizes = np.array([3.0, 6.0], np.float32)
    angles = np.array([30.0, 123.0], np.float32)
    got = extract_patches(img, xy, sizes, angles, standardize=False)
    for i in range(2):
        r = np.round(3 * (sizes[i] / 2) * np.sqrt(2) * 2.5)
        th = np.deg2rad(360.0 - angles[i])
        g = -1 + 2 * np.arange(32) / 32
        u, v = np.meshgrid(g, g)
        x = xy[i, 0] + r * (np.cos(th) * u + np.sin(th) * v)
        y = xy[i, 1] + r * (-np.sin(th) * u + np.cos(th) * v)
        ref = _numpy_bilinear(img, x, y)
        # the image is smooth, so the 1/32-pixel quantisation of OpenCV's remap costs at most ~1 grey level
        assert np.abs(got[i] - ref).max() < 1.5


def test_rotation_invariance_with_opencv_angles():
    """The same scene point in a 90-degree rotated image gives the same patch: the sampler turns the patch the way
    OpenCV's SIFT angle turns."""
    img = cv2.GaussianBlur(_image(320, 320, seed=3), (0, 0), 1.0)
    rot = np.ascontiguousarray(np.rot90(img))  # new (x, y) = (y, W - 1 - x)
    conf = SiftDetectorConf(max_keypoints=400)
    k1, k2 = detect_sift(img, conf), detect_sift(rot, conf)
    p = k1["keypoints"]
    q = np.stack([p[:, 1], img.shape[1] - 1 - p[:, 0]], -1)
    d = np.linalg.norm(q[:, None] - k2["keypoints"][None], axis=-1)
    same_scale = np.abs(np.log(k1["scales"][:, None] / k2["scales"][None])) < 0.05
    i1, i2 = np.nonzero((d < 1.0) & same_scale)
    assert len(i1) > 30
    turn = np.mod(k2["angles"][i2] - k1["angles"][i1], 360)
    assert abs(np.median(turn) - 270) < 5  # OpenCV's angle turned by -90 degrees
    a = extract_patches(img, k1["keypoints"][i1], k1["scales"][i1], k1["angles"][i1])
    b = extract_patches(rot, k2["keypoints"][i2], k2["scales"][i2], k2["angles"][i2])
    zncc = (a * b).mean(axis=(1, 2))
    assert np.median(zncc) > 0.9


def test_standardize():
    p = np.random.default_rng(0).normal(3, 5, (7, 32, 32)).astype(np.float32)
    s = standardize_patches(p)
    assert np.allclose(s.mean(axis=(1, 2)), 0, atol=1e-5) and np.allclose(s.std(axis=(1, 2)), 1, atol=1e-4)
    flat = standardize_patches(np.full((1, 32, 32), 9.0, np.float32))
    assert np.all(np.isfinite(flat)) and np.allclose(flat, 0)


def test_detect_sorted_capped_and_upright():
    img = _image(seed=4)
    full = detect_sift(img, SiftDetectorConf(max_keypoints=0))
    capped = detect_sift(img, SiftDetectorConf(max_keypoints=50))
    assert len(full["keypoints"]) > 50 and len(capped["keypoints"]) == 50
    assert np.all(np.diff(capped["scales"]) <= 0)  # largest first
    assert np.allclose(capped["scales"], np.sort(full["scales"])[::-1][:50])
    up = detect_sift(img, SiftDetectorConf(max_keypoints=0, upright=True))
    assert np.all(up["angles"] == 0)
    loc = np.round(np.c_[up["keypoints"], up["scales"]], 2)
    assert len(np.unique(loc, axis=0)) == len(loc)  # orientation duplicates merged
    assert np.allclose(np.rad2deg(full["orientations"]), full["angles"], atol=1e-4)


def test_empty():
    img = np.zeros((50, 60), np.uint8)
    k = detect_sift(img)
    assert k["keypoints"].shape == (0, 2)
    assert extract_patches(img, k["keypoints"], k["scales"], k["angles"]).shape == (0, 32, 32)
