"""The pipeline configuration: typed per-stage settings (as pycolmap's option objects), resolved and checked once.

Users write one flat mapping (the keys below): YAML presets in ``cd_sfm/configs/``, ``--config FILE``, flags, or a
dict in Python. :func:`resolve` turns it into a :class:`Config`, whose parts are the settings of each stage
(:class:`FeatureSettings`, :class:`PairSettings`, :class:`MatchingSettings`, :class:`DatabaseSettings`,
:class:`VerificationSettings`, :class:`MappingSettings`, :class:`RaySettings`), after checking every value: a bad
type, range or name, or an option that the stage (or pycolmap's option object) does not have, is reported before any
work, one line per problem. A :class:`Config` reads as the flat mapping too (``conf["pairs"]``), which is what
``config.yaml`` stores. :data:`DEFAULTS` holds the one default of every key.

Precedence (lowest first): :data:`DEFAULTS` < the preset (``--config NAME`` for ``cd_sfm/configs/NAME.yaml``, package
data, so an installed wheel has them too; the top-level ``configs/`` of the source tree links there; or a path to a
YAML file) < command-line flags. A preset holds only the keys it changes; unknown keys are an error (a typo must not
be silently ignored). The effective configuration of a run is written to ``<out>/config.yaml``.

Keys:

* ``features``: a preset of :data:`cd_sfm.features.extract.confs` (``sift``, ``rootsift``, ``contextdesc``, ...);
  ``max_image_size``: longest image side the features see (None: the preset's; 0: full size); ``features_options``:
  overrides of the backend's options (its ``Conf`` fields, e.g. ``{max_keypoints: 4096}``).
* ``model``: the ContextDesc model (a name of ``cd-sfm models list`` or a folder holding ``local.npz``; null: the
  shipped default, recorded by name in the saved ``config.yaml``); ``augment``: false stores the raw local
  descriptors even when the model has augmentation weights. Both only matter for ContextDesc features.
* ``masks``: a folder of feature masks as COLMAP's ``--ImageReader.mask_path`` (image ``a/b.jpg`` -> mask
  ``a/b.jpg.png``, or ``a/b.png``; black pixels get no keypoints; drawn on the stored pixels): for turntables, fixed
  overlays, a drone's landing gear. Images without a mask are not masked; an image whose mask is added, changed or
  removed is extracted (and matched) again.
* ``pairs``: ``auto`` (the default: exhaustive up to 50 images, else retrieval, plus sequential when the names or
  EXIF times look like a sequence; :mod:`cd_sfm.pairs.auto`), ``exhaustive``, ``sequential`` (each image with the
  next ``overlap``), ``retrieval`` (each image with its ``num_neighbors`` most similar), ``spatial`` (each image with
  its ``num_neighbors`` nearest by EXIF GPS position within ``spatial_max_distance`` metres, as COLMAP's spatial
  matcher: :mod:`cd_sfm.pairs.spatial`), the path of a pair file
  (``name0 name1`` lines), or a union of these joined by ``+`` (``retrieval+sequential``; repeated pairs dropped).
  ``retrieval``: the global descriptor, ``regional`` (GeM of the regional ResNet50, needs its weights), ``local``
  (VLAD of the images' own local descriptors) or ``auto`` (regional when its weights are available, else local).
* ``matching``: a preset of :data:`cd_sfm.matching.confs`; ``matching_options``: overrides (keys of
  :data:`cd_sfm.matching.DEFAULT_CONF`, e.g. ``{ratio: 0.9}``); by default ``cross_ratio``: the ratio test both
  ways, as COLMAP's cross check (fewer wrong matches on repeated structures: on sacre_coeur with SIFT it turned a
  seed-dependent 3-of-10 registration into 10 of 10), and ``screen: auto``: from 6144 keypoints a pair is first
  screened on its principal axes and the candidates rescored exactly (:func:`cd_sfm.matching.match_descriptors`;
  1.7-1.9x the exact pass at 8k keypoints, all of its matches plus 0.02 % more, docs/speed.md "Matching"); ``screen: 0``
  matches exactly.
* ``camera_mode`` (auto | single | per-folder | per-image), ``camera_model`` (a COLMAP model name),
  ``prior_focal_length`` (trust the default focal guess as a prior), ``default_focal_factor``, ``descriptor_uint8``
  (see :mod:`cd_sfm.colmap.database`), ``rig_config`` (COLMAP's ``rig_config.json``: each rig camera's images share a
  camera, images whose names match after their camera's prefix form a frame; rig poses the file leaves out are
  measured on a model mapped without the rigs first).
* ``verification``: :mod:`cd_sfm.colmap.verify` options (``pycolmap.TwoViewGeometryOptions`` attributes such as
  ``min_num_inliers``, and ``ransac: {max_error: ...}``).
* ``mapper`` (incremental | global | hierarchical); ``incremental_options`` / ``global_options`` /
  ``hierarchical_options``: attributes of pycolmap's ``IncrementalPipelineOptions`` / ``GlobalPipelineOptions`` /
  ``HierarchicalPipelineOptions`` for the mapper in use (nested dicts for nested options; one key per mapper so that
  a preset can tune each and ``--mapper`` still picks any), ``mapping_retries`` (map again with
  the next seed when images with verified pairs stay unregistered; scenes up to 300 images), ``mapping_fallback``
  (when the incremental mapper still leaves out images with verified pairs, or its model does not agree with the
  two-view geometries, try the global mapper too, and the other way round, keeping the model that registers the
  most images among those that agree: :mod:`cd_sfm.colmap.consistency`; one with more images than the configured
  mapper's must also hold more 3D points), ``min_image_points`` (an image stays in a model only when it observes at
  least this many of its 3D points, COLMAP's bar for registering an image; 0 keeps all), ``extend`` (continue the
  output folder's ``sparse/0`` instead of mapping from scratch: its cameras keep their poses and the new images are
  registered into it, as COLMAP's ``mapper --input_path``), ``georeference`` (a model whose images carry EXIF GPS
  positions, at least 3 registered and spanning 4 x ``gps_max_error`` metres or more, is moved into east-north-up
  metres around them: :mod:`cd_sfm.colmap.georeference`), ``seed`` (-1: random).
* ``ray``: null (in process), or ``auto`` / ``local`` / a cluster address: extraction and matching run on Ray workers
  (:mod:`cd_sfm.distributed`; same files as in process); ``ray_options``: :class:`cd_sfm.distributed.RayConf` fields
  (``num_workers``, ``ship_data``, ...). Without it nothing imports Ray.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .colmap import database as _database, mapping as _mapping, verify as _verify
from .colmap.database import CAMERA_MODES, DESCRIPTOR_UINT8_MODES
from .colmap.mapping import MAPPERS
from .io import CdSfmError, atomic_write_text
from .models import PRECISIONS  # ContextDesc inference (re-exported for the CLIs)

DEFAULTS: dict[str, Any] = {
    "features": "contextdesc",
    "max_image_size": None,
    "features_options": {},
    "model": None,
    "augment": True,
    "model_digest": None,  # recorded by the pipeline (hash of the ContextDesc weights used), not set by users
    "masks": None,
    "pairs": "auto",
    "overlap": 10,
    "num_neighbors": 20,
    "spatial_max_distance": 100.0,
    "retrieval": "auto",
    "matching": "NN-ratio",
    "matching_options": {"cross_ratio": True, "screen": "auto"},
    # the database, verification and mapping stages keep their own defaults (hloc-style ``default_conf``); these
    # keys name them in the one flat configuration
    **{key: _database.default_conf[key] for key in ("camera_mode", "camera_model", "prior_focal_length",
                                                     "default_focal_factor", "descriptor_uint8")},
    "rig_config": None,
    "verification": {"min_num_inliers": _verify.default_conf["min_num_inliers"],
                     "ransac": {"max_error": _verify.default_conf["ransac"]["max_error"]}},
    "mapper": _mapping.default_conf["mapper"],
    "incremental_options": {},
    "global_options": {},
    "hierarchical_options": {},
    "mapping_retries": _mapping.default_conf["retries"],
    "mapping_fallback": _mapping.default_conf["fallback"],
    "min_image_points": _mapping.default_conf["min_image_points"],
    "extend": False,
    "georeference": _mapping.default_conf["georeference"],
    "gps_max_error": _mapping.default_conf["gps_max_error"],
    "seed": _mapping.default_conf["seed"],
    "ray": None,
    "ray_options": {},
}

# keys whose change makes existing feature / match files of an output folder stale
FEATURE_KEYS = ("features", "max_image_size", "features_options", "model", "model_digest", "augment")
MATCHING_KEYS = FEATURE_KEYS + ("matching", "matching_options")

PAIR_METHODS = ("auto", "exhaustive", "sequential", "retrieval", "spatial")
RETRIEVAL_KINDS = ("auto", "regional", "local")


# --------------------------------------------------------------------------------------------------------------------
# the typed settings of each stage


@dataclass(frozen=True)
class FeatureSettings:
    """The extract stage: a preset of ``features.extract.confs`` with our overrides; for ContextDesc the model (its
    name or folder, resolved once by the pipeline) and whether to augment."""

    features: str = DEFAULTS["features"]
    max_image_size: int | None = DEFAULTS["max_image_size"]
    options: dict = field(default_factory=dict)
    model: str | None = None
    augment: bool = True
    model_digest: str | None = None
    masks: str | None = None

    @functools.cached_property
    def _preset(self) -> dict:
        from .features.extract import resolve_conf

        return resolve_conf(self.features)  # read once per settings object

    def preset(self) -> dict:
        """The feature preset ``features`` names (a copy)."""
        return copy.deepcopy(self._preset)

    @property
    def backend(self) -> str:
        return self._preset["backend"]

    @property
    def contextdesc(self) -> bool:
        return self.backend == "contextdesc"

    def model_name(self) -> str | None:
        """``model`` wins over ``features_options: {model: ...}`` (the older spelling, still honoured)."""
        return self.model or self.options.get("model")

    def extraction_conf(self) -> dict:
        """The conf of :func:`cd_sfm.features.extract.main`: the preset with our overrides; for ContextDesc also the
        ``model`` and ``augment`` options and the weights' digest (stamped in ``features.h5``)."""
        fconf = self.preset()
        if self.max_image_size is not None:
            fconf["max_image_size"] = int(self.max_image_size) or None
        if self.options:
            fconf["options"] = {**(fconf.get("options") or {}), **self.options}
        if fconf.get("backend") == "contextdesc":
            options = dict(fconf.get("options") or {})
            if self.model is not None:
                options["model"] = str(self.model)
            if not self.augment:
                options["augment"] = False
            fconf["options"] = options
            fconf["model_digest"] = self.model_digest
        return fconf


