"""``cd-sfm train``: mine homography patch pairs, train the local model, export a run's weights; mine image pairs,
train the augmentation network and tune local + augmentation end to end.

Hooked into the main CLI through ``cd_sfm.cli.EXTRA_COMMANDS``; no TensorFlow import at module level.
"""

from __future__ import annotations

import functools
import importlib

# (subcommand, help, module, its parser builder, its entry point, extra keyword of both)
SUBCOMMANDS = [
    ("mine-homography", "patch pairs from random homographic warps of images -> .h5",
     "homography", "build_parser", "cli_mine_homography", {}),
    ("mine", "patch pairs from SfM tracks of TRAIN scenes (SIFT reconstruction) -> .h5",
     "mine_sfm", "build_parser", "cli_mine_sfm", {}),
    ("local", "train (or resume) the local model on mined pairs",
     "train_local", "build_parser", "cli_train_local", {}),
    ("export", "export a run's weights as cd_sfm/weights/NAME/ (or --export-dir)",
     "train_local", "build_export_parser", "cli_export_local", {}),
    ("mine-pairs", "image + homographic warp pairs with whole keypoint sets, correspondences and cached local "
                   "descriptors -> .h5 (augmentation training data)",
     "pair_data", "build_parser", "cli_mine_pairs", {}),
    ("mine-sfm-pairs", "image pairs of SfM reconstructions (whole keypoint sets, track correspondences, F from the "
                       "poses, cached local descriptors) -> .h5 (augmentation training data with real viewpoint "
                       "change)", "pair_data", "build_sfm_parser", "cli_mine_sfm_pairs", {}),
    ("augment", "train (or resume) the geometric-only augmentation network on mined pairs",
     "train_augment", "build_parser", "cli_train_augment", {"mode": "augment"}),
    ("e2e", "tune local model + augmentation end to end on mined pairs",
     "train_augment", "build_parser", "cli_train_augment", {"mode": "e2e"}),
    ("export-augment", "export an augment/e2e run as <export-dir>/NAME/augment.npz (+ local.npz)",
     "train_augment", "build_export_parser", "cli_export_augment", {}),
]


def _common(p):
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    p.add_argument("-q", "--quiet", action="count", default=0, help="less log output")
    return p


def _run(entry, args, **kw) -> int:
    entry(args, **kw)
    return 0


def add_parser(subparsers):
    p = subparsers.add_parser("train", help="mine training data, train and export our own local and augmentation models",
                              description="Training of our own ContextDesc weights (docs/training.md).")
    sub = p.add_subparsers(dest="train_command", metavar="{" + ",".join(c[0] for c in SUBCOMMANDS) + "}")
    sub.required = True
    for name, help_, module, builder, entry, kw in SUBCOMMANDS:
        mod = importlib.import_module(f"{__package__}.{module}")
        s = sub.add_parser(name, help=help_)
        # the builders take ``mode`` only where the entry point does (train_augment)
        getattr(mod, builder)(_common(s), **kw)
        s.set_defaults(func=functools.partial(_run, getattr(mod, entry), **kw))
    return p
