"""Ground-truth cameras of an evaluation scene, whatever form the source gave them in, as :class:`GTView` objects.

A scene folder holds ``images/`` (the stored images) and its ground truth in one of these forms (the first found
wins, in this order):

``colmap``
    a COLMAP model: ``gt_colmap/`` (a model folder), or in ``gt/`` the binary files ``sparse_0_cameras.bin``,
    ``sparse_0_images.bin`` (+ optional ``sparse_0_points3D.bin``) or the text files ``cameras.txt`` + ``images.txt``.
    World-to-camera poses, COLMAP cameras (any model; the pixel frame has its origin at the corner of the first
    pixel, so a pixel centre is at ``i + 0.5``).
``llff``
    ``gt/poses_bounds.npy`` (N x 17) as LLFF's ``imgs2poses`` writes it: per row a 3x5 matrix ``[R | C | hwf]``,
    ``R`` camera-to-world with columns (down, right, backwards), ``C`` the camera centre, ``hwf`` height, width and
    focal length in pixels of the source images, then two depth bounds. Rows follow
    ``gt/all_image_names_in_source_sorted.txt`` when present (it lists every source image, also those absent here),
    else the sorted names of the COLMAP images in ``gt/`` when there are as many, else the sorted stored names when
    there are as many. Intrinsics: the single camera of ``gt/sparse_0_cameras.bin`` when there is one (distortion
    included), else a pinhole camera of focal ``f`` with the principal point at the image centre.
``nerf``
    ``gt/transforms.json`` (instant-ngp / nerfstudio): per frame ``transform_matrix`` camera-to-world with OpenGL camera
    axes (x right, y up, z backwards); intrinsics ``fl_x``/``fl_y`` (or ``camera_angle_x``), ``cx``/``cy``, ``w``/``h``
    and distortion ``k1, k2, p1, p2`` (+ ``k3``; ``k1..k4`` when ``is_fisheye`` or ``camera_model: OPENCV_FISHEYE``),
    globally or per frame, in the pixel frame of ``w`` x ``h`` (COLMAP's convention: these files are written from
    COLMAP models by ``colmap2nerf`` / ``ns-process-data``).
``kapture``
    kapture text files (``sensors.txt``, ``records_camera.txt``, ``trajectories.txt``; in ``gt/`` possibly with a
    prefix such as ``kapture_images_sensors_``): world-to-device poses (``qw, qx, qy, qz, tx, ty, tz``) and COLMAP-named
    camera models with COLMAP parameters after ``w, h``. Some files (naver/kapture's ``cour_carree_markers`` sample)
    store ``tx, ty, tz, qw, qx, qy, qz`` under the standard header: when the header-order quaternion is not of unit
    length but the last four values are, that order is taken (with a warning).
``cotr``
    ``gt/camera_<i>.json`` (COTR's sample data): ``intrinsic`` (3x3, principal point at the image centre, no image
    size: the original size comes from ``RESIZED.tsv``) and ``c2w`` (4x4 camera-to-world, OpenCV camera axes) of the
    stored image whose stem ends in ``_<i>`` (``img_0.jpg``).

Names: a ground-truth entry belongs to the stored image with the same stem (file name without folder and extension,
case-insensitive): sources renamed ``IMG_1.JPG`` or ``frame_1.png`` to ``IMG_1.jpg`` / ``frame_1.jpg`` when the images
were resized. Stored images without ground truth are left out (with a debug message).

Sizes: the images were resized (longest side <= 1024; ``RESIZED.tsv`` lists original and stored size). Every view's
intrinsics are those of the *stored* image: the ground-truth camera, given for a width x height of its own (the
format's, or the original size of ``RESIZED.tsv`` when the format has none), is scaled per axis by stored / given size
in the corner-origin frame (``x_stored + 0.5 = s * (x_given + 0.5)``), which is how a resize maps pixels. Given and
stored aspect ratios must agree to 1 %, which also catches a stored image rotated against its ground truth.
``vincent_giza_rooftop`` is the case where the given size (1920x1080) is not the original size (480x270).

EXIF orientation: a stored image with an EXIF Orientation tag other than 1 is an error: the readers
(:func:`cd_sfm.images.read_image`, OpenCV) would rotate it, and whether the ground truth refers to the raw or the
rotated frame cannot be told from the files. (The stored images of ``more/`` carry no EXIF: ``arcolmap_desk``'s
source photos had a rotation tag, the stored copies hold the raw sensor frame without it, and its COLMAP model
(4032x3024) refers to that same raw frame: see the tests.)

:class:`GTView`: ``K`` in OpenCV's pixel convention (pixel centres at integers) for the stored size, ``R``, ``t``
world-to-camera with OpenCV camera axes (x right, y down, z forward), ``size`` the stored (width, height), and the
ground-truth camera with distortion for :meth:`GTView.undistort` (exact: the camera's own model, through pycolmap).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io import CdSfmError

logger = logging.getLogger(__name__)

FORMATS = ("colmap", "llff", "nerf", "kapture", "cotr")
PINHOLE_MODELS = ("PINHOLE", "SIMPLE_PINHOLE")


@dataclass
class GTView:
    name: str
    K: np.ndarray  # 3x3 pinhole part for the stored image, OpenCV pixel convention (COLMAP's principal point - 0.5)
    R: np.ndarray  # world-to-camera
    t: np.ndarray
    size: tuple[int, int]  # stored width, height
    camera: object = None  # the pycolmap.Camera of the ground truth (in its own pixel frame), for distortion
    scale: tuple[float, float] = (1.0, 1.0)  # stored / ground-truth camera size, per axis

    def undistort(self, xy: np.ndarray) -> np.ndarray:
        """Pixel coordinates (OpenCV convention) of the stored image -> those of the ideal pinhole camera ``K``."""
        xy = np.asarray(xy, np.float64).reshape(-1, 2)
        if self.camera is None or self.camera.model.name in PINHOLE_MODELS or not len(xy):
            return xy
        n = np.asarray(self.camera.cam_from_img((xy + 0.5) / np.asarray(self.scale)), np.float64)
        return n @ self.K[:2, :2].T + self.K[:2, 2]

    @property
    def center(self) -> np.ndarray:
        return -self.R.T @ self.t

    @property
    def axis(self) -> np.ndarray:
        return self.R[2]  # optical axis in world coordinates


# --------------------------------------------------------------------------------------------------------------------
# names and sizes of the stored images


def _key(name: str) -> str:
    """The stem of a file name (no folder, no extension), case-folded: how ground truth meets stored images."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return (base.rsplit(".", 1)[0] if "." in base else base).casefold()


