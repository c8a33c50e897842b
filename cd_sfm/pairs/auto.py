"""``pairs: auto`` (the default): the pair sources for a collection, chosen from its size and whether it looks like
a sequence.

* up to :data:`EXHAUSTIVE_MAX_IMAGES` images: ``exhaustive`` (every pair; nothing can be missed, and it is cheap);
* more images that look like a sequence (video frames, a walk: see :func:`looks_like_sequence`):
  ``retrieval+sequential`` (each image with its next ``overlap`` ones, plus its ``num_neighbors`` most similar for
  loop closures);
* more images otherwise (an unordered collection): ``retrieval``.

The threshold: exhaustive matching costs N(N-1)/2 pairs, retrieval about ``num_neighbors`` x N before repeats are
dropped (0.6-0.7 x that after, measured on the pooled collections of docs/speed.md). With 20 neighbours the two cost
the same near N = 30 and exhaustive costs twice as much from N = 55 on; at 50 images exhaustive is 1225 pairs, a
couple of minutes of matching on two cores. Below that the certainty of exhaustive pairs is worth its price; above
it the quadratic growth is not (docs/speed.md, "COLMAP's own pipeline, retrieval and scale": 94 photos pooled from 8
scenes registered the same images from retrieval pairs in a third of the time).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from ..images import numbered_sequence

logger = logging.getLogger(__name__)

EXHAUSTIVE_MAX_IMAGES = 50


def timed_sequence(image_dir: Path | None, names: Sequence[str]) -> bool:
    """Whether EXIF capture times (DateTimeOriginal) of at least 80 % of the images, in name order, never go back
    and have a median interval of at most 10 s (a burst, a timelapse, frames of a walk)."""
    if image_dir is None:
        return False
    from ..images import capture_time, natural_key

    times = [capture_time(Path(image_dir) / n) for n in sorted(names, key=natural_key)]
    known = np.array([t for t in times if t is not None], np.float64)
    if len(known) < max(3, 0.8 * len(names)):
        return False
    steps = np.diff(known)
    return bool((steps >= 0).all() and np.median(steps) <= 10.0)


def looks_like_sequence(names: Sequence[str], image_dir: Path | None = None) -> bool:
    return numbered_sequence(names) or timed_sequence(image_dir, names)


def choose(names: Sequence[str], image_dir: Path | None = None) -> tuple[list[str], str]:
    """(pair sources, the reason in words) for ``pairs: auto``."""
    n = len(names)
    if n <= EXHAUSTIVE_MAX_IMAGES:
        return ["exhaustive"], f"exhaustive ({n} images <= {EXHAUSTIVE_MAX_IMAGES})"
    if looks_like_sequence(names, image_dir):
        return ["retrieval", "sequential"], f"retrieval+sequential ({n} images that look like a sequence)"
    return ["retrieval"], f"retrieval ({n} images, not a sequence)"
