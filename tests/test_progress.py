"""Progress output: a bar on a terminal, plain log lines (no carriage-return frames) when stderr goes to a file; the
mapping bar advances per registered image; ``summary.json`` records the Ray setting and the ContextDesc precision."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from tqdm import tqdm as plain_tqdm

from cd_sfm import progress
from cd_sfm.colmap import mapping
from cd_sfm.config import RaySettings
from cd_sfm.pipeline import reconstruct

REPO = Path(__file__).resolve().parents[1]


class FakeTTY:
    def isatty(self):
        return True

    def write(self, s):
        return len(s)

    def flush(self):
        pass


def test_bar_kind_follows_the_stream(caplog):
    with progress.tqdm(total=3, file=FakeTTY()) as on_tty, progress.tqdm(total=3, disable=True) as quiet:
        assert isinstance(on_tty, plain_tqdm) and not isinstance(on_tty, progress.LogBar)
        assert not isinstance(quiet, progress.LogBar)
    with caplog.at_level(logging.INFO, logger="cd_sfm.progress"):
        bar = progress.tqdm(range(50), desc="extract", unit="img", mininterval=3600)  # stderr is captured: no tty
        assert isinstance(bar, progress.LogBar)
        assert sum(1 for _ in bar) == 50
    lines = [r.getMessage() for r in caplog.records if r.name == "cd_sfm.progress"]
    assert lines == [lines[-1]] and lines[0].startswith("extract: 50/50 img (100 %)")  # once an hour, plus the end


def test_log_bar_logs_at_most_every_interval(caplog):
    clock = [0.0]
    with caplog.at_level(logging.INFO, logger="cd_sfm.progress"):
        with progress.LogBar(total=100, desc="match", unit="pair", mininterval=30) as bar:
            bar._time = lambda: clock[0]  # tqdm's clock
            bar.start_t = bar.last_print_t = 0.0
            for _ in range(100):
                clock[0] += 1.0  # one pair per second: a line every 30 s
                bar.update(1)
    lines = [r.getMessage() for r in caplog.records if r.name == "cd_sfm.progress"]
    assert [ln.split(" ")[1] for ln in lines] == ["30/100", "60/100", "90/100", "100/100"]
    assert all("\r" not in ln for ln in lines)


def test_mapping_bar_counts_registered_images(sift_run, tmp_path, caplog):
    scene, out, _ = sift_run
    with caplog.at_level(logging.INFO, logger="cd_sfm.progress"):
        rec, stats = mapping.main({"mapper": "incremental"}, out / "database.db", scene.image_dir, tmp_path,
                                  progress=True)
    assert stats["num_registered"] == 6
    lines = [r.getMessage() for r in caplog.records if r.name == "cd_sfm.progress"]
    assert lines and lines[-1].startswith("mapping: 6/6 img (100 %)")


def test_mapping_bar_restarts_for_a_new_model(caplog):
    """COLMAP starts a new model (a discarded one, or the images a finished one left out) with a new initial pair:
    the bar counts that model's images and never goes past the number of images."""
    bar, on_pair, on_next = mapping._registration_bar(5, True)
    with caplog.at_level(logging.INFO, logger="cd_sfm.progress"), bar:
        on_pair(), on_next(), on_next()  # a model of 4, discarded
        on_pair()
        for _ in range(6):  # one callback more than there are images
            on_next()
        assert (bar.n, bar.total) == (5, 5)
    lines = [r.getMessage() for r in caplog.records if r.name == "cd_sfm.progress"]
    assert lines[-1].startswith("mapping, model 2: 5/5 img (100 %)")
    assert not any(" 0/5 " in ln for ln in lines)


def test_cli_log_to_a_file_has_no_progress_frames(sift_run, tmp_path):
    """``cd-sfm reconstruct ... 2> log``: every progress update is its own log line."""
    scene, _, _ = sift_run
    log = tmp_path / "run.log"
    with open(log, "w") as f:
        p = subprocess.run([sys.executable, "-m", "cd_sfm.cli", "reconstruct", str(scene.image_dir),
                            str(tmp_path / "out"), "--features", "sift", "--camera-mode", "single"],
                           stdout=subprocess.PIPE, stderr=f, text=True, cwd=REPO, timeout=600)
    assert p.returncode == 0, log.read_text()[-2000:]
    text = log.read_text()
    assert "\r" not in text
    lines = text.splitlines()
    for stage, n, unit in (("extract", 6, "img"), ("match", 15, "pair"), ("mapping", 6, "img")):
        assert any(f"{stage}: {n}/{n} {unit} (100 %)" in ln for ln in lines), stage
    assert "Report: " in text and (tmp_path / "out" / "report.html").exists()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["ray"] is None and summary["precision"] is None  # SIFT, in process


def test_ray_setting():
    assert RaySettings(None).summary() is None
    assert RaySettings("local", {"num_workers": 2}).summary() == {"address": "local", "num_workers": 2}


def test_extract_stage_records_the_contextdesc_precision(sift_run, tmp_path):
    from cd_sfm.features import extract

    scene, _, _ = sift_run
    conf = {**extract.resolve_conf("contextdesc"), "max_image_size": 320,
            "options": {"max_keypoints": 128, "precision": "fp32"}}
    st = extract.main(conf, scene.image_dir, tmp_path / "features.h5", image_list=scene.names[:2], progress=False)
    assert st["extracted"] == 2 and st["precision"] == {"local": "fp32", "augment": "fp32"}
    again = extract.main(conf, scene.image_dir, tmp_path / "features.h5", image_list=scene.names[:2], progress=False)
    assert again["reused"] == 2 and again["precision"] is None  # nothing ran


@pytest.mark.slow
def test_summary_records_the_contextdesc_precision(sift_run, tmp_path):
    """The precision the networks ran in, also after a resumed run that extracted nothing."""
    scene, _, _ = sift_run
    out = tmp_path / "out"
    conf = {"features": "contextdesc", "camera_mode": "single",
            "features_options": {"max_keypoints": 1024, "precision": "fp32"}}
    summary = reconstruct(scene.image_dir, out, conf, progress=False, report=False)
    assert summary["precision"] == {"local": "fp32", "augment": "fp32"}
    again = reconstruct(scene.image_dir, out, conf, progress=False, report=False)
    assert again["features_extracted"] == 0 and again["precision"] == summary["precision"]
    assert json.loads((out / "summary.json").read_text())["precision"] == summary["precision"]


@pytest.mark.slow
def test_backend_reports_auto_precision():
    """``precision: auto`` settles on int8, bf16 or fp32 for the local network; the others run in bf16 or fp32."""
    from cd_sfm.features.extract import make_backend, resolve_conf

    pytest.importorskip("tensorflow")
    backend = make_backend({**resolve_conf("contextdesc"), "options": {"precision": "auto", "max_keypoints": 256}})
    used = backend.precision_used
    assert used["local"] in ("int8", "bf16", "fp32") and set(used) >= {"local", "augment"}
    assert all(v in ("bf16", "fp32") for k, v in used.items() if k != "local")
