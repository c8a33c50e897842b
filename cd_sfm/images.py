"""Image discovery and reading: names as COLMAP gives them, EXIF orientation, any bit depth or channel layout.

* :func:`list_images` walks an image folder (nested folders included) and returns names relative to it with ``/``
  separators, sorted, as COLMAP names images in its database.
* :func:`read_image` decodes one image to uint8 RGB or grayscale, upright (EXIF orientation applied), optionally
  downscaled so that its longest side is at most ``max_size``.
* :func:`image_info` reads only the header: size after EXIF orientation, focal length in pixels when EXIF has one
  (the same rules as COLMAP), camera make and model.

Every problem caused by the input raises :class:`~cd_sfm.io.CdSfmError` with a message ``"<path>: <problem>"``.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .io import CdSfmError

logger = logging.getLogger(__name__)

# the formats both we (Pillow) and COLMAP read (pycolmap's Bitmap, which undistortion, dense stereo and the GUI use)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".ppm", ".pgm")
# formats users have that COLMAP does not read: the log says what to do with them
_CONVERT = "convert them to JPEG or PNG: COLMAP does not read that format"
_DEVELOP = "develop raw photos to JPEG or TIFF"
_UNREADABLE_HINTS = {**dict.fromkeys((".heic", ".heif", ".avif", ".webp", ".jxl"), _CONVERT),
                     **dict.fromkeys((".cr2", ".cr3", ".nef", ".arw", ".dng", ".raf", ".orf", ".rw2"), _DEVELOP)}

# EXIF tags (see the EXIF 2.3 specification)
_TAG_MAKE, _TAG_MODEL, _TAG_ORIENTATION, _TAG_EXIF_IFD = 0x010F, 0x0110, 0x0112, 0x8769
_TAG_FOCAL, _TAG_FOCAL_35MM = 0x920A, 0xA405
_TAG_FP_XRES, _TAG_FP_UNIT = 0xA20E, 0xA210
_TAG_PIXEL_X, _TAG_PIXEL_Y = 0xA002, 0xA003
_TAG_GPS_IFD = 0x8825  # in it: 1 / 2 latitude ref / value, 3 / 4 longitude, 5 / 6 altitude (ref 1: below sea level)
_FP_UNIT_MM = {2: 25.4, 3: 10.0, 4: 1.0, 5: 1e-3}  # FocalPlaneResolutionUnit -> millimetres per unit


# --------------------------------------------------------------------------------------------------------------------
# discovery


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(
    root: str | Path,
    patterns: Iterable[str] | None = None,
    on_duplicate: str = "warn",
    skipped: dict[str, str] | None = None,
) -> list[str]:
    """Names of the images under ``root``, relative to it with ``/`` separators, sorted.

    Nested folders are walked (symbolic links to folders are followed once). Files with an image extension
    (``IMAGE_EXTENSIONS``, any case) are kept; other files and hidden files (``.name``, e.g. macOS ``._x.jpg``) are
    ignored with a debug message. ``patterns`` (glob patterns such as ``"*.jpg"`` or ``"cam0/*"``, matched against
    the relative name) keep only the images that match one of them.

    Names that differ only by case (``a.jpg`` and ``a.JPG``) would collide on case-insensitive file systems and in
    tools that fold case: ``on_duplicate="warn"`` (default) keeps the first in sorted order, logs a warning and records
    the others in ``skipped`` (``{name: reason}``) when given; ``"error"`` raises :class:`CdSfmError`; ``"keep"`` keeps
    them all.

    Raises :class:`CdSfmError` when ``root`` is missing, is not a folder, or holds no image.
    """
    root = Path(root)
    if not root.exists():
        raise CdSfmError(f"{root}: image folder not found")
    if not root.is_dir():
        raise CdSfmError(f"{root}: not a folder")
    patterns = list(patterns) if patterns else None
    names: list[str] = []
    ignored: Counter[str] = Counter()  # by extension
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a link cycle
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        for fn in filenames:
            name = fn if rel_dir == "." else f"{rel_dir}/{fn}"
            if fn.startswith(".") or not is_image_name(fn):
                logger.debug("Ignoring %s: not an image file", root / name)
                if not fn.startswith("."):
                    ignored[Path(fn).suffix.lower() or "(no extension)"] += 1
                continue
            if patterns and not any(fnmatch.fnmatch(name, p) for p in patterns):
                continue
            names.append(name)
    names.sort()
    ignored_text = _ignored_text(ignored)
    if ignored:
        hints = [h for h in dict.fromkeys(_UNREADABLE_HINTS.get(ext) for ext in ignored) if h]
        log = logger.warning if hints else logger.info
        log("Ignored %s in %s%s", ignored_text, root, f" ({'; '.join(hints)})" if hints else "")
    if not names:
        what = f" matching {', '.join(patterns)}" if patterns else ""
        also = f"; ignored {ignored_text}" if ignored else ""
        raise CdSfmError(f"{root}: no images found{what} (looked for {', '.join(IMAGE_EXTENSIONS)}{also})")
    return _check_duplicates(root, names, on_duplicate, skipped)


def _ignored_text(ignored: Counter[str], most: int = 5) -> str:
    """``"3 non-image files (2 .heic, 1 .txt)"``: the commonest extensions first."""
    total = sum(ignored.values())
    kinds = ", ".join(f"{n} {ext}" for ext, n in sorted(ignored.items(), key=lambda kv: (-kv[1], kv[0]))[:most])
    more = ", ..." if len(ignored) > most else ""
    return f"{total} non-image file{'s' if total != 1 else ''} ({kinds}{more})"


def _check_duplicates(root: Path, names: list[str], on_duplicate: str, skipped: dict[str, str] | None) -> list[str]:
    if on_duplicate not in ("warn", "error", "keep"):
        raise ValueError(f"on_duplicate must be warn, error or keep, not {on_duplicate!r}")
    if on_duplicate == "keep":
        return names
    first: dict[str, str] = {}
    kept = []
    for name in names:
        key = name.casefold()
        if key in first:
            msg = f"same name as {first[key]} up to letter case"
            if on_duplicate == "error":
                raise CdSfmError(f"{root / name}: {msg}; rename one of them")
            logger.warning("Skipping %s: %s", root / name, msg)
            if skipped is not None:
                skipped[name] = msg
            continue
        first[key] = name
        kept.append(name)
    return kept


_NUMBERED = re.compile(r"^(.*?)(\d+)(\D*)$")


def numbered_sequence(names: Sequence[str]) -> bool:
    """Whether the names read as frames of one capture: at least 80 % of them are ``<prefix><number><suffix>`` with
    the most common (folder, prefix, suffix), and those numbers, sorted, rise in steps no larger than 10 x their
    median step (no large jumps: one camera's counter, a video's frame index, not unrelated photos' ids). Used for
    the pairs (``pairs: auto``) and the cameras (``camera_mode: auto``)."""
    stems = [Path(n).with_suffix("").as_posix() for n in names]
    parsed = [m.groups() for m in map(_NUMBERED.match, stems) if m]
    if len(parsed) < max(3, 0.8 * len(names)):
        return False
    key, count = Counter((p, s) for p, _, s in parsed).most_common(1)[0]
    if count < 0.8 * len(names):
        return False
    nums = np.sort(np.array([int(d) for p, d, s in parsed if (p, s) == key], np.int64))
    steps = np.diff(nums)
    if len(steps) == 0 or (steps <= 0).any():
        return False
    return bool(steps.max() <= 10 * max(np.median(steps), 1))


def natural_key(name: str) -> list:
    """Sort key that orders embedded numbers numerically (``frame2`` before ``frame10``)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# --------------------------------------------------------------------------------------------------------------------
# reading


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Any pixel array to uint8: 16-bit by /257 (full range kept), 8-bit data in a wider integer container as is,
    floats in [0, 1] by *255, anything else stretched over its range."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    a = arr.astype(np.float32)
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, np.uint8)
    lo, hi = float(a[finite].min()), float(a[finite].max())
    if arr.dtype == np.uint16:
        return np.round(a / 257.0).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer) and lo >= 0:
        if hi <= 255:
            return a.astype(np.uint8)
        if hi <= 65535:
            return np.round(a / 257.0).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating) and lo >= 0 and hi <= 1.0:
        lo, hi = 0.0, 1.0
    a = np.where(finite, a, lo)
    return np.round(np.clip((a - lo) * (255.0 / max(hi - lo, 1e-12)), 0, 255)).astype(np.uint8)


