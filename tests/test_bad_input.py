"""Bad input, concurrent runs, odd names and killed runs (issue 11): each case asserts the exit status, the one line
the user reads, and that the output folder stays consistent. Hostile model files are in test_hostile_models.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from cd_sfm.io import list_h5_names, read_features
from cd_sfm.synthetic import render_scene

REPO = Path(__file__).resolve().parents[1]
SIFT = ["--features", "sift", "--max-keypoints", "1024", "--camera-mode", "single", "--pairs", "sequential",
        "--overlap", "2"]


def run_cli(*args, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cd_sfm.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})


def error_line(p: subprocess.CompletedProcess) -> str:
    """The one line a failed run prints (nothing else on stderr at -qq: no traceback, no native dump)."""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cd-sfm: error: "), p.stderr
    return lines[0]


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return render_scene(tmp_path_factory.mktemp("bad_scene"), num_images=6, num_points=200, width=640, height=480,
                        patch_radius=12)


@pytest.fixture(scope="module")
def done_run(scene, tmp_path_factory):
    """A finished SIFT reconstruction of the scene (its files are copied by the tests that tamper with them)."""
    out = tmp_path_factory.mktemp("done") / "out"
    p = run_cli("reconstruct", scene.image_dir, out, *SIFT, "-q")
    assert p.returncode == 0, p.stderr
    return out


def _copy_run(done_run: Path, dst: Path) -> Path:
    shutil.copytree(done_run, dst)
    (dst / ".cd-sfm.lock").unlink(missing_ok=True)
    return dst


# ---------------------------------------------------------------------------------------------------------------------
# concurrency


def test_second_run_into_a_locked_folder_is_refused(scene, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from cd_sfm.io import output_lock
        with output_lock({str(out)!r}):
            print("locked", flush=True)
            time.sleep(120)
        """)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for cmd in (["reconstruct", scene.image_dir, out, *SIFT], ["extract", scene.image_dir, out, *SIFT[:4]],
                    ["match", out], ["sfm", scene.image_dir, out]):
            p = run_cli(*cmd, "-qq")
            assert p.returncode == 2
            line = error_line(p)
            assert f"{out}: in use by another cd-sfm run (pid {holder.pid})" in line
        assert sorted(x.name for x in out.iterdir()) == [".cd-sfm.lock"]  # nothing written by the refused runs
        # a killed holder leaves no lock behind (the kernel drops a flock with its process)
        holder.kill()
        holder.wait()
        p = run_cli("reconstruct", scene.image_dir, out, *SIFT, "-q")
        assert p.returncode == 0, p.stderr
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


# ---------------------------------------------------------------------------------------------------------------------
# matches and features that do not fit


def test_out_of_range_match_index_is_one_line_not_a_crash(done_run, tmp_path):
    out = _copy_run(done_run, tmp_path / "out")
    with h5py.File(out / "matches.h5", "a") as f:
        key = sorted(list_h5_names(out / "matches.h5"))[0]
        m = f[key]["matches0"][()]
        m[np.flatnonzero(m >= 0)[0]] = 10**6
        f[key]["matches0"][...] = m
    p = run_cli("sfm", _image_dir(done_run), out, "-qq")
    assert p.returncode == 2
    line = error_line(p)
    assert f"pair {key}" in line and "out of range" in line and str(out / "matches.h5") in line


def test_matches_of_other_features_are_refused(done_run, tmp_path):
    out = _copy_run(done_run, tmp_path / "out")
    with h5py.File(out / "matches.h5", "a") as f:
        key = sorted(list_h5_names(out / "matches.h5"))[0]
        m = f[key]["matches0"][()]
        del f[key]["matches0"]
        f[key]["matches0"] = m[:-5]
    p = run_cli("sfm", _image_dir(done_run), out, "-qq")
    assert p.returncode == 2 and f"pair {key}: matches0 has" in error_line(p)


def _image_dir(out: Path) -> Path:
    return Path(json.loads((out / "summary.json").read_text())["image_dir"])


