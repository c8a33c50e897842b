"""Pairs for ordered captures (video frames, a walk around an object): each image with the next ``overlap`` ones.

Images are ordered by natural sort of their names (``frame2`` before ``frame10``), as COLMAP's sequential matcher
expects names that sort in capture order.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from ..images import natural_key
from . import Pair, save, unique_pairs

logger = logging.getLogger(__name__)


def main(
    names: Sequence[str],
    output_path: str | Path | None = None,
    overlap: int = 10,
    quadratic_overlap: bool = False,
    loop: bool = False,
    per_folder: bool = False,
) -> list[Pair]:
    """Pairs (i, i + k) for k = 1..``overlap`` in capture order.

    ``quadratic_overlap`` also adds (i, i + 2^k) for k < ``overlap`` (as COLMAP's option of that name); ``loop``
    wraps around (the last images are paired with the first, for closed trajectories); ``per_folder`` treats each
    folder as its own sequence (e.g. one folder per camera of a rig) and makes no pairs across folders.
    """
    if overlap < 1:
        raise ValueError(f"overlap must be >= 1, got {overlap}")
    groups: dict[str, list[str]] = {}
    for name in dict.fromkeys(names):
        key = name.rpartition("/")[0] if per_folder else ""
        groups.setdefault(key, []).append(name)
    pairs: list[Pair] = []
    for key in sorted(groups):
        seq = sorted(groups[key], key=natural_key)
        n = len(seq)
        steps = set(range(1, overlap + 1))
        if quadratic_overlap:
            steps |= {2**k for k in range(overlap)}
        for i in range(n):
            for k in sorted(steps):
                j = i + k
                if j >= n:
                    if not loop:
                        continue
                    j -= n
                    if j >= i:
                        continue
                pairs.append((seq[i], seq[j]))
    pairs = unique_pairs(pairs)
    if not pairs:
        logger.warning("No image pairs: %d image name(s) given", len(names))
    return save(pairs, output_path)
