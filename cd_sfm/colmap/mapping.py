"""Sparse reconstruction from a verified COLMAP database: incremental (default), global or hierarchical mapping
through pycolmap.

``main(conf, database_path, image_dir, output_dir)`` writes ``output_dir/sparse/0`` (COLMAP binary model; the largest
model when mapping splits into several, the others as ``sparse/1``, ``sparse/2``, ...) and ``output_dir/points.ply``,
and returns the chosen ``pycolmap.Reconstruction`` (or ``None``) with statistics.

Options go through pycolmap's option objects: ``conf["options"]`` is a dict of attributes of
``pycolmap.IncrementalPipelineOptions`` (``mapper: incremental``), ``pycolmap.GlobalPipelineOptions``
(``mapper: global``) or ``pycolmap.HierarchicalPipelineOptions`` (``mapper: hierarchical``: the scene is split into
overlapping clusters of at most ``clustering_options.leaf_max_num_images`` images, each mapped incrementally with
``incremental_options``, then merged; for large collections); nested option objects take nested dicts (e.g.
``{"mapper": {"init_min_num_inliers": 50}}``). The seed goes to ``random_seed`` (hierarchical: to its
``incremental_options.random_seed``).
The models are first written to a temporary folder, then moved into place, so ``sparse/`` is never half written.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..io import CdSfmError, writing
from .georeference import MAX_ERROR as GPS_MAX_ERROR

logger = logging.getLogger(__name__)

MAPPERS = ("incremental", "global", "hierarchical")

# an image stays in a model only when it observes at least this many of the model's 3D points: COLMAP's incremental
# mapper registers no image with fewer 2D-3D inliers (abs_pose_min_num_inliers, 30), but the global mapper places
# cameras from the view graph and returns some that observe few points or none. On EVAL and TRAIN scenes with ground
# truth, 0-14 % of the model pairs that hold such an image were within 10 degrees of the true relative pose
# (docs/mapping.md, "Images the points do not hold"); 0 keeps every image
MIN_IMAGE_POINTS = 30

default_conf: dict[str, Any] = {"mapper": "incremental", "options": {}, "seed": 0, "retries": 1,
                                "retry_max_images": 300, "fallback": True, "fallback_options": {},
                                "fallback_max_images": 5000, "min_image_points": MIN_IMAGE_POINTS,
                                "georeference": True, "gps_max_error": GPS_MAX_ERROR}

# a model is trusted when at least this share of its verified image pairs agree with it (half or more of a pair's
# RANSAC inliers within 4 px of the model's epipolar lines, see consistency.py): 1.0 on good models of the TRAIN
# scenes, 0.2-0.35 where the global mapper "registered" unrelated Internet photos with wrong poses
MIN_AGREEMENT = 0.8
OTHER_MAPPER = {"incremental": "global", "global": "incremental"}

confs = {
    "incremental": {"mapper": "incremental", "options": {}},
    "global": {"mapper": "global", "options": {}},
    "hierarchical": {"mapper": "hierarchical", "options": {}},
    # many images: fewer global bundle adjustments, the rest unchanged
    "large": {"mapper": "incremental", "options": {"ba_global_frames_ratio": 1.4, "ba_global_points_ratio": 1.4}},
}


def set_option(obj, key: str, value, where: str) -> None:
    """``setattr`` on a pycolmap options object; a value of the wrong type is one line naming the option."""
    try:
        setattr(obj, key, value)
    except TypeError as e:
        current = getattr(obj, key, None)
        kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
            type(current), type(current).__name__)
        raise CdSfmError(f"{where}{key} {value!r}: expected {kind}") from e


def _apply(obj, values: dict, where: str) -> None:
    for k, v in values.items():
        if not hasattr(obj, k):
            raise CdSfmError(f"mapping option {where}{k!r}: not an attribute of {type(obj).__name__}")
        if isinstance(v, dict):
            _apply(getattr(obj, k), v, f"{where}{k}.")
        else:
            set_option(obj, k, v, f"mapping option {where}")


def pipeline_options(conf: dict):
    """The pycolmap options object for ``conf`` (``IncrementalPipelineOptions``, ``GlobalPipelineOptions`` or
    ``HierarchicalPipelineOptions``)."""
    import pycolmap

    mapper = conf.get("mapper", "incremental")
    if mapper == "incremental":
        opts = pycolmap.IncrementalPipelineOptions()
    elif mapper == "global":
        opts = pycolmap.GlobalPipelineOptions()
    elif mapper == "hierarchical":
        opts = pycolmap.HierarchicalPipelineOptions()
    else:
        raise CdSfmError(f"mapper {mapper!r}: expected one of {', '.join(MAPPERS)}")
    if mapper == "global" and not getattr(pycolmap, "has_cuda", False):  # no CUDA build: no GPU solver to ask for
        opts.mapper.bundle_adjustment.ceres.use_gpu = False
        opts.mapper.global_positioning.use_gpu = False
    _apply(opts, conf.get("options") or {}, "")
    seed = conf.get("seed")
    if seed is not None and int(seed) >= 0:
        target = opts.incremental_options if mapper == "hierarchical" else opts
        target.random_seed = int(seed)
    return opts


def _min_num_matches(opts) -> int:
    inc = getattr(opts, "incremental_options", opts)
    return int(getattr(inc, "min_num_matches", 15))


def model_stats(rec) -> dict:
    """Statistics of a reconstruction, JSON-friendly."""
    if rec is None:
        return {"num_registered": 0, "num_points3D": 0, "mean_track_length": 0.0, "mean_reprojection_error": None,
                "mean_observations_per_image": 0.0}
    return {
        "num_registered": rec.num_reg_images(),
        "num_points3D": rec.num_points3D(),
        "mean_track_length": float(rec.compute_mean_track_length()) if rec.num_points3D() else 0.0,
        "mean_reprojection_error": float(rec.compute_mean_reprojection_error()) if rec.num_points3D() else None,
        "mean_observations_per_image": float(rec.compute_mean_observations_per_reg_image())
        if rec.num_reg_images() else 0.0,
    }


def _registration_bar(total: int, progress: bool, start: int = 0):
    """A progress bar of the images registered in the model being built, and the two incremental-mapping callbacks
    that advance it: the initial pair registers two images, each next image one. COLMAP starts a new model (after
    one it discards as too small, or for the images left out of a finished one) with a new initial pair: the bar
    then starts again at 2, labelled with the model's number, so it never counts past the images there are.
    ``start``: the images of a model being extended (already registered; no initial pair)."""
    from ..progress import tqdm

    total = max(int(total), 1)
    bar = tqdm(total=total, initial=min(start, total), desc="mapping", unit="img", disable=not progress)
    models = 1 if start else 0

    def on_pair() -> None:
        nonlocal models
        models += 1
        if models > 1:
            bar.set_description_str(f"mapping, model {models}", refresh=False)
            bar.reset(total=total)
        bar.update(min(2, total - bar.n))

    def on_next() -> None:
        bar.update(1 if bar.n < total else 0)

    return bar, on_pair, on_next


def _map_once(conf: dict, seed: int | None, database_path: Path, image_dir: Path, tmp: Path,
              num_images: int = 0, progress: bool = False, input_model: Path | None = None, start: int = 0) -> list:
    """One run of the mapper; returns its models, largest first. ``progress``: a bar of registered images
    (incremental mapper only: the others have no callbacks). ``input_model``: a model for the incremental mapper to
    continue (COLMAP's ``mapper --input_path``), with ``start`` images registered (where the bar starts)."""
    import pycolmap

    opts = pipeline_options({**conf, "seed": seed})
    if seed is not None and seed >= 0:
        pycolmap.set_random_seed(seed)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if conf["mapper"] == "incremental":
            bar, on_pair, on_next = _registration_bar(num_images, progress, start)
            with bar:
                models = pycolmap.incremental_mapping(str(database_path), str(image_dir), str(tmp), opts,
                                                      input_path=str(input_model or ""),
                                                      initial_image_pair_callback=on_pair,
                                                      next_image_callback=on_next)
        elif conf["mapper"] == "hierarchical":
            opts.image_path = str(image_dir)
            models = pycolmap.hierarchical_mapping(str(database_path), str(image_dir), str(tmp), opts)
        else:
            models = pycolmap.global_mapping(str(database_path), str(image_dir), str(tmp), opts)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(dict(models or {}).values(), key=_model_size, reverse=True)


def _model_size(rec) -> tuple[int, int]:
    return rec.num_reg_images(), rec.num_points3D()


def prune_weak_images(rec, min_points: int) -> list[str]:
    """Deregister from ``rec`` the frames whose images observe fewer than ``min_points`` of its 3D points (again
    until none is left: a frame's removal takes observations from the others), then those not joined to the largest
    group of frames by shared 3D points. Returns the names of the images taken out, in the model's order."""
    removed: list[str] = []
    if min_points <= 0:
        return removed

    def drop(frame_ids):
        for f in frame_ids:
            removed.extend(rec.images[d.id].name for d in rec.frame(f).image_ids)
            rec.deregister_frame(f)

    while True:
        weak = [f for f in rec.reg_frame_ids()
                if sum(rec.images[d.id].num_points3D for d in rec.frame(f).image_ids) < min_points]
        if not weak:
            break
        drop(weak)
    if not removed:  # a mapper's model is joined by its points; only a removal can cut it
        return removed
    frame_of = {i: rec.images[i].frame_id for i in rec.reg_image_ids()}

    def links():  # each observation's frame to the frame of its track's first one
        for p in rec.points3D.values():
            first, *rest = (frame_of[e.image_id] for e in p.track.elements)
            yield from ((first, f) for f in rest)

    groups = _components(rec.reg_frame_ids(), links())
    if len(groups) > 1:
        keep = max(groups, key=len)
        drop([f for g in groups if g is not keep for f in g])
    return removed


def _components(nodes, links) -> list[list]:
    """Connected components (lists of nodes) of the graph of ``nodes`` plus the ends of ``links`` (pairs)."""
    parent = {x: x for x in nodes}

    def find(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in links:
        parent[find(a)] = find(b)
    groups: dict = {}
    for x in list(parent):
        groups.setdefault(find(x), []).append(x)
    return list(groups.values())


def _attempt(conf: dict, seed: int, database_path: Path, image_dir: Path, tmp: Path, num_images: int = 0,
             progress: bool = False, input_model: Path | None = None, start: int = 0) -> dict:
    """One mapping run and what judges it: registered images and points of its largest model, after the images that
    observe too few of its points are taken out of every model (:func:`prune_weak_images`), and that model's
    agreement with the verified two-view geometries (:mod:`.consistency`)."""
    from .consistency import agreement

    t = time.perf_counter()
    models = _map_once(conf, seed, database_path, image_dir, tmp, num_images, progress, input_model, start)
    min_points = int(conf.get("min_image_points", MIN_IMAGE_POINTS) or 0)
    weak = [prune_weak_images(rec, min_points) for rec in models]
    if any(weak):
        logger.info("Mapping (%s): %d images left out of the models: each observed fewer than %d 3D points",
                    conf["mapper"], sum(map(len, weak)), min_points)
    models = sorted((r for r in models if r.num_reg_images() >= 2), key=_model_size, reverse=True)
    best = models[0] if models else None
    ag = agreement(best, database_path)
    return {"mapper": conf["mapper"], "seed": seed, "registered": best.num_reg_images() if best else 0,
            "points": best.num_points3D() if best else 0, "agreement": ag["agreeing_pairs"],
            "pairs_checked": ag["pairs"], "weak_removed": sum(map(len, weak)),
            "seconds": round(time.perf_counter() - t, 1), "models": models}


def agrees(agreement: float | None) -> bool:
    """Whether a model's agreement with its verified pairs (:mod:`.consistency`; None: nothing to check) is trusted.
    The run's summary and report judge the kept model with the same rule."""
    return agreement is None or agreement >= MIN_AGREEMENT


def _trusted(t: dict) -> bool:
    return t["registered"] >= 2 and agrees(t["agreement"])


def _complete(t: dict, num_images: int) -> bool:
    return t["registered"] >= num_images and _trusted(t)


def _rank(t: dict) -> tuple:
    return (t["registered"], t["points"])


def _grows(t: dict, first: dict) -> bool:
    """Whether attempt ``t`` may replace the configured mapper's trusted model ``first``: registering more images, it
    must also hold more 3D points. Right extra cameras add points; cameras placed wrongly (a symmetric object ring
    matched across, where the global mapper's poses still agree with the two-view geometries) lose their tracks to
    the reprojection filter, so such models came out with 1-12 % fewer points than the smaller right incremental
    model on every such scene measured (docs/mapping.md, "More images must come with more points"), while right
    global models had 10-540 % more."""
    return t is first or t["registered"] <= first["registered"] or t["points"] > first["points"]


def _choose(tried: list[dict]) -> dict:
    """The trusted attempt with the most registered images (then points), where one with more images than a trusted
    first attempt (the configured mapper) also has more points (:func:`_grows`); without a trusted one, the best
    attempt of the configured mapper (the first ones), never an untrusted alternative."""
    trusted = [t for t in tried if _trusted(t)]
    first = tried[0]
    if trusted:
        if _trusted(first):
            trusted = [t for t in trusted if _grows(t, first)]
        return max(trusted, key=_rank)
    return max((t for t in tried if t["mapper"] == first["mapper"]), key=_rank)


def _georeference(models: list, database_path: Path, conf: dict) -> dict | None:
    """Every model whose images carry enough GPS positions moved into ENU metres (:mod:`.georeference`); returns what
    was done to the largest (None where no image has a position, or ``georeference`` is off)."""
    from .georeference import describe, georeference, gps_priors

    gps = gps_priors(database_path) if conf.get("georeference", True) else {}
    if not gps or not models:
        return None
    done = [georeference(rec, gps, float(conf.get("gps_max_error") or GPS_MAX_ERROR)) for rec in models]
    g = done[0]
    if g["georeferenced"]:
        logger.info("Georeferenced: %s", describe(g))
    else:
        logger.info("Not georeferenced: %s", g["why"])
    return g


def _describe(t: dict) -> str:
    ag = "n/a" if t["agreement"] is None else f"{t['agreement']:.2f}"
    return f"{t['mapper']} (seed {t['seed']}): {t['registered']} images, {t['points']} points, agreement {ag}"


def pair_groups(database_path: Path, min_inliers: int) -> list[int]:
    """Sizes of the connected components of the verified-pair graph (pairs with at least ``min_inliers`` inlier
    matches), largest first; images without such a pair are in none. The largest is the most one model can
    register: images of other components belong to other models, so leaving them out of the largest is no reason
    to map again."""
    import pycolmap

    db = pycolmap.Database.open(str(database_path))
    try:
        pair_ids, counts = db.read_two_view_geometry_num_inliers()
    finally:
        db.close()
    links = (pycolmap.pair_id_to_image_pair(pid) for pid, n in zip(pair_ids, counts) if n >= min_inliers)
    return sorted(map(len, _components((), links)), reverse=True)


def extendable(model_dir: str | Path, features_path: str | Path,
               names: list[str] | None = None) -> tuple[dict[str, tuple[int, int]] | None, str | None]:
    """Whether the model in ``model_dir`` (an earlier run's ``sparse/0``) can be continued on this run's images
    (``names`` of ``features_path``; default: all): ``({name: (image_id, camera_id)}, None)`` for the database to keep
    (:func:`cd_sfm.colmap.database.main`'s ``keep_ids``), or ``(None, why not)``. Every image of the model must still
    be used, with the keypoints it had there (features are reused unless the image changed: checked on a sample of
    positions), and the model must be one of ours (a frame per image with its id, a rig per camera with its id)."""
    import h5py
    import pycolmap

    model_dir = Path(model_dir)
    if not any((model_dir / f"images.{ext}").exists() for ext in ("bin", "txt")):
        return None, f"no model in {model_dir} to extend"
    try:
        rec = pycolmap.Reconstruction(str(model_dir))
    except Exception as e:  # noqa: BLE001 - pycolmap raises RuntimeError / ValueError on damaged files
        return None, f"{model_dir}: model not readable ({e})"
    used = None if names is None else set(names)
    ids: dict[str, tuple[int, int]] = {}
    with h5py.File(features_path, "r", libver="latest") as f:
        for i in rec.reg_image_ids():
            im = rec.images[i]
            if im.name not in f or (used is not None and im.name not in used):
                return None, f"{im.name}, an image of the model in {model_dir}, is not used in this run"
            kps = f[im.name]["keypoints"]
            n = im.num_points2D()
            if len(kps) != n:
                return None, f"{im.name} has {len(kps)} keypoints, {n} in the model (its features were extracted again)"
            sample = np.unique(np.r_[np.arange(0, n, max(1, n // 64)), n - 1]) if n else np.zeros(0, int)
            xy = np.array([im.points2D[int(k)].xy for k in sample]).reshape(-1, 2)
            if not np.allclose(np.asarray(kps[sample], np.float64) + 0.5, xy, atol=1e-3):  # COLMAP: + 0.5
                return None, f"{im.name} has other keypoints than in the model (its features were extracted again)"
            if im.frame_id != i or rec.frames[im.frame_id].rig_id != im.camera_id:
                return None, f"{model_dir}: the model's frames or rigs are not one per image and camera"
            ids[im.name] = (i, im.camera_id)
    if not ids:
        return None, f"{model_dir}: the model has no registered image"
    return ids, None


def main(conf: dict | None, database_path: str | Path, image_dir: str | Path, output_dir: str | Path,
         progress: bool = False, extend: str | Path | None = None) -> tuple:
    """Map ``database_path``; returns ``(reconstruction or None, stats)``. See the module docstring for outputs.
    ``progress``: a progress bar of registered images (incremental mapping).

    When the largest model does not register every image of the largest connected component of verified pairs with
    a model that agrees with the two-view geometries (see :mod:`.consistency`), it maps again: first with the other
    mapper (``conf["fallback"]``, global for incremental and the other way round, up to ``fallback_max_images``),
    then with the next seeds (``conf["retries"]`` times, up to ``retry_max_images`` images: incremental mapping can
    start from an unlucky initial pair and keep a small first model), and keeps the trusted attempt that registers
    the most images (then has the most points); an untrusted alternative never replaces the configured mapper's
    model, nor does one that registers more images than its trusted model with fewer 3D points (:func:`_grows`). ``stats["tried"]`` lists every attempt.

    ``extend``: a model folder to continue instead (an earlier run's ``sparse/0``, the database written with its ids:
    :func:`extendable`). The incremental mapper (whatever mapper is configured: only it continues a model) registers
    the other images into it with the model's camera poses held fixed (``fix_existing_frames``, unless the incremental
    options say otherwise); nothing else is tried. Where pycolmap cannot load it, the mapping starts from scratch.
    ``stats["extended"]``: the number of images the model had (None without ``extend``).
    """
    conf = {**default_conf, **(conf or {})}
    database_path, image_dir, output_dir = Path(database_path), Path(image_dir), Path(output_dir)
    if not database_path.exists():
        raise CdSfmError(f"{database_path}: database not found")
    pipeline_options(conf)  # option errors before any work
    sparse = output_dir / "sparse"
    tmp = output_dir / f".sparse.tmp.{os.getpid()}"  # per process (the output lock keeps runs apart anyway)
    t0 = time.perf_counter()
    seed = conf.get("seed")
    seed = int(seed) if seed is not None else -1
    groups = pair_groups(database_path, _min_num_matches(pipeline_options(conf)))
    num_images = groups[0] if groups else 0
    retries = int(conf.get("retries") or 0) if num_images <= int(conf.get("retry_max_images") or 0) else 0
    logger.info("Mapping (%s) ...", conf["mapper"])
    # the configured mapper; then, while no attempt has registered the whole component with a trusted model: the
    # other mapper once (cheap next to a retry, and the one that succeeds on forward motion and forward-facing
    # captures where incremental mapping finds no good initial pair), then the configured one with the next seeds
    other = OTHER_MAPPER.get(conf["mapper"])
    use_other = bool(conf.get("fallback")) and other is not None and \
        num_images <= int(conf.get("fallback_max_images") or 0)
    plan = [(conf, seed)]
    if use_other:
        plan.append(({**conf, "mapper": other, "options": conf.get("fallback_options") or {}}, seed))
    plan += [(conf, seed + k if seed >= 0 else -1) for k in range(1, retries + 1)]
    tried: list[dict] = []
    extended = None
    if extend is not None:
        import pycolmap

        extended = pycolmap.Reconstruction(str(extend)).num_reg_images()
        options = conf["options"] if conf["mapper"] == "incremental" else conf.get("fallback_options") or {}
        c = {**conf, "mapper": "incremental", "options": {"fix_existing_frames": True, **options}}
        logger.info("Mapping: extending %s (%d images, their poses kept)", extend, extended)
        try:
            tried.append(_attempt(c, seed, database_path, image_dir, tmp, num_images, progress, Path(extend),
                                  extended))
            plan = []
        except Exception as e:  # noqa: BLE001 - pycolmap's loader raises on a model that does not fit the database
            logger.warning("Mapping: %s could not be extended (%s); mapping from scratch", extend, e)
            extended = None
    for c, s in plan:
        if tried:
            best_now = max(tried, key=_rank)
            logger.info("Mapping: best so far %d of %d images%s; trying %s (seed %s)", best_now["registered"],
                        num_images, "" if _trusted(best_now) else " (model not trusted)", c["mapper"], s)
        tried.append(_attempt(c, s, database_path, image_dir, tmp, num_images, progress))
        if _complete(tried[-1], num_images):
            break
    chosen = _choose(tried)
    if chosen["registered"] >= 2 and not _trusted(chosen):
        logger.warning("Mapping: no attempt gave a model that agrees with the verified two-view geometries: the kept "
                       "model agrees with %.2f of its pairs (trusted from %g), some cameras are likely placed wrongly",
                       chosen["agreement"], MIN_AGREEMENT)
    for t in tried:
        if _trusted(t) and _trusted(tried[0]) and not _grows(t, tried[0]):
            logger.info("Mapping: %s not kept: %d images but %d 3D points, fewer than the %d of %s's %d images (wrongly "
                        "placed cameras lose their tracks)", _describe(t), t["registered"], t["points"],
                        tried[0]["points"], tried[0]["mapper"], tried[0]["registered"])
    ranked = chosen["models"]
    if extended is None:
        georef = _georeference(ranked, database_path, conf)
    else:  # an extended model keeps the frame it had (georeferenced or not): its poses stay exactly where they were
        georef = {"georeferenced": False, "kept_frame": True,
                  "why": "an extended model keeps the frame of the model it continues (georeferenced if that one was)"}
    if len(tried) > 1:
        logger.info("Mapping attempts: %s -> %s", "; ".join(_describe(t) for t in tried), _describe(chosen))
    attempts = len(tried)
    with writing(sparse):  # a full disk is one line naming the model folder
        # write the models in rank order: sparse/0 is the largest
        staged = output_dir / f".sparse.new.{os.getpid()}"
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        for i, rec in enumerate(ranked):
            (staged / str(i)).mkdir()
            rec.write_binary(str(staged / str(i)))
        old = output_dir / f".sparse.old.{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        if sparse.exists():
            sparse.rename(old)
        staged.rename(sparse)
        shutil.rmtree(old, ignore_errors=True)
        best = ranked[0] if ranked else None
        ply = output_dir / "points.ply"
        if best is not None:
            ply_tmp = output_dir / f".points.ply.{os.getpid()}.tmp"
            best.export_PLY(str(ply_tmp))
            ply_tmp.replace(ply)
        else:
            ply.unlink(missing_ok=True)
    stats = model_stats(best)
    stats.update(num_models=len(ranked), mapper=chosen["mapper"], attempts=attempts, seconds=time.perf_counter() - t0,
                 extended=extended, georeference=georef,
                 agreement=chosen["agreement"], num_connected_images=num_images, pair_groups=groups,
                 model_sizes=[list(_model_size(rec)) for rec in ranked], weak_removed=chosen["weak_removed"],
                 tried=[{k: v for k, v in t.items() if k != "models"} for t in tried])
    stats["registered"] = sorted(best.images[i].name for i in best.reg_image_ids()) if best is not None else []
    logger.info("Mapping: %d models, the largest with %d images and %d points", len(ranked), stats["num_registered"],
                stats["num_points3D"])
    return best, stats
