"""Screenshot of an output folder's ``report.html`` in headless Chromium (the picture in the README).

    python scripts/report_screenshot.py OUT docs/report.png [--width 1200 --height 980 --colors 128]

Run it on a ``cd-sfm demo`` folder only (the synthetic scene): never commit screenshots of third-party photos. The
PNG is palette-quantised to keep it small. Needs Chromium (``apt-get install -y chromium``) and websocket-client.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the DevTools driver of the report test


def main() -> int:
    from PIL import Image

    from _browser import Browser

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="output folder holding report.html")
    ap.add_argument("png", type=Path, help="screenshot to write")
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--height", type=int, default=980)
    ap.add_argument("--colors", type=int, default=128, help="palette size (0: full colour)")
    args = ap.parse_args()
    page = args.out / "report.html"
    if not page.exists():
        print(f"{page}: not found (run `cd-sfm demo {args.out}` or `cd-sfm report {args.out}`)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp, Browser(tmp) as b:
        b.open(page.resolve().as_uri(), width=args.width, height=args.height)
        b.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        shot = b.screenshot(Path(tmp) / "shot.png")
        errors = b.errors()
        img = Image.open(shot).convert("RGB")
    if errors:
        print("page errors: " + "; ".join(errors), file=sys.stderr)
        return 1
    if args.colors:
        img = img.quantize(colors=args.colors, method=Image.Quantize.MEDIANCUT)
    args.png.parent.mkdir(parents=True, exist_ok=True)
    img.save(args.png, optimize=True)
    print(f"{args.png}: {img.size[0]}x{img.size[1]}, {args.png.stat().st_size // 1024} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
