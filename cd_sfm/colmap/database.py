"""Write a COLMAP database from our hloc-style ``features.h5`` / ``matches.h5`` / ``pairs.txt``.

What goes in (all through ``pycolmap.Database``, so the schema is whatever the installed COLMAP expects):

* cameras, grouped by ``camera_mode``:
  ``auto``: images share a camera when they have the same size and the same EXIF make, model and focal length; images
  without an EXIF focal length share one camera per folder and size when their names read as frames of one capture
  (numbered: video frames, an EXIF-stripped photo series), else each gets its own (as COLMAP's default);
  ``single``: one camera for all (one per image size if sizes differ, with a warning);
  ``per-folder``: one camera per sub-folder (and size); ``per-image``: one camera per image.
  Model from ``camera_model`` (default ``SIMPLE_RADIAL``). Focal length: from EXIF when present (marked as a prior,
  ``has_prior_focal_length``), else ``default_focal_factor * max(width, height)`` (marked as a prior only when
  ``prior_focal_length`` is set). Principal point at the image centre.
* one trivial rig per camera and one frame per image (COLMAP >= 3.12 layout);
* images (names relative to the image root, as COLMAP does);
* keypoints as an (N, 4) ``[x, y, scale, orientation]`` matrix: ``x, y`` shifted by +0.5 from our OpenCV convention to
  COLMAP's (centre of the top-left pixel is (0.5, 0.5)), ``scale = KeyPoint.size / 2`` (the Gaussian sigma, as
  COLMAP's SIFT reports it) and ``orientation`` in radians;
* descriptors as uint8, so COLMAP's own matchers (``colmap exhaustive_matcher``, ``pycolmap.match_exhaustive``) run on
  our database (see :func:`descriptors_to_uint8`);
* raw matches of every pair in the pair list;
* optionally the two-view geometries (``verification`` conf, see ``verify.py``) before the file is put in place.

The database is written to a temporary file next to the target and renamed over it when complete, so a killed run
never leaves a half-written ``database.db``.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from ..geometry import l2_normalize
from ..io import CdSfmError, check_feature_entry, check_matches_entry, find_pair, list_h5_names, parse_pairs, writing

logger = logging.getLogger(__name__)

CAMERA_MODES = ("auto", "single", "per-folder", "per-image")
DESCRIPTOR_UINT8_MODES = ("auto", "sift", "shifted", "none")  # see descriptors_to_uint8

default_conf: dict[str, Any] = {
    "camera_mode": "auto",
    "camera_model": "SIMPLE_RADIAL",
    "default_focal_factor": 1.2,
    "prior_focal_length": False,
    "descriptor_uint8": "auto",  # auto | sift | shifted | none
}


# --------------------------------------------------------------------------------------------------------------------
# descriptors


def descriptors_to_uint8(desc: np.ndarray, mode: str = "auto") -> np.ndarray:
    """Map (N, D) float descriptors to uint8 rows that COLMAP's SIFT matchers compare sensibly.

    COLMAP compares uint8 descriptors by their dot product divided by 512**2 (the cosine of two unit vectors stored
    as ``round(512 * d)``, each entry clipped to 255: ``FeatureDescriptorsToUnsignedByte``). So:

    * ``sift``: rows are L2-normalised, then ``clip(round(512 * d), 0, 255)``: exactly COLMAP's own convention; right
      for non-negative descriptors (SIFT, RootSIFT).
    * ``shifted``: for signed descriptors (e.g. ContextDesc), which that convention would half erase. Each row is
      centred (its mean subtracted) and L2-normalised, then shifted by ``2/sqrt(D)`` (clipping the rare entries still
      negative, about 2 %), L2-normalised again and stored as ``clip(round(512 * d), 0, 255)``. Centred unit rows
      shifted by the same constant all keep the same norm, so the stored dot product is ``(a.b + 4) / 5``: monotonic
      in the centred cosine ``a.b``, and COLMAP's angle ratio test is, for small angles, the ratio of the original L2
      distances (its absolute ``max_distance`` becomes about sqrt(5) times looser). On rotated (signed) SIFT rows of a
      real image pair the stored nearest neighbour agrees with the float one for 89 % of all keypoints and 100 % of
      those passing a 0.8 ratio test, and the 0.8 ratio decision agrees for 99 %.
    * ``auto``: ``sift`` when every entry is >= 0, else ``shifted``.
    """
    d = np.asarray(desc, np.float32)
    if d.ndim != 2:
        raise ValueError(f"descriptors must be (N, D), got shape {d.shape}")
    if mode == "auto":
        mode = "sift" if d.size == 0 or float(d.min()) >= 0 else "shifted"
    if mode == "sift":
        d = l2_normalize(d, axis=1)
    if mode == "shifted":
        d = l2_normalize(d - d.mean(axis=1, keepdims=True), axis=1)
        d = l2_normalize(np.maximum(d + 2.0 / np.sqrt(d.shape[1]), 0.0), axis=1)
    elif mode != "sift":
        raise ValueError(f"unknown descriptor_uint8 mode {mode!r} ({', '.join(DESCRIPTOR_UINT8_MODES)})")
    return np.clip(np.round(512.0 * d), 0, 255).astype(np.uint8)


def keypoints_to_colmap(keypoints: np.ndarray, scales: np.ndarray | None,
                        orientations: np.ndarray | None) -> np.ndarray:
    """(N, 4) float32 ``[x + 0.5, y + 0.5, size / 2, orientation]`` (see the module docstring)."""
    kp = np.asarray(keypoints, np.float32).reshape(-1, 2) + 0.5
    n = len(kp)
    sc = np.ones(n, np.float32) if scales is None else np.asarray(scales, np.float32).reshape(n) / 2.0
    ori = np.zeros(n, np.float32) if orientations is None else np.asarray(orientations, np.float32).reshape(n)
    return np.ascontiguousarray(np.column_stack([kp, sc, ori]).astype(np.float32))


# --------------------------------------------------------------------------------------------------------------------
# cameras


@dataclass
class CameraSpec:
    width: int
    height: int
    focal: float
    has_prior: bool


def _image_meta(image_dir: Path | None, name: str, size: tuple[int, int]) -> dict:
    """EXIF make / model / focal (pixels, scaled to ``size``) / GPS position (latitude, longitude, altitude) of an
    image, or empties when unknown."""
    meta = {"make": None, "model": None, "focal_px": None, "gps": None}
    if image_dir is None:
        return meta
    path = image_dir / name
    if not path.exists():
        return meta
    try:
        from ..images import image_info

        info = image_info(path)
    except Exception as e:  # an unreadable header only costs us the EXIF prior
        logger.debug("No EXIF for %s: %s", path, e)
        return meta
    focal = getattr(info, "focal_px", None)
    if focal is not None and info.width and info.height:
        # EXIF focal in the pixels of the image as read; rescale if the features were reported at another size
        focal = float(focal) * max(size) / max(info.width, info.height)
    meta.update(make=getattr(info, "make", None), model=getattr(info, "model", None), focal_px=focal,
                gps=getattr(info, "gps", None))
    return meta


def _one_capture(names: Sequence[str], metas: dict[str, dict]) -> bool:
    """``camera_mode: auto``: whether the images without an EXIF focal length read as frames of one capture (at least
    3, numbered names: :func:`cd_sfm.images.numbered_sequence`), so that they share a camera per folder and size.
    Video frames and EXIF-stripped captures are one camera; a collection of unrelated photos (Internet ids) is not.
    Measured on the TRAIN scenes of ``more/`` with ground truth (docs/mapping.md, "Cameras without EXIF")."""
    from ..images import numbered_sequence

    bare = [n for n in names if metas.get(n, {}).get("focal_px") is None]
    if len(bare) < 3 or not numbered_sequence(bare):
        return False
    logger.info("camera_mode auto: the %d images without an EXIF focal length read as frames of one capture "
                "(numbered names): they share one camera per folder and size (camera_mode: per-image keeps one each)",
                len(bare))
    return True


def group_cameras(
    names: Sequence[str], sizes: dict[str, tuple[int, int]], metas: dict[str, dict], conf: dict
) -> tuple[list[CameraSpec], dict[str, int]]:
    """Decide the cameras: returns the camera specs and, per image name, the index of its camera. The images of a rig
    camera (a ``conf["rig_prefixes"]`` their names start with) share one camera whatever the mode."""
    mode = conf["camera_mode"]
    if mode not in CAMERA_MODES:
        raise CdSfmError(f"camera_mode {mode!r}: expected one of {', '.join(CAMERA_MODES)}")
    factor = float(conf["default_focal_factor"])
    keys: dict[str, tuple] = {}
    capture = mode == "auto" and _one_capture(names, metas)
    prefixes = list(conf.get("rig_prefixes") or [])
    for name in names:
        w, h = sizes[name]
        meta = metas.get(name, {})
        rig_camera = next((p for p in prefixes if name.startswith(p)), None)
        if rig_camera is not None:  # a camera of a rig (rig_config): its images share intrinsics, no one else's
            keys[name] = ("rig", rig_camera, w, h)
        elif mode == "single":
            keys[name] = (w, h)
        elif mode == "per-folder":
            keys[name] = (str(Path(name).parent), w, h)
        elif mode == "per-image":
            keys[name] = (name,)
        else:  # auto
            if meta.get("focal_px") is None:
                keys[name] = ("capture", str(Path(name).parent), w, h) if capture else (name,)
            else:
                keys[name] = (w, h, meta.get("make"), meta.get("model"), round(float(meta["focal_px"]), 3))
    if mode == "single" and len({sizes[n] for n in names}) > 1:
        logger.warning("camera_mode single: images have %d different sizes; using one camera per size",
                       len({sizes[n] for n in names}))
    specs: list[CameraSpec] = []
    index: dict[tuple, int] = {}
    assign: dict[str, int] = {}
    for name in names:
        key = keys[name]
        if key not in index:
            w, h = sizes[name]
            # the group's focal: EXIF focals of its members (median), else the default guess
            members = [n for n in names if keys[n] == key]
            exif = [metas[n]["focal_px"] for n in members if metas.get(n, {}).get("focal_px") is not None]
            if exif:
                spec = CameraSpec(w, h, float(np.median(exif)), True)
            else:
                spec = CameraSpec(w, h, factor * max(w, h), bool(conf["prior_focal_length"]))
            index[key] = len(specs)
            specs.append(spec)
        assign[name] = index[key]
    return specs, assign


# --------------------------------------------------------------------------------------------------------------------
# main


def read_rig_config(path: str | Path) -> list:
    """COLMAP's ``rig_config.json`` (``colmap rig_configurator``'s format) as pycolmap ``RigConfig``s; one line naming
    the file when it cannot be read."""
    import pycolmap

    try:
        configs = pycolmap.read_rig_config(str(path))
    except Exception as e:  # noqa: BLE001 - pycolmap raises RuntimeError with the parser's message
        why = re.sub(r"^\((\d+)\):\s*", r"line \1: ", str(e).replace(str(path), "", 1).strip(": "))
        why = re.sub(r"^\[[^\]]*\]\s*Check failed:\s*\S+\s*", "", why)  # glog's check prefix
        raise CdSfmError(f"{path}: not a COLMAP rig configuration ({why})") from None
    if not configs or any(not c.cameras for c in configs):
        raise CdSfmError(f"{path}: not a COLMAP rig configuration (no rig, or a rig without cameras)")
    return configs


def rig_prefixes(configs: list) -> list[str]:
    """The ``image_prefix`` of every camera of the rigs, in the configuration's order."""
    return [cam.image_prefix for c in configs for cam in c.cameras]


