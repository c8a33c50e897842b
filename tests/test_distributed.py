"""Ray execution of extraction and matching gives the very features and matches of the in-process stages."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest

from cd_sfm.io import list_h5_names

FEATURE_CONF = {"backend": "sift", "options": {"max_keypoints": 600}, "max_image_size": 400,
                "descriptor_dtype": "float16"}


def test_no_ray_import_without_the_flag():
    code = ("import sys; import cd_sfm.distributed, cd_sfm.globaldesc, cd_sfm.pairs.retrieval, cd_sfm.matching, "
            "cd_sfm.features.extract; assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_helpful_error_without_ray(monkeypatch):
    from cd_sfm import distributed
    from cd_sfm.io import CdSfmError

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(CdSfmError, match=r"pip install 'cd_sfm\[ray\]'"):
        distributed.require_ray()


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    from cd_sfm.synthetic import render_scene

    return render_scene(tmp_path_factory.mktemp("scene"), num_images=4, num_points=300, width=480, height=360)


def assert_same_h5(a, b):
    names = list_h5_names(a)
    assert names and names == list_h5_names(b)
    with h5py.File(a) as fa, h5py.File(b) as fb:
        for n in names:
            assert set(fa[n]) == set(fb[n]), n
            for k in fa[n]:
                x, y = fa[n][k][()], fb[n][k][()]
                assert x.dtype == y.dtype and x.shape == y.shape, (n, k)
                np.testing.assert_array_equal(x, y, err_msg=f"{n}/{k}")


@pytest.mark.parametrize("ship_data", [False, True])
def test_ray_matches_in_process(ray_cluster, scene, tmp_path, ship_data):
    from cd_sfm import distributed, matching
    from cd_sfm.features import extract
    from cd_sfm.pairs import exhaustive

    ref, dist = tmp_path / "ref", tmp_path / "ray"
    extract.main(FEATURE_CONF, scene.image_dir, ref / "features.h5", progress=False)
    pairs = exhaustive.main(scene.names, tmp_path / "pairs.txt")
    matching.main("NN-ratio", tmp_path / "pairs.txt", ref / "features.h5", ref / "matches.h5", progress=False)

    ray_ex = distributed.RayExecutor(distributed.RayConf(num_workers=2, ship_data=ship_data, match_batch=2))
    stats = extract.main(FEATURE_CONF, scene.image_dir, dist / "features.h5", executor=ray_ex, progress=False)
    assert stats["extracted"] == len(scene.names)
    assert_same_h5(ref / "features.h5", dist / "features.h5")
    stats = matching.main("NN-ratio", tmp_path / "pairs.txt", dist / "features.h5", dist / "matches.h5",
                              executor=ray_ex, progress=False)
    assert stats["matched"] == len(pairs) and stats["num_matches_mean"] > 20
    assert_same_h5(ref / "matches.h5", dist / "matches.h5")

    # resumed runs reuse everything and start no worker
    assert extract.main(FEATURE_CONF, scene.image_dir, dist / "features.h5", executor=ray_ex,
                               progress=False)["reused"] == len(scene.names)
    assert matching.main("NN-ratio", tmp_path / "pairs.txt", dist / "features.h5", dist / "matches.h5",
                             executor=ray_ex, progress=False)["reused"] == len(pairs)


def test_ray_skips_unreadable_images(ray_cluster, scene, tmp_path):
    import shutil

    from cd_sfm import distributed
    from cd_sfm.features import extract

    images = tmp_path / "images"
    shutil.copytree(scene.image_dir, images)
    (images / "broken.png").write_bytes(b"not an image")
    stats = extract.main(FEATURE_CONF, images, tmp_path / "features.h5",
                                executor=distributed.RayExecutor({"num_workers": 1, "ship_data": True}), progress=False)
    assert list(stats["skipped"]) == ["broken.png"] and "broken.png" in stats["skipped"]["broken.png"]
    assert stats["extracted"] == len(scene.names)


def test_pipeline_with_ray_equals_in_process(ray_cluster, scene, tmp_path):
    """``reconstruct(..., {"ray": ...})`` (the CLI's --ray) writes the files of the in-process run, and leaves a
    cluster it did not start running."""
    from cd_sfm import pipeline

    conf = {"features_options": {"max_keypoints": 600}, "max_image_size": 400, "camera_mode": "single"}
    ref = pipeline.reconstruct(scene.image_dir, tmp_path / "ref", conf, progress=False)
    dist = pipeline.reconstruct(scene.image_dir, tmp_path / "ray",
                                {**conf, "ray": "auto", "ray_options": {"num_workers": 2, "match_batch": 2}},
                                progress=False)
    assert dist["features_extracted"] == ref["features_extracted"] == len(scene.names)
    assert dist["pairs_matched"] == ref["pairs_matched"] > 0
    assert_same_h5(tmp_path / "ref" / "features.h5", tmp_path / "ray" / "features.h5")
    assert_same_h5(tmp_path / "ref" / "matches.h5", tmp_path / "ray" / "matches.h5")
    assert dist["num_images_registered"] == ref["num_images_registered"]
    # the summary says how it ran: the Ray setting, and the precision the workers' networks settled on
    assert ref["ray"] is None and dist["ray"] == {"address": "auto", "num_workers": 2, "match_batch": 2}
    for s in (ref, dist):  # (auto may time int8 against float in each process: equal choices are not promised)
        assert s["precision"]["local"] in ("int8", "bf16", "fp32") and "augment" in s["precision"]
    assert ray_cluster.is_initialized()


@pytest.mark.slow  # starts its own local Ray cluster from the CLI (~30 s)
def test_cli_ray_local_equals_in_process(scene, tmp_path):
    pytest.importorskip("ray")
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    common = [str(scene.image_dir), "--max-keypoints", "600", "--max-image-size", "400", "--camera-mode", "single",
              "-q"]
    for out, extra in (("ref", []), ("ray", ["--ray", "local", "--ray-workers", "2"])):
        p = subprocess.run([sys.executable, "-m", "cd_sfm.cli", "reconstruct", common[0], str(tmp_path / out),
                            *common[1:], *extra], capture_output=True, text=True, cwd=repo, timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
    assert_same_h5(tmp_path / "ref" / "features.h5", tmp_path / "ray" / "features.h5")
    assert_same_h5(tmp_path / "ref" / "matches.h5", tmp_path / "ray" / "matches.h5")


def test_ray_ships_masks(ray_cluster, scene, tmp_path):
    """Masks travel with their images when workers share no file system: the same features as masked extraction in
    process, and a bad mask is reported with its real path, not the worker's temporary copy."""
    import cv2

    from cd_sfm import distributed
    from cd_sfm.features import extract

    masks = tmp_path / "masks"
    masks.mkdir()
    good, bad = scene.names[0], scene.names[1]
    m = np.zeros((360, 480), np.uint8)
    m[:, :240] = 255
    cv2.imwrite(str(masks / f"{good}.png"), m)
    (masks / f"{bad}.png").write_bytes(b"not a png")
    ref = extract.main(FEATURE_CONF, scene.image_dir, tmp_path / "ref.h5", progress=False, mask_dir=masks)
    stats = extract.main(FEATURE_CONF, scene.image_dir, tmp_path / "ray.h5", progress=False, mask_dir=masks,
                         executor=distributed.RayExecutor({"num_workers": 1, "ship_data": True}))
    assert list(stats["skipped"]) == [bad] == list(ref["skipped"])
    assert stats["skipped"][bad] == ref["skipped"][bad] and str(masks / f"{bad}.png") in stats["skipped"][bad]
    assert_same_h5(tmp_path / "ref.h5", tmp_path / "ray.h5")
    with h5py.File(tmp_path / "ray.h5") as f:
        assert f[good]["keypoints"][()][:, 0].max() < 240 and "mask_size" in f[good].attrs
