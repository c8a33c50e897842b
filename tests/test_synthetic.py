"""The bundled synthetic scene: rendering, ground truth, and the end-to-end SIFT reconstruction compared with it."""

from __future__ import annotations

import json

import numpy as np
import pycolmap
import pytest

from cd_sfm.pipeline import reconstruct
from cd_sfm.synthetic import compare_to_ground_truth, render_scene


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return render_scene(tmp_path_factory.mktemp("synthetic"), num_images=8, num_points=200, width=640, height=480,
                        patch_radius=12)


def test_render_scene_files_and_ground_truth(scene, tmp_path):
    assert len(scene.names) == 8
    assert sorted(p.name for p in scene.image_dir.iterdir()) == scene.names
    gt = pycolmap.Reconstruction(str(scene.gt_dir))
    assert gt.num_reg_images() == 8 and gt.num_points3D() == 200
    cam = next(iter(gt.cameras.values()))
    assert (cam.width, cam.height) == (640, 480)
    from cd_sfm.images import read_image

    img, _ = read_image(scene.image_dir / scene.names[0])
    assert img.shape == (480, 640, 3) and img.std() > 5  # something drawn
    # seeded: the same call draws the same scene
    again = render_scene(tmp_path / "again", num_images=8, num_points=200, width=640, height=480,
                         patch_radius=12)
    a = (scene.image_dir / scene.names[3]).read_bytes()
    assert a == (again.image_dir / scene.names[3]).read_bytes()
    # ground truth compared with itself: no error
    cmp = compare_to_ground_truth(gt, pycolmap.Reconstruction(str(again.gt_dir)))
    assert cmp["aligned"] and cmp["num_compared"] == 8
    assert cmp["max_rotation_error_deg"] < 1e-3 and cmp["max_position_error"] < 1e-6
    assert cmp["scale"] == pytest.approx(1.0)


def test_sift_reconstruction_matches_ground_truth(scene, tmp_path):
    out = tmp_path / "out"
    summary = reconstruct(scene.image_dir, out, {"features": "sift", "camera_mode": "single"}, progress=False)
    assert summary["num_images_registered"] == 8 and summary["unregistered"] == []
    assert summary["num_points3D"] > 150 and summary["mean_reprojection_error"] < 1.5
    assert json.loads((out / "summary.json").read_text())["num_images_registered"] == 8
    cmp = compare_to_ground_truth(out / "sparse" / "0", scene.gt_dir)
    assert cmp["aligned"] and cmp["num_compared"] == 8
    assert cmp["max_rotation_error_deg"] < 0.5
    assert cmp["max_position_error"] < 0.01 * cmp["scene_radius"]  # 1 % of the camera distance
    # the reconstructed camera's focal length, refined from the 1.2 * width guess, lands on the truth
    rec = pycolmap.Reconstruction(str(out / "sparse" / "0"))
    f = next(iter(rec.cameras.values())).focal_length
    gt_f = next(iter(pycolmap.Reconstruction(str(scene.gt_dir)).cameras.values())).focal_length
    assert f == pytest.approx(gt_f, rel=0.02)
    assert np.isfinite(summary["mean_track_length"])