@pytest.mark.parametrize("damage,expect", [
    ("huge", "declares"),
    ("strings", "keypoints must be a numeric (N, 2) array"),
    ("one_d", "keypoints must be a numeric (N, 2) array"),
    ("missing", "no 'keypoints' dataset"),
    ("count", "descriptors have shape"),
])
def test_crafted_feature_file_is_one_line(done_run, tmp_path, damage, expect):
    out = _copy_run(done_run, tmp_path / "out")
    name = sorted(list_h5_names(out / "features.h5"))[0]
    with h5py.File(out / "features.h5", "a") as f:
        g = f[name]
        if damage == "huge":  # declares 2**40 keypoints in a chunked dataset that stores almost nothing
            del g["keypoints"]
            g.create_dataset("keypoints", shape=(2**40, 2), dtype=np.float32, chunks=(1024, 2))
        elif damage == "strings":
            del g["keypoints"]
            g["keypoints"] = np.array([b"a", b"b"])
        elif damage == "one_d":
            kp = g["keypoints"][()]
            del g["keypoints"]
            g["keypoints"] = kp.reshape(-1)
        elif damage == "missing":
            del g["keypoints"]
            g["other"] = np.zeros(3)
        else:
            d = g["descriptors"][()]
            del g["descriptors"]
            g["descriptors"] = d[:, :-3]
    t0 = time.monotonic()
    p = run_cli("sfm", _image_dir(done_run), out, "-qq")
    assert p.returncode == 2 and time.monotonic() - t0 < 120
    line = error_line(p)
    assert str(out / "features.h5") in line and expect in line


# ---------------------------------------------------------------------------------------------------------------------
# names


def _folder(tmp_path: Path, scene, names: list[str]) -> Path:
    d = tmp_path / "imgs"
    for src, name in zip(scene.names, names):
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(scene.image_dir / src, d / name)
    return d


def test_names_with_spaces_are_refused_up_front(scene, tmp_path):
    d = _folder(tmp_path, scene, ["IMG 0001.png", "IMG_0002.png", "IMG_0003.png"])
    p = run_cli("reconstruct", d, tmp_path / "out", *SIFT, "-qq")
    assert p.returncode == 2
    line = error_line(p)
    assert "IMG 0001.png: image names with white space" in line
    assert not (tmp_path / "out" / "features.h5").exists()


def test_names_whose_pair_keys_collide_are_refused_up_front(scene, tmp_path):
    d = _folder(tmp_path, scene, ["x/1.png", "x-1.png", "y.png"])
    p = run_cli("reconstruct", d, tmp_path / "out", *SIFT, "-qq")
    assert p.returncode == 2 and "differ only by '/' and '-'" in error_line(p)


# ---------------------------------------------------------------------------------------------------------------------
# the configuration: every value checked once, before any work

BAD_FLAGS = [
    (["--overlap", "-1"], "overlap -1: expected an integer >= 1"),
    (["--camera-model", "FOO"], "camera_model 'FOO': unknown COLMAP camera model"),
    (["--num-neighbors", "0"], "num_neighbors 0: expected an integer >= 1"),
    (["--ratio", "-1"], "matching_options.ratio -1.0: expected a number > 0 and <= 1"),
    (["--max-image-size", "-5"], "max_image_size -5: expected an integer >= 0"),
    (["--max-keypoints", "0"], "features_options.max_keypoints 0: expected an integer >= 1"),
]

BAD_YAML = [
    ("features_options: {max_keypoints: many}", "features_options.max_keypoints 'many': expected an integer >= 1"),
    ("max_image_size: big", "max_image_size 'big': expected an integer >= 0 or null"),
    ("seed: [1, 2]", "seed [1, 2]: expected an integer >= -1"),
    ("verification: {ransac: {max_error: x}}", "verification option ransac.max_error 'x': expected a number"),
    ("incremental_options: {no_such_option: 1}", "mapping option 'no_such_option': not an attribute of "
                                                  "IncrementalPipelineOptions"),
    ("incremental_options: {min_num_matches: x}", "mapping option min_num_matches 'x': expected an integer"),
    ("matching_options: {metrik: l2}", "matching_options.metrik: unknown option"),
    ("features_options: {precision: fast}", "features_options.precision 'fast': expected one of fp32, bf16, int8"),
    ("ray_options: {num_workers: x}", "ray_options.num_workers 'x': expected an integer >= 1 or null"),
]


