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

    # scripts/compare_pairs.py: the file's own AUCs, and a paired interval of zero width for a method against itself
    cmp = _script("compare_pairs")
    same = cmp.compare(cmp.load(f"{out}:rootsift")[1], cmp.load(f"{out}:rootsift")[1], resamples=50)
    assert same["pairs"] == 6 and all(r["diff"] == r["lo"] == r["hi"] == 0 for r in same["rows"])
    other = cmp.compare(cmp.load(f"{out}:rootsift")[1], cmp.load(f"{out}:contextdesc")[1], resamples=50)
    auc10 = next(r for r in other["rows"] if r["metric"] == "AUC@10")
    assert auc10["a"] == pytest.approx(100 * res["methods"]["rootsift"]["auc"]["10"], abs=1e-6)
    assert auc10["b"] == pytest.approx(100 * res["methods"]["contextdesc"]["auc"]["10"], abs=1e-6)
    assert auc10["lo"] <= auc10["diff"] <= auc10["hi"]
    assert cmp.main([f"{out}:local", str(out)]) == 0 and "95 % interval" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no method 'sift'"):
        cmp.load(f"{out}:sift")

    sout = tmp_path / "sfm.json"
    assert main(["eval", "sfm", "synth", "--data", data, "--model", str(models / "noaug"), "--methods",
                 "rootsift,contextdesc", "--max-keypoints", "500", "--output", str(sout),
                 "--work-dir", str(tmp_path / "work"), "--ratio", "0.85", "-q"]) == 0
    sres = json.loads(sout.read_text())
    import yaml

    used = yaml.safe_load((tmp_path / "work" / "synth" / "rootsift" / "config.yaml").read_text())
    assert used["matching_options"]["ratio"] == 0.85 and used["matching_options"]["cross_ratio"] is True
    assert list(sres["methods"]) == ["rootsift"] and "contextdesc" in sres["absent"]
    s = sres["scenes"]["synth"]["methods"]["rootsift"]
    assert s["num_images_registered"] >= 3 and s["num_points3D"] > 50 and s["gt"]["aligned"]
    assert s["gt"]["relative_position_error"] < 0.05  # the synthetic scene is reconstructed to its ground truth
    rel = s["gt"]["relative_pose"]
    assert rel["pairs"] == 6 and rel["pairs_registered"] == s["num_images_registered"] * (
        s["num_images_registered"] - 1) // 2
    assert rel["rotation_error_median_deg"] < 1 and rel["pose_accuracy"]["5"] == rel["pairs_registered"] / 6
    ov = sres["methods"]["rootsift"]
    assert ov["num_images_registered"] == s["num_images_registered"] and ov["gt_scenes"] == 1
    assert ov["mean_pose_accuracy"]["10"] == rel["pose_accuracy"]["10"]
    assert ov["mean_registered_pose_accuracy"]["10"] == rel["registered_pose_accuracy"]["10"] == 1.0
    assert "acc@10" in capsys.readouterr().out

    md = tmp_path / "table.md"
    assert main(["eval", "report", str(out), str(sout), "--output", str(md)]) == 0
    text = md.read_text()
    assert "### Relative pose" in text and "### SfM" in text and "| contextdesc | absent" in text
    assert "own pairs @10 deg" in text

    # two mapping seeds on the same matches: the first seed's numbers, every run, and the spread over the seeds
    s2 = tmp_path / "sfm2.json"
    assert main(["eval", "sfm", "synth", "--data", data, "--methods", "rootsift", "--max-keypoints", "500",
                 "--output", str(s2), "--work-dir", str(tmp_path / "work2"), "--seed", "3", "--seeds", "2", "-q"]) == 0
    r2 = json.loads(s2.read_text())
    row = r2["scenes"]["synth"]["methods"]["rootsift"]
    assert [r["seed"] for r in row["runs"]] == [3, 4] and row["seed"] == 3
    assert yaml.safe_load((tmp_path / "work2" / "synth" / "rootsift" / "config.yaml").read_text())["seed"] == 4
    second = json.loads((tmp_path / "work2" / "synth" / "rootsift" / "summary.json").read_text())
    assert second["features_extracted"] == 0 and second["pairs_matched"] == 0  # only the mapping ran again
    sp = r2["seeds"]["rootsift"]
    regs = [r["num_images_registered"] for r in row["runs"]]
    assert sp["seeds"] == 2 and sp["registered"] == {"mean": sum(regs) / 2, "min": min(regs), "max": max(regs)}
    assert sp["acc10"]["min"] <= sp["acc10"]["mean"] <= sp["acc10"]["max"]
    assert "ALL, 2 seeds" in capsys.readouterr().out
    assert main(["eval", "report", str(s2), "--output", str(md)]) == 0
    assert "Over 2 mapping seeds" in md.read_text()


