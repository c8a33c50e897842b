"""On-disk formats shared by the stages: hloc-compatible HDF5 feature and match files, pair lists.

Layout (as hloc's ``utils/io.py``):

* ``features.h5``: one group per image name (names may contain ``/``; h5py then nests groups), holding
  ``keypoints`` (N, 2) float32 in OpenCV pixel convention (centre of the top-left pixel is (0, 0)),
  ``descriptors`` (D, N) float16 by default, ``scores`` (N,) float32, ``image_size`` (2,) [width, height],
  and our extras ``scales`` (N,) float32 (OpenCV ``KeyPoint.size``) and ``orientations`` (N,) float32 (radians).
* ``matches.h5``: one group per pair key ``names_to_pair(a, b)`` holding ``matches0`` (N0,) int32 (-1 = unmatched)
  and ``matching_scores0`` (N0,) float16.
* ``pairs.txt``: ``name0 name1`` per line.

Crash safety: HDF5 files are not crash-consistent, so new entries are first written in small *part* files
(``<file>.parts/part-*.h5``), each created under a temporary name and renamed into place once complete. A part is
therefore either absent or whole. ``H5Appender.close()`` merges the parts into the main file through a temporary copy
that is renamed over it, then removes the parts. A run killed at any moment loses at most the entries of the part
being written; the next run reads the completed names from the main file and the parts, and goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

import h5py
import numpy as np

logger = logging.getLogger(__name__)

FEATURE_KEYS = ("keypoints", "descriptors", "scores", "image_size", "scales", "orientations")


class CdSfmError(Exception):
    """An error caused by the user's input; the CLI prints its message as one line and exits non-zero."""


# --------------------------------------------------------------------------------------------------------------------
# pair names (hloc convention)


def names_to_pair(name0: str, name1: str, separator: str = "/") -> str:
    """hloc's pair key: the two names with their ``/`` replaced by ``-``, joined by ``/``."""
    return separator.join((name0.replace("/", "-"), name1.replace("/", "-")))


def names_to_pair_old(name0: str, name1: str) -> str:
    return names_to_pair(name0, name1, separator="_")


def find_pair(hfile: h5py.File, name0: str, name1: str) -> tuple[str, bool]:
    """Return (key, reversed) of the pair in an open matches file, trying both orders and the old separator."""
    for a, b, rev in ((name0, name1, False), (name1, name0, True)):
        for key in (names_to_pair(a, b), names_to_pair_old(a, b)):
            if key in hfile:
                return key, rev
    raise KeyError(f"pair ({name0}, {name1}) not found in {hfile.filename}")


def parse_pairs(path: str | Path) -> list[tuple[str, str]]:
    """Read a pair list: one ``name0 name1`` per line; blank lines and ``#`` comments are ignored."""
    path = Path(path)
    if not path.exists():
        raise CdSfmError(f"{path}: pair file not found")
    pairs = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 2:
            raise CdSfmError(f"{path}:{i}: expected two image names, got {line!r}")
        pairs.append((parts[0], parts[1]))
    return pairs


def write_pairs(path: str | Path, pairs: Iterable[tuple[str, str]]) -> None:
    text = "".join(f"{a} {b}\n" for a, b in pairs)
    atomic_write_text(path, text)


def _default_mode() -> int:
    """Permissions of a new file under the current umask (mkstemp's temporaries are 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------------------------------
# listing and reading


def hash_file(h, path: str | Path):
    """Feed the bytes of ``path`` to the hashlib object ``h`` in 1 MiB blocks; returns ``h``."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h


@contextlib.contextmanager
def open_h5(path: str | Path, keys: Iterable[str], kind: str, missing: str) -> Iterator[h5py.File]:
    """An HDF5 input opened for reading, with one-line errors: ``"<path>: <missing>"`` when there is no such file,
    ``"<path>: not a <kind> (no '<key>')"`` when one of ``keys`` is absent, ``"<path>: cannot read it (...)"`` when
    HDF5 cannot open it."""
    path = Path(path)
    if not path.is_file():
        raise CdSfmError(f"{path}: {missing}")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CdSfmError(f"{path}: cannot read it ({e})") from e
    with f:
        for k in keys:
            if k not in f:
                raise CdSfmError(f"{path}: not a {kind} (no '{k}')")
        yield f


