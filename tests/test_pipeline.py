"""The pipeline: bad input (one-line errors before any work), rerun reuse, settings guard, summary, config presets."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml

from cd_sfm import config as config_mod
from cd_sfm import pipeline
from cd_sfm.io import CdSfmError
from cd_sfm.synthetic import render_scene


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return render_scene(tmp_path_factory.mktemp("pipe_scene"), num_images=6, num_points=200, width=640, height=480,
                        patch_radius=12)


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------------------------------------------------------------
# bad input


def test_missing_or_empty_image_folder(tmp_path):
    with pytest.raises(CdSfmError) as e:
        pipeline.reconstruct(tmp_path / "nope", tmp_path / "out")
    assert "nope: image folder not found" in one_line(e)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(CdSfmError) as e:
        pipeline.reconstruct(tmp_path / "empty", tmp_path / "out")
    assert "no images found" in one_line(e)
    (tmp_path / "file.jpg").write_bytes(b"")
    with pytest.raises(CdSfmError, match="not a folder"):
        pipeline.reconstruct(tmp_path / "file.jpg", tmp_path / "out")


def test_output_not_writable_is_checked_before_any_work(scene, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(CdSfmError) as e:
        pipeline.reconstruct(scene.image_dir, blocker / "out")
    assert str(blocker / "out") in one_line(e)
    with pytest.raises(CdSfmError, match="not a folder"):
        pipeline.reconstruct(scene.image_dir, blocker)
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(CdSfmError, match="not writable"):
                pipeline.reconstruct(scene.image_dir, ro)
        finally:
            ro.chmod(0o700)
        assert not (ro / "features.h5").exists()


def test_fewer_than_two_usable_images(scene, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(scene.image_dir / scene.names[0], images / "good.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(CdSfmError) as e:
        pipeline.reconstruct(images, tmp_path / "out")
    msg = one_line(e)
    assert "1 usable image(s) of 2" in msg and "broken.jpg" in msg
    # what was computed is kept: the good image's features
    assert (tmp_path / "out" / "features.h5").exists()


# ---------------------------------------------------------------------------------------------------------------------
# a run, a rerun, a guarded rerun


def test_run_rerun_reuses_and_settings_guard(scene, tmp_path):
    out = tmp_path / "out"
    conf = {"features": "sift", "camera_mode": "single", "features_options": {"max_keypoints": 2048}}
    first = pipeline.reconstruct(scene.image_dir, out, conf, progress=False)
    for f in ("database.db", "features.h5", "matches.h5", "pairs.txt", "points.ply", "summary.json", "config.yaml"):
        assert (out / f).exists(), f
    assert (out / "sparse" / "0" / "cameras.bin").exists()
    s = json.loads((out / "summary.json").read_text())
    assert s == json.loads(json.dumps(first))
    assert s["num_images_found"] == s["num_images_used"] == 6 and s["num_images_registered"] == 6
    assert s["skipped"] == {} and s["unregistered"] == []
    assert s["features_extracted"] == 6 and s["pairs_matched"] == 15
    for stage in ("extract", "pairs", "match", "database", "mapping", "total"):
        assert s["seconds"][stage] >= 0
    assert s["num_points3D"] > 100 and 2 <= s["mean_track_length"] and s["mean_reprojection_error"] < 2
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["camera_mode"] == "single" and saved["features_options"] == {"max_keypoints": 2048}

    second = pipeline.reconstruct(scene.image_dir, out, conf, progress=False)
    assert second["features_reused"] == 6 and second["features_extracted"] == 0
    assert second["pairs_reused"] == 15 and second["pairs_matched"] == 0
    assert second["num_images_registered"] == 6

    with pytest.raises(CdSfmError) as e:  # other features into the same folder: refused, nothing lost
        pipeline.reconstruct(scene.image_dir, out, {**conf, "features": "rootsift"}, progress=False)
    assert "features.h5: made with other settings" in one_line(e) and "rootsift" in str(e.value)
    assert yaml.safe_load((out / "config.yaml").read_text())["features"] == "sift"
    # matching settings only make the matches stale
    with pytest.raises(CdSfmError, match="matches.h5: made with other settings"):
        pipeline.check_not_stale(out, config_mod.resolve({**conf, "matching": "NN-mutual"}), overwrite=False)
    pipeline.check_not_stale(out, config_mod.resolve({**conf, "matching": "NN-mutual"}), overwrite=True)


def test_format_summary_is_short_and_readable():
    s = {"num_images_registered": 3, "num_images_used": 4, "num_images_found": 5, "skipped": {"x.jpg": "corrupt"},
         "output_dir": "out", "num_points3D": 10, "mean_track_length": 2.5, "mean_reprojection_error": None,
         "features_reused": 1, "pairs_reused": 2, "seconds": {"extract": 1.0, "total": 2.0},
         "unregistered": ["d.jpg"]}
    text = pipeline.format_summary(s)
    assert "Registered 3 / 4 images" in text and "n/a" in text and "Skipped x.jpg: corrupt" in text
    assert "Not registered: d.jpg" in text and len(text.splitlines()) <= 6
    # mapping attempts: each with its images, points and agreement, and why the kept one was kept
    s["mapping_tried"] = [{"mapper": "incremental", "registered": 7, "points": 381, "agreement": 1.0},
                          {"mapper": "global", "registered": 13, "points": 376, "agreement": 0.91}]
    s["mapper_used"] = "incremental"
    line = next(x for x in pipeline.format_summary(s).splitlines() if x.startswith("Mapping tried"))
    assert "global 13 images, 376 points (agreement 0.91)" in line and "kept incremental" in line
    assert "more images only with more points" in line
    assert not any(x.startswith("Warning") for x in pipeline.format_summary(s).splitlines())
    # no attempt agreed (a wrongly placed object ring on a TRAIN scene kept at 0.29): the summary says so
    s["mapping_agreement"] = 0.29
    warning = next(x for x in pipeline.format_summary(s).splitlines() if x.startswith("Warning"))
    assert "agrees with only 0.29 of its verified image pairs (trusted from 0.8" in warning
    assert "placed wrongly" in warning and "mask them (--masks)" in warning
    s.update(masked_images=3, masks="/m")  # already masked: no advice to mask, and the masks are named
    text = pipeline.format_summary(s)
    assert "--masks" not in text and "Masked 3 of 5 images (masks from /m)" in text
    s["mapping_agreement"] = 0.8
    assert not any(x.startswith("Warning") for x in pipeline.format_summary(s).splitlines())
    # cameras the global mapper placed without the points to hold them: counted, and said why
    s["mapping_tried"][1]["weak_removed"] = 5
    line = next(x for x in pipeline.format_summary(s).splitlines() if x.startswith("Mapping tried"))
    assert "global 13 images (+5 left out), 376 points" in line
    assert "images left out observed fewer than 30 3D points" in line
    s["mapping_tried"] = s["mapping_tried"][1:]  # a single attempt is listed when it left images out
    assert any(x.startswith("Mapping tried global 13 images (+5") for x in pipeline.format_summary(s).splitlines())


def test_format_summary_says_which_models_and_why_images_are_missing():
    """A nadir drone survey subsampled along its flight lines (odm_seneca, 24 images): verified pairs in four
    groups, three models; the summary names the other models and why no model holds every image."""
    s = {"num_images_registered": 7, "num_images_used": 24, "num_images_found": 24, "output_dir": "out",
         "num_points3D": 496, "mean_track_length": 3.0, "mean_reprojection_error": 0.13, "seconds": {"total": 1.0},
         "unregistered": [f"{i}.jpg" for i in range(17)], "model_sizes": [[7, 496], [6, 898], [4, 32]],
         "pair_groups": [7, 7, 6, 2]}
    lines = pipeline.format_summary(s).splitlines()
    assert "Other models: sparse/1 6 images, sparse/2 4 images" in lines
    why = next(x for x in lines if x.startswith("The verified pairs"))
    assert "4 separate groups (7, 7, 6, 2 images; 2 images have no verified pair)" in why
    assert "one model holds one group at most" in why
    s.update(pair_groups=[23], model_sizes=[[7, 496]])  # one group and an image with no verified pair
    lines = pipeline.format_summary(s).splitlines()
    assert not any(x.startswith("Other models") for x in lines)
    assert "1 image has no verified pair with any other image" in lines[-1]
    s.update(pair_groups=[24])  # every image in one group: nothing to explain
    assert len(pipeline.format_summary(s).splitlines()) == 4


# ---------------------------------------------------------------------------------------------------------------------
# config presets


def test_presets_are_valid():
    import pycolmap

    from cd_sfm import matching
    from cd_sfm.colmap import mapping, verify
    from cd_sfm.features import extract

    names = config_mod.available_presets()
    assert {"default", "fast", "accurate", "large"} <= set(names)
    default = config_mod.load_config("default")
    assert config_mod.public(default) == config_mod.DEFAULTS  # default.yaml spells out the defaults
    for name in names:
        conf = config_mod.load_config(name)
        assert conf["features"] in extract.confs
        assert conf["matching"] in matching.confs
        conf.features.extraction_conf()
        conf.matching.matcher_conf()
        verify.two_view_options(conf["verification"])
        opts = mapping.pipeline_options({"mapper": "incremental", "options": conf["incremental_options"]})
        assert isinstance(opts, pycolmap.IncrementalPipelineOptions)
        opts = mapping.pipeline_options({"mapper": "global", "options": conf["global_options"]})
        assert isinstance(opts, pycolmap.GlobalPipelineOptions)
        opts = mapping.pipeline_options({"mapper": "hierarchical", "options": conf["hierarchical_options"]})
        assert isinstance(opts, pycolmap.HierarchicalPipelineOptions)
        assert conf["camera_mode"] in ("auto", "single", "per-folder", "per-image")
        assert set(pipeline.pair_sources(conf["pairs"])) <= set(pipeline.PAIR_METHODS)
        assert pipeline.prepare_conf(conf)["mapper"] in mapping.MAPPERS


def test_config_precedence_and_errors(tmp_path):
    conf = config_mod.load_config("fast", {"max_image_size": 640, "mapper": None})
    assert conf["max_image_size"] == 640 and conf["mapper"] == "incremental"  # None = not given
    assert conf.features.extraction_conf()["max_image_size"] == 640
    assert conf.features.extraction_conf()["options"]["max_keypoints"] == 4096  # from fast.yaml
    path = tmp_path / "mine.yaml"
    path.write_text("features: rootsift\npairs: sequential\noverlap: 3\n")
    conf = config_mod.load_config(str(path))
    assert (conf["features"], conf["pairs"], conf["overlap"], conf["camera_model"]) == (
        "rootsift", "sequential", 3, "SIMPLE_RADIAL")
    config_mod.save_config(conf, tmp_path / "saved.yaml")
    saved = config_mod.resolve(config_mod.read_saved(tmp_path / "saved.yaml"))
    assert dict(saved) == dict(conf) and saved.preset == "dict"
    path.write_text("featurs: sift\n")
    with pytest.raises(CdSfmError, match="unknown config key.*featurs"):
        config_mod.load_config(str(path))
    with pytest.raises(CdSfmError, match="unknown config preset"):
        config_mod.load_config("no-such-preset")
    path.write_text("- a list\n")
    with pytest.raises(CdSfmError, match="mapping"):
        config_mod.load_config(str(path))
