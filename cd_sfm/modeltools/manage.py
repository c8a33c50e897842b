"""Getting model weights in: download of the official releases, import of frozen graphs (``.pb``) into a model folder
of the cache, and the parity check of an imported model against the graphs it came from.

A model file is a program: graphs are checked against the op allow-list of :mod:`cd_sfm.modeltools.frozen` before
anything reads or runs them; importing reads weights from their constants only, and only :func:`check` (and
``import_model(check_parity=True)``) runs a graph.
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
from pathlib import Path

from ..io import CdSfmError
from ..models.registry import (_ALIASES, COMPONENTS, OFFICIAL, ORIGINAL_FILES, PACKAGE_WEIGHTS, WEIGHT_FILES,
                               ModelInfo, _entry, canonical_name, downloads_dir, load_keras_models, models_dir,
                               resolve)

logger = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4


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
    :mod:`cd_sfm.modeltools.frozen` and the weights read from their constants. ``check_parity``: then run the parity
    check (:func:`check`, the graphs against the converted model) and record it in ``info.json``; raises
    ``CdSfmError`` if it exceeds ``tolerance`` (the model folder is removed again)."""
    from . import frozen
    from ..models.weights import save_weights_npz

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


