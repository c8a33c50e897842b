"""``cd-sfm match-pair``: SIFT / raw local / augmented matches of two images, inliers, one PNG."""

import json

import cv2
import numpy as np
import pytest

from cd_sfm.models.augment import build_augment_model
from cd_sfm.modeltools.frozen import generated_image
from cd_sfm.models.local import build_local_model
from cd_sfm.models.weights import save_weights_npz


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    model = d / "model"
    save_weights_npz(build_local_model(), model / "local.npz")
    save_weights_npz(build_augment_model(visual=False), model / "augment.npz")
    (model / "info.json").write_text(json.dumps({"name": "rnd", "trained_on": "random"}))
    img = generated_image(240, 320, seed=7)
    H = np.array([[0.95, 0.08, 12], [-0.06, 0.97, 8], [0, 0, 1]], np.float64)
    warped = cv2.warpPerspective(img, H, (320, 240), borderMode=cv2.BORDER_REFLECT)
    a, b = d / "a.png", d / "b.png"
    cv2.imwrite(str(a), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(b), cv2.cvtColor(warped, cv2.COLOR_RGB2BGR))
    return a, b, model


def test_match_pair_cli(pair, tmp_path, capsys):
    from cd_sfm.cli import main

    a, b, model = pair
    out = tmp_path / "plot" / "m.png"
    assert main(["match-pair", str(a), str(b), "--plot", str(out), "--model", str(model),
                 "--max-keypoints", "300"]) == 0
    text = capsys.readouterr().out
    for label in ("SIFT", "raw local", "augmented"):
        assert f"{label}: " in text and "inliers of" in text
    img = cv2.imread(str(out))
    assert img is not None and img.shape[0] > 3 * 240 and img.shape[1] == 640


def test_match_pair_function(pair):
    from cd_sfm.match_pair import MatchPairConf, match_pair

    a, b, model = pair
    res = match_pair(a, b, MatchPairConf(model=str(model), max_keypoints=300))
    sift = res["sift"]
    assert sift["putative"] == len(sift["matches"]) and sift["n_inliers"] == int(sift["inliers"].sum())
    assert sift["n_inliers"] > 30  # a mild homography: SIFT matches well
    for key in ("local", "augmented"):
        assert res[key]["matches"].shape[1] == 2 and res[key]["n_inliers"] <= res[key]["putative"]