def _refused_before_any_work(p: subprocess.CompletedProcess, out: Path, expect: str) -> None:
    assert p.returncode == 2, p.stderr
    assert expect in error_line(p)
    assert not (out / "features.h5").exists() and not (out / "config.yaml").exists()  # nothing done, nothing saved


@pytest.mark.parametrize("flags,expect", BAD_FLAGS, ids=[f[0][0] for f in BAD_FLAGS])
def test_bad_flag_values_are_one_line_before_extraction(scene, tmp_path, flags, expect):
    out = tmp_path / "out"
    _refused_before_any_work(run_cli("reconstruct", scene.image_dir, out, *SIFT, *flags, "-qq"), out, expect)


@pytest.mark.parametrize("text,expect", BAD_YAML, ids=[t.split(":")[0] + str(i) for i, (t, _) in enumerate(BAD_YAML)])
def test_bad_config_values_are_one_line_before_extraction(scene, tmp_path, text, expect):
    out, cfg = tmp_path / "out", tmp_path / "mine.yaml"
    cfg.write_text(text + "\n")
    p = run_cli("reconstruct", scene.image_dir, out, *SIFT, "--config", cfg, "-qq")
    _refused_before_any_work(p, out, expect)
    assert str(cfg) in error_line(p)  # names the file


def test_every_problem_of_a_config_is_one_line(scene, tmp_path):
    out, cfg = tmp_path / "out", tmp_path / "mine.yaml"
    cfg.write_text("max_image_size: big\nseed: [1, 2]\noverlap: 0\ncamera_mode: sometimes\n")
    p = run_cli("reconstruct", scene.image_dir, out, *SIFT[:-4], "--config", cfg, "-qq")
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert lines[0] == f"cd-sfm: error: {cfg}: 4 problems in the configuration:", p.stderr
    assert [ln.split()[0] for ln in lines[1:]] == ["max_image_size", "overlap", "camera_mode", "seed"]  # key order
    assert not (out / "features.h5").exists()


def test_one_column_pair_file_is_refused_before_extraction(scene, tmp_path):
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(f"{scene.names[0]} {scene.names[1]}\n{scene.names[2]}\n")
    out = tmp_path / "out"
    p = run_cli("reconstruct", scene.image_dir, out, *SIFT[:-4], "--pairs", pairs, "-qq")
    assert p.returncode == 2 and f"{pairs}:2: expected two image names" in error_line(p)
    assert not (out / "features.h5").exists()


def test_bad_values_in_python_are_refused_too(scene, tmp_path):
    from cd_sfm.io import CdSfmError
    from cd_sfm.pipeline import reconstruct

    with pytest.raises(CdSfmError, match="features_options.max_keypoints 'many'"):
        reconstruct(scene.image_dir, tmp_path / "out", {"features": "sift", "features_options": {"max_keypoints": "many"}})
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# settings, changed images, EXIF orientation


def test_feature_settings_live_in_the_feature_file(scene, tmp_path):
    out = tmp_path / "out"
    assert run_cli("extract", scene.image_dir, out, "--features", "sift", "--max-keypoints", "512", "-q").returncode == 0
    with h5py.File(out / "features.h5", "r") as f:
        stamped = json.loads(f.attrs["cd_sfm_settings"])
    assert stamped["backend"] == "sift" and stamped["options"]["max_keypoints"] == 512
    (out / "config.yaml").unlink()  # the settings no longer depend on it
    p = run_cli("extract", scene.image_dir, out, "--features", "rootsift", "--max-keypoints", "512", "-qq")
    assert p.returncode == 2
    line = error_line(p)
    assert "features.h5: features made with other settings" in line and "rootsift" in line


def test_an_image_replaced_in_place_is_extracted_again(scene, tmp_path):
    d = _folder(tmp_path, scene, scene.names[:3])
    out = tmp_path / "out"
    args = ["extract", d, out, "--features", "sift", "--max-keypoints", "512", "-q"]
    assert run_cli(*args).returncode == 0
    before = read_features(out / "features.h5", scene.names[0])
    shutil.copy(scene.image_dir / scene.names[4], d / scene.names[0])  # other content, same name
    p = run_cli(*args)
    assert p.returncode == 0 and "1 extracted, 2 reused" in p.stdout, p.stdout
    after = read_features(out / "features.h5", scene.names[0])
    assert len(after["keypoints"]) != len(before["keypoints"]) or not np.allclose(after["keypoints"],
                                                                                    before["keypoints"])
    p = run_cli(*args)
    assert "0 extracted, 3 reused" in p.stdout


