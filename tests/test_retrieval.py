"""Retrieval pairs: blockwise top-k, symmetric deduplication, union with sequential pairs, the stage entry point;
and (with ../shared) the acceptance check against verified exhaustive matches on a real scene."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cd_sfm import globaldesc as gd
from cd_sfm.io import CdSfmError, H5Appender, parse_pairs
from cd_sfm.pairs import retrieval

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_global(path, vecs: dict[str, np.ndarray]):
    with H5Appender(path) as out:
        for name, v in vecs.items():
            out.add(name, {gd.GLOBAL_KEY: np.asarray(v, np.float32)})


def brute_topk(x, k):
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("block", [1, 7, 64, 1024])
def test_blockwise_topk_equals_brute_force(block):
    rng = np.random.default_rng(0)
    x = gd.l2_normalize(rng.normal(size=(150, 24)))
    idx, scores = retrieval.topk_neighbors(x, 5, block_size=block)
    np.testing.assert_array_equal(idx, brute_topk(x, 5))
    assert (np.diff(scores, axis=1) <= 0).all()
    np.testing.assert_allclose(scores, np.take_along_axis(x @ x.T, idx, 1), rtol=1e-5)


def test_topk_never_builds_the_full_matrix(monkeypatch):
    rng = np.random.default_rng(0)
    x = gd.l2_normalize(rng.normal(size=(300, 8)))
    shapes = []

    def sim(q, db):
        shapes.append(q.shape[0] * db.shape[0])
        return q @ db.T

    retrieval.topk_neighbors(x, 3, block_size=32, similarity=sim)
    assert max(shapes) <= 32 * 300 < 300 * 300
    # a large collection shrinks the block so that one block stays under MAX_BLOCK_ELEMENTS
    shapes.clear()
    monkeypatch.setattr(retrieval, "MAX_BLOCK_ELEMENTS", 3000)
    idx, _ = retrieval.topk_neighbors(x, 3, block_size=1024, similarity=sim)
    assert max(shapes) <= 3000
    np.testing.assert_array_equal(idx, brute_topk(x, 3))
    # k larger than the collection: everything but itself
    idx, _ = retrieval.topk_neighbors(x[:4], 10)
    assert idx.shape == (4, 3) and all(i not in row for i, row in enumerate(idx))


def test_symmetric_pairs_dedup():
    idx = np.array([[1, 2], [0, 2], [0, 1], [0, 2]])
    pairs = retrieval.symmetric_pairs(idx)
    assert pairs.tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [2, 3]]
    scores = np.array([[0.9, 0.1], [0.9, 0.2], [0.1, 0.2], [0.05, 0.8]])
    assert retrieval.symmetric_pairs(idx, scores, min_score=0.5).tolist() == [[0, 1], [2, 3]]


def test_main_writes_pairs_and_sequential_union(tmp_path):
    rng = np.random.default_rng(0)
    # two groups of images: vectors near one of two directions
    base = gd.l2_normalize(rng.normal(size=(2, 16)))
    names = [f"f{i:03d}.jpg" for i in range(12)]
    vecs = {n: gd.l2_normalize(base[i % 2] + 0.1 * rng.normal(size=16)) for i, n in enumerate(names)}
    gpath = tmp_path / "global-feats.h5"
    write_global(gpath, vecs)
    out = tmp_path / "pairs.txt"
    pairs = retrieval.main({}, names, gpath, out, num_neighbors=2)
    assert parse_pairs(out) == pairs
    assert len(set(map(frozenset, pairs))) == len(pairs)
    assert all(names.index(a) % 2 == names.index(b) % 2 for a, b in pairs)  # never across groups
    assert all(names.index(a) < names.index(b) for a, b in pairs)
    every = {n for p in pairs for n in p}
    assert every == set(names)

    both = retrieval.main({"sequential_overlap": 1}, names, gpath, out, num_neighbors=2)
    keys = set(map(frozenset, both))
    assert set(map(frozenset, pairs)) <= keys
    assert all(frozenset((names[i], names[i + 1])) in keys for i in range(11))
    assert len(keys) == len(both)

    # names default to the whole file; K >= N - 1 gives every pair
    allp = retrieval.main(None, None, gpath, out, num_neighbors=50)
    assert len(allp) == 12 * 11 // 2


def test_asmk_kernel_is_used_automatically(tmp_path):
    from test_globaldesc import make_scene_features

    feats = tmp_path / "features.h5"
    scenes = make_scene_features(feats, n_scenes=2, per_scene=4)
    gpath = tmp_path / "global-feats.h5"
    gd.main({"method": "asmk", "num_clusters": 8}, gpath, features_path=feats)
    conf = retrieval.RetrievalConf(num_neighbors=3)
    sim, _ = retrieval._kernel(conf, gpath, np.zeros((1, 8 * 64), np.float32))
    assert sim is not retrieval.dot_similarity
    pairs = retrieval.main(conf, None, gpath, tmp_path / "p.txt")
    assert all(scenes[a] == scenes[b] for a, b in pairs)
    assert len(pairs) == 2 * 6  # within each scene of 4 every pair


def test_errors(tmp_path):
    gpath = tmp_path / "g.h5"
    write_global(gpath, {"a.jpg": np.ones(4), "b.jpg": np.ones(4)})
    with pytest.raises(CdSfmError, match="no global descriptor"):
        retrieval.main(None, ["a.jpg", "c.jpg"], gpath, tmp_path / "p.txt")
    with pytest.raises(CdSfmError, match="num-neighbors"):
        retrieval.main({"num_neighbors": 0}, None, gpath, tmp_path / "p.txt")
    with pytest.raises(CdSfmError, match="unknown retrieval option"):
        retrieval.RetrievalConf.from_any({"k": 3})


# --------------------------------------------------------------------------------------------------------------------
# acceptance (issue 6) on real scenes: retrieval with K = 5 proposes >= 90% of the pairs that keep >= 50 verified
# matches in an exhaustive run. Scenes where every image overlaps more than K others cap any K = 5 retrieval below
# that (see scripts/eval_retrieval.py, whose "oracle" shows the cap); these two are scenes where the bar is reachable.


@pytest.mark.shared
@pytest.mark.parametrize("scene", [
    "middlebury_templeSparseRing/images",  # 16 views on a ring: each overlaps a few neighbours (~10 s)
    pytest.param("phototourism_samples", marks=pytest.mark.slow),  # two landmarks pooled (~40 s)
])
def test_retrieval_recall_of_verified_pairs_on_real_scene(tmp_path, scene):
    from cd_sfm.evaluation.retrieval import evaluate

    image_dir = SHARED / scene
    if not image_dir.is_dir():
        pytest.skip(f"{image_dir} not available")
    r = evaluate(image_dir, tmp_path, feature_conf="rootsift-fast", global_confs=["vlad"], num_neighbors=5,
                 min_inliers=50)
    assert r["reference"]["overlapping"] >= 10
    assert r["vlad"]["recall"] >= 0.9, r["vlad"]
    assert r["vlad"]["proposed"] < r["reference"]["pairs"]
