"""Every pair of images: n (n - 1) / 2 pairs, or every query with every reference image."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from . import Pair, save, unique_pairs

logger = logging.getLogger(__name__)


def main(names: Sequence[str], output_path: str | Path | None = None,
         names_ref: Sequence[str] | None = None) -> list[Pair]:
    """All pairs (names[i], names[j]) with i < j, in the order of ``names``; with ``names_ref``, every
    (query, reference) pair instead (self pairs and repeats dropped). Written to ``output_path`` when given."""
    names = list(dict.fromkeys(names))
    if names_ref is None:
        pairs = [(names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))]
    else:
        pairs = unique_pairs((q, r) for q in names for r in dict.fromkeys(names_ref))
    if not pairs:
        logger.warning("No image pairs: %d image name(s) given", len(names))
    return save(pairs, output_path)
