import json

import cv2
import numpy as np
import pytest

pytest.importorskip("tensorflow")

from cd_sfm.models.local import build_local_model
from cd_sfm.models.weights import load_weights_npz
from cd_sfm.train import homography as hg
from cd_sfm.train import runlog
from cd_sfm.train import train_local as tl


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    d = tmp_path_factory.mktemp("mine")
    rng = np.random.default_rng(0)
    for i in range(3):
        img = cv2.GaussianBlur(rng.uniform(0, 255, (240, 320)).astype(np.float32), (0, 0), 2.5)
        cv2.imwrite(str(d / f"im{i}.png"), cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8))
    out = d / "pairs.h5"
    hg.mine_homography(hg.list_images([d]), out, hg.MineConf(warps_per_image=2, pairs_per_warp=32, val_every=3))
    return out


def _conf(data, run_dir, steps, **kw):
    return tl.TrainConf(data=str(data), run_dir=str(run_dir), steps=steps, batch=16, val_every=2, val_pairs=32,
                        val_block=16, ckpt_every=1, log_every=1, warmup=1, **kw)


def test_train_resume_and_export(mined, tmp_path):
    run = tmp_path / "run"
    r1 = tl.train_local(_conf(mined, run, 2, loss="npair"))
    assert r1["step"] == 2 and (run / "log.csv").exists() and (run / "curves.png").exists()
    r2 = tl.train_local(_conf(mined, run, 3, loss="npair", export="unit-test", export_dir=str(tmp_path / "weights")))
    assert r2["step"] == 3  # resumed: one more step, not three
    steps = [int(json.loads(json.dumps(r))["step"]) for r in runlog.read_log(run / "log.csv") if r["kind"] == "train"]
    assert steps == [1, 2, 3]
    npz = tmp_path / "weights" / "unit-test" / "local.npz"
    info = json.loads((npz.parent / "info.json").read_text())
    assert info["steps"] == 3 and info["loss"].startswith("npair")
    model = build_local_model()
    meta = load_weights_npz(model, npz)
    assert meta["steps"] == 3
    # float16 roundtrip: same outputs as the run's float32 final weights, to fp16 precision
    ref = build_local_model()
    load_weights_npz(ref, run / "final.npz")
    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 1)).astype(np.float32)
    a = model(x, training=False)["conv6_feat"].numpy()
    b = ref(x, training=False)["conv6_feat"].numpy()
    assert np.allclose(a, b, atol=2e-2 * np.abs(b).max())


def test_triplet_step_runs(mined, tmp_path):
    r = tl.train_local(_conf(mined, tmp_path / "trip", 1, loss="triplet"))
    assert r["step"] == 1 and np.isfinite(r["val"]["val_fpr95"])


def test_compact_student_distils_exports_and_runs(mined, tmp_path):
    """A compact student distilled from the shipped model: trains, exports with its layout recorded, and loads into
    the inference backend (folded twin) and the int8 quantiser like any model."""
    from cd_sfm.features.contextdesc import ContextDescBackend
    from cd_sfm.models import local, registry
    from cd_sfm.modeltools.quantize import quantize_folder

    teacher = registry.resolve(registry.FULL_MODEL).path("local")
    out = tmp_path / "weights"
    r = tl.train_local(_conf(mined, tmp_path / "stud", 2, arch="compact", teacher=str(teacher),
                             export="student", export_dir=str(out)))
    assert r["step"] == 2 and np.isfinite(r["val"]["val_acc"])
    info = json.loads((out / "student" / "info.json").read_text())
    assert info["local_arch"] == "compact" and info["teacher"] == str(teacher)
    assert info["multiply_adds_per_patch"] < local.multiply_adds() / 3.5
    model = local.load_local_model(out / "student" / "local.npz")
    assert local.widths_of_model(model) == local.ARCHS["compact"]
    rng = np.random.default_rng(1)
    img = cv2.GaussianBlur(rng.uniform(0, 255, (240, 320)).astype(np.float32), (0, 0), 2.0).astype(np.uint8)
    b = ContextDescBackend(model=str(out / "student"), max_keypoints=64, precision="fp32")
    f = b.extract(img)
    assert f["descriptors"].shape[1] == 128 and len(f["descriptors"]) > 0
    x = rng.uniform(0, 255, (8, 32, 32)).astype(np.float32)
    meta = quantize_folder(out / "student", np.concatenate([x] * 8), source="test")
    assert (out / "student" / "local_int8.tflite").is_file() and meta["agreement_on_held_out"]["cosine_mean"] > 0.9


