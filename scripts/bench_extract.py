#!/usr/bin/env python
"""Extraction speed of ContextDesc (fp32 and bf16) against COLMAP's CPU SIFT, on the same images, in one run.

    python scripts/bench_extract.py [--images DIR] [--num 10] [--max-image-size 1200] [--model cd-sfm-v1 ...] [--xla]

Prints, per precision: patches/s of the local network, images/s of the whole extraction (SIFT keypoints, patches,
local network, augmentation; regional model if the model has one) one image at a time, seconds per image by stage,
and seconds per image of the product's extract stage (``features.extract.main``: image files in, features.h5 out,
several images at a time where the backend does that, as COLMAP runs one image per thread); then COLMAP SIFT
(``pycolmap.extract_features``, CPU, its default options, as many threads as cores) seconds per image, and the ratio
ContextDesc / COLMAP per image. ``--precisions int8:tflite,int8:openvino`` times both engines of the int8 local
model (``cd_sfm.models.int8``) side by side. ``--model`` repeated times several models (e.g. a full model and its compact
student) in the same interleaved run. Without ``--images`` it uses ``../shared/data/strecha_entry-P10_half`` when present,
else generated images. Without trained weights it times random weights of the same architecture (speed does not depend
on the values). Images are resized to ``--max-image-size`` (1200 px: about 1 megapixel at 3:2) and written once to a
temporary folder that both extractors read.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("bench")


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_images(src: str | None, num: int, max_size: int) -> list[np.ndarray]:
    from cd_sfm.images import read_image
    from cd_sfm.modeltools.frozen import generated_image

    folder = Path(src) if src else ROOT.parent / "shared" / "data" / "strecha_entry-P10_half"
    files = []
    if folder.is_dir():
        exts = {".jpg", ".jpeg", ".png", ".ppm", ".tif", ".tiff", ".bmp"}
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in exts)[:num]
    if files:
        logger.info("images: %d from %s", len(files), folder)
        return [read_image(p, max_size=max_size)[0] for p in files]
    logger.info("images: %d generated", num)
    h = int(max_size * 2 / 3)
    return [generated_image(h, max_size, seed=i) for i in range(num)]


def random_model_folder(tmp: Path, regional: bool = False) -> str:
    from cd_sfm.models.augment import build_augment_model
    from cd_sfm.models.local import build_local_model
    from cd_sfm.models.regional import build_regional_model
    from cd_sfm.models.weights import save_weights_npz

    from cd_sfm.modeltools.frozen import generated_image
    from cd_sfm.modeltools.quantize import patches_from_images

    d = tmp / "random-model"
    save_weights_npz(build_local_model(), d / "local.npz")
    save_weights_npz(build_augment_model(visual=regional), d / "augment.npz")
    if regional:
        save_weights_npz(build_regional_model(), d / "regional.npz", dtype=None)
    (d / "info.json").write_text(json.dumps({"name": "random", "trained_on": "random weights (timing only)"}))
    from cd_sfm.modeltools.quantize import quantize_folder

    gen = tmp / "calibration"
    gen.mkdir()
    for i in range(4):
        cv2.imwrite(str(gen / f"{i}.png"), generated_image(480, 640, seed=100 + i))
    quantize_folder(d, patches_from_images(sorted(gen.glob("*.png")), num=1024), "generated images")
    return str(d)


def make_backend(model: str, precision: str, xla: bool, max_keypoints: int, batch_size: int, image):
    """``precision``: fp32 | bf16 | int8 | auto, or int8:ENGINE (int8 on that engine: tflite | openvino)."""
    from cd_sfm.features.contextdesc import ContextDescBackend

    precision, _, engine = precision.partition(":")
    b = ContextDescBackend(model=model, precision=precision, xla=xla, max_keypoints=max_keypoints,
                           batch_size=batch_size)
    b.runner.int8_engine = engine or None
    b.extract(image)  # warm-up: traces (and with XLA compiles) once
    return b


def bench_contextdesc(b, images) -> dict:
    b.timings.clear()
    t = time.perf_counter()
    for img in images:
        b.extract(img)
    total = time.perf_counter() - t
    tm = dict(b.timings)
    n = len(images)
    return {
        "precision": b.runner.precision,
        "images": n,
        "keypoints_per_image": tm["keypoints"] / n,
        "seconds_per_image": total / n,
        "images_per_s": n / total,
        "patches_per_s": tm["keypoints"] / max(tm["local"], 1e-9),
        "stages_per_image": {k: tm.get(k, 0.0) / n for k in ("detect", "patches", "local", "regional", "augment")},
    }


def bench_extract_stage(b, img_dir: Path, tmp: Path, tag: str) -> dict:
    """The product path: ``cd_sfm.features.extract.main`` over the image files (read, extract with the backend's
    ``parallel_images``, write features.h5), as COLMAP's extraction reads files and writes its database."""
    from cd_sfm.features import extract

    out = tmp / f"features-{tag}.h5"
    t = time.perf_counter()
    stats = extract.main({"backend": "contextdesc", "max_image_size": None}, img_dir, out, overwrite=True,
                         progress=False, backend=b)
    total = time.perf_counter() - t
    out.unlink(missing_ok=True)
    return {"seconds_per_image": total / stats["extracted"], "parallel_images": b.parallel_images}


