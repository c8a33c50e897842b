import cv2
import h5py
import numpy as np

from cd_sfm.features.patches import detect_sift
from cd_sfm.train import homography as hg


def _texture(h=360, w=480, seed=0):
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.uniform(0, 255, (h, w)).astype(np.float32), (0, 0), 3)
    return cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)


def _zncc(p):
    a = p[:, 0].reshape(len(p), -1)
    b = p[:, 1].reshape(len(p), -1)
    a = (a - a.mean(1, keepdims=True)) / (a.std(1, keepdims=True) + 1e-6)
    b = (b - b.mean(1, keepdims=True)) / (b.std(1, keepdims=True) + 1e-6)
    return (a * b).mean(1)


def test_keypoint_warp_similarity_exact():
    # a pure similarity: size scales by s, angle turns with the rotation (as OpenCV's SIFT angle does, see
    # tests/test_patches.py::test_rotation_invariance_with_opencv_angles)
    a, s = np.deg2rad(30), 1.5
    H = np.array([[s * np.cos(a), -s * np.sin(a), 10], [s * np.sin(a), s * np.cos(a), 5], [0, 0, 1]])
    xy, sz, ang = hg.warp_keypoints(H, np.array([[3.0, 4.0]]), np.array([2.0]), np.array([50.0]))
    assert np.allclose(sz, 3.0) and np.allclose(ang, 80.0)
    assert np.allclose(xy, hg.warp_points(H, np.array([[3.0, 4.0]])))


def test_pairs_consistent_under_warp():
    img = _texture()
    kpts = detect_sift(img)
    rng = np.random.default_rng(1)
    conf = hg.MineConf(pairs_per_warp=200)
    for _ in range(3):
        r = hg.make_pairs(img, kpts, rng, conf, photometric=False, jitter=False)
        assert r["patches"].shape[1:] == (2, 32, 32) and len(r["patches"]) > 20
        assert np.median(_zncc(r["patches"])) > 0.85
        # random pairs are not similar
        shuffled = np.stack([r["patches"][:, 0], np.roll(r["patches"][:, 1], 7, axis=0)], 1)
        assert np.median(_zncc(shuffled)) < 0.3


def test_identity_warp_gives_identical_patches():
    img = _texture()
    kpts = detect_sift(img)
    r = hg.make_pairs(img, kpts, np.random.default_rng(0), hg.MineConf(), H=np.eye(3), photometric=False, jitter=False)
    assert np.allclose(r["patches"][:, 0], r["patches"][:, 1], atol=1e-3)


def test_mine_writes_h5(tmp_path):
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"im{i}.png"), _texture(seed=i))
    out = tmp_path / "pairs.h5"
    res = hg.cli_mine_homography([str(tmp_path), str(out), "--warps-per-image", "2", "--pairs-per-warp", "16",
                                  "--val-every", "3"])
    assert res["pairs"] > 0
    with h5py.File(out) as f:
        assert f["patches"].dtype == np.uint8 and f["patches"].shape[1:] == (2, 32, 32)
        assert len(f["scales"]) == len(f["kpt_ids"]) == len(f["is_val"]) == res["pairs"]
        assert f["is_val"][()].any() and not f["is_val"][()].all()


def test_cli_train_mine(tmp_path):
    from cd_sfm.cli import main

    cv2.imwrite(str(tmp_path / "a.png"), _texture())
    out = tmp_path / "p.h5"
    assert main(["train", "mine-homography", str(tmp_path), str(out), "--warps-per-image", "1",
                 "--pairs-per-warp", "8", "--val-every", "0"]) == 0
    assert out.exists()
    assert main(["train", "mine-homography", str(tmp_path / "missing"), str(out)]) == 2
