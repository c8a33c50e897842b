"""Exports read back with each consumer's conventions: the COLMAP 3.8 database by the real ``colmap`` 3.8 binary
(matcher and mapper; skipped when it is not installed), the undistorted / gaussian-splatting / openmvs layouts by
pycolmap (and COLMAP 3.8), nerfstudio's ``transforms.json`` by reprojecting the model's points with its matrices."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pycolmap
import pytest

from cd_sfm import cli
from cd_sfm.export import colmap3, export
from cd_sfm.export.nerfstudio import APPLIED_TRANSFORM
from cd_sfm.io import CdSfmError
from cd_sfm.report import read_ply_points

COLMAP = shutil.which("colmap")
needs_colmap = pytest.mark.skipif(COLMAP is None, reason="colmap binary not installed (apt-get install -y colmap)")


def colmap(*args, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    p = subprocess.run([COLMAP, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p


def colmap_major() -> int | None:
    p = subprocess.run([COLMAP, "help"], capture_output=True, text=True, env={**os.environ,
                                                                                "QT_QPA_PLATFORM": "offscreen"})
    for word in (p.stdout + p.stderr).split():
        if word[:1].isdigit() and "." in word:
            return int(word.split(".")[0])
    return None


def table_columns(path) -> dict[str, list[str]]:
    con = sqlite3.connect(path)
    try:
        names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {n: [r[1] for r in con.execute(f"PRAGMA table_info({n})")] for n in names if n != "sqlite_sequence"}
    finally:
        con.close()


def rows(path, query):
    con = sqlite3.connect(path)
    try:
        return con.execute(query).fetchall()
    finally:
        con.close()


# --------------------------------------------------------------------------------------------------------------------
# COLMAP 3.x database


@pytest.fixture(scope="module")
def colmap3_db(sift_run, tmp_path_factory):
    _, out, _ = sift_run
    st = export("colmap3", out, tmp_path_factory.mktemp("c3") / "colmap3")
    return out / "database.db", Path(st["output"]) / "database.db", st


def test_colmap3_schema_and_rows(colmap3_db):
    src, dst, st = colmap3_db
    cols = table_columns(dst)
    assert set(cols) == {"cameras", "images", "keypoints", "descriptors", "matches", "two_view_geometries"}
    assert cols["images"] == ["image_id", "name", "camera_id", "prior_qw", "prior_qx", "prior_qy", "prior_qz",
                              "prior_tx", "prior_ty", "prior_tz"]
    assert cols["descriptors"] == ["image_id", "rows", "cols", "data"]
    assert cols["two_view_geometries"] == ["pair_id", "rows", "cols", "data", "config", "F", "E", "H", "qvec", "tvec"]
    assert rows(dst, "PRAGMA user_version") == [(3800,)]
    # every row and blob of the source is there, ids unchanged
    for table, q in (("cameras", "camera_id, model, width, height, params, prior_focal_length"),
                     ("images", "image_id, name, camera_id"), ("keypoints", "*"),
                     ("descriptors", "image_id, rows, cols, data"), ("matches", "*"),
                     ("two_view_geometries", "pair_id, rows, cols, data, config, F, E, H, qvec, tvec")):
        order = "ORDER BY 1"
        assert rows(dst, f"SELECT {q} FROM {table} {order}") == rows(src, f"SELECT {q} FROM {table} {order}"), table
    assert st["num_images"] == 6 and st["num_matched_pairs"] == 15 and st["num_two_view_geometries"] == 15
    assert rows(dst, "SELECT count(*) FROM images WHERE prior_qw IS NULL AND prior_tx IS NULL") == [(6,)]


@needs_colmap
def test_colmap3_database_runs_colmaps_mapper_and_matcher(colmap3_db, sift_run, tmp_path):
    """COLMAP's own mapper maps the exported database; its matcher matches our uint8 descriptors again."""
    scene, out, _ = sift_run
    _, dst, _ = colmap3_db
    db = tmp_path / "database.db"
    shutil.copy(dst, db)
    (tmp_path / "sparse").mkdir()
    colmap("mapper", "--database_path", db, "--image_path", scene.image_dir, "--output_path", tmp_path / "sparse")
    rec = pycolmap.Reconstruction(str(tmp_path / "sparse" / "0"))
    assert rec.num_reg_images() == 6 and rec.num_points3D() > 200
    # the matcher, on a copy without matches: it computes them from the descriptors
    con = sqlite3.connect(db)
    con.execute("DELETE FROM matches")
    con.execute("DELETE FROM two_view_geometries")
    con.commit()
    con.close()
    colmap("exhaustive_matcher", "--database_path", db, "--SiftMatching.use_gpu", "0")
    verified = rows(db, "SELECT count(*), sum(rows) FROM two_view_geometries WHERE rows >= 15")[0]
    assert verified[0] == 15 and verified[1] > 15 * 100
    # and COLMAP 3.x reads the model cd-sfm wrote
    p = colmap("model_analyzer", "--path", out / "sparse" / "0")
    assert "Registered images: 6" in p.stdout + p.stderr


