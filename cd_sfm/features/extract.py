"""Run a feature backend over a collection of images into an hloc-style ``features.h5`` (resumable, crash-safe).

Usage from Python, as hloc's ``extract_features.main``::

    from cd_sfm.features import extract
    stats = extract.main(extract.confs["rootsift"], "images/", "out/features.h5")

Images already in the feature file (or in the part files of a killed run) are skipped; entries are written through
:class:`~cd_sfm.io.H5Appender`, so a run killed at any moment leaves no half-written entry. Keypoints are reported in
the pixel frame of the original image (after EXIF orientation) even when ``max_image_size`` downscaled it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from ..progress import tqdm

from ..images import exif_orientation, find_mask, list_images, read_image_sized, read_mask, upright_to_stored
from ..io import ATTRS_KEY, CdSfmError, H5Appender, check_file_settings, completed_names, entry_attrs, \
    features_to_h5, merge_parts
from . import get_backend

logger = logging.getLogger(__name__)

# Named presets. Each: ``backend`` (registry name), ``options`` (the backend's Conf fields), ``max_image_size``
# (longest side in pixels the backend sees; None = full resolution), ``descriptor_dtype`` of the stored descriptors,
# and ``output``, a file stem for callers that name files after the preset.
confs: dict[str, dict] = {
    "sift": {
        "output": "feats-sift-n8192-r1600",
        "backend": "sift",
        "options": {"max_keypoints": 8192, "contrast_threshold": 0.02},
        "max_image_size": 1600,
        "descriptor_dtype": "float16",
    },
    "rootsift": {
        "output": "feats-rootsift-n8192-r1600",
        "backend": "rootsift",
        "options": {"max_keypoints": 8192, "contrast_threshold": 0.02},
        "max_image_size": 1600,
        "descriptor_dtype": "float16",
    },
    # COLMAP's own defaults (max_image_size 3200): the slow, thorough baseline
    "rootsift-max": {
        "output": "feats-rootsift-n8192-r3200",
        "backend": "rootsift",
        "options": {"max_keypoints": 8192, "contrast_threshold": 0.02},
        "max_image_size": 3200,
        "descriptor_dtype": "float16",
    },
    "rootsift-fast": {
        "output": "feats-rootsift-n4096-r1024",
        "backend": "rootsift",
        "options": {"max_keypoints": 4096, "contrast_threshold": 0.02},
        "max_image_size": 1024,
        "descriptor_dtype": "float16",
    },
    # the learned descriptor; its options are ContextDescBackend.Conf fields (the backend's defaults when empty)
    # the same keypoints as the sift preset (8192, contrast 0.02); precision auto: the int8 local network where the
    # model has one (see cd_sfm.models.runner), else bf16 where the CPU computes it natively, else fp32
    "contextdesc": {
        "output": "feats-contextdesc-n8192-r1600",
        "backend": "contextdesc",
        "options": {"max_keypoints": 8192, "contrast_threshold": 0.02, "precision": "auto"},
        "max_image_size": 1600,
        "descriptor_dtype": "float16",
    },
    # the original ContextDesc keypoint settings (4096, contrast 0.04) on smaller images
    "contextdesc-fast": {
        "output": "feats-contextdesc-n4096-r1024",
        "backend": "contextdesc",
        "options": {"precision": "auto"},
        "max_image_size": 1024,
        "descriptor_dtype": "float16",
    },
}

DEFAULT_CONF = {"backend": "sift", "options": {}, "max_image_size": None, "descriptor_dtype": "float16"}


def resolve_conf(conf: dict | str | None) -> dict:
    """A preset name or a (partial) conf dict -> a complete conf dict (a copy)."""
    if conf is None:
        conf = "sift"
    if isinstance(conf, str):
        if conf not in confs:
            raise CdSfmError(f"unknown feature preset {conf!r}; available: {', '.join(sorted(confs))}")
        conf = confs[conf]
    elif is_dataclass(conf):
        conf = asdict(conf)
    return {**copy.deepcopy(DEFAULT_CONF), **copy.deepcopy(dict(conf))}


def make_backend(conf: dict):
    """Instantiate the backend a conf names with its options."""
    Backend = get_backend(conf["backend"])
    options = dict(conf.get("options") or {})
    Conf = getattr(Backend, "Conf", None)
    if Conf is not None:
        try:
            return Backend(Conf(**options))
        except TypeError as e:
            raise CdSfmError(f"feature backend {conf['backend']!r}: bad options {options} ({e})") from e
    return Backend(**options)


def rescale_features(feats: dict, original_size: tuple[int, int], size: tuple[int, int]) -> dict:
    """Map keypoints (and scales) from an image of ``size`` (w, h) to the original of ``original_size`` (w, h).

    Uses the pixel-centre convention (as hloc): x0 = (x + 0.5) * W0 / w - 0.5."""
    sx, sy = original_size[0] / size[0], original_size[1] / size[1]
    out = dict(feats)
    if (sx, sy) != (1.0, 1.0):
        kp = np.asarray(feats["keypoints"], np.float32).reshape(-1, 2)
        out["keypoints"] = ((kp + 0.5) * np.array([sx, sy], np.float32) - 0.5).astype(np.float32)
        if "scales" in feats:
            out["scales"] = (np.asarray(feats["scales"], np.float32) * np.float32((sx + sy) / 2)).astype(np.float32)
    out["image_size"] = np.array(original_size, np.int32)
    return out


def _read_original(path: Path, grayscale: bool, max_size: int | None):
    """Read an image for the backend; also return the original (EXIF-oriented) size (w, h)."""
    return read_image_sized(path, grayscale=grayscale, max_size=max_size)


def source_stamp(path: Path) -> dict:
    """What identifies the version of an image file: its size and modification time (an image replaced in place
    changes them and is extracted again)."""
    st = path.stat()
    return {"source_size": int(st.st_size), "source_mtime_ns": int(st.st_mtime_ns)}


def mask_stamp(path: Path | None) -> dict:
    """The :func:`source_stamp` of a mask file as feature attributes (``mask_size``, ``mask_mtime_ns``); empty
    without a mask."""
    if path is None:
        return {}
    st = source_stamp(path)
    return {"mask_size": st["source_size"], "mask_mtime_ns": st["source_mtime_ns"]}


def extract_image(backend, conf: dict, path: Path, stamp: dict | None = None, mask: Path | None = None,
                  mask_stamp_: dict | None = None, name: str | None = None) -> dict[str, np.ndarray]:
    """One image through a backend: read (EXIF upright), resize to ``max_image_size``, extract, keypoints back to the
    original frame and then to the file's stored pixels (what COLMAP reads: it ignores EXIF orientation), the stored
    layout (``features_to_h5``) with the file's :func:`source_stamp` as group attributes. Raises ``CdSfmError`` for
    an unreadable image or mask. ``stamp``: the :func:`source_stamp` of the original when ``path`` is a copy of it.
    ``mask``: a mask file as COLMAP's (drawn on the stored pixels, black = no features;
    :func:`~cd_sfm.images.read_mask`), its stamp recorded with the features (``mask_stamp_`` when ``mask`` is a
    copy)."""
    grayscale = bool(getattr(backend, "grayscale", False))
    image, original_size = _read_original(path, grayscale, conf.get("max_image_size"))
    stamp = stamp or source_stamp(path)
    orientation = exif_orientation(path)
    w, h = original_size
    stored = (h, w) if orientation in (5, 6, 7, 8) else (w, h)  # the file's own pixels, what COLMAP sees
    if mask is not None:
        m = read_mask(mask, stored, orientation, name or path.name)
        feats = backend.extract(image, mask=m)
        stamp = {**stamp, **(mask_stamp_ or mask_stamp(mask))}
    else:
        feats = backend.extract(image)
    feats = rescale_features(feats, original_size, (image.shape[1], image.shape[0]))
    if orientation != 1:  # features were found upright; COLMAP and its GUI see the stored pixels
        feats["keypoints"], ori = upright_to_stored(feats["keypoints"], feats.get("orientations"), orientation, stored)
        if ori is not None:
            feats["orientations"] = ori
        feats["image_size"] = np.array(stored, np.int32)
    out = features_to_h5(feats, conf.get("descriptor_dtype") or "float32")
    out[ATTRS_KEY] = {**stamp, "exif_orientation": orientation}
    return out


class ExtractWorker:
    """Extracts images with one built backend (its models loaded once): the worker of the extract stage, in this
    process or on a Ray actor (:mod:`cd_sfm.executors`)."""

    def __init__(self, conf: dict, backend=None):
        self.conf = resolve_conf(conf)
        self.backend = backend if backend is not None else make_backend(self.conf)

    @property
    def parallelism(self) -> int:
        """Images extracted at once: backends with a thread-safe ``extract``, ``parallel_images`` > 1 and a
        ``concurrent(n)`` context that shares the cores between n images (ContextDesc's int8 path)."""
        if getattr(self.backend, "concurrent", None) is None:
            return 1
        return max(1, int(getattr(self.backend, "parallel_images", 1) or 1))

    def session(self, n: int):
        return self.backend.concurrent(n) if n > 1 else contextlib.nullcontext()

    def extract(self, name: str, path: str, data: bytes | None = None, stamp: dict | None = None,
                mask: str | None = None, mask_data: bytes | None = None,
                mask_stamp_: dict | None = None) -> tuple[str, dict | str]:
        """(name, stored feature dict), or (name, the one-line reason) for an unreadable image or mask. ``data``: the
        file's bytes and ``stamp`` its :func:`source_stamp`, shipped by the driver (no shared file system); ``mask``
        the path of its mask file (``mask_data``, ``mask_stamp_`` likewise when shipped)."""
        tmp = tmp_mask = None
        try:
            if data is not None:
                tmp = _spill(data, Path(name).suffix)
            if mask is not None and mask_data is not None:
                tmp_mask = _spill(mask_data, Path(mask).suffix)
            return name, extract_image(self.backend, self.conf, Path(tmp or path), stamp,
                                       Path(tmp_mask or mask) if mask else None, mask_stamp_, name)
        except CdSfmError as e:  # an unreadable image or mask: reported with its real path, skipped by the stage
            msg = str(e)
            for t, real in ((tmp, path), (tmp_mask, mask)):
                if t:
                    msg = msg.replace(t, str(real))
            return name, msg
        finally:
            for t in (tmp, tmp_mask):
                if t:
                    Path(t).unlink(missing_ok=True)


def _shipped(path: Path, stamp_of) -> tuple[bytes, dict | None]:
    """A file's bytes and stamp for a worker without the shared file system; b"" when unreadable (the worker then
    reports the file)."""
    try:
        return path.read_bytes(), stamp_of(path)
    except OSError as e:
        logger.debug("cannot read %s: %s", path, e)
        return b"", None


def _spill(data: bytes, suffix: str) -> str:
    """Write shipped bytes to a temporary file (its path)."""
    fd, tmp = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return tmp


def pinned_conf(conf: dict, backend) -> dict:
    """``conf`` with the choices its built ``backend`` made at run time fixed (ContextDesc's ``precision: auto``, which
    may time the networks), so that every worker of a run computes the same features."""
    used = getattr(backend, "precision_used", None)
    if not used or (conf.get("options") or {}).get("precision", "auto") != "auto":
        return conf
    return {**conf, "options": {**(conf.get("options") or {}), "precision": used["local"]}}


def image_names(image_dir: Path, image_list, skipped: dict[str, str]) -> list[str]:
    """The images of a stage: ``image_list`` (names relative to ``image_dir``, or a text file of them), else every
    image found by :func:`~cd_sfm.images.list_images` (unreadable ones go to ``skipped``)."""
    if image_list is None:
        return list_images(image_dir, skipped=skipped)
    if isinstance(image_list, (str, Path)):
        p = Path(image_list)
        if not p.exists():
            raise CdSfmError(f"{p}: image list not found")
        image_list = [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return list(dict.fromkeys(Path(n).as_posix() for n in image_list))


def feature_settings(conf: dict) -> dict:
    """What makes two feature files comparable (stamped in ``features.h5``, checked on resume): the backend, its
    options, the image size, the stored dtype and the model's weight digest."""
    return {k: conf.get(k) for k in ("backend", "options", "max_image_size", "descriptor_dtype", "model_digest")}


def _changed_sources(image_dir: Path, feature_path: Path, names: list[str],
                     masks: dict[str, Path | None] | None = None) -> list[str]:
    """Names whose image file no longer has the size and modification time recorded with its features (entries
    written before these were recorded count as unchanged), or whose mask (``masks``: name -> mask file or None)
    is not the one they were extracted with: added, removed or changed."""
    if not names:
        return []
    masks = masks or {}
    changed = []
    for n, attrs in entry_attrs(feature_path, names).items():
        was = {k: int(attrs[k]) for k in ("mask_size", "mask_mtime_ns") if k in attrs}
        try:
            now = mask_stamp(masks.get(n))
        except OSError:
            now = {}
        if was != now:
            changed.append(n)
            continue
        if "source_size" not in attrs:
            continue
        try:
            now = source_stamp(image_dir / n)
        except OSError:
            continue  # gone: the caller's image list decides
        if (int(attrs["source_size"]), int(attrs["source_mtime_ns"])) != (now["source_size"], now["source_mtime_ns"]):
            changed.append(n)
    return sorted(changed)


def find_masks(mask_dir: str | Path | None, names: list[str]) -> dict[str, Path | None]:
    """Each image's mask file in ``mask_dir`` (:func:`~cd_sfm.images.find_mask`; None: none there), with a warning
    naming how many images have none. Raises ``CdSfmError`` when ``mask_dir`` is not a folder."""
    if mask_dir is None:
        return {}
    mask_dir = Path(mask_dir)
    if not mask_dir.is_dir():
        raise CdSfmError(f"{mask_dir}: mask folder not found")
    masks = {n: find_mask(mask_dir, n) for n in names}
    missing = [n for n, m in masks.items() if m is None]
    if missing:
        logger.warning("%d of %d images have no mask in %s (e.g. %s would be %s): their features are not masked",
                       len(missing), len(names), mask_dir, missing[0], mask_dir / f"{missing[0]}.png")
    return masks


def main(
    conf: dict | str,
    image_dir: str | Path,
    feature_path: str | Path,
    image_list: Iterable[str] | str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    backend=None,
    executor=None,
    mask_dir: str | Path | None = None,
) -> dict:
    """Extract features of the images of ``image_dir`` into ``feature_path``.

    ``conf``: a preset name or dict (see :data:`confs`). ``image_list``: names relative to ``image_dir`` (a list, or
    a text file with one name per line); default: every image found by :func:`~cd_sfm.images.list_images`.
    ``overwrite``: extract again images already present (their entries are replaced when the new ones are merged).
    ``backend``: an already built backend instance (then ``conf['backend']``/``options`` are not used).
    ``executor``: where the images are extracted (:mod:`cd_sfm.executors`; default: in this process). The backend is
    built here first either way, so that run-time choices (``precision: auto``) are made once for every worker.
    ``mask_dir``: feature masks as COLMAP's ``--ImageReader.mask_path`` (``a/b.jpg`` -> ``mask_dir/a/b.jpg.png``, or
    ``a/b.png``; black = no features; :func:`~cd_sfm.images.read_mask`); images without one are not masked, and an
    image whose mask was added, changed or removed since its features were stored is extracted again.

    Returns ``{"extracted": n, "reused": n, "skipped": {name: reason}, "no_keypoints": [names], "seconds": s,
    "feature_path": str, "precision": ...}``. Unreadable images are skipped with a warning, never abort the run.
    """
    from ..executors import InProcess

    t0 = time.monotonic()
    conf = resolve_conf(conf)
    executor = executor or InProcess()
    image_dir, feature_path = Path(image_dir), Path(feature_path)
    skipped: dict[str, str] = {}
    names = image_names(image_dir, image_list, skipped)
    settings = feature_settings(conf)
    if not overwrite:
        check_file_settings(feature_path, settings, "features")
    done = set() if overwrite else completed_names(feature_path)
    masks = find_masks(mask_dir, names)
    changed = _changed_sources(image_dir, feature_path, [n for n in names if n in done], masks)
    if changed:
        logger.info("%d image(s) or their masks changed since their features were extracted (e.g. %s): extracting "
                    "them again",
                    len(changed), changed[0])
        done -= set(changed)
    todo = [n for n in names if n not in done]
    reused = len(names) - len(todo)
    if reused:
        logger.info("Reusing the features of %d image(s) already in %s", reused, feature_path)

    extracted = 0
    no_keypoints: list[str] = []
    precision = None
    if todo:
        local = ExtractWorker(conf, backend)
        precision = getattr(local.backend, "precision_used", None)  # ContextDesc: the precision auto settled on
        worker_conf = pinned_conf(conf, local.backend)
        if executor.remote:
            local = None  # the workers build their own
        logger.info("Extracting %s features of %d image(s) into %s%s", conf["backend"], len(todo), feature_path,
                    f" ({local.parallelism} at a time)" if local is not None and local.parallelism > 1 else "")

        def tasks():
            for name in todo:
                path, mask = image_dir / name, masks.get(name)
                data = stamp = mask_data = mstamp = None
                if executor.ships_data:
                    data, stamp = _shipped(path, source_stamp)
                    if mask is not None:
                        mask_data, mstamp = _shipped(mask, mask_stamp)
                yield name, str(path), data, stamp, str(mask) if mask else None, mask_data, mstamp

        # a part file every 16 images or two seconds: a killed run loses at most that much work
        with H5Appender(feature_path, flush_every=16, flush_seconds=2.0, settings=settings) as out, \
                tqdm(total=len(todo), desc="extract", unit="img", disable=not progress) as bar:
            for name, result in executor.run(ExtractWorker, (worker_conf,), "extract", tasks(), len(todo),
                                             local_worker=local):
                bar.update(1)
                if isinstance(result, str):
                    logger.warning("Skipping %s", result)
                    skipped[name] = result
                    continue
                n = len(result["keypoints"])
                if n == 0:
                    logger.warning("%s: no keypoints found", image_dir / name)
                    no_keypoints.append(name)
                out.add(name, result)
                extracted += 1
                bar.set_postfix(kpts=n, refresh=False)
    else:
        merge_parts(feature_path)  # parts left by a killed run that had finished every image
    stats = {
        "extracted": extracted,
        "reused": reused,
        "skipped": skipped,
        "no_keypoints": no_keypoints,
        "seconds": time.monotonic() - t0,
        "feature_path": str(feature_path),
        "precision": precision,
        "masked": sum(m is not None for m in masks.values()),
    }
    logger.info("Features: %d extracted, %d reused, %d skipped (%.1f s)", extracted, reused, len(skipped),
                stats["seconds"])
    return stats
