"""The ``contextdesc`` feature backend (random weights until trained ones ship) and the weights manager."""

import argparse
import http.server
import io
import json
import logging
import tarfile
import threading
from dataclasses import replace

import numpy as np
import pytest

from cd_sfm.features import contextdesc as cd_mod
from cd_sfm.features.contextdesc import ContextDescBackend
from cd_sfm.io import CdSfmError
from cd_sfm.models import registry
from cd_sfm.modeltools import cli as models_cli, manage
from cd_sfm.models.augment import build_augment_model
from cd_sfm.modeltools.frozen import generated_image
from cd_sfm.models.local import build_local_model
from cd_sfm.models.regional import build_regional_model
from cd_sfm.models.runner import bf16_support
from cd_sfm.models.weights import save_weights_npz


@pytest.fixture(scope="module")
def rnd_model(tmp_path_factory):
    """A model folder with random local + geometric-only augmentation weights."""
    d = tmp_path_factory.mktemp("rnd-model")
    save_weights_npz(build_local_model(), d / "local.npz")
    save_weights_npz(build_augment_model(visual=False), d / "augment.npz")
    (d / "info.json").write_text(json.dumps({"name": "rnd", "trained_on": "nothing (random weights)"}))
    return d


@pytest.fixture(scope="module")
def image():
    return generated_image(240, 320, seed=1)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv(registry.ENV_HOME, str(tmp_path / "home"))
    return tmp_path / "home"


def test_extract_outputs(rnd_model, image):
    b = ContextDescBackend(model=str(rnd_model), max_keypoints=300)
    f = b.extract(image)
    n = len(f["keypoints"])
    assert 50 < n <= 300
    assert f["keypoints"].shape == (n, 2) and f["descriptors"].shape == (n, 128)
    for k in ("keypoints", "scales", "orientations", "scores", "descriptors"):
        assert f[k].dtype == np.float32, k
    assert np.allclose(np.linalg.norm(f["descriptors"], axis=1), 1, atol=1e-5)
    assert list(f["image_size"]) == [320, 240]
    assert f["keypoints"][:, 0].max() < 320 and f["keypoints"][:, 1].max() < 240
    assert np.all(np.diff(f["scales"]) <= 0)
    assert b.grayscale  # no regional model: grey images suffice


def test_no_augment_gives_normalised_raw_local(rnd_model, image):
    aug = ContextDescBackend(model=str(rnd_model), max_keypoints=200).extract_with_local(image)
    raw = ContextDescBackend(model=str(rnd_model), max_keypoints=200, augment=False).extract(image)
    assert np.allclose(raw["descriptors"], aug["local_descriptors"], atol=1e-5)
    assert np.allclose(np.linalg.norm(raw["descriptors"], axis=1), 1, atol=1e-5)
    assert not np.allclose(raw["descriptors"], aug["descriptors"], atol=1e-2)


def test_geometric_only_said_once(rnd_model, caplog):
    cd_mod._SAID.clear()
    with caplog.at_level(logging.INFO, logger="cd_sfm"):
        ContextDescBackend(model=str(rnd_model))
        ContextDescBackend(model=str(rnd_model))
    msgs = [r.message for r in caplog.records if "geometric context only" in r.message]
    assert len(msgs) == 1


def test_fixed_shapes_no_retrace(rnd_model):
    b = ContextDescBackend(model=str(rnd_model), max_keypoints=256, batch_size=256)
    assert b.runner._chunk_sizes(600) == [(256, 256), (256, 256), (88, 128)]
    assert b.runner._chunk_sizes(31) == [(31, 32)]
    sizes = ((200, 260, 2), (260, 180, 3), (120, 150, 4), (240, 320, 5), (90, 100, 6))
    for h, w, seed in sizes:
        b.extract(generated_image(h, w, seed=seed))
    traces = b.runner._local.experimental_get_tracing_count()
    assert traces <= 4  # one per bucket size (256, 128, 64, 32) at most, ever
    for h, w, seed in sizes:
        b.extract(generated_image(h, w, seed=seed + 10))
    assert b.runner._local.experimental_get_tracing_count() <= 4
    assert b.runner._augment.experimental_get_tracing_count() == 1


def test_max_image_size_reports_original_coordinates(rnd_model, image):
    f = ContextDescBackend(model=str(rnd_model), max_keypoints=200, max_image_size=160).extract(image)
    assert list(f["image_size"]) == [320, 240]
    assert f["keypoints"][:, 0].max() > 160  # scaled back to the full-size image


def _shipped_or_skip():
    try:
        return str(registry.resolve(registry.DEFAULT_MODEL).folder)
    except CdSfmError:
        pytest.skip("no trained model shipped yet")


@pytest.mark.skipif(bf16_support() is None, reason="CPU without AMX / AVX512-BF16")
@pytest.mark.parametrize("which", ["random", "shipped"])
def test_bf16_close_to_fp32(rnd_model, image, which):
    model = str(rnd_model) if which == "random" else _shipped_or_skip()
    f32 = ContextDescBackend(model=model, max_keypoints=300).extract_with_local(image)
    b16 = ContextDescBackend(model=model, max_keypoints=300, precision="bf16")
    assert b16.runner.precision == "bf16"
    f16 = b16.extract_with_local(image)
    for key in ("descriptors", "local_descriptors"):
        cos = np.sum(f32[key] * f16[key], axis=1)
        assert cos.min() >= 0.999, (key, cos.min())