@dataclass
class StoredImage:
    name: str  # relative to images/
    size: tuple[int, int]  # width, height as stored (no EXIF rotation: see the module docstring)
    original: tuple[int, int] | None = None  # from RESIZED.tsv


def stored_images(scene: Path) -> dict[str, StoredImage]:
    """{stem key: StoredImage} of ``scene/images`` (sizes from the headers; originals from ``RESIZED.tsv``)."""
    from ..images import image_info, list_images

    img_dir = scene / "images"
    out: dict[str, StoredImage] = {}
    for name in list_images(img_dir, on_duplicate="error"):
        info = image_info(img_dir / name)
        if info.orientation != 1:
            raise CdSfmError(f"{img_dir / name}: EXIF orientation {info.orientation}: the ground-truth frame (raw or "
                             f"rotated) is ambiguous; store the image without the tag")
        k = _key(name)
        if k in out:
            raise CdSfmError(f"{img_dir / name}: two images with the stem {k!r} ({out[k].name}): ground truth cannot "
                             f"be assigned")
        out[k] = StoredImage(name, (info.width, info.height))
    resized = scene / "RESIZED.tsv"
    if resized.is_file():
        for name, orig, stored in _read_resized(resized):
            im = out.get(_key(name))
            if im is None:
                continue
            if stored != im.size:
                raise CdSfmError(f"{resized}: {name}: stored size {stored[0]}x{stored[1]} but the image is "
                                 f"{im.size[0]}x{im.size[1]}")
            im.original = orig
    return out


