"""Patch pairs of the same physical point from SfM tracks of the TRAIN scenes (``cd-sfm train mine``).

Each scene folder is reconstructed with the SIFT pipeline (:func:`cd_sfm.pipeline.reconstruct`, one work folder per
scene, reused when it already holds a model: resumable). Every 3D point of the model(s) ``sparse/*`` whose mean
reprojection error is at most ``max_reproj_error`` and whose track has at least ``min_track_length`` views is a group
of patches of one scene point seen from different views, each with its own SIFT keypoint size and orientation (read
from ``features.h5``: OpenCV pixel convention, sizes = ``KeyPoint.size``, orientations = radians of
``KeyPoint.angle``, both in the original image frame, see :mod:`cd_sfm.features.sift`).

Pairs: all view pairs of a track, at most ``max_pairs_per_track`` of them, the widest first (score = viewing-angle
difference / 15 deg + |log2 size ratio| + a random jitter in [0, 1), so among similar pairs the choice varies).
Patches are cut with the vectorised :func:`cd_sfm.features.patches.extract_patches` from the image at the resolution
the features were detected at (longest side = the feature preset's ``max_image_size``; default 1024 as the
homography miner), all sides of an image at once, after one photometric augmentation of that image
(:func:`cd_sfm.train.homography.photometric_augment`).

Rotation: patches are sampled in the frame of each view's own SIFT orientation, which is what the non-upright model
sees at test time; the real orientation errors of SIFT between views are thus in the data and no extra rotation is
needed for invariance. ``rotation="shared"`` adds one uniform random angle to both views of a pair (more variety of
patch content orientation, no change of the relative frame); ``angle_jitter_deg`` adds independent Gaussian noise per
view. Both are off by default. ``upright`` samples with angle 0 (upright model), where neither is applied.

Validation (same rule as the homography miner and ``configs/split.yaml``): the images of all given scene folders,
listed and sorted exactly as ``mine-homography`` lists them, index % ``val_every`` == ``val_offset`` are held out; a
track with any view in a held-out image is a validation track and all its pairs are validation pairs, so no held-out
image and no held-out 3D point is ever trained on (``val_mode="track"``, the default). That costs many training
tracks on small scenes (with ~10 images per scene, one is held out and a third or more of the tracks see it);
``val_mode="view"`` keeps the pairs among a track's training views for training and makes validation pairs only of
pairs with a held-out view: still no held-out image is trained on (the homography validation stays clean), but the
other view of a validation pair may have been trained on (the SfM validation numbers are then optimistic).

Output (one h5, written atomically): the layout of :func:`cd_sfm.train.homography.mine_homography`, which
``cd-sfm train local`` reads: ``patches`` (N, 2, 32, 32) uint8, ``scales`` (N, 2) float32 (sizes in the sampled
image), ``kpt_ids`` (N,) int64 (global track id: in-batch duplicates are masked), ``image_ids`` (N,) int32 (image of
view 0), ``is_val`` (N,) bool; plus ``pair_image_ids`` (N, 2), ``angles`` (N, 2) (degrees, as sampled),
``view_angle_deg`` (N,) (triangulation angle of the pair). Attributes ``image_names``, ``val_images``, ``conf``,
``scenes`` (json). For augmentation training, ``images/<scene>/<image name>`` holds every image's full keypoint set in
its original pixel frame: ``keypoints`` (K, 2), ``scales`` (K,), ``angles`` (K,) degrees, ``image_size`` (w, h) and
``point3D_ids`` (K,) int64 (the global track id of the keypoint, -1 when it is in no kept track: track membership),
attributes ``path``, ``image_index``, ``is_val``, ``registered``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from ..features.patches import extract_patches
from ..geometry import l2_normalize
from ..io import CdSfmError, require_h5_path
from ..split import SPLIT_FILE, eval_dirs
from .homography import IMAGE_EXTS, PhotometricConf, _seed_for, list_images, load_gray, photometric_augment

logger = logging.getLogger(__name__)



@dataclass
class SfmMineConf:
    # pipeline conf of the reconstruction (partial: cd_sfm.config.DEFAULTS for the rest)
    # folders of separate pairs (wxbs, evd, ...) make models of 2 images, which COLMAP's default min_model_size (10)
    # would drop; the pipeline's fallback to the global mapper recovers scenes the incremental one cannot start
    reconstruct: dict = field(default_factory=lambda: {"features": "sift", "max_image_size": 1024, "seed": 0,
                                                       "incremental_options": {"min_model_size": 2}})
    min_track_length: int = 2
    max_reproj_error: float = 2.0  # px, mean reprojection error of the 3D point
    max_pairs_per_track: int = 6  # 0 = all view pairs
    upright: bool = False
    rotation: str = "none"  # none | shared (one random angle added to both views of a pair)
    angle_jitter_deg: float = 0.0  # independent Gaussian noise on each view's angle
    photometric: bool = True
    photometric_conf: PhotometricConf = field(default_factory=PhotometricConf)
    val_every: int = 10  # every n-th image of the sorted list of all images is held out (0: none)
    val_offset: int = 3
    val_mode: str = "track"  # track: a track with a held-out view is all validation; view: see the module doc
    seed: int = 0
    store_images: bool = True  # per-image keypoint sets + track membership (images/<scene>/<name>)


# --------------------------------------------------------------------------------------------------------------------
# scenes


def check_train_scenes(scene_dirs, split_file: Path | None = SPLIT_FILE) -> None:
    """Refuse scene folders inside an EVAL scene of the split (``cd_sfm/split.yaml``: never trained on)."""
    if split_file is None or not Path(split_file).exists():
        return
    evals = eval_dirs(split_file)
    for d in scene_dirs:
        rd = Path(d).resolve()
        for e in evals:
            if rd == e or e in rd.parents:
                raise CdSfmError(f"{d}: an EVAL scene of {split_file} (never used for training)")


def expand_scenes(scene_dirs) -> list[Path]:
    """Scene folders; a folder without images of its own whose subfolders hold images is one scene per subfolder
    (e.g. ``phototourism_samples/{piazza_san_marco,st_pauls_cathedral}``)."""
    out = []
    for d in map(Path, scene_dirs):
        if not d.is_dir():
            raise CdSfmError(f"{d}: not an image folder")
        own = [p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
        subs = sorted(p for p in d.iterdir() if p.is_dir() and list_images([p]))
        if not own and subs:
            out += subs
        elif own or subs:
            out.append(d)
        else:
            raise CdSfmError(f"{d}: no images found")
    return out


def scene_label(d: Path) -> str:
    """``<scene>/<sub>`` relative to a ``data`` folder when there is one, else the folder name."""
    parts = Path(d).resolve().parts
    if "data" in parts[:-1]:
        i = len(parts) - 1 - parts[::-1].index("data")
        return "/".join(parts[i + 1 :])
    return Path(d).name


def reconstruct_scene(scene_dir: Path, work_dir: Path, conf: SfmMineConf) -> Path:
    """Run (or reuse) the SIFT reconstruction of one scene; returns its work folder."""
    from ..pipeline import reconstruct

    if (work_dir / "summary.json").exists() and (work_dir / "sparse" / "0").is_dir():
        logger.info("%s: reusing the reconstruction in %s", scene_dir, work_dir)
        return work_dir
    reconstruct(scene_dir, work_dir, dict(conf.reconstruct), progress=False)
    return work_dir


# --------------------------------------------------------------------------------------------------------------------
# tracks


def read_tracks(work_dir: Path, max_reproj_error: float, min_track_length: int) -> dict:
    """Observations of the kept 3D points of every model in ``work_dir/sparse``: arrays ``name`` (object),
    ``kp_idx``, ``track`` (0..T-1, unique over models), ``center`` (N, 3) camera centre, ``xyz`` (N, 3)."""
    import pycolmap

    names, kp, tr, cen, xyz = [], [], [], [], []
    offset = 0
    models = sorted((p for p in (work_dir / "sparse").iterdir() if p.is_dir() and p.name.isdigit()),
                    key=lambda p: int(p.name))
    for mdir in models:
        rec = pycolmap.Reconstruction(str(mdir))
        pids = np.array(list(rec.points3D.keys()), np.int64)
        if not len(pids):
            continue
        err = np.array([p.error for p in rec.points3D.values()], np.float64)
        pxyz = np.array([p.xyz for p in rec.points3D.values()], np.float64)
        good = err <= max_reproj_error
        order = np.argsort(pids)
        pids, good, pxyz = pids[order], good[order], pxyz[order]
        for im in rec.images.values():
            if not im.has_pose:
                continue
            idx = np.asarray(im.get_observation_point2D_idxs(), np.int64)
            if not len(idx):
                continue
            pts = im.points2D
            ids = np.array([pts[i].point3D_id for i in idx], np.int64)
            r = np.searchsorted(pids, ids)
            keep = good[r]
            n = int(keep.sum())
            names += [im.name] * n
            kp.append(idx[keep])
            tr.append(r[keep] + offset)
            cen.append(np.repeat(np.asarray(im.projection_center(), np.float64)[None], n, 0))
            xyz.append(pxyz[r[keep]])
        offset += len(pids)
    if not kp:
        return {"name": np.zeros(0, object), "kp_idx": np.zeros(0, np.int64), "track": np.zeros(0, np.int64),
                "center": np.zeros((0, 3)), "xyz": np.zeros((0, 3))}
    obs = {"name": np.array(names, object), "kp_idx": np.concatenate(kp), "track": np.concatenate(tr),
           "center": np.concatenate(cen), "xyz": np.concatenate(xyz)}
    # keep tracks with enough views, renumber them 0..T-1
    uniq, inv, cnt = np.unique(obs["track"], return_inverse=True, return_counts=True)
    keep = cnt[inv] >= min_track_length
    obs = {k: v[keep] for k, v in obs.items()}
    _, obs["track"] = np.unique(obs["track"], return_inverse=True)
    return obs


def track_pairs(track: np.ndarray, max_pairs: int, rng: np.random.Generator, obs_feature=None) -> np.ndarray:
    """(P, 2) observation index pairs of the same track: all pairs of each track, at most ``max_pairs`` per track,
    the highest ``score(i, j)`` first. ``obs_feature(i, j) -> score`` is evaluated vectorised on index arrays."""
    from itertools import combinations

    order = np.argsort(track, kind="stable")
    t_sorted = track[order]
    starts = np.flatnonzero(np.r_[True, t_sorted[1:] != t_sorted[:-1]])
    lengths = np.diff(np.r_[starts, len(t_sorted)])
    out = []
    for L in np.unique(lengths):
        if L < 2:
            continue
        st = starts[lengths == L]
        members = order[st[:, None] + np.arange(L)[None]]  # (T_L, L)
        comb = np.array(list(combinations(range(L), 2)), np.int64)  # (C, 2)
        pairs = members[:, comb]  # (T_L, C, 2)
        if max_pairs and len(comb) > max_pairs:
            s = obs_feature(pairs[..., 0], pairs[..., 1]) if obs_feature is not None else np.zeros(pairs.shape[:2])
            s = s + rng.random(s.shape)
            top = np.argsort(-s, axis=1)[:, :max_pairs]
            pairs = np.take_along_axis(pairs, top[..., None], 1)
        out.append(pairs.reshape(-1, 2))
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


# --------------------------------------------------------------------------------------------------------------------
# mining


def _read_features(features_path: Path, names) -> dict:
    out = {}
    with h5py.File(features_path, "r") as f:
        for n in names:
            g = f[n]
            out[n] = {"keypoints": g["keypoints"][()].astype(np.float64), "scales": g["scales"][()].astype(np.float64),
                      "angles": np.mod(np.rad2deg(g["orientations"][()].astype(np.float64)), 360.0),
                      "image_size": g["image_size"][()].astype(np.int64),
                      # entries of images with an EXIF orientation are in the file's stored pixels (newer files)
                      "stored_pixels": int(g.attrs.get("exif_orientation", 1)) != 1}
    return out


def mine_scene(scene_dir: Path, work_dir: Path, conf: SfmMineConf, image_index: dict, is_val_img: dict,
               track_offset: int, rng: np.random.Generator):
    """Pairs of one reconstructed scene; returns (arrays dict, per-image keypoint sets, stats)."""
    from .. import config as config_mod
    from ..images import list_images as list_scene_images

    pconf = config_mod.resolve(dict(conf.reconstruct))
    max_size = pconf.features.extraction_conf().get("max_image_size") or 100000
    obs = read_tracks(work_dir, conf.max_reproj_error, conf.min_track_length)
    all_names = list_scene_images(scene_dir)
    with h5py.File(work_dir / "features.h5", "r") as f:
        feat_names = [n for n in all_names if n in f]
    feats = _read_features(work_dir / "features.h5", feat_names)
    n_obs = len(obs["kp_idx"])
    full = {n: scene_dir / n for n in feat_names}
    # per-observation keypoint (original frame)
    size0 = np.zeros(n_obs)
    ang0 = np.zeros(n_obs)
    for n in np.unique(obs["name"]) if n_obs else []:
        m = obs["name"] == n
        size0[m] = feats[n]["scales"][obs["kp_idx"][m]]
        ang0[m] = feats[n]["angles"][obs["kp_idx"][m]]
    obs_img = np.array([image_index[str(full[n])] for n in obs["name"]], np.int64) if n_obs else np.zeros(0, np.int64)
    obs_val = np.array([is_val_img[str(full[n])] for n in obs["name"]], bool) if n_obs else np.zeros(0, bool)
    n_tracks = int(obs["track"].max()) + 1 if n_obs else 0
    track_val = np.zeros(n_tracks, bool)
    np.logical_or.at(track_val, obs["track"], obs_val)

    ray = obs["xyz"] - obs["center"]
    ray = l2_normalize(ray, axis=1)

    def pair_score(i, j):
        cosang = np.clip(np.sum(ray[i] * ray[j], -1), -1, 1)
        return np.rad2deg(np.arccos(cosang)) / 15.0 + np.abs(np.log2(size0[i] / size0[j]))

    if conf.val_mode == "track":
        pairs = track_pairs(obs["track"], conf.max_pairs_per_track, rng, pair_score)
        pair_val = track_val[obs["track"][pairs[:, 0]]]
    elif conf.val_mode == "view":
        # training pairs among the views in training images; validation pairs: those with a held-out view
        tr = np.flatnonzero(~obs_val)
        p_tr = tr[track_pairs(obs["track"][tr], conf.max_pairs_per_track, rng,
                              lambda i, j: pair_score(tr[i], tr[j]))]
        p_all = track_pairs(obs["track"], 0, rng)
        p_va = p_all[obs_val[p_all].any(1)]
        pairs = np.concatenate([p_tr, p_va]).astype(np.int64)
        pair_val = np.r_[np.zeros(len(p_tr), bool), np.ones(len(p_va), bool)]
    else:
        raise CdSfmError(f"val_mode {conf.val_mode!r}: expected track or view")
    npair = len(pairs)
    view_angle = np.rad2deg(np.arccos(np.clip(np.sum(ray[pairs[:, 0]] * ray[pairs[:, 1]], -1), -1, 1))) \
        if npair else np.zeros(0)
    # angles per pair side
    ang = ang0[pairs] if npair else np.zeros((0, 2))
    if not conf.upright:
        if conf.rotation == "shared":
            ang = ang + rng.uniform(0, 360, (npair, 1))
        elif conf.rotation != "none":
            raise CdSfmError(f"rotation {conf.rotation!r}: expected none or shared")
        if conf.angle_jitter_deg:
            ang = ang + rng.normal(0, conf.angle_jitter_deg, ang.shape)
        ang = np.mod(ang, 360.0)
    patches = np.zeros((npair, 2, 32, 32), np.uint8)
    scales = np.zeros((npair, 2), np.float32)
    side_obs = pairs.reshape(-1)
    side_name = obs["name"][side_obs] if npair else np.zeros(0, object)
    for n in tqdm(list(np.unique(side_name)), desc=f"patches {scene_label(scene_dir)}", unit="img", leave=False):
        sel = np.flatnonzero(side_name == n)
        gray = load_gray(full[n], max_size, stored_pixels=feats[n]["stored_pixels"])
        W0, H0 = feats[n]["image_size"]
        h, w = gray.shape
        if abs(W0 / H0 - w / h) > 0.02:
            raise CdSfmError(f"{full[n]}: image is {w}x{h} but its features were made on {W0}x{H0}")
        s = np.array([w / W0, h / H0])
        o = side_obs[sel]
        xy = (feats[n]["keypoints"][obs["kp_idx"][o]] + 0.5) * s - 0.5
        sz = size0[o] * s.mean()
        img = photometric_augment(gray, rng, conf.photometric_conf) if conf.photometric else gray.astype(np.float32)
        p = extract_patches(img, xy, sz, ang.reshape(-1)[sel], upright=conf.upright, standardize=False)
        patches.reshape(-1, 32, 32)[sel] = np.clip(np.rint(p), 0, 255).astype(np.uint8)
        scales.reshape(-1)[sel] = sz
    pid = obs_img[pairs] if npair else np.zeros((0, 2), np.int64)
    arrays = {
        "patches": patches,
        "scales": scales,
        "kpt_ids": (obs["track"][pairs[:, 0]] + track_offset).astype(np.int64) if npair else np.zeros(0, np.int64),
        "image_ids": pid[:, 0].astype(np.int32),
        "is_val": pair_val.astype(bool),
        "pair_image_ids": pid.astype(np.int32),
        "angles": ang.astype(np.float32),
        "view_angle_deg": view_angle.astype(np.float32),
    }
    # per-image keypoint sets with the global track id of each keypoint
    images = {}
    registered = set(obs["name"].tolist()) if n_obs else set()
    for n in feat_names:
        k = feats[n]
        p3d = np.full(len(k["scales"]), -1, np.int64)
        m = obs["name"] == n
        if m.any():
            p3d[obs["kp_idx"][m]] = obs["track"][m] + track_offset
        images[n] = {"keypoints": k["keypoints"].astype(np.float32), "scales": k["scales"].astype(np.float32),
                     "angles": k["angles"].astype(np.float32), "image_size": k["image_size"].astype(np.int32),
                     "point3D_ids": p3d, "_path": str(full[n]), "_index": image_index[str(full[n])],
                     "_val": is_val_img[str(full[n])], "_registered": n in registered}
    summary = json.loads((work_dir / "summary.json").read_text()) if (work_dir / "summary.json").exists() else {}
    stats = {"scene": scene_label(scene_dir), "images": len(all_names),
             "registered": summary.get("num_images_registered"), "points3D": summary.get("num_points3D"),
             "tracks": n_tracks, "val_tracks": int(track_val.sum()), "observations": n_obs, "pairs": npair,
             "val_pairs": int(arrays["is_val"].sum()),
             "mean_track_length": float(n_obs / n_tracks) if n_tracks else 0.0,
             "median_view_angle_deg": float(np.median(view_angle)) if npair else 0.0}
    return arrays, images, stats, n_tracks


def mine_sfm(scene_dirs, out_path, conf: SfmMineConf = SfmMineConf(), work_dir=None,
             split_file: Path | None = SPLIT_FILE) -> dict:
    """Reconstruct every scene (resumable) and write the mined pairs to ``out_path`` (layout in the module doc)."""
    scene_dirs = [Path(d) for d in scene_dirs]
    if not scene_dirs:
        raise CdSfmError("mine: no scene folders given")
    for d in scene_dirs:
        if not d.is_dir():
            raise CdSfmError(f"{d}: not an image folder")
    check_train_scenes(scene_dirs, split_file)
    scenes = expand_scenes(scene_dirs)
    out_path = Path(out_path)
    work_root = Path(work_dir) if work_dir else out_path.with_name(out_path.stem + "_work")
    # the image list and held-out rule of the homography miner (same folders -> same held-out images)
    all_images = [str(p) for p in list_images(scene_dirs)]
    image_index = {n: i for i, n in enumerate(all_images)}
    val = [(i % conf.val_every) == conf.val_offset % conf.val_every if conf.val_every else False
           for i in range(len(all_images))]
    is_val_img = dict(zip(all_images, val))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(out_path.suffix + ".part")
    total, track_offset = 0, 0
    stats_all = []
    with h5py.File(tmp, "w") as f:
        ds = {}
        for scene in tqdm(scenes, desc="mine sfm", unit="scene"):
            label = scene_label(scene)
            t0 = time.time()
            wd = work_root / label.replace("/", "__")
            try:
                reconstruct_scene(scene, wd, conf)
            except CdSfmError as e:
                logger.warning("%s: not reconstructed (%s); skipped", scene, e)
                stats_all.append({"scene": label, "error": str(e)})
                continue
            t_rec = time.time() - t0
            rng = np.random.default_rng(_seed_for(conf.seed, label))
            arrays, images, st, n_tracks = mine_scene(scene, wd, conf, image_index, is_val_img, track_offset, rng)
            m = len(arrays["kpt_ids"])
            for k, v in arrays.items():
                if k not in ds:
                    ds[k] = f.create_dataset(k, (0,) + v.shape[1:], v.dtype, maxshape=(None,) + v.shape[1:],
                                             chunks=(256,) + v.shape[1:] if k == "patches" else True)
                ds[k].resize(total + m, axis=0)
                ds[k][total:] = v
            if conf.store_images:
                for n, d in images.items():
                    g = f.require_group(f"images/{label}/{n}")
                    for k, v in d.items():
                        if not k.startswith("_"):
                            g.create_dataset(k, data=v)
                    g.attrs.update(path=d["_path"], image_index=d["_index"], is_val=d["_val"],
                                   registered=d["_registered"], scene=label)
            total += m
            track_offset += n_tracks
            st["seconds_reconstruct"] = round(t_rec, 1)
            st["seconds_total"] = round(time.time() - t0, 1)
            stats_all.append(st)
            logger.info("%s: %s", label, st)
        if not ds:  # no scene gave anything: still a valid (empty) file
            for k, shape, dt in (("patches", (2, 32, 32), np.uint8), ("scales", (2,), np.float32),
                                 ("kpt_ids", (), np.int64), ("image_ids", (), np.int32), ("is_val", (), bool)):
                f.create_dataset(k, (0,) + shape, dt, maxshape=(None,) + shape)
        f.attrs["image_names"] = json.dumps(all_images)
        f.attrs["val_images"] = json.dumps([n for n, v in zip(all_images, val) if v])
        f.attrs["conf"] = json.dumps(asdict(conf))
        f.attrs["scenes"] = json.dumps(stats_all)
        f.attrs["source"] = "sfm_tracks"
    tmp.replace(out_path)
    n_val = sum(s.get("val_pairs", 0) for s in stats_all)
    logger.info("mined %d pairs (%d validation) from %d tracks of %d scenes into %s", total, n_val, track_offset,
                len(scenes), out_path)
    return {"pairs": total, "val_pairs": n_val, "tracks": track_offset, "scenes": stats_all, "path": str(out_path)}


# --------------------------------------------------------------------------------------------------------------------
# command line


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="cd-sfm train mine", description=__doc__.split("\n")[0])
    d = SfmMineConf()
    p.add_argument("inputs", nargs="+", help="TRAIN scene image folders (one reconstruction each), then the output .h5")
    p.add_argument("--work-dir", default="", help="reconstructions, one subfolder per scene (reused: resumable); "
                                                  "default <out>_work next to the output")
    p.add_argument("--max-pairs-per-track", type=int, default=d.max_pairs_per_track, help="0: all view pairs")
    p.add_argument("--max-reproj-error", type=float, default=d.max_reproj_error)
    p.add_argument("--min-track-length", type=int, default=d.min_track_length)
    p.add_argument("--max-image-size", type=int, default=d.reconstruct["max_image_size"],
                   help="longest side for the SIFT reconstruction and the patches")
    p.add_argument("--rotation", choices=["none", "shared"], default=d.rotation)
    p.add_argument("--angle-jitter", type=float, default=d.angle_jitter_deg, help="degrees, per view")
    p.add_argument("--no-photometric", action="store_true")
    p.add_argument("--upright", action="store_true")
    p.add_argument("--val-every", type=int, default=d.val_every, help="hold out every n-th image (0: none)")
    p.add_argument("--val-mode", choices=["track", "view"], default=d.val_mode,
                   help="track: tracks seen in a held-out image are all validation; view: only their held-out views")
    p.add_argument("--seed", type=int, default=0)
    return p


def cli_mine_sfm(args) -> dict:
    if not isinstance(args, argparse.Namespace):
        args = build_parser().parse_args(args)
    if len(args.inputs) < 2:
        raise CdSfmError("mine: give scene folders and the output .h5")
    *dirs, out = args.inputs
    require_h5_path(out)
    d = SfmMineConf()
    conf = SfmMineConf(
        reconstruct={**d.reconstruct, "max_image_size": args.max_image_size, "seed": args.seed},
        min_track_length=args.min_track_length, max_reproj_error=args.max_reproj_error,
        max_pairs_per_track=args.max_pairs_per_track, upright=args.upright, rotation=args.rotation,
        angle_jitter_deg=args.angle_jitter, photometric=not args.no_photometric, val_every=args.val_every,
        val_mode=args.val_mode, seed=args.seed,
    )
    res = mine_sfm(dirs, out, conf, work_dir=args.work_dir or None)
    for s in res["scenes"]:
        if "error" in s:
            print(f"{s['scene']}: skipped ({s['error']})")
        else:
            print(f"{s['scene']}: {s['registered']}/{s['images']} images registered, {s['tracks']} tracks, "
                  f"{s['pairs']} pairs ({s['val_pairs']} validation), {s['seconds_total']:.0f} s")
    print(f"{res['pairs']} pairs ({res['val_pairs']} validation) from {res['tracks']} tracks -> {out}")
    return res


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return cli_mine_sfm(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