def test_visual_context_with_regional_model(image):
    models = {"local": build_local_model(), "augment": build_augment_model(visual=True),
              "regional": build_regional_model()}
    b = ContextDescBackend(models=models, max_keypoints=150)
    assert b.runner.has_regional and not b.grayscale
    f = b.extract(image)
    assert np.allclose(np.linalg.norm(f["descriptors"], axis=1), 1, atol=1e-5)
    g = ContextDescBackend(models=models, max_keypoints=150, regional=False).extract(image)
    assert not np.allclose(f["descriptors"], g["descriptors"], atol=1e-3)


def test_missing_model_is_a_clear_error(home):
    with pytest.raises(CdSfmError, match="no weights found"):
        ContextDescBackend(model="no-such-model")
    folder = home / "models" / "broken"
    folder.mkdir(parents=True)
    (folder / "info.json").write_text("{}")
    with pytest.raises(CdSfmError, match="no local weights"):
        ContextDescBackend(model="broken")


def test_bad_option_is_a_clear_error(rnd_model):
    with pytest.raises(CdSfmError, match="unknown option"):
        ContextDescBackend({"model": str(rnd_model), "max_kpts": 5})


# ----------------------------------------------------------------------------------------------------------------------
# weights manager


@pytest.fixture(scope="module")
def official_graphs(tmp_path_factory):
    from cd_graphs import build_augment_graph, build_local_graph

    d = tmp_path_factory.mktemp("official")
    return {"local": build_local_graph(d / "contextdesc-e2e.pb", seed=11),
            "aug": build_augment_graph(d / "contextdesc-e2e-aug.pb", seed=12, uniform_weights=True)}


def test_import_list_check(home, official_graphs, capsys, image):
    args = argparse.Namespace(name="mine", local=str(official_graphs["local"]), aug=str(official_graphs["aug"]),
                              regional=None, trained_on="GL3D (test)", force=False, check=True)
    assert models_cli.cmd_import(args) == 0
    folder = home / "models" / "mine"
    assert (folder / "original" / "local.pb").is_file() and (folder / "original" / "aug.pb").is_file()
    info = json.loads((folder / "info.json").read_text())
    assert info["parity"]["local"] < 1e-5 and info["parity"]["augment"] < 1e-5
    assert info["augment_interp"] == "uniform" and info["augment_visual"] is True
    with pytest.raises(CdSfmError, match="exists"):
        models_cli.cmd_import(args)
    capsys.readouterr()
    assert models_cli.cmd_list(argparse.Namespace()) == 0
    out = capsys.readouterr().out
    assert "mine" in out and "GL3D (test)" in out and "contextdesc++" in out
    from cd_sfm.models.registry import DEFAULT_MODEL

    rows = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()}
    assert "(default)" in rows[DEFAULT_MODEL] and "(default)" not in rows["mine"]
    for student, arch in (("cd-sfm-v2-compact", "compact"), ("cd-sfm-v2-mini", "mini")):  # the students say their layout
        if student in rows:
            assert f"local ({arch})" in rows[student] and "local (" not in rows["cd-sfm-v1"]
    # the wired CLI: `cd-sfm models check NAME`
    from cd_sfm.cli import main

    assert main(["models", "check", "mine", "--num-patches", "64"]) == 0
    out = capsys.readouterr().out
    assert "local: largest absolute difference" in out and "augment: largest absolute difference" in out
    # the imported model extracts (visual weights, no regional model: geometric context only)
    f = ContextDescBackend(model="mine", max_keypoints=100).extract(image)
    assert f["descriptors"].shape[1] == 128


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    files: dict = {}
    ranges: list = []

    def do_GET(self):  # noqa: N802
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        rng = self.headers.get("Range")
        self.ranges.append(rng)
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    _RangeHandler.files, _RangeHandler.ranges = {}, []
    yield f"http://127.0.0.1:{srv.server_address[1]}", _RangeHandler
    srv.shutdown()
    srv.server_close()


def test_download_resumes(server, tmp_path):
    url, handler = server
    data = np.random.default_rng(0).bytes(300_000)
    handler.files["/f.bin"] = data
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(data[:123_456])
    manage.download_file(url + "/f.bin", dest, progress=False)
    assert dest.read_bytes() == data and handler.ranges == ["bytes=123456-"]
    assert not (tmp_path / "f.bin.part").exists()


def test_download_offline_says_where_to_put_the_file(tmp_path):
    with pytest.raises(CdSfmError, match=r"put it at .*x\.tar") as e:
        manage.download_file("http://127.0.0.1:9/x.tar", tmp_path / "x.tar", progress=False, timeout=5)
    assert "\n" not in str(e.value)


def test_download_official_release(server, home, official_graphs, monkeypatch):
    url, handler = server
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(official_graphs["local"], arcname="contextdesc++/loc.pb")
        tar.add(official_graphs["aug"], arcname="contextdesc++/aug.pb")
    handler.files["/contextdesc_pp.tar"] = buf.getvalue()
    off = replace(registry.OFFICIAL["contextdesc++"], url=url + "/contextdesc_pp.tar")
    monkeypatch.setitem(registry.OFFICIAL, "contextdesc++", off)
    entry = manage.download("contextdesc-pp", with_regional=False, progress=False)
    assert entry.name == "contextdesc++" and entry.source == "official"
    assert entry.components == ["local", "augment"] and entry.info["parity"]["local"] < 1e-5
    assert registry.resolve("contextdesc_pp").folder == entry.folder


def test_model_without_augmentation_weights_gives_raw_local(tmp_path, image, caplog):
    save_weights_npz(build_local_model(), tmp_path / "local.npz")
    cd_mod._SAID.clear()
    with caplog.at_level(logging.WARNING, logger="cd_sfm"):
        b = ContextDescBackend(model=str(tmp_path), max_keypoints=100)
    assert "no augmentation weights" in caplog.text and not b.runner.has_augment
    f = b.extract_with_local(image)
    assert np.allclose(f["descriptors"], f["local_descriptors"])
