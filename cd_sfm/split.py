"""The scene split of the data for training and evaluating our own weights, and where that data lives.

``cd_sfm/split.yaml`` (package data; ``configs/split.yaml`` in the source tree links to it) names the TRAIN scenes
(patch pairs are mined from these only), the validation rule and the EVAL scenes (never trained or tuned on). Scene
folders are relative to the data root: ``--data`` / ``data_root`` where a command takes it, else ``$CD_SFM_DATA``,
else the split's own ``data_root`` (relative to the split file's folder: ``../shared/data`` beside the repository
root), else ``../shared/data`` beside the repository root.
"""

from __future__ import annotations

import os
from pathlib import Path

from .io import CdSfmError

SPLIT_FILE = Path(__file__).resolve().with_name("split.yaml")
REPO_ROOT = Path(__file__).resolve().parents[1]
ENV_DATA = "CD_SFM_DATA"


def load_split(split_file: str | Path = SPLIT_FILE, require_train: bool = True) -> dict:
    import yaml

    try:
        split = yaml.safe_load(Path(split_file).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise CdSfmError(f"{split_file}: cannot read the scene split ({e})") from e
    if not isinstance(split, dict) or require_train and not isinstance(split.get("train"), dict):
        raise CdSfmError(f"{split_file}: not a scene split (expected a 'train' mapping)")
    return split


def default_data_root(split: dict | None = None, split_file: str | Path = SPLIT_FILE) -> Path:
    """``$CD_SFM_DATA``, else the split's ``data_root`` relative to the split file's folder, else ``../shared/data``
    beside the repository root."""
    env = os.environ.get(ENV_DATA)
    if env:
        return Path(env)
    rel = (split or {}).get("data_root")
    if rel:
        return (Path(split_file).resolve().parent / rel).resolve()
    return REPO_ROOT.parent / "shared" / "data"


def train_dirs(split_file: str | Path = SPLIT_FILE, data_root: str | Path | None = None,
               section: str = "train") -> list[Path]:
    """The TRAIN scene folders (``section="singles"``: the folders of single photos, warps only); a missing one is a
    one-line error."""
    split = load_split(split_file)
    root = Path(data_root) if data_root else default_data_root(split, split_file)
    dirs = [root / d for d in (split.get(section) or {}).values()]
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise CdSfmError(f"{missing[0]}: training scene folder not found (data root {root}; set {ENV_DATA})")
    return dirs


def singles_dirs(split_file: str | Path = SPLIT_FILE, data_root: str | Path | None = None) -> list[Path]:
    """The TRAIN folders of single photos (no multi-view scene: homographic warps only)."""
    return train_dirs(split_file, data_root, section="singles")


def eval_dirs(split_file: str | Path = SPLIT_FILE, data_root: str | Path | None = None) -> list[Path]:
    """The EVAL scene folders (whether present or not)."""
    split = load_split(split_file, require_train=False)
    root = Path(data_root) if data_root else default_data_root(split, split_file)
    return [(root / e).resolve() for e in split.get("eval") or []]
