import json

import h5py
import numpy as np
import pytest

from cd_sfm.io import CdSfmError
from cd_sfm.synthetic import render_scene
from cd_sfm.train import mine_sfm as ms


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    d = tmp_path_factory.mktemp("mine_sfm")
    scene = render_scene(d / "scene", num_images=6, num_points=200, width=640, height=480, patch_radius=12)
    out = d / "tracks.h5"
    res = ms.mine_sfm([scene.image_dir], out, ms.SfmMineConf(max_pairs_per_track=3), work_dir=d / "work",
                      split_file=None)
    return out, res, scene, d


def _ncc(a, b):
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a = (a - a.mean(1, keepdims=True)) / (a.std(1, keepdims=True) + 1e-6)
    b = (b - b.mean(1, keepdims=True)) / (b.std(1, keepdims=True) + 1e-6)
    return (a * b).mean(1)


def test_layout_and_tracks(mined):
    out, res, scene, _ = mined
    assert res["pairs"] > 200 and res["scenes"][0]["registered"] >= 5
    with h5py.File(out, "r") as f:
        n = len(f["kpt_ids"])
        assert f["patches"].shape == (n, 2, 32, 32) and f["patches"].dtype == np.uint8
        assert f["scales"].shape == (n, 2) and f["scales"].dtype == np.float32
        assert f["kpt_ids"].dtype == np.int64 and f["image_ids"].dtype == np.int32 and f["is_val"].dtype == bool
        ids, is_val = f["kpt_ids"][()], f["is_val"][()]
        assert 0 < is_val.sum() < n
        assert not set(ids[is_val]) & set(ids[~is_val])  # a track is all training or all validation
        assert np.bincount(ids).max() <= 3  # --max-pairs-per-track
        pim = f["pair_image_ids"][()]
        assert (pim[:, 0] != pim[:, 1]).all()
        val_imgs = set(json.loads(f.attrs["val_images"]))
        names = json.loads(f.attrs["image_names"])
        assert len(names) == 6 and len(val_imgs) == 1  # index % 10 == 3, as the homography miner
        vi = names.index(next(iter(val_imgs)))
        assert not (pim[~is_val] == vi).any()  # no held-out image in training pairs
        # same track -> much more similar patches than random pairs
        p = f["patches"][()]
        pos = _ncc(p[:, 0], p[:, 1])
        neg = _ncc(p[:, 0], p[np.random.default_rng(0).permutation(n), 1])
        assert np.median(pos) > np.median(neg) + 0.2 and (pos > neg).mean() > 0.8
        # per-image keypoint sets with track membership, consistent with the pairs
        imgs = f["images"][scene.image_dir.name]
        assert len(imgs) == 6
        g = imgs[scene.names[0]]
        p3d = g["point3D_ids"][()]
        assert g["keypoints"].shape == (len(p3d), 2) and len(g["scales"]) == len(g["angles"]) == len(p3d)
        assert (p3d >= 0).sum() > 50 and set(p3d[p3d >= 0]) <= set(ids)
        assert tuple(g["image_size"][()]) == (640, 480)


def test_resume_view_mode_and_rotation(mined):
    out, res, scene, d = mined
    out2 = d / "view.h5"
    conf = ms.SfmMineConf(val_mode="view", rotation="shared", photometric=False, store_images=False)
    res2 = ms.mine_sfm([scene.image_dir], out2, conf, work_dir=d / "work", split_file=None)
    assert res2["scenes"][0]["seconds_reconstruct"] < 1.0  # reused the reconstruction
    with h5py.File(out2, "r") as f:
        assert "images" not in f
        p, is_val = f["patches"][()], f["is_val"][()]
        assert (~is_val).sum() > res["pairs"] - res["val_pairs"]  # view mode keeps more training pairs
        pos = _ncc(p[:, 0], p[:, 1])
        assert np.median(pos) > 0.5  # a shared rotation keeps both views aligned


