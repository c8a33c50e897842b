"""Augmentation training: pair builder, training/resume, export loaded by the ContextDesc backend."""

import json

import cv2
import numpy as np
import pytest

pytest.importorskip("tensorflow")

from cd_sfm.features.patches import SiftDetectorConf
from cd_sfm.models import registry
from cd_sfm.train import pair_data as pdata
from cd_sfm.train import runlog
from cd_sfm.train import train_augment as ta
from cd_sfm.train.homography import list_images, warp_points


def _texture(seed, h=240, w=320):
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.uniform(0, 255, (h, w)).astype(np.float32), (0, 0), 2.5)
    return cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)


def test_pair_builder_exact_correspondences():
    gray = _texture(0)
    # a translation by 32 px keeps the sampling phase of every SIFT octave: the warped image's keypoints are the
    # source keypoints shifted exactly, so every correspondence must be (numerically) exact
    H = np.array([[1, 0, 32.0], [0, 1, 32.0], [0, 0, 1]])
    conf = pdata.PairMineConf(detector=SiftDetectorConf(max_keypoints=0))
    pair = pdata.make_image_pair(gray, np.random.default_rng(0), conf, H=H, photometric=False)
    k0, k1 = pair["images"]
    m = pair["matches"]
    x, y = k0["keypoints"].T
    interior = (x > 30) & (x < 320 - 32 - 30) & (y > 30) & (y < 240 - 32 - 30) & (k0["scales"] < 8)
    assert interior.sum() > 20 and np.isin(np.flatnonzero(interior), m[:, 0]).mean() > 0.8
    err = np.linalg.norm(warp_points(H, k0["keypoints"][m[:, 0]]) - k1["keypoints"][m[:, 1]], axis=1)
    exact = (err < 1e-3) & np.isclose(k0["scales"][m[:, 0]], k1["scales"][m[:, 1]], rtol=1e-4)
    assert exact.mean() > 0.8 and err.max() <= conf.match.max_dist  # the rest: keypoints the image border moved
    assert len(np.unique(m[:, 0])) == len(m) == len(np.unique(m[:, 1]))  # one to one
    assert k0["patches"].dtype == np.uint8 and k0["patches"].shape == (len(k0["keypoints"]), 32, 32)


def test_correspondences_reject_incompatible_scale_and_angle():
    kp0 = {"keypoints": np.array([[10.0, 10.0], [50.0, 50.0]], np.float32), "scales": np.array([4.0, 4.0]),
           "angles": np.array([0.0, 0.0])}
    kp1 = {"keypoints": np.array([[10.5, 10.0], [50.0, 50.0], [50.2, 50.0]], np.float32),
           "scales": np.array([4.0, 9.0, 4.0]), "angles": np.array([90.0, 0.0, 5.0])}
    m = pdata.correspondences(kp0, kp1, np.eye(3))
    assert m.tolist() == [[1, 2]]  # keypoint 0: wrong angle; keypoint 1: the compatible neighbour, not the nearest
    assert pdata.correspondences(kp0, kp1, np.eye(3), upright=True).tolist() == [[0, 0], [1, 2]]


@pytest.fixture(scope="module")
def pairs_h5(tmp_path_factory):
    d = tmp_path_factory.mktemp("augpairs")
    for i in range(3):
        cv2.imwrite(str(d / f"im{i}.png"), _texture(i))
    out = d / "pairs.h5"
    conf = pdata.PairMineConf(warps_per_image=2, val_warps_per_image=1, val_every=3,
                              detector=SiftDetectorConf(max_keypoints=300))
    conf.homography.rotation_deg = 20.0
    conf.homography.scale_min, conf.homography.scale_max = 0.8, 1.25
    res = pdata.mine_pairs(list_images([d]), out, registry.DEFAULT_MODEL, conf)  # the shipped local model
    assert res["pairs"] == 5 and res["matches"] > 50
    return out


def _conf(data, run_dir, steps, **kw):
    kw = {"pairs_per_step": 1, "matches_per_pair": 32, "val_every": 100, "ckpt_every": 1, "log_every": 1,
          "warmup": 1, "max_kpts": 320, "lr": 1e-2, **kw}
    return ta.AugTrainConf(data=str(data), run_dir=str(run_dir), steps=steps, **kw)


