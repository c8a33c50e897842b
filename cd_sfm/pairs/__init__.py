"""Image pair selection: which pairs of images get matched. Each module has a ``main(...)`` that returns the pairs and
writes them to a ``pairs.txt`` (one ``name0 name1`` per line, hloc's format) when given an output path.

* :mod:`.exhaustive`: every pair (or every query x reference pair).
* :mod:`.from_file`: pairs listed by the user, checked against the image names.
* :mod:`.sequential`: each image with the next ``overlap`` ones (video, ordered captures).
* :mod:`.retrieval`: each image with its ``num_neighbors`` most similar by global descriptors (``cd_sfm.globaldesc``).
* :mod:`.spatial`: each image with its ``num_neighbors`` nearest by EXIF GPS position (COLMAP's spatial matcher).

Sources combine by union (``--pairs retrieval+sequential``, see ``cd_sfm.pipeline.run_pairs``): :func:`unique_pairs`
drops the repeats.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

from ..io import write_pairs

logger = logging.getLogger(__name__)

Pair = tuple[str, str]


def unique_pairs(pairs: Iterable[Pair]) -> list[Pair]:
    """Drop self pairs and repeats of a pair in either order, keeping the first occurrence and the input order."""
    seen: set[Pair] = set()
    out: list[Pair] = []
    for a, b in pairs:
        if a == b:
            continue
        key = (a, b) if a < b else (b, a)
        if key in seen:
            continue
        seen.add(key)
        out.append((a, b))
    return out


def save(pairs: list[Pair], output_path: str | Path | None) -> list[Pair]:
    """Write ``pairs`` atomically when ``output_path`` is given; return them."""
    if output_path is not None:
        write_pairs(output_path, pairs)
        logger.info("Wrote %d pair(s) to %s", len(pairs), output_path)
    return pairs
