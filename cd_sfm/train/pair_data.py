"""Image pairs with whole keypoint sets for training the augmentation network (and end-to-end tuning).

No SfM is needed: a pair is a training image and a random homographic warp of it (the warp sampling and photometric
augmentation of :mod:`cd_sfm.train.homography`). SIFT keypoints are detected *independently* in both (augmented)
images with :func:`detect_sift` (4096 largest, as at inference), so each image has its own, realistic keypoint set.
Ground-truth correspondences: a source keypoint mapped through ``H`` (position, and size/angle through the local
Jacobian) lies within ``max_dist`` px of a detected target keypoint whose size ratio and angle are compatible; among
compatible candidates the cheapest (distance + scale + angle terms) is taken, mutually in both directions.

The frozen local model's raw ``conv6_feat`` and matchability of every keypoint are computed once and cached with the
pair (augmentation training then never runs the CNN); the 32x32 uint8 patches are stored too (end-to-end tuning and
re-describing with another local model).

h5 layout (flat arrays with offsets; "images" are the two sides of every pair, image 2p = source, 2p + 1 = warp):
``kpts`` (K, 2) float32 pixels, ``sizes`` (K,), ``angles`` (K,) degrees, ``feat`` (K, 128) float16 raw descriptors,
``mb`` (K,) float16, ``patches`` (K, 32, 32) uint8, ``img_offset`` (2P + 1,) int64, ``img_size`` (2P, 2) (W, H);
``matches`` (M, 2) int32 keypoint indices local to each image, ``match_offset`` (P + 1,), ``H`` (P, 3, 3),
``pair_image`` (P,) index of the source image in ``image_names``, ``is_val`` (P,) bool; attributes
``image_names``, ``val_images``, ``conf``, ``local_model``.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import h5py
import numpy as np
from scipy.spatial import cKDTree
from tqdm import tqdm

from ..features.patches import SiftDetectorConf, detect_sift, extract_patches
from ..geometry import normalized_keypoints
from ..io import CdSfmError, open_h5, require_h5_path
from ..models.registry import FULL_MODEL
from ..split import SPLIT_FILE, train_dirs
from .homography import (HomographyConf, PhotometricConf, _seed_for, list_images, load_gray, photometric_augment,
                         random_homography, warp_keypoints)

logger = logging.getLogger(__name__)



@dataclass
class MatchConf:
    max_dist: float = 1.5  # px, warped source keypoint to detected target keypoint
    max_log2_scale: float = 0.5  # |log2(size ratio)| (SIFT levels are 2^(1/3) apart)
    max_angle_deg: float = 20.0  # orientation difference (ignored when upright)
    k: int = 8  # candidate neighbours per keypoint


@dataclass
class PairMineConf:
    max_size: int = 1024
    warps_per_image: int = 2  # pairs per training image
    val_warps_per_image: int = 4  # pairs per held-out image
    upright: bool = False
    val_every: int = 10  # same held-out rule as the homography miner
    val_offset: int = 3
    seed: int = 0
    photometric_aug: bool = True
    detector: SiftDetectorConf = field(default_factory=lambda: SiftDetectorConf(max_keypoints=4096))
    homography: HomographyConf = field(default_factory=HomographyConf)
    photometric: PhotometricConf = field(default_factory=PhotometricConf)
    match: MatchConf = field(default_factory=MatchConf)

    def __post_init__(self):
        if self.upright:
            self.detector.upright = True


def correspondences(kp0: dict, kp1: dict, H: np.ndarray, conf: MatchConf = MatchConf(), upright: bool = False):
    """Mutual ground-truth correspondences (M, 2) between two detected keypoint sets related by ``H`` (0 -> 1)."""
    n0, n1 = len(kp0["keypoints"]), len(kp1["keypoints"])
    if n0 == 0 or n1 == 0:
        return np.zeros((0, 2), np.int32)
    wxy, wsize, wang = warp_keypoints(H, kp0["keypoints"], kp0["scales"], kp0["angles"])
    ok = np.isfinite(wxy).all(1)
    wxy = np.where(ok[:, None], wxy, 1e9)
    k = min(conf.k, n1)
    dist, j = cKDTree(np.asarray(kp1["keypoints"], np.float64)).query(wxy, k=k, distance_upper_bound=conf.max_dist)
    dist, j = dist.reshape(n0, k), j.reshape(n0, k)
    i = np.repeat(np.arange(n0)[:, None], k, 1)
    valid = np.isfinite(dist) & (j < n1) & ok[:, None]
    i, j, dist = i[valid], j[valid], dist[valid]
    lscale = np.abs(np.log2(np.asarray(kp1["scales"], np.float64)[j] / np.maximum(wsize[i], 1e-9)))
    dang = np.abs((np.asarray(kp1["angles"], np.float64)[j] - wang[i] + 180.0) % 360.0 - 180.0)
    keep = lscale <= conf.max_log2_scale
    if not upright:
        keep &= dang <= conf.max_angle_deg
    else:
        dang = np.zeros_like(dang)
    i, j = i[keep], j[keep]
    cost = dist[keep] / conf.max_dist + lscale[keep] / conf.max_log2_scale + dang[keep] / max(conf.max_angle_deg, 1)
    if len(i) == 0:
        return np.zeros((0, 2), np.int32)
    # best target per source and best source per target; keep the pairs that are both
    o = np.lexsort((cost, i))
    best_j = np.full(n0, -1)
    first = np.r_[True, i[o][1:] != i[o][:-1]]
    best_j[i[o][first]] = j[o][first]
    o = np.lexsort((cost, j))
    best_i = np.full(n1, -1)
    first = np.r_[True, j[o][1:] != j[o][:-1]]
    best_i[j[o][first]] = i[o][first]
    src = np.flatnonzero(best_j >= 0)
    src = src[best_i[best_j[src]] == src]
    return np.stack([src, best_j[src]], 1).astype(np.int32)


def make_image_pair(gray: np.ndarray, rng: np.random.Generator, conf: PairMineConf = PairMineConf(),
                    H: np.ndarray | None = None, photometric: bool | None = None) -> dict:
    """One pair: (augmented) ``gray`` and its random warp, each with its own detected keypoints and uint8 patches,
    plus the ground-truth ``matches`` (M, 2) and ``H``."""
    h, w = gray.shape[:2]
    if H is None:
        hconf = conf.homography
        if conf.upright:
            hconf = HomographyConf(**{**asdict(hconf), "rotation_deg": min(hconf.rotation_deg, 10.0)})
        H = random_homography(rng, w, h, hconf)
    photometric = conf.photometric_aug if photometric is None else photometric
    src = np.asarray(gray, np.float32)
    warped = cv2.warpPerspective(src, H, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    if photometric:
        src = photometric_augment(src, rng, conf.photometric)
        warped = photometric_augment(warped, rng, conf.photometric)
    sides = []
    for img in (src, warped):
        img8 = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        kp = detect_sift(img8, conf.detector)
        p = extract_patches(img8, kp["keypoints"], kp["scales"], kp["angles"], upright=conf.upright,
                            standardize=False)
        kp["patches"] = np.clip(np.rint(p), 0, 255).astype(np.uint8)
        kp["size"] = np.array([w, h], np.int32)
        sides.append(kp)
    if conf.upright:
        for kp in sides:
            kp["angles"] = np.zeros_like(kp["angles"])
    matches = correspondences(sides[0], sides[1], H, conf.match, conf.upright)
    return {"images": sides, "matches": matches, "H": H}


def training_images(split_file: str | Path = SPLIT_FILE, data_root: str | Path | None = None) -> list[Path]:
    """The sorted image list of the TRAIN scenes of the split (``cd_sfm/split.yaml``; the homography miner's list)."""
    return list_images(train_dirs(split_file, data_root))


class _Writer:
    """Appends pairs to the flat h5 layout."""

    def __init__(self, f: h5py.File):
        self.f = f
        c = lambda name, shape, dt, chunk: f.create_dataset(  # noqa: E731
            name, (0,) + shape, dt, maxshape=(None,) + shape, chunks=(chunk,) + shape)
        c("kpts", (2,), np.float32, 4096)
        c("sizes", (), np.float32, 4096)
        c("angles", (), np.float32, 4096)
        c("feat", (128,), np.float16, 1024)
        c("mb", (), np.float16, 4096)
        c("patches", (32, 32), np.uint8, 1024)
        c("img_size", (2,), np.int32, 256)
        c("matches", (2,), np.int32, 4096)
        c("H", (3, 3), np.float64, 64)
        c("F", (3, 3), np.float64, 64)
        c("pair_image", (), np.int32, 256)
        c("is_val", (), bool, 256)
        self.img_offset = [0]
        self.match_offset = [0]

    def _append(self, name, arr):
        ds = self.f[name]
        n = ds.shape[0]
        ds.resize(n + len(arr), axis=0)
        ds[n:] = arr

    def add(self, pair: dict, feats, mbs, image_index: int, is_val: bool):
        for kp, feat, mb in zip(pair["images"], feats, mbs):
            self._append("kpts", kp["keypoints"].astype(np.float32))
            self._append("sizes", kp["scales"].astype(np.float32))
            self._append("angles", kp["angles"].astype(np.float32))
            self._append("feat", feat.astype(np.float16))
            self._append("mb", mb.astype(np.float16))
            self._append("patches", kp["patches"])
            self._append("img_size", kp["size"][None])
            self.img_offset.append(self.img_offset[-1] + len(kp["keypoints"]))
        self._append("matches", pair["matches"])
        self.match_offset.append(self.match_offset[-1] + len(pair["matches"]))
        nan = np.full((3, 3), np.nan)
        self._append("H", np.asarray(pair.get("H", nan), np.float64)[None])
        self._append("F", np.asarray(pair.get("F", nan), np.float64)[None])
        self._append("pair_image", np.array([image_index], np.int32))
        self._append("is_val", np.array([is_val]))

    def close(self):
        self.f.create_dataset("img_offset", data=np.array(self.img_offset, np.int64))
        self.f.create_dataset("match_offset", data=np.array(self.match_offset, np.int64))


def load_local_runner(weights: str | Path, batch_size: int = 1024):
    """Inference runner (batch norms folded) of a local model given as a registry name, folder or ``.npz``."""
    from ..models.local import builder_for, load_local_model
    from ..models.runner import ContextDescRunner

    p = Path(str(weights))
    if p.suffix == ".npz":
        if not p.is_file():
            raise CdSfmError(f"{p}: local weights not found")
        model = load_local_model(p)
    else:
        from ..models import registry

        model = load_local_model(registry.resolve(str(weights)).path("local"))
    return ContextDescRunner({"local": model}, {"local": builder_for(model)}, batch_size=batch_size)


def mine_pairs(images, out_path, local_weights=FULL_MODEL, conf: PairMineConf = PairMineConf(), names=None) -> dict:
    """Build pairs from ``images`` (every ``val_every``-th image held out) into ``out_path`` (h5, written to a
    ``.part`` file and renamed when complete). Each image is seeded from (seed, file name): reproducible."""
    images = [Path(p) for p in images]
    if not images:
        raise CdSfmError("mine-pairs: no images given")
    names = names or [str(p) for p in images]
    is_val_img = np.array([conf.val_every > 0 and i % conf.val_every == conf.val_offset % conf.val_every
                           for i in range(len(images))])
    runner = load_local_runner(local_weights)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".part")
    n_pairs = n_matches = 0
    with h5py.File(tmp, "w") as f:
        wr = _Writer(f)
        for idx, (path, name) in enumerate(tqdm(list(zip(images, names)), desc="mine pairs", unit="img")):
            rng = np.random.default_rng(_seed_for(conf.seed + 1000, Path(name).name))
            gray = load_gray(path, conf.max_size)
            for _ in range(conf.val_warps_per_image if is_val_img[idx] else conf.warps_per_image):
                pair = make_image_pair(gray, rng, conf)
                n = [len(kp["keypoints"]) for kp in pair["images"]]
                feat, mb = runner.local(np.concatenate([kp["patches"] for kp in pair["images"]]))
                wr.add(pair, [feat[: n[0]], feat[n[0]:]], [mb[: n[0]], mb[n[0]:]], idx, bool(is_val_img[idx]))
                n_pairs += 1
                n_matches += len(pair["matches"])
        wr.close()
        f.attrs["image_names"] = json.dumps(names)
        f.attrs["val_images"] = json.dumps([n for n, v in zip(names, is_val_img) if v])
        f.attrs["conf"] = json.dumps(asdict(conf))
        f.attrs["local_model"] = str(local_weights)
    tmp.replace(out_path)
    logger.info("mined %d pairs (%d correspondences) from %d images into %s", n_pairs, n_matches, len(images),
                out_path)
    return {"pairs": n_pairs, "matches": n_matches, "images": len(images), "val_images": int(is_val_img.sum()),
            "path": str(out_path)}


