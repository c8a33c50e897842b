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
import errno
import fcntl
import json
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


_FULL_WORDS = ("no space left", "disk is full", "disk quota", "file too large")


def _disk_full(e: BaseException, path: Path) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    if any(w in str(e).lower() for w in _FULL_WORDS):
        return True
    try:  # libraries that only say "write failed" (SQLite through pycolmap): look at the disk itself
        folder = next(p for p in [path, *path.parents] if p.exists())
        return shutil.disk_usage(folder).free < (1 << 20)
    except (OSError, StopIteration):
        return False


@contextlib.contextmanager
def writing(path: str | Path):
    """Turn a write that fails for want of disk space into one line naming the file; what is already complete on
    disk stays (writes are atomic), so rerunning after freeing space resumes."""
    try:
        yield
    except CdSfmError:
        raise
    except (OSError, RuntimeError) as e:
        if _disk_full(e, Path(path)):
            raise CdSfmError(f"{path}: disk full, cannot write it; free some space and rerun the same command "
                             f"(finished work is kept)") from None
        raise


# --------------------------------------------------------------------------------------------------------------------
# pair names (hloc convention)


def names_to_pair(name0: str, name1: str, separator: str = "/") -> str:
    """hloc's pair key: the two names with their ``/`` replaced by ``-``, joined by ``/``."""
    return separator.join((name0.replace("/", "-"), name1.replace("/", "-")))


def names_to_pair_old(name0: str, name1: str) -> str:
    return names_to_pair(name0, name1, separator="_")


def check_pair_names(names: Iterable[str], root: str | Path | None = None) -> None:
    """Refuse, before any work, image names that pair lists and pair keys cannot hold: white space (pair files are
    ``name0 name1`` lines, split on spaces by hloc and by COLMAP's own reader), and two names that differ only by
    ``/`` against ``-`` (hloc's pair key replaces ``/`` by ``-``, so their matches would be shared). One line naming
    the image(s)."""
    where = (lambda n: Path(root) / n) if root is not None else (lambda n: n)
    seen: dict[str, str] = {}
    for n in names:
        if any(c.isspace() for c in n):
            raise CdSfmError(f"{where(n)}: image names with white space cannot be written in pair lists (hloc and "
                             f"COLMAP split them on spaces); rename the file(s), e.g. spaces to _")
        key = n.replace("/", "-")
        if key in seen and seen[key] != n:
            raise CdSfmError(f"{where(n)}: its name and {seen[key]!r} differ only by '/' and '-', so their pair keys "
                             f"(hloc's, '/' written as '-') collide; rename one of them")
        seen[key] = n


def find_pair(hfile: h5py.File, name0: str, name1: str) -> tuple[str, bool]:
    """Return (key, reversed) of the pair in an open matches file, trying both orders and the old separator."""
    for a, b, rev in ((name0, name1, False), (name1, name0, True)):
        for key in (names_to_pair(a, b), names_to_pair_old(a, b)):
            if key in hfile:
                return key, rev
    raise KeyError(f"pair ({name0}, {name1}) not found in {hfile.filename}")


def pair_lines(path: str | Path) -> list[tuple[int, str, str]]:
    """The pairs of a pair list as (line number, name0, name1): one ``name0 name1`` per line (more columns, e.g. a
    retrieval score, are ignored); blank lines and ``#`` comments are skipped. One line for a missing, unreadable or
    malformed file."""
    path = Path(path)
    if not path.is_file():
        raise CdSfmError(f"{path}: pair file not found")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CdSfmError(f"{path}: cannot read pair file ({e})") from e
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 2:
            raise CdSfmError(f"{path}:{i}: expected two image names, got {line!r}")
        out.append((i, parts[0], parts[1]))
    return out


