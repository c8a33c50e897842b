"""Feature masks (COLMAP's ``--ImageReader.mask_path`` convention): keypoints only where the mask is white, in the
stored pixel frame even for EXIF-rotated images; images without a mask unmasked; a mask added, changed or removed
makes its image extracted and matched again; a bad mask is a one-line error naming it."""

import json
import logging
import os

import cv2
import h5py
import numpy as np
import pytest
from PIL import Image

from cd_sfm.features import extract
from cd_sfm.images import find_mask, read_mask
from cd_sfm.io import CdSfmError

from test_extract import scene

CONF = {"backend": "sift", "options": {"max_keypoints": 400}, "max_image_size": None, "descriptor_dtype": "float16"}


def left_half(h, w):
    m = np.zeros((h, w), np.uint8)
    m[:, : w // 2] = 255
    return m


@pytest.fixture
def folders(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    (images / "sub").mkdir(parents=True)
    (masks / "sub").mkdir(parents=True)
    cv2.imwrite(str(images / "a.jpg"), scene(240, 320, 0))
    cv2.imwrite(str(images / "sub" / "b.jpg"), scene(240, 320, 1))
    cv2.imwrite(str(images / "c.jpg"), scene(240, 320, 2))
    cv2.imwrite(str(masks / "a.jpg.png"), left_half(240, 320))  # COLMAP's name
    cv2.imwrite(str(masks / "sub" / "b.png"), left_half(240, 320))  # the stem's name
    return images, masks


def keypoints(path, name):
    with h5py.File(path, "r") as f:
        return f[name]["keypoints"][()], dict(f[name].attrs)


def test_masked_keypoints_lie_in_the_mask(folders, tmp_path, caplog):
    images, masks = folders
    out = tmp_path / "features.h5"
    with caplog.at_level(logging.WARNING):
        stats = extract.main(CONF, images, out, progress=False, mask_dir=masks)
    assert stats["masked"] == 2 and stats["extracted"] == 3
    assert "1 of 3 images have no mask" in caplog.text and "c.jpg.png" in caplog.text
    for name in ("a.jpg", "sub/b.jpg"):
        kp, attrs = keypoints(out, name)
        assert len(kp) > 50 and kp[:, 0].max() < 160, name  # the whole budget on the left half
        assert "mask_size" in attrs
    kp, attrs = keypoints(out, "c.jpg")
    assert kp[:, 0].max() > 200 and "mask_size" not in attrs


def test_mask_added_changed_removed_extracts_again(folders, tmp_path):
    images, masks = folders
    out = tmp_path / "features.h5"
    extract.main(CONF, images, out, progress=False, mask_dir=masks)
    assert extract.main(CONF, images, out, progress=False, mask_dir=masks)["extracted"] == 0
    # a mask for c.jpg appears: only c.jpg again
    cv2.imwrite(str(masks / "c.jpg.png"), left_half(240, 320))
    assert extract.main(CONF, images, out, progress=False, mask_dir=masks)["extracted"] == 1
    assert keypoints(out, "c.jpg")[0][:, 0].max() < 160
    # a.jpg's mask changes (the right half now)
    cv2.imwrite(str(masks / "a.jpg.png"), 255 - left_half(240, 320))
    st = os.stat(masks / "a.jpg.png")
    os.utime(masks / "a.jpg.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert extract.main(CONF, images, out, progress=False, mask_dir=masks)["extracted"] == 1
    assert keypoints(out, "a.jpg")[0][:, 0].min() >= 159
    # no masks at all: the three masked images again, unmasked
    assert extract.main(CONF, images, out, progress=False)["extracted"] == 3
    assert keypoints(out, "a.jpg")[0][:, 0].min() < 100


def test_mask_follows_the_stored_pixels_of_rotated_images(tmp_path):
    """COLMAP reads stored pixels (no EXIF rotation) and its masks are drawn on them: a mask of the stored image's
    top half keeps keypoints in the stored top half, though the features are found on the upright image."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    stored = scene(200, 300, 4)  # stored 300 x 200, shown upright as 200 x 300 (orientation 6)
    img = Image.fromarray(stored[..., ::-1].copy())
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(images / "r.jpg", quality=95, exif=exif.tobytes())
    top = np.zeros((200, 300), np.uint8)
    top[:100] = 255
    cv2.imwrite(str(masks / "r.jpg.png"), top)
    out = tmp_path / "f.h5"
    extract.main(CONF, images, out, progress=False, mask_dir=masks)
    kp, attrs = keypoints(out, "r.jpg")
    assert int(attrs["exif_orientation"]) == 6 and len(kp) > 30
    assert kp[:, 1].max() < 101 and kp[:, 0].max() > 200  # stored frame: top half, full width
    # read_mask itself returns the upright mask: stored top half -> upright right half
    m = read_mask(masks / "r.jpg.png", (300, 200), 6)
    assert m.shape == (300, 200) and m[:, 100:].all() and not m[:, :100].any()


def test_mask_of_another_size(tmp_path):
    path = tmp_path / "m.png"
    cv2.imwrite(str(path), left_half(120, 160))  # half the size: resized
    m = read_mask(path, (320, 240))
    assert m.shape == (240, 320) and m[:, :160].all() and not m[:, 160:].any()
    with pytest.raises(CdSfmError, match=r"m\.png: mask is 160x120, the image of x\.jpg is 300x300"):
        read_mask(path, (300, 300), image_name="x.jpg")


def test_bad_masks_skip_their_image_with_a_message(folders, tmp_path, caplog):
    images, masks = folders
    (masks / "a.jpg.png").write_bytes(b"not a png")
    cv2.imwrite(str(masks / "c.jpg.png"), left_half(100, 100))  # square mask, landscape image
    out = tmp_path / "f.h5"
    with caplog.at_level(logging.WARNING):
        stats = extract.main(CONF, images, out, progress=False, mask_dir=masks)
    assert set(stats["skipped"]) == {"a.jpg", "c.jpg"} and stats["extracted"] == 1
    assert str(masks / "a.jpg.png") in stats["skipped"]["a.jpg"] and "cannot read mask" in stats["skipped"]["a.jpg"]
    assert "another aspect ratio" in stats["skipped"]["c.jpg"]
    with pytest.raises(CdSfmError, match="mask folder not found"):
        extract.main(CONF, images, out, progress=False, mask_dir=tmp_path / "nope")


def test_find_mask_prefers_colmap_name(tmp_path):
    (tmp_path / "a.jpg.png").write_bytes(b"")
    (tmp_path / "a.png").write_bytes(b"")
    assert find_mask(tmp_path, "a.jpg").name == "a.jpg.png"
    assert find_mask(tmp_path, "b.jpg") is None


def test_reconstruct_masks_flag_rematches_a_masked_image(folders, tmp_path):
    """The pipeline through the CLI: ``--masks`` is recorded (absolute) in config.yaml, and masking one image on a
    rerun extracts it again and matches its pairs again, reusing the rest."""
    from cd_sfm.cli import main as cli

    images, masks = folders
    for p in masks.rglob("*.png"):
        p.unlink()
    out = tmp_path / "out"
    args = ["reconstruct", str(images), str(out), "--features", "sift", "--max-keypoints", "400", "-q"]
    cli(args)
    first = json.loads((out / "summary.json").read_text())
    cv2.imwrite(str(masks / "a.jpg.png"), left_half(240, 320))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        cli(args + ["--masks", "masks"])
    finally:
        os.chdir(cwd)
    second = json.loads((out / "summary.json").read_text())
    assert str(masks) in (out / "config.yaml").read_text()
    assert (first["features_extracted"], first["pairs_matched"]) == (3, 3) and first["masked_images"] == 0
    # only a.jpg again, and only its two pairs
    assert (second["features_extracted"], second["features_reused"]) == (1, 2)
    assert (second["pairs_matched"], second["pairs_reused"]) == (2, 1) and second["masked_images"] == 1
    kp, _ = keypoints(out / "features.h5", "a.jpg")
    assert kp[:, 0].max() < 160
