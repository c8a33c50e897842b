import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from cd_sfm.images import IMAGE_EXTENSIONS, image_info, list_images, natural_key, read_image
from cd_sfm.io import CdSfmError


def texture(h=48, w=64, seed=0):
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.random((h, w, 3)).astype(np.float32), (0, 0), 1.5)
    return cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)


def save(path: Path, arr: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# discovery


def test_list_images_nested_sorted_relative(tmp_path, caplog):
    img = texture()
    for name in ["b.jpg", "a.PNG", "sub/c.tiff", "sub/deeper/d.JPEG", "z.bmp", "sub/e.ppm", "f.pgm", "g.tif"]:
        save(tmp_path / name, img if not name.endswith(".pgm") else img[..., 0])
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub" / "model.ply").write_text("ply")
    save(tmp_path / "._b.jpg", img)  # macOS resource fork
    save(tmp_path / ".cache" / "x.jpg", img)
    with caplog.at_level(logging.DEBUG, logger="cd_sfm.images"):
        names = list_images(tmp_path)
    assert names == sorted(["a.PNG", "b.jpg", "f.pgm", "g.tif", "sub/c.tiff", "sub/deeper/d.JPEG", "sub/e.ppm",
                            "z.bmp"])
    assert "notes.txt" in caplog.text and "not an image" in caplog.text
    assert list_images(tmp_path, patterns=["sub/*"]) == ["sub/c.tiff", "sub/deeper/d.JPEG", "sub/e.ppm"]
    assert list_images(tmp_path / "sub") == ["c.tiff", "deeper/d.JPEG", "e.ppm"]


def test_list_images_errors(tmp_path):
    with pytest.raises(CdSfmError, match=f"{tmp_path / 'missing'}: image folder not found"):
        list_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CdSfmError, match="no images found"):
        list_images(tmp_path / "empty")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("x")
    with pytest.raises(CdSfmError, match=r"text: no images found .*; ignored 1 non-image file \(1 \.txt\)"):
        list_images(tmp_path / "text")
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(CdSfmError, match="not a folder"):
        list_images(tmp_path / "file.jpg")


def test_formats_colmap_cannot_read_are_named_with_what_to_do(tmp_path, caplog):
    # phone and web formats: Pillow may read WebP, but COLMAP (undistortion, dense stereo, its GUI) does not
    img = texture()
    save(tmp_path / "a.webp", img, lossless=True)
    save(tmp_path / "b.jpg", img)
    for name in ("IMG_1.HEIC", "IMG_2.heic", "DSC_3.NEF", "notes.txt"):
        (tmp_path / name).write_bytes(b"not for us")
    with caplog.at_level(logging.INFO, logger="cd_sfm.images"):
        assert list_images(tmp_path) == ["b.jpg"]
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1
    assert "Ignored 5 non-image files (2 .heic, 1 .nef, 1 .txt, 1 .webp)" in warned[0].getMessage()
    assert "(convert them to JPEG or PNG: COLMAP does not read that format; develop raw photos to JPEG or TIFF)" in warned[0].getMessage()
    (tmp_path / "b.jpg").unlink()
    with pytest.raises(CdSfmError, match=r"no images found .*; ignored 5 non-image files \(2 \.heic"):
        list_images(tmp_path)


def test_colmap_reads_every_accepted_extension(tmp_path):
    pycolmap = pytest.importorskip("pycolmap")
    img = texture()
    for ext in IMAGE_EXTENSIONS:
        path = save(tmp_path / f"a{ext}", img if ext != ".pgm" else img[..., 0])
        bitmap = pycolmap.Bitmap.read(str(path), True)
        assert bitmap is not None and (bitmap.width, bitmap.height) == (64, 48), ext


def test_list_images_case_duplicates(tmp_path):
    save(tmp_path / "a.jpg", texture())
    save(tmp_path / "a.JPG", texture(seed=1))
    if len(list(tmp_path.iterdir())) < 2:
        pytest.skip("case-insensitive file system")
    skipped = {}
    assert list_images(tmp_path, skipped=skipped) == ["a.JPG"]
    assert "a.jpg" in skipped and "letter case" in skipped["a.jpg"]
    with pytest.raises(CdSfmError, match="a.jpg: same name as a.JPG"):
        list_images(tmp_path, on_duplicate="error")
    assert list_images(tmp_path, on_duplicate="keep") == ["a.JPG", "a.jpg"]


