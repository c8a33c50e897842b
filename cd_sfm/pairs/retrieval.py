"""Image pairs from global-descriptor retrieval: each image with its ``num_neighbors`` most similar images.

Similarities are computed in blocks of ``block_size`` query rows against the whole collection and reduced to the top k
at once (``argpartition``), so memory is O(N * D + block_size * N), never an N x N matrix. Pairs are symmetric: (a, b)
and (b, a) are one pair, written once with the names in collection order. Optionally the union with sequential pairs
(``pairs.sequential``: each image with the next ``sequential_overlap`` ones, for video) is added.

The similarity is the dot product of the L2-normalised global descriptors, or ASMK's selective match kernel when the
descriptors were made by ``globaldesc`` with ``method="asmk"`` (read from ``<global-feats.h5>.model.npz``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from ..progress import tqdm

from ..io import CdSfmError, write_pairs

logger = logging.getLogger(__name__)


@dataclass
class RetrievalConf:
    num_neighbors: int = 5
    block_size: int = 1024  # query rows per similarity block
    min_score: float | None = None  # drop neighbours less similar than this
    sequential_overlap: int = 0  # union with pairs.sequential's pairs of this overlap; 0 = none
    kernel: str = "auto"  # auto (from the model file) | dot | asmk

    @classmethod
    def from_any(cls, conf: "RetrievalConf | dict | None", **overrides) -> "RetrievalConf":
        if conf is None:
            conf = {}
        if isinstance(conf, cls):
            conf = {f.name: getattr(conf, f.name) for f in fields(cls)}
        conf = {**conf, **{k: v for k, v in overrides.items() if v is not None}}
        known = {f.name for f in fields(cls)}
        unknown = set(conf) - known
        if unknown:
            raise CdSfmError(f"unknown retrieval option(s): {', '.join(sorted(unknown))}")
        out = cls(**conf)
        if out.num_neighbors < 1:
            raise CdSfmError(f"--num-neighbors must be at least 1, got {out.num_neighbors}")
        if out.kernel not in ("auto", "dot", "asmk"):
            raise CdSfmError(f"unknown retrieval kernel {out.kernel!r}; use auto, dot or asmk")
        return out


Similarity = Callable[[np.ndarray, np.ndarray], np.ndarray]


def dot_similarity(q: np.ndarray, db: np.ndarray) -> np.ndarray:
    return q @ db.T


MAX_BLOCK_ELEMENTS = 2**23  # similarity entries per block (32 MB of float32 + 64 MB of argpartition indices)


def topk_neighbors(desc: np.ndarray, k: int, block_size: int = 1024, similarity: Similarity | None = None,
                   db: np.ndarray | None = None, exclude_self: bool = True,
                   progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar database rows of every query row, best first: (indices (Nq, k), scores (Nq, k)).

    ``db`` defaults to ``desc`` itself (then a row is not its own neighbour when ``exclude_self``). Each block of
    ``block_size`` queries (fewer when the collection is so large that a block would exceed ``MAX_BLOCK_ELEMENTS``)
    makes one (block, Ndb) similarity matrix, reduced with ``argpartition``: memory O(N D + block * N), bounded.
    """
    desc = np.asarray(desc, np.float32)
    same = db is None
    db = desc if same else np.asarray(db, np.float32)
    sim = similarity or dot_similarity
    nq, ndb = len(desc), len(db)
    k = int(min(k, ndb - (1 if same and exclude_self else 0)))
    if k <= 0 or nq == 0:
        return np.zeros((nq, 0), np.int64), np.zeros((nq, 0), np.float32)
    idx_out = np.empty((nq, k), np.int64)
    score_out = np.empty((nq, k), np.float32)
    block_size = max(1, min(block_size, MAX_BLOCK_ELEMENTS // max(ndb, 1)))
    starts = range(0, nq, block_size)
    for s in tqdm(starts, desc="retrieval", unit="block", disable=not progress or len(starts) < 4):
        e = min(s + block_size, nq)
        scores = np.asarray(sim(desc[s:e], db), np.float32)
        if same and exclude_self:
            scores[np.arange(e - s), np.arange(s, e)] = -np.inf
        part = np.argpartition(scores, ndb - k, axis=1)[:, ndb - k :] if k < ndb else \
            np.tile(np.arange(ndb), (e - s, 1))
        top = np.take_along_axis(scores, part, 1)
        # best first, equal scores in index order
        order = np.lexsort((part, -top), axis=1)
        idx_out[s:e] = np.take_along_axis(part, order, 1)
        score_out[s:e] = np.take_along_axis(top, order, 1)
    return idx_out, score_out


def symmetric_pairs(idx: np.ndarray, scores: np.ndarray | None = None, min_score: float | None = None) -> np.ndarray:
    """Unique unordered pairs (M, 2), i < j, sorted, from a neighbour table (N, k)."""
    n, k = idx.shape
    i = np.repeat(np.arange(n, dtype=np.int64), k)
    j = idx.reshape(-1).astype(np.int64)
    keep = i != j
    if scores is not None and min_score is not None:
        keep &= scores.reshape(-1) >= min_score
    i, j = i[keep], j[keep]
    return unique_pairs(np.stack([i, j], 1))


def unique_pairs(pairs: np.ndarray) -> np.ndarray:
    """Order each pair as (min, max), drop self pairs and duplicates; sorted by (i, j)."""
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    a, b = pairs.min(1), pairs.max(1)
    keep = a != b
    a, b = a[keep], b[keep]
    m = int(b.max()) + 1 if len(b) else 1
    code = np.unique(a * m + b)
    return np.stack([code // m, code % m], 1)


def _kernel(conf: RetrievalConf, global_path: Path, desc: np.ndarray) -> tuple[Similarity, np.ndarray]:
    """The similarity function, and the descriptors arranged for it."""
    from ..globaldesc import asmk_similarity, load_model

    kernel = conf.kernel
    meta = None
    if kernel in ("auto", "asmk"):
        stored = load_model(global_path)
        meta = stored[0]["signature"] if stored else None
        if kernel == "auto":
            kernel = "asmk" if meta and meta.get("method") == "asmk" else "dot"
    if kernel == "dot":
        return dot_similarity, desc
    if meta is None:
        raise CdSfmError(f"{global_path}: the ASMK kernel needs the model file written by the global descriptor stage")
    k = int(meta["num_clusters"])
    if desc.shape[1] % k:
        raise CdSfmError(f"{global_path}: descriptor size {desc.shape[1]} is not a multiple of {k} clusters")
    alpha, tau = float(meta["asmk_alpha"]), float(meta["asmk_threshold"])
    dv = desc.reshape(len(desc), k, -1)
    db_norm = 1.0 / np.sqrt(np.maximum((np.abs(dv).sum(-1) > 0).sum(-1), 1))

    def asmk(q: np.ndarray, db: np.ndarray) -> np.ndarray:
        return asmk_similarity(q, db, k, alpha, tau, db_norm=db_norm if db.shape == desc.shape else None)

    return asmk, desc


def retrieval_pairs(conf: RetrievalConf | dict | None, names: Sequence[str], global_path: str | Path,
                    num_neighbors: int | None = None) -> list[tuple[str, str]]:
    """The retrieval pairs of ``names`` (collection order) as a list of (name_i, name_j), i before j."""
    from ..globaldesc import read_global

    conf = RetrievalConf.from_any(conf, num_neighbors=num_neighbors)
    global_path = Path(global_path)
    names, desc = read_global(global_path, names)
    sim, desc = _kernel(conf, global_path, desc)
    idx, scores = topk_neighbors(desc, conf.num_neighbors, conf.block_size, sim, progress=True)
    pairs = [(names[i], names[j]) for i, j in symmetric_pairs(idx, scores, conf.min_score)]
    n_retrieved = len(pairs)
    if conf.sequential_overlap:
        from . import sequential
        from . import unique_pairs as unique_name_pairs

        pairs = unique_name_pairs(pairs + sequential.main(names, None, overlap=conf.sequential_overlap))
    logger.info("Retrieval: %d pairs from %d images (k=%d)%s", n_retrieved, len(names), conf.num_neighbors,
                f", {len(pairs)} with sequential overlap {conf.sequential_overlap}" if conf.sequential_overlap else "")
    return pairs


def main(conf: RetrievalConf | dict | None, names: Sequence[str] | None, global_path: str | Path,
         output_path: str | Path, num_neighbors: int | None = None) -> list[tuple[str, str]]:
    """Write the retrieval pairs of ``names`` (default: every image in ``global_path``) to ``output_path``."""
    pairs = retrieval_pairs(conf, names, global_path, num_neighbors)
    write_pairs(output_path, pairs)
    return pairs