def _pil_to_array(img: Image.Image) -> np.ndarray:
    """A decoded Pillow image to (H, W) or (H, W, 3) uint8 (alpha dropped, palette expanded, 16-bit scaled)."""
    mode = img.mode
    if mode in ("RGB", "L"):
        return np.asarray(img)
    if mode == "1":
        return np.asarray(img.convert("L"))
    if mode in ("LA", "La"):
        return np.asarray(img.getchannel(0))
    if mode.startswith("I") or mode == "F":  # I, I;16, I;16B, I;16L, I;16N, F
        return _to_uint8(np.asarray(img))
    if mode in ("P", "PA"):
        img = img.convert("RGBA" if "transparency" in img.info or mode == "PA" else "RGB")
        mode = img.mode
    if mode in ("RGBA", "RGBa", "RGBX"):
        return np.asarray(img)[..., :3]
    return np.asarray(img.convert("RGB"))  # CMYK, YCbCr, LAB, HSV


def _read_with_opencv(path: Path) -> np.ndarray | None:
    """Fallback decoder for files Pillow cannot identify (e.g. some TIFF compressions, 16-bit colour)."""
    arr = cv2.imread(str(path), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)  # applies EXIF orientation
    if arr is None:
        return None
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB if arr.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return _to_uint8(arr)


