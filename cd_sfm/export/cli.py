"""``cd-sfm export OUT --to KIND [--output DIR] [--images DIR] [--max-image-size N]`` (see :mod:`cd_sfm.export`)."""

from __future__ import annotations

NEXT_STEPS = {
    "colmap3": "colmap gui --database_path {out}/database.db --image_path {images} (then File > Import model: "
               "{model})",
    "undistorted": "colmap patch_match_stereo --workspace_path {out} && colmap stereo_fusion --workspace_path {out} "
                   "--output_path {out}/fused.ply",
    "gaussian-splatting": "python train.py -s {out}   (in a gaussian-splatting checkout)",
    "openmvs": "InterfaceCOLMAP -i {out} -o {out}/scene.mvs && DensifyPointCloud {out}/scene.mvs",
    "nerfstudio": "ns-train splatfacto --data {out}   (or nerfacto)",
}


def _recorded_images(out) -> str:
    from ..io import CdSfmError
    from . import image_dir_of

    try:
        return str(image_dir_of(out))
    except CdSfmError:
        return "IMAGES"


def cmd_export(args) -> int:
    from pathlib import Path

    from . import KINDS, export, resolve_kind

    kinds = list(KINDS) if args.to == "all" else [resolve_kind(k) for k in args.to.split(",")]
    if args.output is not None and len(kinds) > 1:
        from ..io import CdSfmError

        raise CdSfmError("--output: give one kind with --to (several kinds go to OUT/export/<kind>)")
    for kind in kinds:
        st = export(kind, args.out, output=args.output, image_dir=args.images, max_image_size=args.max_image_size,
                    mask_dir=args.masks)
        what = (f"{st['num_images']} images, {st['num_points3D']} points, {'/'.join(st['camera_models'])} cameras"
                if "num_points3D" in st else
                f"{st['num_images']} images, {st['num_matched_pairs']} matched pairs, "
                f"{st['num_two_view_geometries']} two-view geometries")
        print(f"{kind}: {st['output']} ({what}" + (f", {st['num_masks']} masks" if st.get("num_masks") else "") + ")")
        images = args.images or _recorded_images(args.out)
        print("  next: " + NEXT_STEPS[kind].format(out=st["output"], images=images,
                                                   model=Path(args.out) / "sparse" / "0")
              + (f" --StereoFusion.mask_path {st['output']}/masks" if kind == "undistorted" and st.get("num_masks")
                 else ""))
    return 0


def add_parser(subparsers):
    from . import KINDS

    p = subparsers.add_parser("export", help="export OUT for other tools: COLMAP 3.x, undistorted (dense), "
                                             "gaussian-splatting, openmvs, nerfstudio")
    p.add_argument("out", help="output folder of `cd-sfm reconstruct`")
    p.add_argument("--to", required=True, metavar="KIND",
                   help=f"{', '.join(KINDS)}, several joined by commas, or all")
    p.add_argument("--output", help="folder to write (default OUT/export/KIND)")
    p.add_argument("--images", help="image folder (default: the one in OUT/summary.json)")
    p.add_argument("--max-image-size", type=int, help="undistorted images: longest side at most this (default: full)")
    p.add_argument("--masks", help="feature masks to undistort for the undistorted and nerfstudio kinds (default: the "
                                   "run's masks, from OUT/config.yaml)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="debug output")
    p.add_argument("-q", "--quiet", action="count", default=0, help="less output")
    p.set_defaults(func=cmd_export)
    return p
