"""``cd-sfm train``: mine homography patch pairs, train the local model, export a run's weights; mine image pairs,
train the augmentation network and tune local + augmentation end to end.

Hooked into the main CLI through ``cd_sfm.cli.EXTRA_COMMANDS``; no TensorFlow import at module level.
"""

from __future__ import annotations


def _common(p):
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    p.add_argument("-q", "--quiet", action="count", default=0, help="less log output")
    return p


def add_parser(subparsers):
    from . import homography, pair_data, train_augment, train_local

    p = subparsers.add_parser("train", help="mine training data, train and export our own local and augmentation models",
                              description="Training of our own ContextDesc weights (docs/training.md).")
    sub = p.add_subparsers(dest="train_command", metavar="{mine-homography,mine,local,export,mine-pairs,augment,e2e,export-augment}")
    sub.required = True

    s = sub.add_parser("mine-homography", help="patch pairs from random homographic warps of images -> .h5")
    homography.build_parser(_common(s))
    s.set_defaults(func=lambda a: (homography.cli_mine_homography(a), 0)[1])

    from . import mine_sfm

    s = sub.add_parser("mine", help="patch pairs from SfM tracks of TRAIN scenes (SIFT reconstruction) -> .h5")
    mine_sfm.build_parser(_common(s))
    s.set_defaults(func=lambda a: (mine_sfm.cli_mine_sfm(a), 0)[1])

    s = sub.add_parser("local", help="train (or resume) the local model on mined pairs")
    train_local.build_parser(_common(s))
    s.set_defaults(func=lambda a: (train_local.cli_train_local(a), 0)[1])

    s = sub.add_parser("export", help="export a run's weights as cd_sfm/weights/NAME/ (or --export-dir)")
    train_local.build_export_parser(_common(s))
    s.set_defaults(func=lambda a: (train_local.cli_export_local(a), 0)[1])

    s = sub.add_parser("mine-pairs", help="image + homographic warp pairs with whole keypoint sets, correspondences "
                                          "and cached local descriptors -> .h5 (augmentation training data)")
    pair_data.build_parser(_common(s))
    s.set_defaults(func=lambda a: (pair_data.cli_mine_pairs(a), 0)[1])

    s = sub.add_parser("augment", help="train (or resume) the geometric-only augmentation network on mined pairs")
    train_augment.build_parser(_common(s), mode="augment")
    s.set_defaults(func=lambda a: (train_augment.cli_train_augment(a, "augment"), 0)[1])

    s = sub.add_parser("e2e", help="tune local model + augmentation end to end on mined pairs")
    train_augment.build_parser(_common(s), mode="e2e")
    s.set_defaults(func=lambda a: (train_augment.cli_train_augment(a, "e2e"), 0)[1])

    s = sub.add_parser("export-augment", help="export an augment/e2e run as <export-dir>/NAME/augment.npz (+ local.npz)")
    train_augment.build_export_parser(_common(s))
    s.set_defaults(func=lambda a: (train_augment.cli_export_augment(a), 0)[1])
    return p