def parse_pairs(path: str | Path) -> list[tuple[str, str]]:
    """Read a pair list: one ``name0 name1`` per line; blank lines and ``#`` comments are ignored."""
    return [(a, b) for _, a, b in pair_lines(path)]


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
    with writing(path):
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
        with open(path, "rb") as f:
            magic = f.read(6)
        if not magic.startswith((b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY")):  # numpy would call it pickled
            raise CdSfmError(f"{path}: not a readable {kind} (not an .npz archive)")
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


MAX_KEYPOINTS = 1 << 21  # per image: far above any extractor's cap; a crafted file declaring more is refused
MAX_DESCRIPTOR_DIM = 4096


def _numeric(ds) -> bool:
    return isinstance(ds, h5py.Dataset) and ds.dtype.kind in "fiu"


def check_feature_entry(grp, name: str, path: str | Path, need_descriptors: bool = False) -> int:
    """Check one image's feature group (shapes and dtypes, read from the header only, before any data is read);
    returns its number of keypoints. A crafted or damaged entry is a one-line ``CdSfmError`` naming the file and the
    image: missing datasets, wrong ranks or dtypes (e.g. strings), counts that disagree, or declared sizes beyond
    :data:`MAX_KEYPOINTS` / :data:`MAX_DESCRIPTOR_DIM` (so a declared shape never makes us allocate)."""
    def bad(why):
        return CdSfmError(f"{path}: features of {name}: {why}")

    if not isinstance(grp, h5py.Group):
        raise bad("not a group of datasets")
    for k in ("keypoints", "image_size") + (("descriptors",) if need_descriptors else ()):
        if k not in grp:
            raise bad(f"no '{k}' dataset")
    kp = grp["keypoints"]
    if not _numeric(kp) or kp.ndim != 2 or kp.shape[1] != 2:
        raise bad(f"keypoints must be a numeric (N, 2) array, not {getattr(kp, 'dtype', '?')} {getattr(kp, 'shape', '')}")
    n = int(kp.shape[0])
    if n > MAX_KEYPOINTS:
        raise bad(f"declares {n} keypoints (more than {MAX_KEYPOINTS})")
    size = grp["image_size"]
    if not _numeric(size) or size.shape != (2,):
        raise bad("image_size must be 2 numbers (width, height)")
    if "descriptors" in grp:
        d = grp["descriptors"]
        if not _numeric(d) or d.ndim != 2:
            raise bad(f"descriptors must be a numeric (D, N) array, not {getattr(d, 'dtype', '?')} "
                      f"{getattr(d, 'shape', '')}")
        if d.shape[1] != n or not 0 < d.shape[0] <= MAX_DESCRIPTOR_DIM:
            raise bad(f"descriptors have shape {d.shape}, expected (D, {n}) with D <= {MAX_DESCRIPTOR_DIM}")
    for k in ("scores", "scales", "orientations"):
        if k in grp and (not _numeric(grp[k]) or grp[k].shape != (n,)):
            raise bad(f"{k} must be {n} numbers, not {getattr(grp[k], 'dtype', '?')} {getattr(grp[k], 'shape', '')}")
    return n


def check_matches_entry(grp, key: str, path: str | Path, n0: int, n1: int) -> None:
    """Check a pair's ``matches0`` against the keypoint counts of its images (``n0`` entries, indices in
    ``[-1, n1)``) before it reaches COLMAP, where an out-of-range index crashes the process; one line naming the
    pair."""
    if not isinstance(grp, h5py.Group) or "matches0" not in grp:
        raise CdSfmError(f"{path}: pair {key}: no 'matches0' dataset")
    m = grp["matches0"]
    if not isinstance(m, h5py.Dataset) or m.dtype.kind not in "iu" or m.shape != (n0,):
        raise CdSfmError(f"{path}: pair {key}: matches0 has {getattr(m, 'dtype', '?')} {getattr(m, 'shape', '')}, "
                         f"expected {n0} integers (one per keypoint of the first image); features and matches do "
                         f"not fit (rerun with --overwrite)")
    if n0:
        v = m[()]
        lo, hi = int(v.min()), int(v.max())
        if lo < -1 or hi >= n1:
            raise CdSfmError(f"{path}: pair {key}: match index {hi if hi >= n1 else lo} out of range for {n1} "
                             f"keypoints of the second image; features and matches do not fit (rerun with "
                             f"--overwrite)")


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
# one run per output folder

LOCK_FILE = ".cd-sfm.lock"
_HELD_LOCKS: dict[str, list] = {}  # resolved folder -> [open lock file, depth]: the lock is re-entrant per process


@contextlib.contextmanager
def output_lock(out_dir: str | Path) -> Iterator[None]:
    """Hold the exclusive lock of an output folder (``<out>/.cd-sfm.lock``, ``flock``): a second run into the same
    folder stops at once with one line naming the pid that holds it, instead of the two deleting each other's
    temporary files or mixing their settings. The kernel drops the lock when the holder dies (even by SIGKILL), so a
    killed run never leaves the folder locked. Nested use in one process (the pipeline calling its stages) is
    allowed."""
    out_dir = Path(out_dir)
    key = str(out_dir.resolve())
    held = _HELD_LOCKS.get(key)
    if held is not None:
        held[1] += 1
        try:
            yield
        finally:
            held[1] -= 1
        return
    path = out_dir / LOCK_FILE
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")
    except OSError as e:
        raise CdSfmError(f"{out_dir}: cannot use it as the output folder ({e.strerror or e})") from None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.seek(0)
        who = f.read().strip() or "unknown"
        f.close()
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise CdSfmError(f"{out_dir}: in use by another cd-sfm run ({who}); wait for it to finish or use another "
                             f"output folder") from None
        raise
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    _HELD_LOCKS[key] = [f, 1]
    try:
        yield
    finally:
        del _HELD_LOCKS[key]
        f.close()  # releases the flock


# --------------------------------------------------------------------------------------------------------------------
# crash-safe appending


ATTRS_KEY = "__attrs__"  # in an entry's data dict: attributes of its group (e.g. the source image's size and time)


def _write_group(f: h5py.File, name: str, data: dict[str, np.ndarray]) -> None:
    if name in f:
        del f[name]
    grp = f.create_group(name)
    for k, v in data.items():
        if k == ATTRS_KEY:
            grp.attrs.update(v)
        else:
            grp.create_dataset(k, data=np.asarray(v))


SETTINGS_ATTR = "cd_sfm_settings"


def file_settings(path: str | Path) -> dict | None:
    """The settings an h5 file of ours was made with (its ``cd_sfm_settings`` attribute, JSON), from the file or,
    when a killed run left only part files, from its first part; None when unknown (older files)."""
    path = Path(path)
    for p in ([path] if path.exists() else []) + sorted(_parts_dir(path).glob("part-*.h5")):
        try:
            with h5py.File(p, "r") as f:
                text = f.attrs.get(SETTINGS_ATTR)
        except OSError:
            continue
        if text is not None:
            try:
                return json.loads(text)
            except (TypeError, ValueError):
                raise CdSfmError(f"{p}: unreadable {SETTINGS_ATTR} attribute") from None
    return None


def check_file_settings(path: str | Path, settings: dict, what: str) -> None:
    """Refuse to add to an h5 file made with other settings (one line naming what differs)."""
    old = file_settings(path)
    if old is None:
        return
    new = json.loads(json.dumps(settings))
    if old != new:
        diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        raise CdSfmError(f"{path}: {what} made with other settings ({'; '.join(diff[:3])}); use another output "
                         f"folder or --overwrite")


def feature_version(attrs: dict) -> str:
    """Which version of an image (and of its feature mask) a feature entry was made from, from its attributes (the
    file's size and modification time, and its mask's; "" for entries written before these were recorded). What is
    computed from features (matches, global descriptors) records it, and is made again when it changes."""
    v = f"{attrs['source_size']}:{attrs['source_mtime_ns']}" if "source_size" in attrs else ""
    return v + (f":mask{attrs['mask_size']}:{attrs['mask_mtime_ns']}" if "mask_size" in attrs else "")


def entry_attrs(path: str | Path, names: Iterable[str]) -> dict[str, dict]:
    """Group attributes of the given entries of an h5 file and of its part files (later parts win)."""
    path = Path(path)
    names = list(names)
    out: dict[str, dict] = {}
    for p in ([path] if path.exists() else []) + sorted(_parts_dir(path).glob("part-*.h5")):
        try:
            with h5py.File(p, "r", libver="latest") as f:
                for n in names:
                    if n in f and isinstance(f[n], h5py.Group):
                        out[n] = dict(f[n].attrs)
        except OSError:
            continue
    return out


class H5Appender:
    """Add entries to an hloc-style h5 file without ever leaving a half-written entry.

    ``add(name, data)`` buffers the entry; every ``flush_every`` entries or ``flush_seconds`` the buffer goes to a
    new part file (written under a temporary name, then renamed). ``close()`` (or leaving the ``with`` block without
    an exception) merges all parts into the main file through a copy that is renamed over it. Parts left by a killed
    run are merged by the next one.
    """

    def __init__(self, path: str | Path, flush_every: int = 32, flush_seconds: float = 5.0, overwrite: bool = False,
                 settings: dict | None = None):
        self.path = Path(path)
        self.parts = _parts_dir(self.path)
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self.overwrite = overwrite
        self.settings = None if settings is None else json.dumps(settings, sort_keys=True)
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
        with writing(self.path):
            self._flush()

    def _flush(self) -> None:
        self.parts.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.parts, prefix=".part-", suffix=".tmp")
        os.close(fd)
        try:
            with h5py.File(tmp, "w", libver="latest") as f:
                if self.settings is not None:
                    f.attrs[SETTINGS_ATTR] = self.settings
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
        merge_parts(self.path, settings=self.settings)

    def close(self) -> None:
        self.flush()
        self.merge()


def merge_parts(path: str | Path, settings: str | None = None) -> int:
    """Merge completed part files into ``path`` atomically; returns the number of entries merged. The merged file
    keeps the settings attribute of the parts (or ``settings``, a JSON string, when given)."""
    path = Path(path)
    with writing(path):
        return _merge_parts(path, settings)


def _merge_parts(path: Path, settings: str | None) -> int:
    parts_dir = _parts_dir(path)
    parts = sorted(parts_dir.glob("part-*.h5")) if parts_dir.exists() else []
    if not parts:
        if settings is not None and path.exists():
            with h5py.File(path, "r") as f:
                stamped = f.attrs.get(SETTINGS_ATTR) == settings
            if not stamped:  # e.g. an older file reused: stamp it (through a copy, atomically)
                _stamp(path, settings)
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
                    if SETTINGS_ATTR in src.attrs and settings is None:
                        settings = src.attrs[SETTINGS_ATTR]
                    for name in list_h5_names(part):
                        if name in out:
                            del out[name]
                        parent, _, _ = name.rpartition("/")
                        if parent:
                            out.require_group(parent)
                        src.copy(src[name], out, name=name)
                        n += 1
            if settings is not None:
                out.attrs[SETTINGS_ATTR] = settings
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


def _stamp(path: Path, settings: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "a") as f:
            f.attrs[SETTINGS_ATTR] = settings
        os.chmod(tmp, os.stat(path).st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
