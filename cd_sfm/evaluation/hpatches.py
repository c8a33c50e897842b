"""HPatches homography-sequence evaluation: mean matching accuracy (MMA) at 1..10 px, matching score and number of
correct matches, for several descriptors on the SAME SIFT keypoints.

Each sequence folder holds ``1.ppm`` .. ``6.ppm`` and ``H_1_k`` (3x3, maps image 1 to image k). For every pair (1, k):
SIFT keypoints (:func:`detect_sift`, ``max_keypoints``) on both images, each descriptor on those keypoints, mutual
nearest-neighbour matching, reprojection error ||H x1 - x2|| per match.

- MMA@t: fraction of the matches with error <= t, averaged over the pairs (a pair without matches counts 0).
- #correct: matches with error <= ``threshold`` (3 px), averaged over the pairs.
- matching score: #correct / mean number of keypoints in the shared region of the two images, averaged over the pairs.

Descriptors: ``rootsift`` (OpenCV SIFT on the keypoints, L1-normalised, square root, L2-normalised) and ``local``
(our local model, raw ``conv6_feat`` L2-normalised). Use it to *report*, never to tune: HPatches is an evaluation scene.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from tqdm import tqdm

from ..features.patches import SiftDetectorConf, detect_sift, extract_patches
from ..geometry import l2_normalize
from ..io import CdSfmError
from ..models import registry

logger = logging.getLogger(__name__)

THRESHOLDS = list(range(1, 11))
DEFAULT_ROOT = Path(__file__).resolve().parents[3] / "shared" / "data" / "hpatches"


@dataclass
class HPatchesConf:
    max_keypoints: int = 4096
    upright: bool = False
    threshold: float = 3.0  # px, for #correct and matching score
    max_size: int = 0  # optional downscale of the images (0: full resolution, as the benchmark)


def rootsift(desc: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    d = np.asarray(desc, np.float32)
    d = d / (np.abs(d).sum(1, keepdims=True) + eps)
    d = np.sqrt(np.maximum(d, 0))
    return d / (np.linalg.norm(d, axis=1, keepdims=True) + eps)


def mutual_nn(d0: np.ndarray, d1: np.ndarray) -> np.ndarray:
    """(M, 2) indices of mutual nearest neighbours of L2-normalised descriptors (max cosine similarity)."""
    if len(d0) == 0 or len(d1) == 0:
        return np.zeros((0, 2), int)
    sim = d0 @ d1.T
    nn01 = sim.argmax(1)
    nn10 = sim.argmax(0)
    i = np.flatnonzero(nn10[nn01] == np.arange(len(d0)))
    return np.stack([i, nn01[i]], 1)


def warp(H: np.ndarray, xy: np.ndarray) -> np.ndarray:
    p = np.concatenate([xy, np.ones((len(xy), 1))], 1) @ np.asarray(H, np.float64).T
    return p[:, :2] / p[:, 2:3]


def _inside(xy, shape):
    h, w = shape[:2]
    return (xy[:, 0] >= 0) & (xy[:, 0] <= w - 1) & (xy[:, 1] >= 0) & (xy[:, 1] <= h - 1)


def local_describer(model, batch: int = 1024, upright: bool = False) -> Callable:
    """Descriptor function (gray, kpts) -> (N, 128) L2-normalised raw local descriptors of a Keras local model."""
    import tensorflow as tf

    fn = tf.function(lambda x: model(x, training=False)["conv6_feat"], reduce_retracing=True)

    def describe(gray, kpts):
        patches = extract_patches(gray, kpts["keypoints"], kpts["scales"], kpts["angles"], upright=upright)
        n = len(patches)
        out = []
        for i in range(0, n, batch):
            x = patches[i : i + batch]
            m = len(x)
            if m < batch:
                x = np.concatenate([x, np.zeros((batch - m, 32, 32), np.float32)])
            out.append(fn(tf.constant(x[..., None])).numpy()[:m])
        d = np.concatenate(out) if out else np.zeros((0, 128), np.float32)
        return l2_normalize(d, axis=1)

    return describe


def rootsift_describer(gray, kpts):
    return rootsift(kpts["sift"])


def load_local_model(weights: str | Path):
    from ..models import local

    weights = Path(weights)
    if not weights.exists():
        raise CdSfmError(f"{weights}: weights not found")
    return local.load_local_model(weights)


def list_sequences(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise CdSfmError(f"{root}: HPatches folder not found")
    seqs = sorted(p for p in root.iterdir() if p.is_dir() and (p / "1.ppm").exists())
    if not seqs:
        raise CdSfmError(f"{root}: no HPatches sequences (folders with 1.ppm .. 6.ppm and H_1_k)")
    return seqs


def _read_gray(path: Path, max_size: int = 0):
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise CdSfmError(f"{path}: cannot read image")
    s = 1.0
    if max_size and max(img.shape) > max_size:
        s = max_size / max(img.shape)
        img = cv2.resize(img, (round(img.shape[1] * s), round(img.shape[0] * s)), interpolation=cv2.INTER_AREA)
    return img, s


def evaluate_hpatches(root, describers: dict[str, Callable], conf: HPatchesConf = HPatchesConf()) -> dict:
    """Run the benchmark; ``describers`` maps a method name to ``f(gray, kpts) -> (N, D) L2-normalised``.

    Returns {"conf", "sequences", "methods": {name: {"mma": {t: v}, "n_correct", "matching_score", "n_matches",
    "per_pair": [...]}}}."""
    seqs = list_sequences(root)
    det = SiftDetectorConf(max_keypoints=conf.max_keypoints, upright=conf.upright)
    per_pair = {m: [] for m in describers}
    for seq in tqdm(seqs, desc="hpatches", unit="seq"):
        feats = {}
        for k in range(1, 7):
            p = seq / f"{k}.ppm"
            if not p.exists():
                continue
            gray, s = _read_gray(p, conf.max_size)
            kp = detect_sift(gray, det, descriptors=True)
            feats[k] = (gray, kp, s, {m: f(gray, kp) for m, f in describers.items()})
        if 1 not in feats:
            continue
        g1, kp1, s1, d1 = feats[1]
        for k in range(2, 7):
            hp = seq / f"H_1_{k}"
            if k not in feats or not hp.exists():
                continue
            g2, kp2, s2, d2 = feats[k]
            H = np.diag([s2, s2, 1.0]) @ np.loadtxt(hp) @ np.diag([1 / s1, 1 / s1, 1.0])
            x1, x2 = kp1["keypoints"].astype(np.float64), kp2["keypoints"].astype(np.float64)
            n_shared = 0.5 * (_inside(warp(H, x1), g2.shape).sum() + _inside(warp(np.linalg.inv(H), x2), g1.shape).sum())
            for m in describers:
                matches = mutual_nn(d1[m], d2[m])
                err = np.linalg.norm(warp(H, x1[matches[:, 0]]) - x2[matches[:, 1]], axis=1) if len(matches) else np.zeros(0)
                n_correct = int((err <= conf.threshold).sum())
                per_pair[m].append({
                    "seq": seq.name, "pair": f"1-{k}", "n_kpts": [len(x1), len(x2)], "n_matches": len(matches),
                    "n_correct": n_correct,
                    "mma": {t: float((err <= t).mean()) if len(err) else 0.0 for t in THRESHOLDS},
                    "matching_score": float(n_correct / n_shared) if n_shared > 0 else 0.0,
                })
    methods = {}
    for m, rows in per_pair.items():
        if not rows:
            continue
        methods[m] = {
            "mma": {t: float(np.mean([r["mma"][t] for r in rows])) for t in THRESHOLDS},
            "n_correct": float(np.mean([r["n_correct"] for r in rows])),
            "n_matches": float(np.mean([r["n_matches"] for r in rows])),
            "matching_score": float(np.mean([r["matching_score"] for r in rows])),
            "n_pairs": len(rows),
            "per_pair": rows,
        }
    return {"conf": asdict(conf), "sequences": [s.name for s in seqs], "methods": methods}


def format_table(result: dict) -> str:
    t = result["conf"]["threshold"]
    head = f"{'method':<12}" + "".join(f"{'MMA@' + str(k):>8}" for k in THRESHOLDS) + f"{'#corr@' + format(t, 'g'):>10}{'#match':>8}{'MS':>8}"
    lines = [head, "-" * len(head)]
    for m, r in result["methods"].items():
        lines.append(f"{m:<12}" + "".join(f"{r['mma'][k]:8.3f}" for k in THRESHOLDS)
                     + f"{r['n_correct']:10.1f}{r['n_matches']:8.1f}{r['matching_score']:8.3f}")
    return "\n".join(lines)


def _json_ready(obj):
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    return obj


def save_json(result: dict, path: str | Path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_ready(result), indent=1) + "\n")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="cd-sfm eval hpatches", description=__doc__.split("\n")[0])
    p.add_argument("root", nargs="?", default=str(DEFAULT_ROOT), help="folder of HPatches sequences")
    p.add_argument("--weights", action="append", default=[],
                   help="local model weights (.npz), or NAME=path.npz; repeatable. Default: the shipped default model")
    p.add_argument("--max-keypoints", type=int, default=4096)
    p.add_argument("--upright", action="store_true")
    p.add_argument("--max-size", type=int, default=0)
    p.add_argument("--output", default="", help="JSON output path")
    return p


def cli_eval_hpatches(args) -> dict:
    if not isinstance(args, argparse.Namespace):
        args = build_parser().parse_args(args)
    conf = HPatchesConf(max_keypoints=args.max_keypoints, upright=args.upright, max_size=args.max_size)
    weights = args.weights or [str(registry.resolve(registry.DEFAULT_MODEL).path("local"))]
    describers: dict[str, Callable] = {"rootsift": rootsift_describer}
    for w in weights:
        name, path = w.split("=", 1) if "=" in w else ("local" if len(weights) == 1 else Path(w).parent.name, w)
        describers[name] = local_describer(load_local_model(path), upright=conf.upright)
    result = evaluate_hpatches(args.root, describers, conf)
    result["weights"] = weights
    print(format_table(result))
    if args.output:
        save_json(result, args.output)
        print(f"saved {args.output}")
    return result


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return cli_eval_hpatches(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
