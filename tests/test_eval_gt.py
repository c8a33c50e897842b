"""Ground-truth loaders (cd_sfm.evaluation.gt): each form written from known cameras the way its own tools write it,
read back and checked end to end by projection (pose, camera axes, resize scale, pixel convention, distortion); then
the real scenes of ../shared/data/more checked against their images (epipolar fit of SIFT matches)."""

import json
import logging
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from cd_sfm.evaluation import gt as G
from cd_sfm.io import CdSfmError

pycolmap = pytest.importorskip("pycolmap")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ORIG = (800, 600)  # source image size
STORED = (400, 300)  # stored (resized) image size


def _rot(axis, deg):
    a = np.radians(deg)
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    Kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(a) * Kx + (1 - np.cos(a)) * Kx @ Kx


def _quat(R):
    """(w, x, y, z) of a rotation matrix, through pycolmap (xyzw)."""
    x, y, z, w = np.asarray(pycolmap.Rotation3d(R).quat)
    return np.array([w, x, y, z])


def _cameras(n=4, seed=0):
    """n world-to-camera poses (OpenCV axes) on an arc, looking at the origin from ~5 units."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        R = _rot([0.1, 1, 0.05], -20 + 12 * i) @ _rot([1, 0, 0], rng.uniform(-5, 5))
        C = -R.T @ np.array([0, 0, 5.0]) + rng.normal(0, 0.1, 3)
        out.append((R, -R @ C))
    return out


def _scene(tmp_path, n=4, names=None, stored=STORED, orig=ORIG):
    """Scene folder with stored images (blank JPEGs of the stored size) and RESIZED.tsv."""
    names = names or [f"IMG_{i}.jpg" for i in range(n)]
    (tmp_path / "images").mkdir(parents=True)
    (tmp_path / "gt").mkdir()
    lines = ["name\toriginal\tstored"]
    for i, nm in enumerate(names):
        cv2.imwrite(str(tmp_path / "images" / nm), np.full((stored[1], stored[0], 3), 40 + i, np.uint8))
        lines.append(f"{Path(nm).stem}.PNG\t{orig[0]}x{orig[1]}\t{stored[0]}x{stored[1]}")  # renamed source
    (tmp_path / "RESIZED.tsv").write_text("\n".join(lines) + "\n")
    return names


def _check(views, truth, world=(np.eye(3), np.zeros(3), 1.0)):
    """Points seen by the true camera (its own model and pixel frame, COLMAP convention), resized to the stored image
    (OpenCV convention), undistorted by the view: they must be the pinhole projections with the view's K, R, t.
    ``world``: (Rw, tw, s) the similarity the format applied to the world (x' = s Rw x + tw)."""
    rng = np.random.default_rng(1)
    X = rng.uniform(-1, 1, (200, 3))
    Rw, tw, sw = world
    assert set(views) == set(truth)
    for name, (cam, R, t) in truth.items():
        v = views[name]
        assert v.size == STORED and v.name == name
        Xc = X @ R.T + t
        uv = np.asarray(cam.img_from_cam(Xc), float)[:, :2]  # COLMAP pixel frame of the true camera
        ok = (uv > 0).all(1) & (uv < [cam.width, cam.height]).all(1)
        assert ok.sum() > 100
        stored = uv[ok] * (np.asarray(STORED) / [cam.width, cam.height]) - 0.5
        Xw = (sw * X[ok] @ Rw.T + tw) @ v.R.T + v.t  # the same points in the format's world and the view's camera
        p = Xw @ v.K.T
        np.testing.assert_allclose(v.undistort(stored), p[:, :2] / p[:, 2:], atol=2e-4, err_msg=name)


def test_colmap_text_and_binary(tmp_path):
    names = _scene(tmp_path)
    cam = pycolmap.Camera(model="SIMPLE_RADIAL", width=800, height=600, params=[700.0, 410.0, 290.0, -0.08])
    poses = _cameras()
    # text: as COLMAP writes cameras.txt / images.txt (names as in the source: .JPG)
    (tmp_path / "gt" / "cameras.txt").write_text("# cameras\n1 SIMPLE_RADIAL 800 600 700 410 290 -0.08\n")
    rows = ["# images"]
    for i, (R, t) in enumerate(poses):
        q = _quat(R)
        vals = " ".join(repr(float(x)) for x in [*q, *t])
        rows += [f"{i + 1} {vals} 1 {Path(names[i]).stem}.JPG", ""]
    (tmp_path / "gt" / "images.txt").write_text("\n".join(rows) + "\n")
    assert G.detect_format(tmp_path)[0] == "colmap"
    truth = {n: (cam, R, t) for n, (R, t) in zip(names, poses)}
    _check(G.load_gt(tmp_path), truth)
    # binary sparse_0_*.bin (pycolmap writes the model; the loader reads the prefixed files of gt/)
    rec = G.read_colmap(tmp_path / "gt", "")
    model = tmp_path / "model"
    model.mkdir()
    rec.write_binary(str(model))
    for p in model.iterdir():
        if p.stem in ("cameras", "images"):
            p.rename(tmp_path / "gt" / f"sparse_0_{p.name}")
    for p in ("cameras.txt", "images.txt"):
        (tmp_path / "gt" / p).unlink()
    assert G.detect_format(tmp_path) == ("colmap", (tmp_path / "gt", "sparse_0_"))
    _check(G.load_gt(tmp_path), truth)


def _write_cameras_bin(path, model_id, w, h, params):
    path.write_bytes(struct.pack("<QiiQQ", 1, 1, model_id, w, h) + struct.pack(f"<{len(params)}d", *params))


def test_llff_poses_bounds(tmp_path):
    names = _scene(tmp_path, 3)
    poses = _cameras(5)
    source = ["IMG_0.JPG", "IMG_1.JPG", "IMG_1b.JPG", "IMG_2.JPG", "IMG_3.JPG"]  # two source images not stored
    rows = []
    for R, t in poses:  # LLFF imgs2poses: c2w [R | C] in COLMAP axes, hwf appended, columns -> (down, right, back)
        p = np.concatenate([np.c_[R.T, -R.T @ t], [[600], [800], [700.0]]], 1)
        p = np.concatenate([p[:, 1:2], p[:, 0:1], -p[:, 2:3], p[:, 3:4], p[:, 4:5]], 1)
        rows.append(np.r_[p.ravel(), 0.5, 20.0])
    np.save(tmp_path / "gt" / "poses_bounds.npy", np.array(rows))
    (tmp_path / "gt" / "all_image_names_in_source_sorted.txt").write_text("\n".join(source) + "\n")
    pin = pycolmap.Camera(model="PINHOLE", width=800, height=600, params=[700.0, 700.0, 400.0, 300.0])
    by_name = dict(zip(source, poses))
    truth = {n: (pin, *by_name[f"{Path(n).stem}.JPG"]) for n in names}
    _check(G.load_gt(tmp_path), truth)
    # with the COLMAP camera of the capture (SIMPLE_RADIAL, model id 2): its intrinsics and distortion are used
    _write_cameras_bin(tmp_path / "gt" / "sparse_0_cameras.bin", 2, 800, 600, [700.0, 400.0, 300.0, 0.05])
    rad = pycolmap.Camera(model="SIMPLE_RADIAL", width=800, height=600, params=[700.0, 400.0, 300.0, 0.05])
    views = G.load_gt(tmp_path)
    _check(views, {n: (rad, R, t) for n, (_, R, t) in truth.items()})
    # rows that cannot be assigned: one line fewer in the names file
    (tmp_path / "gt" / "all_image_names_in_source_sorted.txt").write_text("\n".join(source[:-1]) + "\n")
    with pytest.raises(CdSfmError, match="5 rows but 4 image names"):
        G.load_gt(tmp_path)


def test_transforms_json_opengl_scaled_intrinsics(tmp_path):
    """nerfstudio / instant-ngp: OpenGL camera axes, a world changed by colmap2nerf-style transforms, OPENCV
    distortion, intrinsics given for 4x the stored size (as in vincent_giza_rooftop)."""
    names = _scene(tmp_path, 4, names=[f"frame_{i:05d}.jpg" for i in range(4)])
    poses = _cameras()
    Rw, tw, sw = _rot([0.3, 0.2, 1], 70), np.array([0.5, -1.0, 2.0]), 0.37  # world x' = sw Rw x + tw
    frames = []
    for i, (R, t) in enumerate(poses):
        c2w = np.eye(4)
        c2w[:3, :3], c2w[:3, 3] = R.T, -R.T @ t
        c2w[:3, 1:3] *= -1  # OpenCV -> OpenGL camera axes
        c2w[:3, :3] = Rw @ c2w[:3, :3]
        c2w[:3, 3] = sw * Rw @ c2w[:3, 3] + tw
        frames.append({"file_path": f"images/frame_{i:05d}.png", "transform_matrix": c2w.tolist()})
    k = dict(k1=0.05, k2=-0.02, p1=0.001, p2=-0.002)
    intr = dict(fl_x=1400.0, fl_y=1395.0, cx=810.0, cy=590.0, w=1600, h=1200, camera_model="OPENCV", **k)
    (tmp_path / "gt" / "transforms.json").write_text(json.dumps({**intr, "frames": frames}))
    cam = pycolmap.Camera(model="OPENCV", width=1600, height=1200,
                          params=[1400.0, 1395.0, 810.0, 590.0, k["k1"], k["k2"], k["p1"], k["p2"]])
    truth = {n: (cam, R, t) for n, (R, t) in zip(names, poses)}
    views = G.load_gt(tmp_path)
    assert G.detect_format(tmp_path)[0] == "nerf"
    _check(views, truth, (Rw, tw, sw))
    assert np.allclose(views[names[0]].K[:2, 2], [810 / 4 - 0.5, 590 / 4 - 0.5])  # pixel centres done right
    # per-frame intrinsics override the global ones
    frames[1] = {**frames[1], "fl_x": 1000.0, "fl_y": 1000.0, "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0}
    (tmp_path / "gt" / "transforms.json").write_text(json.dumps({**intr, "frames": frames}))
    views = G.load_gt(tmp_path)
    assert views[names[1]].K[0, 0] == pytest.approx(250.0) and views[names[1]].camera.model.name == "PINHOLE"
    assert views[names[0]].K[0, 0] == pytest.approx(350.0)


def _kapture(tmp_path, names, poses, swapped=False):
    (tmp_path / "gt" / "x_sensors.txt").write_text(
        "# kapture format: 1.1\n# sensor_device_id, name, sensor_type, [sensor_params]+\n"
        "cam, phone, camera, FULL_OPENCV, 800, 600, 710, 705, 402, 296, 0.1, -0.05, 0.001, 0.002, 0.01, 0, 0, 0\n")
    rec = ["# kapture format: 1.1", "# timestamp, device_id, image_path"]
    tra = ["# kapture format: 1.1", "# timestamp, device_id, qw, qx, qy, qz, tx, ty, tz"]
    for i, (R, t) in enumerate(poses):
        rec.append(f"{100 + i}, cam, map/{Path(names[i]).stem}.jpg")
        vals = [*t, *_quat(R)] if swapped else [*_quat(R), *t]
        tra.append(f"{100 + i}, cam, " + ", ".join(repr(float(x)) for x in vals))
    (tmp_path / "gt" / "x_records_camera.txt").write_text("\n".join(rec) + "\n")
    (tmp_path / "gt" / "x_trajectories.txt").write_text("\n".join(tra) + "\n")


def test_kapture(tmp_path, caplog):
    names = _scene(tmp_path)
    poses = _cameras()
    cam = pycolmap.Camera(model="FULL_OPENCV", width=800, height=600,
                          params=[710, 705, 402, 296, 0.1, -0.05, 0.001, 0.002, 0.01, 0, 0, 0])
    truth = {n: (cam, R, t) for n, (R, t) in zip(names, poses)}
    _kapture(tmp_path, names, poses)
    assert G.detect_format(tmp_path)[0] == "kapture"
    _check(G.load_gt(tmp_path), truth)
    # cour_carree_markers' order (t before q under the standard header): read that way, with a warning
    _kapture(tmp_path, names, poses, swapped=True)
    with caplog.at_level(logging.WARNING, logger="cd_sfm"):
        _check(G.load_gt(tmp_path), truth)
    assert "tx, ty, tz, qw, qx, qy, qz" in caplog.text


def test_cotr_cameras(tmp_path):
    names = _scene(tmp_path, 2, names=["img_0.jpg", "img_1.jpg"])
    poses = _cameras(2)
    for i, (R, t) in enumerate(poses):
        c2w = np.eye(4)
        c2w[:3, :3], c2w[:3, 3] = R.T, -R.T @ t
        K = [[720.0, 0, 400.0], [0, 720.0, 300.0], [0, 0, 1]]
        (tmp_path / "gt" / f"camera_{i}.json").write_text(json.dumps({"intrinsic": K, "c2w": c2w.tolist()}))
    cam = pycolmap.Camera(model="PINHOLE", width=800, height=600, params=[720.0, 720.0, 400.0, 300.0])
    _check(G.load_gt(tmp_path), {n: (cam, R, t) for n, (R, t) in zip(names, poses)})
    (tmp_path / "RESIZED.tsv").unlink()  # no image size any more
    with pytest.raises(CdSfmError, match="RESIZED.tsv"):
        G.load_gt(tmp_path)


def test_bad_input(tmp_path):
    names = _scene(tmp_path / "a", 2)
    poses = _cameras(2)
    _kapture(tmp_path / "a", names, poses)
    # a stored image rotated against its ground truth (aspect ratio differs)
    cv2.imwrite(str(tmp_path / "a" / "images" / names[0]), np.zeros((400, 300, 3), np.uint8))
    (tmp_path / "a" / "RESIZED.tsv").unlink()
    with pytest.raises(CdSfmError, match="aspect ratios differ"):
        G.load_gt(tmp_path / "a")
    # an EXIF orientation tag: the frame of the ground truth is ambiguous
    from PIL import Image

    img = Image.fromarray(np.zeros((300, 400, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "a" / "images" / names[0], exif=exif.tobytes())
    with pytest.raises(CdSfmError, match="EXIF orientation 6"):
        G.load_gt(tmp_path / "a")
    (tmp_path / "b" / "images").mkdir(parents=True)
    with pytest.raises(CdSfmError, match="no ground truth"):
        G.load_gt(tmp_path / "b")
    assert not G.has_gt(tmp_path / "b")


def test_to_reconstruction_roundtrip(tmp_path):
    names = _scene(tmp_path)
    _kapture(tmp_path, names, _cameras())
    views = G.load_gt(tmp_path)
    rec = G.to_reconstruction(views)
    for im in rec.images.values():
        v = views[im.name]
        assert np.allclose(im.cam_from_world().rotation.matrix(), v.R) and np.allclose(im.projection_center(), v.center)
        K = np.array(rec.cameras[im.camera_id].calibration_matrix())
        assert np.allclose(K[:2, 2] - 0.5, v.K[:2, 2])


# --------------------------------------------------------------------------------------------------------------------
# the real scenes


def _shared(name):
    scene = SHARED / name
    if not (scene / "images").is_dir():
        pytest.skip(f"../shared/data/{name} absent")
    return scene


# median Sampson error (px of the stored images) of SIFT RANSAC inliers on the 2 closest pairs, measured values in
# the comments (4 closest pairs); the bound leaves room for other pairs / keypoint counts
POSED = {"more/vork_mother_child": "llff", "more/nerfdb_beer_can": "colmap", "more/fruitnerf_apple_banana": "nerf",
         "more/arcolmap_desk": "colmap", "more/vincent_giza_rooftop": "nerf", "more/cotr_admiralty_arch": "cotr"}


@pytest.mark.shared
@pytest.mark.parametrize("name", sorted(POSED))
def test_shared_epipolar_fit(name):
    scene = _shared(name)
    assert G.detect_format(scene)[0] == POSED[name]
    views = G.load_gt(scene)
    assert len(views) == len(list((scene / "images").iterdir()))  # every stored image has its ground truth
    res = G.epipolar_fit(scene, views, max_pairs=2, max_keypoints=2048)
    assert res["pooled_pairs"] >= 1 and res["median_px"] < 1.5, res


@pytest.mark.shared
def test_shared_unusable_gt_does_not_fit():
    """The split's gt_unusable scenes: their poses really do not fit (so leaving them out is right)."""
    from cd_sfm.evaluation.scenes import unusable_gt

    for name in unusable_gt():
        scene = _shared(name)
        res = G.epipolar_fit(scene, max_pairs=2, max_keypoints=2048)
        assert res["median_px"] > 20, (name, res)


@pytest.mark.shared
def test_shared_nerfdb_llff_equals_colmap():
    """nerfdb_beer_can has both: LLFF rows (sorted COLMAP names) give the COLMAP poses exactly."""
    scene = _shared("more/nerfdb_beer_can")
    a, b = G.load_gt(scene, "colmap"), G.load_gt(scene, "llff")
    assert list(a) == list(b) and len(a) == 24
    for n in a:
        assert np.allclose(a[n].R, b[n].R, atol=1e-9) and np.allclose(a[n].center, b[n].center, atol=1e-9)
    # COLMAP: 720x1280 cameras, stored 576x1024 -> f * 0.8, principal point (360, 640) -> 288 - 0.5, 512 - 0.5
    assert np.allclose(a["0000.jpg"].K[:2, 2], [287.5, 511.5]) and a["0000.jpg"].size == (576, 1024)


@pytest.mark.shared
def test_shared_arcolmap_frame():
    """arcolmap_desk: the stored JPEGs carry no EXIF orientation and hold the raw sensor frame (landscape, content
    sideways); the COLMAP model (4032x3024) refers to that same frame: its 2D keypoints land on our SIFT keypoints
    of the stored image (scaled), and not after a 180 degree turn."""
    from scipy.spatial import cKDTree

    from cd_sfm.features.patches import SiftDetectorConf, detect_sift
    from cd_sfm.images import image_info, read_image

    scene = _shared("more/arcolmap_desk")
    rec = G.read_colmap(scene / "gt", "")
    cam = next(iter(rec.cameras.values()))
    assert (cam.width, cam.height) == (4032, 3024)
    im = rec.find_image_with_name("image1.JPG")
    info = image_info(scene / "images" / "image1.jpg")
    assert info.orientation == 1 and (info.width, info.height) == (1024, 768)
    P = np.array([p.xy for p in im.points2D])  # COLMAP convention, raw 4032x3024 frame
    gray, _ = read_image(scene / "images" / "image1.jpg", grayscale=True)
    tree = cKDTree(detect_sift(gray, SiftDetectorConf(max_keypoints=8192))["keypoints"].astype(float))
    s = 1024 / 4032
    same = (tree.query(P * s - 0.5)[0] < 0.5).mean()
    turned = (tree.query((np.array([4032, 3024]) - P) * s - 0.5)[0] < 0.5).mean()
    assert same > 0.1 and turned < 0.02, (same, turned)


def test_default_scenes_from_split(tmp_path, caplog):
    """eval pairs: EVAL scenes with readable, usable ground truth; eval sfm: every multi-view EVAL scene."""
    from cd_sfm.evaluation import scenes as S

    data = tmp_path / "data"
    for name, posed in (("more/posed", True), ("more/bad_gt", True), ("noposes", False)):
        names = _scene(data / name, 2)
        if posed:
            _kapture(data / name, names, _cameras(2))
    (data / "hp" / "v_seq").mkdir(parents=True)  # HPatches-like: no images/
    split = tmp_path / "split.yaml"
    split.write_text("eval:\n  - hp\n  - more/posed\n  - more/bad_gt\n  - noposes\n  - more/absent\n"
                     "gt_unusable:\n  more/bad_gt: poses do not fit\n")
    with caplog.at_level(logging.WARNING, logger="cd_sfm"):
        assert S.pose_scenes(data, split) == [data / "more/posed"]
    assert "more/absent not found" in caplog.text
    assert S.sfm_scenes(data, split) == [data / "more/posed", data / "more/bad_gt", data / "noposes"]
    assert S.unusable_gt(split) == {"more/bad_gt": "poses do not fit"}
    with pytest.raises(CdSfmError, match="none of the EVAL scenes"):
        S.pose_scenes(tmp_path / "empty", split)
