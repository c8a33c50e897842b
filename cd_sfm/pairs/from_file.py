"""Pairs listed by the user in a text file (``name0 name1`` per line; hloc's and COLMAP's format), checked against
the image names so that a typo fails early with the file and line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from ..io import CdSfmError, pair_lines
from . import Pair, save, unique_pairs

logger = logging.getLogger(__name__)


def _clean(name: str) -> str:
    name = name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


def read(pairs_file: str | Path) -> list[tuple[int, str, str]]:
    """(line number, name0, name1) of every pair line; blank lines and ``#`` comments are skipped, extra columns
    (e.g. a retrieval score) ignored."""
    return [(i, _clean(a), _clean(b)) for i, a, b in pair_lines(pairs_file)]


def main(
    pairs_file: str | Path,
    names: Sequence[str] | None = None,
    output_path: str | Path | None = None,
    on_unknown: str = "error",
) -> list[Pair]:
    """Pairs of ``pairs_file``, self pairs and repeats (in either order) dropped.

    With ``names``, every name must be one of them: an unknown name raises ``CdSfmError("<file>:<line>: ...")``
    (``on_unknown="error"``) or the pair is dropped with a warning (``"skip"``; e.g. when some images were
    unreadable). Written to ``output_path`` when given.
    """
    if on_unknown not in ("error", "skip"):
        raise ValueError(f"on_unknown must be error or skip, not {on_unknown!r}")
    known = set(names) if names is not None else None
    path = Path(pairs_file)
    kept: list[Pair] = []
    n_unknown = 0
    for line, a, b in read(path):
        if known is not None:
            unknown = [n for n in (a, b) if n not in known]
            if unknown:
                msg = f"{path}:{line}: unknown image {unknown[0]!r} (not in the image folder or not readable)"
                if on_unknown == "error":
                    raise CdSfmError(msg)
                logger.warning("Dropping pair: %s", msg)
                n_unknown += 1
                continue
        kept.append((a, b))
    pairs = unique_pairs(kept)
    n_self = sum(a == b for a, b in kept)
    n_dup = len(kept) - n_self - len(pairs)
    if n_self or n_dup or n_unknown:
        logger.info("%s: %d pair(s) kept; dropped %d self pair(s), %d repeat(s), %d with unknown images",
                    path, len(pairs), n_self, n_dup, n_unknown)
    if not pairs:
        logger.warning("%s: no usable image pairs", path)
    return save(pairs, output_path)