def _decode(path: Path, max_size: int | None = None, grayscale: bool = False) -> tuple[np.ndarray, tuple[int, int]]:
    """The image upright as an array, and its full upright size (w, h). JPEGs are decoded by libjpeg the cheap way
    where that is asked for: ``grayscale`` as luma only (no colour conversion; about 4x faster), and with
    ``max_size`` at a reduced scale where the longest side is at least twice that (1/2, 1/4 or 1/8 in the DCT, never
    below the size :func:`read_image` resizes to; about 3x faster again at 48 MP), within a grey level of the whole
    decode resized (``scripts/bench_decode.py``)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if img.format == "JPEG" and (grayscale or max_size):
                    # the stored frame: the reduction is per axis; a size of its own keeps the scale
                    reduce = bool(max_size) and max(w, h) >= 2 * max_size
                    img.draft("L" if grayscale else None, _target_size((w, h), max_size) if reduce else (w, h))
                transposed = img.getexif().get(_TAG_ORIENTATION, 1) in (5, 6, 7, 8)
                img.load()
                img = ImageOps.exif_transpose(img) or img
                return _pil_to_array(img), ((h, w) if transposed else (w, h))
    except FileNotFoundError:
        raise CdSfmError(f"{path}: image file not found") from None
    except IsADirectoryError:
        raise CdSfmError(f"{path}: not a file") from None
    except UnidentifiedImageError as e:
        arr = _read_with_opencv(path)
        if arr is not None:
            return arr, (arr.shape[1], arr.shape[0])
        raise CdSfmError(f"{path}: cannot read image (unknown or corrupt format)") from e
    except Image.DecompressionBombError as e:
        raise CdSfmError(f"{path}: cannot read image (too many pixels: {e})") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated data, broken headers or chunks
        raise CdSfmError(f"{path}: cannot read image ({e})") from e


def _target_size(size: tuple[int, int], max_size: int | None) -> tuple[int, int]:
    """(w, h) of an image of ``size`` with its longest side brought down to ``max_size`` (never up)."""
    w, h = size
    if not max_size or max(w, h) <= max_size:
        return w, h
    scale = max_size / max(w, h)
    return max(1, int(round(w * scale))), max(1, int(round(h * scale)))


def resize_max(image: np.ndarray, max_size: int | None) -> tuple[np.ndarray, float]:
    """Downscale so that the longest side is at most ``max_size`` (area interpolation); never upscales.

    Returns the image and the factor applied (new size / original size, 1.0 when unchanged)."""
    h, w = image.shape[:2]
    if not max_size or max(h, w) <= max_size:
        return image, 1.0
    return cv2.resize(image, _target_size((w, h), max_size), interpolation=cv2.INTER_AREA), max_size / max(h, w)


def read_image(path: str | Path, grayscale: bool = False, max_size: int | None = None) -> tuple[np.ndarray, float]:
    """Read an image upright (EXIF orientation applied) as uint8 (H, W) grayscale or (H, W, 3) RGB.

    Grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit images are all converted. With ``max_size`` the longest
    side is reduced to at most that many pixels. Returns ``(image, scale)`` with ``scale`` the resize factor
    (new / original, 1.0 when not resized); a pixel coordinate ``x`` of the returned image is
    ``(x + 0.5) / scale - 0.5`` in the original (use the exact per-axis size ratio when it matters).

    Raises :class:`CdSfmError` ``"<path>: cannot read image (...)"`` for missing, corrupt or truncated files.
    """
    arr, original = read_image_sized(path, grayscale, max_size)
    if not max_size or max(original) <= max_size:
        return arr, 1.0
    return arr, max_size / max(original)


def read_image_sized(path: str | Path, grayscale: bool = False,
                     max_size: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`read_image`, returning the full upright size (w, h) of the file instead of the factor: the image is
    exactly that size brought down to ``max_size`` (large JPEGs are decoded at a reduced scale first)."""
    path = Path(path)
    arr, original = _decode(path, max_size, grayscale)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or min(arr.shape[:2]) < 1:
        raise CdSfmError(f"{path}: cannot read image (unexpected shape {arr.shape})")
    if grayscale and arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY)
    elif not grayscale and arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    arr = np.ascontiguousarray(arr)
    target = _target_size(original, max_size)
    if (arr.shape[1], arr.shape[0]) != target:
        arr = cv2.resize(arr, target, interpolation=cv2.INTER_AREA)
    return arr, original


