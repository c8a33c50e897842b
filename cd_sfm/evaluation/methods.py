"""The descriptors an evaluation compares, all on the SAME SIFT keypoints of an image.

A describer is ``f(gray, kpts, image=None) -> (N, 128)`` L2-normalised descriptors, where ``kpts`` is the dict of
:func:`cd_sfm.features.patches.detect_sift` (with ``sift`` descriptors) and ``image`` the colour image (RGB) when the
caller has it (only a regional model uses it). Methods:

- ``rootsift``: OpenCV SIFT on the keypoints, RootSIFT-normalised (COLMAP's default descriptor);
- ``local``: our local model, raw ``conv6_feat`` L2-normalised (no context);
- ``contextdesc``: the local descriptors augmented with geometric (and, when the model has a regional model, visual)
  context: only when the model has augmentation weights; otherwise the method is reported absent, never faked.

``local`` and ``contextdesc`` share one run of the local model per image (cached on the keypoint array).
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from ..geometry import normalized_keypoints
from ..io import CdSfmError
from ..models.registry import DEFAULT_MODEL
from .hpatches import rootsift

logger = logging.getLogger(__name__)

METHODS = ("rootsift", "local", "contextdesc")


def parse_methods(text: str | list[str] | None) -> list[str]:
    if text is None:
        return list(METHODS)
    items = text.split(",") if isinstance(text, str) else list(text)
    items = [m.strip() for m in items if m.strip()]
    bad = [m for m in items if m not in METHODS]
    if bad or not items:
        raise CdSfmError(f"--methods: unknown method(s) {', '.join(bad) or '(none)'}; known: {', '.join(METHODS)}")
    return list(dict.fromkeys(items))


def rootsift_describer(gray, kpts, image=None) -> np.ndarray:
    if "sift" not in kpts or kpts["sift"] is None:
        return np.zeros((0, 128), np.float32)
    return rootsift(kpts["sift"])


class _LearnedDescriber:
    """Runs the ContextDesc backend's models on given keypoints; one local-model run serves both outputs."""

    def __init__(self, backend):
        self.backend = backend
        self._key = None
        self._val = None

    def _local(self, gray, kpts):
        from ..features.patches import extract_patches

        if self._key is not kpts["keypoints"]:
            patches = extract_patches(gray, kpts["keypoints"], kpts["scales"], kpts["angles"],
                                      upright=self.backend.conf.upright, standardize=False)  # as the backend
            self._val = self.backend.runner.local(patches)
            self._key = kpts["keypoints"]
        return self._val

    def local(self, gray, kpts, image=None) -> np.ndarray:
        from ..geometry import l2_normalize

        feat, _ = self._local(gray, kpts)
        return l2_normalize(feat)

    def augmented(self, gray, kpts, image=None) -> np.ndarray:
        feat, mb = self._local(gray, kpts)
        n = len(feat)
        if n == 0:
            return np.zeros((0, 128), np.float32)
        h, w = gray.shape[:2]
        xy = np.asarray(kpts["keypoints"], np.float32)
        kxy = normalized_keypoints(xy, w, h)
        rmap = None
        runner = self.backend.runner
        if runner.has_regional:
            from ..models.regional import prepare_image

            rgb = image if image is not None and image.shape[:2] == gray.shape[:2] else gray
            rmap = runner.regional(prepare_image(rgb, self.backend.conf.regional_max_size))
        return runner.augment(feat, mb, kxy, rmap)


def make_describers(methods: list[str], model: str = DEFAULT_MODEL, upright: bool = False,
                    backend=None, precision: str = "fp32") -> tuple[dict[str, Callable], dict[str, str]]:
    """Describers of the requested methods, and {method: reason} for those that cannot be run (``contextdesc``
    without augmentation weights). ``backend`` (tests): a ready :class:`ContextDescBackend`."""
    describers: dict[str, Callable] = {}
    absent: dict[str, str] = {}
    learned = [m for m in methods if m in ("local", "contextdesc")]
    if learned:
        if backend is None:
            from ..features.contextdesc import ContextDescBackend
            from ..models import registry

            # without augmentation weights ``contextdesc`` is reported absent below (one warning, not the backend's)
            augment = "contextdesc" in learned and registry.resolve(model).path("augment") is not None
            backend = ContextDescBackend(model=model, augment=augment, upright=upright, precision=precision)
        ld = _LearnedDescriber(backend)
    for m in methods:
        if m == "rootsift":
            describers[m] = rootsift_describer
        elif m == "local":
            describers[m] = ld.local
        elif m == "contextdesc":
            if backend.runner.has_augment:
                describers[m] = ld.augmented
            else:
                absent[m] = f"model {model!r} has no augmentation weights (augment.npz)"
                logger.warning("contextdesc: %s: reported as absent", absent[m])
    return describers, absent


def model_info(model: str) -> dict:
    """Name, folder and weight files of a model (for the report); {} when it cannot be resolved."""
    try:
        from ..models import registry

        e = registry.resolve(model)
        return {"name": e.name, "folder": str(e.folder), "components": e.components,
                "date": e.info.get("date"), "source": e.source}
    except Exception as err:  # noqa: BLE001 - informative only
        return {"name": model, "error": str(err)}
