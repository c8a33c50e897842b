"""``cd-sfm eval``: parser wiring, methods, absent data, and the pairs / sfm / report commands on a tiny synthetic
scene rendered by pycolmap (ground truth as ``gt_colmap/``), with random model weights."""

import json
import logging
import shutil

import numpy as np
import pytest

from cd_sfm.cli import main
from cd_sfm.evaluation import methods as M
from cd_sfm.io import CdSfmError


def test_eval_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(k in out for k in ("hpatches", "pairs", "sfm", "report"))
    for sub in ("hpatches", "pairs", "sfm"):
        with pytest.raises(SystemExit):
            main(["eval", sub, "--help"])
        assert "--methods" in capsys.readouterr().out


def test_missing_data(tmp_path, capsys):
    assert main(["eval", "pairs", "--data", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "evaluation data not found" in err and len(err.splitlines()) == 1
    assert main(["eval", "hpatches", "--data", str(tmp_path)]) == 2
    assert "scene not found" in capsys.readouterr().err


def test_parse_methods():
    assert M.parse_methods(None) == ["rootsift", "local", "contextdesc"]
    assert M.parse_methods("local, rootsift,local") == ["local", "rootsift"]
    with pytest.raises(CdSfmError, match="unknown method"):
        M.parse_methods("rootsift,superpoint")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two model folders with random weights: local only, and local + geometric augmentation."""
    pytest.importorskip("tensorflow")
    from cd_sfm.models.augment import build_augment_model
    from cd_sfm.models.local import build_local_model
    from cd_sfm.models.weights import save_weights_npz

    root = tmp_path_factory.mktemp("models")
    for name in ("noaug", "aug"):
        d = root / name
        d.mkdir()
        save_weights_npz(build_local_model(), d / "local.npz")
        if name == "aug":
            save_weights_npz(build_augment_model(visual=False), d / "augment.npz")
        (d / "info.json").write_text(json.dumps({"name": name}))
    return root


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    from cd_sfm.synthetic import render_scene

    root = tmp_path_factory.mktemp("data")
    s = render_scene(root / "synth", num_images=4, num_points=300, width=480, height=360, seed=0)
    shutil.copytree(s.gt_dir, root / "synth" / "gt_colmap")
    return root / "synth"


def test_describers_same_keypoints(models, caplog):
    from cd_sfm.features.patches import SiftDetectorConf, detect_sift
    from cd_sfm.modeltools.frozen import generated_image

    gray = generated_image(200, 240, seed=3)
    gray = gray if gray.ndim == 2 else gray.mean(-1).astype(np.uint8)
    kp = detect_sift(gray, SiftDetectorConf(max_keypoints=200), descriptors=True)
    d, absent = M.make_describers(list(M.METHODS), str(models / "aug"))
    assert set(d) == set(M.METHODS) and not absent
    out = {m: f(gray, kp) for m, f in d.items()}
    for m, x in out.items():
        assert x.shape == (len(kp["keypoints"]), 128) and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-4), m
    assert not np.allclose(out["local"], out["contextdesc"])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cd_sfm"):
        d, absent = M.make_describers(["local", "contextdesc"], str(models / "noaug"))
    assert list(d) == ["local"] and "augment" in absent["contextdesc"]
    assert len([r for r in caplog.records if "augmentation weights" in r.getMessage()]) == 1  # said once


def test_pairs_sfm_report(models, scene, tmp_path, capsys):
    data = str(scene.parent)
    out = tmp_path / "pairs.json"
    assert main(["eval", "pairs", "synth", "--data", data, "--model", str(models / "aug"), "--max-keypoints", "500",
                 "--max-view-angle", "0", "--output", str(out), "-q"]) == 0
    res = json.loads(out.read_text())
    assert set(res["methods"]) == {"rootsift", "local", "contextdesc"}
    r = res["methods"]["rootsift"]
    assert r["n_pairs"] == 6 and r["n_correct"] > 10 and r["auc"]["20"] > 0.3
    assert res["meta"]["kind"] == "pairs" and res["meta"]["model"]["name"]
    assert "AUC@10" in capsys.readouterr().out

    sout = tmp_path / "sfm.json"
    assert main(["eval", "sfm", "synth", "--data", data, "--model", str(models / "noaug"), "--methods",
                 "rootsift,contextdesc", "--max-keypoints", "500", "--output", str(sout),
                 "--work-dir", str(tmp_path / "work"), "-q"]) == 0
    sres = json.loads(sout.read_text())
    assert list(sres["methods"]) == ["rootsift"] and "contextdesc" in sres["absent"]
    s = sres["scenes"]["synth"]["methods"]["rootsift"]
    assert s["num_images_registered"] >= 3 and s["num_points3D"] > 50 and s["gt"]["aligned"]
    assert s["gt"]["relative_position_error"] < 0.05  # the synthetic scene is reconstructed to its ground truth
    ov = sres["methods"]["rootsift"]
    assert ov["num_images_registered"] == s["num_images_registered"] and ov["gt_scenes"] == 1

    md = tmp_path / "table.md"
    assert main(["eval", "report", str(out), str(sout), "--output", str(md)]) == 0
    text = md.read_text()
    assert "### Relative pose" in text and "### SfM" in text and "| contextdesc | absent" in text