def rig_poses_known(configs: list) -> bool:
    """Whether every non-reference camera of the rigs has its ``cam_from_rig`` pose in the configuration (else it is
    measured on a model mapped without the rigs first, as COLMAP's two-step recipe does)."""
    return all(cam.ref_sensor or cam.cam_from_rig is not None for c in configs for cam in c.cameras)


def apply_rig_config(database_path: str | Path, configs: list, reconstruction=None) -> dict:
    """Group the database's images into rigs and frames (``colmap rig_configurator``): images whose names match after
    their camera's ``image_prefix`` are one frame. With ``reconstruction``, the unknown rig poses are the mean of its
    registered images'. Returns counts."""
    import pycolmap

    db = pycolmap.Database.open(str(database_path))
    try:
        pycolmap.apply_rig_config(configs, db, reconstruction)
        frames = db.read_all_frames()
        return {"rigs": db.num_rigs(), "frames": len(frames),
                "frames_with_several_images": sum(len(f.data_ids) > 1 for f in frames)}
    finally:
        db.close()


def _merge_conf(conf: dict | None) -> dict:
    out = dict(default_conf)
    out.update({k: v for k, v in (conf or {}).items() if v is not None})
    return out


def main(
    conf: dict | None,
    database_path: str | Path,
    features_path: str | Path,
    image_dir: str | Path | None = None,
    pairs_path: str | Path | None = None,
    matches_path: str | Path | None = None,
    image_names: Sequence[str] | None = None,
    verification: dict | None = None,
    keep_ids: dict[str, tuple[int, int]] | None = None,
    rig_config: str | Path | None = None,
) -> dict:
    """Write ``database_path`` (replacing it) from the feature and match files; returns counts.

    ``image_names`` limits the images (default: all in ``features_path``); ``pairs_path`` + ``matches_path`` add the
    raw matches; ``verification`` (a ``verify`` conf, or ``{}`` for its defaults) also fills the two-view geometries.
    ``keep_ids`` (``{name: (image_id, camera_id)}`` of a model to extend, :func:`cd_sfm.colmap.mapping.extendable`)
    gives those images and cameras their ids in the model, which COLMAP's mapper needs to continue it; the other
    images and cameras get ids after them. Where this run's cameras no longer group the model's images as the model
    did, the ids start from 1 as usual and ``stats["kept_ids"]`` is False with ``stats["kept_ids_why"]``.
    ``rig_config`` (COLMAP's ``rig_config.json``): the images of each rig camera share one camera, and where the
    configuration gives every rig pose the images are grouped into rigs and frames here (``stats["rig"]``);
    otherwise the pipeline does it after a first mapping (:func:`apply_rig_config`).
    """
    with writing(database_path):  # a full disk is one line naming the database
        return _main(conf, database_path, features_path, image_dir, pairs_path, matches_path, image_names,
                     verification, keep_ids, rig_config)


