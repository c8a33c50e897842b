"""``cd-sfm models list | download | import | check | quantize``."""

from __future__ import annotations

from ..models.registry import DEFAULT_MODEL, ENV_HOME, OFFICIAL, home, list_models
from .manage import PARITY_TOLERANCE, _parity_failures, check, download, import_model


def add_parser(subparsers):
    return add_models_subparser(subparsers)


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
        arch = m.info.get("local_arch", "official")
        if arch != "official":  # a student layout (compact: a quarter of the multiply-adds, mini: a fourteenth)
            comps = comps.replace("local", f"local ({arch})", 1)
        from ..models.int8 import INT8_FILE, int8_path

        if m.components and (m.folder / INT8_FILE).is_file():
            comps += " (int8)" if int8_path(m.folder) else " (int8 stale)"
        rows.append((m.name, m.source + (" (default)" if m.name == DEFAULT_MODEL else ""), comps, m.trained_on))
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
