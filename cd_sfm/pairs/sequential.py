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
    rig_prefixes: Sequence[str] = (),
) -> list[Pair]:
    """Pairs (i, i + k) for k = 1..``overlap`` in capture order.

    ``quadratic_overlap`` also adds (i, i + 2^k) for k < ``overlap`` (as COLMAP's option of that name); ``loop``
    wraps around (the last images are paired with the first, for closed trajectories); ``per_folder`` treats each
    folder as its own sequence (e.g. one folder per camera of a rig) and makes no pairs across folders.
    ``rig_prefixes`` (the cameras of a rig configuration): the images of a frame (the same name after their camera's
    prefix) are put next to each other, and ``overlap`` counts frames, so each image pairs with every image of its
    own frame and of the next ``overlap`` frames, as COLMAP's sequential matcher expands rig frames.
    """
    if overlap < 1:
        raise ValueError(f"overlap must be >= 1, got {overlap}")
    # sequences (one, or one per folder) of frames: a frame is one image, or the images of a rig taken together
    groups: dict[str, dict[str, list[str]]] = {}
    for name in dict.fromkeys(names):
        prefix = next((p for p in rig_prefixes if name.startswith(p)), None)
        if prefix is not None:
            group, frame = "", name[len(prefix):]
        else:
            group, frame = (name.rpartition("/")[0] if per_folder else ""), name
        groups.setdefault(group, {}).setdefault(frame, []).append(name)
    steps = set(range(1, overlap + 1))
    if quadratic_overlap:
        steps |= {2**k for k in range(overlap)}
    pairs: list[Pair] = []
    for group in sorted(groups):
        frames = groups[group]
        seq = sorted(frames, key=natural_key)
        n = len(seq)
        for i in range(n):
            members = frames[seq[i]]
            pairs.extend((a, b) for k, a in enumerate(members) for b in members[k + 1:])  # within a rig frame
            for k in sorted(steps):
                j = i + k
                if j >= n:
                    if not loop:
                        continue
                    j -= n
                    if j >= i:
                        continue
                pairs.extend((a, b) for a in members for b in frames[seq[j]])
    pairs = unique_pairs(pairs)
    if not pairs:
        logger.warning("No image pairs: %d image name(s) given", len(names))
    return save(pairs, output_path)
