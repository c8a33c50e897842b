import logging
from pathlib import Path

import h5py
import numpy as np
import pytest

from cd_sfm import matching
from cd_sfm.features import extract
from cd_sfm.io import CdSfmError, H5Appender, completed_names, features_to_h5, names_to_pair, read_features, \
    read_matches, write_pairs
from cd_sfm.matching import match_descriptors


def correlated(n0, n1, n_common, d=32, noise=0.35, seed=0):
    """Two random descriptor sets sharing ``n_common`` noisy correspondences (d1[perm[i]] ~ d0[i])."""
    rng = np.random.default_rng(seed)
    d0 = rng.standard_normal((n0, d)).astype(np.float32)
    d1 = rng.standard_normal((n1, d)).astype(np.float32)
    perm = rng.permutation(n1)[:n_common]
    d1[perm] = d0[:n_common] + noise * rng.standard_normal((n_common, d)).astype(np.float32)
    return d0, d1, perm


def reference(d0, d1, ratio, mutual, distance_threshold, metric):
    """Brute force, one pair of descriptors at a time, float64. Also flags ratio/threshold decisions too close to
    call in float32 (excluded from the comparison)."""
    a = d0 / np.linalg.norm(d0, axis=1, keepdims=True)
    b = d1 / np.linalg.norm(d1, axis=1, keepdims=True)
    a, b = a.astype(np.float64), b.astype(np.float64)

    def dist(x, y):
        if metric == "angle":
            return np.arccos(np.clip(x @ y, -1, 1))
        return np.linalg.norm(x - y)

    m = np.full(len(a), -1)
    close = np.zeros(len(a), bool)
    for i in range(len(a)):
        ds = np.array([dist(a[i], b[j]) for j in range(len(b))])
        order = np.argsort(ds, kind="stable")
        j = order[0]
        ok = True
        if ratio is not None and len(b) > 1:
            ok &= ds[j] < ratio * ds[order[1]]
            close[i] |= abs(ds[j] - ratio * ds[order[1]]) < 1e-4
        if distance_threshold is not None:
            ok &= ds[j] <= distance_threshold
            close[i] |= abs(ds[j] - distance_threshold) < 1e-4
        if mutual:
            back = np.array([dist(a[k], b[j]) for k in range(len(a))])
            ok &= np.argmin(back) == i
        m[i] = j if ok else -1
    return m, close


@pytest.mark.parametrize(
    "seed,ratio,mutual,thr,metric,block",
    [(0, 0.8, True, None, "l2", 2048), (1, 0.8, True, None, "l2", 7), (2, None, True, None, "l2", 16),
     (3, 0.9, False, None, "l2", 5), (4, 0.8, True, 0.7, "angle", 11), (5, None, False, 1.0, "l2", 64)],
)
def test_against_brute_force(seed, ratio, mutual, thr, metric, block):
    d0, d1, _ = correlated(150, 120, 60, seed=seed)
    m, s = match_descriptors(d0, d1, ratio=ratio, mutual=mutual, distance_threshold=thr, metric=metric,
                             block_rows=block)
    ref, close = reference(d0, d1, ratio, mutual, thr, metric)
    assert m.dtype == np.int32 and m.shape == (150,) and s.dtype == np.float32
    assert np.array_equal(m[~close], ref[~close])
    assert (m >= 0).sum() > 20
    cos = np.sum(d0 / np.linalg.norm(d0, axis=1, keepdims=True) *
                 (d1 / np.linalg.norm(d1, axis=1, keepdims=True))[np.maximum(m, 0)], axis=1)
    np.testing.assert_allclose(s[m >= 0], (cos[m >= 0] + 1) / 2, atol=1e-5)
    assert np.all(s[m < 0] == 0)


def test_true_correspondences_found():
    d0, d1, truth = correlated(500, 400, 200, d=64, noise=0.2, seed=1)
    m, _ = match_descriptors(d0, d1)
    assert np.mean(m[:200] == truth) > 0.95
    assert np.mean(m[200:] >= 0) < 0.05  # points without a partner rarely pass ratio + mutual


def test_edge_cases():
    d = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    m, s = match_descriptors(d, np.zeros((0, 8), np.float32))
    assert m.tolist() == [-1] * 5 and s.shape == (5,)
    m, _ = match_descriptors(np.zeros((0, 8), np.float32), d)
    assert m.shape == (0,)
    m, _ = match_descriptors(d, d[2:3])  # one candidate: ratio test passes, mutual keeps the true one
    assert m.tolist() == [-1, -1, 0, -1, -1]
    m, _ = match_descriptors(d, d)
    assert m.tolist() == list(range(5))
    with pytest.raises(ValueError):
        match_descriptors(d, np.ones((3, 4), np.float32))


def write_features(path, descs):
    with H5Appender(path) as app:
        for name, d in descs.items():
            n = len(d)
            app.add(name, features_to_h5({"keypoints": np.zeros((n, 2)), "descriptors": d, "scores": np.ones(n),
                                          "image_size": [64, 48]}))


