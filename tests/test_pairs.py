import numpy as np
import pytest

from cd_sfm.io import CdSfmError, parse_pairs
from cd_sfm.pairs import exhaustive, from_file, sequential, unique_pairs


def test_exhaustive(tmp_path):
    names = [f"img{i}.jpg" for i in range(6)]
    pairs = exhaustive.main(names, tmp_path / "pairs.txt")
    assert len(pairs) == 15 and len({frozenset(p) for p in pairs}) == 15
    assert all(names.index(a) < names.index(b) for a, b in pairs)
    assert parse_pairs(tmp_path / "pairs.txt") == pairs
    assert exhaustive.main(["a.jpg"]) == []
    q = exhaustive.main(["q1", "q2"], names_ref=["r1", "r2", "q1"])
    assert q == [("q1", "r1"), ("q1", "r2"), ("q2", "r1"), ("q2", "r2"), ("q2", "q1")]


def test_unique_pairs():
    assert unique_pairs([("a", "b"), ("b", "a"), ("a", "a"), ("b", "c"), ("a", "b")]) == [("a", "b"), ("b", "c")]


def test_from_file(tmp_path):
    names = ["a.jpg", "b.jpg", "sub/c.jpg"]
    f = tmp_path / "my_pairs.txt"
    f.write_text("# user pairs\na.jpg b.jpg\n\n./sub/c.jpg a.jpg 0.93\nb.jpg a.jpg\nb.jpg b.jpg\nsub\\c.jpg b.jpg\n")
    pairs = from_file.main(f, names, tmp_path / "pairs.txt")
    assert pairs == [("a.jpg", "b.jpg"), ("sub/c.jpg", "a.jpg"), ("sub/c.jpg", "b.jpg")]
    assert parse_pairs(tmp_path / "pairs.txt") == pairs
    assert from_file.main(f) == pairs  # no names: no check

    f.write_text("a.jpg b.jpg\nb.jpg typo.jpg\n")
    with pytest.raises(CdSfmError, match=r"my_pairs\.txt:2: unknown image 'typo\.jpg'"):
        from_file.main(f, names)
    assert from_file.main(f, names, on_unknown="skip") == [("a.jpg", "b.jpg")]

    f.write_text("a.jpg b.jpg\nlonely.jpg\n")
    with pytest.raises(CdSfmError, match=r"my_pairs\.txt:2: expected two image names"):
        from_file.main(f, names)
    with pytest.raises(CdSfmError, match="pair file not found"):
        from_file.main(tmp_path / "none.txt", names)


def test_sequential(tmp_path):
    names = [f"f{i}.jpg" for i in range(12)]  # f10, f11 sort after f9 naturally
    pairs = sequential.main(list(reversed(names)), tmp_path / "pairs.txt", overlap=2)
    assert pairs[:3] == [("f0.jpg", "f1.jpg"), ("f0.jpg", "f2.jpg"), ("f1.jpg", "f2.jpg")]
    assert len(pairs) == 11 + 10 and ("f9.jpg", "f10.jpg") in pairs
    assert parse_pairs(tmp_path / "pairs.txt") == pairs

    loop = sequential.main(names[:5], overlap=2, loop=True)
    assert {frozenset(p) for p in loop} == {frozenset((f"f{i}.jpg", f"f{(i + k) % 5}.jpg"))
                                            for i in range(5) for k in (1, 2)}
    assert len(loop) == 10

    quad = sequential.main(names, overlap=3, quadratic_overlap=True)
    assert ("f0.jpg", "f4.jpg") in quad and ("f0.jpg", "f5.jpg") not in quad

    rig = ["cam0/1.jpg", "cam0/2.jpg", "cam0/3.jpg", "cam1/1.jpg", "cam1/2.jpg"]
    per = sequential.main(rig, overlap=5, per_folder=True)
    assert all(a.split("/")[0] == b.split("/")[0] for a, b in per) and len(per) == 3 + 1
    assert len(sequential.main(rig, overlap=1)) == 4
    with pytest.raises(ValueError):
        sequential.main(names, overlap=0)


def test_auto_pairs_by_size_and_sequence(tmp_path):
    from cd_sfm.pairs import auto

    small = [f"img{i}.jpg" for i in range(10)]
    assert auto.choose(small)[0] == ["exhaustive"]
    frames = [f"video/frame_{i:05d}.png" for i in range(0, 600, 5)]
    assert auto.looks_like_sequence(frames) and auto.choose(frames)[0] == ["retrieval", "sequential"]
    photos = [f"{n}_{h:x}.jpg" for n, h in zip(np.random.default_rng(0).integers(10**6, 10**8, 80), range(80))]
    assert not auto.looks_like_sequence(photos) and auto.choose(photos)[0] == ["retrieval"]
    gaps = [f"IMG_{i:04d}.JPG" for i in list(range(60)) + [5000, 9000]]  # two unrelated shots far off the counter
    assert not auto.numbered_sequence(gaps)


def test_auto_pairs_from_exif_times(tmp_path):
    from PIL import Image

    from cd_sfm.images import capture_time
    from cd_sfm.pairs import auto

    names = []
    for i in range(6):
        exif = Image.Exif()
        exif.get_ifd(0x8769)[0x9003] = f"2024:05:01 10:00:{2 * i:02d}"
        n = f"{'abcdef'[i]}x.jpg"  # names that do not look numbered
        Image.new("RGB", (8, 8)).save(tmp_path / n, exif=exif.tobytes())
        names.append(n)
    assert capture_time(tmp_path / names[1]) - capture_time(tmp_path / names[0]) == 2.0
    assert not auto.numbered_sequence(names) and auto.timed_sequence(tmp_path, names)
