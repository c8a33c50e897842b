import json

import cv2
import numpy as np
import pytest

from cd_sfm.evaluation import hpatches as hp


def _make_seq(root, seed=0):
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.uniform(0, 255, (240, 320)).astype(np.float32), (0, 0), 2.0)
    img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    seq = root / "v_synthetic"
    seq.mkdir(parents=True)
    cv2.imwrite(str(seq / "1.ppm"), cv2.cvtColor(img, cv2.COLOR_GRAY2BGR))
    for k in range(2, 4):
        a = np.deg2rad(5 * k)
        H = np.array([[np.cos(a), -np.sin(a), 10.0 * k], [np.sin(a), np.cos(a), 3.0], [1e-5 * k, 0, 1]])
        cv2.imwrite(str(seq / f"{k}.ppm"), cv2.cvtColor(cv2.warpPerspective(img, H, (320, 240)), cv2.COLOR_GRAY2BGR))
        np.savetxt(seq / f"H_1_{k}", H)
    return seq


def test_rootsift_normalised():
    d = hp.rootsift(np.random.default_rng(0).uniform(0, 50, (5, 128)))
    assert np.allclose(np.linalg.norm(d, axis=1), 1, atol=1e-5) and (d >= 0).all()


def test_mutual_nn():
    d = np.eye(4, dtype=np.float32)
    m = hp.mutual_nn(d, d[[2, 0, 1, 3]])
    assert sorted(map(tuple, m.tolist())) == [(0, 1), (1, 2), (2, 0), (3, 3)]


def test_eval_synthetic(tmp_path):
    _make_seq(tmp_path)
    res = hp.evaluate_hpatches(tmp_path, {"rootsift": hp.rootsift_describer}, hp.HPatchesConf(max_keypoints=500))
    r = res["methods"]["rootsift"]
    assert r["n_pairs"] == 2
    mma = [r["mma"][t] for t in hp.THRESHOLDS]
    assert all(b >= a for a, b in zip(mma, mma[1:]))
    assert mma[-1] > 0.8 and r["n_correct"] > 20 and 0 < r["matching_score"] <= 1
    hp.save_json(res, tmp_path / "out.json")
    assert "rootsift" in json.loads((tmp_path / "out.json").read_text())["methods"]
    assert "MMA@3" in hp.format_table(res)


def test_eval_with_local_model(tmp_path):
    pytest.importorskip("tensorflow")
    from cd_sfm.models.local import build_local_model

    _make_seq(tmp_path)
    desc = hp.local_describer(build_local_model(), batch=256)
    res = hp.evaluate_hpatches(tmp_path, {"local": desc}, hp.HPatchesConf(max_keypoints=300))
    assert res["methods"]["local"]["n_matches"] > 0


def test_missing_root(tmp_path):
    from cd_sfm.io import CdSfmError

    with pytest.raises(CdSfmError):
        hp.list_sequences(tmp_path / "nope")
