"""The command line: one-line errors with exit status 2, stage subcommands joined by files, the demo, and a run
killed during extraction that the next run finishes, reusing what was done."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cd_sfm import cli
from cd_sfm.io import list_h5_names, read_features
from cd_sfm.synthetic import render_scene

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cd_sfm.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return render_scene(tmp_path_factory.mktemp("cli_scene"), num_images=6, num_points=200, width=640, height=480,
                        patch_radius=12)


def test_help_and_hooks():
    p = run_cli("--help")
    assert p.returncode == 0
    for cmd in ("reconstruct", "extract", "pairs", "match", "sfm", "demo"):
        assert cmd in p.stdout
    p = run_cli("reconstruct", "--help")
    for flag in ("--features", "--pairs", "--camera-mode", "--camera-model", "--mapper", "--max-image-size",
                 "--config", "--verbose", "--quiet", "--model", "--no-augment", "--retrieval", "--num-neighbors",
                 "--ray", "hierarchical"):
        assert flag in p.stdout
    assert [c for c, _ in cli.EXTRA_COMMANDS] == ["models", "train", "eval", "match-pair", "export", "report"]


def test_errors_are_one_line_with_status_2(tmp_path, scene):
    p = run_cli("reconstruct", tmp_path / "nope", tmp_path / "out")
    assert p.returncode == 2
    assert p.stderr.strip() == f"cd-sfm: error: {tmp_path / 'nope'}: image folder not found"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    p = run_cli("reconstruct", scene.image_dir, blocker / "out")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and str(blocker / "out") in p.stderr
    single = tmp_path / "single"
    single.mkdir()
    (single / "a.png").write_bytes((scene.image_dir / scene.names[0]).read_bytes())
    p = run_cli("reconstruct", single, tmp_path / "out1", "-q")
    assert p.returncode == 2 and "1 usable image(s) of 1, need at least 2" in p.stderr
    p = run_cli("reconstruct", scene.image_dir, tmp_path / "out2", "--config", "nope")
    assert p.returncode == 2 and "unknown config preset" in p.stderr
    assert cli.main(["reconstruct", str(scene.image_dir), str(tmp_path / "o3"), "--pairs", str(tmp_path / "x.txt"),
                     "-q"]) == 2


def test_stage_subcommands(scene, tmp_path, capsys):
    out = tmp_path / "out"
    img = str(scene.image_dir)
    assert cli.main(["extract", img, str(out), "--features", "sift", "--max-keypoints", "2048", "-q"]) == 0
    assert "Features of 6 / 6 images" in capsys.readouterr().out
    assert len(list_h5_names(out / "features.h5")) == 6
    assert cli.main(["pairs", img, str(out), "--pairs", "sequential", "--overlap", "2", "-q"]) == 0
    assert "9 pairs of 6 images" in capsys.readouterr().out
    assert cli.main(["match", str(out), "-q"]) == 0
    assert "9 pairs matched" in capsys.readouterr().out
    assert cli.main(["sfm", img, str(out), "--camera-mode", "single", "-q"]) == 0
    text = capsys.readouterr().out
    assert "Registered 6 / 6 images" in text, text
    s = json.loads((out / "summary.json").read_text())
    assert s["num_images_registered"] == 6 and s["num_pairs"] == 9 and "features_reused" not in s
    conf = yaml.safe_load((out / "config.yaml").read_text())  # each stage kept the earlier stages' settings
    assert conf["features_options"] == {"max_keypoints": 2048} and conf["pairs"] == "sequential"
    assert conf["overlap"] == 2 and conf["camera_mode"] == "single"
    # a pair file of the user's
    pairs = tmp_path / "my_pairs.txt"
    pairs.write_text(f"{scene.names[0]} {scene.names[1]}\n{scene.names[0]} missing.png\n")
    assert cli.main(["pairs", img, str(out), "--pairs", str(pairs), "-q"]) == 0
    assert "1 pairs of 6 images" in capsys.readouterr().out


def test_demo(tmp_path, capsys):
    assert cli.main(["demo", str(tmp_path / "demo"), "--num-images", "5", "-q"]) == 0
    text = capsys.readouterr().out
    assert "Registered 5 / 5 images" in text and "Against ground truth (5 cameras)" in text
    s = json.loads((tmp_path / "demo" / "summary.json").read_text())
    # default features (ContextDesc): the rendered scene is far from the photos it was trained on, so looser than SIFT
    assert s["ground_truth"]["aligned"] and s["ground_truth"]["max_rotation_error_deg"] < 1.0


def test_interrupted_extraction_then_resume(scene, tmp_path, monkeypatch):
    """Fast form of the kill test below: a run interrupted after 3 of 6 images keeps them in part files (beside the
    half-written part a SIGKILL can leave); the next run reuses them and finishes."""
    from cd_sfm.features import sift

    out = tmp_path / "out"
    args = ["reconstruct", str(scene.image_dir), str(out), "--pairs", "sequential", "--overlap", "2",
            "--camera-mode", "single", "--features", "sift", "--max-keypoints", "2048", "-q"]
    real, calls = sift.SiftBackend.extract, []

    def interrupted(self, image):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real(self, image)

    monkeypatch.setattr(sift.SiftBackend, "extract", interrupted)
    assert cli.main(args) == 130
    monkeypatch.undo()
    parts = out / "features.h5.parts"
    kept = sum(len(list_h5_names(p)) for p in parts.glob("part-*.h5"))  # parts are flushed every 2 s or 16 images
    assert kept == 3 and not (out / "summary.json").exists()
    (parts / ".part-123.tmp").write_bytes(b"half written")  # what a kill during a part write leaves

    assert cli.main(args) == 0
    s = json.loads((out / "summary.json").read_text())
    assert (s["features_reused"], s["features_extracted"], s["num_images_registered"]) == (3, 3, 6)
    assert not parts.exists()
    from cd_sfm.features import extract

    conf = {**extract.confs["sift"], "options": {**extract.confs["sift"]["options"], "max_keypoints": 2048}}
    first_last = [scene.names[0], scene.names[-1]]  # one reused, one extracted by the resumed run
    extract.main(conf, scene.image_dir, tmp_path / "clean.h5", image_list=first_last, progress=False)
    for n in first_last:
        a, b = read_features(out / "features.h5", n), read_features(tmp_path / "clean.h5", n)
        assert (a["keypoints"] == b["keypoints"]).all() and (a["descriptors"] == b["descriptors"]).all()


@pytest.mark.slow  # 15-30 s: a real SIGKILL of a CLI process (the fast form above runs by default)
def test_kill_during_extraction_then_resume(tmp_path):
    scene = render_scene(tmp_path / "scene", num_images=24, num_points=200, width=640, height=480, patch_radius=12)
    out = tmp_path / "out"
    args = ["reconstruct", scene.image_dir, out, "--pairs", "sequential", "--overlap", "4", "--camera-mode", "single",
            "--features", "sift", "-q"]
    proc = subprocess.Popen([sys.executable, "-m", "cd_sfm.cli", *map(str, args)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    parts = out / "features.h5.parts"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if parts.is_dir() and any(parts.glob("part-*.h5")):
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()!r}"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists()
    done = sum(len(list_h5_names(p)) for p in parts.glob("part-*.h5"))
    assert 0 < done < 24

    p = run_cli(*args)
    assert p.returncode == 0, p.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["features_reused"] >= done and s["features_extracted"] == 24 - s["features_reused"]
    assert f"Reused {s['features_reused']} image features" in p.stdout
    assert s["num_images_registered"] == 24
    assert not parts.exists() and not list(out.glob(".*tmp*"))
    # the same features as an uninterrupted extraction
    from cd_sfm.features import extract

    clean = tmp_path / "clean.h5"
    extract.main(extract.confs["sift"], scene.image_dir, clean, image_list=[scene.names[0], scene.names[-1]],
                 progress=False)
    for n in (scene.names[0], scene.names[-1]):
        a, b = read_features(out / "features.h5", n), read_features(clean, n)
        assert (a["keypoints"] == b["keypoints"]).all() and (a["descriptors"] == b["descriptors"]).all()


def test_precision_flag_reaches_the_feature_options(tmp_path):
    args = cli.build_parser().parse_args(["reconstruct", str(tmp_path), str(tmp_path / "out"), "--precision", "fp32",
                                          "--max-keypoints", "2000"])
    conf = cli.build_config(args)
    assert conf["features_options"]["precision"] == "fp32" and conf["features_options"]["max_keypoints"] == 2000
    args = cli.build_parser().parse_args(["reconstruct", str(tmp_path), str(tmp_path / "out"), "--features", "sift",
                                          "--precision", "int8"])
    with pytest.raises(cli.CdSfmError, match="--precision: only for ContextDesc"):
        cli._check_flags(args, cli.build_config(args))
