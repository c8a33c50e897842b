"""Patch pairs with exact correspondences from random homographic warps of training images.

For each source image (grayscale, longest side <= ``max_size``) SIFT keypoints are detected once with
:func:`cd_sfm.features.patches.detect_sift`; each random homography ``H`` (rotation, scale 0.5-2, anisotropy,
perspective, translation) warps the image, every keypoint is mapped through ``H`` and its size and angle through the
local Jacobian of ``H`` (closest similarity: scale sqrt(det J), rotation of J), a little jitter imitates detector
noise, and both patches are cut with the vectorised :func:`extract_patches`. Both images get an independent
photometric augmentation (brightness, contrast, gamma, blur, noise). Pairs whose target falls outside the warped image
are dropped.

The mined dataset is one h5 file (see :func:`mine_homography`): uint8 patches before standardisation (the model
standardises each patch itself), keypoint sizes of both sides, a global source-keypoint id (to mask duplicates among
in-batch negatives), the image index, and the train/validation flag of every image.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import h5py
import numpy as np
from tqdm import tqdm

from ..features.patches import SiftDetectorConf, detect_sift, extract_patches
from ..io import CdSfmError, require_h5_path

logger = logging.getLogger(__name__)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff"}


@dataclass
class HomographyConf:
    """Distribution of the random warps (normalised coordinates: image centre at 0, half the longest side = 1)."""

    rotation_deg: float = 180.0  # uniform in [-r, r]; the upright model uses a small range
    scale_min: float = 0.5  # log-uniform overall scale
    scale_max: float = 2.0
    anisotropy: float = 0.15  # log of the x/y scale ratio, uniform in [-a, a]
    perspective: float = 0.15  # projective terms, uniform in [-p, p]
    translation: float = 0.15  # uniform in [-t, t]


@dataclass
class PhotometricConf:
    brightness: float = 25.0  # additive, gray levels, uniform in [-b, b]
    contrast: float = 0.3  # multiplicative around the mean, uniform in [1-c, 1+c]
    gamma: float = 0.35  # log-uniform in [exp(-g), exp(g)]
    blur_prob: float = 0.3
    blur_sigma_max: float = 1.5
    noise_max: float = 6.0  # Gaussian noise std, uniform in [0, n] gray levels


@dataclass
class JitterConf:
    """Detector noise on the target keypoint (the source keypoint is the detected one)."""

    position: float = 0.06  # std, in units of the keypoint size
    log_scale: float = 0.1  # std of log(size)
    angle_deg: float = 8.0  # std


@dataclass
class MineConf:
    max_size: int = 1024
    warps_per_image: int = 40
    pairs_per_warp: int = 256  # random subset of the valid pairs of each warp
    upright: bool = False
    val_every: int = 10  # every n-th image (sorted) is held out for validation
    val_offset: int = 3
    seed: int = 0
    detector: SiftDetectorConf = field(default_factory=lambda: SiftDetectorConf(max_keypoints=4096))
    homography: HomographyConf = field(default_factory=HomographyConf)
    photometric: PhotometricConf = field(default_factory=PhotometricConf)
    jitter: JitterConf = field(default_factory=JitterConf)

    def __post_init__(self):
        if self.upright:
            self.detector.upright = True


def load_gray(path: str | Path, max_size: int = 1024, stored_pixels: bool = False) -> np.ndarray:
    """Grayscale uint8 image, downscaled (INTER_AREA) so that its longest side is at most ``max_size``; upright (EXIF
    orientation applied) unless ``stored_pixels`` (the file's own pixel frame, which feature files use for images
    with an EXIF orientation: see ``cd_sfm.features.extract.extract_image``)."""
    flags = cv2.IMREAD_GRAYSCALE | (cv2.IMREAD_IGNORE_ORIENTATION if stored_pixels else 0)
    img = cv2.imread(str(path), flags)
    if img is None:
        raise CdSfmError(f"{path}: cannot read image")
    h, w = img.shape
    s = max_size / max(h, w)
    if s < 1:
        img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    return img


def random_homography(rng: np.random.Generator, width: int, height: int, conf: HomographyConf = HomographyConf()):
    """A random 3x3 homography mapping source pixels to target pixels (target canvas = source size)."""
    cx, cy, n = width / 2.0, height / 2.0, max(width, height) / 2.0
    to_norm = np.array([[1 / n, 0, -cx / n], [0, 1 / n, -cy / n], [0, 0, 1]])
    from_norm = np.linalg.inv(to_norm)
    px, py = rng.uniform(-conf.perspective, conf.perspective, 2)
    persp = np.array([[1, 0, 0], [0, 1, 0], [px, py, 1.0]])
    a = np.deg2rad(rng.uniform(-conf.rotation_deg, conf.rotation_deg))
    s = np.exp(rng.uniform(np.log(conf.scale_min), np.log(conf.scale_max)))
    an = np.exp(rng.uniform(-conf.anisotropy, conf.anisotropy) / 2)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    scl = np.diag([s * an, s / an, 1.0])
    tx, ty = rng.uniform(-conf.translation, conf.translation, 2)
    trans = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1.0]])
    H = from_norm @ trans @ rot @ scl @ persp @ to_norm
    return H / H[2, 2]


def warp_points(H: np.ndarray, xy: np.ndarray) -> np.ndarray:
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    p = np.concatenate([xy, np.ones((len(xy), 1))], 1) @ H.T
    return p[:, :2] / p[:, 2:3]


def homography_jacobian(H: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """(N, 2, 2) Jacobians d(Hx)/dx at the source points."""
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    w = xy @ H[2, :2] + H[2, 2]
    uv = warp_points(H, xy)
    J = H[None, :2, :2] - uv[:, :, None] * H[None, 2, None, :2]
    return J / w[:, None, None]


def warp_keypoints(H: np.ndarray, xy: np.ndarray, sizes: np.ndarray, angles_deg: np.ndarray):
    """Map keypoints (location, OpenCV size and angle) through ``H``: the patch frame R(angle) * r (the sampler's
    rotation by theta = 360 - angle, see ``patches.sample_grids``) becomes J R(angle) r ~ sqrt(det J) r
    R(angle + rot(J)), rot(J) = atan2(J10 - J01, J00 + J11); OpenCV's SIFT angle turns the same way."""
    J = homography_jacobian(H, xy)
    det = np.abs(J[:, 0, 0] * J[:, 1, 1] - J[:, 0, 1] * J[:, 1, 0])
    rot = np.rad2deg(np.arctan2(J[:, 1, 0] - J[:, 0, 1], J[:, 0, 0] + J[:, 1, 1]))
    new_xy = warp_points(H, xy)
    new_sizes = np.asarray(sizes, np.float64) * np.sqrt(det)
    new_angles = np.mod(np.asarray(angles_deg, np.float64) + rot, 360.0)
    return new_xy, new_sizes, new_angles


