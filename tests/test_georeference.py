"""GPS: EXIF positions go into the database's pose priors as COLMAP's image reader writes them, and a model whose
images carry them is moved into east-north-up metres around them (COLMAP's ``model_aligner --ref_is_gps``)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pycolmap
import pytest
from PIL import Image

from cd_sfm.colmap.georeference import georeference, gps_priors
from cd_sfm.images import exif_gps, image_info
from cd_sfm.pipeline import format_summary, reconstruct
from cd_sfm.report import facts
from cd_sfm.synthetic import render_scene

ORIGIN = (47.376887, 8.541694, 408.0)  # latitude, longitude, altitude of the made-up survey
SCALE = 25.0  # metres per unit of the rendered scene


def dms(deg: float) -> tuple[float, float, float]:
    d = int(deg)
    m = int((deg - d) * 60)
    return float(d), float(m), (deg - d - m / 60) * 3600


def write_gps(path, lat: float, lon: float, alt: float) -> None:
    """Save ``path`` again (lossless) with an EXIF GPS block."""
    with Image.open(path) as img:
        img.load()
        exif = Image.Exif()
        exif[0x8825] = {1: "N" if lat >= 0 else "S", 2: dms(abs(lat)), 3: "E" if lon >= 0 else "W", 4: dms(abs(lon)),
                        5: b"\x00" if alt >= 0 else b"\x01", 6: abs(alt)}
        img.save(path, exif=exif)


@pytest.fixture(scope="module")
def gps_scene(tmp_path_factory):
    """The rendered scene with each image's true camera centre, scaled to metres, written as its EXIF GPS position;
    returns (image folder, {name: true ENU centre}, {name: (lat, lon, alt)})."""
    root = tmp_path_factory.mktemp("gps")
    scene = render_scene(root / "scene", num_images=8, num_points=400, width=640, height=480, patch_radius=12)
    gt = pycolmap.Reconstruction(str(scene.gt_dir))
    enu = {gt.images[i].name: SCALE * gt.images[i].projection_center() for i in gt.reg_image_ids()}
    names = sorted(enu)
    lla = pycolmap.GPSTransform().enu_to_ellipsoid(np.array([enu[n] for n in names]), *ORIGIN)
    gps = {n: tuple(map(float, p)) for n, p in zip(names, lla)}
    for n in names:
        write_gps(scene.image_dir / n, *gps[n])
    return scene.image_dir, enu, gps


def test_exif_gps_reads_as_colmap_does(tmp_path):
    path = tmp_path / "a.jpg"
    Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(path)
    write_gps(path, -33.8567844, -151.2152967, -12.5)
    lat, lon, alt = image_info(path).gps
    bitmap = pycolmap.Bitmap.read(str(path), True)
    assert (lat, lon, alt) == pytest.approx((bitmap.exif_latitude(), bitmap.exif_longitude(), bitmap.exif_altitude()),
                                            abs=1e-7)
    assert (lat, lon, alt) == pytest.approx((-33.8567844, -151.2152967, -12.5), abs=1e-7)
    assert exif_gps({2: (1.0, 2.0, 3.0), 4: (4.0, 5.0, 6.0)}) is None  # no altitude: no position, as COLMAP
    assert exif_gps({2: (91.0, 0.0, 0.0), 4: (4.0, 5.0, 6.0), 6: 1.0}) is None
    assert exif_gps({}) is None and image_info(tmp_path / "a.jpg").gps is not None


def test_a_run_with_gps_is_georeferenced_in_enu_metres(gps_scene, tmp_path):
    images, enu, gps = gps_scene
    out = tmp_path / "out"
    summary = reconstruct(images, out, {"features": "sift", "camera_mode": "single"}, progress=False, report=False)
    assert summary["num_images_registered"] == 8 and summary["images_with_gps"] == 8
    # the database holds the priors as COLMAP's feature extractor writes them: (lat, lon, alt), WGS84
    priors = gps_priors(out / "database.db")
    assert set(priors) == set(gps)
    for n in gps:
        assert priors[n] == pytest.approx(gps[n], abs=1e-9)
    g = summary["georeference"]
    centres = np.array(list(enu.values()))
    span = np.linalg.norm(centres.max(0) - centres.min(0))
    assert span > 40  # metres: enough for 10 m GPS errors
    # what SfM itself gets wrong on the rendered scene (reprojection errors of 0.5-1 px), not the GPS (exact here)
    assert g["georeferenced"] and g["images"] == 8 and g["inliers"] == 8 and g["median_error_m"] < 0.005 * span
    assert np.allclose(g["origin"], np.mean([gps[n] for n in gps], axis=0))
    assert "Georeferenced: east-north-up metres around" in format_summary(summary)
    rec = pycolmap.Reconstruction(str(out / "sparse" / "0"))
    origin_enu = pycolmap.GPSTransform().ellipsoid_to_enu(np.array([g["origin"]]), *ORIGIN)[0]
    for i in rec.reg_image_ids():
        im = rec.images[i]  # our ENU is around the mean position: the true one shifted by that origin's offset
        np.testing.assert_allclose(im.projection_center(), enu[im.name] - origin_enu, atol=0.01 * span,
                                   err_msg=im.name)
    assert rec.compute_mean_reprojection_error() < 1.0  # the similarity moved points with the cameras

    # off (--no-georeference): the mapper's own frame, the priors still in the database
    from cd_sfm import cli

    assert cli.main(["reconstruct", str(images), str(tmp_path / "off"), "--features", "sift", "--camera-mode",
                     "single", "--no-georeference", "-q"]) == 0
    off = json.loads((tmp_path / "off" / "summary.json").read_text())
    assert off["georeference"] is None and off["images_with_gps"] == 8


def test_outliers_and_small_spans(gps_scene, tmp_path):
    images, enu, gps = gps_scene
    shutil.copytree(images, tmp_path / "images")
    out = tmp_path / "out"
    reconstruct(tmp_path / "images", out, {"features": "sift", "camera_mode": "single", "georeference": False},
                progress=False, report=False)
    rec = pycolmap.Reconstruction(str(out / "sparse" / "0"))
    names = sorted(gps)
    wrong = dict(gps)
    lat, lon, alt = gps[names[3]]
    wrong[names[3]] = (lat + 0.01, lon, alt)  # 1.1 km north: a GPS fix gone wrong
    moved = pycolmap.Reconstruction(rec)
    g = georeference(moved, wrong)
    assert g["georeferenced"] and g["inliers"] == 7 and g["median_error_m"] < 1.0  # of the 1100 m
    # consumer GPS: metres of noise on every position; the fit follows the cameras, not the noise
    rng = np.random.default_rng(0)
    noisy_enu = {n: enu[n] + rng.normal(0, 3.0, 3) for n in names}
    lla = pycolmap.GPSTransform().enu_to_ellipsoid(np.array([noisy_enu[n] for n in names]), *ORIGIN)
    g = georeference(moved := pycolmap.Reconstruction(rec), {n: tuple(p) for n, p in zip(names, lla)})
    assert g["georeferenced"] and g["inliers"] >= 7 and 1.0 < g["median_error_m"] < 8.0
    origin = pycolmap.GPSTransform().ellipsoid_to_enu(np.array([g["origin"]]), *ORIGIN)[0]
    errors = [np.linalg.norm(moved.images[i].projection_center() - (enu[moved.images[i].name] - origin))
              for i in moved.reg_image_ids()]
    assert np.median(errors) < 3.0  # against the true centres: better than the 3 m (per axis) positions
    few = {n: gps[n] for n in names[:2]}
    g = georeference(pycolmap.Reconstruction(rec), few)
    assert not g["georeferenced"] and g["why"] == "2 registered images with a GPS position, 3 needed"
    g = georeference(pycolmap.Reconstruction(rec), gps, max_error=1000.0)
    assert not g["georeferenced"] and "less than 4 x the 1000 m they may be off by" in g["why"]


def test_spatial_pairs_join_near_positions_only():
    from cd_sfm.pairs import spatial

    # a 5 x 4 survey grid, 30 m apart, heights all over the place (ignored, as COLMAP's ignore_z)
    enu = {f"img_{r}_{c}.jpg": (30.0 * c, 30.0 * r, 50.0 * ((r * 7 + c * 3) % 5)) for r in range(4) for c in range(5)}
    names = sorted(enu) + ["no_gps.jpg"]
    lla = pycolmap.GPSTransform().enu_to_ellipsoid(np.array([enu[n] for n in sorted(enu)]), *ORIGIN)
    positions = {n: tuple(p) for n, p in zip(sorted(enu), lla)}
    pairs = spatial.main(names, positions, num_neighbors=4, max_distance=35.0)
    got = {tuple(sorted(p)) for p in pairs}
    want = {tuple(sorted((a, b))) for a in enu for b in enu
            if a < b and np.hypot(enu[a][0] - enu[b][0], enu[a][1] - enu[b][1]) < 31}
    assert got == want and len(pairs) == len(got)  # grid neighbours only, each pair once
    assert not any("no_gps.jpg" in p for p in pairs)
    assert spatial.main(names, {}, num_neighbors=4) == []
    far = spatial.main(names, positions, num_neighbors=4, max_distance=10.0)
    assert far == []


def test_spatial_pairs_in_a_run(gps_scene, tmp_path):
    images, _, _ = gps_scene
    out = tmp_path / "out"
    summary = reconstruct(images, out, {"features": "sift", "camera_mode": "single", "pairs": "spatial",
                                        "num_neighbors": 3, "spatial_max_distance": 1000.0},
                          progress=False, report=False)
    assert summary["num_pairs"] <= 8 * 3 and summary["num_images_registered"] == 8
    assert summary["georeference"]["georeferenced"]


def test_an_extended_model_keeps_its_georeferenced_frame(gps_scene, tmp_path):
    images, enu, gps = gps_scene
    some = tmp_path / "images"
    some.mkdir()
    names = sorted(gps)
    for n in names[:6]:
        shutil.copy2(images / n, some / n)
    conf = {"features": "sift", "camera_mode": "single"}
    first = reconstruct(some, tmp_path / "out", conf, progress=False, report=False)
    assert first["georeference"]["georeferenced"]
    before = pycolmap.Reconstruction(str(tmp_path / "out" / "sparse" / "0"))
    for n in names[6:]:
        shutil.copy2(images / n, some / n)
    s = reconstruct(some, tmp_path / "out", {**conf, "extend": True}, progress=False, report=False)
    assert s["extended"] == 6 and s["num_images_registered"] == 8
    assert not s["georeference"]["georeferenced"] and s["georeference"]["kept_frame"]
    assert "Not georeferenced" not in format_summary(s)
    assert dict(facts(s))["coordinates"].startswith("the earlier model's")
    after = pycolmap.Reconstruction(str(tmp_path / "out" / "sparse" / "0"))
    by_name = {im.name: im for im in after.images.values()}
    for i in before.reg_image_ids():  # in ENU metres before, exactly the same poses after
        im = before.images[i]
        np.testing.assert_allclose(by_name[im.name].cam_from_world().matrix(), im.cam_from_world().matrix(),
                                   atol=1e-9)