_TAG_DATETIME_ORIGINAL, _TAG_SUBSEC_ORIGINAL, _TAG_DATETIME = 0x9003, 0x9291, 0x0132


def capture_time(path: str | Path) -> float | None:
    """EXIF capture time (DateTimeOriginal, else DateTime, with sub-seconds when given) in seconds since the epoch
    (local time as written; only differences matter), or None when absent or unreadable."""
    import datetime as dt

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                exif = img.getexif()
                sub = exif.get_ifd(_TAG_EXIF_IFD)
        text = _as_text(sub.get(_TAG_DATETIME_ORIGINAL)) or _as_text(exif.get(_TAG_DATETIME))
        if not text:
            return None
        t = dt.datetime.strptime(text[:19], "%Y:%m:%d %H:%M:%S").replace(tzinfo=dt.timezone.utc).timestamp()
        frac = _as_text(sub.get(_TAG_SUBSEC_ORIGINAL))
        return t + (float(f"0.{frac}") if frac and frac.isdigit() else 0.0)
    except Exception:  # noqa: BLE001 - no usable time
        return None


def exif_orientation(path: str | Path) -> int:
    """The EXIF Orientation of an image file (1..8; 1 when absent, unreadable or invalid)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                o = img.getexif().get(_TAG_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - no EXIF to honour
        return 1
    return o if isinstance(o, int) and 1 <= o <= 8 else 1


def upright_to_stored(xy: np.ndarray, angles: np.ndarray | None, orientation: int,
                      stored_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
    """Map keypoints (OpenCV pixel convention) and orientations (radians) found in the upright image that
    :func:`read_image` returns (EXIF ``orientation`` applied) back to the stored pixels of the file, which is what
    COLMAP reads (it ignores EXIF orientation). ``stored_size`` is the file's (width, height) before rotation."""
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    if orientation == 1:
        return xy.astype(np.float32), angles
    ws, hs = stored_size
    x, y = xy[:, 0], xy[:, 1]
    # (u, v) = stored pixel of upright pixel (x, y); J = d(u, v) / d(x, y)
    maps = {
        2: (ws - 1 - x, y, ((-1, 0), (0, 1))),
        3: (ws - 1 - x, hs - 1 - y, ((-1, 0), (0, -1))),
        4: (x, hs - 1 - y, ((1, 0), (0, -1))),
        5: (y, x, ((0, 1), (1, 0))),
        6: (y, hs - 1 - x, ((0, 1), (-1, 0))),
        7: (ws - 1 - y, hs - 1 - x, ((0, -1), (-1, 0))),
        8: (ws - 1 - y, x, ((0, -1), (1, 0))),
    }
    u, v, J = maps[orientation]
    out = np.stack([u, v], -1).astype(np.float32)
    if angles is None:
        return out, None
    a = np.asarray(angles, np.float64)
    d = np.stack([np.cos(a), np.sin(a)], -1) @ np.asarray(J, np.float64).T
    return out, np.arctan2(d[:, 1], d[:, 0]).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------------
