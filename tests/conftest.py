"""Shared fixtures: one small SIFT reconstruction of the bundled synthetic scene for the tests of what follows a run
(exports, report, progress output)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def sift_run(tmp_path_factory):
    """(scene, out_dir, summary): 6 rendered views (640x480, SIMPLE_RADIAL with k = 0.02), ``--features sift``,
    one camera; ``out_dir`` holds everything ``cd-sfm reconstruct`` writes, report included."""
    from cd_sfm.pipeline import reconstruct
    from cd_sfm.synthetic import render_scene

    root = tmp_path_factory.mktemp("sift_run")
    scene = render_scene(root / "scene", num_images=6, num_points=300, width=640, height=480, patch_radius=12)
    out = root / "out"
    summary = reconstruct(scene.image_dir, out, {"features": "sift", "camera_mode": "single"}, progress=False)
    assert summary["num_images_registered"] == 6
    return scene, out, summary