def _read_resized(path: Path) -> list[tuple[str, tuple[int, int], tuple[int, int]]]:
    def wh(s: str) -> tuple[int, int]:
        m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", s)
        if not m:
            raise CdSfmError(f"{path}: {s!r} is not a WIDTHxHEIGHT size")
        return int(m.group(1)), int(m.group(2))

    rows = []
    with open(path, newline="") as f:
        for i, row in enumerate(csv.reader(f, delimiter="\t")):
            if i == 0 or not row or row[0].startswith("#"):
                continue  # header
            if len(row) < 3:
                raise CdSfmError(f"{path}: line {i + 1}: expected name, original and stored size")
            rows.append((row[0], wh(row[1]), wh(row[2])))
    return rows


# --------------------------------------------------------------------------------------------------------------------
# one camera in one form


def _camera(model: str, width: float, height: float, params, source: Path):
    import pycolmap

    try:
        return pycolmap.Camera(model=model, width=int(round(width)), height=int(round(height)),
                               params=[float(p) for p in params])
    except Exception as e:  # noqa: BLE001 - pycolmap raises plain errors for unknown models / wrong counts
        raise CdSfmError(f"{source}: camera model {model} with {len(params)} parameters: {e}") from e


def _view(im: StoredImage, cam, R, t, source: Path, given_size: tuple[int, int] | None = None) -> GTView:
    """A GTView for the stored image from a pycolmap camera in the ground truth's pixel frame and a world-to-camera
    pose; ``given_size`` overrides the camera's width/height as the frame the intrinsics refer to."""
    gw, gh = given_size or (cam.width, cam.height)
    sw, sh = im.size
    sx, sy = sw / gw, sh / gh
    if abs(sx / sy - 1) > 0.01:
        raise CdSfmError(f"{source}: {im.name}: the ground truth is for {gw}x{gh}, the stored image is {sw}x{sh} "
                         f"(aspect ratios differ: a rotated image?)")
    if cam.width != gw or cam.height != gh:
        cam = _camera(cam.model.name, gw, gh, cam.params, source)
    K = np.array(cam.calibration_matrix(), np.float64)  # corner-origin frame of the ground truth
    K[0] *= sx
    K[1] *= sy
    K[0, 2] -= 0.5  # -> OpenCV convention
    K[1, 2] -= 0.5
    R = np.asarray(R, np.float64)
    if not np.allclose(R @ R.T, np.eye(3), atol=1e-4) or np.linalg.det(R) < 0:
        raise CdSfmError(f"{source}: {im.name}: the ground-truth rotation is not a rotation "
                         f"(det {np.linalg.det(R):.3f})")
    return GTView(im.name, K, R, np.asarray(t, np.float64).ravel(), im.size, cam, (sx, sy))


def _pose_from_c2w(c2w) -> tuple[np.ndarray, np.ndarray]:
    """World-to-camera (R, t) of a camera-to-world [R | C] with OpenCV axes."""
    c2w = np.asarray(c2w, np.float64)
    R = c2w[:3, :3].T
    return R, -R @ c2w[:3, 3]


def _qvec_to_rotmat(q) -> np.ndarray:
    """Rotation matrix of a quaternion (w, x, y, z), normalised."""
    import pycolmap

    w, x, y, z = np.asarray(q, np.float64) / np.linalg.norm(q)
    return np.array(pycolmap.Rotation3d(np.array([x, y, z, w])).matrix())


# --------------------------------------------------------------------------------------------------------------------
# COLMAP