# masks

# PIL's transposes that turn stored pixels upright, per EXIF orientation (what ImageOps.exif_transpose applies)
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def find_mask(mask_dir: str | Path, name: str) -> Path | None:
    """The mask file of image ``name`` (relative to the image folder) in ``mask_dir``: COLMAP's convention
    (``--ImageReader.mask_path``), ``a/b.jpg`` -> ``mask_dir/a/b.jpg.png``, else ``mask_dir/a/b.png``; None when
    neither exists."""
    for cand in (Path(mask_dir) / f"{name}.png", (Path(mask_dir) / name).with_suffix(".png")):
        if cand.is_file():
            return cand
    return None


def read_mask(path: str | Path, stored_size: tuple[int, int], orientation: int = 1,
              image_name: str | None = None) -> np.ndarray:
    """A feature mask as COLMAP reads it: any image file, zero pixels (black) = no features there. Returns an (H, W)
    uint8 array (255 where features may lie) in the upright frame of the image (EXIF ``orientation`` applied, as
    :func:`read_image` turns the image), at the image's size.

    ``stored_size`` is the image file's (width, height) as stored, the frame COLMAP's masks are drawn in. A mask of
    another size with the same aspect ratio (within 1 %) is resized (nearest pixel); otherwise, or when the file
    cannot be read, raises :class:`CdSfmError` naming the mask."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            m = img.convert("L")
    except FileNotFoundError:
        raise CdSfmError(f"{path}: mask file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise CdSfmError(f"{path}: cannot read mask ({e})") from e
    w, h = stored_size
    mw, mh = m.size
    if (mw, mh) != (w, h):
        if abs(mw / mh - w / h) > 0.01 * (w / h):
            of = f" of {image_name}" if image_name else ""
            raise CdSfmError(f"{path}: mask is {mw}x{mh}, the image{of} is {w}x{h} (another aspect ratio)")
        m = m.resize((w, h), Image.Resampling.NEAREST)
    if orientation in _UPRIGHT:
        m = m.transpose(_UPRIGHT[orientation])
    return np.where(np.asarray(m) > 0, 255, 0).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------------
# header information


@dataclass
class ImageInfo:
    """What the header tells: ``width``/``height`` after EXIF orientation, ``focal_px`` (None when EXIF has no usable
    focal length), camera ``make``/``model`` (None when absent), and the raw EXIF values used."""

    width: int
    height: int
    focal_px: float | None = None
    make: str | None = None
    model: str | None = None
    orientation: int = 1
    focal_mm: float | None = None
    focal_35mm: float | None = None
    focal_source: str | None = None  # "35mm", "focal_plane" or "sensor_width"
    gps: tuple[float, float, float] | None = None  # (latitude, longitude, altitude): degrees, degrees, metres (WGS84)

    @property
    def camera_id(self) -> str:
        """A key for grouping images by physical camera: make, model and image size."""
        return f"{self.make or ''}|{self.model or ''}|{self.width}x{self.height}"


def _rational(v) -> float | None:
    """An EXIF number (a rational as Pillow gives it, or a (numerator, denominator) pair) as a finite float."""
    try:
        f = float(v[0]) / float(v[1]) if isinstance(v, tuple) and len(v) == 2 else float(v)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return f if math.isfinite(f) else None


def _as_float(v) -> float | None:
    f = _rational(v)
    return f if f is not None and f > 0 else None


def _dms(v) -> float | None:
    """Degrees from EXIF's (degrees, minutes, seconds) rationals."""
    try:
        d, m, sec = (_rational(x) for x in v)
        deg = d + m / 60.0 + sec / 3600.0
    except (TypeError, ValueError):  # not three numbers
        return None
    return deg if math.isfinite(deg) else None