def _assign_ids(names: Sequence[str], assign: dict[str, int], num_cameras: int,
                keep: dict[str, tuple[int, int]] | None) -> tuple[dict[str, int], list[int], str | None]:
    """Image ids by name and camera ids by camera (index of ``group_cameras``'s specs): 1, 2, ... in order, or those of
    ``keep`` for its images and their cameras, then new ones after the largest; with the reason when ``keep``
    cannot be honoured (and the plain ids)."""
    plain = ({n: i for i, n in enumerate(names, 1)}, list(range(1, num_cameras + 1)))
    if not keep:
        return (*plain, None)
    gone = [n for n in keep if n not in assign]
    if gone:
        return (*plain, f"{len(gone)} images of the model are not in this run (e.g. {gone[0]})")
    cam_of: dict[int, int] = {}  # this run's camera index -> the model's camera id
    for n, (_, cam) in keep.items():
        if cam_of.setdefault(assign[n], cam) != cam:
            other = next(m for m, (_, c) in keep.items() if assign[m] == assign[n] and c != cam)
            return (*plain, f"{n} and {other} now share a camera but had two in the model")
    if len(set(cam_of.values())) < len(cam_of):
        return (*plain, "images of one camera of the model now have two")
    next_cam = max(cam_of.values()) + 1
    camera_ids = []
    for ci in range(num_cameras):
        if ci not in cam_of:
            cam_of[ci], next_cam = next_cam, next_cam + 1
        camera_ids.append(cam_of[ci])
    next_image = max(i for i, _ in keep.values()) + 1
    image_ids = {}
    for n in names:
        if n in keep:
            image_ids[n] = keep[n][0]
        else:
            image_ids[n], next_image = next_image, next_image + 1
    return image_ids, camera_ids, None