def test_main_batched_and_resumable(tmp_path, caplog):
    rng = np.random.default_rng(0)
    base = rng.standard_normal((300, 64)).astype(np.float32)
    names = ["a.jpg", "b.jpg", "sub/c.jpg", "sub/d.jpg", "e.jpg"]
    descs = {}
    for i, n in enumerate(names):  # overlapping subsets of one "scene" plus clutter
        keep = rng.permutation(300)[:200]
        d = np.concatenate([base[keep] + 0.2 * rng.standard_normal((200, 64)), rng.standard_normal((50, 64))])
        descs[n] = d.astype(np.float32)[rng.permutation(250)]
    feats = tmp_path / "features.h5"
    write_features(feats, descs)

    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    pairs_txt = tmp_path / "pairs.txt"
    write_pairs(pairs_txt, pairs[:6] + [("b.jpg", "a.jpg"), ("a.jpg", "a.jpg"), ("a.jpg", "missing.jpg")])
    out = tmp_path / "matches.h5"
    conf = {**matching.confs["NN-ratio"], "batch_size": 4, "cache_mb": 0.1, "block_rows": 100, "num_workers": 2}
    stats = matching.main(conf, pairs_txt, feats, out, progress=False)
    assert stats["matched"] == 6 and stats["reused"] == 0
    assert list(stats["skipped"]) == [names_to_pair("a.jpg", "missing.jpg")]
    assert stats["num_matches_mean"] > 30
    assert not out.with_name("matches.h5.parts").exists()
    for a, b in pairs[:6]:
        ref, ref_s = match_descriptors(descs[a].astype(np.float16), descs[b].astype(np.float16))
        with h5py.File(out, "r") as f:
            g = f[names_to_pair(a, b)]
            assert g["matches0"].dtype == np.int32 and g["matching_scores0"].dtype == np.float16
            np.testing.assert_array_equal(g["matches0"][()], ref)
        mm, sc = read_matches(out, b, a)  # reversed lookup
        assert len(mm) == (ref >= 0).sum()

    # all pairs: the 6 done (one of them asked in the other order) are reused, the rest matched
    write_pairs(pairs_txt, [(b, a) for a, b in pairs])
    with caplog.at_level(logging.INFO, logger="cd_sfm.matching"):
        stats = matching.main("NN-ratio", pairs_txt, feats, out, progress=False)
    assert stats["reused"] == 6 and stats["matched"] == len(pairs) - 6
    assert "Reusing the matches of 6 pair(s)" in caplog.text
    assert len(completed_names(out)) == len(pairs)

    stats = matching.main("NN-ratio", pairs, feats, out, overwrite=True, progress=False)
    assert stats["matched"] == len(pairs) and stats["reused"] == 0


def test_main_resume_from_parts_and_errors(tmp_path):
    rng = np.random.default_rng(2)
    descs = {n: rng.standard_normal((40, 16)).astype(np.float32) for n in ("a", "b", "c")}
    feats = tmp_path / "features.h5"
    write_features(feats, descs)
    out = tmp_path / "matches.h5"
    app = H5Appender(out)
    m, s = match_descriptors(descs["a"], descs["b"])
    app.add(names_to_pair("a", "b"), {"matches0": m, "matching_scores0": s.astype(np.float16)})
    app.flush()  # a killed run: a complete part, never merged
    stats = matching.main("NN-mutual", [("a", "b"), ("a", "c"), ("b", "c")], feats, out, progress=False)
    assert stats["reused"] == 1 and stats["matched"] == 2
    assert len(completed_names(out)) == 3 and not out.with_name("matches.h5.parts").exists()

    with pytest.raises(CdSfmError, match="feature file not found"):
        matching.main("NN-ratio", [("a", "b")], tmp_path / "none.h5", out)
    with pytest.raises(CdSfmError, match="unknown matching preset"):
        matching.main("nope", [("a", "b")], feats, out)
    write_features(tmp_path / "mixed.h5", {"a": descs["a"], "x": rng.standard_normal((30, 8)).astype(np.float32)})
    with pytest.raises(CdSfmError, match="differ in size"):
        matching.main("NN-ratio", [("a", "x")], tmp_path / "mixed.h5", tmp_path / "m2.h5", progress=False)


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.shared
@pytest.mark.skipif(not (SHARED / "hpatches" / "v_wormhole").is_dir(), reason="needs ../shared/data/hpatches")
def test_hpatches_rootsift_pipeline(tmp_path):
    """Real photos: extract RootSIFT on an HPatches viewpoint pair, match, check against the ground-truth homography."""
    root = SHARED / "hpatches" / "v_wormhole"
    feats = tmp_path / "features.h5"
    conf = {**extract.confs["rootsift"], "options": {"max_keypoints": 2048}}
    stats = extract.main(conf, root, feats, image_list=["1.ppm", "3.ppm"], progress=False)
    assert stats["extracted"] == 2
    matching.main("NN-ratio", [("1.ppm", "3.ppm")], feats, tmp_path / "matches.h5", progress=False)
    m, _ = read_matches(tmp_path / "matches.h5", "1.ppm", "3.ppm")
    k0 = read_features(feats, "1.ppm")["keypoints"][m[:, 0]]
    k1 = read_features(feats, "3.ppm")["keypoints"][m[:, 1]]
    H = np.loadtxt(root / "H_1_3")
    p = np.c_[k0, np.ones(len(k0))] @ H.T
    err = np.linalg.norm(p[:, :2] / p[:, 2:] - k1, axis=1)
    assert len(m) > 200 and np.mean(err < 3) > 0.8
