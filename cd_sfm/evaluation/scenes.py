"""Which EVAL scenes of the split (``cd_sfm/split.yaml``, ``eval:``) each evaluation runs on by default.

- :func:`pose_scenes` (``cd-sfm eval pairs``): the EVAL scenes with ground-truth cameras that :mod:`.gt` can read,
  minus those the split lists under ``gt_unusable:`` (ground truth that does not fit the images, with the reason);
- :func:`sfm_scenes` (``cd-sfm eval sfm``): every multi-view EVAL scene (an ``images/`` folder with at least two
  images; HPatches is not one), with or without ground truth.

A scene of the split that is absent from the data folder is skipped with a warning (partial data); none present is an
error.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..io import CdSfmError
from ..split import SPLIT_FILE, load_split

logger = logging.getLogger(__name__)


def eval_scenes(data_root: Path, split_file: str | Path = SPLIT_FILE) -> dict[str, Path]:
    """{split name: folder} of the EVAL scenes present under ``data_root``."""
    split = load_split(split_file, require_train=False)
    out = {}
    for name in split.get("eval") or []:
        p = Path(data_root) / name
        if p.is_dir():
            out[name] = p
        else:
            logger.warning("%s: EVAL scene %s not found: skipped", p, name)
    if not out:
        raise CdSfmError(f"{data_root}: none of the EVAL scenes of {split_file} found (give --data DIR)")
    return out


def unusable_gt(split_file: str | Path = SPLIT_FILE) -> dict[str, str]:
    """{scene: reason} of the split's ``gt_unusable:`` (ground truth that does not fit the images)."""
    return dict(load_split(split_file, require_train=False).get("gt_unusable") or {})


def pose_scenes(data_root: Path, split_file: str | Path = SPLIT_FILE) -> list[Path]:
    from .gt import has_gt

    bad = unusable_gt(split_file)
    out = []
    for name, p in eval_scenes(data_root, split_file).items():
        if name in bad:
            logger.info("%s: ground truth not used (%s)", name, bad[name])
        elif has_gt(p):
            out.append(p)
    if not out:
        raise CdSfmError(f"{data_root}: no EVAL scene with usable ground truth found")
    return out


def is_multiview(scene: Path) -> bool:
    from ..images import is_image_name

    d = scene / "images"
    return d.is_dir() and sum(1 for p in d.iterdir() if p.is_file() and is_image_name(p.name)) >= 2


def sfm_scenes(data_root: Path, split_file: str | Path = SPLIT_FILE) -> list[Path]:
    out = [p for p in eval_scenes(data_root, split_file).values() if is_multiview(p)]
    if not out:
        raise CdSfmError(f"{data_root}: no multi-view EVAL scene found")
    return out