def test_read_pairs_layout(pairs_h5):
    d = pdata.read_pairs(pairs_h5, "all", patches=True)
    assert len(d["pairs"]) == 5 and sum(p["is_val"] for p in d["pairs"]) == 1
    p = d["pairs"][0]
    n0 = len(p["kpts"][0])
    assert p["feat"][0].shape == (n0, 128) and p["patches"][0].shape == (n0, 32, 32)
    assert np.abs(p["xy"][0]).max() <= 1.0 and p["matches"].max(0)[0] < n0


@pytest.fixture(scope="module")
def aug_run(pairs_h5, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("augrun")
    run = tmp / "run"
    r1 = ta.train_augment(_conf(pairs_h5, run, 2))
    r2 = ta.train_augment(_conf(pairs_h5, run, 3, export="unit-aug", export_dir=str(tmp / "w")))
    return run, r1, r2, tmp / "w" / "unit-aug"


def test_train_and_resume(aug_run):
    run, r1, r2, _ = aug_run
    v0 = [r for r in runlog.read_log(run / "log.csv") if r["kind"] == "val"][0]
    assert v0["step"] == "0" and v0["val_top1_raw"] == v0["val_top1_aug"]  # zero-initialised: starts from raw
    assert r1["step"] == 2 and r2["step"] == 3 and (run / "curves.png").exists()
    assert [int(r["step"]) for r in runlog.read_log(run / "log.csv") if r["kind"] == "train"] == [1, 2, 3]


def test_export_loads_in_backend(aug_run):
    folder = aug_run[3]
    assert (folder / "augment.npz").exists() and (folder / "local.npz").exists()
    info = json.loads((folder / "info.json").read_text())
    assert info["name"] == "unit-aug" and info["augment"]["steps"] == 3
    assert "val_top1_aug" in info["augment"]["validation"]

    from cd_sfm.features.contextdesc import ContextDescBackend

    b = ContextDescBackend(model=str(folder), max_keypoints=200)
    assert b.runner.has_augment and not b.runner.has_regional
    f = b.extract_with_local(_texture(7))
    assert np.allclose(np.linalg.norm(f["descriptors"], axis=1), 1, atol=1e-5)
    assert not np.allclose(f["descriptors"], f["local_descriptors"], atol=1e-3)  # augmented != raw

    # the training path (geometric sub-model added to the raw descriptors) == the inference runner's full model
    from cd_sfm.models.augment import build_augment_model
    from cd_sfm.models.weights import load_weights_npz

    aug = build_augment_model(visual=False)
    load_weights_npz(aug, folder / "augment.npz")
    rng = np.random.default_rng(0)
    n = 150
    feat = rng.normal(0, 10, (n, 128)).astype(np.float32)
    mb = rng.uniform(0.5, 1, n).astype(np.float32)
    xy = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
    geo = ta.geo_submodel(aug)({"local_feat": feat[None], "kpt_m": mb[None, :, None], "kpt_xy": xy[None],
                                "kpt_mask": np.ones((1, n), np.float32)}, training=False).numpy()[0]
    assert np.abs(geo).max() > 1e-3
    assert np.allclose(b.runner.augment(feat, mb, xy), ta._l2n(feat + geo), atol=1e-4)


def test_training_reduces_loss(pairs_h5, tmp_path):
    conf = _conf(pairs_h5, tmp_path / "r", 12, pairs_per_step=2, lr=3e-3)
    data = pdata.read_pairs(pairs_h5, "train")["pairs"]
    tr = ta.AugTrainer(conf)
    batch = ta.sample_batch(data, 0, conf)
    first = tr.train_step(batch)[0]
    for _ in range(10):
        last = tr.train_step(batch)[0]
    assert last < first


def test_e2e_step_runs(pairs_h5, tmp_path):
    r = ta.train_augment(_conf(pairs_h5, tmp_path / "e2e", 1, mode="e2e", matches_per_pair=8, export="unit-e2e",
                               export_dir=str(tmp_path / "w")))
    assert r["step"] == 1 and np.isfinite(r["val"]["val_top1_aug"])
    assert (tmp_path / "w" / "unit-e2e" / "local.npz").exists()
    assert json.loads((tmp_path / "w" / "unit-e2e" / "info.json").read_text())["augment"]["mode"] == "e2e"