def test_eval_scenes_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("CD_SFM_DATA", raising=False)  # the split file's data_root decides, as the test means
    split = tmp_path / "repo" / "configs" / "split.yaml"
    split.parent.mkdir(parents=True)
    split.write_text("data_root: ../../data\neval:\n  - hpatches\n")  # relative to the file's folder
    (tmp_path / "data" / "hpatches" / "v_x").mkdir(parents=True)
    with pytest.raises(CdSfmError, match="EVAL"):
        ms.mine_sfm([tmp_path / "data" / "hpatches" / "v_x"], tmp_path / "o.h5", split_file=split)


def test_train_local_reads_and_mixes_it(mined):
    from cd_sfm.train import train_local as tl

    out, res = mined[0], mined[1]
    train, val, _ = tl._load_data(str(out), val_pairs=10**6)
    assert len(train["ids"]) + len(val["ids"]) == res["pairs"] and len(val["ids"]) == res["val_pairs"]
    mixed = {"patches": np.concatenate([train["patches"]] * 2), "scales": np.concatenate([train["scales"]] * 2),
             "ids": np.concatenate([train["ids"], train["ids"] + 10**6]), "n_main": len(train["ids"])}
    p, s, ids = tl.sample_batch(mixed, 0, tl.TrainConf(batch=16, extra_ratio=0.25))
    assert p.shape == (16, 2, 32, 32) and (ids >= 10**6).sum() == 4


@pytest.mark.slow
def test_train_local_runs_on_it(mined, tmp_path):
    pytest.importorskip("tensorflow")
    from cd_sfm.train import train_local as tl

    out = mined[0]
    r = tl.train_local(tl.TrainConf(data=str(out), data_extra=str(out), extra_ratio=0.5, run_dir=str(tmp_path / "r"),
                                    steps=2, batch=16, val_every=2, val_pairs=32, val_block=16, ckpt_every=1,
                                    log_every=1, warmup=1))
    assert r["step"] == 2 and np.isfinite(r["val"]["val_fpr95"])


def test_mine_sfm_pairs_cli_and_augment_training(mined, tmp_path):
    """Augmentation pairs from the SfM models of 'train mine' (whole keypoint sets, track correspondences, F of the
    poses), through the CLI; the augmentation trainer reads them with another file mixed in."""
    pytest.importorskip("tensorflow")
    from cd_sfm import cli
    from cd_sfm.geometry import sampson_distance
    from cd_sfm.train import pair_data as pdata
    from cd_sfm.train import train_augment as ta

    tracks, _, _, d = mined
    out = tmp_path / "sfm_pairs.h5"
    assert cli.main(["train", "mine-sfm-pairs", str(out), str(d / "work"), "--val-from", str(tracks),
                     "--min-common", "20", "--max-keypoints", "500", "-q"]) == 0
    data = pdata.read_pairs(out)
    pairs = data["pairs"]
    assert pairs and any(p["is_val"] for p in pairs) and not any(p["is_val"] for p in pdata.read_pairs(out, "train")["pairs"])
    assert data["attrs"]["source"] == "sfm_pairs"
    p = max(pairs, key=lambda q: len(q["matches"]))
    m = p["matches"]
    assert len(m) >= 20 and np.isfinite(p["F"]).all() and np.isnan(p["H"]).all()
    err = sampson_distance(p["F"], p["kpts"][0][m[:, 0]], p["kpts"][1][m[:, 1]])
    assert np.median(err) < 2.0  # track correspondences agree with the poses
    assert p["feat"][0].shape == (len(p["kpts"][0]), 128) and len(p["kpts"][0]) <= 500
    with pytest.raises(CdSfmError, match="no reconstruction work folders"):
        pdata.sfm_work_dirs([tmp_path])

    r = ta.train_augment(ta.AugTrainConf(data=str(out), data_extra=[str(out)], run_dir=str(tmp_path / "run"), steps=2,
                                         pairs_per_step=1, matches_per_pair=16, val_every=2, ckpt_every=1,
                                         log_every=1, warmup=1, max_kpts=520))
    assert r["step"] == 2 and np.isfinite(r["val"]["val_top1_aug"])
