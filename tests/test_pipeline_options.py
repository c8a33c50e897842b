"""Options wired through the CLI and the pipeline: the ContextDesc model (``--model``, ``--no-augment``), pair source
unions and the retrieval descriptor (``--pairs retrieval+sequential``, ``--retrieval``), ``--ray`` (and no Ray without
it), ``--mapper hierarchical``, and the presets as package data."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from cd_sfm import cli, pipeline
from cd_sfm import config as config_mod
from cd_sfm.io import CdSfmError, parse_pairs
from cd_sfm.models import registry
from cd_sfm.synthetic import render_scene

REPO = Path(__file__).resolve().parents[1]
SHIPPED = registry.PACKAGE_WEIGHTS / registry.DEFAULT_MODEL


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return render_scene(tmp_path_factory.mktemp("opt_scene"), num_images=6, num_points=200, width=480, height=360,
                        patch_radius=12)


@pytest.fixture(scope="module")
def sift_out(scene, tmp_path_factory):
    """An output folder holding the SIFT features of the scene (copied by the tests that add files)."""
    out = tmp_path_factory.mktemp("opt_sift")
    conf = config_mod.resolve({"features_options": {"max_keypoints": 1024}, "max_image_size": 480})
    pipeline.run_extract(scene.image_dir, out, conf, progress=False)
    return out


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    """A model cache without downloads: only the shipped model is available."""
    monkeypatch.setenv(registry.ENV_HOME, str(tmp_path / "home"))
    return tmp_path / "home"


def parse(*argv: str) -> dict:
    args = cli.build_parser().parse_args(list(argv))
    return cli.build_config(args)


# ---------------------------------------------------------------------------------------------------------------------
# --model / --no-augment


def test_model_flags_reach_the_backend_conf(tmp_path, empty_home):
    conf = pipeline.prepare_conf(parse("reconstruct", "i", "o", "--features", "contextdesc", "--model",
                                       registry.DEFAULT_MODEL, "--no-augment"))
    assert conf["model"] == registry.DEFAULT_MODEL and conf["augment"] is False
    opts = conf.features.extraction_conf()["options"]
    assert opts["model"] == registry.DEFAULT_MODEL and opts["augment"] is False
    # default: the shipped model, recorded by name
    conf = pipeline.prepare_conf(parse("extract", "i", "o", "--features", "contextdesc"))
    assert conf["model"] == registry.DEFAULT_MODEL and conf.features.extraction_conf()["options"]["model"] == conf["model"]
    assert "augment" not in conf.features.extraction_conf()["options"]  # the backend's default (augment when it can)
    # a weights folder by path (recorded absolute), and the config key in a preset file
    mine = tmp_path / "my-model"
    shutil.copytree(SHIPPED, mine)
    preset = tmp_path / "mine.yaml"
    preset.write_text(f"features: contextdesc\nmodel: {mine}\n")
    conf = pipeline.prepare_conf(parse("reconstruct", "i", "o", "--config", str(preset)))
    assert conf["model"] == str(mine.resolve())
    # the model named in features_options (as cd_sfm.evaluation does) is kept; an explicit model key wins
    conf = pipeline.prepare_conf({"features": "contextdesc", "features_options": {"model": str(mine)}})
    assert conf.features.extraction_conf()["options"]["model"] == str(mine.resolve())
    conf = pipeline.prepare_conf({"features": "contextdesc", "features_options": {"model": str(mine)},
                                  "model": registry.DEFAULT_MODEL})
    assert conf.features.extraction_conf()["options"]["model"] == registry.DEFAULT_MODEL
    # SIFT ignores a model from a config, but a --model flag with SIFT features is an error
    assert pipeline.prepare_conf({"features": "sift", "model": "whatever"}).features.extraction_conf()["backend"] == "sift"
    with pytest.raises(CdSfmError, match="--model: only for ContextDesc features.*--features contextdesc"):
        parse("reconstruct", "i", "o", "--features", "sift", "--model", registry.DEFAULT_MODEL)


def test_unknown_model_is_one_line_listing_the_models(scene, tmp_path, empty_home, capsys):
    assert cli.main(["extract", str(scene.image_dir), str(tmp_path / "o"), "--features", "contextdesc", "--model",
                     "no-such-model", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no-such-model" in err and "available: " in err and registry.DEFAULT_MODEL in err.split("available: ")[1]
    assert not (tmp_path / "o" / "features.h5").exists()


def test_models_list_shows_the_shipped_model_and_its_training_data(empty_home, capsys):
    assert cli.main(["models", "list"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(registry.DEFAULT_MODEL + " ")]
    info = json.loads((SHIPPED / "info.json").read_text())
    assert len(rows) == 1 and "shipped" in rows[0] and info["trained_on"] in rows[0]


def test_other_model_makes_features_stale(tmp_path, empty_home):
    out = tmp_path / "out"
    out.mkdir()
    (out / "features.h5").write_bytes(b"")
    mine = tmp_path / "my-model"
    shutil.copytree(SHIPPED, mine)
    base = {"features": "contextdesc"}
    config_mod.save_config(pipeline.prepare_conf(base), out / "config.yaml")
    pipeline.check_not_stale(out, pipeline.prepare_conf(base), overwrite=False)
    with pytest.raises(CdSfmError, match="features.h5: made with other settings.*model"):
        pipeline.check_not_stale(out, pipeline.prepare_conf({**base, "model": str(mine)}), overwrite=False)
    with pytest.raises(CdSfmError, match="augment"):
        pipeline.check_not_stale(out, pipeline.prepare_conf({**base, "augment": False}), overwrite=False)
    # a config saved before the model key existed means the shipped model; SIFT runs ignore the key
    config_mod.save_config(config_mod.resolve(base), out / "config.yaml")
    pipeline.check_not_stale(out, pipeline.prepare_conf(base), overwrite=False)
    config_mod.save_config(config_mod.resolve({"features": "sift"}), out / "config.yaml")
    pipeline.check_not_stale(out, pipeline.prepare_conf({"features": "sift", "model": str(mine), "augment": False}),
                             overwrite=False)


def test_contextdesc_extract_with_model_folder_and_no_augment(tmp_path, empty_home, capsys):
    """The CLI runs the chosen weights (TensorFlow: about 10 s)."""
    scene = render_scene(tmp_path / "scene", num_images=2, num_points=100, width=320, height=240)
    out = tmp_path / "out"
    assert cli.main(["extract", str(scene.image_dir), str(out), "--features", "contextdesc", "--model", str(SHIPPED),
                     "--no-augment", "--max-keypoints", "256", "-q"]) == 0
    assert "Features of 2 / 2 images" in capsys.readouterr().out
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"] == str(SHIPPED.resolve()) and saved["augment"] is False
    with h5py.File(out / "features.h5") as f:
        d = f[scene.names[0]]["descriptors"][()].astype(np.float32)
    assert d.shape[0] == 128 and 50 < d.shape[1] <= 256
    np.testing.assert_allclose(np.linalg.norm(d, axis=0), 1, atol=2e-3)


# ---------------------------------------------------------------------------------------------------------------------
# pairs: unions, retrieval


def test_pair_sources():
    assert pipeline.pair_sources("retrieval") == ["retrieval"]
    assert pipeline.pair_sources("retrieval+sequential") == ["retrieval", "sequential"]
    assert pipeline.pair_sources(" sequential + my pairs.txt ") == ["sequential", "my pairs.txt"]
    assert pipeline.pair_sources("a+") == ["a+"]  # not a union: reported as a missing pair file
    with pytest.raises(CdSfmError, match="nope.txt: pair file not found"):
        pipeline.prepare_conf({"pairs": "sequential+nope.txt"})


def copy_out(src: Path, dst: Path) -> Path:
    dst.mkdir()
    shutil.copy(src / "features.h5", dst / "features.h5")
    return dst


def test_retrieval_union_with_sequential_and_a_file(scene, sift_out, tmp_path, empty_home):
    names = scene.names
    out = copy_out(sift_out, tmp_path / "a")
    conf = config_mod.resolve({"pairs": "retrieval+sequential", "num_neighbors": 1, "overlap": 1,
                               "retrieval": "auto"})
    pairs = pipeline.run_pairs(names, out, conf, image_dir=scene.image_dir)
    assert parse_pairs(out / "pairs.txt") == pairs
    seq = [(names[i], names[i + 1]) for i in range(len(names) - 1)]
    from cd_sfm.pairs.retrieval import retrieval_pairs

    ret = retrieval_pairs({"num_neighbors": 1}, names, out / pipeline.GLOBAL_FEATURES)
    keys = {tuple(sorted(p)) for p in pairs}
    assert len(keys) == len(pairs) == len({tuple(sorted(p)) for p in ret + seq})  # union, no repeats
    assert keys == {tuple(sorted(p)) for p in ret + seq} and pairs[: len(ret)] == ret
    with h5py.File(out / pipeline.GLOBAL_FEATURES) as f:  # auto without regional weights: VLAD (64 x 128)
        assert f[names[0]]["global_descriptor"].shape == (64 * 128,)

    mine = tmp_path / "mine.txt"
    mine.write_text(f"{names[0]} {names[5]}\n{names[1]} {names[0]}\n")
    conf = config_mod.resolve({"pairs": f"{mine}+sequential", "overlap": 1})
    pairs = pipeline.run_pairs(names, out, conf)
    assert pairs == [(names[0], names[5]), (names[1], names[0])] + seq[1:]


def test_retrieval_kind(tmp_path, empty_home):
    from cd_sfm import globaldesc

    assert pipeline.retrieval_conf(config_mod.resolve({"retrieval": "local"}))["method"] == "vlad"
    assert pipeline.retrieval_conf(config_mod.resolve({"retrieval": "auto"}))["method"] == "vlad"
    with pytest.raises(CdSfmError, match="--retrieval regional: no regional ResNet50 weights.*--retrieval local"):
        pipeline.prepare_conf({"pairs": "retrieval", "retrieval": "regional"})
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["pairs", "i", "o", "--retrieval", "vlad"])
    # regional weights present (the official retrieval model in the cache): auto picks GeM on them
    folder = empty_home / "models" / "retrieval"
    folder.mkdir(parents=True)
    (folder / "info.json").write_text("{}")
    (folder / "regional.npz").write_bytes(b"")
    for kind in ("auto", "regional"):
        gconf = pipeline.retrieval_conf(config_mod.resolve({"retrieval": kind}))
        assert gconf["method"] == "gem" and gconf["regional_model"] == "retrieval"
        assert globaldesc.GlobalConf.from_any(gconf).regional_model == "retrieval"


def test_regional_retrieval_runs_on_the_images(scene, sift_out, tmp_path, monkeypatch):
    """The regional path end to end, the network replaced by a map computed from the image itself."""
    from cd_sfm import globaldesc
    from cd_sfm.images import read_image

    seen = []

    def fake_map(conf, image_dir, name):
        seen.append((conf.method, conf.regional_model, name))
        img, _ = read_image(image_dir / name, grayscale=True)
        return np.abs(np.fft.fft2(img.astype(np.float32)))[:8, :8, None].repeat(4, -1) * np.arange(1, 5)

    monkeypatch.setattr(pipeline, "regional_model_name", lambda conf: "fake")
    monkeypatch.setattr(globaldesc, "_regional_map", fake_map)
    out = copy_out(sift_out, tmp_path / "r")
    conf = config_mod.resolve({"pairs": "retrieval", "retrieval": "regional", "num_neighbors": 2})
    pairs = pipeline.run_pairs(scene.names, out, conf, image_dir=scene.image_dir)
    assert {m for m, _, _ in seen} == {"gem"} and {r for _, r, _ in seen} == {"fake"}
    assert sorted(n for _, _, n in seen) == sorted(scene.names)
    assert len(scene.names) <= len(pairs) <= 2 * len(scene.names)


# ---------------------------------------------------------------------------------------------------------------------
# --ray, --mapper hierarchical


def test_flags_reach_the_config():
    conf = parse("reconstruct", "i", "o", "--pairs", "retrieval+sequential", "--retrieval", "local",
                 "--num-neighbors", "3", "--mapper", "hierarchical", "--ray", "auto", "--ray-workers", "2")
    assert (conf["pairs"], conf["retrieval"], conf["num_neighbors"], conf["mapper"], conf["ray"]) == (
        "retrieval+sequential", "local", 3, "hierarchical", "auto")
    assert conf["ray_options"] == {"num_workers": 2}
    assert parse("match", "o", "--ray", "10.0.0.1:6379")["ray"] == "10.0.0.1:6379"
    assert parse("reconstruct", "i", "o")["ray"] is None
    with pytest.raises(CdSfmError, match="mapper 'x'"):
        pipeline.prepare_conf({"mapper": "x"})


def test_ray_session_shuts_down_only_what_it_started(monkeypatch):
    from cd_sfm import distributed

    class FakeRay:
        initialized = False

        def is_initialized(self):
            return self.initialized

    fake, stopped = FakeRay(), []
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(distributed, "shutdown", lambda: stopped.append(1))
    with pipeline.ray_session({"ray": None}) as rconf:
        assert rconf is None
    with pipeline.ray_session({"ray": "auto", "ray_options": {"num_workers": 3}}) as rconf:
        assert (rconf.conf.address, rconf.conf.num_workers) == ("auto", 3)
        fake.initialized = True  # a stage started the cluster
        with pipeline.ray_session({"ray": "auto"}):
            pass
        assert stopped == []  # the inner (stage) session does not own it
    assert stopped == [1]
    with pipeline.ray_session({"ray": "auto"}):  # already running when the session began: left alone
        pass
    assert stopped == [1]


def test_sift_hierarchical_reconstruct_imports_no_ray(tmp_path):
    """Without --ray nothing imports Ray; a SIFT run with the hierarchical mapper registers every image."""
    code = textwrap.dedent(f"""
        import json, sys
        import cd_sfm.pipeline, cd_sfm.cli
        from cd_sfm.synthetic import render_scene
        cd_sfm.cli.build_parser()
        scene = render_scene({str(tmp_path / 'scene')!r}, num_images=5, num_points=200, width=480, height=360,
                             patch_radius=12)
        s = cd_sfm.pipeline.reconstruct(scene.image_dir, {str(tmp_path / 'out')!r},
                                        {{"features": "sift", "camera_mode": "single", "mapper": "hierarchical"}}, progress=False)
        print(json.dumps({{"ray": "ray" in sys.modules, "registered": s["num_images_registered"],
                          "mapper": s["mapper"]}}))
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == {"ray": False, "registered": 5, "mapper": "hierarchical"}