def read_pairs(path, which: str = "all", patches: bool = False) -> dict:
    """Load a pair file (or a list of them, concatenated) into memory: per pair a dict with ``feat`` (2 arrays),
    ``mb``, ``xy`` (normalised), ``kpts``, ``matches``, ``H`` (homography pairs) or ``F`` (SfM pairs: the fundamental
    matrix of the model's poses; the other is NaN), ``is_val``, and ``patches`` when asked. ``which``: all | train |
    val. The attributes are those of the first file."""
    if isinstance(path, (list, tuple)):
        parts = [read_pairs(p, which, patches) for p in path]
        return {"pairs": [q for part in parts for q in part["pairs"]], "attrs": parts[0]["attrs"]}
    path = Path(path)
    with open_h5(path, ("feat", "matches", "img_offset", "match_offset"), "mined pair file",
                 "pair data not found (build it with 'cd-sfm train mine-pairs')") as f:
        io, mo = f["img_offset"][()], f["match_offset"][()]
        is_val = f["is_val"][()]
        sel = {"all": np.arange(len(is_val)), "train": np.flatnonzero(~is_val), "val": np.flatnonzero(is_val)}[which]
        data = {k: f[k][()] for k in ("kpts", "feat", "mb", "img_size", "matches", "H", "pair_image")}
        data["F"] = f["F"][()] if "F" in f else np.full((len(is_val), 3, 3), np.nan)
        attrs = {k: f.attrs[k] for k in f.attrs}
        pairs = []
        for p in sel:
            item = {"H": data["H"][p], "F": data["F"][p], "matches": data["matches"][mo[p] : mo[p + 1]], "is_val": bool(is_val[p]),
                    "image": int(data["pair_image"][p]), "feat": [], "mb": [], "xy": [], "kpts": [], "patches": []}
            for s in (2 * p, 2 * p + 1):
                a, b = io[s], io[s + 1]
                w, h = data["img_size"][s]
                xy = data["kpts"][a:b]
                item["kpts"].append(xy)
                item["xy"].append(normalized_keypoints(xy, w, h))
                item["feat"].append(data["feat"][a:b])
                item["mb"].append(data["mb"][a:b].astype(np.float32))
                if patches:
                    item["patches"].append(f["patches"][a:b])
            pairs.append(item)
    return {"pairs": pairs, "attrs": attrs}