def _main(
    conf: dict | None,
    database_path: str | Path,
    features_path: str | Path,
    image_dir: str | Path | None = None,
    pairs_path: str | Path | None = None,
    matches_path: str | Path | None = None,
    image_names: Sequence[str] | None = None,
    verification: dict | None = None,
    keep_ids: dict[str, tuple[int, int]] | None = None,
    rig_config: str | Path | None = None,
) -> dict:
    import pycolmap

    conf = _merge_conf(conf)
    configs = read_rig_config(rig_config) if rig_config else None
    if configs:
        conf["rig_prefixes"] = rig_prefixes(configs)
    database_path = Path(database_path)
    features_path = Path(features_path)
    image_dir = Path(image_dir) if image_dir is not None else None
    if not features_path.exists():
        raise CdSfmError(f"{features_path}: feature file not found")
    available = set(list_h5_names(features_path))
    names = sorted(available) if image_names is None else [n for n in image_names if n in available]
    missing = [] if image_names is None else [n for n in image_names if n not in available]
    if missing:
        logger.warning("%d images have no features in %s and are left out (e.g. %s)", len(missing), features_path,
                       missing[0])
    if not names:
        raise CdSfmError(f"{features_path}: no images with features")

    database_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = database_path.with_name(f".{database_path.name}.{os.getpid()}.tmp")
    for stale in database_path.parent.glob(f".{database_path.name}.*.tmp*"):
        stale.unlink(missing_ok=True)
    stats = {"num_images": len(names), "num_cameras": 0, "num_keypoints": 0, "num_pairs": 0, "num_matches": 0,
             "missing_pairs": 0, "num_pose_priors": 0}
    try:
        with h5py.File(features_path, "r", libver="latest") as ff:
            sizes, counts = {}, {}
            for n in names:
                counts[n] = check_feature_entry(ff[n], n, features_path)
                wh = np.asarray(ff[n]["image_size"]).reshape(-1)
                sizes[n] = (int(wh[0]), int(wh[1]))
                if min(sizes[n]) < 1:
                    raise CdSfmError(f"{features_path}: features of {n}: image_size {list(sizes[n])} is not a size")
            metas = {n: _image_meta(image_dir, n, sizes[n]) for n in names}
            specs, assign = group_cameras(names, sizes, metas, conf)
            image_ids, spec_camera_ids, why = _assign_ids(names, assign, len(specs), keep_ids)
            if keep_ids is not None:
                stats.update(kept_ids=why is None, kept_ids_why=why)
            name_to_id: dict[str, int] = {}
            db = pycolmap.Database.open(str(tmp))
            try:
                camera_ids, rig_ids = [], []
                for i, spec in zip(spec_camera_ids, specs):
                    cam = pycolmap.Camera.create_from_model_name(i, conf["camera_model"], spec.focal, spec.width,
                                                                 spec.height)
                    cam.has_prior_focal_length = spec.has_prior
                    camera_ids.append(db.write_camera(cam, use_camera_id=True))
                    rig = pycolmap.Rig(rig_id=i)
                    rig.add_ref_sensor(cam.sensor_id)
                    rig_ids.append(db.write_rig(rig, use_rig_id=True))
                stats["num_cameras"] = len(specs)
                for n in names:
                    image_id = image_ids[n]
                    ci = assign[n]
                    cam_id = camera_ids[ci]
                    frame = pycolmap.Frame(frame_id=image_id, rig_id=rig_ids[ci])
                    frame.add_data_id(pycolmap.data_t(pycolmap.sensor_t(pycolmap.SensorType.CAMERA, cam_id), image_id))
                    db.write_frame(frame, use_frame_id=True)
                    image = pycolmap.Image(name=n, camera_id=cam_id, image_id=image_id)
                    image.frame_id = image_id
                    db.write_image(image, use_image_id=True)
                    if metas[n]["gps"] is not None:  # as COLMAP's image reader: (lat, lon, alt), WGS84
                        db.write_pose_prior(pycolmap.PosePrior(
                            corr_data_id=pycolmap.data_t(pycolmap.sensor_t(pycolmap.SensorType.CAMERA, cam_id),
                                                         image_id),
                            position=np.asarray(metas[n]["gps"], np.float64),
                            coordinate_system=pycolmap.PosePriorCoordinateSystem.WGS84))
                        stats["num_pose_priors"] += 1
                    grp = ff[n]
                    kps = keypoints_to_colmap(
                        grp["keypoints"][()],
                        grp["scales"][()] if "scales" in grp else None,
                        grp["orientations"][()] if "orientations" in grp else None,
                    )
                    db.write_keypoints(image_id, kps)
                    stats["num_keypoints"] += len(kps)
                    if conf["descriptor_uint8"] != "none" and "descriptors" in grp:
                        desc = np.asarray(grp["descriptors"][()], np.float32).T  # stored (D, N)
                        du8 = descriptors_to_uint8(desc, conf["descriptor_uint8"])
                        db.write_descriptors(image_id, pycolmap.FeatureDescriptors(pycolmap.FeatureExtractorType.SIFT,
                                                                                   du8))
                    name_to_id[n] = image_id
                if pairs_path is not None and matches_path is not None:
                    _write_matches(db, pairs_path, matches_path, name_to_id, counts, stats)
            finally:
                db.close()
        if configs:
            unmatched = [p for p in conf["rig_prefixes"] if not any(n.startswith(p) for n in names)]
            if unmatched:  # COLMAP's rig_configurator needs an image of every rig camera
                raise CdSfmError(f"{rig_config}: no image name starts with {', '.join(map(repr, unmatched))} (every "
                                 "rig camera needs images)")
            stats["rig"] = {**apply_rig_config(tmp, configs), "poses": "given"} if rig_poses_known(configs) else None
        if verification is not None and stats["num_pairs"]:
            from .verify import main as verify_main

            stats["verification"] = verify_main(verification, tmp, pairs_path)
        os.replace(tmp, database_path)
    finally:
        for t in database_path.parent.glob(f".{database_path.name}.{os.getpid()}.tmp*"):
            t.unlink(missing_ok=True)
    logger.info("Database %s: %d cameras, %d images, %d keypoints, %d pairs with %d matches", database_path,
                stats["num_cameras"], stats["num_images"], stats["num_keypoints"], stats["num_pairs"],
                stats["num_matches"])
    return stats