@dataclass(frozen=True)
class PairSettings:
    pairs: str = DEFAULTS["pairs"]
    overlap: int = DEFAULTS["overlap"]
    num_neighbors: int = DEFAULTS["num_neighbors"]
    spatial_max_distance: float = DEFAULTS["spatial_max_distance"]
    retrieval: str = DEFAULTS["retrieval"]

    @property
    def sources(self) -> list[str]:
        """A method, a pair file, or several joined by ``+`` (``retrieval+sequential``, ``sequential+my_pairs.txt``).
        A path of an existing file is one source even when its name holds a ``+``."""
        spec = str(self.pairs).strip()
        if spec in PAIR_METHODS or Path(spec).is_file():
            return [spec]
        parts = [p.strip() for p in spec.split("+")]
        return parts if len(parts) > 1 and all(parts) else [spec]


@dataclass(frozen=True)
class MatchingSettings:
    matching: str = DEFAULTS["matching"]
    options: dict = field(default_factory=lambda: dict(DEFAULTS["matching_options"]))

    def matcher_conf(self) -> dict:
        """The conf of :func:`cd_sfm.matching.main`: the preset with the overrides."""
        from .matching import resolve_conf

        return {**resolve_conf(self.matching), **self.options}


@dataclass(frozen=True)
class DatabaseSettings:
    camera_mode: str = DEFAULTS["camera_mode"]
    camera_model: str = DEFAULTS["camera_model"]
    prior_focal_length: bool = DEFAULTS["prior_focal_length"]
    default_focal_factor: float = DEFAULTS["default_focal_factor"]
    descriptor_uint8: str = DEFAULTS["descriptor_uint8"]
    rig_config: str | None = DEFAULTS["rig_config"]

    def as_dict(self) -> dict:
        """The conf of :func:`cd_sfm.colmap.database.main` (the rig configuration goes separately)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "rig_config"}


@dataclass(frozen=True)
class VerificationSettings:
    options: dict = field(default_factory=lambda: copy.deepcopy(DEFAULTS["verification"]))
    seed: int = DEFAULTS["seed"]

    def verify_conf(self) -> dict:
        """The conf of :func:`cd_sfm.colmap.verify.main`: reproducible RANSAC unless the options set their own
        seed."""
        conf = copy.deepcopy(self.options)
        if self.seed is not None and int(self.seed) >= 0:
            conf.setdefault("ransac", {}).setdefault("random_seed", int(self.seed))
        return conf


@dataclass(frozen=True)
class MappingSettings:
    mapper: str = DEFAULTS["mapper"]
    incremental_options: dict = field(default_factory=dict)
    global_options: dict = field(default_factory=dict)
    hierarchical_options: dict = field(default_factory=dict)
    retries: int = DEFAULTS["mapping_retries"]
    fallback: bool = DEFAULTS["mapping_fallback"]
    min_image_points: int = DEFAULTS["min_image_points"]
    extend: bool = DEFAULTS["extend"]
    georeference: bool = DEFAULTS["georeference"]
    gps_max_error: float = DEFAULTS["gps_max_error"]
    seed: int = DEFAULTS["seed"]

    def options_of(self, mapper: str | None) -> dict:
        return dict(getattr(self, f"{mapper}_options")) if mapper else {}

    def mapping_conf(self) -> dict:
        """The conf of :func:`cd_sfm.colmap.mapping.main`."""
        from .colmap.mapping import OTHER_MAPPER

        other = OTHER_MAPPER.get(self.mapper)
        return {"mapper": self.mapper, "options": self.options_of(self.mapper), "seed": self.seed,
                "retries": self.retries, "fallback": self.fallback, "fallback_options": self.options_of(other),
                "min_image_points": self.min_image_points, "georeference": self.georeference,
                "gps_max_error": self.gps_max_error}


@dataclass(frozen=True)
class RaySettings:
    address: str | None = None
    options: dict = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.address is not None and self.address is not False

    def summary(self) -> dict | None:
        """The Ray setting of a run for its summary: None (in process) or the address and the options given."""
        return {"address": str(self.address), **self.options} if self.enabled else None


# flat key -> (part, field of that part); ``seed`` feeds two parts
FLAT: dict[str, tuple[str, str]] = {
    "features": ("features", "features"), "max_image_size": ("features", "max_image_size"),
    "features_options": ("features", "options"), "model": ("features", "model"), "augment": ("features", "augment"),
    "model_digest": ("features", "model_digest"), "masks": ("features", "masks"),
    "pairs": ("pairs", "pairs"), "overlap": ("pairs", "overlap"), "num_neighbors": ("pairs", "num_neighbors"),
    "spatial_max_distance": ("pairs", "spatial_max_distance"),
    "retrieval": ("pairs", "retrieval"),
    "matching": ("matching", "matching"), "matching_options": ("matching", "options"),
    "camera_mode": ("database", "camera_mode"), "camera_model": ("database", "camera_model"),
    "prior_focal_length": ("database", "prior_focal_length"),
    "default_focal_factor": ("database", "default_focal_factor"),
    "descriptor_uint8": ("database", "descriptor_uint8"), "rig_config": ("database", "rig_config"),
    "verification": ("verification", "options"),
    "mapper": ("mapping", "mapper"), "incremental_options": ("mapping", "incremental_options"),
    "global_options": ("mapping", "global_options"), "hierarchical_options": ("mapping", "hierarchical_options"),
    "mapping_retries": ("mapping", "retries"), "mapping_fallback": ("mapping", "fallback"),
    "min_image_points": ("mapping", "min_image_points"),
    "extend": ("mapping", "extend"),
    "georeference": ("mapping", "georeference"), "gps_max_error": ("mapping", "gps_max_error"),
    "seed": ("mapping", "seed"),
    "ray": ("ray", "address"), "ray_options": ("ray", "options"),
}
assert set(FLAT) == set(DEFAULTS)


@dataclass(frozen=True)
class Config(Mapping):
    """A checked configuration: the settings of each stage. Also a read-only mapping of the flat keys."""

    features: FeatureSettings = field(default_factory=FeatureSettings)
    pairs: PairSettings = field(default_factory=PairSettings)
    matching: MatchingSettings = field(default_factory=MatchingSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    verification: VerificationSettings = field(default_factory=VerificationSettings)
    mapping: MappingSettings = field(default_factory=MappingSettings)
    ray: RaySettings = field(default_factory=RaySettings)
    preset: str = "default"  # where it came from: a preset name, a YAML path, "dict"

    # ---- the flat view (config.yaml, dict-style reads)
    @classmethod
    def from_flat(cls, flat: dict, preset: str = "dict") -> "Config":
        """A Config from a complete, checked flat mapping (see :func:`resolve` for partial or unchecked ones)."""
        parts: dict[str, dict] = {}
        for key, (part, name) in FLAT.items():
            parts.setdefault(part, {})[name] = copy.deepcopy(flat[key])
        parts["verification"]["seed"] = flat["seed"]
        kinds = {"features": FeatureSettings, "pairs": PairSettings, "matching": MatchingSettings,
                 "database": DatabaseSettings, "verification": VerificationSettings, "mapping": MappingSettings,
                 "ray": RaySettings}
        return cls(**{part: kinds[part](**values) for part, values in parts.items()}, preset=preset)

    def to_dict(self) -> dict:
        """The flat mapping (what ``config.yaml`` stores)."""
        return {key: copy.deepcopy(getattr(getattr(self, part), name)) for key, (part, name) in FLAT.items()}

    def replace(self, **flat) -> "Config":
        """A copy with some flat keys changed (not checked again: for values the pipeline derives)."""
        return Config.from_flat({**self.to_dict(), **flat}, self.preset)

    def __getitem__(self, key: str):
        if key == "_preset":
            return self.preset
        part, name = FLAT[key]
        return getattr(getattr(self, part), name)

    def __iter__(self):
        return iter(FLAT)

    def __len__(self) -> int:
        return len(FLAT)


# --------------------------------------------------------------------------------------------------------------------
# checks: every value, one line per problem


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(lo: int | None = None, none: bool = False):
    def check(v):
        if v is None and none:
            return None
        if not _is_int(v) or (lo is not None and v < lo):
            return f"expected an integer{f' >= {lo}' if lo is not None else ''}{' or null' if none else ''}"
        return None
    return check


def _num(lo: float | None = None, hi: float | None = None, open_lo: bool = False, none: bool = False):
    def check(v):
        if v is None and none:
            return None
        bad = not _is_num(v) or (lo is not None and (v <= lo if open_lo else v < lo)) or (hi is not None and v > hi)
        if bad:
            rng = ""
            if lo is not None:
                rng += f" {'>' if open_lo else '>='} {lo}"
            if hi is not None:
                rng += f"{' and' if lo is not None else ''} <= {hi}"
            return f"expected a number{rng}{' or null' if none else ''}"
        return None
    return check


def _bool(v):
    return None if isinstance(v, bool) else "expected true or false"


def _rig_config(v):
    """A COLMAP ``rig_config.json`` that pycolmap reads (or null)."""
    if v is None:
        return None
    if not isinstance(v, str) or not v.strip():
        return "expected the path of a COLMAP rig_config.json or null"
    if not Path(v).is_file():
        return f"{v}: file not found"
    from .colmap.database import read_rig_config

    try:
        read_rig_config(v)
    except CdSfmError as e:
        return str(e).removeprefix(f"{v}: ")
    return None


def _one_of(values, none: bool = False):
    def check(v):
        if v is None and none:
            return None
        if not isinstance(v, str) or v not in values:
            return f"expected one of {', '.join(map(str, values))}"
        return None
    return check


def _str(none: bool = False):
    def check(v):
        if v is None and none:
            return None
        return None if isinstance(v, str) and v.strip() else "expected a non-empty string"
    return check


def _mapping(v):
    return None if isinstance(v, dict) else "expected a mapping of options"


def _feature_preset(v):
    from .features.extract import confs

    return None if isinstance(v, str) and v in confs else f"unknown feature preset; available: {', '.join(sorted(confs))}"


def _matching_preset(v):
    from .matching import confs

    return None if isinstance(v, str) and v in confs else f"unknown matching preset; available: {', '.join(sorted(confs))}"


def _camera_model(v):
    import pycolmap

    names = [n for n in pycolmap.CameraModelId.__members__ if n != "INVALID"]
    return None if isinstance(v, str) and v in names else f"unknown COLMAP camera model; one of {', '.join(names)}"


def _descriptor_uint8(v):
    if v in DESCRIPTOR_UINT8_MODES or isinstance(v, bool):
        return None
    return f"expected one of {', '.join(DESCRIPTOR_UINT8_MODES)}"


def _ray(v):
    if v is None or v is False:
        return None
    return None if isinstance(v, str) and v.strip() else "give auto, local or a cluster address"


CHECKS = {
    "features": _feature_preset,
    "max_image_size": _int(0, none=True),
    "features_options": _mapping,
    "model": _str(none=True),
    "augment": _bool,
    "model_digest": _str(none=True),
    "masks": _str(none=True),
    "pairs": _str(),
    "overlap": _int(1),
    "num_neighbors": _int(1),
    "spatial_max_distance": _num(0, open_lo=True),
    "retrieval": _one_of(RETRIEVAL_KINDS),
    "matching": _matching_preset,
    "matching_options": _mapping,
    "camera_mode": _one_of(CAMERA_MODES),
    "camera_model": _camera_model,
    "prior_focal_length": _bool,
    "default_focal_factor": _num(0, open_lo=True),
    "descriptor_uint8": _descriptor_uint8,
    "rig_config": _rig_config,
    "verification": _mapping,
    "mapper": _one_of(MAPPERS),
    "incremental_options": _mapping,
    "global_options": _mapping,
    "hierarchical_options": _mapping,
    "mapping_retries": _int(0),
    "mapping_fallback": _bool,
    "min_image_points": _int(0),
    "extend": _bool,
    "georeference": _bool,
    "gps_max_error": _num(0, open_lo=True),
    "seed": _int(-1),
    "ray": _ray,
    "ray_options": _mapping,
}
assert set(CHECKS) == set(DEFAULTS)

# ranges of backend and matching options beyond their declared types
OPTION_CHECKS = {
    "max_keypoints": _int(1),
    "contrast_threshold": _num(0, open_lo=True),
    "edge_threshold": _num(0, open_lo=True),
    "n_octave_layers": _int(1),
    "sigma": _num(0, open_lo=True),
    "max_image_size": _int(0),
    "regional_max_size": _int(32),
    "precision": _one_of(PRECISIONS),
    "batch_size": _int(1),
    "threads": _int(0, none=True),
    "parallel_images": _int(0),
    "model": _str(),
    # matching
    "ratio": _num(0, 1, open_lo=True, none=True),
    "distance_threshold": _num(0, open_lo=True, none=True),
    "metric": _one_of(("l2", "angle")),
    "cache_mb": _num(0, open_lo=True),
    "block_rows": _int(1),
    "num_workers": _int(1, none=True),
    "screen_k": _int(2),
}


def _type_matches(value, t) -> bool:
    if t is bool:
        return isinstance(value, bool)
    if t is int:
        return _is_int(value)
    if t is float:
        return _is_num(value)
    if t is str:
        return isinstance(value, str)
    return True  # other declared types are not checked here


def _check_typed(value, annotation) -> str | None:
    """``value`` against a declared type (bool, int, float, str, or a union of them and None)."""
    union = isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
    kinds = typing.get_args(annotation) if union else (annotation,)
    if value is None:
        return None if type(None) in kinds or object in kinds else "expected a value, not null"
    if any(_type_matches(value, t) for t in kinds if t is not type(None)):
        return None
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return "expected " + " or ".join(names.get(t, getattr(t, "__name__", str(t))) for t in kinds)


def _check_options(options: dict, conf_cls, where: str, problems: list[str], skip_types: tuple = ()) -> None:
    """Backend / Ray / matching options: known keys (the fields of a dataclass, or the keys of a defaults dict),
    declared types, ranges."""
    if conf_cls is None:
        return
    if isinstance(conf_cls, dict):
        known = {k: object if v is None else type(v) for k, v in conf_cls.items()}
    else:
        hints = typing.get_type_hints(conf_cls)
        known = {f.name: hints.get(f.name, object) for f in dataclasses.fields(conf_cls)}
    for k, v in options.items():
        if k not in known:
            problems.append(f"{where}.{k}: unknown option; known: {', '.join(sorted(known))}")
            continue
        msg = OPTION_CHECKS[k](v) if k in OPTION_CHECKS else (None if k in skip_types else _check_typed(v, known[k]))
        if msg:
            problems.append(f"{where}.{k} {v!r}: {msg}")


def _check_pycolmap(flat: dict, problems: list[str]) -> None:
    """Verification and mapper options through pycolmap's own option objects (unknown attributes, wrong types)."""
    from .colmap import mapping, verify

    try:
        verify.two_view_options(flat["verification"])
    except (CdSfmError, TypeError, ValueError) as e:
        problems.append(f"verification: {_first_line(e)}")
    for mapper in MAPPERS:
        try:
            mapping.pipeline_options({"mapper": mapper, "options": flat[f"{mapper}_options"]})
        except (CdSfmError, TypeError, ValueError) as e:
            problems.append(f"{mapper}_options: {_first_line(e)}")


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def problems_of(flat: dict) -> list[str]:
    """Every problem of a complete flat configuration, one line each (empty: fine)."""
    problems = []
    for key, check in CHECKS.items():
        msg = check(flat[key])
        if msg:
            problems.append(f"{key} {flat[key]!r}: {msg}")
    bad = {p.split(" ")[0].split(".")[0] for p in problems}
    if not {"features", "features_options"} & bad:
        from .features import get_backend
        from .features.extract import resolve_conf

        backend = get_backend(resolve_conf(flat["features"])["backend"])
        _check_options(flat["features_options"], getattr(backend, "Conf", None), "features_options", problems)
    if "matching_options" not in bad:
        from .matching import DEFAULT_CONF

        _check_options(flat["matching_options"], DEFAULT_CONF, "matching_options", problems,
                       skip_types=("screen", "threads", "distance_threshold", "ratio", "num_workers"))
        screen = flat["matching_options"].get("screen", 0)
        if not (screen == "auto" or _is_int(screen) and screen >= 0):
            problems.append(f"matching_options.screen {screen!r}: expected auto or an integer >= 0")
    if flat["ray_options"] and isinstance(flat["ray_options"], dict):
        from .distributed import RayConf

        _check_options(flat["ray_options"], RayConf, "ray_options", problems)
    if not {"verification", "incremental_options", "global_options", "hierarchical_options"} & bad:
        _check_pycolmap(flat, problems)
    return problems