def photometric_augment(gray: np.ndarray, rng: np.random.Generator, conf: PhotometricConf = PhotometricConf()):
    """Random brightness/contrast/gamma/blur/noise on a float image in [0, 255]; returns float32 in [0, 255]."""
    img = np.asarray(gray, np.float32)
    if conf.blur_prob > 0 and rng.random() < conf.blur_prob:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, conf.blur_sigma_max))
    gamma = np.exp(rng.uniform(-conf.gamma, conf.gamma))
    img = 255.0 * np.power(np.clip(img / 255.0, 0, 1), gamma)
    c = rng.uniform(1 - conf.contrast, 1 + conf.contrast)
    img = (img - img.mean()) * c + img.mean() + rng.uniform(-conf.brightness, conf.brightness)
    if conf.noise_max > 0:
        img = img + rng.normal(0, rng.uniform(0, conf.noise_max), img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.float32)


def make_pairs(
    gray: np.ndarray,
    kpts: dict,
    rng: np.random.Generator,
    conf: MineConf = MineConf(),
    H: np.ndarray | None = None,
    photometric: bool = True,
    jitter: bool = True,
):
    """One random warp of ``gray``: returns a dict with ``patches`` (M, 2, 32, 32) float32 in [0, 255] (source, target;
    not standardised), ``scales`` (M, 2), ``index`` (M,) source keypoint index, ``H``."""
    h, w = gray.shape[:2]
    if H is None:
        hconf = conf.homography
        if conf.upright:
            hconf = HomographyConf(**{**asdict(hconf), "rotation_deg": min(hconf.rotation_deg, 10.0)})
        H = random_homography(rng, w, h, hconf)
    xy, sizes, angles = kpts["keypoints"], kpts["scales"], kpts["angles"]
    txy, tsizes, tangles = warp_keypoints(H, xy, sizes, angles)
    n = len(xy)
    if jitter and n:
        j = conf.jitter
        txy = txy + rng.normal(0, 1, (n, 2)) * (j.position * tsizes)[:, None]
        tsizes = tsizes * np.exp(rng.normal(0, j.log_scale, n))
        tangles = np.mod(tangles + rng.normal(0, j.angle_deg, n), 360.0)
    inside = (txy[:, 0] >= 0) & (txy[:, 0] <= w - 1) & (txy[:, 1] >= 0) & (txy[:, 1] <= h - 1)
    inside &= np.isfinite(txy).all(1) & (tsizes > 0.5)
    idx = np.flatnonzero(inside)
    if conf.pairs_per_warp and len(idx) > conf.pairs_per_warp:
        idx = np.sort(rng.choice(idx, conf.pairs_per_warp, replace=False))
    warped = cv2.warpPerspective(
        np.asarray(gray, np.float32), H, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    src_img = np.asarray(gray, np.float32)
    if photometric:
        src_img = photometric_augment(src_img, rng, conf.photometric)
        warped = photometric_augment(warped, rng, conf.photometric)
    p0 = extract_patches(src_img, xy[idx], sizes[idx], angles[idx], upright=conf.upright, standardize=False)
    p1 = extract_patches(warped, txy[idx], tsizes[idx], tangles[idx], upright=conf.upright, standardize=False)
    return {
        "patches": np.stack([p0, p1], 1),
        "scales": np.stack([sizes[idx], tsizes[idx]], 1).astype(np.float32),
        "index": idx,
        "H": H,
    }


def list_images(dirs) -> list[Path]:
    out = []
    for d in dirs:
        d = Path(d)
        if d.is_file():
            out.append(d)
            continue
        if not d.is_dir():
            raise CdSfmError(f"{d}: not an image folder")
        out += [p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
    return sorted(set(out))


def _seed_for(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha1(f"{seed}:{name}".encode()).digest()[:8], "little")


def mine_homography(images, out_path, conf: MineConf = MineConf(), names=None) -> dict:
    """Mine patch pairs from every image in ``images`` into the h5 file ``out_path``.

    Layout: ``patches`` (N, 2, 32, 32) uint8, ``scales`` (N, 2) float32, ``kpt_ids`` (N,) int64 (global source
    keypoint id), ``image_ids`` (N,) int32, ``is_val`` (N,) bool; attributes ``image_names`` (json list), ``val_images``
    and ``conf`` (json). Each image is seeded from (seed, name), so a run is reproducible.
    """
    import json

    images = [Path(p) for p in images]
    if not images:
        raise CdSfmError("mine-homography: no images given")
    names = names or [str(p) for p in images]
    is_val_img = np.array([(i % conf.val_every) == conf.val_offset % conf.val_every for i in range(len(images))]) if conf.val_every else np.zeros(len(images), bool)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(out_path.suffix + ".part")
    total = 0
    kpt_offset = 0
    with h5py.File(tmp, "w") as f:
        ds = {
            "patches": f.create_dataset("patches", (0, 2, 32, 32), np.uint8, maxshape=(None, 2, 32, 32), chunks=(256, 2, 32, 32)),
            "scales": f.create_dataset("scales", (0, 2), np.float32, maxshape=(None, 2)),
            "kpt_ids": f.create_dataset("kpt_ids", (0,), np.int64, maxshape=(None,)),
            "image_ids": f.create_dataset("image_ids", (0,), np.int32, maxshape=(None,)),
            "is_val": f.create_dataset("is_val", (0,), bool, maxshape=(None,)),
        }
        for i, (path, name) in enumerate(tqdm(list(zip(images, names)), desc="mine homography", unit="img")):
            rng = np.random.default_rng(_seed_for(conf.seed, Path(name).name))
            gray = load_gray(path, conf.max_size)
            kpts = detect_sift(gray, conf.detector)
            if len(kpts["keypoints"]) == 0:
                logger.warning("%s: no keypoints, skipped", path)
                continue
            chunks = [make_pairs(gray, kpts, rng, conf) for _ in range(conf.warps_per_image)]
            patches = np.concatenate([c["patches"] for c in chunks])
            m = len(patches)
            new = {
                "patches": np.clip(np.rint(patches), 0, 255).astype(np.uint8),
                "scales": np.concatenate([c["scales"] for c in chunks]),
                "kpt_ids": np.concatenate([c["index"] for c in chunks]).astype(np.int64) + kpt_offset,
                "image_ids": np.full(m, i, np.int32),
                "is_val": np.full(m, is_val_img[i], bool),
            }
            for k, v in new.items():
                ds[k].resize(total + m, axis=0)
                ds[k][total:] = v
            total += m
            kpt_offset += len(kpts["keypoints"])
        f.attrs["image_names"] = json.dumps(names)
        f.attrs["val_images"] = json.dumps([n for n, v in zip(names, is_val_img) if v])
        f.attrs["conf"] = json.dumps(asdict(conf))
    tmp.replace(out_path)
    n_val = int(sum(is_val_img))
    logger.info("mined %d pairs from %d images (%d held out for validation) into %s", total, len(images), n_val, out_path)
    return {"pairs": total, "images": len(images), "val_images": n_val, "path": str(out_path)}


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="cd-sfm train mine-homography", description=__doc__.split("\n")[0])
    p.add_argument("inputs", nargs="+", help="image folders (searched recursively) or images, then the output .h5")
    p.add_argument("--warps-per-image", type=int, default=MineConf.warps_per_image)
    p.add_argument("--pairs-per-warp", type=int, default=MineConf.pairs_per_warp)
    p.add_argument("--max-size", type=int, default=MineConf.max_size)
    p.add_argument("--upright", action="store_true")
    p.add_argument("--val-every", type=int, default=MineConf.val_every, help="hold out every n-th image (0: none)")
    p.add_argument("--seed", type=int, default=0)
    return p


def cli_mine_homography(args) -> dict:
    """Entry point: ``args`` is an argparse Namespace from :func:`build_parser` or an argv list."""
    if not isinstance(args, argparse.Namespace):
        args = build_parser().parse_args(args)
    if len(args.inputs) < 2:
        raise CdSfmError("mine-homography: give image folders and the output .h5")
    *dirs, out = args.inputs
    require_h5_path(out)
    images = list_images(dirs)
    if not images:
        raise CdSfmError(f"{' '.join(map(str, dirs))}: no images found")
    conf = MineConf(
        max_size=args.max_size, warps_per_image=args.warps_per_image, pairs_per_warp=args.pairs_per_warp,
        upright=args.upright, val_every=args.val_every, seed=args.seed,
    )
    res = mine_homography(images, out, conf)
    print(f"{res['pairs']} pairs from {res['images']} images ({res['val_images']} validation images) -> {out}")
    return res


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return cli_mine_homography(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
