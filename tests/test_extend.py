"""``extend``: a rerun with more photos continues the earlier sparse/0 (COLMAP's ``mapper --input_path``) instead of
mapping from scratch: the database keeps the model's image and camera ids, its cameras keep their poses."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pycolmap
import pytest

from cd_sfm import cli
from cd_sfm.colmap.database import _assign_ids
from cd_sfm.pipeline import format_summary, reconstruct
from cd_sfm.synthetic import render_scene

CONF = {"features": "sift", "camera_mode": "single"}


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("extend")
    scene = render_scene(root / "scene", num_images=8, num_points=400, width=640, height=480, patch_radius=12)
    return sorted(scene.image_dir.iterdir())


def first_run(scene, tmp_path, left_out=(2, 5)):
    """The scene without the views ``left_out`` (in the middle of the sorted names, so that the database of the
    second run would number the images differently), reconstructed; returns (image folder, out, model)."""
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    for i, p in enumerate(scene):
        if i not in left_out:
            shutil.copy2(p, images / p.name)
    summary = reconstruct(images, out, CONF, progress=False, report=False)
    assert summary["num_images_registered"] == len(scene) - len(left_out) and summary["extended"] is None
    return images, out, pycolmap.Reconstruction(str(out / "sparse" / "0"))


def poses(rec) -> dict[str, np.ndarray]:
    return {rec.images[i].name: rec.images[i].cam_from_world().matrix() for i in rec.reg_image_ids()}


def test_extend_registers_new_images_into_the_model_without_moving_it(scene, tmp_path):
    images, out, before = first_run(scene, tmp_path)
    for p in scene:
        shutil.copy2(p, images / p.name)
    summary = reconstruct(images, out, {**CONF, "extend": True}, progress=False, report=False)
    assert summary["num_images_registered"] == 8 and summary["extended"] == 6
    assert summary["features_reused"] == 6 and summary["not_extended"] is None
    assert "Extended the earlier sparse/0 of 6 images (their poses kept; --extend)" in \
        format_summary(summary).splitlines()
    assert "a run without --extend maps every image" in format_summary({**summary, "unregistered": ["x.png"]})
    after = pycolmap.Reconstruction(str(out / "sparse" / "0"))
    old, new = poses(before), poses(after)
    assert set(old) < set(new)
    for name, pose in old.items():
        np.testing.assert_allclose(new[name], pose, atol=1e-9, err_msg=name)
    ids = {im.name: im.image_id for im in after.images.values()}
    assert {n: ids[n] for n in old} == {before.images[i].name: i for i in before.reg_image_ids()}
    assert sorted(ids[p.name] for i, p in enumerate(scene) if i in (2, 5)) == [7, 8]  # after the model's
    assert after.num_points3D() > before.num_points3D()


def test_extend_through_the_sfm_stage_cli(scene, tmp_path, capsys):
    images, out, before = first_run(scene, tmp_path, left_out=(7,))
    shutil.copy2(scene[7], images / scene[7].name)
    assert cli.main(["extract", str(images), str(out), "-q"]) == 0
    assert cli.main(["pairs", str(images), str(out), "-q"]) == 0
    assert cli.main(["match", str(out), "-q"]) == 0
    assert cli.main(["sfm", str(images), str(out), "--extend"]) == 0
    assert "Extended the earlier sparse/0 of 7 images" in capsys.readouterr().out
    after = pycolmap.Reconstruction(str(out / "sparse" / "0"))
    assert after.num_reg_images() == 8
    for name, pose in poses(before).items():
        np.testing.assert_allclose(poses(after)[name], pose, atol=1e-9, err_msg=name)


def test_what_cannot_be_extended_is_mapped_from_scratch_and_says_why(scene, tmp_path, caplog):
    images, out, _ = first_run(scene, tmp_path)
    fresh = tmp_path / "fresh"
    with caplog.at_level(logging.INFO, logger="cd_sfm.pipeline"):
        s = reconstruct(images, fresh, {**CONF, "extend": True}, progress=False, report=False)
    assert s["extended"] is None and s["not_extended"].startswith("no model in") and s["num_images_registered"] == 6
    assert "Not extended (no model in" in format_summary(s)
    gone = sorted(images.iterdir())[0]
    gone.unlink()  # an image of the model is no longer in the folder: its camera cannot stay where it was
    with caplog.at_level(logging.WARNING, logger="cd_sfm.pipeline"):
        s = reconstruct(images, out, {**CONF, "extend": True}, progress=False, report=False)
    assert s["extended"] is None and s["num_images_registered"] == 5
    assert f"{gone.name}, an image of the model in {out / 'sparse' / '0'}, is not used in this run" in s["not_extended"]
    assert any("Not extending the earlier model" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)


def test_database_ids_keep_the_model_or_say_why_not():
    names = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    assign = {"a.jpg": 0, "b.jpg": 1, "c.jpg": 0, "d.jpg": 2}  # this run's camera index of each image
    image_ids, camera_ids, why = _assign_ids(names, assign, 3, {"b.jpg": (1, 4), "c.jpg": (2, 3)})
    assert why is None
    assert image_ids == {"a.jpg": 3, "b.jpg": 1, "c.jpg": 2, "d.jpg": 4}
    assert camera_ids == [3, 4, 5]  # c's camera is a's too; d's camera is new
    plain = ({n: i for i, n in enumerate(names, 1)}, [1, 2, 3])
    assert _assign_ids(names, assign, 3, None) == (*plain, None)
    *ids, why = _assign_ids(names, assign, 3, {"a.jpg": (1, 1), "c.jpg": (2, 2)})
    assert tuple(ids) == plain and why == "c.jpg and a.jpg now share a camera but had two in the model"
    *ids, why = _assign_ids(names, assign, 3, {"a.jpg": (1, 1), "b.jpg": (2, 1)})
    assert tuple(ids) == plain and why == "images of one camera of the model now have two"
    *ids, why = _assign_ids(names, assign, 3, {"x.jpg": (1, 1)})
    assert tuple(ids) == plain and why == "1 images of the model are not in this run (e.g. x.jpg)"


def test_features_extracted_again_are_not_extended(scene, tmp_path):
    import h5py

    from cd_sfm.colmap.mapping import extendable

    images, out, before = first_run(scene, tmp_path)
    model = out / "sparse" / "0"
    ids, why = extendable(model, out / "features.h5")
    assert why is None and ids == {before.images[i].name: (i, before.images[i].camera_id)
                                   for i in before.reg_image_ids()}
    name = before.images[before.reg_image_ids()[0]].name
    with h5py.File(out / "features.h5", "r+") as f:  # the same count, other positions: the image was replaced
        f[name]["keypoints"][-1] += 2.0
    ids, why = extendable(model, out / "features.h5")
    assert ids is None and why == f"{name} has other keypoints than in the model (its features were extracted again)"
    ids, why = extendable(model, out / "features.h5", names=[n for n in ids or {}])
    assert ids is None and "is not used in this run" in why
