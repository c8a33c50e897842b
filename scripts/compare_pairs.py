#!/usr/bin/env python
"""Two ``cd-sfm eval pairs --output`` results compared on the pairs both evaluated, with paired-bootstrap intervals:
is B ahead of A, or within noise?

    python scripts/compare_pairs.py A.json[:METHOD] B.json[:METHOD] [--resamples 1000] [--seed 0]

METHOD is a method of the file (``local``, ``contextdesc``, ``rootsift``; default ``contextdesc``). Prints pose
AUC@5/10/20 (%) of A and B on the common pairs, B - A, and the 95 % interval of B - A over resamples of the pairs
(the same resampled pairs for both, so scene difficulty cancels), then the same for correct matches per pair.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cd_sfm.evaluation.pose import AUC_THRESHOLDS, pose_auc  # noqa: E402


def load(spec: str) -> tuple[str, dict]:
    """``FILE[:METHOD]`` -> (label, {(scene, image0, image1): (pose error, correct matches)})."""
    path, _, method = spec.partition(":")
    method = method or "contextdesc"
    try:
        per_pair = json.loads(Path(path).read_text())["per_pair"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"{path}: not a 'cd-sfm eval pairs --output' file ({e})")
    rows = {}
    for scene, methods in per_pair.items():
        if method not in methods:
            raise SystemExit(f"{path}: no method {method!r} in scene {scene} (has {', '.join(methods)})")
        for r in methods[method]:
            err = r.get("err")
            rows[(scene, *r["pair"])] = (float("inf") if err is None else float(err), float(r["n_correct"]))
    return f"{Path(path).stem}:{method}", rows


def compare(a: dict, b: dict, resamples: int = 1000, seed: int = 0) -> dict:
    """AUCs and correct matches of ``a`` and ``b`` (as :func:`load` gives) on their common pairs, B - A and its
    paired-bootstrap 95 % interval."""
    keys = sorted(set(a) & set(b))
    if not keys:
        raise ValueError("the two results share no pair")
    ea, eb = (np.array([x[k][0] for k in keys]) for x in (a, b))
    ca, cb = (np.array([x[k][1] for k in keys]) for x in (a, b))

    def stats(idx):
        aucs = np.array(pose_auc(eb[idx])) - np.array(pose_auc(ea[idx]))
        return np.r_[aucs * 100, cb[idx].mean() - ca[idx].mean()]

    rng = np.random.default_rng(seed)
    boot = np.array([stats(rng.integers(0, len(keys), len(keys))) for _ in range(resamples)])
    lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
    names = [f"AUC@{t:g}" for t in AUC_THRESHOLDS] + ["correct matches"]
    va = [x * 100 for x in pose_auc(ea)] + [ca.mean()]
    vb = [x * 100 for x in pose_auc(eb)] + [cb.mean()]
    return {"pairs": len(keys), "rows": [{"metric": n, "a": x, "b": y, "diff": y - x, "lo": l, "hi": h}
                                         for n, x, y, l, h in zip(names, va, vb, lo, hi)]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", help="A.json[:METHOD]")
    ap.add_argument("b", help="B.json[:METHOD]")
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    (na, a), (nb, b) = load(args.a), load(args.b)
    res = compare(a, b, args.resamples, args.seed)
    print(f"A = {na}, B = {nb}, {res['pairs']} common pairs ({len(a)} / {len(b)} in the files)")
    print(f"{'':16s} {'A':>8s} {'B':>8s} {'B - A':>8s}   95 % interval (paired bootstrap, {args.resamples})")
    for r in res["rows"]:
        print(f"{r['metric']:16s} {r['a']:8.1f} {r['b']:8.1f} {r['diff']:+8.1f}   [{r['lo']:+.1f}, {r['hi']:+.1f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