def test_natural_key():
    assert sorted(["f10.jpg", "f2.jpg", "f1.jpg"], key=natural_key) == ["f1.jpg", "f2.jpg", "f10.jpg"]


# ---------------------------------------------------------------------------------------------------------------------
# reading


def test_exif_orientation(tmp_path):
    # stored 64 wide x 32 high: left half dark, right half bright; Orientation 6 = display rotated 90 deg clockwise
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:, 32:] = 230
    stored[:4, :4] = 120  # marks the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F], exif[0x0110] = "Acme", "Cam 1"
    path = save(tmp_path / "rot.jpg", stored, exif=exif.tobytes(), quality=95)

    img, scale = read_image(path)
    assert scale == 1.0 and img.shape == (64, 32, 3) and img.dtype == np.uint8
    expected = np.rot90(stored, k=-1)  # clockwise
    assert np.abs(img.astype(int) - expected.astype(int)).mean() < 4
    assert img[:30].mean() < 30 and img[34:].mean() > 200  # the dark half is on top after rotating
    gray, _ = read_image(path, grayscale=True)
    assert gray.shape == (64, 32)

    info = image_info(path)
    assert (info.width, info.height, info.orientation) == (32, 64, 6)
    assert (info.make, info.model, info.focal_px) == ("Acme", "Cam 1", None)


def test_16bit_png(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 50).astype(np.uint16), (20, 1))
    path = tmp_path / "deep.png"
    cv2.imwrite(str(path), ramp)
    img, _ = read_image(path, grayscale=True)
    assert img.dtype == np.uint8 and img.shape == (20, 50)
    np.testing.assert_allclose(img[0].astype(float), ramp[0] / 257.0, atol=1)
    rgb, _ = read_image(path)
    assert rgb.shape == (20, 50, 3) and np.array_equal(rgb[..., 1], img)
    # 16-bit colour (Pillow cannot keep 48-bit RGB; whichever decoder handles it, values stay in range)
    col = np.dstack([ramp, ramp // 2, 65535 - ramp])
    cv2.imwrite(str(tmp_path / "deep_rgb.png"), col)
    rgb, _ = read_image(tmp_path / "deep_rgb.png")
    assert rgb.shape == (20, 50, 3) and rgb.dtype == np.uint8
    assert rgb[0, -1, 2] >= 250 and rgb[0, -1, 0] <= 5  # RGB order: cv2 wrote BGR = (ramp, ramp/2, 65535-ramp)
    assert image_info(tmp_path / "deep.png").width == 50


def test_rgba_palette_grayscale(tmp_path):
    rgb = texture()
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])
    img, _ = read_image(save(tmp_path / "a.png", rgba))
    assert img.shape == rgb.shape and np.array_equal(img, rgb)  # alpha dropped, colour kept
    g, _ = read_image(tmp_path / "a.png", grayscale=True)
    assert np.array_equal(g, cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))

    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.save(tmp_path / "p.png")
    img, _ = read_image(tmp_path / "p.png")
    assert img.shape == rgb.shape and np.array_equal(img, np.asarray(pal.convert("RGB")))

    save(tmp_path / "la.png", np.dstack([rgb[..., 0], rgb[..., 1]]))  # LA
    g, _ = read_image(tmp_path / "la.png", grayscale=True)
    assert np.array_equal(g, rgb[..., 0])
    for ext in ("pgm", "ppm", "bmp", "tif"):
        p = tmp_path / f"x.{ext}"
        cv2.imwrite(str(p), rgb[..., 0] if ext == "pgm" else rgb[..., ::-1])
        img, _ = read_image(p)
        assert img.shape == rgb.shape
        if ext != "pgm":
            assert np.array_equal(img, rgb)


