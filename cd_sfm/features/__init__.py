"""Feature backends: a registry of extractors, each turning one image into keypoints and descriptors.

A backend is a class with a ``name``, a dataclass ``Conf`` of its options, and
``extract(image: np.ndarray) -> dict`` where ``image`` is an (H, W) uint8 grayscale or (H, W, 3) uint8 RGB array at
the resolution features should be reported in. The dict holds ``keypoints`` (N, 2) float32 (OpenCV pixel convention),
``scales`` (N,) float32 (OpenCV ``KeyPoint.size``), ``orientations`` (N,) float32 radians, ``scores`` (N,) float32,
``descriptors`` (N, D) float32, and ``image_size`` (2,) [width, height].
"""

from __future__ import annotations

from typing import Callable

_REGISTRY: dict[str, Callable[[], type]] = {}


def register(name: str):
    """Class decorator: make a backend available under ``name``."""

    def deco(cls):
        cls.name = name
        _REGISTRY[name] = lambda: cls
        return cls

    return deco


def _lazy(name: str, module: str, attr: str) -> None:
    def load():
        import importlib

        return getattr(importlib.import_module(module), attr)

    _REGISTRY.setdefault(name, load)


# built-in backends, imported on first use so that ``sift`` never loads TensorFlow
_lazy("sift", "cd_sfm.features.sift", "SiftBackend")
_lazy("rootsift", "cd_sfm.features.sift", "RootSiftBackend")
_lazy("contextdesc", "cd_sfm.features.contextdesc", "ContextDescBackend")


def available() -> list[str]:
    return sorted(_REGISTRY)


def get_backend(name: str) -> type:
    if name not in _REGISTRY:
        from ..io import CdSfmError

        raise CdSfmError(f"unknown feature backend {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]()
