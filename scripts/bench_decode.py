#!/usr/bin/env python
"""Reading photos for extraction: the extract stage's reader (JPEGs decoded as luma only, and at a reduced scale in
the DCT where at least twice the feature size, then area-resized) against what it did before (a whole RGB decode with
Pillow, converted to grey and area-resized) and against OpenCV's grey decode, in one run.

    python scripts/bench_decode.py [--image PHOTO] [--megapixels 6 12 24 48] [--max-image-size 1600] [--reps 5]

The photo (default: the first of ``../shared/data/sceaux_castle``) is resized to each size (4:3) and saved as JPEG
(quality 92) in a temporary folder. Prints seconds per image of both ways (best of ``--reps``, grayscale as SIFT
reads), the ratios, and the mean absolute difference of the results in grey levels.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def best(fn, reps: int) -> tuple[float, np.ndarray]:
    times, out = [], None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main(argv=None) -> int:
    from PIL import Image

    from cd_sfm.images import read_image_sized

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default = next(iter(sorted((ROOT.parent / "shared" / "data" / "sceaux_castle" / "images").glob("*"))), None)
    ap.add_argument("--image", type=Path, default=default)
    ap.add_argument("--megapixels", type=float, nargs="+", default=[6, 12, 24, 48])
    ap.add_argument("--max-image-size", type=int, default=1600)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    if args.image is None or not args.image.exists():
        raise SystemExit("give --image PHOTO (../shared/data is absent)")
    src = Image.open(args.image).convert("RGB")
    print("| megapixels | size | before (Pillow RGB), s | OpenCV grey, s | ours, s | ours vs before | ours vs OpenCV "
          "| mean abs diff to before |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for mp in args.megapixels:
            w = int(round((mp * 1e6 * 4 / 3) ** 0.5))
            h = int(round(w * 3 / 4))
            path = Path(tmp) / f"{mp:g}mp.jpg"
            src.resize((w, h), Image.BICUBIC).save(path, quality=92)
            size = read_image_sized(path, True, args.max_image_size)[0].shape[::-1]

            def before():
                with Image.open(path) as img:
                    grey = cv2.cvtColor(np.asarray(img.convert("RGB")), cv2.COLOR_RGB2GRAY)
                return cv2.resize(grey, size, interpolation=cv2.INTER_AREA)

            def opencv():
                return cv2.resize(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), size, interpolation=cv2.INTER_AREA)

            def ours():
                return read_image_sized(path, grayscale=True, max_size=args.max_image_size)[0]

            t_before, a = best(before, args.reps)
            t_cv, _ = best(opencv, args.reps)
            t_ours, b = best(ours, args.reps)
            diff = float(np.abs(a.astype(np.float64) - b).mean())
            print(f"| {mp:g} | {w}x{h} | {t_before:.3f} | {t_cv:.3f} | {t_ours:.3f} | {t_before / t_ours:.2f}x | "
                  f"{t_cv / t_ours:.2f}x | {diff:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