# --------------------------------------------------------------------------------------------------------------------
# image pairs of SfM reconstructions (real viewpoint change)


@dataclass
class SfmPairConf:
    max_keypoints: int = 4096  # the largest keypoints of an image (its whole set at inference is of this order)
    min_common: int = 60  # co-visible 3D points of a pair
    pairs_per_scene: int = 16  # training pairs per reconstruction at most
    val_pairs_per_scene: int = 4
    seed: int = 0


def _sfm_pair_geometry(rec, a: int, b: int) -> np.ndarray:
    """F of images ``a`` -> ``b`` of a pycolmap model, for keypoints in OpenCV pixels (COLMAP's are +0.5)."""
    from ..geometry import fundamental_from_pose

    ia, ib = rec.images[a], rec.images[b]
    pa, pb = ia.cam_from_world(), ib.cam_from_world()
    rel = pb * pa.inverse()
    Ka = rec.cameras[ia.camera_id].calibration_matrix()
    Kb = rec.cameras[ib.camera_id].calibration_matrix()
    F = fundamental_from_pose(Ka, Kb, np.asarray(rel.rotation.matrix()), np.asarray(rel.translation))
    S = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
    return S.T @ F @ S


def sfm_scene_pairs(work_dir: Path, val_names: set, conf: SfmPairConf) -> list[dict]:
    """Image pairs of one reconstruction work folder (``cd-sfm train mine --work-dir``: ``summary.json``,
    ``features.h5``, ``sparse/*``): every keypoint of both images (the ``max_keypoints`` largest), ground truth =
    keypoints of the same 3D point, F from the model's poses. A pair with a held-out image (``val_names``: full
    paths) is a validation pair; training pairs have none."""
    import pycolmap

    summary = json.loads((work_dir / "summary.json").read_text())
    image_dir = Path(summary["image_dir"])
    rng = np.random.default_rng(_seed_for(conf.seed + 2000, work_dir.name))
    out = []
    for model_dir in sorted((work_dir / "sparse").glob("[0-9]*")):
        rec = pycolmap.Reconstruction(str(model_dir))
        ids = sorted(rec.reg_image_ids())
        tracks = {}
        for i in ids:
            pts = rec.images[i].points2D
            tracks[i] = np.array([p.point3D_id if p.has_point3D() else -1 for p in pts], np.int64)
        cand = []
        for x in range(len(ids)):
            for y in range(x + 1, len(ids)):
                a, b = ids[x], ids[y]
                ta, tb = tracks[a], tracks[b]
                common = len(np.intersect1d(ta[ta >= 0], tb[tb >= 0]))
                if common >= conf.min_common:
                    na, nb = (str(image_dir / rec.images[k].name) for k in (a, b))
                    cand.append((a, b, common, na in val_names or nb in val_names))
        for val in (False, True):
            c = [t for t in cand if t[3] == val]
            k = min(len(c), conf.val_pairs_per_scene if val else conf.pairs_per_scene)
            if k:
                w = np.array([t[2] for t in c], np.float64)
                pick = rng.choice(len(c), k, replace=False, p=w / w.sum())
                out += [{"rec": rec, "a": c[i][0], "b": c[i][1], "is_val": val, "tracks": tracks,
                         "image_dir": image_dir, "features": work_dir / "features.h5"} for i in sorted(pick)]
    return out


