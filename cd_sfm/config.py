"""The pipeline configuration: one flat dict, YAML presets in ``cd_sfm/configs/``, command-line overrides.

Precedence (lowest first): :data:`DEFAULTS` < the preset (``--config NAME`` for ``cd_sfm/configs/NAME.yaml``, package
data, so an installed wheel has them too; the top-level ``configs/`` of the source tree links there; or a path to a
YAML file) < command-line flags. A preset holds only the keys it changes; unknown keys are an error (a typo must not
be silently ignored). The effective configuration of a run is written to ``<out>/config.yaml``.

Keys:

* ``features``: a preset of :data:`cd_sfm.features.extract.confs` (``sift``, ``rootsift``, ``contextdesc``, ...);
  ``max_image_size``: longest image side the features see (None: the preset's); ``features_options``: overrides of
  the backend's options (e.g. ``{max_keypoints: 4096}``).
* ``model``: the ContextDesc model (a name of ``cd-sfm models list`` or a folder holding ``local.npz``; null: the
  shipped default, recorded by name in the saved ``config.yaml``); ``augment``: false stores the raw local
  descriptors even when the model has augmentation weights. Both only matter for ContextDesc features.
* ``pairs``: ``auto`` (the default: exhaustive up to 50 images, else retrieval, plus sequential when the names or
  EXIF times look like a sequence; :mod:`cd_sfm.pairs.auto`), ``exhaustive``, ``sequential`` (each image with the
  next ``overlap``), ``retrieval`` (each image with its ``num_neighbors`` most similar), the path of a pair file
  (``name0 name1`` lines), or a union of these joined by ``+`` (``retrieval+sequential``; repeated pairs dropped). ``retrieval``: the global descriptor, ``regional`` (GeM of
  the regional ResNet50, needs its weights), ``local`` (VLAD of the images' own local descriptors) or ``auto``
  (regional when its weights are available, else local).
* ``matching``: a preset of :data:`cd_sfm.matching.confs`; ``matching_options``: overrides (e.g. ``{ratio: 0.9}``);
  by default ``cross_ratio``: the ratio test both ways, as COLMAP's cross check (fewer wrong matches on repeated
  structures: on sacre_coeur with SIFT it turned a seed-dependent 3-of-10 registration into 10 of 10).
* ``camera_mode`` (auto | single | per-folder | per-image), ``camera_model`` (a COLMAP model name),
  ``prior_focal_length`` (trust the default focal guess as a prior), ``default_focal_factor``, ``descriptor_uint8``
  (see :mod:`cd_sfm.colmap.database`).
* ``verification``: :mod:`cd_sfm.colmap.verify` options (``min_num_inliers``, ``ransac: {max_error: ...}``).
* ``mapper`` (incremental | global | hierarchical); ``incremental_options`` / ``global_options`` /
  ``hierarchical_options``: attributes of pycolmap's ``IncrementalPipelineOptions`` / ``GlobalPipelineOptions`` /
  ``HierarchicalPipelineOptions`` for the mapper in use (nested dicts for nested options; one key per mapper so that
  a preset can tune each and ``--mapper`` still picks any), ``mapping_retries`` (map again with
  the next seed when images with verified pairs stay unregistered; scenes up to 300 images), ``mapping_fallback``
  (when the incremental mapper still leaves out images with verified pairs, or its model does not agree with the
  two-view geometries, try the global mapper too, and the other way round, keeping the model that registers the
  most images among those that agree: :mod:`cd_sfm.colmap.consistency`), ``seed`` (-1: random).
* ``ray``: null (in process), or ``auto`` / ``local`` / a cluster address: extraction and matching run on Ray workers
  (:mod:`cd_sfm.distributed`; same files as in process); ``ray_options``: :class:`cd_sfm.distributed.RayConf` fields
  (``num_workers``, ``ship_data``, ...). Without it nothing imports Ray.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from .io import CdSfmError, atomic_write_text

DEFAULTS: dict[str, Any] = {
    "features": "contextdesc",
    "max_image_size": None,
    "features_options": {},
    "model": None,
    "augment": True,
    "model_digest": None,  # recorded by the pipeline (hash of the ContextDesc weights used), not set by users
    "pairs": "auto",
    "overlap": 10,
    "num_neighbors": 20,
    "retrieval": "auto",
    "matching": "NN-ratio",
    "matching_options": {"cross_ratio": True},
    "camera_mode": "auto",
    "camera_model": "SIMPLE_RADIAL",
    "prior_focal_length": False,
    "default_focal_factor": 1.2,
    "descriptor_uint8": "auto",
    "verification": {"min_num_inliers": 15, "ransac": {"max_error": 4.0}},
    "mapper": "incremental",
    "incremental_options": {},
    "global_options": {},
    "hierarchical_options": {},
    "mapping_retries": 1,
    "mapping_fallback": True,
    "seed": 0,
    "ray": None,
    "ray_options": {},
}

# keys whose change makes existing feature / match files of an output folder stale
FEATURE_KEYS = ("features", "max_image_size", "features_options", "model", "model_digest", "augment")
MATCHING_KEYS = FEATURE_KEYS + ("matching", "matching_options")


PRESET_DIR = Path(__file__).resolve().parent / "configs"


def config_dirs() -> list[Path]:
    """Folders searched for ``NAME.yaml``: the package's ``cd_sfm/configs`` (package data: present after a wheel
    install too; the top-level ``configs/`` of a source checkout only links to these files)."""
    return [PRESET_DIR] if PRESET_DIR.is_dir() else []


def _is_pipeline_preset(path: Path) -> bool:
    """``configs/`` also holds other kinds of YAML (e.g. data splits): a preset uses only pipeline keys."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and set(data) <= set(DEFAULTS)


