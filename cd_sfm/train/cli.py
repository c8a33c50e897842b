"""``cd-sfm train``: mine homography patch pairs, train the local model, export a run's weights.

Hooked into the main CLI through ``cd_sfm.cli.EXTRA_COMMANDS``; no TensorFlow import at module level.
"""

from __future__ import annotations


def _common(p):
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    p.add_argument("-q", "--quiet", action="count", default=0, help="less log output")
    return p


def add_parser(subparsers):
    from . import homography, train_local

    p = subparsers.add_parser("train", help="mine training patches, train and export our own local model",
                              description="Training of our own ContextDesc weights (docs/training.md).")
    sub = p.add_subparsers(dest="train_command", metavar="{mine-homography,local,export}")
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
    return p