def prepare_colmap(images, tmp: Path) -> tuple[Path, list[str]]:
    img_dir = tmp / "colmap_images"
    img_dir.mkdir(exist_ok=True)
    names = []
    for i, img in enumerate(images):
        name = f"{i:03d}.png"
        cv2.imwrite(str(img_dir / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if img.ndim == 3 else img)
        names.append(name)
    return img_dir, names


def bench_colmap(img_dir: Path, names: list[str], tmp: Path, threads: int, tag: str) -> dict:
    import pycolmap

    opts = pycolmap.FeatureExtractionOptions()
    opts.num_threads = threads
    opts.use_gpu = False

    def run(db, subset):
        db.unlink(missing_ok=True)
        t = time.perf_counter()
        pycolmap.extract_features(db, img_dir, image_names=subset, extraction_options=opts,
                                  device=pycolmap.Device.cpu)
        return time.perf_counter() - t

    run(tmp / f"warmup-{tag}.db", names[:1])
    total = run(tmp / f"bench-{tag}.db", names)
    nfeat = None
    try:
        db = pycolmap.Database.open(str(tmp / f"bench-{tag}.db"))
        try:
            nfeat = db.num_keypoints() / max(db.num_images(), 1)
        finally:
            db.close()
    except Exception as e:  # noqa: BLE001 - the count is informative only
        logger.debug("could not count COLMAP features: %s", e)
    return {"seconds_per_image": total / len(names), "images_per_s": len(names) / total,
            "features_per_image": nfeat, "max_num_features": opts.sift.max_num_features}


def _best(runs: list[dict]) -> dict:
    return min(runs, key=lambda r: r["seconds_per_image"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", help="folder of images (default: ../shared strecha scene, else generated)")
    ap.add_argument("--num", type=int, default=10, help="images to time (default 10)")
    ap.add_argument("--max-image-size", type=int, default=1200, help="longest side (default 1200, ~1 MP)")
    ap.add_argument("--model", action="append", default=[],
                    help="ContextDesc model, repeatable (default: the default model, random weights if absent)")
    ap.add_argument("--max-keypoints", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=1024, help="patches per local-network call")
    ap.add_argument("--xla", action="store_true", help="compile the models with XLA")
    ap.add_argument("--precisions", default="fp32,bf16,int8",
                    help="comma-separated, of fp32, bf16, int8 (int8 needs `cd-sfm models quantize`), "
                         "int8:tflite, int8:openvino (int8 on that engine; plain int8: OpenVINO where installed)")
    ap.add_argument("--regional", action="store_true",
                    help="with random weights: include the regional ResNet50 and visual context in the timing")
    ap.add_argument("--repeat", type=int, default=2, help="interleaved repeats, best kept (default 2)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("cd_sfm").setLevel(logging.WARNING)
    try:
        from cd_sfm.colmap import quiet_colmap

        quiet_colmap(logging.WARNING)
    except Exception:  # noqa: BLE001 - only log noise
        pass

    from cd_sfm.io import CdSfmError
    from cd_sfm.models import registry
    from cd_sfm.models.runner import available_cores, bf16_support

    cores = available_cores()
    images = load_images(args.images, args.num, args.max_image_size)
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        models = []  # (name, label, model name or folder)
        for model in args.model or [registry.DEFAULT_MODEL]:
            try:
                entry = registry.resolve(model)
                arch = entry.info.get("local_arch", "official")
                models.append((entry.name, f"{entry.name} ({'+'.join(entry.components)}, {arch})", model))
            except CdSfmError:
                if args.model:
                    raise
                models.append(("random", "random weights (no trained model installed)"
                               + (", with regional" if args.regional else ""),
                               random_model_folder(tmp, regional=args.regional)))
        model_label = "; ".join(label for _, label, _ in models)
        results = {"date": time.strftime("%Y-%m-%d"), "cpu": _cpu_name(), "cores": cores,
                   "bf16_hardware": bf16_support(), "model": model_label,
                   "image_size": list(images[0].shape[:2][::-1]), "num_images": len(images),
                   "load_average": os.getloadavg()[0], "contextdesc": {}}
        precs = [p.strip() for p in args.precisions.split(",") if p.strip()]
        # one backend per model and precision, keyed "precision" (one model) or "name precision" (several)
        backends = {(p if len(models) == 1 else f"{name} {p}"):
                    make_backend(model, p, args.xla, args.max_keypoints, args.batch_size, images[0])
                    for name, _, model in models for p in precs}
        precs = list(backends)
        img_dir, names = prepare_colmap(images, tmp)
        runs: dict = {p: [] for p in precs}
        stage: dict = {p: [] for p in precs}
        runs["colmap"] = []
        # interleaved repeats, best of each: the machine may be shared, and this keeps the comparison fair
        for rep in range(args.repeat):
            for p in precs:
                runs[p].append(bench_contextdesc(backends[p], images))
                stage[p].append(bench_extract_stage(backends[p], img_dir, tmp, f"{p}-{rep}"))
            runs["colmap"].append(bench_colmap(img_dir, names, tmp, cores, str(rep)))
        results["contextdesc"] = {p: _best(runs[p]) for p in precs}
        for p in precs:
            results["contextdesc"][p]["extract_stage"] = _best(stage[p])
        results["colmap_sift"] = _best(runs["colmap"])
        results["repeats"] = args.repeat
    col = results["colmap_sift"]["seconds_per_image"]
    w, h = results["image_size"]
    print(f"\n{results['date']}  {results['cpu']}, {cores} cores, bf16 hardware: {results['bf16_hardware'] or 'none'}"
          f"  (load average {results['load_average']:.1f})")
    print(f"{len(images)} images {w}x{h} ({w * h / 1e6:.2f} MP), model: {model_label}, XLA: {args.xla}, "
          f"best of {args.repeat} interleaved runs")
    for prec, r in results["contextdesc"].items():
        st = r["stages_per_image"]
        print(f"ContextDesc {prec:>4} (ran {r['precision']}): {r['patches_per_s']:8.0f} patches/s, "
              f"{r['images_per_s']:.3f} images/s, {r['seconds_per_image']:.3f} s/image "
              f"({r['keypoints_per_image']:.0f} keypoints; detect {st['detect']:.3f}, patches {st['patches']:.3f}, "
              f"local {st['local']:.3f}, regional {st['regional']:.3f}, augment {st['augment']:.3f} s)")
        r["ratio_to_colmap"] = r["seconds_per_image"] / col
        es = r["extract_stage"]
        es["ratio_to_colmap"] = es["seconds_per_image"] / col
        print(f"    extract stage (files -> features.h5, {es['parallel_images']} image(s) at a time): "
              f"{es['seconds_per_image']:.3f} s/image")
    nf = results["colmap_sift"]["features_per_image"]
    print(f"COLMAP SIFT (CPU, {cores} threads): {col:.3f} s/image, {1 / col:.3f} images/s"
          + (f" ({nf:.0f} features)" if nf is not None else ""))
    for prec, r in results["contextdesc"].items():
        print(f"ratio ContextDesc {prec} / COLMAP SIFT: {r['ratio_to_colmap']:.2f} one image at a time, "
              f"{r['extract_stage']['ratio_to_colmap']:.2f} as the extract stage")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
