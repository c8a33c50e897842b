"""Relative-pose evaluation: AUC math, pose errors, essential-matrix estimation on a synthetic rig, GT loading."""

from pathlib import Path

import numpy as np
import pytest

from cd_sfm.evaluation import pose as P

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _rot(axis, deg):
    a = np.radians(deg)
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    Kx = P.skew(k)
    return np.eye(3) + np.sin(a) * Kx + (1 - np.cos(a)) * Kx @ Kx


def test_auc_known_errors():
    # SuperGlue's pose_auc on [0, 1, 2, inf]: recall 1/4, 2/4, 3/4 at errors 0, 1, 2, linear in between (trapezoids)
    a5, a10, a20 = P.pose_auc([0.0, 1.0, 2.0, np.inf], (5, 10, 20))
    exact = lambda t: ((0.25 + 0.5) / 2 + (0.5 + 0.75) / 2 + 0.75 * (t - 2)) / t  # noqa: E731
    assert a5 == pytest.approx(0.65)
    assert a5 == pytest.approx(exact(5)) and a10 == pytest.approx(exact(10)) and a20 == pytest.approx(exact(20))
    assert P.pose_auc([0, 0, 0], (5,)) == [pytest.approx(1.0)]
    assert P.pose_auc([30, np.nan, np.inf], (5, 10, 20)) == [0.0, 0.0, 0.0]
    assert P.pose_auc([], (5,)) == [0.0]
    # uniform errors on [0, 10]: AUC@10 -> 0.5
    assert P.pose_auc(np.linspace(0, 10, 10001)[1:], (10,))[0] == pytest.approx(0.5, abs=1e-3)


def test_pose_error():
    R = _rot([0.2, 1, 0.1], 15)
    t = np.array([1.0, 0.2, -0.3])
    assert P.pose_error(R, t, R, t) == pytest.approx((0.0, 0.0), abs=1e-6)
    assert P.pose_error(R, -3 * t, R, t) == pytest.approx((0.0, 0.0), abs=1e-6)  # scale and sign unobservable
    dR = _rot([0, 0, 1], 7)
    t2 = _rot(np.cross(t, [0, 0, 1]), 12) @ t  # about an axis perpendicular to t
    eR, et = P.pose_error(dR @ R, t2, R, t)
    assert eR == pytest.approx(7.0, abs=1e-6) and et == pytest.approx(12.0, abs=1e-6)
    R0, t0 = _rot([1, 0, 0], 5), np.array([0.1, 0, 2])
    Rr, tr = P.relative_pose(R0, t0, R @ R0, R @ t0 + t)
    assert np.allclose(Rr, R) and np.allclose(tr, t)


def _rig(seed=0, n=300):
    rng = np.random.default_rng(seed)
    X = rng.uniform([-2, -2, 4], [2, 2, 8], (n, 3))
    K = np.array([[800.0, 0, 319.5], [0, 810.0, 239.5], [0, 0, 1]])
    R, t = _rot([0.1, 1, 0], 12), np.array([-1.0, 0.1, 0.2])

    def proj(R, t):
        x = (X @ R.T + t) @ K.T
        return x[:, :2] / x[:, 2:]

    return proj(np.eye(3), np.zeros(3)), proj(R, t), K, R, t


@pytest.mark.parametrize("estimator", P.ESTIMATORS)
def test_estimate_pose_synthetic_rig(estimator):
    x0, x1, K, R, t = _rig()
    Re, te, inl = P.estimate_pose(x0, x1, K, K, estimator=estimator)
    eR, et = P.pose_error(Re, te, R, t)
    assert eR < 1e-3 and et < 1e-3 and inl.all()
    # 30 % of the matches replaced by wrong ones: RANSAC still finds the pose, the inliers are the true matches
    rng = np.random.default_rng(1)
    bad = rng.choice(len(x1), 90, replace=False)
    x1b = x1.copy()
    x1b[bad] = rng.uniform(0, 640, (90, 2))
    Re, te, inl = P.estimate_pose(x0, x1b, K, K, seed=0, estimator=estimator)
    assert max(P.pose_error(Re, te, R, t)) < 0.5
    assert inl.sum() >= 200 and inl[bad].mean() < 0.1
    assert P.estimate_pose(x0[:4], x1[:4], K, K, estimator=estimator) is None
    F = P.fundamental_from_pose(K, K, R, t)
    d = P.sampson_distance(F, x0, x1b)
    assert d[np.setdiff1d(np.arange(len(x0)), bad)].max() < 1e-6 and np.median(d[bad]) > 1


def test_colmap_estimator_does_not_move_with_the_order_of_the_matches():
    # OpenCV's RANSAC (no final refinement) moved AUC@10 of a real scene by up to 13 points when only the order of
    # the matches changed; COLMAP's LO-RANSAC refines on all inliers, so the pose stays put
    x0, x1, K, R, t = _rig(3, n=200)
    rng = np.random.default_rng(2)
    x0 = x0 + rng.normal(0, 0.7, x0.shape)  # pixel noise: minimal samples then disagree a little
    bad = rng.choice(200, 80, replace=False)
    x1 = x1.copy()
    x1[bad] = rng.uniform(0, 640, (80, 2))
    poses = []
    for k in range(4):
        p = np.random.default_rng(k).permutation(200)
        Re, te, _ = P.estimate_pose(x0[p], x1[p], K, K, seed=0)
        poses.append((Re, te))
    for Re, te in poses:  # each within 0.3 deg of the truth (OpenCV's RANSAC: 0.14-1.2 deg on the same input)
        assert max(P.pose_error(Re, te, R, t)) < 0.3
        assert max(P.pose_error(Re, te, *poses[0])) < 0.2
    with pytest.raises(P.CdSfmError, match="pose estimator must be one of colmap, opencv"):
        P.estimate_pose(x0, x1, K, K, estimator="magic")