SIDE_CACHE = 32  # images whose keypoints, patches and descriptors mine_sfm_pairs keeps (a scene's worth)


def _sfm_side(pair: dict, which: str, conf: SfmPairConf, cache: dict) -> dict:
    """Keypoints (the largest ``max_keypoints``), their patches and track ids of one image of an SfM pair."""
    from .homography import load_gray

    rec = pair["rec"]
    iid = pair[which]
    name = rec.images[iid].name
    key = (str(pair["features"]), name)
    if key not in cache:
        with h5py.File(pair["features"], "r") as f:
            g = f[name]
            kp, sc = g["keypoints"][()].astype(np.float32), g["scales"][()].astype(np.float32)
            ang = np.mod(np.rad2deg(g["orientations"][()].astype(np.float32)), 360.0)
            size = g["image_size"][()].astype(np.int32)
            stored = int(g.attrs.get("exif_orientation", 1)) != 1
        keep = np.sort(np.argsort(-sc, kind="stable")[: conf.max_keypoints])
        gray = load_gray(pair["image_dir"] / name, max_size=10**6, stored_pixels=stored)
        h, w = gray.shape
        s = np.array([w / size[0], h / size[1]], np.float32)
        xy = (kp[keep] + 0.5) * s - 0.5
        patches = extract_patches(gray, xy, sc[keep] * float(s.mean()), ang[keep], standardize=False)
        while len(cache) >= SIDE_CACHE:  # pairs of a scene come together: its images are what the cache holds
            cache.pop(next(iter(cache)))
        cache[key] = {"keypoints": kp[keep], "scales": sc[keep], "angles": ang[keep], "size": size,
                      "patches": np.clip(np.round(patches), 0, 255).astype(np.uint8), "keep": keep,
                      "described": {}}  # the frozen model's descriptors, filled once per image by the caller
    side = dict(cache[key])
    side["track"] = pair["tracks"][iid][side["keep"]]
    return side


