import logging

import cv2
import h5py
import numpy as np
import pytest

from cd_sfm.features import extract
from cd_sfm.features.sift import SiftBackend
from cd_sfm.images import read_image_sized
from cd_sfm.io import CdSfmError, H5Appender, completed_names, list_h5_names, read_features


def scene(h, w, seed):
    rng = np.random.default_rng(seed)
    coarse = cv2.resize(rng.random((h // 8, w // 8)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    fine = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 1.5)
    img = cv2.normalize(coarse + 0.5 * fine, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    return np.dstack([img, 255 - img, img // 2])


@pytest.fixture
def image_dir(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    cv2.imwrite(str(root / "a.jpg"), scene(240, 320, 0))
    cv2.imwrite(str(root / "b.png"), scene(200, 260, 1))
    cv2.imwrite(str(root / "sub" / "c.jpg"), scene(480, 640, 2))  # larger than max_image_size below
    cv2.imwrite(str(root / "d.jpg"), scene(220, 300, 3))
    (root / "readme.txt").write_text("not an image")
    return root


CONF = {"backend": "sift", "options": {"max_keypoints": 300}, "max_image_size": 320, "descriptor_dtype": "float16"}


def test_presets_resolve():
    for name, conf in extract.confs.items():
        full = extract.resolve_conf(name)
        assert full["backend"] == conf["backend"] and full["descriptor_dtype"] == "float16"
    with pytest.raises(CdSfmError, match="unknown feature preset"):
        extract.resolve_conf("nope")
    with pytest.raises(CdSfmError, match="bad options"):
        extract.make_backend({"backend": "sift", "options": {"bogus": 1}})


def test_extract_layout_and_rescale(image_dir, tmp_path):
    out = tmp_path / "out" / "features.h5"
    stats = extract.main(CONF, image_dir, out, progress=False)
    assert stats["extracted"] == 4 and stats["reused"] == 0 and stats["skipped"] == {}
    assert list_h5_names(out) == ["a.jpg", "b.png", "d.jpg", "sub/c.jpg"]
    assert not out.with_name("features.h5.parts").exists()
    with h5py.File(out, "r") as f:
        g = f["sub/c.jpg"]
        n = g["keypoints"].shape[0]
        assert 0 < n <= 300
        assert g["descriptors"].shape == (128, n) and g["descriptors"].dtype == np.float16
        assert g["keypoints"].dtype == np.float32 and g["scores"].shape == (n,)
        assert g["scales"].shape == (n,) and g["orientations"].shape == (n,)
        assert list(g["image_size"][()]) == [640, 480]
    feats = read_features(out, "sub/c.jpg")
    kp = feats["keypoints"]
    # c.jpg was halved to 320 px for the backend; keypoints come back in the original frame
    assert kp[:, 0].max() > 330 and kp[:, 0].max() < 640 and kp[:, 1].max() < 480

    # the same as extracting at the reduced size and mapping back by hand (the JPEG halved in its decoder)
    small, original = read_image_sized(image_dir / "sub" / "c.jpg", grayscale=True, max_size=320)
    assert small.shape == (240, 320) and original == (640, 480)
    ref = SiftBackend({"max_keypoints": 300}).extract(small)
    np.testing.assert_allclose(kp, (ref["keypoints"] + 0.5) * 2 - 0.5, atol=1e-3)
    np.testing.assert_allclose(feats["scales"], ref["scales"] * 2, rtol=1e-6)
    np.testing.assert_allclose(feats["descriptors"], ref["descriptors"], atol=2e-3)  # float16 storage

    # a second run reuses everything
    stats = extract.main(CONF, image_dir, out, progress=False)
    assert stats["extracted"] == 0 and stats["reused"] == 4
    # overwrite: everything again, same result
    stats = extract.main(CONF, image_dir, out, overwrite=True, progress=False)
    assert stats["extracted"] == 4 and stats["reused"] == 0
    np.testing.assert_allclose(read_features(out, "sub/c.jpg")["keypoints"], kp)


def test_unreadable_images_are_skipped(image_dir, tmp_path, caplog):
    data = (image_dir / "a.jpg").read_bytes()
    (image_dir / "broken.jpg").write_bytes(data[: len(data) // 3])
    (image_dir / "junk.png").write_bytes(b"\x00garbage" * 50)
    out = tmp_path / "features.h5"
    with caplog.at_level(logging.WARNING):
        stats = extract.main(CONF, image_dir, out, progress=False)
    assert stats["extracted"] == 4
    assert set(stats["skipped"]) == {"broken.jpg", "junk.png"}
    assert "cannot read image" in stats["skipped"]["broken.jpg"]
    assert "broken.jpg" in caplog.text
    assert "broken.jpg" not in completed_names(out)


def test_image_list(image_dir, tmp_path):
    out = tmp_path / "features.h5"
    lst = tmp_path / "list.txt"
    lst.write_text("sub/c.jpg\n# comment\n\nb.png\nmissing.jpg\n")
    stats = extract.main(CONF, image_dir, out, image_list=lst, progress=False)
    assert stats["extracted"] == 2 and list(stats["skipped"]) == ["missing.jpg"]
    assert list_h5_names(out) == ["b.png", "sub/c.jpg"]


class Crashing(SiftBackend):
    """A backend killed (KeyboardInterrupt, as Ctrl-C) on its n-th image."""

    def __init__(self, n, **kw):
        super().__init__({"max_keypoints": 300}, **kw)
        self.n, self.calls = n, 0

    def extract(self, image):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return super().extract(image)


def test_resume_after_kill(image_dir, tmp_path, caplog):
    out = tmp_path / "features.h5"
    with pytest.raises(KeyboardInterrupt):
        extract.main(CONF, image_dir, out, backend=Crashing(3), progress=False)
    # the two completed images sit in a part file; nothing half-written, no main file merged yet
    parts = list(out.with_name("features.h5.parts").glob("part-*.h5"))
    assert parts and not out.exists()
    assert completed_names(out) == {"a.jpg", "b.png"}

    # a part file of a run killed while writing: only a temporary name, ignored
    (out.with_name("features.h5.parts") / ".part-123.tmp").write_bytes(b"half")

    with caplog.at_level(logging.INFO, logger="cd_sfm.features.extract"):
        stats = extract.main(CONF, image_dir, out, progress=False)
    assert stats["reused"] == 2 and stats["extracted"] == 2
    assert "Reusing the features of 2 image(s)" in caplog.text
    assert list_h5_names(out) == ["a.jpg", "b.png", "d.jpg", "sub/c.jpg"]
    assert not out.with_name("features.h5.parts").exists()

    # killed after the last image was written but before the merge: the next run only merges
    out2 = tmp_path / "f2.h5"
    extract.main(CONF, image_dir, out2, image_list=["a.jpg"], progress=False)
    app = H5Appender(out2)
    app.add("b.png", {"keypoints": np.zeros((0, 2), np.float32)})
    app.flush()  # part written, never merged
    stats = extract.main(CONF, image_dir, out2, image_list=["a.jpg", "b.png"], progress=False)
    assert (stats["extracted"], stats["reused"]) == (0, 2)
    assert list_h5_names(out2) == ["a.jpg", "b.png"]


def test_missing_folder(tmp_path):
    with pytest.raises(CdSfmError, match="image folder not found"):
        extract.main(CONF, tmp_path / "nope", tmp_path / "f.h5")
