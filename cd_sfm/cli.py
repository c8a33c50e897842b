"""``cd-sfm``: the command line.

    cd-sfm reconstruct IMAGES OUT [--config NAME] [--features sift|rootsift|contextdesc] [--model NAME|FOLDER]
                                  [--pairs exhaustive|sequential|retrieval|FILE|A+B] [--retrieval auto|regional|local]
                                  [--mapper incremental|global|hierarchical] [--ray auto|local|ADDRESS]
    cd-sfm extract IMAGES OUT      features.h5
    cd-sfm pairs IMAGES OUT        pairs.txt
    cd-sfm match OUT               matches.h5
    cd-sfm sfm IMAGES OUT          database.db, sparse/0, points.ply, summary.json
    cd-sfm demo OUT                render the bundled synthetic scene and reconstruct it
    cd-sfm export OUT --to KIND    colmap3 | undistorted | gaussian-splatting | openmvs | nerfstudio -> OUT/export/KIND
    cd-sfm report OUT              OUT/report.html and OUT/overview.png (also written by reconstruct and sfm)

Settings: built-in defaults < ``--config`` preset (``cd_sfm/configs/NAME.yaml`` or a YAML path) < flags. The stage
subcommands start from the ``config.yaml`` already in OUT (so a stage rerun keeps the settings of the run), then apply
``--config`` and flags. Errors in the input give one line on stderr and exit status 2.

Hook points: other parts of the package add subcommands (``models``, ``train``, ``eval``, ``match-pair``, ``export``,
``report``) by providing
the modules listed in :data:`EXTRA_COMMANDS`; each must define ``add_parser(subparsers)`` that registers its
sub-parser with ``set_defaults(func=callable(args) -> int | None)``, and must not import TensorFlow at module level.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

from . import __version__
from . import config as config_mod
from . import native_stderr
from .config import PRECISIONS
from .io import CdSfmError, output_lock

logger = logging.getLogger("cd_sfm")

# ----------------------------------------------------------------------------------------------------------------------
# HOOK POINT: subcommands provided by other modules. (command, module); the module defines add_parser(subparsers).
EXTRA_COMMANDS: list[tuple[str, str]] = [
    ("models", "cd_sfm.modeltools.cli"),  # list / download / import / convert model weights
    ("train", "cd_sfm.train.cli"),  # mine patches and train the local / augmentation models
    ("eval", "cd_sfm.evaluation.cli"),  # HPatches MMA, relative pose AUC, SfM statistics
    ("match-pair", "cd_sfm.match_pair"),  # match two images and draw the matches
    ("export", "cd_sfm.export.cli"),  # COLMAP 3.x database, undistorted / gaussian-splatting / openmvs / nerfstudio
    ("report", "cd_sfm.report"),  # report.html + overview.png of an output folder
]
# ----------------------------------------------------------------------------------------------------------------------


def _features_choices() -> list[str]:
    try:
        from .features.extract import confs

        return sorted(confs)
    except Exception:  # pragma: no cover - the extraction module is part of the package
        return ["sift", "rootsift", "contextdesc"]


def quiet_tensorflow(verbose: int) -> None:
    """TensorFlow's native start-up lines (cpu_feature_guard, oneDNN, absl's pre-init warning) go to stderr from C++
    as soon as it is imported, and its Python deprecation notes through the ``tensorflow`` logger: silence both unless
    ``-v``. Must run before anything imports TensorFlow; the variable is inherited by subprocesses and local Ray
    workers. A value the user set is kept."""
    if verbose > 0:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    # TensorFlow 2.21 on CPUs where it turns oneDNN on writes absl lines while importing, whatever the level says
    native_stderr.quiet_import("tensorflow")


def setup_logging(verbose: int, quiet: int) -> int:
    quiet_tensorflow(verbose)
    level = logging.INFO - 10 * verbose + 10 * quiet
    level = max(logging.DEBUG, min(logging.ERROR, level))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s] %(message)s", "%H:%M:%S"))
    root = logging.getLogger("cd_sfm")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    try:
        from .colmap import quiet_colmap

        quiet_colmap(level)
    except Exception:  # pycolmap missing: reported where it is needed
        pass
    return level


# ----------------------------------------------------------------------------------------------------------------------
# argument groups


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help=f"preset name ({', '.join(config_mod.available_presets())}) or a YAML file")
    p.add_argument("--overwrite", action="store_true", help="recompute features / matches already in OUT")
    p.add_argument("-v", "--verbose", action="count", default=0, help="debug output, with COLMAP's own log")
    p.add_argument("-q", "--quiet", action="count", default=0, help="less log output, no progress bars")


def _add_features(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("features")
    g.add_argument("--features", help=f"feature preset: {', '.join(_features_choices())}")
    g.add_argument("--max-image-size", type=int, help="longest image side the features see (0: full size)")
    g.add_argument("--max-keypoints", type=int, help="keypoints per image at most")
    g.add_argument("--masks", metavar="DIR",
                   help="feature masks as COLMAP's mask_path: image a/b.jpg -> DIR/a/b.jpg.png (or a/b.png), black = "
                        "no keypoints")
    g.add_argument("--model", help="ContextDesc model: a name of `cd-sfm models list` or a folder holding local.npz "
                                   "(default: the shipped model)")
    g.add_argument("--no-augment", dest="augment", action="store_const", const=False, default=None,
                   help="ContextDesc: store the raw local descriptors (no context augmentation)")
    g.add_argument("--precision", choices=PRECISIONS,
                   help="ContextDesc inference: auto (default: the int8 local model when the model has one, else bf16 "
                        "where the CPU computes it natively, else fp32), or one of them")


def _add_ray(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray (optional: pip install 'cd_sfm[ray]')")
    g.add_argument("--ray", metavar="auto|local|ADDRESS",
                   help="run extraction and matching on Ray workers: auto (a running cluster, else a local one), "
                        "local, or a cluster address")
    g.add_argument("--ray-workers", type=int, help="Ray workers (default: the cluster's CPUs)")


def _add_pairs(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pairs")
    g.add_argument("--pairs", help="auto (default), exhaustive, sequential, retrieval, spatial (nearest by EXIF GPS), "
                                   "a file of 'name0 name1' lines, or a union of these joined by + (e.g. "
                                   "retrieval+sequential)")
    g.add_argument("--overlap", type=int, help="sequential pairs: each image with the next N")
    g.add_argument("--num-neighbors", type=int, help="retrieval / spatial pairs: each image with its N most similar / "
                                                     "nearest")
    g.add_argument("--retrieval", choices=["auto", "regional", "local"],
                   help="retrieval descriptor: regional (GeM of the regional ResNet50), local (VLAD of the local "
                        "features), auto (regional when its weights are available, else local)")


def _add_matching(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("matching")
    g.add_argument("--matching", help="matching preset (NN-ratio, NN-colmap, NN-ratio-0.9, NN-mutual)")
    g.add_argument("--ratio", type=float, help="Lowe's ratio test threshold")


def _add_sfm(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("COLMAP")
    g.add_argument("--camera-mode", choices=["auto", "single", "per-folder", "per-image"],
                   help="which images share intrinsics (default auto: same size and EXIF camera; without EXIF, numbered "
                        "frames of one capture share one)")
    g.add_argument("--camera-model", help="COLMAP camera model (default SIMPLE_RADIAL)")
    g.add_argument("--prior-focal-length", action="store_true", default=None,
                   help="treat the focal guess as reliable even without EXIF")
    g.add_argument("--mapper", choices=["incremental", "global", "hierarchical"],
                   help="pycolmap mapping pipeline (hierarchical: clusters mapped separately and merged, for large "
                        "scenes)")
    g.add_argument("--rig-config", metavar="FILE",
                   help="COLMAP's rig_config.json (rig_configurator's format): images of a rig camera share one camera, "
                        "images taken together form a frame; rig poses it leaves out are measured on a first model")
    g.add_argument("--extend", action="store_true", default=None,
                   help="continue OUT/sparse/0 of an earlier run: its cameras keep their poses and the images added "
                        "since are registered into it (COLMAP's mapper --input_path), instead of mapping from scratch")
    g.add_argument("--no-georeference", dest="georeference", action="store_false", default=None,
                   help="keep the mapper's frame even where the images carry EXIF GPS positions (by default a model "
                        "with enough of them is moved into east-north-up metres around them)")
    g.add_argument("--seed", type=int, help="random seed of the mapper (-1: random)")


def _overrides(args: argparse.Namespace) -> dict:
    """Config overrides from the flags that were given."""
    keys = ["features", "max_image_size", "model", "augment", "pairs", "overlap", "num_neighbors", "retrieval",
            "matching", "camera_mode", "camera_model", "prior_focal_length", "mapper", "extend", "georeference", "seed", "ray"]
    over = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if getattr(args, "masks", None) is not None:
        over["masks"] = str(Path(args.masks).resolve())  # config.yaml must find it from any folder
    if getattr(args, "rig_config", None) is not None:
        over["rig_config"] = str(Path(args.rig_config).resolve())
    fo = {k: getattr(args, k) for k in ("max_keypoints", "precision") if getattr(args, k, None) is not None}
    if fo:
        over["features_options"] = fo
    if getattr(args, "ratio", None) is not None:
        over["matching_options"] = {"ratio": args.ratio}
    if getattr(args, "ray_workers", None) is not None:
        over["ray_options"] = {"num_workers": args.ray_workers}
    return over


def _check_flags(args: argparse.Namespace, conf: dict) -> None:
    """Flags that only mean something for ContextDesc features must not be silently ignored (checked on the merged
    flat settings, before the whole configuration is)."""
    given = [f for f, v in (("--model", getattr(args, "model", None)), ("--no-augment", getattr(args, "augment", None)),
                            ("--precision", getattr(args, "precision", None))) if v is not None]
    if given:
        from .features.extract import confs

        preset = confs.get(conf.get("features"))
        if preset is not None and preset["backend"] != "contextdesc":
            raise CdSfmError(f"{' and '.join(given)}: only for ContextDesc features, but features are "
                             f"{conf['features']!r}; add --features contextdesc")


def _merge(base, over: dict) -> dict:
    out = {**dict(base), "_preset": base.get("_preset")}
    for k, v in over.items():
        if k in ("features_options", "matching_options", "ray_options") and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def build_config(args: argparse.Namespace, out_dir: Path | None = None, from_saved: bool = False) -> dict:
    """Defaults < (saved OUT/config.yaml, for stage commands without --config) < --config < flags."""
    base = None
    if from_saved and out_dir is not None and args.config is None:
        saved = config_mod.read_saved(out_dir / "config.yaml")
        if saved:
            config_mod.check_keys(saved, str(out_dir / "config.yaml"))
            base = config_mod.resolve({**saved, "_preset": str(out_dir / "config.yaml")},
                                      source=str(out_dir / "config.yaml"))
    if base is None:
        base = config_mod.load_config(args.config or "default")
    merged = _merge(base, _overrides(args))
    _check_flags(args, merged)
    return config_mod.resolve(merged)


# ----------------------------------------------------------------------------------------------------------------------
# commands


def cmd_reconstruct(args) -> int:
    from .pipeline import format_summary, reconstruct

    conf = build_config(args)
    summary = reconstruct(args.images, args.out, conf, overwrite=args.overwrite, progress=args.quiet == 0)
    print(format_summary(summary))
    return 0


def _stage_prepare(args, out_dir: Path, check_pairs: bool = False) -> dict:
    """The stage's configuration, checked and saved in ``OUT/config.yaml``; call it holding ``output_lock(OUT)``."""
    from .pipeline import check_not_stale, check_writable, prepare_conf

    check_writable(out_dir)
    conf = prepare_conf(build_config(args, out_dir, from_saved=True), check_pairs=check_pairs)
    check_not_stale(out_dir, conf, args.overwrite)
    config_mod.save_config(conf, out_dir / "config.yaml")
    return conf