def read_npz(path: str | Path, kind: str = "weights file") -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, never unpickling: a file holding Python objects, or one that is not a
    readable npz, is a one-line ``CdSfmError`` naming it."""
    import zipfile

    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise ValueError("a single .npy array, not an .npz archive")
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise CdSfmError(f"{path}: {kind} not found") from None
    except ValueError as e:
        why = "holds pickled Python objects, which are never loaded" if "pickle" in str(e) else str(e).splitlines()[0]
        raise CdSfmError(f"{path}: not a {kind} ({why})") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise CdSfmError(f"{path}: not a readable {kind} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None


def require_h5_path(path: str | Path) -> None:
    """One-line error unless ``path`` names an HDF5 file (``.h5`` / ``.hdf5``): guards output arguments."""
    if not str(path).endswith((".h5", ".hdf5")):
        raise CdSfmError(f"{path}: the output must be an .h5 file")


def list_h5_names(path: str | Path) -> list[str]:
    """Names of the complete entries (groups holding datasets) in an h5 file, e.g. image names or pair keys."""
    names: list[str] = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            names.append(name.rsplit("/", 1)[0])

    with h5py.File(path, "r", libver="latest") as f:
        f.visititems(visit)
    return sorted(set(names))


def _parts_dir(path: Path) -> Path:
    return path.with_name(path.name + ".parts")


def completed_names(path: str | Path) -> set[str]:
    """Entries already in ``path`` or in its completed part files (what a resumed run can skip)."""
    path = Path(path)
    done: set[str] = set()
    if path.exists():
        try:
            done.update(list_h5_names(path))
        except OSError as e:
            raise CdSfmError(f"{path}: unreadable HDF5 file ({e}); remove it to start this stage again") from e
    for part in sorted(_parts_dir(path).glob("part-*.h5")):
        try:
            done.update(list_h5_names(part))
        except OSError:
            logger.warning("Ignoring unreadable part file %s", part)
    return done


def read_features(path: str | Path, name: str, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Read one image's features. Descriptors come back as (N, D) float32 (transposed from the stored (D, N))."""
    with h5py.File(path, "r", libver="latest") as f:
        if name not in f:
            raise KeyError(f"{name} not in {path}")
        grp = f[name]
        out = {}
        for k in keys or grp.keys():
            if k not in grp:
                continue
            arr = grp[k].__array__()
            if k == "descriptors":
                arr = arr.T.astype(np.float32)
            out[k] = arr
    return out


def read_matches(path: str | Path, name0: str, name1: str) -> tuple[np.ndarray, np.ndarray]:
    """Matches of a pair as an (M, 2) int array of keypoint indices (into name0's and name1's keypoints) and scores."""
    with h5py.File(path, "r", libver="latest") as f:
        key, rev = find_pair(f, name0, name1)
        m0 = f[key]["matches0"].__array__()
        s0 = f[key]["matching_scores0"].__array__().astype(np.float32) if "matching_scores0" in f[key] else None
    idx = np.where(m0 != -1)[0]
    matches = np.stack([idx, m0[idx]], -1).astype(np.int64)
    scores = s0[idx] if s0 is not None else np.ones(len(idx), np.float32)
    if rev:
        matches = np.flip(matches, -1)
    return matches, scores


# --------------------------------------------------------------------------------------------------------------------
# crash-safe appending


def _write_group(f: h5py.File, name: str, data: dict[str, np.ndarray]) -> None:
    if name in f:
        del f[name]
    grp = f.create_group(name)
    for k, v in data.items():
        grp.create_dataset(k, data=np.asarray(v))