def _colmap_files(scene: Path) -> tuple[Path, str | None] | None:
    """(folder, file prefix) of a COLMAP model with images (prefix None: a model folder), or None."""
    if (scene / "gt_colmap").is_dir():
        return scene / "gt_colmap", None
    gt = scene / "gt"
    if (gt / "sparse_0_cameras.bin").is_file() and (gt / "sparse_0_images.bin").is_file():
        return gt, "sparse_0_"
    if (gt / "cameras.txt").is_file() and (gt / "images.txt").is_file():
        return gt, ""
    return None


def read_colmap(folder: Path, prefix: str | None = None, cameras_only: bool = False):
    """A pycolmap.Reconstruction from a model folder, or from the files ``folder/<prefix>cameras.bin|txt``,
    ``<prefix>images.*``, ``<prefix>points3D.*`` (images and points optional: an empty one stands in; with
    ``cameras_only`` they are not read)."""
    import pycolmap

    files = None
    if prefix is not None:
        for ext in ("bin", "txt"):
            if (folder / f"{prefix}cameras.{ext}").is_file():
                files = {n: folder / f"{prefix}{n}.{ext}" for n in ("cameras", "images", "points3D")}
                break
        if files is None:
            raise CdSfmError(f"{folder}: no COLMAP cameras file {prefix}cameras.bin|txt")
    src = files["cameras"] if files else folder
    tmp = None
    try:
        if files is not None:
            tmp = Path(tempfile.mkdtemp(prefix="cd_sfm_gt_"))
            for n, p in files.items():
                dst = tmp / f"{n}{p.suffix}"
                if p.is_file() and not (cameras_only and n != "cameras"):
                    os.symlink(p.resolve(), dst)
                elif p.suffix == ".bin":
                    dst.write_bytes(b"\0" * 8)  # an empty binary model part: a uint64 count of 0
                else:
                    dst.write_text("")
        try:
            return pycolmap.Reconstruction(str(tmp or folder))
        except Exception as e:  # noqa: BLE001 - pycolmap raises plain RuntimeErrors
            raise CdSfmError(f"{src}: cannot read the COLMAP model ({e})") from e
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _load_colmap(scene: Path, where: tuple[Path, str | None], stored: dict[str, StoredImage]) -> dict[str, GTView]:
    rec = read_colmap(*where)
    views = {}
    for im in rec.images.values():
        s = stored.get(_key(im.name))
        if s is None:
            continue
        cfw = im.cam_from_world() if callable(im.cam_from_world) else im.cam_from_world
        views[s.name] = _view(s, rec.cameras[im.camera_id], cfw.rotation.matrix(), cfw.translation, where[0])
    return views


# --------------------------------------------------------------------------------------------------------------------
# LLFF


def llff_to_c2w(pose_3x5) -> np.ndarray:
    """Camera-to-world [R | C] with OpenCV axes (right, down, forward) of one LLFF pose (columns down, right, back)."""
    p = np.asarray(pose_3x5, np.float64).reshape(3, 5)
    return np.concatenate([p[:, 1:2], p[:, 0:1], -p[:, 2:3], p[:, 3:4]], 1)


