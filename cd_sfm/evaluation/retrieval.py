"""How good are retrieval pairs? Recall of the pairs that exhaustive matching proves to overlap.

Reference: every pair of the collection is matched and geometrically verified (COLMAP two-view geometry); a pair
"overlaps" when it keeps at least ``min_inliers`` verified matches. Recall: the share of those pairs that retrieval
(global descriptors, top ``num_neighbors``) proposes. The acceptance bar of issue 6: >= 0.9 with K = 5 and 50 inliers.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterable, Sequence

logger = logging.getLogger(__name__)


def verified_pair_counts(database_path: str | Path) -> dict[frozenset, int]:
    """{frozenset({name0, name1}): number of verified inlier matches} of every verified pair in a COLMAP database."""
    import pycolmap

    db = pycolmap.Database.open(str(database_path))
    try:
        id_to_name = {im.image_id: im.name for im in db.read_all_images()}
        pair_ids, counts = db.read_two_view_geometry_num_inliers()
    finally:
        db.close()
    out = {}
    for pid, n in zip(pair_ids, counts):
        a, b = pycolmap.pair_id_to_image_pair(pid)
        out[frozenset((id_to_name[a], id_to_name[b]))] = int(n)
    return out


def pair_recall(reference: dict[frozenset, int], pairs: Iterable[tuple[str, str]], min_inliers: int = 50) -> dict:
    """Share of the reference pairs with >= ``min_inliers`` verified matches that ``pairs`` contains."""
    proposed = {frozenset(p) for p in pairs}
    positives = {p for p, n in reference.items() if n >= min_inliers}
    found = positives & proposed
    missed = sorted((tuple(sorted(p)), reference[p]) for p in positives - proposed)
    return {
        "recall": len(found) / len(positives) if positives else 1.0,
        "positives": len(positives),
        "found": len(found),
        "proposed": len(proposed),
        "missed": missed,
    }


def oracle_pairs(reference: dict[frozenset, int], names: Sequence[str], num_neighbors: int) -> list[tuple[str, str]]:
    """The best any retrieval with ``num_neighbors`` per image can do: each image's partners ranked by their verified
    inlier counts (an upper bound for the recall of a K-per-image retrieval)."""
    partners: dict[str, list[tuple[int, str]]] = {n: [] for n in names}
    for pair, n in reference.items():
        a, b = tuple(pair)
        if a in partners and b in partners:
            partners[a].append((n, b))
            partners[b].append((n, a))
    out = []
    for a in names:
        out += [(a, b) for _, b in sorted(partners[a], key=lambda t: (-t[0], t[1]))[:num_neighbors]]
    return out


def evaluate(
    image_dir: str | Path,
    work_dir: str | Path,
    image_names: Sequence[str] | None = None,
    feature_conf: dict | str = "rootsift",
    matcher_conf: dict | str = "NN-ratio",
    global_confs: Sequence[dict | str] = ("vlad",),
    num_neighbors: int = 5,
    min_inliers: int = 50,
    verification: dict | None = None,
) -> dict:
    """Exhaustive reference and retrieval recall on one collection; intermediate files go to ``work_dir`` (reused
    when present). Returns {"reference": {...}, "<global conf name>": pair_recall(...) + timings}."""
    from .. import globaldesc, matching
    from ..colmap import database
    from ..features import extract
    from ..pairs import exhaustive
    from ..pairs import retrieval

    image_dir, work_dir = Path(image_dir), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    feats = work_dir / "features.h5"
    t = time.monotonic()
    extract.main(feature_conf, image_dir, feats, image_list=image_names, progress=False)
    t_extract = time.monotonic() - t
    names = list(image_names) if image_names is not None else None
    if names is None:
        from ..io import list_h5_names

        names = list_h5_names(feats)
    pairs_ex = work_dir / "pairs-exhaustive.txt"
    exhaustive.main(names, pairs_ex)
    t = time.monotonic()
    matching.main(matcher_conf, pairs_ex, feats, work_dir / "matches-exhaustive.h5", progress=False)
    db_path = work_dir / "exhaustive.db"
    database.main({"descriptor_uint8": "none"}, db_path, feats, image_dir, pairs_ex, work_dir / "matches-exhaustive.h5",
                  image_names=names, verification=verification or {})
    t_exhaustive = time.monotonic() - t
    reference = verified_pair_counts(db_path)
    result = {"reference": {"images": len(names), "pairs": len(names) * (len(names) - 1) // 2,
                            "overlapping": sum(n >= min_inliers for n in reference.values()),
                            "extract_s": t_extract, "match_verify_s": t_exhaustive},
              "oracle": pair_recall(reference, oracle_pairs(reference, names, num_neighbors), min_inliers)}
    for gconf in global_confs:
        gname = gconf if isinstance(gconf, str) else gconf.get("name", gconf.get("method", "global"))
        gpath = work_dir / f"global-{gname}.h5"
        t = time.monotonic()
        globaldesc.main(gconf, gpath, features_path=feats, image_dir=image_dir, names=names)
        pairs = retrieval.main(None, names, gpath, work_dir / f"pairs-{gname}.txt", num_neighbors=num_neighbors)
        r = pair_recall(reference, pairs, min_inliers)
        r["retrieval_s"] = time.monotonic() - t
        result[gname] = r
        logger.info("%s: recall %.3f (%d/%d overlapping pairs) with %d proposed pairs", gname, r["recall"], r["found"],
                    r["positives"], r["proposed"])
    return result