def test_exif_rotated_jpeg_is_stored_in_the_pixels_colmap_reads(scene, tmp_path):
    """A JPEG stored sideways with EXIF Orientation 6: features are found upright but keypoints, image size and the
    database camera are in the file's stored pixels, which is what COLMAP (and pycolmap.undistort_images) load."""
    import pycolmap

    d = tmp_path / "imgs"
    d.mkdir()
    for i, n in enumerate(scene.names[:4]):
        img = Image.open(scene.image_dir / n).convert("RGB")
        if i == 0:  # stored rotated (what a phone writes), displayed upright through the tag
            exif = Image.Exif()
            exif[0x0112] = 6
            img.transpose(Image.Transpose.ROTATE_90).save(d / f"{i}.jpg", quality=95, exif=exif.tobytes())
        else:
            img.save(d / f"{i}.jpg", quality=95)
    out = tmp_path / "out"
    p = run_cli("reconstruct", d, out, *SIFT, "-q")
    assert p.returncode == 0, p.stderr
    stored = Image.open(d / "0.jpg").size  # (w, h) of the stored pixels: 480 x 640
    assert stored == (480, 640)
    f0 = read_features(out / "features.h5", "0.jpg")
    assert tuple(f0["image_size"]) == stored
    kp = f0["keypoints"]
    assert kp[:, 0].max() < stored[0] and kp[:, 1].max() < stored[1]
    # the same points as the upright image's own features, mapped into the stored frame
    up = np.asarray(Image.open(scene.image_dir / scene.names[0]).convert("L"), np.float32)
    raw = np.asarray(Image.open(d / "0.jpg").convert("L"), np.float32)
    xy = np.round(kp[:50]).astype(int)
    # stored pixel (u, v) shows upright pixel (x, y) = (W_up - 1 - v, u) for orientation 6
    ux, uy = up.shape[1] - 1 - xy[:, 1], xy[:, 0]
    assert np.abs(raw[xy[:, 1], xy[:, 0]] - up[uy, ux]).mean() < 12
    db = pycolmap.Database.open(str(out / "database.db"))
    try:
        im = next(i for i in db.read_all_images() if i.name == "0.jpg")
        cam = db.read_camera(im.camera_id)
    finally:
        db.close()
    assert (cam.width, cam.height) == stored


# ---------------------------------------------------------------------------------------------------------------------
# killed runs


