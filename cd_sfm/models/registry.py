"""The weight store: where shipped, imported and downloaded ContextDesc models live, and finding and loading them
(download, import and parity checks are tooling: :mod:`cd_sfm.modeltools`).

Where models live:

* shipped with the package: ``cd_sfm/weights/<name>/`` holding ``info.json``, ``local.npz`` and optionally
  ``augment.npz`` / ``regional.npz`` (the files of ``cd_sfm.models.weights``);
* the cache folder ``$CD_SFM_HOME`` (default ``~/.cache/cd_sfm``): ``models/<name>/`` for imported and downloaded
  models, the same files plus ``original/{local,aug,regional}.pb`` (the frozen graphs they came from, kept so that
  ``models check`` can rerun the parity check at any time), and ``downloads/`` for the authors' release archives;
* any folder holding ``local.npz`` can be named by its path.

Official releases are known by name (``OFFICIAL``); :func:`cd_sfm.modeltools.manage.download` fetches and imports
them.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..io import CdSfmError, hash_file, read_npz

logger = logging.getLogger(__name__)

ENV_HOME = "CD_SFM_HOME"
DEFAULT_MODEL = "cd-sfm-v2-mini"  # what extraction uses unless told: the smallest student (README "Speed")
FULL_MODEL = "cd-sfm-v1"  # the shipped model with the official local layout: the training tools' default base
PACKAGE_WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
COMPONENTS = ("local", "augment", "regional")
WEIGHT_FILES = {"local": "local.npz", "augment": "augment.npz", "regional": "regional.npz"}
ORIGINAL_FILES = {"local": "local.pb", "augment": "aug.pb", "regional": "regional.pb"}

_BASE_URL = "https://research.altizure.com/data/contextdesc_models/"


@dataclass(frozen=True)
class OfficialModel:
    name: str
    url: str
    components: tuple
    trained_on: str
    description: str
    aliases: tuple = ()

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


OFFICIAL = {
    m.name: m
    for m in (
        OfficialModel("contextdesc", _BASE_URL + "contextdesc.tar", ("local", "augment"),
                      "GL3D (local: GeoDesc, ECCV'18; augmentation trained)",
                      "ContextDesc base: GeoDesc local model, only the augmentation trained", ("contextdesc-base",)),
        OfficialModel("contextdesc+", _BASE_URL + "contextdesc_p.tar", ("local", "augment"), "GL3D",
                      "ContextDesc+: local and augmentation trained separately (scale-aware N-pair loss)",
                      ("contextdesc_p", "contextdesc-p", "contextdesc-plus")),
        OfficialModel("contextdesc++", _BASE_URL + "contextdesc_pp.tar", ("local", "augment"), "GL3D",
                      "ContextDesc++: local and augmentation trained end to end (best)",
                      ("contextdesc_pp", "contextdesc-pp")),
        OfficialModel("retrieval", _BASE_URL + "retrieval_model.tar", ("regional",), "Google Landmarks",
                      "regional ResNet50 retrieval model (visual context for the official models)",
                      ("retrieval_model", "retrieval_resnet50")),
    )
}
_ALIASES = {a: m.name for m in OFFICIAL.values() for a in m.aliases}


def home() -> Path:
    return Path(os.environ.get(ENV_HOME) or "~/.cache/cd_sfm").expanduser()


def models_dir() -> Path:
    return home() / "models"


def downloads_dir() -> Path:
    return home() / "downloads"


def canonical_name(name: str) -> str:
    return _ALIASES.get(name, name)


@dataclass
class ModelInfo:
    name: str
    source: str  # shipped | imported | official | folder
    folder: Path
    info: dict = field(default_factory=dict)

    def path(self, component: str) -> Path | None:
        p = self.folder / WEIGHT_FILES[component]
        return p if p.is_file() else None

    def original(self, component: str) -> Path | None:
        p = self.folder / "original" / ORIGINAL_FILES[component]
        return p if p.is_file() else None

    @property
    def components(self) -> list[str]:
        return [c for c in COMPONENTS if self.path(c)]

    def digest(self, components=COMPONENTS) -> str:
        """Short SHA-256 of the weight files of ``components`` that exist: output folders record it, so features
        made with other weights under the same name are recognised as stale."""
        import hashlib

        h = hashlib.sha256()
        for c in components:
            p = self.path(c)
            if p is not None:
                h.update(c.encode())
                hash_file(h, p)
        return h.hexdigest()[:16]

    @property
    def reference(self) -> str:
        """How a configuration names this model: its registry name when it lives in the cache or the package (so
        that ``config.yaml`` records the name), else the absolute path of its folder."""
        named = {(d / self.name).resolve() for d in (models_dir(), PACKAGE_WEIGHTS)}
        return self.name if self.folder.resolve() in named else str(self.folder.resolve())

    @property
    def trained_on(self) -> str:
        t = self.info.get("trained_on")
        if isinstance(t, (list, tuple)):
            t = ", ".join(map(str, t))
        return str(t) if t else "?"


def _read_info(folder: Path) -> dict:
    p = folder / "info.json"
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        logger.warning("%s: unreadable (%s)", p, e)
        return {}


def _entry(name: str, folder: Path, default_source: str) -> ModelInfo:
    info = _read_info(folder)
    return ModelInfo(name, info.get("source", default_source), folder, info)


def list_models() -> list[ModelInfo]:
    """Every model with a folder: cache first (imported / downloaded), then shipped ones not shadowed."""
    out, seen = [], set()
    for base, source in ((models_dir(), "imported"), (PACKAGE_WEIGHTS, "shipped")):
        if not base.is_dir():
            continue
        for folder in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
            if folder.name in seen:
                continue
            if not (folder / "info.json").is_file() and not (folder / WEIGHT_FILES["local"]).is_file():
                continue
            seen.add(folder.name)
            out.append(_entry(folder.name, folder, source))
    return out


def resolve(name: str | os.PathLike | None = None, require_local: bool = True) -> ModelInfo:
    """Find a model by name (cache, then package) or by folder path; clear error when it has no weights."""
    name = str(name or DEFAULT_MODEL)
    cname = canonical_name(name)
    candidates = [(models_dir() / cname, "imported"), (PACKAGE_WEIGHTS / cname, "shipped")]
    as_path = Path(name).expanduser()
    if os.sep in name or as_path.is_dir() and (as_path / WEIGHT_FILES["local"]).is_file():
        candidates.insert(0, (as_path, "folder"))
    for folder, source in candidates:
        if folder.is_dir() and ((folder / "info.json").is_file() or (folder / WEIGHT_FILES["local"]).is_file()):
            entry = _entry(cname if source != "folder" else str(as_path), folder, source)
            if require_local and entry.path("local") is None:
                raise CdSfmError(f"{folder}: model {name!r} has no local weights ({WEIGHT_FILES['local']}); "
                                 f"reinstall the package or import/download the model")
            return entry
    known = [m.name for m in list_models()]
    hint = f"`cd-sfm models download {cname}`" if cname in OFFICIAL else "`cd-sfm models import --local L.pb ...`"
    raise CdSfmError(f"model {name!r}: no weights found (looked in {models_dir()} and {PACKAGE_WEIGHTS}); "
                     f"available: {', '.join(known) or 'none'}; get it with {hint}")


def find_component(component: str, names) -> tuple[ModelInfo | None, list[str]]:
    """The first model of ``names`` (None and repeats skipped) whose folder holds weights of ``component``, or None;
    and the names tried without them. Reads folders only (no TensorFlow)."""
    tried = []
    for name in dict.fromkeys(n for n in names if n is not None):
        try:
            entry = resolve(name, require_local=False)
        except CdSfmError:
            tried.append(name)
            continue
        if entry.path(component) is not None:
            return entry, tried
        tried.append(name)
    return None, tried


def load_keras_models(entry: ModelInfo, components=COMPONENTS, visual: bool | None = None) -> dict:
    """Build our Keras models and load the model's weight files: {component: keras.Model} for those present."""
    from .augment import build_augment_model
    from .augment_numpy import has_visual_weights
    from .local import load_local_model
    from .regional import build_regional_model
    from .weights import load_weights_npz

    out = {}
    for comp in components:
        path = entry.path(comp)
        if path is None:
            continue
        if comp == "local":
            model = load_local_model(path)  # any width (official layout, or a compact / mini student)
        elif comp == "regional":
            model = build_regional_model()
            load_weights_npz(model, path)
        else:
            has_vis = has_visual_weights(read_npz(path))
            use_vis = has_vis if visual is None else (visual and has_vis)
            model = build_augment_model(visual=use_vis, interp=entry.info.get("augment_interp", "inverse_distance"))
            load_weights_npz(model, path, allow_extra=not use_vis)
        out[comp] = model
    return out