def _write_matches(db, pairs_path, matches_path, name_to_id: dict[str, int], counts: dict[str, int],
                   stats: dict) -> None:
    """Raw matches of every listed pair, each checked against the keypoint counts of its two images first."""
    matches_path = Path(matches_path)
    if not matches_path.exists():
        raise CdSfmError(f"{matches_path}: match file not found")
    seen: set[tuple[int, int]] = set()
    with h5py.File(matches_path, "r", libver="latest") as fm:
        for a, b in parse_pairs(pairs_path):
            if a not in name_to_id or b not in name_to_id or a == b:
                continue
            ia, ib = name_to_id[a], name_to_id[b]
            key_ids = (min(ia, ib), max(ia, ib))
            if key_ids in seen:
                continue
            seen.add(key_ids)
            try:
                key, rev = find_pair(fm, a, b)
            except KeyError:
                stats["missing_pairs"] += 1
                continue
            first, second = (b, a) if rev else (a, b)
            check_matches_entry(fm[key], key, matches_path, counts[first], counts[second])
            m0 = fm[key]["matches0"][()]
            idx = np.flatnonzero(m0 > -1)
            m = np.column_stack([idx, m0[idx]]).astype(np.uint32)
            if rev:
                m = m[:, ::-1]
            db.write_matches(ia, ib, np.ascontiguousarray(m))
            stats["num_pairs"] += 1
            stats["num_matches"] += len(m)
    if stats["missing_pairs"]:
        logger.warning("%d pairs of %s have no entry in %s", stats["missing_pairs"], pairs_path, matches_path)


def read_back(database_path: str | Path) -> dict:
    """Small summary of a database read through pycolmap (used by tests and the CLI's ``sfm`` stage)."""
    import pycolmap

    db = pycolmap.Database.open(str(database_path))
    try:
        return {
            "num_cameras": db.num_cameras(),
            "num_images": db.num_images(),
            "num_keypoints": db.num_keypoints(),
            "num_matched_pairs": db.num_matched_image_pairs(),
            "num_matches": db.num_matches(),
            "num_verified_pairs": db.num_verified_image_pairs(),
            "num_inlier_matches": db.num_inlier_matches(),
        }
    finally:
        db.close()