def _start(args, out_dir_hint=None):
    return subprocess.Popen([sys.executable, "-m", "cd_sfm.cli", *map(str, args)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _done_in_parts(out: Path) -> int:
    parts = out / "features.h5.parts"
    n = 0
    for p in sorted(parts.glob("part-*.h5")) if parts.is_dir() else []:
        try:
            n += len(list_h5_names(p))
        except OSError:
            pass
    return n


def test_sigterm_stops_like_ctrl_c_and_the_rerun_resumes(tmp_path):
    # 24 images: with 12 a loaded machine once saw the run end before the signal could land
    scene = render_scene(tmp_path / "scene", num_images=24, num_points=200, width=640, height=480, patch_radius=12)
    out = tmp_path / "out"
    args = ["reconstruct", scene.image_dir, out, *SIFT]
    proc = _start(args + ["-q"])
    deadline = time.monotonic() + 120
    # the signal lands once some features are done: mid-extraction, or on a fast CPU (12 small images) already in a
    # later stage, where the features file is what a rerun must find
    while (time.monotonic() < deadline and proc.poll() is None and _done_in_parts(out) < 1
           and not (out / "features.h5").exists()):
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read()
    os.killpg(proc.pid, signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143, err
    assert "terminated; finished work is kept" in err and "@ 0x" not in err and "Traceback" not in err
    kept = _done_in_parts(out) + (len(list_h5_names(out / "features.h5")) if (out / "features.h5").exists() else 0)
    assert kept >= 1
    p = run_cli(*args, "-q")
    assert p.returncode == 0, p.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["features_reused"] >= kept and s["num_images_registered"] == 24


@pytest.mark.slow  # ~30-60 s: ContextDesc on 12 images, then a real SIGKILL
def test_sigkill_loses_at_most_seconds_of_contextdesc_work(tmp_path):
    # 36 images: on an AVX512-VNNI CPU the int8 network extracted 12 before the kill could land
    scene = render_scene(tmp_path / "scene", num_images=36, num_points=200, width=640, height=480, patch_radius=12)
    out = tmp_path / "out"
    # the full-size model: the default student finishes 8 such images before the kill can land mid-run
    proc = _start(["extract", scene.image_dir, out, "--max-keypoints", "2048", "--model", "cd-sfm-v1", "-q"])
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and _done_in_parts(out) < 5:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # kept in the parts, or already merged into features.h5 when the kill landed as the run ended (a fast CPU)
    merged = len(list_h5_names(out / "features.h5")) if (out / "features.h5").exists() else 0
    assert _done_in_parts(out) + merged >= 5


# ---------------------------------------------------------------------------------------------------------------------
# disk full


def _small_disk(tmp_path: Path, size: str) -> Path:
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    return mnt


@pytest.mark.parametrize("stage", ["extract", "sfm"])
def test_disk_full_is_one_line_and_keeps_finished_work(scene, done_run, tmp_path, stage):
    inputs = ("features.h5", "matches.h5", "pairs.txt", "config.yaml")
    room = sum((done_run / f).stat().st_size for f in inputs) + (64 << 10) if stage == "sfm" else 40 << 10
    mnt = _small_disk(tmp_path, f"{room // 1024}k")
    try:
        out = mnt / "out"
        if stage == "extract":
            p = run_cli("extract", scene.image_dir, out, "--features", "sift", "-qq")
        else:
            out.mkdir()
            for f in inputs:
                shutil.copy(done_run / f, out / f)
            p = run_cli("sfm", scene.image_dir, out, "-qq")
        assert p.returncode == 2
        line = error_line(p)
        assert "disk full" in line and str(out) in line
        if stage == "sfm":  # what was there is intact; no half-written database or model left behind
            assert list_h5_names(out / "features.h5") == list_h5_names(done_run / "features.h5")
            assert not (out / "database.db").exists() and not (out / "sparse").exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ---------------------------------------------------------------------------------------------------------------------
# native stderr


def test_int8_interpreters_built_in_threads_never_lose_stderr():
    """Two threads building TFLite interpreters at once used to leave fd 2 on a deleted temp file."""
    from cd_sfm.models import registry
    from cd_sfm.models.int8 import Int8Local, int8_path

    path = int8_path(registry.resolve(registry.DEFAULT_MODEL).folder)
    if path is None:
        pytest.skip("the shipped model has no up-to-date int8 file")
    real = os.fstat(2)
    for _ in range(20):
        ts = [threading.Thread(target=Int8Local, args=(path,), kwargs={"threads": 1}) for _ in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        now = os.fstat(2)
        assert (now.st_dev, now.st_ino) == (real.st_dev, real.st_ino)


def test_matches_of_a_replaced_image_are_made_again(scene, tmp_path):
    d = _folder(tmp_path, scene, scene.names[:3])
    out = tmp_path / "out"
    args = ["reconstruct", d, out, "--features", "sift", "--max-keypoints", "1024", "--camera-mode", "single",
            "--pairs", "exhaustive", "-q"]
    assert run_cli(*args).returncode == 0
    with h5py.File(out / "matches.h5", "r") as f:
        assert json.loads(f.attrs["cd_sfm_settings"])["matching"]["ratio"] == 0.8
    shutil.copy(scene.image_dir / scene.names[4], d / scene.names[1])
    p = run_cli(*args)
    assert p.returncode == 0, p.stderr
    s = json.loads((out / "summary.json").read_text())
    # 3 pairs: the one without the replaced image is reused, the two with it are matched again
    assert (s["features_reused"], s["pairs_reused"], s["pairs_matched"]) == (2, 1, 2)
    (out / "config.yaml").unlink()  # the stamp in matches.h5 alone refuses other matching settings
    p = run_cli(*args, "--ratio", "0.7", "-qq")
    assert p.returncode == 2 and "matches.h5: matches made with other settings" in error_line(p)
