"""Global descriptors: GeM / R-MAC pooling, seeded k-means, VLAD / ASMK aggregation, the resumable stage."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from cd_sfm import globaldesc as gd
from cd_sfm.io import CdSfmError, H5Appender, features_to_h5


def make_scene_features(path, n_scenes=3, per_scene=5, n_kpts=300, dim=64, seed=0, prefix=""):
    """A features.h5 of images drawn from ``n_scenes`` scenes: each scene a pool of descriptors, each image a random
    subset of its scene's pool plus noise and some clutter. Returns {name: scene}."""
    rng = np.random.default_rng(seed)
    scenes = {}
    with H5Appender(path) as out:
        for s in range(n_scenes):
            pool = rng.normal(size=(500, dim)).astype(np.float32)
            for i in range(per_scene):
                d = pool[rng.choice(len(pool), n_kpts, replace=False)] + 0.3 * rng.normal(size=(n_kpts, dim))
                d[: n_kpts // 5] = rng.normal(size=(n_kpts // 5, dim))  # clutter shared by nobody
                d /= np.linalg.norm(d, axis=1, keepdims=True)
                name = f"{prefix}s{s}/img{i:02d}.jpg"
                kp = rng.uniform(0, 500, (n_kpts, 2))
                out.add(name, features_to_h5({"keypoints": kp, "descriptors": d, "scores": np.ones(n_kpts),
                                              "image_size": np.array([640, 480])}))
                scenes[name] = s
    return scenes


def nearest_same_scene(path, scenes):
    names, desc = gd.read_global(path)
    sim = desc @ desc.T
    np.fill_diagonal(sim, -np.inf)
    nn = sim.argmax(1)
    return np.mean([scenes[names[i]] == scenes[names[j]] for i, j in enumerate(nn)])


def test_gem_pooling():
    fmap = np.full((4, 5, 8), 2.0, np.float32)
    v = gd.gem(fmap, p=3)
    np.testing.assert_allclose(v, np.full(8, 1 / np.sqrt(8)), rtol=1e-6)
    # p = 1 is average pooling of the clamped map; negative responses (res5c is pre-ReLU) count as ~0
    rng = np.random.default_rng(0)
    fmap = rng.normal(size=(7, 9, 16)).astype(np.float32)
    ref = np.maximum(fmap, 1e-6).reshape(-1, 16).mean(0)
    np.testing.assert_allclose(gd.gem(fmap, p=1), ref / np.linalg.norm(ref), rtol=1e-5)
    # large p tends to max pooling
    mx = np.maximum(fmap, 1e-6).reshape(-1, 16).max(0)
    assert np.dot(gd.gem(fmap, p=50), mx / np.linalg.norm(mx)) > 0.99


def test_rmac_regions_and_pooling():
    for h, w in [(14, 14), (24, 32), (32, 21), (1, 1), (3, 40)]:
        regs = gd.rmac_regions(h, w, 3)
        assert (regs[:, 0] >= 0).all() and (regs[:, 1] >= 0).all()
        assert (regs[:, 2] <= h).all() and (regs[:, 3] <= w).all()
        assert (regs[:, 2] > regs[:, 0]).all() and (regs[:, 3] > regs[:, 1]).all()
        assert tuple(regs[0]) == (0, 0, h, w)
    assert len(gd.rmac_regions(24, 32, 3)) == 1 + 2 + 6 + 12  # cirtorch's count for a 3:4 map
    rng = np.random.default_rng(1)
    fmap = rng.normal(size=(24, 32, 64)).astype(np.float32)
    v = gd.rmac(fmap)
    assert v.shape == (64,) and np.isclose(np.linalg.norm(v), 1)
    # a translated map (same content, shifted by a few cells) keeps a very similar descriptor
    assert np.dot(v, gd.rmac(np.roll(fmap, 3, axis=1))) > 0.9


def test_kmeans_seeded_and_separates_clusters():
    rng = np.random.default_rng(0)
    true = rng.normal(size=(8, 16)) * 10
    x = (true[rng.integers(0, 8, 4000)] + rng.normal(size=(4000, 16))).astype(np.float32)
    c1 = gd.kmeans(x, 8, iters=30, seed=3)
    c2 = gd.kmeans(x, 8, iters=30, seed=3)
    np.testing.assert_array_equal(c1, c2)
    # each true centre has a learned centre close to it
    d = np.linalg.norm(true[:, None] - c1[None], axis=-1).min(1)
    assert d.max() < 0.5
    # more clusters than points: one centre per point
    assert gd.kmeans(x[:5], 8).shape == (5, 16)
    with pytest.raises(CdSfmError):
        gd.kmeans(np.zeros((0, 16), np.float32), 4)


def test_vlad_and_asmk_vectors():
    rng = np.random.default_rng(0)
    centers = gd.kmeans(rng.normal(size=(2000, 32)).astype(np.float32), 16, seed=0)
    d = gd.prepare_local(rng.normal(size=(500, 32)))
    v = gd.vlad(d, centers)
    assert v.shape == (16 * 32,) and np.isclose(np.linalg.norm(v), 1, atol=1e-5)
    np.testing.assert_allclose(gd.vlad(d[rng.permutation(500)], centers), v, atol=1e-6)  # order free
    assert np.isfinite(gd.vlad(d[:0], centers)).all()  # an image without features
    a = gd.asmk_vector(d[:3], centers)
    per = a.reshape(16, 32)
    nonempty = np.linalg.norm(per, axis=1) > 0
    assert 1 <= nonempty.sum() <= 3 and np.allclose(np.linalg.norm(per[nonempty], axis=1), 1, atol=1e-5)
    b = gd.asmk_vector(d, centers)
    s = gd.asmk_similarity(np.stack([a, b]), np.stack([a, b]), 16)
    np.testing.assert_allclose(np.diag(s), 1, atol=1e-5)
    assert (s <= 1 + 1e-5).all()


@pytest.mark.parametrize("preset", ["vlad", "asmk", "vlad-pca"])
def test_local_stage_finds_same_scene(tmp_path, preset):
    feats = tmp_path / "features.h5"
    scenes = make_scene_features(feats)
    out = tmp_path / "global-feats.h5"
    conf = {**gd.confs[preset], "num_clusters": 16, "pca_dim": 8 if preset == "vlad-pca" else None, "pca_whiten": False}
    gd.main(conf, out, features_path=feats)
    names, desc = gd.read_global(out)
    assert names == sorted(scenes)
    with h5py.File(out) as f:
        assert f[names[0]][gd.GLOBAL_KEY].dtype == np.float16
    dim = {"vlad": 16 * 64, "asmk": 16 * 64, "vlad-pca": 8}[preset]
    assert desc.shape == (15, dim)
    if preset == "asmk":
        from cd_sfm.pairs.retrieval import RetrievalConf, _kernel

        sim, desc = _kernel(RetrievalConf(), out, desc)
        s = sim(desc, desc)
        np.fill_diagonal(s, -np.inf)
        acc = np.mean([scenes[names[i]] == scenes[names[j]] for i, j in enumerate(s.argmax(1))])
    else:
        acc = nearest_same_scene(out, scenes)
    assert acc == 1.0


def test_local_stage_resumes_and_relearns_on_new_options(tmp_path, monkeypatch):
    feats = tmp_path / "features.h5"
    scenes = make_scene_features(feats, n_scenes=2, per_scene=3)
    names = sorted(scenes)
    out = tmp_path / "global-feats.h5"
    conf = {"method": "vlad", "num_clusters": 8}
    gd.main(conf, out, features_path=feats, names=names[:4])
    _, first = gd.read_global(out, names[:4])
    model = gd.load_model(out)
    assert model is not None and model[1]["centers"].shape == (8, 64)

    calls = []
    real = gd.local_global_descriptor
    monkeypatch.setattr(gd, "local_global_descriptor", lambda *a: calls.append(1) or real(*a))
    gd.main(conf, out, features_path=feats, names=names)  # resume: the stored codebook, only the 2 new images
    assert len(calls) == 2
    _, again = gd.read_global(out, names[:4])
    np.testing.assert_array_equal(first, again)

    calls.clear()
    gd.main({**conf, "num_clusters": 4}, out, features_path=feats, names=names)  # new options: everything again
    assert len(calls) == len(names)
    assert gd.read_global(out)[1].shape == (len(names), 4 * 64)
    assert gd.load_model(out)[1]["centers"].shape == (4, 64)


def test_local_stage_describes_re_extracted_images_again(tmp_path, monkeypatch):
    """An image extracted again (replaced in place, or its feature mask changed: a new version in its feature
    entry's attributes) gets a new global descriptor on the next run; the others are reused."""
    from cd_sfm.io import ATTRS_KEY

    feats = tmp_path / "features.h5"
    names = sorted(make_scene_features(feats, n_scenes=2, per_scene=3))
    out = tmp_path / "global-feats.h5"
    conf = {"method": "vlad", "num_clusters": 8}
    gd.main(conf, out, features_path=feats, names=names)
    _, first = gd.read_global(out, names)
    rng = np.random.default_rng(5)
    d = rng.normal(size=(200, 64)).astype(np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    entry = features_to_h5({"keypoints": rng.uniform(0, 500, (200, 2)), "descriptors": d, "scores": np.ones(200),
                            "image_size": np.array([640, 480])})
    entry[ATTRS_KEY] = {"source_size": 10, "source_mtime_ns": 20, "mask_size": 3, "mask_mtime_ns": 4}
    with H5Appender(feats) as f:
        f.add(names[1], entry)
    calls = []
    real = gd.local_global_descriptor
    monkeypatch.setattr(gd, "local_global_descriptor", lambda *a: calls.append(1) or real(*a))
    gd.main(conf, out, features_path=feats, names=names)
    assert len(calls) == 1
    _, again = gd.read_global(out, names)
    assert not np.allclose(first[1], again[1])
    np.testing.assert_array_equal(np.delete(first, 1, 0), np.delete(again, 1, 0))
    calls.clear()
    gd.main(conf, out, features_path=feats, names=names)  # now current: nothing again
    assert calls == []


def test_regional_stage_with_injected_maps(tmp_path):
    rng = np.random.default_rng(0)
    maps = {f"im{i}.jpg": rng.normal(size=(6, 8, 32)).astype(np.float32) for i in range(4)}
    out = tmp_path / "global-feats-gem.h5"
    gd.main("gem", out, names=list(maps), regional_fn=maps.__getitem__)
    names, desc = gd.read_global(out)
    np.testing.assert_allclose(desc[0], gd.gem(maps[names[0]]), atol=2e-3)  # stored as float16
    out2 = tmp_path / "global-feats-rmac.h5"
    gd.main("rmac", out2, names=list(maps), regional_fn=maps.__getitem__)
    np.testing.assert_allclose(gd.read_global(out2)[1][1], gd.rmac(maps[names[1]]), atol=2e-3)


def test_regional_stage_copies_descriptors_stored_at_extraction(tmp_path):
    feats = tmp_path / "features.h5"
    rng = np.random.default_rng(0)
    vecs = {}
    with H5Appender(feats) as out:
        for i in range(3):
            v = rng.normal(size=2048).astype(np.float32)
            vecs[f"a{i}.jpg"] = v / np.linalg.norm(v)
            out.add(f"a{i}.jpg", {**features_to_h5({"keypoints": np.zeros((1, 2)), "descriptors": np.zeros((1, 128)),
                                                    "scores": np.zeros(1), "image_size": np.array([4, 4])}),
                                  gd.GLOBAL_KEY: vecs[f"a{i}.jpg"]})
    out = tmp_path / "g.h5"
    gd.main("gem", out, features_path=feats)  # no image folder, no network: must use the stored vectors
    names, desc = gd.read_global(out)
    np.testing.assert_allclose(desc, np.stack([vecs[n] for n in names]), atol=2e-3)


def test_errors(tmp_path):
    with pytest.raises(CdSfmError, match="unknown global descriptor preset"):
        gd.GlobalConf.from_any("netvlad")
    with pytest.raises(CdSfmError, match="unknown global descriptor option"):
        gd.GlobalConf.from_any({"clusters": 3})
    with pytest.raises(CdSfmError, match="local features not found"):
        gd.main("vlad", tmp_path / "g.h5", features_path=tmp_path / "missing.h5", names=["a.jpg"])
    with pytest.raises(CdSfmError, match="global descriptors not found"):
        gd.read_global(tmp_path / "nope.h5")


@pytest.mark.slow  # TensorFlow import + ResNet50 build and weight file: ~15 s
def test_regional_stage_runs_the_network(tmp_path, monkeypatch):
    """The regional ResNet50 found through the model registry (random weights here: the plumbing, not the accuracy)
    on two small images."""
    pytest.importorskip("tensorflow")
    import cv2

    from cd_sfm.models import registry, regional
    from cd_sfm.models.weights import save_weights_npz

    monkeypatch.setenv(registry.ENV_HOME, str(tmp_path / "home"))
    monkeypatch.delattr(regional, "load_regional_model", raising=False)
    monkeypatch.setattr(gd, "_REGIONAL_MODEL", None)
    folder = registry.models_dir() / "retrieval"
    folder.mkdir(parents=True)
    (folder / "info.json").write_text("{}")
    save_weights_npz(regional.build_regional_model(), folder / registry.WEIGHT_FILES["regional"])
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        cv2.imwrite(str(images / f"im{i}.png"), rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))
    assert gd.retrieval_preset("auto") == "gem"
    out = tmp_path / "g.h5"
    gd.main({"method": "gem", "max_size": 64}, out, image_dir=images)
    names, desc = gd.read_global(out)
    assert names == ["im0.png", "im1.png"] and desc.shape == (2, regional.FEATURE_DIM)
    np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1, atol=1e-2)


def test_regional_without_weights_points_to_local(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow")
    from cd_sfm.models import registry, regional

    monkeypatch.setenv(registry.ENV_HOME, str(tmp_path / "home"))
    monkeypatch.setattr(registry, "PACKAGE_WEIGHTS", tmp_path / "no-shipped-weights")
    monkeypatch.delattr(regional, "load_regional_model", raising=False)
    monkeypatch.setattr(gd, "_REGIONAL_MODEL", None)
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(CdSfmError, match="--retrieval local"):
        gd.main("gem", tmp_path / "g.h5", names=["a.png"], image_dir=tmp_path)
    assert gd.retrieval_preset("auto") == "vlad"
    assert gd.retrieval_preset("local") == "vlad" and gd.retrieval_preset("regional") == "gem"