# ---------------------------------------------------------------------------------------------------------------------
# presets are package data


def test_presets_live_in_the_package():
    import tomllib

    assert config_mod.config_dirs() == [Path(config_mod.__file__).resolve().parent / "configs"]
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["cd_sfm"]
    pkg = REPO / "cd_sfm"
    shipped = {p.relative_to(pkg).as_posix() for pat in patterns for p in pkg.glob(pat) if p.is_file()}
    for name in config_mod.available_presets():
        assert f"configs/{name}.yaml" in shipped, name
    # the top-level configs/ of the source tree points at the same files, the scene split too (package data, not a
    # preset: `cd-sfm train` works from an installed package)
    for name in ("default", "fast", "accurate", "large"):
        assert (REPO / "configs" / f"{name}.yaml").resolve() == (pkg / "configs" / f"{name}.yaml").resolve()
    assert (REPO / "configs" / "split.yaml").resolve() == (pkg / "split.yaml").resolve()
    assert "split.yaml" in shipped and "split" not in config_mod.available_presets()


@pytest.mark.slow  # builds a wheel (~10-20 s)
def test_wheel_holds_the_presets(tmp_path):
    import zipfile

    src = tmp_path / "src"  # a copy, so that the build leaves nothing in the repository
    shutil.copytree(REPO / "cd_sfm", src / "cd_sfm", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, cwd=tmp_path, timeout=600)
    wheel = next(tmp_path.glob("cd_sfm-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("default", "fast", "accurate", "large"):
        assert f"cd_sfm/configs/{name}.yaml" in names
    for name in ("split.yaml", *(f"weights/{m}/{f}" for m in ("cd-sfm-v1", "cd-sfm-v2", "cd-sfm-v2-compact", registry.DEFAULT_MODEL)
                                 for f in ("info.json", "local.npz", "augment.npz", "local_int8.tflite",
                                           "local_int8.json"))):
        assert f"cd_sfm/{name}" in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, timeout=600)
    code = "import cd_sfm, cd_sfm.config as c; print(cd_sfm.__file__); print(c.load_config('fast')['_preset'])"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True,
                       env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    where, preset = p.stdout.split()
    assert where.startswith(str(target)) and preset == str(target / "cd_sfm" / "configs" / "fast.yaml")