def available_presets() -> list[str]:
    names = {p.stem for d in config_dirs() for p in d.glob("*.yaml") if _is_pipeline_preset(p)}
    return sorted(names | {"default"})


def preset_path(name: str) -> Path | None:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise CdSfmError(f"{p}: config file not found")
        return p
    for d in config_dirs():
        cand = d / f"{name}.yaml"
        if cand.is_file():
            return cand
    if name == "default":
        return None  # the defaults themselves
    raise CdSfmError(f"{name}: unknown config preset; available: {', '.join(available_presets())}, or a YAML path")


def load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise CdSfmError(f"{path}: cannot read config ({str(e).splitlines()[0]})") from e
    if not isinstance(data, dict):
        raise CdSfmError(f"{path}: a config must be a mapping of keys to values")
    return data


def check_keys(conf: dict, source: str) -> None:
    unknown = sorted(set(conf) - set(DEFAULTS))
    if unknown:
        raise CdSfmError(f"{source}: unknown config key(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}")


def load_config(preset: str | None = "default", overrides: dict | None = None) -> dict:
    """DEFAULTS, updated by the preset (name or YAML path), then by the non-None ``overrides``."""
    conf = copy.deepcopy(DEFAULTS)
    source = preset or "default"
    path = preset_path(source)
    if path is not None:
        data = load_yaml(path)
        check_keys(data, str(path))
        conf.update(copy.deepcopy(data))
    if overrides:
        over = {k: v for k, v in overrides.items() if v is not None}
        check_keys(over, "overrides")
        conf.update(copy.deepcopy(over))
    conf["_preset"] = str(path) if path is not None else "default"
    return conf


def resolve(conf: dict | str | None) -> dict:
    """A preset name / YAML path, a (partial) dict, or None -> a complete config dict."""
    if conf is None or isinstance(conf, (str, Path)):
        return load_config(str(conf) if conf is not None else "default")
    conf = dict(conf)
    preset = conf.pop("_preset", None)
    out = copy.deepcopy(DEFAULTS)
    check_keys(conf, "config")
    out.update(copy.deepcopy(conf))
    out["_preset"] = preset or "dict"
    return out


def public(conf: dict) -> dict:
    """The config without bookkeeping keys (what is saved and compared)."""
    return {k: v for k, v in conf.items() if not k.startswith("_")}


def save_config(conf: dict, path: str | Path) -> None:
    text = f"# effective configuration (preset: {conf.get('_preset', 'default')})\n"
    text += yaml.safe_dump(public(conf), sort_keys=False)
    atomic_write_text(path, text)


def read_saved(path: str | Path) -> dict | None:
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def stale_keys(old: dict | None, new: dict, keys: tuple[str, ...]) -> list[str]:
    """Keys among ``keys`` whose values differ between a saved config and the new one."""
    if old is None:
        return []
    return [k for k in keys if old.get(k, DEFAULTS.get(k)) != new.get(k, DEFAULTS.get(k))]