def test_meta_counts_an_image_named_two_ways_once(tmp_path):
    """Mined files name images relative or absolute (warps vs SfM tracks of the same scene): the export's image count
    and held-out list name each image once."""
    import h5py

    for name, prefix in (("warps.h5", "../shared/data"), ("tracks.h5", "/work/shared/data")):
        with h5py.File(tmp_path / name, "w") as f:
            f.attrs["image_names"] = json.dumps([f"{prefix}/s/images/{i}.jpg" for i in "abc"])
            f.attrs["val_images"] = json.dumps([f"{prefix}/s/images/c.jpg"])
    conf = tl.TrainConf(data=str(tmp_path / "warps.h5"), run_dir=str(tmp_path / "run"),
                        data_extra=[str(tmp_path / "tracks.h5")], extra_ratio=[0.5])
    meta = tl._meta(conf, 0, None, "test")
    assert meta["train_images"] == 3 and meta["val_images"] == ["s/images/c.jpg"] and meta["train_scenes"] == ["s"]


def test_arch_choices_are_the_layouts():
    """``--arch`` offers exactly the layouts of ``models.local.ARCHS`` (written out so that the parser imports no
    TensorFlow), and each student is smaller than the one before it."""
    from cd_sfm.models import local

    action = next(a for a in tl.build_parser()._actions if a.dest == "arch")
    assert list(action.choices) == list(local.ARCHS)
    macs = [local.multiply_adds(a) for a in action.choices]
    assert macs == sorted(macs, reverse=True) and macs[-1] < 3e6


def test_fine_tune_starts_from_given_weights(mined, tmp_path):
    """--init: a new run starts from the given weights (step 0 = them), and a resumed run keeps its own."""
    from cd_sfm.models import registry

    shipped = registry.resolve(registry.FULL_MODEL).path("local")
    run = tmp_path / "ft"
    tl.train_local(_conf(mined, run, 1, init=str(shipped), lr=1e-9, export="ft", export_dir=str(tmp_path / "w")))
    x = np.random.default_rng(2).uniform(0, 255, (8, 32, 32, 1)).astype(np.float32)
    ref, tuned = build_local_model(), build_local_model()
    load_weights_npz(ref, shipped)
    load_weights_npz(tuned, run / "final.npz")
    a, b = tuned(x, training=False)["conv6_feat"].numpy(), ref(x, training=False)["conv6_feat"].numpy()
    assert np.allclose(a, b, atol=2e-2 * np.abs(b).max())  # lr ~0: still the shipped weights (to fp16)
    info = json.loads((tmp_path / "w" / "ft" / "info.json").read_text())
    assert info["initial_weights"] == str(shipped) and "fine-tuned" in info["description"]
    with pytest.raises(tl.CdSfmError, match="initial weights not found"):
        tl.train_local(_conf(mined, tmp_path / "bad", 1, init=str(tmp_path / "nope.npz")))


def test_batch_groups_draw_each_share_from_few_scenes():
    names = [f"data/scene{i // 3}/images/{i}.jpg" for i in range(12)]  # 4 scenes of 3 images
    groups = tl.scene_groups(np.arange(12, dtype=np.int32).repeat(50), names)
    assert groups.shape == (600,) and set(groups.tolist()) == {0, 1, 2, 3}
    n = len(groups)
    train = {"patches": np.zeros((2 * n, 2, 32, 32), np.uint8), "scales": np.ones((2 * n, 2), np.float32),
             "ids": np.arange(2 * n), "groups": np.concatenate([groups, groups + 4]), "bounds": [n, 2 * n]}
    conf = tl.TrainConf(batch=64, extra_ratio=0.5, batch_groups=1)
    for step in range(5):
        _, _, ids = tl.sample_batch(train, step, conf)
        main, extra = ids[ids < n], ids[ids >= n]
        assert len(main) == len(extra) == 32
        assert len(set(train["groups"][main])) == 1 and len(set(train["groups"][extra])) == 1
    seen = {int(train["groups"][tl.sample_batch(train, s, conf)[2][0]]) for s in range(40)}
    assert len(seen) >= 3  # the scene changes from step to step
    free = tl.sample_batch(train, 0, tl.TrainConf(batch=64, extra_ratio=0.5))[2]
    assert len(set(train["groups"][free[free < n]])) > 1
