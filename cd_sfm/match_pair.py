"""Pair demo, as the authors' ``image_matching.py``: match two images with SIFT (top), raw local ContextDesc
descriptors (middle) and augmented descriptors (bottom), count the inliers of a RANSAC fundamental matrix, draw the
three rows into one PNG and print the counts.

    cd-sfm match-pair a.jpg b.jpg --plot out.png [--model NAME] [--max-keypoints 4096] [--upright] [--ratio R]

Python: ``match_pair(path0, path1, MatchPairConf(...)) -> dict`` and ``draw_matches(...)``; ``main(argv)`` runs it
as a script.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import PRECISIONS
from .models.registry import DEFAULT_MODEL

logger = logging.getLogger(__name__)

ROWS = (("sift", "SIFT"), ("local", "raw local"), ("augmented", "augmented"))


@dataclass
class MatchPairConf:
    model: str = DEFAULT_MODEL
    max_keypoints: int = 4096
    upright: bool = False
    max_image_size: int = 0  # longest side the features are computed at (0: full resolution)
    ratio: float | None = None  # None: mutual nearest neighbours only, as the original's cross check
    ransac_threshold: float = 4.0  # epipolar error in pixels, as the original
    confidence: float = 0.999
    regional: bool = True
    precision: str = "fp32"


def _ransac(k0, k1, matches, conf: MatchPairConf) -> np.ndarray:
    import cv2

    if len(matches) < 8:
        return np.zeros(len(matches), bool)
    _, mask = cv2.findFundamentalMat(k0[matches[:, 0]].astype(np.float64), k1[matches[:, 1]].astype(np.float64),
                                     cv2.FM_RANSAC, conf.ransac_threshold, conf.confidence)
    return np.zeros(len(matches), bool) if mask is None else mask.ravel().astype(bool)


def _match(d0, d1, ratio):
    from .matching import match_descriptors

    m0, _ = match_descriptors(d0, d1, ratio=ratio, mutual=True)
    i = np.flatnonzero(m0 >= 0)
    return np.stack([i, m0[i]], axis=1).astype(np.int64)


def match_pair(image0, image1, conf: MatchPairConf | None = None, backend=None) -> dict:
    """Match two images (paths or RGB arrays) three ways. Returns {row: {"keypoints0", "keypoints1", "matches"
    (M, 2), "inliers" (M,) bool, "putative", "n_inliers"}} for rows ``sift``, ``local``, ``augmented``, plus
    ``images``."""
    from .features.contextdesc import ContextDescBackend
    from .features.patches import SiftDetectorConf, detect_sift, to_gray
    from .images import read_image

    conf = conf or MatchPairConf()
    images = []
    for im in (image0, image1):
        img = read_image(im, max_size=conf.max_image_size or None)[0] if isinstance(im, (str, Path)) else np.asarray(im)
        images.append(img)
    if backend is None:
        backend = ContextDescBackend(model=conf.model, max_keypoints=conf.max_keypoints, upright=conf.upright,
                                     regional=conf.regional, precision=conf.precision)
    det = SiftDetectorConf(max_keypoints=conf.max_keypoints, upright=conf.upright,
                           contrast_threshold=backend.conf.contrast_threshold)
    feats = [backend.extract_with_local(img) for img in images]
    sift = [detect_sift(to_gray(img), det, descriptors=True) for img in images]
    out = {"images": images}
    sources = {
        "sift": [(s["keypoints"], s["sift"]) for s in sift],
        "local": [(f["keypoints"], f["local_descriptors"]) for f in feats],
        "augmented": [(f["keypoints"], f["descriptors"]) for f in feats],
    }
    for key, ((k0, d0), (k1, d1)) in sources.items():
        matches = _match(d0, d1, conf.ratio)
        inliers = _ransac(k0, k1, matches, conf)
        out[key] = {"keypoints0": k0, "keypoints1": k1, "matches": matches, "inliers": inliers,
                    "putative": int(len(matches)), "n_inliers": int(inliers.sum())}
    return out


def draw_matches(result: dict, path: str | Path, max_width: int = 1600) -> Path:
    """Draw the three rows (images side by side, inlier matches as lines, counts as a caption) into one PNG."""
    import cv2

    imgs = []
    for img in result["images"]:
        img = np.asarray(img)
        imgs.append(cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    h = max(i.shape[0] for i in imgs)
    w0 = imgs[0].shape[1]
    pair = np.zeros((h, w0 + imgs[1].shape[1], 3), np.uint8)
    pair[: imgs[0].shape[0], :w0] = imgs[0]
    pair[: imgs[1].shape[0], w0:] = imgs[1]
    scale = min(1.0, max_width / pair.shape[1])
    rows = []
    for key, label in ROWS:
        r = result[key]
        canvas = pair.copy()
        k0, k1 = r["keypoints0"], r["keypoints1"]
        lw = max(1, int(round(1 / scale)))
        for (i, j), ok in zip(r["matches"], r["inliers"]):
            if not ok:
                continue
            p0 = (int(round(k0[i, 0])), int(round(k0[i, 1])))
            p1 = (int(round(k1[j, 0] + w0)), int(round(k1[j, 1])))
            cv2.line(canvas, p0, p1, (0, 255, 0), lw, cv2.LINE_AA)
        if scale < 1:
            canvas = cv2.resize(canvas, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        bar = np.full((34, canvas.shape[1], 3), 255, np.uint8)
        cv2.putText(bar, f"{label}: {r['n_inliers']} inliers / {r['putative']} putative", (8, 24),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 0, 0), 2, cv2.LINE_AA)
        rows.append(np.vstack([bar, canvas]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.vstack(rows)):
        from .io import CdSfmError

        raise CdSfmError(f"{path}: cannot write the plot")
    return path


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image0")
    p.add_argument("image1")
    p.add_argument("--plot", help="write the drawing of the three match sets to this PNG")
    p.add_argument("--model", default=MatchPairConf.model, help="ContextDesc model (name or folder)")
    p.add_argument("--max-keypoints", type=int, default=MatchPairConf.max_keypoints)
    p.add_argument("--max-image-size", type=int, default=0, help="longest image side used (0: full resolution)")
    p.add_argument("--upright", action="store_true", help="no keypoint orientation")
    p.add_argument("--ratio", type=float, default=None, help="ratio test on top of mutual nearest neighbours")
    p.add_argument("--no-regional", action="store_true", help="geometric context only")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="inference precision (default fp32; int8 needs `cd-sfm models quantize`)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    p.add_argument("-q", "--quiet", action="count", default=0, help="less log output")


def cmd_match_pair(args) -> int:
    conf = MatchPairConf(model=args.model, max_keypoints=args.max_keypoints, upright=args.upright,
                         max_image_size=args.max_image_size, ratio=args.ratio, regional=not args.no_regional,
                         precision=args.precision)
    res = match_pair(args.image0, args.image1, conf)
    for key, label in ROWS:
        print(f"{label}: {res[key]['n_inliers']} inliers of {res[key]['putative']} putative matches")
    if args.plot:
        print(f"plot: {draw_matches(res, args.plot)}")
    return 0


def add_parser(subparsers):
    """CLI hook: ``cd-sfm match-pair A B --plot out.png``."""
    p = subparsers.add_parser("match-pair", help="match two images with SIFT / raw local / augmented descriptors")
    _add_arguments(p)
    p.set_defaults(func=cmd_match_pair)
    return p


def main(argv: list[str] | None = None) -> int:
    import sys

    from .io import CdSfmError

    p = argparse.ArgumentParser(prog="cd-sfm match-pair", description=__doc__.split("\n\n")[0])
    _add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO - 10 * args.verbose + 10 * args.quiet)
    try:
        return cmd_match_pair(args)
    except CdSfmError as e:
        print(f"cd-sfm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
