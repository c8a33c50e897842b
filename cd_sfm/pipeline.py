"""From a folder of photos to a COLMAP reconstruction: the stages in order, resumable, with a summary.

``reconstruct(image_dir, out_dir, conf)`` runs

    extract -> features.h5 -> pairs -> pairs.txt -> match -> matches.h5 -> database.db (+ verification) -> sparse/0

and writes ``summary.json`` and ``config.yaml`` in ``out_dir``. Each stage is also a function here
(:func:`run_extract`, :func:`run_pairs`, :func:`run_match`, :func:`run_sfm`) that the CLI's stage subcommands call.

Resume: extraction and matching skip what ``features.h5`` / ``matches.h5`` already hold (entries are written
atomically, see :mod:`cd_sfm.io`); the database and the model are rebuilt from them, which takes seconds. A rerun
whose feature or matching settings differ from those saved in ``config.yaml`` stops with an error instead of mixing
results (``overwrite=True`` recomputes).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from . import config as config_mod
from .io import CdSfmError, atomic_write_text, list_h5_names

logger = logging.getLogger(__name__)

FEATURES, PAIRS, MATCHES, DATABASE = "features.h5", "pairs.txt", "matches.h5", "database.db"


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


def check_not_stale(out_dir: Path, conf: dict, overwrite: bool) -> None:
    """Refuse to mix feature / match files made with other settings (their config is in ``config.yaml``)."""
    if overwrite:
        return
    old = config_mod.read_saved(out_dir / "config.yaml")
    for fname, keys in ((FEATURES, config_mod.FEATURE_KEYS), (MATCHES, config_mod.MATCHING_KEYS)):
        path = out_dir / fname
        if not (path.exists() or path.with_name(path.name + ".parts").exists()):
            continue
        changed = config_mod.stale_keys(old, conf, keys)
        if changed:
            what = ", ".join(f"{k}: {old.get(k)!r} -> {conf.get(k)!r}" for k in changed)
            raise CdSfmError(f"{path}: made with other settings ({what}); use another output folder or --overwrite")


# --------------------------------------------------------------------------------------------------------------------
# stages


def feature_conf(conf: dict) -> dict:
    """The extraction conf (a preset of ``features.extract.confs`` with our overrides)."""
    from .features import extract

    fconf = extract.resolve_conf(conf["features"])
    if conf.get("max_image_size") is not None:
        fconf["max_image_size"] = int(conf["max_image_size"]) or None
    if conf.get("features_options"):
        fconf["options"] = {**(fconf.get("options") or {}), **conf["features_options"]}
    return fconf


def matching_conf(conf: dict) -> dict:
    from . import matching

    mconf = matching.resolve_conf(conf["matching"])
    mconf.update(conf.get("matching_options") or {})
    return mconf


def keypoint_counts(features_path: Path, names: list[str] | None = None) -> dict[str, int]:
    """Number of keypoints per image in a feature file (reads shapes only)."""
    import h5py

    out = {}
    with h5py.File(features_path, "r", libver="latest") as f:
        for n in names if names is not None else list_h5_names(features_path):
            if n in f and "keypoints" in f[n]:
                out[n] = int(f[n]["keypoints"].shape[0])
    return out


def run_extract(image_dir: str | Path, out_dir: str | Path, conf: dict, overwrite: bool = False,
                progress: bool = True) -> dict:
    """Features of every readable image of ``image_dir`` into ``out_dir/features.h5``.

    Returns the extraction stats plus ``found`` (names), ``used`` (names with keypoints) and ``skipped``
    ({name: reason}: unreadable, duplicate, or without keypoints)."""
    from .features import extract
    from .images import list_images

    image_dir, out_dir = check_image_dir(image_dir), Path(out_dir)
    skipped: dict[str, str] = {}
    found = list_images(image_dir, skipped=skipped)
    stats = extract.main(feature_conf(conf), image_dir, out_dir / FEATURES, image_list=found, overwrite=overwrite,
                         progress=progress)
    skipped.update(stats.get("skipped") or {})
    counts = keypoint_counts(out_dir / FEATURES, [n for n in found if n not in skipped])
    for n in found:
        if n not in skipped and counts.get(n, 0) == 0:
            skipped[n] = "no keypoints found" if n in counts else "no features"
    stats.update(found=found, used=[n for n in found if n not in skipped], skipped=skipped)
    return stats


def run_pairs(names: list[str], out_dir: str | Path, conf: dict) -> list[tuple[str, str]]:
    """The image pairs to match, written to ``out_dir/pairs.txt``."""
    out_dir = Path(out_dir)
    method = str(conf["pairs"])
    output = out_dir / PAIRS
    if method == "exhaustive":
        from .pairs import exhaustive

        return exhaustive.main(names, output)
    if method == "sequential":
        from .pairs import sequential

        return sequential.main(names, output, overlap=int(conf["overlap"]))
    if method == "retrieval":
        # global descriptors aggregated from the local features (no extra network), then top-k neighbours
        from . import globaldesc
        from .pairs import retrieval

        global_path = globaldesc.main("vlad", out_dir / "global-feats.h5", features_path=out_dir / FEATURES,
                                      names=names)
        return retrieval.main({"num_neighbors": int(conf["num_neighbors"])}, names, global_path, output)
    # hook: further pair methods (e.g. spatial from GPS) go here
    from .pairs import from_file

    path = Path(method)
    if not path.is_file():
        raise CdSfmError(f"{path}: pair file not found (--pairs takes exhaustive, sequential, retrieval or a file)")
    if output.exists() and path.resolve() == output.resolve():
        raise CdSfmError(f"{path}: the pair file cannot be the output pairs.txt itself; copy it elsewhere")
    return from_file.main(path, names, output, on_unknown="skip")


def run_match(out_dir: str | Path, conf: dict, overwrite: bool = False, progress: bool = True) -> dict:
    from . import matching

    out_dir = Path(out_dir)
    if not (out_dir / PAIRS).exists():
        raise CdSfmError(f"{out_dir / PAIRS}: pair file not found (run the pairs stage first)")
    return matching.main(matching_conf(conf), out_dir / PAIRS, out_dir / FEATURES, out_dir / MATCHES,
                         overwrite=overwrite, progress=progress)


def run_sfm(image_dir: str | Path, out_dir: str | Path, conf: dict, names: list[str] | None = None) -> dict:
    """Database (with two-view geometries) and mapping; returns the database and mapping stats and timings."""
    from .colmap import database, mapping, quiet_colmap

    quiet_colmap()
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    for f in (FEATURES, PAIRS, MATCHES):
        if not (out_dir / f).exists():
            raise CdSfmError(f"{out_dir / f}: not found (run the earlier stages first)")
    seconds = {}
    t = time.perf_counter()
    db_conf = {k: conf[k] for k in ("camera_mode", "camera_model", "prior_focal_length", "default_focal_factor",
                                    "descriptor_uint8")}
    verification = copy.deepcopy(conf.get("verification") or {})
    seed = conf.get("seed")
    if seed is not None and int(seed) >= 0:  # reproducible RANSAC unless the config sets its own seed
        verification.setdefault("ransac", {}).setdefault("random_seed", int(seed))
    db_stats = database.main(db_conf, out_dir / DATABASE, out_dir / FEATURES, image_dir, out_dir / PAIRS,
                             out_dir / MATCHES, image_names=names, verification=verification)
    seconds["database"] = time.perf_counter() - t
    t = time.perf_counter()
    rec, map_stats = mapping.main({"mapper": conf["mapper"], "options": conf.get(f"{conf['mapper']}_options") or {},
                                   "seed": conf.get("seed"), "retries": conf.get("mapping_retries", 1)},
                                  out_dir / DATABASE, image_dir, out_dir)
    seconds["mapping"] = time.perf_counter() - t
    return {"database": db_stats, "mapping": map_stats, "seconds": seconds, "reconstruction": rec}


# --------------------------------------------------------------------------------------------------------------------
# the whole pipeline


def reconstruct(image_dir: str | Path, out_dir: str | Path, conf: dict | str | None = None, overwrite: bool = False,
                progress: bool = True) -> dict:
    """Run every stage; returns the summary (also written to ``out_dir/summary.json``).

    ``conf``: a config dict (partial: the rest from :data:`cd_sfm.config.DEFAULTS`), a preset name or a YAML path.
    Raises :class:`CdSfmError` for bad input: missing image folder, output folder not writable (checked first),
    fewer than two usable images.
    """
    t_start = time.perf_counter()
    conf = config_mod.resolve(conf)
    image_dir = check_image_dir(image_dir)
    out_dir = check_writable(out_dir)
    check_not_stale(out_dir, conf, overwrite)
    config_mod.save_config(conf, out_dir / "config.yaml")
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    ex = run_extract(image_dir, out_dir, conf, overwrite=overwrite, progress=progress)
    seconds["extract"] = time.perf_counter() - t
    used, skipped = ex["used"], ex["skipped"]
    if len(used) < 2:
        why = f"; skipped: {'; '.join(f'{n}: {r}' for n, r in list(skipped.items())[:3])}" if skipped else ""
        raise CdSfmError(f"{image_dir}: {len(used)} usable image(s) of {len(ex['found'])}, need at least 2{why}")

    t = time.perf_counter()
    pairs = run_pairs(used, out_dir, conf)
    seconds["pairs"] = time.perf_counter() - t
    if not pairs:
        raise CdSfmError(f"{out_dir / PAIRS}: no image pairs to match")

    t = time.perf_counter()
    mt = run_match(out_dir, conf, overwrite=overwrite, progress=progress)
    seconds["match"] = time.perf_counter() - t

    sfm = run_sfm(image_dir, out_dir, conf, names=used)
    seconds.update(sfm["seconds"])
    seconds["total"] = time.perf_counter() - t_start

    summary = make_summary(image_dir, out_dir, conf, ex["found"], used, skipped, sfm, seconds, num_pairs=len(pairs))
    summary.update(features_extracted=ex["extracted"], features_reused=ex["reused"], pairs_matched=mt["matched"],
                   pairs_reused=mt["reused"])
    write_summary(out_dir, summary)
    logger.info("Registered %d / %d images in %.1f s; summary in %s", summary["num_images_registered"], len(used),
                seconds["total"], out_dir / "summary.json")
    return summary


def make_summary(image_dir: Path, out_dir: Path, conf: dict, found: list[str], used: list[str],
                 skipped: dict[str, str], sfm: dict, seconds: dict[str, float], num_pairs: int | None = None) -> dict:
    """The run's summary (see ``summary.json`` in the README)."""
    ms = sfm["mapping"]
    registered = set(ms["registered"])
    return {
        "image_dir": str(image_dir),
        "output_dir": str(out_dir),
        "config": conf.get("_preset"),
        "features": conf["features"],
        "mapper": conf["mapper"],
        "num_images_found": len(found),
        "num_images_used": len(used),
        "num_images_registered": len(registered),
        "unregistered": [n for n in used if n not in registered],
        "skipped": skipped,
        "num_models": ms["num_models"],
        "num_points3D": ms["num_points3D"],
        "mean_track_length": ms["mean_track_length"],
        "mean_reprojection_error": ms["mean_reprojection_error"],
        "num_pairs": num_pairs if num_pairs is not None else sfm["database"]["num_pairs"],
        "num_verified_pairs": (sfm["database"].get("verification") or {}).get("num_verified_pairs", 0),
        "mapping_attempts": ms.get("attempts", 1),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }


def write_summary(out_dir: Path, summary: dict) -> None:
    atomic_write_text(Path(out_dir) / "summary.json", json.dumps(summary, indent=2) + "\n")


def sfm_stage(image_dir: str | Path, out_dir: str | Path, conf: dict) -> dict:
    """The ``sfm`` subcommand: database, verification and mapping from the files already in ``out_dir``, with a
    summary (without the extraction / matching counts, which belong to their stages)."""
    from .images import list_images

    t_start = time.perf_counter()
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
    sfm = run_sfm(image_dir, out_dir, conf, names=used)
    seconds = {**sfm["seconds"], "total": time.perf_counter() - t_start}
    summary = make_summary(image_dir, out_dir, conf, found, used, skipped, sfm, seconds)
    write_summary(out_dir, summary)
    return summary


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
    if s.get("unregistered"):
        more = f" (+{len(s['unregistered']) - 5} more)" if len(s["unregistered"]) > 5 else ""
        lines.append("Not registered: " + ", ".join(s["unregistered"][:5]) + more)
    for name, reason in list((s.get("skipped") or {}).items())[:5]:
        lines.append(f"Skipped {name}: {reason}")
    return "\n".join(lines)
