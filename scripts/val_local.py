#!/usr/bin/env python
"""Local models on the held-out pairs of mined patch files, as ``cd-sfm train local`` validates (the same pairs:
``train_local.split_indices`` with the run's ``--val-pairs`` and ``--seed``): in-batch top-1 among blocks of 1024
pairs, FPR95 and the matchability AUC, per file and model, in one run. For comparing a new run with the shipped
model on the validation sets of the new run's data (never EVAL scenes).

    python scripts/val_local.py FILE.h5 [FILE.h5 ...] --models cd-sfm-v1 RUN/final.npz [--val-pairs 2048] [--json out]
"""

from __future__ import annotations

import argparse
import json

import h5py
import numpy as np

from cd_sfm.train.pair_data import load_local_runner
from cd_sfm.train.train_local import split_indices, validation_metrics


def held_out(path: str, val_pairs: int, seed: int) -> dict:
    with h5py.File(path, "r") as f:
        _, va = split_indices(f["is_val"][()], 0, val_pairs, seed)
        return {"patches": f["patches"][va] if len(va) else np.zeros((0, 2, 32, 32), np.uint8),
                "ids": f["kpt_ids"][()][va]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="mined patch-pair files (.h5)")
    p.add_argument("--models", nargs="+", required=True, help="model names, folders or local .npz files")
    p.add_argument("--val-pairs", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    data = {f: held_out(f, args.val_pairs, args.seed) for f in args.files}
    results = {}
    for m in args.models:
        runner = load_local_runner(m)
        results[m] = {}
        for f, val in data.items():
            r = validation_metrics(runner.local, val)
            results[m][f] = r
            print(f"{m}  {f}: top-1 {r['val_acc']:.4f}  FPR95 {r['val_fpr95']:.4f}  matchability AUC "
                  f"{r['val_mb_auc']:.3f}  ({len(val['ids'])} pairs)", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