@needs_colmap
def test_the_original_database_is_what_colmap3_cannot_open(sift_run, tmp_path):
    """Why the export exists: COLMAP 3.x fails on pycolmap 4.2's database (skipped for a COLMAP >= 4 binary)."""
    if (colmap_major() or 3) >= 4:
        pytest.skip("colmap >= 4 reads its own database")
    _, out, _ = sift_run
    db = tmp_path / "database.db"
    shutil.copy(out / "database.db", db)
    p = subprocess.run([COLMAP, "exhaustive_matcher", "--database_path", db, "--SiftMatching.use_gpu", "0"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    assert p.returncode != 0


def test_colmap3_refuses_what_colmap3_cannot_hold(tmp_path):
    db = pycolmap.Database.open(str(tmp_path / "new.db"))
    db.write_camera(pycolmap.Camera.create_from_model_name(1, "SIMPLE_DIVISION", 100.0, 64, 48), use_camera_id=True)
    db.close()
    with pytest.raises(CdSfmError, match="model id 12, which COLMAP 3.x does not know"):
        colmap3.convert(tmp_path / "new.db", tmp_path / "out" / "database.db")
    assert not (tmp_path / "out" / "database.db").exists()
    (tmp_path / "junk.db").write_bytes(b"not a database at all" * 100)
    with pytest.raises(CdSfmError, match="junk.db: not a COLMAP database"):
        colmap3.convert(tmp_path / "junk.db", tmp_path / "out" / "database.db")
    with pytest.raises(CdSfmError, match="database not found"):
        colmap3.convert(tmp_path / "none.db", tmp_path / "out" / "database.db")


def test_colmap3_pose_priors_and_rig_config(tmp_path):
    """4.x position priors land in prior_tx..tz; CALIBRATED_RIG two-view geometries become CALIBRATED."""
    path = tmp_path / "src.db"
    db = pycolmap.Database.open(str(path))
    db.write_camera(pycolmap.Camera.create_from_model_name(1, "PINHOLE", 100.0, 64, 48), use_camera_id=True)
    for i in (1, 2):
        db.write_image(pycolmap.Image(name=f"{i}.png", camera_id=1, image_id=i), use_image_id=True)
    prior = pycolmap.PosePrior()
    prior.position = np.array([1.5, -2.0, 3.25])
    prior.coordinate_system = pycolmap.PosePriorCoordinateSystem.CARTESIAN
    prior.corr_data_id = pycolmap.data_t(pycolmap.sensor_t(pycolmap.SensorType.CAMERA, 1), 2)
    db.write_pose_prior(prior)
    g = pycolmap.TwoViewGeometry()
    g.config = pycolmap.TwoViewGeometryConfiguration.CALIBRATED_RIG
    g.inlier_matches = np.array([[0, 0], [1, 1]], np.uint32)
    db.write_two_view_geometry(1, 2, g)
    db.close()
    st = colmap3.convert(path, tmp_path / "dst.db")
    assert st["num_pose_priors"] == 1
    assert rows(tmp_path / "dst.db", "SELECT image_id, prior_tx, prior_ty, prior_tz FROM images ORDER BY 1") == \
        [(1, None, None, None), (2, 1.5, -2.0, 3.25)]
    assert rows(tmp_path / "dst.db", "SELECT config FROM two_view_geometries") == [(colmap3.CALIBRATED,)]


# --------------------------------------------------------------------------------------------------------------------
# undistorted layouts


@pytest.fixture(scope="module")
def layouts(sift_run):
    _, out, _ = sift_run
    return {k: export(k, out) for k in ("undistorted", "gaussian-splatting", "openmvs", "nerfstudio")}


def check_undistorted_model(model_dir, image_dir, names):
    rec = pycolmap.Reconstruction(str(model_dir))
    assert rec.num_reg_images() == 6 and rec.num_points3D() > 200
    assert sorted(rec.images[i].name for i in rec.reg_image_ids()) == names
    for cam in rec.cameras.values():
        assert cam.model.name == "PINHOLE"
    for i in rec.reg_image_ids():
        im = rec.images[i]
        img = cv2.imread(str(image_dir / im.name))
        cam = rec.cameras[im.camera_id]
        assert img is not None and img.shape[:2] == (cam.height, cam.width)
    return rec


def test_undistorted_layouts(layouts, sift_run):
    scene, out, _ = sift_run
    d = out / "export"
    assert layouts["undistorted"]["output"] == str(d / "undistorted")
    und = check_undistorted_model(d / "undistorted" / "sparse", d / "undistorted" / "images", scene.names)
    assert (d / "undistorted" / "stereo" / "patch-match.cfg").exists()
    assert (d / "undistorted" / "run-colmap-geometric.sh").exists()
    # the 2D points moved with the images: reprojection error stays that of the distorted model
    orig = pycolmap.Reconstruction(str(out / "sparse" / "0"))
    assert und.compute_mean_reprojection_error() == pytest.approx(orig.compute_mean_reprojection_error(), abs=0.05)
    # gaussian-splatting: images/ + sparse/0 as its convert.py leaves them, no MVS extras
    gs = d / "gaussian-splatting"
    assert sorted(p.name for p in gs.iterdir()) == ["images", "sparse"]
    assert {"cameras.bin", "images.bin", "points3D.bin"} <= {p.name for p in (gs / "sparse" / "0").iterdir()}
    check_undistorted_model(gs / "sparse" / "0", gs / "images", scene.names)
    # openmvs: the text model InterfaceCOLMAP reads, in sparse/ itself
    mvs = d / "openmvs" / "sparse"
    assert {"cameras.txt", "images.txt", "points3D.txt"} <= {p.name for p in mvs.iterdir()}
    assert not list(mvs.glob("*.bin"))
    check_undistorted_model(mvs, d / "openmvs" / "images", scene.names)
    cam_lines = [ln.split() for ln in (mvs / "cameras.txt").read_text().splitlines() if not ln.startswith("#")]
    assert all(ln[1] == "PINHOLE" and len(ln) == 8 for ln in cam_lines)  # ID MODEL W H fx fy cx cy
    assert not list(d.glob(".*.tmp"))  # staging folders are gone


@needs_colmap
def test_undistorted_layouts_open_in_colmap3(layouts, sift_run):
    _, out, _ = sift_run
    d = out / "export"
    for model in (d / "undistorted" / "sparse", d / "gaussian-splatting" / "sparse" / "0", d / "openmvs" / "sparse"):
        p = colmap("model_analyzer", "--path", model)
        assert "Registered images: 6" in p.stdout + p.stderr, model


def project_nerfstudio(frame: dict, intr: dict, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of world points ``X`` (COLMAP world) with nerfstudio's conventions; returns (uv, depth)."""
    A = np.array(json.loads(json.dumps(APPLIED_TRANSFORM.tolist())))
    Xn = X @ A[:, :3].T + A[:, 3]
    c2w = np.array(frame["transform_matrix"])
    Xc = (Xn - c2w[:3, 3]) @ c2w[:3, :3]  # world -> camera (OpenGL axes: x right, y up, z backwards)
    depth = -Xc[:, 2]
    u = intr["fl_x"] * Xc[:, 0] / depth + intr["cx"]
    v = -intr["fl_y"] * Xc[:, 1] / depth + intr["cy"]
    return np.column_stack([u, v]), depth


def test_nerfstudio_transforms_reproject_the_keypoints(layouts, sift_run):
    """Each model point seen in an image projects through transforms.json (applied_transform, OpenGL
    camera-to-world, fl_x / fl_y / cx / cy) onto the keypoint it was triangulated from, in the undistorted image."""
    scene, out, _ = sift_run
    ns = out / "export" / "nerfstudio"
    data = json.loads((ns / "transforms.json").read_text())
    assert data["camera_model"] == "OPENCV" and data["k1"] == data["k2"] == data["p1"] == data["p2"] == 0.0
    assert np.allclose(data["applied_transform"], APPLIED_TRANSFORM)
    assert len(data["frames"]) == 6
    orig = pycolmap.Reconstruction(str(out / "sparse" / "0"))
    by_name = {orig.images[i].name: orig.images[i] for i in orig.reg_image_ids()}
    errors, behind_if_opencv = [], []
    for frame in data["frames"]:
        assert frame["file_path"].startswith("images/")
        img = cv2.imread(str(ns / frame["file_path"]))
        assert img.shape[:2] == (data["h"], data["w"])
        im = by_name[frame["file_path"][len("images/"):]]
        cam = orig.cameras[im.camera_id]
        obs = [(p.xy, orig.points3D[p.point3D_id].xyz) for p in im.points2D if p.has_point3D()]
        xy = np.array([o[0] for o in obs])
        X = np.array([o[1] for o in obs])
        # the observed keypoints, undistorted into the exported pinhole camera
        nrm = cam.cam_from_img(xy)
        want = np.column_stack([data["fl_x"] * nrm[:, 0] + data["cx"], data["fl_y"] * nrm[:, 1] + data["cy"]])
        uv, depth = project_nerfstudio(frame, data, X)
        assert (depth > 0).all()
        errors.append(np.linalg.norm(uv - want, axis=1))
        # the same matrices read with OpenCV camera axes put the points behind the camera: the convention matters
        c2w = np.array(frame["transform_matrix"])
        behind_if_opencv.append(np.mean(((X @ APPLIED_TRANSFORM[:, :3].T - c2w[:3, 3]) @ c2w[:3, :3])[:, 2] < 0))
    err = np.concatenate(errors)
    assert np.median(err) < 1.0 and np.percentile(err, 95) < 4.0
    assert min(behind_if_opencv) > 0.99
    pts = read_ply_points(ns / "sparse_pc.ply")
    assert pts is not None and len(pts[0]) == orig.num_points3D()
    X = np.array([p.xyz for p in orig.points3D.values()])
    assert np.allclose(np.sort(pts[0], axis=0), np.sort(X @ APPLIED_TRANSFORM[:, :3].T, axis=0), atol=1e-4)


def test_export_cli(sift_run, tmp_path, capsys):
    _, out, _ = sift_run
    target = tmp_path / "gs"
    assert cli.main(["export", str(out), "--to", "3dgs", "--output", str(target), "--max-image-size", "320"]) == 0
    printed = capsys.readouterr().out
    assert f"gaussian-splatting: {target}" in printed and "next: python train.py -s" in printed
    rec = pycolmap.Reconstruction(str(target / "sparse" / "0"))
    assert max(max(c.width, c.height) for c in rec.cameras.values()) <= 320
    img = cv2.imread(str(next((target / "images").iterdir())))
    assert max(img.shape[:2]) <= 320
    assert cli.main(["export", str(out), "--to", "ply"]) == 2
    assert "export 'ply': expected one of colmap3" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path / "none"), "--to", "nerfstudio"]) == 2
    assert "output folder not found" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["export", str(empty), "--to", "openmvs"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "summary.json: not found" in err


def test_an_image_colmap_cannot_read_is_named_not_left_out(sift_run, tmp_path, capsys):
    # COLMAP's undistorter logs and skips an image it cannot decode; the export must not end with a folder short of it
    scene, out, _ = sift_run
    images = tmp_path / "images"
    shutil.copytree(scene.image_dir, images)
    rec = pycolmap.Reconstruction(str(out / "sparse" / "0"))
    broken = sorted(rec.images[i].name for i in rec.reg_image_ids())[1]
    (images / broken).write_bytes(b"not an image any more")
    code = cli.main(["export", str(out), "--to", "undistorted", "--images", str(images), "--output",
                     str(tmp_path / "und")])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1
    assert f"cd-sfm: error: {images / broken}: COLMAP's undistorter could not read this image (1 of {rec.num_reg_images()}" in errors[0]


def test_masks_follow_the_undistorted_images(sift_run, tmp_path, capsys):
    """A run's feature masks go into the undistorted and nerfstudio exports resampled into the undistorted cameras:
    each model point has the same mask value at its keypoint in the original image and at its moved 2D point in the
    undistorted one; nerfstudio frames name their masks (frames without a mask name none)."""
    scene, out, _ = sift_run
    masks = tmp_path / "masks"
    masks.mkdir()
    m = np.zeros((480, 640), np.uint8)
    cv2.circle(m, (250, 200), 150, 255, -1)  # a disc off the centre: distortion moves its rim
    for name in scene.names[:-1]:  # the last image has no mask
        cv2.imwrite(str(masks / f"{name}.png"), m)
    und = tmp_path / "und"
    st = export("undistorted", out, output=und, mask_dir=masks)
    assert st["num_masks"] == len(scene.names) - 1
    orig = pycolmap.Reconstruction(str(out / "sparse" / "0"))
    rec = pycolmap.Reconstruction(str(und / "sparse"))
    by_name = {orig.images[i].name: orig.images[i] for i in orig.reg_image_ids()}
    same, total = 0, 0
    for i in rec.reg_image_ids():
        im = rec.images[i]
        path = und / "masks" / f"{im.name}.png"
        if im.name == scene.names[-1]:
            assert not path.exists()
            continue
        mu = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        cam = rec.cameras[im.camera_id]
        assert mu.shape == (cam.height, cam.width)
        a = np.array([p.xy for p in by_name[im.name].points2D])  # the same keypoints, in order
        b = np.array([p.xy for p in im.points2D])
        far = np.abs(np.linalg.norm(a - 0.5 - [250, 200], axis=1) - 150) > 1.5  # not on the rim
        inside = (b[:, 0] >= 1) & (b[:, 1] >= 1) & (b[:, 0] < cam.width - 1) & (b[:, 1] < cam.height - 1)
        keep = far & inside
        va = m[(a[keep, 1]).astype(int), (a[keep, 0]).astype(int)]
        vb = mu[(b[keep, 1]).astype(int), (b[keep, 0]).astype(int)]
        same += int((va == vb).sum())
        total += int(keep.sum())
    assert total > 500 and same == total
    # nerfstudio: the masks beside the images, named in their frames
    ns = export("nerfstudio", out, output=tmp_path / "ns", mask_dir=masks)
    assert ns["num_masks"] == len(scene.names) - 1
    frames = json.loads((tmp_path / "ns" / "transforms.json").read_text())["frames"]
    named = {f["file_path"][len("images/"):]: f.get("mask_path") for f in frames}
    assert named[scene.names[-1]] is None
    for name in scene.names[:-1]:
        assert named[name] == f"masks/{name}.png"
        mask = cv2.imread(str(tmp_path / "ns" / named[name]), cv2.IMREAD_GRAYSCALE)
        img = cv2.imread(str(tmp_path / "ns" / "images" / name))
        assert mask.shape == img.shape[:2] and set(np.unique(mask)) == {0, 255}
    # the CLI: the run's own masks by default (config.yaml), a missing folder is a one-line error
    assert cli.main(["export", str(out), "--to", "dense", "--output", str(tmp_path / "d2"), "--masks",
                     str(masks)]) == 0
    printed = capsys.readouterr().out
    assert f"{len(scene.names) - 1} masks" in printed and f"--StereoFusion.mask_path {tmp_path / 'd2'}/masks" in printed
    assert cli.main(["export", str(out), "--to", "dense", "--output", str(tmp_path / "d3"), "--masks",
                     str(tmp_path / "nope")]) == 2
    assert "mask folder not found" in capsys.readouterr().err