def mine_sfm_pairs(work_dirs, out_path, local_weights, val_names, conf: SfmPairConf = SfmPairConf()) -> dict:
    """Pairs of SfM reconstructions (see :func:`sfm_scene_pairs`) in the layout of :func:`mine_pairs` (``F`` set,
    ``H`` NaN), described with the frozen ``local_weights``; written to a ``.part`` file renamed when complete."""
    runner = load_local_runner(local_weights)
    pairs = [p for d in work_dirs for p in sfm_scene_pairs(Path(d), set(val_names), conf)]
    if not pairs:
        raise CdSfmError("mine-sfm-pairs: no image pairs with enough co-visible 3D points")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".part")
    names, n_matches, cache = [], 0, {}
    with h5py.File(tmp, "w") as f:
        wr = _Writer(f)
        for p in tqdm(pairs, desc="mine sfm pairs", unit="pair"):
            sides = [_sfm_side(p, "a", conf, cache), _sfm_side(p, "b", conf, cache)]
            ta, tb = sides[0]["track"], sides[1]["track"]
            common, ia, ib = np.intersect1d(ta, tb, assume_unique=False, return_indices=True)
            ok = common >= 0
            matches = np.stack([ia[ok], ib[ok]], -1).astype(np.int32)
            feats, mbs = [], []
            for sd in sides:
                d = sd["described"]  # shared with the cache: each image goes through the network once
                if not d:
                    d["feat"], d["mb"] = runner.local(sd["patches"].astype(np.float32))
                feats.append(d["feat"])
                mbs.append(d["mb"])
            names.append(str(p["image_dir"] / p["rec"].images[p["a"]].name))
            wr.add({"images": sides, "matches": matches, "F": _sfm_pair_geometry(p["rec"], p["a"], p["b"])},
                   feats, mbs, len(names) - 1, p["is_val"])
            n_matches += len(matches)
        wr.close()
        f.attrs["image_names"] = json.dumps(names)
        f.attrs["val_images"] = json.dumps(sorted(set(val_names)))
        f.attrs["conf"] = json.dumps(asdict(conf))
        f.attrs["local_model"] = str(local_weights)
        f.attrs["source"] = "sfm_pairs"
    tmp.replace(out_path)
    n_val = sum(p["is_val"] for p in pairs)
    logger.info("mined %d SfM pairs (%d validation, %d correspondences) into %s", len(pairs), n_val, n_matches,
                out_path)
    return {"pairs": len(pairs), "val_pairs": n_val, "matches": n_matches, "path": str(out_path)}


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="cd-sfm train mine-pairs", description=__doc__.split("\n")[0])
    p.add_argument("output", help="output .h5")
    p.add_argument("--images", nargs="*", default=None,
                   help="image folders/files (default: the TRAIN scenes of configs/split.yaml)")
    p.add_argument("--local", default=FULL_MODEL, help="frozen local model: registry name, folder or .npz")
    p.add_argument("--warps-per-image", type=int, default=PairMineConf.warps_per_image)
    p.add_argument("--val-warps-per-image", type=int, default=PairMineConf.val_warps_per_image)
    p.add_argument("--max-size", type=int, default=PairMineConf.max_size)
    p.add_argument("--max-rotation", type=float, default=HomographyConf.rotation_deg, help="degrees (uniform +-)")
    p.add_argument("--max-scale", type=float, default=HomographyConf.scale_max,
                   help="overall scale log-uniform in [1/s, s]")
    p.add_argument("--upright", action="store_true")
    p.add_argument("--val-every", type=int, default=PairMineConf.val_every)
    p.add_argument("--seed", type=int, default=0)
    return p


