"""ContextDesc feature backend: SIFT keypoints -> 32x32 patches -> local descriptor + matchability -> (regional
ResNet50 map) -> augmentation with visual and geometric context -> 128-d L2-normalised descriptors.

Options (``ContextDescBackend.Conf``): ``model`` (registry name or folder, default ``registry.DEFAULT_MODEL``), ``max_keypoints``
(4096), ``upright``, ``max_image_size`` (0 = full resolution), ``augment`` (False stores the raw local descriptors,
L2-normalised), ``regional`` (False, or a model without regional weights, gives geometric context only; said once in
the log), ``regional_max_size`` (1024, the authors' limit), ``precision`` (``fp32`` | ``bf16`` | ``int8`` | ``auto``:
int8 when the model folder has an up-to-date ``local_int8.tflite``, else bf16 where the CPU has it), ``xla``,
``batch_size`` (patches per local-model call), ``threads`` (0 = the cores this process may use), ``fold_bn`` (run the
inference form with batch norms folded into the convolutions; same values, faster), ``parallel_images`` (images
``features.extract`` runs at once, each on cores / parallel_images threads; 0 = auto: 2 with the int8 local model on
two or more cores, where one image's SIFT detection overlaps another's network, else 1).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, fields

import cv2
import numpy as np

from ..models.registry import DEFAULT_MODEL
from . import register
from .patches import SiftDetectorConf, detect_sift, extract_patches, fit_mask, to_gray

logger = logging.getLogger(__name__)
_SAID: set = set()


def _say_once(key, msg, *args):
    if key not in _SAID:
        _SAID.add(key)
        logger.info(msg, *args)


def _warn_no_augment(entry, model: str) -> None:
    from ..models import registry

    if ("noaug", model) not in _SAID:
        _SAID.add(("noaug", model))
        logger.warning("%s: model %r has no augmentation weights (%s): storing the raw local descriptors",
                       entry.folder, model, registry.WEIGHT_FILES["augment"])


@register("contextdesc")
class ContextDescBackend:
    @dataclass
    class Conf:
        model: str = DEFAULT_MODEL
        max_keypoints: int = 4096
        upright: bool = False
        max_image_size: int = 0
        augment: bool = True
        regional: bool = True
        regional_max_size: int = 1024
        precision: str = "fp32"
        xla: bool = False
        batch_size: int = 1024
        fold_bn: bool = True
        threads: int = 0
        contrast_threshold: float = 0.04
        parallel_images: int = 0

    descriptor_dim = 128

    def __init__(self, conf=None, models: dict | None = None, info: dict | None = None, **overrides):
        """``conf``: a ``Conf``, a dict of its fields, or None; ``overrides`` set single fields.
        ``models`` (tests): ready fp32 Keras models {"local", "augment"?, "regional"?} instead of a named model;
        then ``info["int8_path"]`` may name their int8 local model."""
        if conf is None:
            conf = self.Conf()
        elif isinstance(conf, dict):
            known = {f.name for f in fields(self.Conf)}
            unknown = set(conf) - known
            if unknown:
                from ..io import CdSfmError

                raise CdSfmError(f"contextdesc: unknown option(s) {', '.join(sorted(unknown))}")
            conf = self.Conf(**conf)
        if overrides:
            conf = self.Conf(**{**asdict(conf), **overrides})
        self.conf = conf
        from ..models.runner import ContextDescRunner

        self.runner = None
        if models is None:
            from ..models import registry
            from ..models.int8 import int8_path

            entry = registry.resolve(conf.model)
            i8 = int8_path(entry.folder) if conf.precision in ("int8", "auto") else None
            lite = self._lite(conf, entry, i8)
            if lite is not None:
                self.runner, self.info = lite
            else:
                models, info = self._load(conf, entry, i8)
        else:
            models = dict(models)
            info = dict(info or {})
            if not conf.augment:
                models.pop("augment", None)
            if not conf.regional or "augment" not in models:
                models.pop("regional", None)
            if "augment" in models and "regional" not in models:
                from ..models.augment import geometric_only

                if "regional_feat" in {i.name for i in models["augment"].inputs}:
                    models["augment"] = geometric_only(models["augment"])
        if self.runner is None:
            self.info = info
            builders = self._builders(models, info)
            self.runner = ContextDescRunner(models, builders, precision=conf.precision, xla=conf.xla,
                                            batch_size=conf.batch_size, bucket=max(conf.max_keypoints, 0) or 4096,
                                            threads=conf.threads or None, fold_bn=conf.fold_bn,
                                            int8_path=info.get("int8_path"))
        if conf.augment and self.runner.has_augment and not self.runner.has_regional:
            _say_once(("geo", conf.model), "%s: no regional model: augmentation with geometric context only",
                      conf.model)
        self.timings: dict = defaultdict(float)  # seconds per stage and counts ("images", "patches"), accumulated
        self._lock = threading.Lock()  # guards timings and _inflight (extract() may run in threads)
        self._inflight = 0  # extract() calls running now (several under ``concurrent``)
        from ..models.runner import available_cores

        self._cores = conf.threads or available_cores()
        auto = min(2, self._cores) if self.runner.precision == "int8" else 1
        self.parallel_images = max(1, int(conf.parallel_images or auto))
        self.grayscale = not self.runner.has_regional  # extract() needs colour only for the regional model
        self.detector = SiftDetectorConf(max_keypoints=conf.max_keypoints, upright=conf.upright,
                                         contrast_threshold=conf.contrast_threshold)

    # ---- model loading
    @staticmethod
    def _lite(conf, entry, i8):
        """``(LiteRunner, info)`` (no TensorFlow) where that runner computes what the Keras models would: the int8
        local network ``i8`` (the model ``entry``'s up-to-date int8 file or None) without a timing probe
        (``runner.int8_without_probe``), no XLA, and no regional network in use (the model has no regional weights,
        its augmentation no visual branch, or ``regional`` is off); else None."""
        from ..io import read_npz
        from ..models.augment_numpy import GeometricAugment, has_visual_weights
        from ..models.runner import LiteRunner, int8_without_probe

        if conf.xla or not int8_without_probe(conf.precision, i8 is not None):
            return None
        augment = None
        aug_path = entry.path("augment") if conf.augment else None
        if conf.augment and aug_path is None:
            _warn_no_augment(entry, conf.model)
        elif aug_path is not None:
            arrays = read_npz(aug_path)
            if has_visual_weights(arrays) and conf.regional and entry.path("regional") is not None:
                return None  # the regional network runs in TensorFlow
            augment = GeometricAugment(arrays, aug_path)
        info = dict(entry.info)
        info.setdefault("name", entry.name)
        info["int8_path"] = i8
        return LiteRunner(i8, augment, threads=conf.threads or None), info

    @staticmethod
    def _load(conf, entry, i8):
        """The Keras models of the model ``entry`` that ``conf`` uses, and its info (``int8_path``: ``i8``)."""
        from ..models import registry

        comps = ["local"]
        if conf.augment and entry.path("augment") is None:
            _warn_no_augment(entry, conf.model)
        elif conf.augment:
            comps.append("augment")
            if conf.regional and entry.path("regional") is not None:
                comps.append("regional")
        models = registry.load_keras_models(entry, comps, visual="regional" in comps)
        if "regional" in models and "regional_feat" not in {i.name for i in models["augment"].inputs}:
            models.pop("regional")  # augmentation weights without a visual branch: the map would be unused
        info = dict(entry.info)
        info.setdefault("name", entry.name)
        if conf.precision in ("int8", "auto"):
            info["int8_path"] = i8
        return models, info

    @staticmethod
    def _builders(models, info):
        from ..models.augment import GridInterpolate, build_augment_model
        from ..models.local import builder_for
        from ..models.regional import build_regional_model

        b = {"local": builder_for(models["local"]), "regional": build_regional_model}
        if "augment" in models:
            m = models["augment"]
            visual = "regional_feat" in {i.name for i in m.inputs}
            interp = next((layer.mode for layer in m.layers if isinstance(layer, GridInterpolate)),
                          "inverse_distance")
            b["augment"] = lambda: build_augment_model(visual=visual, interp=interp)
        return b

    @property
    def precision_used(self) -> dict:
        """The precision each network runs in, e.g. ``{"local": "int8", "augment": "bf16"}`` (after ``auto``)."""
        r = self.runner
        return {k: r.precision if k == "local" else r.float_precision for k in r.models}

    @contextlib.contextmanager
    def concurrent(self, n: int):
        """Inside the block ``extract`` runs in ``n`` threads at once (``features.extract`` with ``parallel_images``):
        the int8 interpreters and OpenCV's SIFT each get cores / n threads, except that an image whose network runs
        while no other image is in flight (the last of a folder) gets all cores."""
        threads = max(1, self._cores // max(1, n))
        old_int8, old_cv = self.runner.int8_threads, cv2.getNumThreads()
        self.runner.int8_threads = threads
        cv2.setNumThreads(threads)
        try:
            yield self
        finally:
            self.runner.int8_threads = old_int8
            cv2.setNumThreads(old_cv)

    # ---- extraction
    def extract(self, image: np.ndarray, mask: np.ndarray | None = None) -> dict:
        """Features of one image (see the module docstring of ``cd_sfm.features``); extra key ``matchability``.
        ``mask``: keypoints only where it is non-zero (any size, resized to the image's)."""
        return self._extract(image, keep_local=False, mask=mask)

    def extract_with_local(self, image: np.ndarray, mask: np.ndarray | None = None) -> dict:
        """As ``extract``, plus ``local_descriptors`` (N, 128): the raw local descriptors, L2-normalised."""
        return self._extract(image, keep_local=True, mask=mask)

    def _extract(self, image: np.ndarray, keep_local: bool, mask: np.ndarray | None = None) -> dict:
        with self._lock:
            self._inflight += 1
        try:
            return self._extract_one(image, keep_local, mask)
        finally:
            with self._lock:
                self._inflight -= 1

    def _extract_one(self, image: np.ndarray, keep_local: bool, mask: np.ndarray | None = None) -> dict:
        from ..geometry import l2_normalize, normalized_keypoints

        img = np.asarray(image)
        if img.dtype != np.uint8:
            img = np.clip(img, 0, 255).astype(np.uint8)
        H, W = img.shape[:2]
        work, scale = img, 1.0
        m = self.conf.max_image_size
        if m and max(H, W) > m:
            scale = max(H, W) / m
            work = cv2.resize(img, (max(1, round(W / scale)), max(1, round(H / scale))), interpolation=cv2.INTER_AREA)
        h, w = work.shape[:2]
        tm = {}
        t0 = time.perf_counter()
        gray = to_gray(work)
        kp = detect_sift(gray, self.detector, mask=fit_mask(mask, gray.shape))
        n = len(kp["keypoints"])
        t1 = time.perf_counter()
        # raw patches: every runner standardises them itself (the Keras model's PatchStandardize, the int8 runner in
        # numpy), as in training; standardising here too cost 0.03-0.04 s an image at 8192 keypoints for nothing
        patches = extract_patches(gray, kp["keypoints"], kp["scales"], kp["angles"], upright=self.conf.upright,
                                  standardize=False)
        t2 = time.perf_counter()
        with self._lock:
            alone = self._inflight <= 1
        feat, mb = self.runner.local(patches, threads=0 if alone else None)
        t3 = time.perf_counter()
        tm["detect"], tm["patches"], tm["local"], tm["images"], tm["keypoints"] = t1 - t0, t2 - t1, t3 - t2, 1, n
        if self.conf.augment and self.runner.has_augment and n:
            xy = kp["keypoints"].astype(np.float32)
            kxy = normalized_keypoints(xy, w, h)
            rmap = None
            if self.runner.has_regional:
                from ..models.regional import prepare_image

                rgb = work if work.ndim == 3 else np.repeat(work[..., None], 3, axis=-1)
                rmap = self.runner.regional(prepare_image(rgb, self.conf.regional_max_size))
                tm["regional"] = time.perf_counter() - t3
            t4 = time.perf_counter()
            desc = self.runner.augment(feat, mb, kxy, rmap)
            tm["augment"] = time.perf_counter() - t4
        else:
            desc = l2_normalize(feat)
        with self._lock:
            for k, v in tm.items():
                self.timings[k] += v
        keypoints = kp["keypoints"].astype(np.float32)
        scales = kp["scales"].astype(np.float32)
        if scale != 1.0:
            keypoints = ((keypoints + 0.5) * np.array([W / w, H / h], np.float32) - 0.5).astype(np.float32)
            scales = scales * np.float32(scale)
        orientations = np.zeros(n, np.float32) if self.conf.upright else kp["orientations"].astype(np.float32)
        out = {
            "keypoints": keypoints.reshape(n, 2),
            "scales": scales,
            "orientations": orientations,
            "scores": kp["scores"].astype(np.float32),
            "descriptors": np.asarray(desc, np.float32).reshape(n, 128),
            "image_size": np.array([W, H], np.int32),
            "matchability": np.asarray(mb, np.float32).reshape(n),
        }
        if keep_local:
            out["local_descriptors"] = l2_normalize(feat).reshape(n, 128)
        return out