def exif_gps(gps: Mapping) -> tuple[float, float, float] | None:
    """(latitude, longitude, altitude) of an EXIF GPS IFD, as COLMAP's image reader takes them: all three present,
    south and west negative, altitude below sea level (reference 1) negative; None otherwise or out of range."""
    lat, lon, alt = _dms(gps.get(2)), _dms(gps.get(4)), _rational(gps.get(6))
    if lat is None or lon is None or alt is None or lat > 90 or lon > 180:
        return None

    def ref(tag) -> str:
        return (_as_text(gps.get(tag)) or "").upper()[:1]

    below = gps.get(5)
    below = below[0] if isinstance(below, bytes) and below else below
    return (-lat if ref(1) == "S" else lat, -lon if ref(3) == "W" else lon, -alt if below == 1 else alt)


def _as_text(v) -> str | None:
    if v is None:
        return None
    if isinstance(v, bytes):
        v = v.decode("utf-8", "ignore")
    v = str(v).replace("\x00", "").strip()
    return v or None


def image_info(path: str | Path, sensor_width_mm: float | None = None) -> ImageInfo:
    """Size, focal length prior and camera of an image from its header only (no pixel decoding).

    The focal length in pixels (of the long side ``max(width, height)``) follows COLMAP: ``FocalLengthIn35mmFilm``
    (f35 / 35 * long side), else ``FocalLength`` with the sensor width from ``FocalPlaneXResolution``, else
    ``FocalLength`` with ``sensor_width_mm`` when given. Implausible values (focal outside 0.1 to 20 times the long
    side) are ignored.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                w, h = img.size
                exif = img.getexif()
    except FileNotFoundError:
        raise CdSfmError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        arr = _read_with_opencv(path) if isinstance(e, UnidentifiedImageError) else None
        if arr is None:
            raise CdSfmError(f"{path}: cannot read image ({e})") from e
        return ImageInfo(width=arr.shape[1], height=arr.shape[0])

    orientation = exif.get(_TAG_ORIENTATION, 1)
    orientation = orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    info = ImageInfo(width=w, height=h, make=_as_text(exif.get(_TAG_MAKE)), model=_as_text(exif.get(_TAG_MODEL)),
                     orientation=orientation)
    try:
        sub = exif.get_ifd(_TAG_EXIF_IFD)
    except Exception:  # malformed EXIF block
        sub = {}
    try:
        info.gps = exif_gps(exif.get_ifd(_TAG_GPS_IFD))
    except Exception:  # malformed GPS block: no position, as without one
        info.gps = None
    info.focal_mm = _as_float(sub.get(_TAG_FOCAL))
    info.focal_35mm = _as_float(sub.get(_TAG_FOCAL_35MM))
    long_side = max(w, h)

    candidates: list[tuple[str, float]] = []
    if info.focal_35mm:
        candidates.append(("35mm", info.focal_35mm / 35.0 * long_side))
    if info.focal_mm:
        xres, unit = _as_float(sub.get(_TAG_FP_XRES)), sub.get(_TAG_FP_UNIT, 2)
        if xres and unit in _FP_UNIT_MM:
            px_per_mm = xres / _FP_UNIT_MM[unit]
            # the resolution refers to the sensor readout (PixelXDimension) in the unrotated frame
            native_w = _as_float(sub.get(_TAG_PIXEL_X))
            stored_w = h if orientation in (5, 6, 7, 8) else w
            factor = stored_w / native_w if native_w else 1.0
            candidates.append(("focal_plane", info.focal_mm * px_per_mm * factor))
        if sensor_width_mm:
            candidates.append(("sensor_width", info.focal_mm / sensor_width_mm * long_side))
    for source, f in candidates:
        if 0.1 * long_side <= f <= 20 * long_side:
            info.focal_px, info.focal_source = float(f), source
            break
        logger.debug("%s: ignoring implausible EXIF focal length %.1f px (%s)", path, f, source)
    return info
