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

from ..images import exif_orientation, list_images, read_image, resize_max, upright_to_stored
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
    image, _ = read_image(path, grayscale=grayscale, max_size=None)
    original = (image.shape[1], image.shape[0])
    image, _ = resize_max(image, max_size)
    return image, original


def source_stamp(path: Path) -> dict:
    """What identifies the version of an image file: its size and modification time (an image replaced in place
    changes them and is extracted again)."""
    st = path.stat()
    return {"source_size": int(st.st_size), "source_mtime_ns": int(st.st_mtime_ns)}


def extract_image(backend, conf: dict, path: Path, stamp: dict | None = None) -> dict[str, np.ndarray]:
    """One image through a backend: read (EXIF upright), resize to ``max_image_size``, extract, keypoints back to the
    original frame and then to the file's stored pixels (what COLMAP reads: it ignores EXIF orientation), the stored
    layout (``features_to_h5``) with the file's :func:`source_stamp` as group attributes. Raises ``CdSfmError`` for
    an unreadable image. ``stamp``: the :func:`source_stamp` of the original when ``path`` is a copy of it."""
    grayscale = bool(getattr(backend, "grayscale", False))
    image, original_size = _read_original(path, grayscale, conf.get("max_image_size"))
    stamp = stamp or source_stamp(path)
    feats = backend.extract(image)
    feats = rescale_features(feats, original_size, (image.shape[1], image.shape[0]))
    orientation = exif_orientation(path)
    if orientation != 1:  # features were found upright; COLMAP and its GUI see the stored pixels
        w, h = original_size
        stored = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
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

    def extract(self, name: str, path: str, data: bytes | None = None,
                stamp: dict | None = None) -> tuple[str, dict | str]:
        """(name, stored feature dict), or (name, the one-line reason) for an unreadable image. ``data``: the file's
        bytes and ``stamp`` its :func:`source_stamp`, shipped by the driver (no shared file system)."""
        tmp = None
        try:
            if data is not None:
                fd, tmp = tempfile.mkstemp(suffix=Path(name).suffix)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            return name, extract_image(self.backend, self.conf, Path(tmp or path), stamp)
        except CdSfmError as e:  # an unreadable image: reported with its real path, skipped by the stage
            return name, str(e).replace(tmp, str(path)) if tmp else str(e)
        finally:
            if tmp:
                Path(tmp).unlink(missing_ok=True)


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


def _changed_sources(image_dir: Path, feature_path: Path, names: list[str]) -> list[str]:
    """Names whose image file no longer has the size and modification time recorded with its features (entries
    written before these were recorded count as unchanged)."""
    if not names:
        return []
    changed = []
    for n, attrs in entry_attrs(feature_path, names).items():
        if "source_size" not in attrs:
            continue
        try:
            now = source_stamp(image_dir / n)
        except OSError:
            continue  # gone: the caller's image list decides
        if (int(attrs["source_size"]), int(attrs["source_mtime_ns"])) != (now["source_size"], now["source_mtime_ns"]):
            changed.append(n)
    return sorted(changed)


def main(
    conf: dict | str,
    image_dir: str | Path,
    feature_path: str | Path,
    image_list: Iterable[str] | str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    backend=None,
    executor=None,
) -> dict:
    """Extract features of the images of ``image_dir`` into ``feature_path``.

    ``conf``: a preset name or dict (see :data:`confs`). ``image_list``: names relative to ``image_dir`` (a list, or
    a text file with one name per line); default: every image found by :func:`~cd_sfm.images.list_images`.
    ``overwrite``: extract again images already present (their entries are replaced when the new ones are merged).
    ``backend``: an already built backend instance (then ``conf['backend']``/``options`` are not used).
    ``executor``: where the images are extracted (:mod:`cd_sfm.executors`; default: in this process). The backend is
    built here first either way, so that run-time choices (``precision: auto``) are made once for every worker.

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
    changed = _changed_sources(image_dir, feature_path, [n for n in names if n in done])
    if changed:
        logger.info("%d image(s) changed since their features were extracted (e.g. %s): extracting them again",
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
                path = image_dir / name
                data = stamp = None
                if executor.ships_data:
                    try:
                        stamp = source_stamp(path)
                        data = path.read_bytes()
                    except OSError as e:  # the worker reports the unreadable file
                        data = b""
                        logger.debug("cannot read %s: %s", path, e)
                yield name, str(path), data, stamp

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
    }
    logger.info("Features: %d extracted, %d reused, %d skipped (%.1f s)", extracted, reused, len(skipped),
                stats["seconds"])
    return stats
