import logging
from pathlib import Path

import h5py
import numpy as np
import pytest

from cd_sfm import matching
from cd_sfm.features import extract
from cd_sfm.io import CdSfmError, H5Appender, completed_names, features_to_h5, names_to_pair, read_features, \
    read_matches, write_pairs
from cd_sfm.matching import match_descriptors, match_descriptors_reference


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


# --------------------------------------------------------------------------------------------------------------------
# the fused matcher against the reference (the matcher as it was, kept verbatim)

DEFAULT = dict(ratio=0.8, mutual=True, distance_threshold=None, metric="l2", cross_ratio=True)


@pytest.fixture
def fused(monkeypatch):
    """The fused kernels even for small pairs (which otherwise go to the reference matcher)."""
    monkeypatch.setattr(matching, "FUSED_MIN_PAIRS", 0)


def assert_same(d0, d1, **kw):
    opts = {**DEFAULT, **kw}
    ref, ref_s = match_descriptors_reference(d0, d1, **{k: v for k, v in opts.items() if k not in ("screen", "threads")})
    m, s = match_descriptors(d0, d1, **opts)
    assert m.dtype == np.int32 and s.dtype == np.float32 and m.shape == ref.shape
    np.testing.assert_array_equal(m, ref)
    np.testing.assert_allclose(s, ref_s, atol=1e-6)
    return m


def low_rank(n, d=128, rank=24, seed=0):
    """Descriptors with a decaying spectrum (most energy in a few axes, as learned descriptors have)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    scale = np.exp(-np.arange(d) / rank)
    return (rng.standard_normal((n, d)) * scale) @ basis.T


@pytest.mark.parametrize("n0,n1,d", [(300, 250, 128), (1100, 700, 64), (513, 1025, 32), (40, 2000, 128)])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_same_as_reference_random(n0, n1, d, threads, fused):
    d0, d1, _ = correlated(n0, n1, min(n0, n1) // 2, d=d, noise=0.3, seed=n0 + n1)
    m = assert_same(d0, d1, threads=threads)
    assert (m >= 0).sum() > min(n0, n1) // 4
    assert_same(d0, d1, threads=threads, cross_ratio=False)


@pytest.mark.parametrize("kw", [dict(ratio=None), dict(mutual=False), dict(ratio=0.9, distance_threshold=0.6),
                                dict(metric="angle", distance_threshold=0.7), dict(ratio=None, mutual=False)])
def test_fused_same_as_reference_options(kw, fused):
    d0, d1, _ = correlated(700, 600, 300, d=64, noise=0.4, seed=3)
    assert_same(d0, d1, **kw)


def test_fused_ties_and_edges(fused):
    rng = np.random.default_rng(5)
    # +-1 vectors of 64 dims: unit rows of +-1/8, every similarity an exact multiple of 1/64 whatever the order of
    # the sums (BLAS rounding would otherwise break the ties differently), with repeated rows on both sides: exact
    # ties everywhere (the first index wins, as argmax decides)
    d = np.sign(rng.standard_normal((600, 64))).astype(np.float32)
    d0 = np.concatenate([d[:300], d[:50], d[100:110]])
    d1 = np.concatenate([d[250:], d[:40], d[280:300]])
    for cross in (True, False):
        for mutual in (True, False):
            assert_same(d0, d1, cross_ratio=cross, mutual=mutual, ratio=0.8)
            assert_same(d0, d1, cross_ratio=cross, mutual=mutual, ratio=None)
    assert_same(np.tile(d[:1], (5, 1)), np.tile(d[1:2], (7, 1)))  # all equal
    for a, b in [(d[:1], d), (d, d[:1]), (d[:1], d[1:2]), (d[:1], d[:1]), (d, d[3:4])]:  # N == 1
        assert_same(a, b)
        assert_same(a, b, cross_ratio=False)
    for a, b in [(d, d[:0]), (d[:0], d), (d[:0], d[:0])]:  # empty
        m, s = match_descriptors(a, b)
        assert m.dtype == np.int32 and m.shape == (len(a),) and (m < 0).all() and s.shape == (len(a),)
    with pytest.raises(ValueError):
        match_descriptors(d, np.ones((3, 4), np.float32))


def agreement(m, ref):
    a = set(zip(np.flatnonzero(m >= 0).tolist(), m[m >= 0].tolist()))
    b = set(zip(np.flatnonzero(ref >= 0).tolist(), ref[ref >= 0].tolist()))
    return len(a & b) / max(len(b), 1), len(a & b) / max(len(a), 1)


def test_screen_structured(fused):
    """Low-rank descriptors engage the screen ("auto": few axes hold the energy); its matches are the reference's."""
    n = matching.SCREEN_MIN_KEYPOINTS + 500
    base = low_rank(n + 1000, seed=1)
    rng = np.random.default_rng(2)
    noise = 0.05 * np.abs(base).mean()
    d0 = base[:n] + noise * rng.standard_normal((n, 128))
    d1 = np.concatenate([base[1000:] + noise * rng.standard_normal((n, 128)), low_rank(500, seed=9)])
    d0, d1 = matching.normalize(d0), matching.normalize(d1)
    basis = matching.screen_basis(matching.gram(d0) + matching.gram(d1), len(d0), len(d1))
    assert basis is not None and basis.shape[0] == 128 and basis.shape[1] <= 64
    np.testing.assert_allclose(basis.T @ basis, np.eye(basis.shape[1]), atol=1e-5)
    ref, _ = match_descriptors_reference(d0, d1, normalized=True, cross_ratio=True)
    m, s = match_descriptors(d0, d1, normalized=True, cross_ratio=True, screen="auto",
                             grams=(matching.gram(d0), matching.gram(d1)))
    assert (ref >= 0).sum() > 1000
    found, own = agreement(m, ref)
    assert found > 0.99 and own > 0.99
    both = (m >= 0) & (m == ref)
    np.testing.assert_allclose(s[both], (np.sum(d0[both] * d1[m[both]], 1) + 1) / 2, atol=1e-6)
    # flat spectrum (random descriptors): the screen stays off, the result is the reference's
    flat = matching.normalize(correlated(7000, 10, 5, d=128)[0])
    assert matching.screen_basis(matching.gram(flat), 7000, 7000) is None