def cli_mine_pairs(args) -> dict:
    if not isinstance(args, argparse.Namespace):
        args = build_parser().parse_args(args)
    require_h5_path(args.output)
    images = list_images(args.images) if args.images else training_images()
    if not images:
        raise CdSfmError("mine-pairs: no images found")
    conf = PairMineConf(max_size=args.max_size, warps_per_image=args.warps_per_image,
                        val_warps_per_image=args.val_warps_per_image, upright=args.upright,
                        val_every=args.val_every, seed=args.seed,
                        homography=HomographyConf(rotation_deg=args.max_rotation, scale_min=1 / args.max_scale,
                                                  scale_max=args.max_scale))
    res = mine_pairs(images, args.output, args.local, conf)
    print(f"{res['pairs']} pairs ({res['matches']} correspondences) from {res['images']} images "
          f"({res['val_images']} validation images) -> {args.output}")
    return res


def build_sfm_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="cd-sfm train mine-sfm-pairs",
                                          description="image pairs of SfM reconstructions -> augmentation pair data")
    p.add_argument("output", help="output .h5")
    p.add_argument("work_dirs", nargs="+",
                   help="reconstruction work folders of 'cd-sfm train mine --work-dir' (summary.json, features.h5, "
                        "sparse/); a folder holding such folders is expanded")
    p.add_argument("--val-from", required=True,
                   help="an .h5 of 'cd-sfm train mine' (its held-out images make the validation pairs) or a text "
                        "file of held-out image paths, one per line")
    p.add_argument("--local", default=FULL_MODEL, help="frozen local model: registry name, folder or .npz")
    d = SfmPairConf()
    p.add_argument("--max-keypoints", type=int, default=d.max_keypoints)
    p.add_argument("--min-common", type=int, default=d.min_common, help="co-visible 3D points of a pair")
    p.add_argument("--pairs-per-scene", type=int, default=d.pairs_per_scene)
    p.add_argument("--val-pairs-per-scene", type=int, default=d.val_pairs_per_scene)
    p.add_argument("--seed", type=int, default=d.seed)
    return p