def cmd_extract(args) -> int:
    from .pipeline import run_extract

    with output_lock(args.out):
        conf = _stage_prepare(args, Path(args.out))
        st = run_extract(args.images, args.out, conf, overwrite=args.overwrite, progress=args.quiet == 0)
        print(f"Features of {len(st['used'])} / {len(st['found'])} images in {Path(args.out) / 'features.h5'} "
              f"({st['extracted']} extracted, {st['reused']} reused, {len(st['skipped'])} skipped)")
        for name, reason in list(st["skipped"].items())[:10]:
            print(f"Skipped {name}: {reason}")
        return 0


def _usable_names(image_dir: Path, out_dir: Path) -> list[str]:
    from .images import list_images
    from .pipeline import FEATURES, keypoint_counts

    if (out_dir / FEATURES).exists():
        counts = keypoint_counts(out_dir / FEATURES)
        return [n for n in list_images(image_dir) if counts.get(n, 0) > 0]
    return list_images(image_dir)


def cmd_pairs(args) -> int:
    from .pipeline import check_image_dir, run_pairs

    with output_lock(args.out):
        out_dir = Path(args.out)
        conf = _stage_prepare(args, out_dir, check_pairs=True)
        image_dir = check_image_dir(args.images)
        names = _usable_names(image_dir, out_dir)
        pairs = run_pairs(names, out_dir, conf, image_dir=image_dir)
        print(f"{len(pairs)} pairs of {len(names)} images in {out_dir / 'pairs.txt'}")
        return 0