# --------------------------------------------------------------------------------------------------------------------
# presets and files


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


def check_keys(conf: Mapping, source: str) -> None:
    unknown = sorted(set(conf) - set(DEFAULTS) - {"_preset"})
    if unknown:
        raise CdSfmError(f"{source}: unknown config key(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}")


def _build(values: Mapping, preset: str, source: str) -> Config:
    """DEFAULTS updated by ``values``, every value checked: a :class:`Config`, or one ``CdSfmError`` with a line per
    problem."""
    check_keys(values, source)
    flat = copy.deepcopy(DEFAULTS)
    flat.update(copy.deepcopy({k: v for k, v in values.items() if k != "_preset"}))
    problems = problems_of(flat)
    if problems:
        head = f"{source}: " if len(problems) == 1 else f"{source}: {len(problems)} problems in the configuration:\n  "
        raise CdSfmError(head + "\n  ".join(problems))
    return Config.from_flat(flat, preset)


def load_config(preset: str | None = "default", overrides: Mapping | None = None) -> Config:
    """DEFAULTS, updated by the preset (name or YAML path), then by the non-None ``overrides``; checked."""
    source = preset or "default"
    path = preset_path(source)
    values: dict = {}
    if path is not None:
        data = load_yaml(path)
        check_keys(data, str(path))
        values.update(data)
    if overrides:
        over = {k: v for k, v in overrides.items() if v is not None}
        check_keys(over, "overrides")
        values.update(over)
    return _build(values, str(path) if path is not None else "default", str(path) if path is not None else "config")


def resolve(conf: Config | Mapping | str | Path | None, source: str = "config") -> Config:
    """A :class:`Config` (returned as it is), a preset name / YAML path, a (partial) flat mapping, or None -> a
    checked :class:`Config`."""
    if isinstance(conf, Config):
        return conf
    if conf is None or isinstance(conf, (str, Path)):
        return load_config(str(conf) if conf is not None else "default")
    preset = conf.get("_preset") or "dict"
    return _build(conf, preset, source)


def public(conf: Mapping) -> dict:
    """The flat configuration without bookkeeping keys (what is saved and compared)."""
    if isinstance(conf, Config):
        return conf.to_dict()
    return {k: v for k, v in conf.items() if not k.startswith("_")}


def save_config(conf: Config, path: str | Path) -> None:
    text = f"# effective configuration (preset: {conf.preset if isinstance(conf, Config) else 'dict'})\n"
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


def stale_keys(old: Mapping | None, new: Mapping, keys: tuple[str, ...]) -> list[str]:
    """Keys among ``keys`` whose values differ between a saved config and the new one."""
    if old is None:
        return []
    return [k for k in keys if old.get(k, DEFAULTS.get(k)) != new.get(k, DEFAULTS.get(k))]
