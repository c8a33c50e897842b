import cv2
import numpy as np
import pytest

from cd_sfm.features import get_backend
from cd_sfm.features.patches import SiftDetectorConf, detect_sift
from cd_sfm.features.sift import RootSiftBackend, SiftBackend, SiftConf, descriptors_to_uint8
from cd_sfm.matching import match_descriptors


def scene(h=240, w=320, seed=0):
    """A textured image: smoothed noise at two scales plus a few drawn shapes."""
    rng = np.random.default_rng(seed)
    coarse = cv2.resize(rng.random((h // 8, w // 8)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    fine = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 1.2)
    img = cv2.normalize(coarse + 0.5 * fine, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    for _ in range(12):
        c = tuple(int(v) for v in rng.integers(0, [w, h]))
        cv2.circle(img, c, int(rng.integers(4, 20)), int(rng.integers(0, 255)), -1)
    return img


def test_registry():
    assert get_backend("sift") is SiftBackend and get_backend("rootsift") is RootSiftBackend
    assert SiftBackend.name == "sift" and RootSiftBackend.name == "rootsift"


@pytest.mark.parametrize("cls", [SiftBackend, RootSiftBackend])
def test_extract_layout(cls):
    img = scene()
    feats = cls({"max_keypoints": 500}).extract(np.dstack([img] * 3))  # RGB input is accepted
    n = len(feats["keypoints"])
    assert 100 < n <= 500
    assert feats["keypoints"].shape == (n, 2) and feats["keypoints"].dtype == np.float32
    assert feats["descriptors"].shape == (n, 128) and feats["descriptors"].dtype == np.float32
    for k in ("scales", "orientations", "scores"):
        assert feats[k].shape == (n,) and feats[k].dtype == np.float32
    assert list(feats["image_size"]) == [320, 240]
    kp = feats["keypoints"]
    assert (kp >= -0.5).all() and (kp[:, 0] < 320).all() and (kp[:, 1] < 240).all()
    np.testing.assert_allclose(np.linalg.norm(feats["descriptors"], axis=1), 1.0, atol=1e-5)
    assert (feats["descriptors"] >= 0).all()
    assert np.all(np.diff(feats["scales"]) <= 0)  # largest first, as detect_sift keeps them


def test_same_keypoints_as_detector_and_rootsift_relation():
    img = scene(seed=3)
    conf = SiftConf(max_keypoints=300)
    sift = SiftBackend(conf).extract(img)
    root = RootSiftBackend(conf).extract(img)
    det = detect_sift(img, SiftDetectorConf(max_keypoints=300, contrast_threshold=conf.contrast_threshold),
                      descriptors=True)
    np.testing.assert_array_equal(sift["keypoints"], det["keypoints"])
    np.testing.assert_array_equal(root["keypoints"], det["keypoints"])
    raw = det["sift"]
    np.testing.assert_allclose(sift["descriptors"], raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(root["descriptors"], np.sqrt(raw / raw.sum(1, keepdims=True)), atol=1e-6)


def test_upright_and_empty():
    img = scene(seed=1)
    feats = SiftBackend(upright=True, max_keypoints=200).extract(img)
    assert len(feats["keypoints"]) > 0 and np.all(feats["orientations"] == 0)
    assert len(np.unique(feats["keypoints"], axis=0)) == len(feats["keypoints"])
    flat = SiftBackend().extract(np.full((64, 64), 128, np.uint8))
    assert flat["keypoints"].shape == (0, 2) and flat["descriptors"].shape == (0, 128)


def test_uint8_conversion():
    d = np.array([[0.0, 0.1, 0.5, 0.9]], np.float32)
    np.testing.assert_array_equal(descriptors_to_uint8(d), [[0, 51, 255, 255]])
    feats = RootSiftBackend(max_keypoints=100).extract(scene())
    u = SiftBackend.to_uint8(feats["descriptors"])
    assert u.dtype == np.uint8 and u.shape == feats["descriptors"].shape and u.max() > 50


def test_rotated_view_matches_under_homography():
    """RootSIFT on an image and a rotated, scaled copy: most mutual-ratio matches obey the known homography."""
    img = scene(seed=5)
    h, w = img.shape
    H = cv2.getRotationMatrix2D((w / 2, h / 2), 30, 0.8)
    H = np.vstack([H, [0, 0, 1]])
    warped = cv2.warpPerspective(img, H, (w, h), borderMode=cv2.BORDER_REFLECT)
    be = RootSiftBackend(max_keypoints=1000)
    f0, f1 = be.extract(img), be.extract(warped)
    m0, _ = match_descriptors(f0["descriptors"], f1["descriptors"])
    idx = np.flatnonzero(m0 >= 0)
    assert len(idx) > 50
    p0 = cv2.perspectiveTransform(f0["keypoints"][idx][None].astype(np.float64), H)[0]
    err = np.linalg.norm(p0 - f1["keypoints"][m0[idx]], axis=1)
    assert np.mean(err < 3) > 0.8
