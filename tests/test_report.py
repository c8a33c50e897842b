"""``report.html`` and ``overview.png``: written by a run and by ``cd-sfm report``, self-contained, and working in a
real headless Chromium (no console errors, no network, the 3D view draws the points and follows drag and wheel).
The browser test skips when Chromium is not installed (``apt-get install -y chromium``)."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pycolmap
import pytest
from PIL import Image

from cd_sfm import cli
from cd_sfm.report import (MAX_POINTS, image_rows, pick_pairs, read_ply_points, read_run, scene_payload, view_frame,
                           write_report)

from _browser import Browser, find_chromium


def test_run_writes_report_and_overview(sift_run):
    scene, out, summary = sift_run
    page = (out / "report.html").read_text()
    png = Image.open(out / "overview.png")
    assert png.format == "PNG" and png.size == (1100, 550)
    # self-contained: no address outside the page; pictures are data URIs
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and not re.search(r"<script[^>]+src=", page)
    imgs = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(imgs) == 3 and all(s.startswith("data:image/jpeg;base64,") for s in imgs)
    # the table: one row per image, all registered, keypoints from the database
    for name in scene.names:
        assert f"<td class=name>{name}</td><td>yes</td>" in page
    assert "Images (6 of 6 registered)" in page
    data = json.loads(re.search(r'<script type="application/json" id="cd-data">(.*?)</script>', page, re.S).group(1))
    assert data["num_points"] == data["num_points_total"] == summary["num_points3D"]
    assert len(data["cameras"]) == 6
    for k in ("extract", "match", "mapping"):
        assert f"<span>{k}</span>" in page


def test_report_contents(sift_run):
    _, out, summary = sift_run
    run = read_run(out)
    rec = pycolmap.Reconstruction(str(out / "sparse" / "0"))
    xyz, rgb = read_ply_points(out / "points.ply")
    assert len(xyz) == rec.num_points3D() == len(run["xyz"])
    # the viewing frame: points centred, scene within radius ~1, up = the cameras' mean up
    pay = scene_payload(run)
    pts = np.frombuffer(base64.b64decode(pay["points"]), np.float32).reshape(-1, 3)
    origin, R, scale = run["frame"]
    assert np.allclose(origin, np.median(xyz, axis=0))
    assert np.percentile(np.linalg.norm(pts, axis=1), 95) <= 1.0 + 1e-6
    ups = np.array([c["up"] for c in run["cameras"]])
    assert (ups @ R[1]).mean() > 0.9 * np.linalg.norm(ups.mean(axis=0))
    # few points: all in the page; many: a subset of MAX_POINTS
    big = dict(run, xyz=np.random.default_rng(1).normal(size=(MAX_POINTS + 500, 3)),
               rgb=np.zeros((MAX_POINTS + 500, 3), np.uint8))
    assert scene_payload(big)["num_points"] == MAX_POINTS
    # per-image numbers agree with the database and the model
    table = {r["name"]: r for r in image_rows(run)}
    db = pycolmap.Database.open(str(out / "database.db"))
    try:
        for im in db.read_all_images():
            assert table[im.name]["keypoints"] == db.num_keypoints_for_image(im.image_id)
            assert table[im.name]["verified_pairs"] == 5
    finally:
        db.close()
    for i in rec.reg_image_ids():
        assert table[rec.images[i].name]["points3D"] == rec.images[i].num_points3D


def test_facts_flag_a_model_that_disagrees_with_its_pairs():
    from cd_sfm.report import facts

    mapper = lambda s: dict(facts(s))["mapper"]  # noqa: E731
    assert mapper({"mapper_used": "incremental", "mapping_agreement": 1.0}) == (
        "incremental (agreement with the two-view geometries 1.00)")
    low = mapper({"mapper_used": "incremental", "mapping_agreement": 0.29})
    assert low.startswith("incremental (agreement with the two-view geometries 0.29, under the 0.8 that is trusted")
    assert "placed wrongly" in low
    assert mapper({"mapper_used": "global"}) == "global"
    pruned = {"mapper_used": "global", "mapping_agreement": 1.0, "num_images_registered": 9, "min_image_points": 30,
              "mapping_tried": [{"mapper": "incremental", "registered": 5, "weak_removed": 0},
                                {"mapper": "global", "registered": 9, "weak_removed": 5}], "images_left_out": 5}
    assert mapper(pruned) == ("global (agreement with the two-view geometries 1.00; 5 images left out, observing "
                              "fewer than 30 of its 3D points)")
    assert dict(facts({}))["masks"] == "none"
    assert dict(facts({}))["coordinates"] == "the mapper's own (arbitrary scale)"
    geo = {"georeferenced": True, "origin": [47.3768871, 8.541694, 408.04], "images": 8, "median_error_m": 0.113}
    assert dict(facts({"georeference": geo}))["coordinates"] == \
        "east-north-up metres around 47.376887, 8.541694, 408.0 m (8 images with GPS, median 0.11 m from their GPS " \
        "positions)"
    assert dict(facts({"extended": 6, "mapper": "incremental"}))["mapper"] == \
        "incremental; extended the earlier model of 6 images"
    assert dict(facts({"masked_images": 22, "masks": "/data/masks"}))["masks"] == "22 images masked (/data/masks)"


def test_pick_pairs_and_view_frame():
    pairs = np.array([[1, 2, 50], [1, 3, 400], [2, 3, 120], [3, 4, 30], [2, 4, 90]])
    assert pick_pairs(pairs) == [(1, 3, 400), (2, 4, 90), (3, 4, 30)]
    assert pick_pairs(pairs[:1]) == [(1, 2, 50)]
    assert pick_pairs(np.zeros((0, 3), np.int64)) == []
    centers = np.array([[0.0, 0, -5], [1, 0, -5]])
    origin, R, scale = view_frame(centers, np.array([[0.0, -1, 0], [0, -1, 0]]), np.zeros((10, 3)))
    assert np.allclose(R[1], [0, -1, 0]) and np.allclose(R[2], [0.1, 0, -1] / np.linalg.norm([0.1, 0, -1]))
    assert np.allclose(R @ R.T, np.eye(3)) and np.linalg.det(R) == pytest.approx(1.0)


def test_report_cli(sift_run, tmp_path, capsys):
    _, out, _ = sift_run
    (out / "report.html").unlink()
    assert cli.main(["report", str(out), "--no-png"]) == 0
    assert (out / "report.html").exists() and "3 match plots" in capsys.readouterr().out
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "summary.json: not found" in err


@pytest.mark.skipif(find_chromium() is None, reason="chromium not installed (apt-get install -y chromium)")
def test_report_in_headless_chromium(sift_run, tmp_path):
    pytest.importorskip("websocket", reason="pip install websocket-client")
    _, out, _ = sift_run
    write_report(out)
    state_js = "new Promise(r => requestAnimationFrame(() => r(window.cdSfmViewer.state())))"
    with Browser(tmp_path) as b:
        b.open((out / "report.html").as_uri(), width=1200, height=1000)
        s0 = b.evaluate(state_js)
        assert s0["points"] > 200 and s0["cameras"] == 6
        assert s0["drawn"] >= 0.9 * s0["points"]  # the first view shows (nearly) every point
        box = b.evaluate("(() => {const r = document.getElementById('scene').getBoundingClientRect();"
                         "return {x: r.x, y: r.y, w: r.width, h: r.height};})()")
        assert box["w"] > 800 and box["h"] > 400
        shot = b.screenshot(tmp_path / "report.png")
        cx, cy = box["x"] + box["w"] / 2, box["y"] + box["h"] / 2
        b.drag(cx, cy, cx + 160, cy + 60)
        s1 = b.evaluate(state_js)
        assert s1["yaw"] > s0["yaw"] + 1.0 and s1["pitch"] > s0["pitch"] + 0.3 and s1["frames"] > s0["frames"]
        b.wheel(cx, cy, -300)
        s2 = b.evaluate(state_js)
        assert s2["zoom"] > 1.3 * s1["zoom"]
        b.mouse("mousePressed", cx, cy, button="left", buttons=1, clickCount=2)
        b.mouse("mouseReleased", cx, cy, button="left", buttons=0, clickCount=2)
        s3 = b.evaluate(state_js)
        assert (s3["yaw"], s3["pitch"], s3["zoom"]) == (s0["yaw"], s0["pitch"], s0["zoom"])  # double-click resets
        assert b.errors() == []
        schemes = {u.split(":", 1)[0] for u in b.requests()}
        assert schemes <= {"file", "data"}, b.requests()
    # the screenshot shows the canvas with coloured points and red cameras on the dark background
    img = np.asarray(Image.open(shot).convert("RGB"))
    view = img[int(box["y"]):int(box["y"] + box["h"]), int(box["x"]):int(box["x"] + box["w"])].astype(int)
    background = np.array([0x1b, 0x1d, 0x22])
    lit = np.abs(view - background).sum(axis=2) > 60
    assert 0.001 < lit.mean() < 0.5
    red = (view[..., 0] > 200) & (view[..., 1] < 140) & (view[..., 2] < 140)
    assert red.sum() > 20


def test_report_of_a_run_without_model_or_images(sift_run, tmp_path):
    """Nothing registered and the photos moved away: the page is still written, with what there is."""
    import shutil

    _, out, _ = sift_run
    summary = json.loads((out / "summary.json").read_text())
    summary.update(image_dir=str(tmp_path / "moved"), num_images_registered=0)
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    shutil.copy(out / "database.db", tmp_path / "database.db")
    st = write_report(tmp_path)
    assert (st["num_points"], st["num_cameras"], st["num_plots"]) == (0, 0, 0)
    page = (tmp_path / "report.html").read_text()
    assert "Images (0 of 6 registered)" in page and page.count("not registered") == 6
    assert "No verified pairs to draw" in page and (tmp_path / "overview.png").exists()


def test_match_plot_puts_lines_on_the_keypoints():
    from cd_sfm.report import match_plot

    img = np.zeros((400, 600, 3), np.uint8)
    kp = np.array([[100.0, 200.0]])
    # the right image read at half size: its keypoint (original pixels) must still land on the same spot
    plot = match_plot(img, img[::2, ::2], kp, kp, np.array([[0, 0]]), height=200, read_scales=(1.0, 0.5))
    assert plot.shape == (200, 600, 3)
    lit = np.argwhere(plot.max(axis=2) > 100)
    assert lit[:, 1].min() <= 51 and lit[:, 1].max() >= 300 + 49  # x from ~50 (left) to ~350 (right image)
    assert abs(lit[:, 0].mean() - 100) < 2  # y ~ 100 in both


def test_match_plots_use_the_stored_pixel_frame(tmp_path):
    """Keypoints in the database are in the file's pixels (COLMAP ignores EXIF orientation): so are the plots."""
    from cd_sfm.report import stored_image

    pixels = np.zeros((60, 100, 3), np.uint8)
    pixels[:, :50] = 255  # left half white in the stored frame
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    arr, scale = stored_image(tmp_path / "rot.jpg")
    assert arr.shape == (60, 100, 3) and scale == 1.0
    assert arr[:, :40].mean() > 200 and arr[:, 60:].mean() < 50
    small, scale = stored_image(tmp_path / "rot.jpg", max_size=50)
    assert small.shape == (30, 50, 3) and scale == 0.5