def test_fallback_without_numba(monkeypatch):
    d0, d1, _ = correlated(200, 150, 80, d=32, seed=4)
    monkeypatch.setattr(matching, "_kernel_module", False)
    m, _ = match_descriptors(d0, d1, cross_ratio=True)
    ref, _ = match_descriptors_reference(d0, d1, cross_ratio=True)
    np.testing.assert_array_equal(m, ref)


def test_match_options_from_conf(fused):
    conf = matching.resolve_conf({**matching.confs["NN-ratio"], "cross_ratio": True, "screen": 0, "num_workers": 2})
    opts = matching.match_options(conf)
    assert opts["screen"] == 0 and opts["cross_ratio"] and opts["normalized"] and opts["threads"] >= 1
    d0, d1, _ = correlated(300, 200, 100, d=32, seed=6)
    m, _ = match_descriptors(matching.normalize(d0), matching.normalize(d1), **opts)
    np.testing.assert_array_equal(m, match_descriptors_reference(d0, d1, cross_ratio=True)[0])


def test_pairs_in_parallel_by_default(monkeypatch):
    """By default the match stage runs one pair per usable core, each on one thread; ``num_workers`` and ``threads``
    override that."""
    monkeypatch.setattr(matching, "default_threads", lambda: 4)
    conf = matching.resolve_conf("NN-ratio")
    assert matching.pair_workers(conf) == 4 and matching.match_options(conf)["threads"] == 1
    conf = matching.resolve_conf({**matching.confs["NN-ratio"], "num_workers": 1})
    assert matching.pair_workers(conf) == 1 and matching.match_options(conf)["threads"] == 4
    conf = matching.resolve_conf({**matching.confs["NN-ratio"], "num_workers": 2, "threads": 3})
    assert matching.pair_workers(conf) == 2 and matching.match_options(conf)["threads"] == 3


