"""Weights manager: shipped, imported and downloaded ContextDesc models.

Where models live:

* shipped with the package: ``cd_sfm/weights/<name>/`` holding ``info.json``, ``local.npz`` and optionally
  ``augment.npz`` / ``regional.npz`` (the files of ``cd_sfm.models.weights``);
* the cache folder ``$CD_SFM_HOME`` (default ``~/.cache/cd_sfm``): ``models/<name>/`` for imported and downloaded
  models, the same files plus ``original/{local,aug,regional}.pb`` (the frozen graphs they came from, kept so that
  ``models check`` can rerun the parity check at any time), and ``downloads/`` for the authors' release archives;
* any folder holding ``local.npz`` can be named by its path.

Official releases are known by name (``OFFICIAL``); ``download`` fetches the archive with a progress bar, resumes an
interrupted download (HTTP Range), unpacks the ``.pb`` files and imports them. Offline it stops with one line that
says where to put the archive by hand.

CLI hooks: ``add_models_subparser(subparsers)`` adds ``models list | download | import | check``; or call
``cmd_list``, ``cmd_download``, ``cmd_import``, ``cmd_check`` with an argparse namespace (arguments in
``add_models_subparser``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..io import CdSfmError, hash_file, read_npz

logger = logging.getLogger(__name__)

ENV_HOME = "CD_SFM_HOME"
DEFAULT_MODEL = "cd-sfm-v1"
PACKAGE_WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
COMPONENTS = ("local", "augment", "regional")
WEIGHT_FILES = {"local": "local.npz", "augment": "augment.npz", "regional": "regional.npz"}
ORIGINAL_FILES = {"local": "local.pb", "augment": "aug.pb", "regional": "regional.pb"}
PARITY_TOLERANCE = 1e-4

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


# --------------------------------------------------------------------------------------------------------------------
# download


def download_file(url: str, dest: Path, progress: bool = True, timeout: float = 30.0, chunk: int = 1 << 20) -> Path:
    """Download ``url`` to ``dest`` with a progress bar; resumes a previous ``dest.part`` with an HTTP Range
    request. A network failure raises ``CdSfmError`` saying where to put the file by hand."""
    from tqdm import tqdm

    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    pos = part.stat().st_size if part.is_file() else 0
    by_hand = f"download it by hand and put it at {dest} (then rerun the command)"
    headers = {"User-Agent": "cd_sfm"}
    if pos:
        headers["Range"] = f"bytes={pos}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and pos:  # the part file is already complete
            os.replace(part, dest)
            return dest
        raise CdSfmError(f"{url}: download failed (HTTP {e.code} {e.reason}); {by_hand}") from None
    except (urllib.error.URLError, OSError, socket.timeout) as e:
        reason = getattr(e, "reason", e)
        raise CdSfmError(f"{url}: cannot download ({reason}); {by_hand}") from None
    with resp:
        status = getattr(resp, "status", 200)
        if pos and status != 206:
            logger.info("%s: server ignored the resume request, starting over", url)
            pos = 0
        length = resp.headers.get("Content-Length")
        total = int(length) + pos if length is not None else None
        if pos:
            logger.info("resuming %s at %d bytes", dest.name, pos)
        try:
            with open(part, "ab" if pos else "wb") as f, tqdm(
                total=total, initial=pos, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                disable=not progress,
            ) as bar:
                while True:
                    data = resp.read(chunk)
                    if not data:
                        break
                    f.write(data)
                    bar.update(len(data))
        except (OSError, socket.timeout) as e:
            raise CdSfmError(f"{url}: download interrupted ({e}); rerun to resume, or {by_hand}") from None
    if total is not None and part.stat().st_size != total:
        raise CdSfmError(f"{url}: download incomplete ({part.stat().st_size} of {total} bytes); rerun to resume, "
                         f"or {by_hand}")
    os.replace(part, dest)
    return dest


def _extract_pbs(archive: Path, dest: Path) -> list[Path]:
    """The ``.pb`` files of a release archive (a tar, or a folder / single .pb put there by hand)."""
    if archive.is_dir():
        return sorted(archive.rglob("*.pb"))
    if archive.suffix == ".pb":
        return [archive]
    try:
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".pb")]
            if not members:
                raise CdSfmError(f"{archive}: no .pb file in the archive")
            dest.mkdir(parents=True, exist_ok=True)
            out = []
            for m in members:
                target = dest / Path(m.name).name
                src = tar.extractfile(m)
                with open(target, "wb") as f:
                    shutil.copyfileobj(src, f)
                out.append(target)
            return sorted(out)
    except tarfile.TarError as e:
        raise CdSfmError(f"{archive}: not a readable tar archive ({e}); delete it and download again") from None


def classify_pbs(paths) -> dict[str, Path]:
    """Which frozen graph is which: ``loc.pb`` / ``contextdesc-*.pb`` local, ``aug.pb`` / ``*-aug.pb``
    augmentation, ``retrieval*.pb`` (or any other) regional."""
    out = {}
    for p in map(Path, paths):
        n = p.name.lower()
        if n == "aug.pb" or n.endswith("-aug.pb") or n.endswith("_aug.pb"):
            out.setdefault("augment", p)
        elif n == "loc.pb" or re.fullmatch(r"contextdesc.*\.pb", n) or n == "local.pb":
            out.setdefault("local", p)
        elif "retrieval" in n or "resnet" in n or n == "regional.pb":
            out.setdefault("regional", p)
    return out


def download(name: str, with_regional: bool = True, progress: bool = True) -> ModelInfo:
    """Download an official release by name, unpack and import it into the cache (also the regional model, shared
    by all official releases, unless ``with_regional`` is False)."""
    cname = canonical_name(name)
    if cname not in OFFICIAL:
        raise CdSfmError(f"model {name!r}: no official download known; known: {', '.join(OFFICIAL)}")
    off = OFFICIAL[cname]
    wanted = [off]
    if with_regional and "regional" not in off.components:
        wanted.append(OFFICIAL["retrieval"])
    graphs = {}
    for m in wanted:
        archive = downloads_dir() / m.filename
        by_hand_dir = downloads_dir() / m.filename.rsplit(".", 1)[0]
        source = by_hand_dir if by_hand_dir.is_dir() and any(by_hand_dir.rglob("*.pb")) else None
        if source is None:
            source = download_file(m.url, archive, progress=progress)
        pbs = _extract_pbs(source, downloads_dir() / (m.filename.rsplit(".", 1)[0] + ".extracted"))
        found = classify_pbs(pbs)
        if m.name == "retrieval" and "regional" not in found and len(pbs) == 1:
            found["regional"] = pbs[0]
        for comp in m.components:
            if comp not in found:
                raise CdSfmError(f"{source}: no {comp} graph among {', '.join(p.name for p in pbs)}")
            graphs[comp] = found[comp]
    # the authors' release: its graphs pass the op allow-list, so the parity check may run them
    return import_model(cname, graphs.get("local"), graphs.get("augment"), graphs.get("regional"), source="official",
                        trained_on=off.trained_on, description=off.description, overwrite=True, check_parity=True)


# --------------------------------------------------------------------------------------------------------------------
# import and check


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def import_model(name: str, local=None, augment=None, regional=None, source: str = "imported",
                 trained_on: str | None = None, description: str | None = None, overwrite: bool = False,
                 tolerance: float = PARITY_TOLERANCE, check_parity: bool = False) -> ModelInfo:
    """Convert frozen graphs into a model folder ``$CD_SFM_HOME/models/<name>`` and keep the graphs in
    ``original/``. Nothing of the graphs is run: their ops are checked against the allow-list of
    :mod:`cd_sfm.models.frozen` and the weights read from their constants. ``check_parity``: then run the parity
    check (:func:`check`, the graphs against the converted model) and record it in ``info.json``; raises
    ``CdSfmError`` if it exceeds ``tolerance`` (the model folder is removed again)."""
    from . import frozen
    from .weights import save_weights_npz

    if not _NAME_RE.match(name) or canonical_name(name) != name and name in _ALIASES:
        raise CdSfmError(f"model name {name!r}: use letters, digits and _ . + - (not an alias of an official model)")
    if local is None and augment is None and regional is None:
        raise CdSfmError("models import: give at least --local")
    if (PACKAGE_WEIGHTS / name).is_dir():
        raise CdSfmError(f"model name {name!r} is taken by a model shipped with the package; choose another --name")
    folder = models_dir() / name
    if folder.exists() and not overwrite:
        raise CdSfmError(f"{folder}: model {name!r} exists; use --force to replace it")
    for comp, pb in (("local", local), ("augment", augment), ("regional", regional)):
        if pb is not None and not Path(pb).is_file():
            raise CdSfmError(f"{pb}: frozen graph not found (--{ 'aug' if comp == 'augment' else comp})")
    models_dir().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=models_dir()))
    try:
        (tmp / "original").mkdir()
        info = {"name": name, "source": source, "trained_on": trained_on or "unknown (imported frozen graphs)",
                "description": description or "imported from frozen graphs", "created": time.strftime("%Y-%m-%d"),
                "components": [], "import": {}}
        models, graphs = {}, {}
        importers = {"local": frozen.import_local, "augment": frozen.import_augment,
                     "regional": frozen.import_regional}
        given = [(c, pb) for c, pb in (("local", local), ("augment", augment), ("regional", regional)) if pb]
        loaded = {c: frozen.FrozenGraph(pb, label=str(pb)) for c, pb in given}  # all pass the op check first
        for comp, pb in given:
            fg = loaded[comp]
            model, report = importers[comp](fg)
            logger.info("%s", report.summary())
            save_weights_npz(model, tmp / WEIGHT_FILES[comp], dtype=None)
            shutil.copy2(pb, tmp / "original" / ORIGINAL_FILES[comp])
            info["components"].append(comp)
            info["import"][comp] = {"graph": Path(pb).name, "parameter_ops": report.pairs,
                                    "folded": len(report.folded), "names_differ": len(report.name_mismatches)}
            if comp == "augment":
                info["augment_visual"] = bool(report.visual)
                info["augment_interp"] = report.interp or "inverse_distance"
            models[comp], graphs[comp] = model, fg
        if check_parity:
            parity = frozen.check_parity(graphs.get("local"), graphs.get("augment"), graphs.get("regional"),
                                         models.get("local"), models.get("augment"), models.get("regional"))
            info["parity"] = {k: float(v) for k, v in parity.items()}
            bad = _parity_failures(parity, tolerance)
            if bad:
                raise CdSfmError(f"models import {name}: parity check failed ({'; '.join(bad)})")
        for fg in graphs.values():
            fg.close()
        (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
        _normal_permissions(tmp)
        if folder.exists():
            old = folder.with_name(f".{name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _entry(name, folder, source)


def _normal_permissions(folder: Path) -> None:
    """mkdtemp / mkstemp create private (0700 / 0600) entries: give the model folder the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [folder, *folder.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def _parity_failures(parity: dict, tolerance: float) -> list[str]:
    bad = []
    for comp, d in parity.items():
        if comp == "regional":
            continue  # judged relative to its magnitude (regional_rel)
        key = "regional" if comp == "regional_rel" else comp
        if d > tolerance:
            bad.append(f"{key}: max difference {d:.3g} > {tolerance:g}")
    return bad


def load_keras_models(entry: ModelInfo, components=COMPONENTS, visual: bool | None = None) -> dict:
    """Build our Keras models and load the model's weight files: {component: keras.Model} for those present."""
    from .augment import build_augment_model, has_visual_weights
    from .local import load_local_model
    from .regional import build_regional_model
    from .weights import load_weights_npz

    out = {}
    for comp in components:
        path = entry.path(comp)
        if path is None:
            continue
        if comp == "local":
            model = load_local_model(path)  # any width (official layout, or a compact student)
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


def check(name: str, n: int = 256, seed: int = 0) -> dict:
    """Rerun the parity check of an imported model: its converted weights against the kept frozen graphs."""
    from . import frozen

    entry = resolve(name, require_local=False)
    originals = {c: entry.original(c) for c in COMPONENTS}
    if not any(originals.values()):
        raise CdSfmError(f"{entry.folder}: model {entry.name!r} keeps no frozen graphs (original/*.pb); only imported "
                         f"or downloaded models can be checked")
    # every graph passes the op allow-list before any of them runs
    graphs = {c: frozen.FrozenGraph(p, label=str(p)) for c, p in originals.items() if p}
    models = load_keras_models(entry, list(graphs), visual=True)
    for c in graphs:
        if c not in models:
            raise CdSfmError(f"{entry.folder}: {WEIGHT_FILES[c]} missing for the kept {ORIGINAL_FILES[c]}")
    try:
        return frozen.check_parity(graphs.get("local"), graphs.get("augment"), graphs.get("regional"),
                                   models.get("local"), models.get("augment"), models.get("regional"), n=n, seed=seed)
    finally:
        for fg in graphs.values():
            fg.close()


# --------------------------------------------------------------------------------------------------------------------
# CLI


def add_models_subparser(subparsers):
    """Add ``models list | download | import | check | quantize`` to an argparse subparsers object."""
    p = subparsers.add_parser("models", help="list, download, import and check ContextDesc weights",
                              description=f"ContextDesc weights. Cache folder: ${ENV_HOME} (default ~/.cache/cd_sfm).")
    sub = p.add_subparsers(dest="models_command", metavar="{list,download,import,check,quantize}")
    sub.required = True

    def add(name, **kw):
        s = sub.add_parser(name, **kw)
        s.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
        s.add_argument("-q", "--quiet", action="count", default=0, help="less log output")
        return s

    s = add("list", help="models available here and official downloads")
    s.set_defaults(func=cmd_list)
    s = add("download", help="download and import an official release")
    s.add_argument("name", help=f"one of {', '.join(OFFICIAL)}")
    s.add_argument("--no-regional", action="store_true", help="skip the regional (retrieval) model")
    s.set_defaults(func=cmd_download)
    s = add("import", help="import frozen graphs (.pb) as a named model")
    s.add_argument("--local", required=True, help="local model graph (loc.pb / contextdesc-*.pb)")
    s.add_argument("--aug", help="augmentation graph (aug.pb / contextdesc-*-aug.pb)")
    s.add_argument("--regional", help="regional graph (retrieval_resnet50.pb)")
    s.add_argument("--name", required=True, help="name to register the model under")
    s.add_argument("--trained-on", help="what the weights were trained on (shown by `models list`)")
    s.add_argument("--force", action="store_true", help="replace an existing model of that name")
    s.add_argument("--check", action="store_true",
                   help="also run the parity check (runs the graphs, which must pass the op allow-list)")
    s.set_defaults(func=cmd_import)
    s = add("check", help="rerun the parity check of an imported model against its frozen graphs")
    s.add_argument("name")
    s.add_argument("--num-patches", type=int, default=256, help="generated patches / keypoints (default 256)")
    s.add_argument("--tolerance", type=float, default=PARITY_TOLERANCE, help="largest accepted difference")
    s.set_defaults(func=cmd_check)
    from .quantize import cmd_quantize

    s = add("quantize", help="make the int8 local model (faster extraction with precision int8 / auto)")
    s.add_argument("name")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="calibrate on patches of these photos (like the ones you will reconstruct)")
    src.add_argument("--patches", help="calibrate on a `cd-sfm train` patch file (its training patches)")
    s.add_argument("--num-patches", type=int, default=4096, help="calibration patches, a quarter held out (4096)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_quantize)
    return p


def cmd_list(args=None) -> int:
    rows = [("NAME", "SOURCE", "COMPONENTS", "TRAINED ON")]
    present = set()
    for m in list_models():
        present.add(m.name)
        comps = "+".join(m.components) or "(no weights yet)"
        from .quantize import INT8_FILE, int8_path

        if m.components and (m.folder / INT8_FILE).is_file():
            comps += " (int8)" if int8_path(m.folder) else " (int8 stale)"
        rows.append((m.name, m.source, comps, m.trained_on))
    for off in OFFICIAL.values():
        if off.name not in present:
            rows.append((off.name, "official (not downloaded)", "+".join(off.components), off.trained_on))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    print(f"cache folder: {home()}")
    return 0


def cmd_download(args) -> int:
    entry = download(args.name, with_regional=not getattr(args, "no_regional", False))
    print(f"{entry.name}: {'+'.join(entry.components)} in {entry.folder}; parity {_fmt_parity(entry.info.get('parity', {}))}")
    return 0


def cmd_import(args) -> int:
    checked = bool(getattr(args, "check", False))
    entry = import_model(args.name, args.local, getattr(args, "aug", None), getattr(args, "regional", None),
                         trained_on=getattr(args, "trained_on", None), overwrite=getattr(args, "force", False),
                         check_parity=checked)
    parity = (f"parity {_fmt_parity(entry.info.get('parity', {}))}" if checked else
              f"parity not checked (`cd-sfm models check {entry.name}` runs the graphs against it)")
    print(f"{entry.name}: imported {'+'.join(entry.components)} into {entry.folder}; {parity}")
    return 0


def cmd_check(args) -> int:
    tol = getattr(args, "tolerance", PARITY_TOLERANCE)
    parity = check(args.name, n=getattr(args, "num_patches", 256))
    bad = _parity_failures(parity, tol)
    for comp in ("local", "augment", "regional"):
        if comp in parity:
            rel = f" (relative {parity['regional_rel']:.3g})" if comp == "regional" else ""
            print(f"{comp}: largest absolute difference {parity[comp]:.3g}{rel}")
    print(f"{args.name}: parity {'OK' if not bad else 'FAILED'} (tolerance {tol:g})")
    return 0 if not bad else 1


def _fmt_parity(parity: dict) -> str:
    return ", ".join(f"{k} {v:.2g}" for k, v in parity.items() if k != "regional") or "n/a"