def test_large_jpegs_are_decoded_at_a_reduced_scale(tmp_path, monkeypatch):
    from PIL import JpegImagePlugin

    from cd_sfm.images import read_image_sized

    img = cv2.resize(texture(150, 200, seed=3), (2000, 1500), interpolation=cv2.INTER_CUBIC)
    path = save(tmp_path / "big.jpg", img, quality=95)
    rotated = tmp_path / "rot.jpg"  # stored 2000 x 1500, upright 1500 x 2000 (EXIF orientation 6)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(img).save(rotated, quality=95, exif=exif)
    drafts = []
    real = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, mode, size: drafts.append(size) or real(self, mode, size))
    gray, original = read_image_sized(path, grayscale=True, max_size=400)
    assert gray.shape == (300, 400) and original == (2000, 1500) and drafts == [(400, 300)]
    full = cv2.resize(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), (400, 300), interpolation=cv2.INTER_AREA)
    assert np.abs(gray.astype(float) - full).mean() < 1.5  # the DCT's quarter scale, then the same area resize
    up, original = read_image_sized(rotated, max_size=400)
    assert up.shape == (400, 300, 3) and original == (1500, 2000) and drafts[-1] == (400, 300)
    want = np.rot90(cv2.resize(img, (400, 300), interpolation=cv2.INTER_AREA), k=-1)  # orientation 6: 90 deg clockwise
    assert np.abs(up.astype(float) - want).mean() < 3
    drafts.clear()
    read_image_sized(path, max_size=1200)  # less than twice: decoded whole
    read_image_sized(path, grayscale=True)  # luma only, whole
    read_image_sized(path)
    assert drafts == [(2000, 1500), (2000, 1500)]
    assert read_image(path, max_size=400)[1] == pytest.approx(0.2)


def test_resize_max(tmp_path):
    path = save(tmp_path / "big.png", texture(300, 400))
    img, scale = read_image(path, max_size=200)
    assert img.shape == (150, 200, 3) and scale == pytest.approx(0.5)
    img, scale = read_image(path, max_size=1000)  # never upscales
    assert img.shape == (300, 400, 3) and scale == 1.0


def test_corrupt_and_truncated(tmp_path):
    path = save(tmp_path / "t.jpg", texture(200, 200), quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CdSfmError, match=r"t\.jpg: cannot read image \("):
        read_image(path)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not a PNG file at all" * 10)
    with pytest.raises(CdSfmError, match=r"junk\.png: cannot read image"):
        read_image(junk)
    with pytest.raises(CdSfmError, match=r"junk\.png: cannot read image"):
        image_info(junk)
    with pytest.raises(CdSfmError, match="not found"):
        read_image(tmp_path / "nope.jpg")


def test_image_info_focal(tmp_path):
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0xA405] = 35  # FocalLengthIn35mmFilm
    exif.get_ifd(0x8769)[0x920A] = 4.0  # FocalLength (mm), ignored when the 35 mm value exists
    info = image_info(save(tmp_path / "f35.jpg", texture(40, 60), exif=exif.tobytes()))
    assert (info.width, info.height) == (60, 40)
    assert info.focal_px == pytest.approx(60.0) and info.focal_source == "35mm"

    exif = Image.Exif()
    sub = exif.get_ifd(0x8769)
    sub[0x920A] = 5.0  # mm
    sub[0xA20E] = 20.0  # pixels per unit
    sub[0xA210] = 4  # unit: mm
    info = image_info(save(tmp_path / "fp.jpg", texture(40, 60), exif=exif.tobytes()))
    assert info.focal_px == pytest.approx(100.0) and info.focal_source == "focal_plane"

    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x920A] = 6.0
    path = save(tmp_path / "fmm.jpg", texture(40, 60), exif=exif.tobytes())
    assert image_info(path).focal_px is None and image_info(path).focal_mm == pytest.approx(6.0)
    assert image_info(path, sensor_width_mm=6.0).focal_px == pytest.approx(60.0)

    exif = Image.Exif()
    exif.get_ifd(0x8769)[0xA405] = 10000  # implausible: ignored
    assert image_info(save(tmp_path / "bad.jpg", texture(40, 60), exif=exif.tobytes())).focal_px is None
