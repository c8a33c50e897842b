"""From a folder of photos to a COLMAP reconstruction: the stages in order, resumable, with a summary.

``reconstruct(image_dir, out_dir, conf)`` runs

    extract -> features.h5 -> pairs -> pairs.txt -> match -> matches.h5 -> database.db (+ verification) -> sparse/0

and writes ``summary.json``, ``config.yaml`` and the report (``report.html``, ``overview.png``: :mod:`cd_sfm.report`)
in ``out_dir``. Each stage is also a function here
(:func:`run_extract`, :func:`run_pairs`, :func:`run_match`, :func:`run_sfm`) that the CLI's stage subcommands call.

Resume: extraction and matching skip what ``features.h5`` / ``matches.h5`` already hold (entries are written
atomically, see :mod:`cd_sfm.io`); the database and the model are rebuilt from them, which takes seconds. A rerun
whose feature or matching settings differ from those saved in ``config.yaml`` stops with an error instead of mixing
results (``overwrite=True`` recomputes).

Options wired here: the ContextDesc ``model`` / ``augment`` (into the feature conf), unions of pair sources
(``retrieval+sequential``), the retrieval descriptor (``regional`` GeM or ``local`` VLAD, ``auto`` picks), ``ray``
(extraction and matching on Ray workers through :mod:`cd_sfm.distributed`, imported only then) and the mapper
(``incremental``, ``global``, ``hierarchical``). :func:`prepare_conf` checks them before any work.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from . import config as config_mod
from .config import PAIR_METHODS, Config
from .io import CdSfmError, atomic_write_text, check_feature_entry, check_pair_names, list_h5_names, output_lock, \
    parse_pairs

logger = logging.getLogger(__name__)

FEATURES, PAIRS, MATCHES, DATABASE = "features.h5", "pairs.txt", "matches.h5", "database.db"
GLOBAL_FEATURES = "global-feats.h5"


# --------------------------------------------------------------------------------------------------------------------
# checks


def check_image_dir(image_dir: str | Path) -> Path:
    image_dir = Path(image_dir)
    if not image_dir.exists():
        raise CdSfmError(f"{image_dir}: image folder not found")
    if not image_dir.is_dir():
        raise CdSfmError(f"{image_dir}: not a folder")
    return image_dir


def check_writable(out_dir: str | Path) -> Path:
    """Create ``out_dir`` if needed and prove a file can be written there (before any work is done)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CdSfmError(f"{out_dir}: output path exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except (OSError, FileExistsError) as e:
        raise CdSfmError(f"{out_dir}: cannot create the output folder ({e.strerror or e})") from e
    try:
        fd, probe = tempfile.mkstemp(dir=out_dir, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CdSfmError(f"{out_dir}: output folder is not writable ({e.strerror or e})") from e
    return out_dir


def _comparable(conf: dict | None) -> dict | None:
    """The config as the staleness check compares it: ``model`` / ``augment`` only count for ContextDesc features,
    and an unset model is the one of ``features_options``, else the shipped default."""
    if conf is None:
        return None
    out = dict(conf)
    try:
        from .features.extract import resolve_conf

        cd = resolve_conf(out.get("features")).get("backend") == "contextdesc"
    except CdSfmError:  # an old config naming a preset that is gone: compare as written
        cd = True
    if not cd:
        out["model"], out["augment"], out["model_digest"] = None, True, None
    elif out.get("model") is None:
        from .models.registry import DEFAULT_MODEL

        out["model"] = (out.get("features_options") or {}).get("model") or DEFAULT_MODEL
    return out


def check_not_stale(out_dir: Path, conf: dict, overwrite: bool) -> None:
    """Refuse to mix feature / match files made with other settings (their config is in ``config.yaml``)."""
    if overwrite:
        return
    old = _comparable(config_mod.read_saved(out_dir / "config.yaml"))
    conf = _comparable(conf)
    if old is not None and conf is not None and old.get("model_digest") is None:
        conf["model_digest"] = None  # saved before weights were fingerprinted: compare by model name only
    for fname, keys in ((FEATURES, config_mod.FEATURE_KEYS), (MATCHES, config_mod.MATCHING_KEYS)):
        path = out_dir / fname
        if not (path.exists() or path.with_name(path.name + ".parts").exists()):
            continue
        changed = config_mod.stale_keys(old, conf, keys)
        if changed:
            what = ", ".join(f"{k}: {old.get(k)!r} -> {conf.get(k)!r}" for k in changed)
            raise CdSfmError(f"{path}: made with other settings ({what}); use another output folder or --overwrite")


def pair_sources(spec) -> list[str]:
    """The pair sources of a ``pairs`` setting (:attr:`cd_sfm.config.PairSettings.sources`)."""
    from .config import PairSettings

    return PairSettings(pairs=str(spec)).sources


def regional_model_name(conf: Config) -> str | None:
    """The registry model whose regional ResNet50 weights retrieval would use (the ContextDesc ``model``, the default
    model, the official ``retrieval`` download), or None when no model has them. Reads folders only (no TensorFlow)."""
    from .models import registry

    entry, _ = registry.find_component("regional", [conf.features.model, registry.DEFAULT_MODEL, "retrieval"])
    return None if entry is None else entry.name


def retrieval_conf(conf: Config) -> dict:
    """The global-descriptor conf of ``--retrieval``: ``regional`` -> GeM of the regional ResNet50 map (its weights
    from :func:`regional_model_name`), ``local`` -> VLAD of the images' own local descriptors, ``auto`` -> regional
    when weights are available, else local."""
    from . import globaldesc

    kind = conf.pairs.retrieval
    regional = regional_model_name(conf) if kind in ("auto", "regional") else None
    if kind == "regional" and regional is None:
        raise CdSfmError("--retrieval regional: no regional ResNet50 weights (get them with `cd-sfm models download "
                         "retrieval`); use --retrieval local")
    if regional is not None:
        return {**globaldesc.confs[globaldesc.RETRIEVAL_PRESETS["regional"]], "regional_model": regional}
    if kind == "auto":
        logger.info("Retrieval from the images' own local descriptors (VLAD): no regional ResNet50 weights")
    return dict(globaldesc.confs[globaldesc.RETRIEVAL_PRESETS["local"]])


def prepare_conf(conf: Config | dict | str | None, check_pairs: bool = True) -> Config:
    """The run's :class:`~cd_sfm.config.Config`, checked before any work (every value: one line per problem, see
    :func:`cd_sfm.config.resolve`), with the ContextDesc model resolved once: an unset one becomes the shipped
    default's name, a folder an absolute path, so that ``config.yaml`` records what was used, and the digest of its
    weights is taken. Pair sources are checked too (unless ``check_pairs`` is False: stages that make no pairs), and
    regional retrieval without weights. Raises ``CdSfmError``."""
    conf = config_mod.resolve(conf)
    if conf.features.contextdesc:
        from .models import registry

        entry = registry.resolve(conf.features.model_name())  # unknown name: one line listing the available models
        used = ("local", "augment", "regional") if conf.features.augment else ("local",)
        conf = conf.replace(model=entry.reference, model_digest=entry.digest(used))
    sources = conf.pairs.sources if check_pairs else []
    for src in sources:
        if src not in PAIR_METHODS and not Path(src).is_file():
            raise CdSfmError(f"{src}: pair file not found (--pairs takes {', '.join(PAIR_METHODS)}, a file, or a "
                             f"union such as retrieval+sequential)")
        if src not in PAIR_METHODS:
            parse_pairs(src)  # a malformed line: one line now, not after extraction
    if {"retrieval", "auto"} & set(sources) and conf.pairs.retrieval == "regional":
        retrieval_conf(conf)  # no weights: say so now, not after extraction
    return conf


# --------------------------------------------------------------------------------------------------------------------
# Ray (optional)

_RAY_DEPTH = 0


@contextlib.contextmanager
def ray_session(conf: Config):
    """Yields the executor of the stages: :class:`cd_sfm.distributed.RayExecutor` for ``conf.ray``, else None (in
    process: nothing imports Ray).
    Ray itself starts lazily, at the first stage with work to do; a cluster started inside the outermost session is
    shut down when it ends (one started by the caller is left alone)."""
    global _RAY_DEPTH
    conf = config_mod.resolve(conf)
    if not conf.ray.enabled:
        yield None
        return
    from . import distributed

    rconf = distributed.RayConf.from_any({**conf.ray.options, "address": str(conf.ray.address)})
    ray = sys.modules.get("ray")
    owner = _RAY_DEPTH == 0 and not (ray is not None and ray.is_initialized())
    _RAY_DEPTH += 1
    try:
        yield distributed.RayExecutor(rconf)
    finally:
        _RAY_DEPTH -= 1
        if owner:
            distributed.shutdown()


# --------------------------------------------------------------------------------------------------------------------
# stages


def locked(fn):
    """Run a stage function holding the lock of its ``out_dir`` (:func:`cd_sfm.io.output_lock`; re-entrant, so the
    pipeline holding it calls its stages freely)."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with output_lock(sig.bind(*args, **kwargs).arguments["out_dir"]):
            return fn(*args, **kwargs)

    return wrapper


def keypoint_counts(features_path: Path, names: list[str] | None = None) -> dict[str, int]:
    """Number of keypoints per image in a feature file (reads shapes only)."""
    import h5py

    out = {}
    with h5py.File(features_path, "r", libver="latest") as f:
        for n in names if names is not None else list_h5_names(features_path):
            if n in f:  # an entry without keypoints is damaged: one line, not a silently skipped image
                out[n] = check_feature_entry(f[n], n, features_path)
    return out


@locked
def run_extract(image_dir: str | Path, out_dir: str | Path, conf: dict, overwrite: bool = False,
                progress: bool = True) -> dict:
    """Features of every readable image of ``image_dir`` into ``out_dir/features.h5``.

    Returns the extraction stats plus ``found`` (names), ``used`` (names with keypoints) and ``skipped``
    ({name: reason}: unreadable, duplicate, or without keypoints)."""
    from .features import extract
    from .images import list_images

    conf = config_mod.resolve(conf)
    image_dir, out_dir = check_image_dir(image_dir), Path(out_dir)
    skipped: dict[str, str] = {}
    found = list_images(image_dir, skipped=skipped)
    check_pair_names(found, image_dir)
    with ray_session(conf) as executor:
        stats = extract.main(conf.features.extraction_conf(), image_dir, out_dir / FEATURES, image_list=found,
                             overwrite=overwrite, progress=progress, executor=executor, mask_dir=conf.features.masks)
    skipped.update(stats.get("skipped") or {})
    counts = keypoint_counts(out_dir / FEATURES, [n for n in found if n not in skipped])
    for n in found:
        if n not in skipped and counts.get(n, 0) == 0:
            skipped[n] = "no keypoints found" if n in counts else "no features"
    stats.update(found=found, used=[n for n in found if n not in skipped], skipped=skipped)
    return stats


@locked
def run_pairs(names: list[str], out_dir: str | Path, conf: dict,
              image_dir: str | Path | None = None, chosen: dict | None = None) -> list[tuple[str, str]]:
    """The image pairs to match, written to ``out_dir/pairs.txt``: the union of the pair sources of ``conf["pairs"]``
    (see :func:`pair_sources`; ``auto`` is decided here by :func:`cd_sfm.pairs.auto.choose`), repeats in either order
    dropped, in the order the sources give them. ``image_dir`` is needed by regional retrieval (the network sees
    the images) and by ``auto`` (EXIF capture times). ``chosen`` (a dict) receives the sources used and why."""
    from .pairs import save, unique_pairs

    conf = config_mod.resolve(conf)
    out_dir = Path(out_dir)
    output = out_dir / PAIRS
    sources = conf.pairs.sources
    why = "+".join(sources)
    if "auto" in sources:
        from .pairs import auto

        picked, why = auto.choose(names, Path(image_dir) if image_dir is not None else None)
        logger.info("Pairs: auto -> %s", why)
        sources = list(dict.fromkeys(s for src in sources for s in (picked if src == "auto" else [src])))
    if chosen is not None:
        chosen.update(sources=sources, reason=why)
    pairs: list[tuple[str, str]] = []
    counts = []
    for src in sources:
        got = _pairs_of(src, names, out_dir, conf, image_dir)
        counts.append(f"{src}: {len(got)}")
        pairs.extend(got)
    if len(sources) > 1:
        pairs = unique_pairs(pairs)
        logger.info("Pairs: %d in the union (%s)", len(pairs), ", ".join(counts))
    return save(pairs, output)


def _pairs_of(src: str, names: list[str], out_dir: Path, conf: Config, image_dir) -> list[tuple[str, str]]:
    """The pairs of one source (not written)."""
    if src == "exhaustive":
        from .pairs import exhaustive

        return exhaustive.main(names)
    if src == "sequential":
        from .colmap.database import read_rig_config, rig_prefixes
        from .pairs import sequential

        rig = conf.database.rig_config
        prefixes = rig_prefixes(read_rig_config(rig)) if rig else ()
        return sequential.main(names, overlap=conf.pairs.overlap, rig_prefixes=prefixes)
    if src == "retrieval":
        from . import globaldesc
        from .pairs import retrieval

        gconf = retrieval_conf(conf)
        logger.info("Retrieval pairs: %s global descriptors, %d neighbours", gconf["method"], conf.pairs.num_neighbors)
        global_path = globaldesc.main(gconf, out_dir / GLOBAL_FEATURES, features_path=out_dir / FEATURES,
                                      image_dir=image_dir, names=names)
        return retrieval.retrieval_pairs({"num_neighbors": conf.pairs.num_neighbors}, names, global_path)
    if src == "spatial":
        from .pairs import spatial

        if image_dir is None:
            raise CdSfmError("pairs: spatial reads the images' GPS positions: give the image folder")
        return spatial.main(names, spatial.gps_positions(image_dir, names), num_neighbors=conf.pairs.num_neighbors,
                            max_distance=conf.pairs.spatial_max_distance)
    from .pairs import from_file

    path = Path(src)
    if not path.is_file():
        raise CdSfmError(f"{path}: pair file not found (--pairs takes {', '.join(PAIR_METHODS)}, a file, or a union "
                         f"such as retrieval+sequential)")
    output = out_dir / PAIRS
    if output.exists() and path.resolve() == output.resolve():
        raise CdSfmError(f"{path}: the pair file cannot be the output pairs.txt itself; copy it elsewhere")
    return from_file.main(path, names, None, on_unknown="skip")


@locked
def run_match(out_dir: str | Path, conf: dict, overwrite: bool = False, progress: bool = True) -> dict:
    from . import matching

    conf = config_mod.resolve(conf)
    out_dir = Path(out_dir)
    if not (out_dir / PAIRS).exists():
        raise CdSfmError(f"{out_dir / PAIRS}: pair file not found (run the pairs stage first)")
    with ray_session(conf) as executor:
        return matching.main(conf.matching.matcher_conf(), out_dir / PAIRS, out_dir / FEATURES, out_dir / MATCHES,
                             overwrite=overwrite, progress=progress, executor=executor)


@locked
def run_sfm(image_dir: str | Path, out_dir: str | Path, conf: dict, names: list[str] | None = None,
            progress: bool = False) -> dict:
    """Database (with two-view geometries) and mapping; returns the database and mapping stats and timings.
    ``progress``: a bar of registered images while mapping."""
    from .colmap import database, mapping, quiet_colmap

    quiet_colmap()
    conf = config_mod.resolve(conf)
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    for f in (FEATURES, PAIRS, MATCHES):
        if not (out_dir / f).exists():
            raise CdSfmError(f"{out_dir / f}: not found (run the earlier stages first)")
    seconds = {}
    t = time.perf_counter()
    previous = out_dir / "sparse" / "0"
    keep, not_extended = None, None
    if conf.mapping.extend:  # the database must give the earlier model's images and cameras their ids in it
        keep, not_extended = mapping.extendable(previous, out_dir / FEATURES, names)
    rig = conf.database.rig_config
    db_stats = database.main(conf.database.as_dict(), out_dir / DATABASE, out_dir / FEATURES, image_dir,
                             out_dir / PAIRS, out_dir / MATCHES, image_names=names,
                             verification=conf.verification.verify_conf(), keep_ids=keep, rig_config=rig)
    if keep is not None and not db_stats["kept_ids"]:
        keep, not_extended = None, db_stats["kept_ids_why"]
    if not_extended:
        (logger.warning if previous.exists() else logger.info)("Not extending the earlier model: %s; mapping from "
                                                               "scratch", not_extended)
    seconds["database"] = time.perf_counter() - t
    t = time.perf_counter()
    if rig and db_stats.get("rig") is None:  # rig poses not given: measured on a model mapped without the rigs
        db_stats["rig"] = _measure_rig(rig, out_dir, image_dir, conf, progress)
    rec, map_stats = mapping.main(conf.mapping.mapping_conf(), out_dir / DATABASE, image_dir, out_dir,
                                  progress=progress, extend=previous if keep is not None else None)
    map_stats["not_extended"] = not_extended
    seconds["mapping"] = time.perf_counter() - t
    return {"database": db_stats, "mapping": map_stats, "seconds": seconds, "reconstruction": rec}


def _measure_rig(rig: str, out_dir: Path, image_dir: Path, conf: Config, progress: bool) -> dict | None:
    """COLMAP's recipe for rigs of unknown poses: map each camera on its own, take every rig camera's mean pose
    relative to its reference camera over the frames registered with both, and group the images into rigs and
    frames for the mapping that follows. None (and a warning) where the first model cannot give them."""
    from .colmap import database, mapping

    logger.info("Rig poses not in %s: mapping without the rigs first to measure them", rig)
    # one attempt of the configured mapper: the model only has to place some frames of every rig camera
    first, _ = mapping.main({**conf.mapping.mapping_conf(), "georeference": False, "fallback": False, "retries": 0},
                            out_dir / DATABASE, image_dir, out_dir, progress=progress)
    if first is None:
        logger.warning("Rig poses: the first mapping gave no model; mapping without the rigs")
        return None
    try:
        got = database.apply_rig_config(out_dir / DATABASE, database.read_rig_config(rig), first)
        return {**got, "poses": "measured"}
    except Exception as e:  # noqa: BLE001 - pycolmap refuses a rig camera with no registered image
        logger.warning("Rig poses: not measurable on the first model (%s); mapping without the rigs", e)
        return None


# --------------------------------------------------------------------------------------------------------------------
# the whole pipeline


def reconstruct(image_dir: str | Path, out_dir: str | Path, conf: dict | str | None = None, overwrite: bool = False,
                progress: bool = True, report: bool = True) -> dict:
    """Run every stage; returns the summary (also written to ``out_dir/summary.json``) and, with ``report``,
    ``report.html`` / ``overview.png`` (:mod:`cd_sfm.report`).

    ``conf``: a config dict (partial: the rest from :data:`cd_sfm.config.DEFAULTS`), a preset name or a YAML path.
    Raises :class:`CdSfmError` for bad input: missing image folder, output folder not writable (checked first),
    fewer than two usable images.
    """
    t_start = time.perf_counter()
    conf = prepare_conf(conf)
    image_dir = check_image_dir(image_dir)
    out_dir = check_writable(out_dir)
    with output_lock(out_dir):
        summary = _reconstruct(image_dir, out_dir, conf, overwrite, progress, t_start)
        if report:
            write_report(out_dir)
        return summary


def _reconstruct(image_dir: Path, out_dir: Path, conf: dict, overwrite: bool, progress: bool, t_start: float) -> dict:
    check_not_stale(out_dir, conf, overwrite)
    config_mod.save_config(conf, out_dir / "config.yaml")
    seconds: dict[str, float] = {}

    with ray_session(conf):  # one Ray cluster (when asked for) for extraction and matching
        t = time.perf_counter()
        ex = run_extract(image_dir, out_dir, conf, overwrite=overwrite, progress=progress)
        seconds["extract"] = time.perf_counter() - t
        used, skipped = ex["used"], ex["skipped"]
        if len(used) < 2:
            why = f"; skipped: {'; '.join(f'{n}: {r}' for n, r in list(skipped.items())[:3])}" if skipped else ""
            raise CdSfmError(f"{image_dir}: {len(used)} usable image(s) of {len(ex['found'])}, need at least 2{why}")

        t = time.perf_counter()
        chosen: dict = {}
        pairs = run_pairs(used, out_dir, conf, image_dir=image_dir, chosen=chosen)
        seconds["pairs"] = time.perf_counter() - t
        if not pairs:
            raise CdSfmError(f"{out_dir / PAIRS}: no image pairs to match")

        t = time.perf_counter()
        mt = run_match(out_dir, conf, overwrite=overwrite, progress=progress)
        seconds["match"] = time.perf_counter() - t

    sfm = run_sfm(image_dir, out_dir, conf, names=used, progress=progress)
    seconds.update(sfm["seconds"])
    seconds["total"] = time.perf_counter() - t_start

    summary = make_summary(image_dir, out_dir, conf, ex["found"], used, skipped, sfm, seconds, num_pairs=len(pairs))
    summary.update(features_extracted=ex["extracted"], features_reused=ex["reused"], pairs_matched=mt["matched"],
                   pairs_reused=mt["reused"], pairs_chosen=chosen.get("reason"), masks=conf.features.masks,
                   masked_images=ex.get("masked", 0),
                   precision=ex.get("precision") or _saved_precision(out_dir, conf))
    write_summary(out_dir, summary)
    logger.info("Registered %d / %d images in %.1f s; summary in %s", summary["num_images_registered"], len(used),
                seconds["total"], out_dir / "summary.json")
    return summary


def make_summary(image_dir: Path, out_dir: Path, conf: Config, found: list[str], used: list[str],
                 skipped: dict[str, str], sfm: dict, seconds: dict[str, float], num_pairs: int | None = None) -> dict:
    """The run's summary (see ``summary.json`` in the README)."""
    ms = sfm["mapping"]
    registered = set(ms["registered"])
    return {
        "image_dir": str(image_dir),
        "output_dir": str(out_dir),
        "config": conf.preset,
        "features": conf.features.features,
        "model": conf.features.model if conf.features.contextdesc else None,
        "pairs": str(conf.pairs.pairs),
        "mapper": conf.mapping.mapper,
        "num_images_found": len(found),
        "num_images_used": len(used),
        "num_images_registered": len(registered),
        "unregistered": [n for n in used if n not in registered],
        "skipped": skipped,
        "num_models": ms["num_models"],
        "model_sizes": ms.get("model_sizes", []),
        "pair_groups": ms.get("pair_groups", []),
        "num_points3D": ms["num_points3D"],
        "mean_track_length": ms["mean_track_length"],
        "mean_reprojection_error": ms["mean_reprojection_error"],
        "num_pairs": num_pairs if num_pairs is not None else sfm["database"]["num_pairs"],
        "num_verified_pairs": (sfm["database"].get("verification") or {}).get("num_verified_pairs", 0),
        "mapping_attempts": ms.get("attempts", 1),
        "mapper_used": ms.get("mapper", conf.mapping.mapper),
        "mapping_agreement": ms.get("agreement"),
        "mapping_tried": ms.get("tried", []),
        "min_image_points": conf.mapping.min_image_points,
        "images_left_out": ms.get("weak_removed", 0),
        "extended": ms.get("extended"),
        "not_extended": ms.get("not_extended"),
        "images_with_gps": sfm["database"].get("num_pose_priors", 0),
        "rig": sfm["database"].get("rig"),
        "georeference": ms.get("georeference"),
        "ray": conf.ray.summary(),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }


def _saved_precision(out_dir: Path, conf: Config) -> dict | None:
    """The ContextDesc precision recorded by the run that extracted the features (a resumed run extracts nothing,
    and the features of the folder were made with the same settings: :func:`check_not_stale`)."""
    if not conf.features.contextdesc:
        return None
    try:
        return json.loads((Path(out_dir) / "summary.json").read_text()).get("precision")
    except (OSError, ValueError):
        return None


def write_report(out_dir: Path) -> None:
    """``report.html`` and ``overview.png`` of a finished run; a failure there is a warning, never a failed run."""
    try:
        from .report import write_report as write

        write(out_dir)
    except Exception as e:  # noqa: BLE001 - the report only shows results that are already on disk
        logger.warning("Report not written: %s", e)


def write_summary(out_dir: Path, summary: dict) -> None:
    atomic_write_text(Path(out_dir) / "summary.json", json.dumps(summary, indent=2) + "\n")


@locked
def sfm_stage(image_dir: str | Path, out_dir: str | Path, conf: dict, progress: bool = True,
              report: bool = True) -> dict:
    """The ``sfm`` subcommand: database, verification and mapping from the files already in ``out_dir``, with a
    summary (without the extraction / matching counts, which belong to their stages) and the report."""
    from .images import list_images

    t_start = time.perf_counter()
    conf = config_mod.resolve(conf)
    image_dir, out_dir = check_image_dir(image_dir), Path(out_dir)
    if not (out_dir / FEATURES).exists():
        raise CdSfmError(f"{out_dir / FEATURES}: not found (run the extract stage first)")
    skipped: dict[str, str] = {}
    found = list_images(image_dir, skipped=skipped)
    counts = keypoint_counts(out_dir / FEATURES, [n for n in found if n not in skipped])
    for n in found:
        if n not in skipped and counts.get(n, 0) == 0:
            skipped[n] = "no keypoints found" if n in counts else "no features"
    used = [n for n in found if n not in skipped]
    if len(used) < 2:
        raise CdSfmError(f"{out_dir / FEATURES}: features of {len(used)} image(s) of {image_dir}, need at least 2")
    sfm = run_sfm(image_dir, out_dir, conf, names=used, progress=progress)
    seconds = {**sfm["seconds"], "total": time.perf_counter() - t_start}
    summary = make_summary(image_dir, out_dir, conf, found, used, skipped, sfm, seconds)
    summary["precision"] = _saved_precision(out_dir, conf)
    write_summary(out_dir, summary)
    if report:
        write_report(out_dir)
    return summary


def _groups_line(s: dict) -> list[str]:
    """Why images are missing when the verified pairs do not join them: the groups they form (one model holds one
    group at most) and the images with no verified pair at all."""
    groups = s.get("pair_groups") or []
    alone = s.get("num_images_used", 0) - sum(groups)
    if len(groups) <= 1 and alone <= 0:
        return []
    none = f"{alone} image{'s have' if alone > 1 else ' has'} no verified pair"
    if len(groups) <= 1:
        return [f"{none} with any other image (too little overlap, or matches that failed verification)"]
    shown = ", ".join(str(g) for g in groups[:8]) + (", ..." if len(groups) > 8 else "")
    return [f"The verified pairs join the images into {len(groups)} separate groups ({shown} images"
            + (f"; {none}" if alone > 0 else "") + "): one model holds one group at most; photos that overlap two "
            "groups would join them"]


def format_summary(s: dict) -> str:
    """A few readable lines for the end of a run."""
    err = s.get("mean_reprojection_error")
    lines = [
        f"Registered {s['num_images_registered']} / {s['num_images_used']} images "
        f"({s['num_images_found']} found, {len(s.get('skipped') or {})} skipped) -> {s['output_dir']}/sparse/0",
        f"{s['num_points3D']} 3D points, mean track length {s['mean_track_length']:.2f}, mean reprojection error "
        + (f"{err:.3f} px" if err is not None else "n/a"),
        (f"Reused {s['features_reused']} image features and {s.get('pairs_reused', 0)} pair matches; "
         if "features_reused" in s else "") + ", ".join(f"{k} {v:.1f} s" for k, v in s["seconds"].items()),
    ]
    if s.get("extended") is not None:
        lines.append(f"Extended the earlier sparse/0 of {s['extended']} images (their poses kept; --extend)"
                     + ("; only the incremental mapper extends: a run without --extend maps every image from scratch"
                        if s.get("unregistered") else ""))
    elif s.get("not_extended"):
        lines.append(f"Not extended ({s['not_extended']}): mapped from scratch")
    g = s.get("georeference")
    if g and g.get("georeferenced"):
        from .colmap.georeference import describe

        lines.append(f"Georeferenced: {describe(g)}")
    elif g and not g.get("kept_frame"):
        lines.append(f"Not georeferenced: {g['why']}")
    rig = s.get("rig")
    if rig:
        lines.append(f"Rigs: {rig['rigs']}, {rig['frames']} frames ({rig['frames_with_several_images']} with several "
                     f"images), rig poses {rig['poses']}" + (" on a first model mapped without the rigs"
                                                            if rig["poses"] == "measured" else ""))
    if s.get("masked_images"):
        lines.append(f"Masked {s['masked_images']} of {s['num_images_found']} images (masks from {s.get('masks')})")
    from .colmap.mapping import MIN_AGREEMENT, agrees

    tried = s.get("mapping_tried") or []
    pruned = any(t.get("weak_removed") for t in tried)
    if len(tried) > 1 or pruned:
        lines.append("Mapping tried " + "; ".join(
            f"{t['mapper']} {t['registered']} images"
            + (f" (+{t['weak_removed']} left out)" if t.get("weak_removed") else "")
            + f", {t.get('points', 0)} points (agreement "
            f"{'n/a' if t['agreement'] is None else format(t['agreement'], '.2f')})" for t in tried)
            + f" -> kept {s.get('mapper_used')} (trusted: agreement >= {MIN_AGREEMENT:g}; more images only "
            "with more points"
            + (f"; images left out observed fewer than {s.get('min_image_points', 30)} 3D points"
               if pruned else "") + ")")
    agree = s.get("mapping_agreement")
    if not agrees(agree) and s.get("num_images_registered", 0) >= 2:
        lines.append(f"Warning: the model agrees with only {agree:.2f} of its verified image pairs (trusted from "
                     f"{MIN_AGREEMENT:g}; no mapping attempt did better): some cameras are likely placed wrongly"
                     + ("" if s.get("masked_images") else "; where parts of the photos do not move with the scene "
                        "(a turntable, an overlay), mask them (--masks)"))
    sizes = s.get("model_sizes") or []
    if len(sizes) > 1:
        shown = ", ".join(f"sparse/{i} {n} images" for i, (n, _) in enumerate(sizes[1:6], 1))
        lines.append(f"Other models: {shown}" + (f" (+{len(sizes) - 6} more)" if len(sizes) > 6 else ""))
    if s.get("unregistered"):
        more = f" (+{len(s['unregistered']) - 5} more)" if len(s["unregistered"]) > 5 else ""
        lines.append("Not registered: " + ", ".join(s["unregistered"][:5]) + more)
        lines.extend(_groups_line(s))
    for name, reason in list((s.get("skipped") or {}).items())[:5]:
        lines.append(f"Skipped {name}: {reason}")
    return "\n".join(lines)