def test_presets_screen_by_default_accurate_is_exact():
    """The pipeline's default matching screens large pairs ("auto"); the accurate preset matches exactly, and so does
    a user's ``matching_options: {screen: 0}``."""
    from cd_sfm import config

    def opts(preset, **over):
        conf = config.resolve({**config.load_config(preset), **over})
        return matching.match_options(matching.resolve_conf({**matching.confs[conf["matching"]],
                                                             **conf["matching_options"]}))

    assert opts("default")["screen"] == "auto" and opts("default")["cross_ratio"]
    assert opts("fast")["screen"] == "auto"
    assert opts("accurate")["screen"] == 0 and opts("accurate")["cross_ratio"]
    assert opts("default", matching_options={"screen": 0})["screen"] == 0
    # the accurate preset also takes the full-size local network instead of the default student
    from cd_sfm.models import registry

    assert config.load_config("accurate")["model"] == registry.FULL_MODEL and config.load_config("default")["model"] is None


@pytest.mark.shared
@pytest.mark.skipif(not (SHARED / "strecha_entry-P10_half").is_dir(), reason="needs ../shared/data/strecha_entry-P10_half")
@pytest.mark.parametrize("preset", ["rootsift", pytest.param("contextdesc", marks=pytest.mark.slow)])
def test_real_descriptors_same_as_reference(tmp_path, preset, fused):
    """Real photos, the pipeline's default matching: the fused pass gives the reference's matches; the screen
    ("auto") more than 99 % of them and little else."""
    root = SHARED / "strecha_entry-P10_half" / "images"
    feats = tmp_path / "features.h5"
    extract.main(preset, root, feats, image_list=["0000.jpg", "0002.jpg"], progress=False)
    d0 = matching.normalize(read_features(feats, "0000.jpg")["descriptors"])
    d1 = matching.normalize(read_features(feats, "0002.jpg")["descriptors"])
    assert min(len(d0), len(d1)) >= 4096
    ref, _ = match_descriptors_reference(d0, d1, normalized=True, cross_ratio=True)
    exact, _ = match_descriptors(d0, d1, normalized=True, cross_ratio=True, screen=0)
    assert (ref >= 0).sum() > 500
    found, own = agreement(exact, ref)
    assert found > 0.9995 and own > 0.9995  # float rounding apart: the same
    screened, _ = match_descriptors(d0, d1, normalized=True, cross_ratio=True, screen="auto")
    found, own = agreement(screened, ref)
    assert found > 0.99 and own > 0.99


@pytest.mark.parametrize("T", [2, 8])
def test_topk_tile_keeps_the_largest_first_index_on_ties(T):
    """The kernel's row and column lists, tile by tile, against the whole matrix: the T largest values, each with
    an index that holds it, and for the largest the first index that holds it (as argmax decides; which of several
    equal values at the T-th place stays is not specified). Values on a coarse grid: ties everywhere; tile widths
    not multiples of 8, so flag words end part-way."""
    kern = matching._kernels()
    if kern is None:
        pytest.skip("numba not installed")
    rng = np.random.default_rng(T)
    n0, n1, tile = 203, 157, 37
    S = (rng.integers(0, 12, (n0, n1)) / 4).astype(np.float32)
    rows, cols = matching._empty_lists(n0, T), matching._empty_lists(n1, T)
    for r0 in range(0, n0, tile):
        for c0 in range(0, n1, tile + 5):
            kern.topk_tile(np.ascontiguousarray(S[r0 : r0 + tile, c0 : c0 + tile + 5]), r0, c0, rows, cols)
    for vals, idx, M in ((rows[0], rows[1], S), (cols[0], cols[1], S.T)):
        np.testing.assert_array_equal(np.sort(vals, 1), np.sort(M, 1)[:, -T:])
        np.testing.assert_array_equal(np.take_along_axis(M, idx.astype(np.int64), 1), vals)
        assert all(len(set(r)) == T for r in idx.tolist())  # each index once
        best, arg, _ = kern.top2(vals, idx)
        np.testing.assert_array_equal(arg, M.argmax(1))
        np.testing.assert_array_equal(best, M.max(1))
