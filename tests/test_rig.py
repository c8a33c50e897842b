"""Rigs (``rig_config``, COLMAP's ``rig_config.json``): the images of each rig camera share one camera, the images
taken together form one frame, and rig poses the file leaves out are measured on a model mapped without the rigs
first (COLMAP's two-step recipe)."""

from __future__ import annotations

import json

import numpy as np
import pycolmap
import pytest

from cd_sfm import cli
from cd_sfm.pipeline import format_summary, reconstruct
from cd_sfm.report import facts


@pytest.fixture(scope="module")
def rig_scene(tmp_path_factory):
    """A rendered stereo rig (two cameras, 6 frames): (image folder, the true second camera's pose in the rig)."""
    root = tmp_path_factory.mktemp("rig")
    pycolmap.set_random_seed(0)
    opts = pycolmap.SyntheticDatasetOptions()
    opts.num_rigs, opts.num_cameras_per_rig, opts.num_frames_per_rig = 1, 2, 6
    opts.num_points3D, opts.camera_width, opts.camera_height = 400, 640, 480
    opts.camera_params = [1280.0, 320.0, 240.0, 0.02]
    gt = pycolmap.synthesize_dataset(opts)
    images = root / "images"
    images.mkdir()
    image_opts = pycolmap.SyntheticImageOptions()
    image_opts.feature_patch_radius = 12
    pycolmap.synthesize_images(image_opts, gt, str(images))
    rig = next(iter(gt.rigs.values()))
    (sensor, pose), = rig.non_ref_sensors.items()
    return images, pose


def write_config(path, pose=None):
    second = {"image_prefix": "camera000002_"}
    if pose is not None:
        x, y, z, w = (float(v) for v in pose.rotation.quat)  # pycolmap: x, y, z, w; the file: w, x, y, z
        second.update(cam_from_rig_rotation=[w, x, y, z], cam_from_rig_translation=[float(v) for v in pose.translation])
    path.write_text(json.dumps([{"cameras": [{"image_prefix": "camera000001_", "ref_sensor": True}, second]}]))
    return path


def check_rig_model(out, pose):
    rec = pycolmap.Reconstruction(str(out / "sparse" / "0"))
    assert rec.num_reg_images() == 12 and len(rec.cameras) == 2 and len(rec.frames) == 6
    assert all(len(f.image_ids) == 2 for f in rec.frames.values())
    rig = next(iter(rec.rigs.values()))
    (_, got), = rig.non_ref_sensors.items()
    assert np.degrees((got.rotation * pose.rotation.inverse()).angle()) < 0.5
    t, want = got.translation / np.linalg.norm(got.translation), pose.translation / np.linalg.norm(pose.translation)
    assert np.degrees(np.arccos(np.clip(t @ want, -1, 1))) < 3


@pytest.mark.parametrize("known", [True, False], ids=["poses given", "poses measured"])
def test_rig_frames_and_poses(rig_scene, tmp_path, known):
    images, pose = rig_scene
    config = write_config(tmp_path / "rig_config.json", pose if known else None)
    s = reconstruct(images, tmp_path / "out", {"features": "sift", "rig_config": str(config)}, progress=False,
                    report=False)
    assert s["num_images_registered"] == 12
    assert s["rig"] == {"rigs": 1, "frames": 6, "frames_with_several_images": 6,
                        "poses": "given" if known else "measured"}
    assert f"Rigs: 1, 6 frames (6 with several images), rig poses {'given' if known else 'measured'}" in \
        format_summary(s)
    assert dict(facts(s))["rigs"].startswith("1, 6 frames, poses")
    check_rig_model(tmp_path / "out", pose)


def test_rig_config_errors_and_the_cli(rig_scene, tmp_path, capsys):
    images, pose = rig_scene
    bad = tmp_path / "bad.json"
    bad.write_text('[{"cameras": [{"image_prefix": 3}]')
    assert cli.main(["reconstruct", str(images), str(tmp_path / "o1"), "--features", "sift", "--rig-config",
                     str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a COLMAP rig configuration (line 1:" in err[0] and str(bad) in err[0]
    no_ref = tmp_path / "no_ref.json"
    no_ref.write_text(json.dumps([{"cameras": [{"image_prefix": "camera000001_"}]}]))
    assert cli.main(["sfm", str(images), str(tmp_path / "o1"), "--rig-config", str(no_ref)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("not a COLMAP rig configuration (Rig must have one reference sensor)")
    # a rig camera without images: one line, after which the features and matches stay for the rerun
    config = json.loads(write_config(tmp_path / "rig.json", pose).read_text())
    config[0]["cameras"].append({"image_prefix": "camera000009_", "cam_from_rig_rotation": [1, 0, 0, 0],
                                 "cam_from_rig_translation": [0.1, 0, 0]})
    (tmp_path / "rig.json").write_text(json.dumps(config))
    argv = ["reconstruct", str(images), str(tmp_path / "o2"), "--features", "sift", "--rig-config",
            str(tmp_path / "rig.json")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"cd-sfm: error: {tmp_path / 'rig.json'}: no image name starts with 'camera000009_' (every rig "
                       "camera needs images)")
    write_config(tmp_path / "rig.json", pose)
    assert cli.main(argv) == 0
    printed = capsys.readouterr()
    assert "Reused 12 image features and 66 pair matches" in printed.out and "Rigs: 1, 6 frames" in printed.out


def test_sequential_pairs_follow_rig_frames(rig_scene, tmp_path):
    from cd_sfm.pairs import sequential

    names = [f"rig/cam{c}/{i:04d}.jpg" for c in (1, 2) for i in range(1, 6)] + ["extra.jpg"]
    pairs = sequential.main(names, overlap=1, rig_prefixes=["rig/cam1/", "rig/cam2/"])
    got = {frozenset(p) for p in pairs}
    frame = {n: n.rsplit("/", 1)[-1] for n in names}
    assert frozenset(("rig/cam1/0001.jpg", "rig/cam2/0001.jpg")) in got  # within a frame
    assert frozenset(("rig/cam2/0001.jpg", "rig/cam1/0002.jpg")) in got  # across cameras, next frame
    assert frozenset(("rig/cam1/0001.jpg", "rig/cam1/0003.jpg")) not in got  # two frames apart
    assert len(pairs) == len(got) == 5 + 4 * 4 + 2  # 5 frames of 2, 4 steps of 2 x 2, the last frame to extra.jpg
    assert all(a != b and (frame[a] != frame[b] or a.split("/")[1] != b.split("/")[1]) for a, b in pairs)
    images, pose = rig_scene  # and in a run: sequential pairs of a rig video
    s = reconstruct(images, tmp_path / "out", {"features": "sift", "pairs": "sequential", "overlap": 2,
                                                "rig_config": str(write_config(tmp_path / "rig.json", pose))},
                    progress=False, report=False)
    assert s["num_pairs"] == 6 * 1 + (5 + 4) * 4 and s["num_images_registered"] == 12