def _load_llff(scene: Path, path: Path, stored: dict[str, StoredImage]) -> dict[str, GTView]:
    try:
        arr = np.load(path)
    except (OSError, ValueError) as e:
        raise CdSfmError(f"{path}: cannot read ({e})") from e
    if arr.ndim != 2 or arr.shape[1] != 17:
        raise CdSfmError(f"{path}: expected an N x 17 array (LLFF poses_bounds), got {arr.shape}")
    gt = path.parent
    names_file = gt / "all_image_names_in_source_sorted.txt"
    if names_file.is_file():
        names = [n.strip() for n in names_file.read_text().splitlines() if n.strip()]
        origin = str(names_file)
    elif _colmap_files(scene) is not None:
        names = sorted(im.name for im in read_colmap(*_colmap_files(scene)).images.values())
        origin = "the COLMAP images"
    else:
        names = sorted(s.name for s in stored.values())
        origin = "the stored images"
    if len(names) != len(arr):
        raise CdSfmError(f"{path}: {len(arr)} rows but {len(names)} image names ({origin}): cannot tell which row "
                         f"is which image")
    names = sorted(names) if origin != str(names_file) else names  # imgs2poses orders rows by sorted name
    cam_file = gt / "sparse_0_cameras.bin"
    cam = None
    if cam_file.is_file():
        cams = list(read_colmap(gt, "sparse_0_", cameras_only=True).cameras.values())
        if len(cams) == 1:
            cam = cams[0]
        else:
            logger.warning("%s: %d cameras (not one): LLFF's pinhole intrinsics are used", cam_file, len(cams))
    views = {}
    for name, row in zip(names, arr):
        s = stored.get(_key(name))
        if s is None:
            continue
        h, w, f = row[:15].reshape(3, 5)[:, 4]
        c = cam
        if c is None:
            c = _camera("PINHOLE", w, h, [f, f, w / 2, h / 2], path)
        elif (c.width, c.height) != (int(round(w)), int(round(h))):
            raise CdSfmError(f"{cam_file}: camera {c.width}x{c.height} but {path} has images of {w:g}x{h:g}")
        R, t = _pose_from_c2w(llff_to_c2w(row[:15]))
        views[s.name] = _view(s, c, R, t, path)
    return views


# --------------------------------------------------------------------------------------------------------------------
# instant-ngp / nerfstudio transforms.json


def _nerf_camera(d: dict, path: Path, fallback: dict):
    """pycolmap camera of a transforms.json intrinsics dict (frame keys over global ones in ``fallback``)."""
    g = {**fallback, **d}
    if "w" not in g or "h" not in g:
        raise CdSfmError(f"{path}: no image size (w, h)")
    w, h = float(g["w"]), float(g["h"])
    if "fl_x" in g:
        fx = float(g["fl_x"])
    elif "camera_angle_x" in g:
        fx = 0.5 * w / np.tan(0.5 * float(g["camera_angle_x"]))
    else:
        raise CdSfmError(f"{path}: no focal length (fl_x or camera_angle_x)")
    fy = float(g.get("fl_y", fx))
    cx, cy = float(g.get("cx", w / 2)), float(g.get("cy", h / 2))
    k = {n: float(g.get(n, 0.0)) for n in ("k1", "k2", "k3", "k4", "p1", "p2")}
    if g.get("is_fisheye") or g.get("camera_model") == "OPENCV_FISHEYE":
        return _camera("OPENCV_FISHEYE", w, h, [fx, fy, cx, cy, k["k1"], k["k2"], k["k3"], k["k4"]], path)
    if k["k4"]:
        raise CdSfmError(f"{path}: k4 = {k['k4']} for a non-fisheye camera is not supported")
    if k["k3"]:
        return _camera("FULL_OPENCV", w, h, [fx, fy, cx, cy, k["k1"], k["k2"], k["p1"], k["p2"], k["k3"], 0, 0, 0],
                       path)
    if any(k.values()):
        return _camera("OPENCV", w, h, [fx, fy, cx, cy, k["k1"], k["k2"], k["p1"], k["p2"]], path)
    return _camera("PINHOLE", w, h, [fx, fy, cx, cy], path)


INTRINSIC_KEYS = ("w", "h", "fl_x", "fl_y", "camera_angle_x", "cx", "cy", "k1", "k2", "k3", "k4", "p1", "p2",
                  "is_fisheye", "camera_model")