class H5Appender:
    """Add entries to an hloc-style h5 file without ever leaving a half-written entry.

    ``add(name, data)`` buffers the entry; every ``flush_every`` entries or ``flush_seconds`` the buffer goes to a
    new part file (written under a temporary name, then renamed). ``close()`` (or leaving the ``with`` block without
    an exception) merges all parts into the main file through a copy that is renamed over it. Parts left by a killed
    run are merged by the next one.
    """

    def __init__(self, path: str | Path, flush_every: int = 32, flush_seconds: float = 60.0, overwrite: bool = False):
        self.path = Path(path)
        self.parts = _parts_dir(self.path)
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self.overwrite = overwrite
        self._buffer: dict[str, dict[str, np.ndarray]] = {}
        self._last_flush = time.monotonic()
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> "H5Appender":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # on error, keep what is complete in part files but do not spend time merging
        self.flush()
        if exc_type is None:
            self.merge()

    def add(self, name: str, data: dict[str, np.ndarray]) -> None:
        self._buffer[name] = data
        if len(self._buffer) >= self.flush_every or time.monotonic() - self._last_flush > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        self.parts.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.parts, prefix=".part-", suffix=".tmp")
        os.close(fd)
        try:
            with h5py.File(tmp, "w", libver="latest") as f:
                for name, data in self._buffer.items():
                    _write_group(f, name, data)
            final = self.parts / f"part-{time.time_ns():020d}-{os.getpid()}.h5"
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._buffer.clear()
        self._last_flush = time.monotonic()

    def merge(self) -> None:
        merge_parts(self.path)

    def close(self) -> None:
        self.flush()
        self.merge()


def merge_parts(path: str | Path) -> int:
    """Merge completed part files into ``path`` atomically; returns the number of entries merged."""
    path = Path(path)
    parts_dir = _parts_dir(path)
    parts = sorted(parts_dir.glob("part-*.h5")) if parts_dir.exists() else []
    if not parts:
        return 0
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    n = 0
    try:
        if path.exists():
            shutil.copyfile(path, tmp)
            mode = "a"
        else:
            mode = "w"
        with h5py.File(tmp, mode, libver="latest") as out:
            for part in parts:
                try:
                    src = h5py.File(part, "r", libver="latest")
                except OSError:
                    logger.warning("Skipping unreadable part file %s", part)
                    continue
                with src:
                    for name in list_h5_names(part):
                        if name in out:
                            del out[name]
                        parent, _, _ = name.rpartition("/")
                        if parent:
                            out.require_group(parent)
                        src.copy(src[name], out, name=name)
                        n += 1
        os.chmod(tmp, _default_mode() if mode == "w" else os.stat(path).st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for part in parts:
        part.unlink(missing_ok=True)
    for stale in parts_dir.glob(".part-*.tmp"):
        stale.unlink(missing_ok=True)
    try:
        parts_dir.rmdir()
    except OSError:
        pass
    return n


def iter_h5_groups(path: str | Path) -> Iterator[tuple[str, h5py.Group]]:
    with h5py.File(path, "r", libver="latest") as f:
        for name in list_h5_names(path):
            yield name, f[name]


def features_to_h5(feats: dict[str, np.ndarray], descriptor_dtype: str = "float16") -> dict[str, np.ndarray]:
    """Convert a backend's output (descriptors (N, D)) to the stored layout (descriptors (D, N), dtypes fixed)."""
    out = {
        "keypoints": np.asarray(feats["keypoints"], np.float32).reshape(-1, 2),
        "descriptors": np.ascontiguousarray(np.asarray(feats["descriptors"]).T).astype(descriptor_dtype),
        "scores": np.asarray(feats["scores"], np.float32),
        "image_size": np.asarray(feats["image_size"], np.int32),
    }
    for k in ("scales", "orientations"):
        if k in feats:
            out[k] = np.asarray(feats[k], np.float32)
    for k, v in feats.items():
        if k not in out:
            out[k] = np.asarray(v)
    return out