def sfm_work_dirs(paths) -> list[Path]:
    """Reconstruction work folders among ``paths`` (each one, or the folders directly under it)."""
    out = []
    for p in map(Path, paths):
        if (p / "summary.json").is_file():
            out.append(p)
        elif p.is_dir():
            out += sorted(q for q in p.iterdir() if (q / "summary.json").is_file() and (q / "sparse").is_dir())
        else:
            raise CdSfmError(f"{p}: not a reconstruction work folder (no summary.json)")
    if not out:
        raise CdSfmError(f"{', '.join(map(str, paths))}: no reconstruction work folders (summary.json + sparse/)")
    return out


def held_out_names(path) -> list[str]:
    """Held-out image paths from a mined .h5 (``val_images`` attribute) or a text file (one per line)."""
    path = Path(path)
    if not path.is_file():
        raise CdSfmError(f"{path}: file not found")
    if path.suffix.lower() in (".h5", ".hdf5"):
        with h5py.File(path, "r") as f:
            if "val_images" not in f.attrs:
                raise CdSfmError(f"{path}: no val_images attribute (not a file of 'cd-sfm train mine')")
            return list(json.loads(f.attrs["val_images"]))
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def cli_mine_sfm_pairs(args) -> dict:
    if not isinstance(args, argparse.Namespace):
        args = build_sfm_parser().parse_args(args)
    require_h5_path(args.output)
    conf = SfmPairConf(max_keypoints=args.max_keypoints, min_common=args.min_common,
                       pairs_per_scene=args.pairs_per_scene, val_pairs_per_scene=args.val_pairs_per_scene,
                       seed=args.seed)
    res = mine_sfm_pairs(sfm_work_dirs(args.work_dirs), args.output, args.local, held_out_names(args.val_from), conf)
    print(f"{res['pairs']} SfM pairs ({res['val_pairs']} validation, {res['matches']} correspondences) -> "
          f"{args.output}")
    return res


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return cli_mine_pairs(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