def test_estimator_choices_are_the_estimators():
    """``eval pairs --estimator`` offers ``pose.ESTIMATORS``, with the same default as ``PoseConf``."""
    import argparse

    from cd_sfm.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    ev = next(a for a in sub.choices["eval"]._actions if isinstance(a, argparse._SubParsersAction))
    action = next(a for a in ev.choices["pairs"]._actions if a.dest == "estimator")
    assert tuple(action.choices) == P.ESTIMATORS and action.default == P.ESTIMATORS[0] == P.PoseConf().estimator


def test_estimate_pose_survives_repeated_points():
    # a location matched several times (SIFT gives one location several orientations) made OpenCV's five-point
    # solver assert inside RANSAC ("solvePoly"), which stopped a whole `eval pairs` run at ratio 0.95
    import cv2

    x0, x1, K, R, t = _rig(0, n=60)
    rng = np.random.default_rng(0)
    x1 = x1.copy()
    bad = rng.choice(60, 40, replace=False)
    x1[bad] = rng.uniform(0, 640, (40, 2))
    src = rng.choice(60, 5, replace=False)
    x0d = np.r_[x0, rng.uniform(0, 640, (10, 2))]
    x1d = np.r_[x1, np.repeat(x1[src], 2, axis=0)]  # 5 points of image 1 matched twice more
    n0 = cv2.undistortPoints(x0d.reshape(-1, 1, 2), K, None).reshape(-1, 2)
    n1 = cv2.undistortPoints(x1d.reshape(-1, 1, 2), K, None).reshape(-1, 2)
    cv2.setRNGSeed(0)
    with pytest.raises(cv2.error):  # the failure itself, so that this test keeps testing something
        cv2.findEssentialMat(n0, n1, np.eye(3), threshold=1 / 805, prob=0.99999, method=cv2.RANSAC)
    keep = P.unique_correspondences(x0d, x1d)
    assert len(keep) == 60 and (keep == np.arange(60)).all()  # the first of each repeated point is kept
    for estimator in P.ESTIMATORS:
        Re, te, inl = P.estimate_pose(x0d, x1d, K, K, seed=0, estimator=estimator)
        assert len(inl) == len(x0d) and not inl[60:].any()
        assert max(P.pose_error(Re, te, R, t)) < 2.0


def test_undistort_matches_pinhole():
    pycolmap = pytest.importorskip("pycolmap")
    cam = pycolmap.Camera(model="SIMPLE_RADIAL", width=640, height=480, params=[800.0, 320.0, 240.0, 0.05])
    K = np.array(cam.calibration_matrix(), float)
    K[:2, 2] -= 0.5
    v = P.GTView("a", K, np.eye(3), np.zeros(3), (640, 480), cam)
    n = np.random.default_rng(0).uniform(-0.3, 0.3, (20, 2))
    distorted = np.asarray(cam.img_from_cam(np.c_[n, np.ones(20)]), float)[:, :2] - 0.5  # OpenCV pixel convention
    assert np.allclose(v.undistort(distorted), n @ K[:2, :2].T + K[:2, 2], atol=1e-6)


def test_select_pairs():
    def view(name, yaw, c):
        R = _rot([0, 1, 0], yaw)
        return P.GTView(name, np.eye(3), R, -R @ np.asarray(c, float), (10, 10))

    views = {"a": view("a", 0, [0, 0, 0]), "b": view("b", 30, [1, 0, 0]), "c": view("c", 90, [2, 0, 0]),
             "d": view("d", 0, [0, 0, 0])}  # d repeats a: no baseline
    assert P.select_pairs(views, 60) == [("a", "b"), ("b", "c"), ("b", "d")]
    assert len(P.select_pairs(views, 0)) == 5


@pytest.mark.shared
def test_gt_loader_strecha():
    scene = SHARED / "strecha_entry-P10_half"
    if not (scene / "gt_colmap").is_dir():
        pytest.skip("../shared/data/strecha_entry-P10_half absent")
    views = P.load_gt(scene)
    assert list(views) == [f"{i:04d}.jpg" for i in range(10)]
    v = views["0000.jpg"]
    assert v.size == (1536, 1024)
    # README: K.txt is the OpenCV-convention K; gt_colmap has cx + 0.5 (COLMAP), the loader takes it back
    assert np.allclose(v.K, np.loadtxt(scene / "K.txt"), atol=1e-3)
    # the Strecha .camera file: R camera-to-world, t = camera centre
    cam = np.loadtxt(scene / "gt_dense_cameras" / "0000.jpg.camera", max_rows=8)
    assert np.allclose(v.R, cam[4:7].T, atol=1e-6) and np.allclose(v.center, cam[7], atol=1e-5)
    assert len(P.select_pairs(views, 60.0)) == 36


def test_subsample_pairs():
    pairs = [(f"{i:03d}", f"{i + 1:03d}") for i in range(100)]
    s = P.subsample_pairs(pairs, 40)
    assert len(set(s)) == 40 and s[0] == pairs[0] and s[-1] == pairs[-1] and s == sorted(s)
    assert max(np.diff([pairs.index(p) for p in s])) <= 3  # spread over the whole list
    assert P.subsample_pairs(pairs, 40) == s  # deterministic
    assert P.subsample_pairs(pairs[:10], 40) == pairs[:10] and P.subsample_pairs(pairs, 0) == pairs
    assert all(len(set(P.subsample_pairs(pairs[:n], 40))) == 40 for n in range(41, 101))
