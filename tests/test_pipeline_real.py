"""End to end on real photos (../shared/data/sacre_coeur/mapping, hloc's demo scene): every image registers.

Skipped when ../shared is absent. About 35 s on two busy cores (most of it exhaustive matching of 45 pairs of 8k
SIFT features)."""

from __future__ import annotations

from pathlib import Path

import pycolmap
import pytest

from cd_sfm.pipeline import reconstruct

SCENE = Path(__file__).resolve().parents[2] / "shared" / "data" / "sacre_coeur" / "mapping"

pytestmark = [pytest.mark.shared, pytest.mark.skipif(not SCENE.is_dir(), reason="../shared/data not available")]


def test_sacre_coeur_registers_every_image(tmp_path):
    s = reconstruct(SCENE, tmp_path, {"features": "sift"}, progress=False)
    assert s["num_images_found"] == s["num_images_used"] == 10 and s["skipped"] == {}
    assert s["num_images_registered"] == 10, s["unregistered"]
    assert s["num_points3D"] > 500 and s["mean_track_length"] > 3 and s["mean_reprojection_error"] < 1.0
    rec = pycolmap.Reconstruction(str(tmp_path / "sparse" / "0"))
    assert rec.num_reg_images() == 10
    # Internet photos of different cameras and sizes: auto mode gives each its own camera
    assert rec.num_cameras() == 10
    db = pycolmap.Database.open(str(tmp_path / "database.db"))
    try:
        assert db.num_images() == 10 and db.num_verified_image_pairs() > 0
    finally:
        db.close()
