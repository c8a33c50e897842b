"""OpenCV SIFT and RootSIFT backends: the baseline the learned features are compared with.

Keypoints come from :func:`cd_sfm.features.patches.detect_sift`, the detector the ContextDesc backend uses, so a SIFT
and a ContextDesc run with the same detector settings describe the very same keypoints. Descriptors are stored
L2-normalised (unit length, float): plain SIFT as OpenCV computes it, normalised; RootSIFT (Arandjelovic & Zisserman
2012) as the square root of the L1-normalised SIFT vector, which is what COLMAP extracts by default.
:func:`descriptors_to_uint8` gives COLMAP's uint8 form of either.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..geometry import l2_normalize
from . import register
from .patches import SiftDetectorConf, detect_sift, fit_mask, to_gray


@dataclass
class SiftConf:
    # 8192 largest keypoints and contrast 0.02 (OpenCV units, = COLMAP's peak threshold 0.02/3) match COLMAP's defaults
    max_keypoints: int = 8192
    contrast_threshold: float = 0.02
    edge_threshold: float = 10.0
    n_octave_layers: int = 3
    sigma: float = 1.6
    upright: bool = False

    def detector(self) -> SiftDetectorConf:
        return SiftDetectorConf(**asdict(self))


def descriptors_to_uint8(desc: np.ndarray) -> np.ndarray:
    """COLMAP's conversion of a unit-length non-negative descriptor to uint8: round(512 * d), clipped to 255."""
    return np.clip(np.round(np.asarray(desc, np.float32) * 512.0), 0, 255).astype(np.uint8)


@register("sift")
class SiftBackend:
    """Difference-of-Gaussians keypoints with OpenCV SIFT descriptors (L2-normalised, 128-D)."""

    Conf = SiftConf
    grayscale = True  # extract() only needs the grayscale image: readers may skip the colour conversion
    descriptor_dim = 128

    def __init__(self, conf: SiftConf | dict | None = None, **kwargs):
        if conf is None or isinstance(conf, dict):
            conf = self.Conf(**{**(conf or {}), **kwargs})
        elif kwargs:
            conf = self.Conf(**{**asdict(conf), **kwargs})
        self.conf = conf

    @staticmethod
    def to_uint8(desc: np.ndarray) -> np.ndarray:
        return descriptors_to_uint8(desc)

    def _describe(self, sift: np.ndarray) -> np.ndarray:
        return l2_normalize(sift)

    def extract(self, image: np.ndarray, mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
        gray = to_gray(np.asarray(image))
        if gray.dtype != np.uint8:
            raise ValueError(f"expected a uint8 image, got {gray.dtype}")
        det = detect_sift(gray, self.conf.detector(), descriptors=True, mask=fit_mask(mask, gray.shape))
        return {
            "keypoints": det["keypoints"],
            "scales": det["scales"],
            "orientations": det["orientations"],
            "scores": det["scores"],
            "descriptors": self._describe(det["sift"]).astype(np.float32),
            "image_size": np.array([gray.shape[1], gray.shape[0]], np.int32),
        }


@register("rootsift")
class RootSiftBackend(SiftBackend):
    """RootSIFT: sqrt of the L1-normalised SIFT descriptor (unit L2 norm); Euclidean distance on it is the Hellinger
    kernel on SIFT, markedly better for matching than plain SIFT."""

    def _describe(self, sift: np.ndarray) -> np.ndarray:
        l1 = np.sum(np.abs(sift), axis=1, keepdims=True)
        return np.sqrt(np.maximum(sift, 0) / np.maximum(l1, 1e-12))
