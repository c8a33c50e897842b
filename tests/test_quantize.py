"""int8 local model: quantisation into a model folder, staleness, the runner's int8 path, ``cd-sfm models quantize``."""

import json
import shutil

import cv2
import numpy as np
import pytest

from cd_sfm.cli import main as cli_main
from cd_sfm.features.contextdesc import ContextDescBackend
from cd_sfm.io import CdSfmError
from cd_sfm.models import int8 as i8
from cd_sfm.models.runner import int8_measured_faster
from cd_sfm.modeltools import quantize as q
from cd_sfm.models import registry
from cd_sfm.models.augment import build_augment_model
from cd_sfm.modeltools.frozen import generated_image
from cd_sfm.models.local import build_local_model
from cd_sfm.models.weights import load_weights_npz, save_weights_npz


def _image_patches(n, seed=0):
    from cd_sfm.features.patches import SiftDetectorConf, detect_sift, extract_patches

    out = []
    for s in range(seed, seed + 4):
        gray = cv2.cvtColor(generated_image(240, 320, seed=s), cv2.COLOR_RGB2GRAY)
        kp = detect_sift(gray, SiftDetectorConf(max_keypoints=400))
        out.append(extract_patches(gray, kp["keypoints"], kp["scales"], kp["angles"]))
    return np.concatenate(out)[:n]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A model folder with float32 random local + geometric augmentation weights and its int8 local model."""
    d = tmp_path_factory.mktemp("q-model")
    save_weights_npz(build_local_model(), d / "local.npz", dtype=None)
    save_weights_npz(build_augment_model(visual=False), d / "augment.npz")
    (d / "info.json").write_text(json.dumps({"name": "q", "trained_on": "nothing (random weights)"}))
    q.quantize_folder(d, _image_patches(800), "generated images")
    return d


def test_quantize_folder_writes_model_and_meta(folder):
    meta = json.loads((folder / i8.INT8_META).read_text())
    assert meta["local_sha256"] == i8.file_sha256(folder / "local.npz")
    assert meta["calibration"] == "generated images" and meta["calibration_patches"] == 600
    agree = meta["agreement_on_held_out"]
    assert agree["patches"] == 200 and agree["cosine_mean"] > 0.99 and agree["cosine_min"] > 0.9
    assert i8.int8_path(folder) == folder / i8.INT8_FILE


def test_int8_close_to_float_on_unseen_patches(folder):
    model = build_local_model()
    load_weights_npz(model, folder / "local.npz")
    r = i8.Int8Local(folder / i8.INT8_FILE, batch_size=128)
    patches = _image_patches(300, seed=10)  # other images than the calibration: 2 full chunks and a resized one
    agree = q.agreement(model, r, patches)
    assert agree["patches"] == 300 and agree["cosine_mean"] > 0.99
    assert agree["matchability_max_abs"] < 0.1
    feat, mb = r(patches[:0])
    assert feat.shape == (0, 128) and mb.shape == (0,)
    # the runner standardises: scaled and shifted patches give the same output (up to an input rounding flip)
    f1, m1 = r(patches[:64])
    f2, m2 = r(patches[:64] * 3.0 + 7.0)
    cos = np.sum(f1 * f2, 1) / np.linalg.norm(f1, axis=1) / np.linalg.norm(f2, axis=1)
    assert cos.min() > 0.999 and np.allclose(m1, m2, atol=0.02)


def test_stale_int8_is_ignored(folder, tmp_path, caplog):
    d = tmp_path / "m"
    shutil.copytree(folder, d)
    assert i8.int8_path(d) is not None
    save_weights_npz(build_local_model(), d / "local.npz")  # retrained weights, old int8 file
    assert i8.int8_path(d) is None
    assert "other local weights" in caplog.text


def test_backend_int8_and_auto(folder):
    img = generated_image(240, 320, seed=3)
    f32 = ContextDescBackend(model=str(folder), max_keypoints=300).extract_with_local(img)
    b8 = ContextDescBackend(model=str(folder), max_keypoints=300, precision="int8")
    assert b8.runner.precision == "int8"
    f8 = b8.extract_with_local(img)
    assert np.array_equal(f32["keypoints"], f8["keypoints"])
    for key in ("local_descriptors", "descriptors"):
        cos = np.sum(f32[key] * f8[key], axis=1)
        assert cos.mean() > 0.99, key
    # auto: int8 where it was measured faster (AVX512-VNNI without AMX), elsewhere the faster of int8 and float as
    # timed once on this CPU
    auto = ContextDescBackend(model=str(folder), precision="auto").runner
    if int8_measured_faster():
        assert auto.precision == "int8" and auto.probe is None
    else:
        assert auto.precision == auto.probe["choice"] and set(auto.probe) >= {"int8", "choice"}


def test_int8_without_file_is_a_clear_error(tmp_path):
    d = tmp_path / "plain"
    d.mkdir()
    save_weights_npz(build_local_model(), d / "local.npz")
    with pytest.raises(CdSfmError, match="models quantize"):
        ContextDescBackend(model=str(d), precision="int8")
    assert ContextDescBackend(model=str(d), precision="auto").runner.precision in ("fp32", "bf16")


@pytest.mark.parametrize("engine", ["tflite", "openvino"])
def test_bad_int8_file(tmp_path, engine):
    if engine == "openvino":
        pytest.importorskip("openvino")
    p = tmp_path / "x.tflite"
    p.write_bytes(b"not a flatbuffer")
    with pytest.raises(CdSfmError, match="x.tflite"):
        i8.Int8Local(p, engine=engine)
    with pytest.raises(CdSfmError, match="missing.tflite: cannot read the int8 local model"):
        i8.Int8Local(tmp_path / "missing.tflite", engine=engine)


def test_openvino_and_tflite_give_the_same_outputs(folder):
    """The default engine where OpenVINO is installed runs the very TFLite file: same descriptors and matchability,
    in chunks of any size (a dynamic batch), empty input included."""
    pytest.importorskip("openvino")
    patches = _image_patches(300, seed=10)
    ov = i8.Int8Local(folder / i8.INT8_FILE, batch_size=128, engine="openvino")
    tfl = i8.Int8Local(folder / i8.INT8_FILE, batch_size=128, engine="tflite")
    assert ov.engine == "openvino" and tfl.engine == "tflite"
    (f1, m1), (f2, m2) = ov(patches), tfl(patches)
    cos = np.sum(f1 * f2, 1) / np.linalg.norm(f1, axis=1) / np.linalg.norm(f2, axis=1)
    assert f1.shape == (300, 128) and m1.shape == (300,) and cos.min() > 0.999 and np.abs(m1 - m2).max() < 0.05
    one, _ = ov(patches[:1])
    assert np.allclose(one, f1[:1], atol=1e-5)
    assert ov(patches[:0])[0].shape == (0, 128)


def test_int8_engine_choice(monkeypatch):
    monkeypatch.setenv(i8.ENV_ENGINE, "tflite")
    assert i8.int8_engine() == "tflite"
    monkeypatch.setenv(i8.ENV_ENGINE, "onnx")
    with pytest.raises(CdSfmError, match="CD_SFM_INT8_ENGINE"):
        i8.int8_engine()
    monkeypatch.delenv(i8.ENV_ENGINE)
    import importlib.util

    assert i8.int8_engine() == ("openvino" if importlib.util.find_spec("openvino") else "tflite")


def test_models_quantize_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(registry.ENV_HOME, str(tmp_path / "home"))
    d = tmp_path / "home" / "models" / "tiny"
    d.mkdir(parents=True)
    save_weights_npz(build_local_model(), d / "local.npz")
    (d / "info.json").write_text(json.dumps({"name": "tiny"}))
    photos = tmp_path / "photos"
    photos.mkdir()
    for s in range(3):
        cv2.imwrite(str(photos / f"{s}.png"), generated_image(240, 320, seed=20 + s))
    assert cli_main(["models", "quantize", "tiny", "--images", str(photos), "--num-patches", "400"]) == 0
    out = capsys.readouterr().out
    assert "wrote local_int8.tflite" in out and "3 images" in out
    assert i8.int8_path(d) is not None
    assert cli_main(["models", "quantize", "tiny", "--images", str(tmp_path / "nowhere")]) == 2
    assert "not a folder of images" in capsys.readouterr().err


def test_shipped_int8_is_up_to_date():
    """Retraining the shipped local model means quantising it again (``scripts/train_default.sh`` does)."""
    try:
        entry = registry.resolve(registry.DEFAULT_MODEL)
    except CdSfmError:
        pytest.skip("no trained model shipped")
    assert i8.int8_path(entry.folder) is not None


def test_tflite_banner_goes_to_the_log_not_stderr(folder, capfd):
    r = i8.Int8Local(folder / i8.INT8_FILE, engine="tflite")
    r(_image_patches(10))
    assert "XNNPACK" not in capfd.readouterr().err


def test_extract_stage_runs_images_in_parallel_with_the_same_result(folder, tmp_path):
    from cd_sfm.features import extract
    from cd_sfm.io import read_features

    photos = tmp_path / "photos"
    photos.mkdir()
    for s in range(5):
        cv2.imwrite(str(photos / f"{s}.png"), generated_image(240, 320, seed=30 + s))
    threads = cv2.getNumThreads()
    out = {}
    for par in (1, 2):
        b = ContextDescBackend(model=str(folder), max_keypoints=300, precision="int8", parallel_images=par)
        assert b.parallel_images == par
        stats = extract.main({"backend": "contextdesc"}, photos, tmp_path / f"f{par}.h5", backend=b, progress=False)
        assert stats["extracted"] == 5 and b.timings["images"] == 5
        out[par] = {n: read_features(tmp_path / f"f{par}.h5", n) for n in [f"{s}.png" for s in range(5)]}
    assert cv2.getNumThreads() == threads  # restored after the parallel section
    for name, f1 in out[1].items():
        f2 = out[2][name]
        assert np.array_equal(f1["keypoints"], f2["keypoints"])
        assert np.allclose(f1["descriptors"], f2["descriptors"], atol=1e-3), name
    auto = ContextDescBackend(model=str(folder), precision="int8")
    assert auto.parallel_images == min(2, auto._cores)
    assert ContextDescBackend(model=str(folder), precision="fp32").parallel_images == 1


def test_probe_local_speed_times_both_and_keeps_the_faster(folder):
    """What ``precision: auto`` runs on CPUs where int8 was not measured faster: both forms timed on this CPU."""
    from cd_sfm.models.runner import probe_local_speed

    model = build_local_model()
    load_weights_npz(model, folder / "local.npz")
    for fp in ("bf16", "fp32"):
        r = probe_local_speed(folder / i8.INT8_FILE, model, build_local_model, fp, n=256, batch=128, repeats=1)
        assert r["int8"] > 0 and r[fp] > 0
        assert r["choice"] == max(("int8", fp), key=r.get)


@pytest.mark.parametrize("hw", ["AMX", None])
def test_auto_probes_where_int8_was_not_measured_then_extracts(folder, monkeypatch, hw):
    from cd_sfm.models import runner

    # the wiring on an AMX CPU and on one without VNNI or bf16 (none here); the timing itself is real
    monkeypatch.setattr(runner, "int8_measured_faster", lambda: False)
    monkeypatch.setattr(runner, "bf16_support", lambda: hw)
    monkeypatch.setattr(runner, "_PROBES", {})
    b = ContextDescBackend(model=str(folder), precision="auto", max_keypoints=200)
    p = b.runner.probe
    assert p is not None and set(p) == {"int8", "bf16" if hw else "fp32", "choice"}
    assert b.runner.precision == p["choice"]
    f = b.extract(generated_image(240, 320, seed=4))
    assert f["descriptors"].shape[1] == 128 and np.allclose(np.linalg.norm(f["descriptors"], axis=1), 1, atol=1e-3)
    again = ContextDescBackend(model=str(folder), precision="auto", max_keypoints=200)
    assert again.runner.probe is p  # timed once per process


def test_no_probe_where_int8_was_measured_faster(folder, monkeypatch):
    from cd_sfm.models import runner

    monkeypatch.setattr(runner, "int8_measured_faster", lambda: True)
    b = ContextDescBackend(model=str(folder), precision="auto")
    assert b.runner.probe is None and b.runner.precision == "int8"