def _load_nerf(scene: Path, path: Path, stored: dict[str, StoredImage]) -> dict[str, GTView]:
    try:
        data = json.loads(path.read_text())
        frames = data["frames"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CdSfmError(f"{path}: not a transforms.json with frames ({e})") from e
    glob = {k: data[k] for k in INTRINSIC_KEYS if k in data}
    views = {}
    for fr in frames:
        s = stored.get(_key(fr.get("file_path", "")))
        if s is None:
            continue
        cam = _nerf_camera({k: fr[k] for k in INTRINSIC_KEYS if k in fr}, path, glob)
        c2w = np.asarray(fr["transform_matrix"], np.float64)
        if c2w.shape != (4, 4):
            raise CdSfmError(f"{path}: {fr.get('file_path')}: transform_matrix is not 4x4")
        c2w = c2w.copy()
        c2w[:3, 1:3] *= -1  # OpenGL camera axes (y up, z back) -> OpenCV (y down, z forward)
        R, t = _pose_from_c2w(c2w)
        views[s.name] = _view(s, cam, R, t, path)
    return views


# --------------------------------------------------------------------------------------------------------------------
# kapture


def _kapture_table(path: Path) -> list[list[str]]:
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        rows.append([v.strip() for v in line.split(",")])
    return rows


def _kapture_files(scene: Path) -> dict[str, Path] | None:
    for d in (scene / "gt", scene / "gt" / "sensors", scene / "sensors"):
        if not d.is_dir():
            continue
        found = {}
        for kind in ("sensors", "records_camera", "trajectories"):
            hits = [p for p in d.glob("*.txt") if p.name == f"{kind}.txt" or p.name.endswith(f"_{kind}.txt")]
            if len(hits) == 1:
                found[kind] = hits[0]
        if len(found) == 3:
            return found
    return None


def _load_kapture(scene: Path, files: dict[str, Path], stored: dict[str, StoredImage]) -> dict[str, GTView]:
    cams = {}
    for row in _kapture_table(files["sensors"]):
        if len(row) >= 3 and row[2] == "camera":
            model, params = row[3], [float(v) for v in row[4:] if v != ""]
            if len(params) < 2:
                raise CdSfmError(f"{files['sensors']}: {row[0]}: no image size")
            cams[row[0]] = _camera(model, params[0], params[1], params[2:], files["sensors"])
    poses, swapped = {}, 0
    for row in _kapture_table(files["trajectories"]):
        if len(row) != 9:
            raise CdSfmError(f"{files['trajectories']}: expected timestamp, device, qw, qx, qy, qz, tx, ty, tz")
        v = np.array([float(x) for x in row[2:]])
        q, t = v[:4], v[4:]
        if abs(np.linalg.norm(q) - 1) > 1e-3:
            if abs(np.linalg.norm(v[3:]) - 1) <= 1e-3:
                q, t = v[3:], v[:3]
                swapped += 1
            else:
                raise CdSfmError(f"{files['trajectories']}: {row[0]}, {row[1]}: no unit quaternion in the pose")
        poses[(row[0], row[1])] = (_qvec_to_rotmat(q), t)
    if swapped:
        logger.warning("%s: %d poses stored as tx, ty, tz, qw, qx, qy, qz (not the header's order): read that way",
                       files["trajectories"], swapped)
    views = {}
    for row in _kapture_table(files["records_camera"]):
        ts, dev, img = row[:3]
        s = stored.get(_key(img))
        if s is None:
            continue
        if dev not in cams:
            raise CdSfmError(f"{files['records_camera']}: {img}: device {dev!r} is not a camera of {files['sensors']} "
                             f"(rigs are not supported)")
        if (ts, dev) not in poses:
            logger.debug("%s: %s has no pose", files["trajectories"], img)
            continue
        R, t = poses[(ts, dev)]
        views[s.name] = _view(s, cams[dev], R, t, files["trajectories"])
    return views


# --------------------------------------------------------------------------------------------------------------------
# COTR camera_<i>.json


def _load_cotr(scene: Path, files: list[Path], stored: dict[str, StoredImage]) -> dict[str, GTView]:
    views = {}
    for path in files:
        i = path.stem.rsplit("_", 1)[-1]
        hits = [s for k, s in stored.items() if k.endswith(f"_{i}")]
        if len(hits) != 1:
            logger.debug("%s: no single stored image *_%s", path, i)
            continue
        s = hits[0]
        try:
            d = json.loads(path.read_text())
            K, c2w = np.asarray(d["intrinsic"], np.float64), np.asarray(d["c2w"], np.float64)
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise CdSfmError(f"{path}: not a COTR camera file with intrinsic and c2w ({e})") from e
        if s.original is None:
            raise CdSfmError(f"{path}: no image size for {s.name} (needs RESIZED.tsv beside images/)")
        if abs(K[0, 1]) > 1e-9:
            raise CdSfmError(f"{path}: skewed intrinsics are not supported")
        cam = _camera("PINHOLE", *s.original, [K[0, 0], K[1, 1], K[0, 2], K[1, 2]], path)
        R, t = _pose_from_c2w(c2w)
        views[s.name] = _view(s, cam, R, t, path)
    return views


# --------------------------------------------------------------------------------------------------------------------
# entry points


def detect_format(scene: str | Path) -> tuple[str, object] | None:
    """(format, where) of the scene's ground truth (see the module docstring), or None."""
    scene = Path(scene)
    gt = scene / "gt"
    col = _colmap_files(scene)
    if col is not None:
        return "colmap", col
    if (gt / "poses_bounds.npy").is_file():
        return "llff", gt / "poses_bounds.npy"
    if (gt / "transforms.json").is_file():
        return "nerf", gt / "transforms.json"
    kap = _kapture_files(scene)
    if kap is not None:
        return "kapture", kap
    cotr = sorted(gt.glob("camera_*.json")) if gt.is_dir() else []
    if cotr:
        return "cotr", cotr
    return None


def has_gt(scene: str | Path) -> bool:
    return detect_format(scene) is not None


def load_gt(scene: str | Path, fmt: str | None = None) -> dict[str, GTView]:
    """Ground-truth cameras of the stored images of a scene folder, by image name (relative to ``images/``), sorted.

    ``fmt`` forces one form (one of ``FORMATS``) where a scene has several (``nerfdb_beer_can``: COLMAP and LLFF)."""
    scene = Path(scene)
    found = detect_format(scene)
    if fmt is not None:
        where = {"colmap": _colmap_files(scene), "llff": scene / "gt" / "poses_bounds.npy",
                 "nerf": scene / "gt" / "transforms.json", "kapture": _kapture_files(scene),
                 "cotr": sorted((scene / "gt").glob("camera_*.json")) if (scene / "gt").is_dir() else []}.get(fmt)
        if fmt not in FORMATS:
            raise CdSfmError(f"unknown ground-truth format {fmt!r}; known: {', '.join(FORMATS)}")
        if not where or isinstance(where, Path) and not where.exists():
            raise CdSfmError(f"{scene}: no {fmt} ground truth")
        found = (fmt, where)
    if found is None:
        raise CdSfmError(f"{scene}: no ground truth (gt_colmap/, or gt/ with a COLMAP model, poses_bounds.npy, "
                         f"transforms.json, kapture files or camera_*.json)")
    kind, where = found
    stored = stored_images(scene)
    loader = {"colmap": _load_colmap, "llff": _load_llff, "nerf": _load_nerf, "kapture": _load_kapture,
              "cotr": _load_cotr}[kind]
    views = loader(scene, where, stored)
    if not views:
        raise CdSfmError(f"{scene}: the {kind} ground truth names none of the images in {scene / 'images'}")
    missing = sorted(s.name for s in stored.values() if s.name not in views)
    if missing:
        logger.debug("%s: %d stored images without ground truth: %s", scene, len(missing), ", ".join(missing[:5]))
    return dict(sorted(views.items()))


def to_reconstruction(views: dict[str, GTView]):
    """A pycolmap.Reconstruction of the views (pinhole cameras ``K`` of the stored images, no points): the ground
    truth for :func:`cd_sfm.synthetic.compare_to_ground_truth`."""
    import pycolmap

    rec = pycolmap.Reconstruction()
    for i, v in enumerate(views.values(), 1):
        K = v.K
        cam = pycolmap.Camera(model="PINHOLE", width=v.size[0], height=v.size[1],
                              params=[K[0, 0], K[1, 1], K[0, 2] + 0.5, K[1, 2] + 0.5], camera_id=i)
        rec.add_camera_with_trivial_rig(cam)
        im = pycolmap.Image(name=v.name, camera_id=i, image_id=i)
        rec.add_image_with_trivial_frame(im, pycolmap.Rigid3d(pycolmap.Rotation3d(v.R), v.t))
    return rec


# --------------------------------------------------------------------------------------------------------------------
# check against the images


def epipolar_fit(scene: str | Path, views: dict[str, GTView] | None = None, max_pairs: int = 4,
                 ransac_px: float = 2.0, min_inliers: int = 20, max_keypoints: int = 4096) -> dict:
    """How well the ground truth explains the images: SIFT (RootSIFT, mutual nearest neighbours, ratio 0.8) on the
    ``max_pairs`` pairs of :func:`pose.select_pairs` with the closest optical axes, a fundamental matrix by RANSAC
    (``ransac_px``) on the undistorted keypoints, and the Sampson distance (pixels of the stored images) of its
    inliers to the ground-truth epipolar geometry. A correct ground truth gives a median of about a pixel or less; a
    wrong pose, axis convention or intrinsic scale gives tens to hundreds. Pairs with fewer than ``min_inliers``
    RANSAC inliers (too few to trust the RANSAC) are listed but not pooled.

    Returns {"pairs": [{"pair", "matches", "inliers", "median_px"}], "median_px": over the pooled inliers,
    "pooled_pairs"}."""
    import cv2

    from ..features.patches import SiftDetectorConf, detect_sift
    from ..images import read_image
    from ..matching import match_descriptors
    from .hpatches import rootsift
    from .pose import angle_between, fundamental_from_pose, relative_pose, sampson_distance, select_pairs

    scene = Path(scene)
    views = views if views is not None else load_gt(scene)
    pairs = sorted(select_pairs(views), key=lambda p: angle_between(views[p[0]].axis, views[p[1]].axis))[:max_pairs]
    det = SiftDetectorConf(max_keypoints=max_keypoints)
    feats = {}
    for name in sorted({n for p in pairs for n in p}):
        gray, _ = read_image(scene / "images" / name, grayscale=True)
        kp = detect_sift(gray, det, descriptors=True)
        feats[name] = (views[name].undistort(kp["keypoints"]), rootsift(kp["sift"]))
    rows, all_d = [], []
    for a, b in pairs:
        (xa, da), (xb, db) = feats[a], feats[b]
        m, _ = match_descriptors(da, db, normalized=False, ratio=0.8, mutual=True)
        i0 = np.flatnonzero(m >= 0)
        p0, p1 = xa[i0], xb[m[i0]]
        d = np.zeros(0)
        if len(p0) >= 8:
            cv2.setRNGSeed(0)
            _, mask = cv2.findFundamentalMat(p0, p1, cv2.FM_RANSAC, ransac_px, 0.9999)
            if mask is not None:
                inl = mask.ravel() > 0
                va, vb = views[a], views[b]
                F = fundamental_from_pose(va.K, vb.K, *relative_pose(va.R, va.t, vb.R, vb.t))
                d = sampson_distance(F, p0[inl], p1[inl])
        if len(d) >= min_inliers:
            all_d.append(d)
        rows.append({"pair": [a, b], "matches": int(len(p0)), "inliers": int(len(d)),
                     "median_px": float(np.median(d)) if len(d) else float("nan")})
    d = np.concatenate(all_d) if all_d else np.zeros(0)
    return {"pairs": rows, "median_px": float(np.median(d)) if len(d) else float("nan"), "pooled_pairs": len(all_d)}