def cmd_match(args) -> int:
    from .pipeline import run_match

    with output_lock(args.out):
        conf = _stage_prepare(args, Path(args.out))
        st = run_match(args.out, conf, overwrite=args.overwrite, progress=args.quiet == 0)
        print(f"Matches in {Path(args.out) / 'matches.h5'}: {st['matched']} pairs matched "
              f"({st['num_matches_mean']:.0f} matches on average), {st['reused']} reused, {len(st['skipped'])} skipped")
        return 0


def cmd_sfm(args) -> int:
    from .pipeline import format_summary, sfm_stage

    with output_lock(args.out):
        out_dir = Path(args.out)
        conf = _stage_prepare(args, out_dir)
        summary = sfm_stage(args.images, out_dir, conf, progress=args.quiet == 0)
        print(format_summary(summary))
        return 0


def cmd_demo(args) -> int:
    from .io import atomic_write_text
    from .pipeline import check_writable, format_summary, reconstruct, write_report
    from .synthetic import compare_to_ground_truth, render_scene

    out_dir = check_writable(args.out)
    scene = render_scene(out_dir / "scene", num_images=args.num_images, seed=args.scene_seed)
    over = _overrides(args)
    over.setdefault("camera_mode", "single")  # one camera rendered every image
    merged = _merge(config_mod.load_config(args.config or "default"), over)
    _check_flags(args, merged)
    conf = config_mod.resolve(merged)
    summary = reconstruct(scene.image_dir, out_dir, conf, overwrite=args.overwrite, progress=args.quiet == 0,
                          report=False)  # written below, with the ground truth
    cmp = {"aligned": False}
    if summary["num_images_registered"] >= 3:
        cmp = compare_to_ground_truth(out_dir / "sparse" / "0", scene.gt_dir)
    summary["ground_truth"] = cmp
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_report(out_dir)
    print(format_summary(summary))
    if cmp.get("aligned"):
        print(f"Against ground truth ({cmp['num_compared']} cameras): max rotation error "
              f"{cmp['max_rotation_error_deg']:.3f} deg, max position error "
              f"{100 * cmp['max_position_error'] / cmp['scene_radius']:.3f} % of the camera distance")
    else:
        print("Against ground truth: could not align the reconstruction")
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cd-sfm", description="ContextDesc features as a front end for COLMAP: photos -> sparse reconstruction.")
    parser.add_argument("--version", action="version", version=f"cd-sfm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("reconstruct", help="all stages: images -> OUT/sparse/0 (resumable)")
    p.add_argument("images", help="folder of images (nested folders allowed)")
    p.add_argument("out", help="output folder")
    for add in (_add_features, _add_pairs, _add_matching, _add_sfm, _add_ray, _add_common):
        add(p)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("extract", help="stage 1: local features -> OUT/features.h5")
    p.add_argument("images")
    p.add_argument("out")
    _add_features(p)
    _add_ray(p)
    _add_common(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("pairs", help="stage 2: image pairs -> OUT/pairs.txt")
    p.add_argument("images")
    p.add_argument("out")
    _add_pairs(p)
    _add_common(p)
    p.set_defaults(func=cmd_pairs)

    p = sub.add_parser("match", help="stage 3: descriptor matches of OUT/pairs.txt -> OUT/matches.h5")
    p.add_argument("out")
    _add_matching(p)
    _add_ray(p)
    _add_common(p)
    p.set_defaults(func=cmd_match)

    p = sub.add_parser("sfm", help="stage 4: COLMAP database, verification, mapping -> OUT/sparse/0")
    p.add_argument("images")
    p.add_argument("out")
    _add_sfm(p)
    _add_common(p)
    p.set_defaults(func=cmd_sfm)

    p = sub.add_parser("demo", help="render the bundled synthetic scene into OUT/scene and reconstruct it")
    p.add_argument("out")
    p.add_argument("--num-images", type=int, default=10, help="rendered views (default 10)")
    p.add_argument("--scene-seed", type=int, default=0, help="seed of the rendered scene")
    for add in (_add_features, _add_pairs, _add_matching, _add_sfm, _add_ray, _add_common):
        add(p)
    p.set_defaults(func=cmd_demo)

    # HOOK POINT: subcommands of other modules (see EXTRA_COMMANDS)
    for name, module in EXTRA_COMMANDS:
        try:
            if importlib.util.find_spec(module) is None:
                continue
        except ModuleNotFoundError:
            continue
        try:
            importlib.import_module(module).add_parser(sub)
        except Exception as e:  # a broken command must not break the others, nor vanish: it says why when used
            logging.getLogger(__name__).debug("subcommand %s unavailable", name, exc_info=True)
            _add_broken(sub, name, module, e)
    return parser


def _add_broken(sub, name: str, module: str, error: Exception) -> None:
    """A subcommand whose module failed to load: listed, and one line naming the module and the error when run."""
    why = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}".rstrip(": ")

    def fail(args) -> int:
        raise CdSfmError(f"{name}: this command could not be loaded ({module}: {why}); reinstall cd_sfm")

    p = sub.add_parser(name, help=f"(unavailable: {why})", add_help=False, prefix_chars="\0")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=fail)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, ``docker stop``, Slurm), handled as Ctrl-C: finished work is on disk, nothing half
    written, no native stack dump."""


def _on_sigterm(signum, frame):
    raise Terminated()


def handle_sigterm() -> None:
    """Stop on SIGTERM as on SIGINT. pycolmap's glog installs a failure handler for SIGTERM when it is imported (it
    prints a C stack dump and kills the process), so this must run after pycolmap is imported (``setup_logging``
    imports it), and again after anything else that installs one."""
    import signal

    try:
        importlib.import_module("pycolmap")  # its import installs glog's handler, which ours replaces
    except ImportError:
        pass
    signal.signal(signal.SIGTERM, _on_sigterm)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    setup_logging(getattr(args, "verbose", 0), getattr(args, "quiet", 0))
    handle_sigterm()
    try:
        return int(args.func(args) or 0)
    except CdSfmError as e:
        print(f"cd-sfm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        print(f"cd-sfm: {what}; finished work is kept: rerun the same command to resume", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