def test_relative_pose_errors_see_a_flipped_camera_and_a_missing_one(scene):
    """A camera turned 180 degrees about its optical axis keeps its centre (the aligned position error cannot see
    it) and fails every pair it is in; an image the model left out fails its pairs too."""
    import pycolmap

    from cd_sfm.evaluation.gt import load_gt
    from cd_sfm.evaluation.sfm import relative_pose_errors

    views = load_gt(scene)
    rec = pycolmap.Reconstruction(str(scene / "gt_colmap"))
    exact = relative_pose_errors(rec, views)
    assert exact["pairs"] == exact["pairs_registered"] == 6 and exact["pose_accuracy"] == {"5": 1.0, "10": 1.0,
                                                                                             "20": 1.0}
    assert exact["rotation_error_median_deg"] < 1e-3 and exact["translation_error_median_deg"] < 1e-3
    im = rec.images[sorted(rec.reg_image_ids())[0]]
    T = im.cam_from_world()
    flip = np.diag([-1.0, -1.0, 1.0])
    centre = im.projection_center()
    rec.frames[im.frame_id].rig_from_world = pycolmap.Rigid3d(pycolmap.Rotation3d(flip @ T.rotation.matrix()),
                                                              flip @ T.translation)
    assert np.allclose(rec.images[im.image_id].projection_center(), centre)
    flipped = relative_pose_errors(rec, views)
    assert flipped["pose_accuracy"]["20"] == 0.5  # its 3 pairs of 6
    rec.deregister_frame(im.frame_id)
    missing = relative_pose_errors(rec, views)
    assert missing["pairs"] == 6 and missing["pairs_registered"] == 3 and missing["pose_accuracy"]["5"] == 0.5
    assert missing["registered_pose_accuracy"]["5"] == 1.0 and flipped["registered_pose_accuracy"]["5"] == 0.5


def _script(name: str):
    """A module of ``scripts/`` (not a package), imported from its file."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compare_mappers_script(scene, tmp_path, capsys):
    """``scripts/compare_mappers.py`` on a reconstruction of the synthetic scene: both mappers' models, judged
    against its ground truth, and the one the pipeline's rule keeps."""
    from cd_sfm.pipeline import reconstruct

    out = tmp_path / "out"
    reconstruct(scene / "images", out, {"features": "rootsift", "features_options": {"max_keypoints": 500,
                                                                                 "contrast_threshold": 0.04}},
                progress=False)
    mod = _script("compare_mappers")
    assert mod.main([str(out), "--json", str(tmp_path / "m.json")]) == 0
    (r,) = json.loads((tmp_path / "m.json").read_text())
    assert r["ground_truth"] and set(r["mappers"]) == {"incremental", "global"}
    inc = r["mappers"]["incremental"]
    assert inc["registered"] >= 3 and inc["points"] > 50 and inc["acc10_registered"] == 1.0
    assert r["kept"] in ("incremental", "global") and "own@10" in capsys.readouterr().out
