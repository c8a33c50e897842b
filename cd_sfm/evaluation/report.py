"""Markdown tables of saved evaluation results (``cd-sfm eval hpatches | pairs | sfm`` JSON files), as the README
carries them: one section per evaluation, methods as rows, with date, machine and model of the run."""

from __future__ import annotations


def _num(v, fmt):
    return "n/a" if v is None else format(v, fmt)


def _header(meta: dict) -> str:
    model = meta.get("model") or {}
    comps = "+".join(model.get("components") or []) or "?"
    return (f"_{meta.get('date', '?')}, {meta.get('machine', '?')}, model `{model.get('name', '?')}` ({comps}), "
            f"git {meta.get('git') or '?'}, {meta.get('seconds', '?')} s_")


def _absent(res: dict) -> list[str]:
    return [f"| {m} | absent: {why} |" for m, why in (res.get("absent") or {}).items()]


def hpatches_md(res: dict) -> str:
    t = res["conf"]["threshold"]
    seqs = ", ".join(res.get("sequences") or [])
    lines = [f"### HPatches ({seqs}; {res['conf']['max_keypoints']} SIFT keypoints, mutual NN)", "",
             _header(res.get("meta") or {}), "",
             f"| method | MMA@1 | MMA@3 | MMA@5 | MMA@10 | #correct@{t:g}px | #matches | matching score |",
             "|---|---|---|---|---|---|---|---|"]
    for m, r in res["methods"].items():
        mma = {int(k): v for k, v in r["mma"].items()}
        lines.append(f"| {m} | {mma[1]:.3f} | {mma[3]:.3f} | {mma[5]:.3f} | {mma[10]:.3f} | {r['n_correct']:.1f} | "
                     f"{r['n_matches']:.1f} | {r['matching_score']:.3f} |")
    return "\n".join(lines + _absent(res))


def pairs_md(res: dict) -> str:
    c = res["conf"]
    cap = f"at most {c['max_pairs']} per scene; " if c.get("max_pairs") else ""
    lines = [f"### Relative pose (pairs <= {c['max_view_angle']:g} deg apart; {cap}E-RANSAC {c['ransac_px']:g} px; "
             f"AUC in %)", "", _header(res.get("meta") or {}), "",
             "| scene | method | AUC@5 | AUC@10 | AUC@20 | #pairs | #matches | #correct | #inliers |",
             "|---|---|---|---|---|---|---|---|---|"]
    blocks = list(res["scenes"].items()) + [("all", res["methods"])]
    for scene, methods in blocks:
        for m, r in methods.items():
            auc = {int(k): v for k, v in r["auc"].items()}
            lines.append(f"| {scene} | {m} | {100 * auc[5]:.1f} | {100 * auc[10]:.1f} | {100 * auc[20]:.1f} | "
                         f"{r['n_pairs']} | {r['n_matches']:.1f} | {r['n_correct']:.1f} | {r['n_inliers']:.1f} |")
    return "\n".join(lines + _absent(res))


def sfm_md(res: dict) -> str:
    scenes = res["scenes"] if "scenes" in res else {res["scene"]: res}  # one-scene results of older runs
    lines = [f"### SfM ({', '.join(scenes)}; same keypoints, pipeline defaults)", "", _header(res.get("meta") or {}),
             "", "| scene | method | registered | 3D points | track length | reproj. error px | verified pairs | "
             "cam. pos. error (median) | rel. to camera spread | max rot. error deg | pose acc. @10 deg | "
             "own pairs @10 deg | time s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, sr in scenes.items():
        for m, r in sr["methods"].items():
            gt = r.get("gt") or {}
            rel = gt.get("relative_pose") or {}
            lines.append(f"| {name} | {m} | {r['num_images_registered']}/{r['num_images_used']} | "
                         f"{r['num_points3D']} | "
                         f"{_num(r['mean_track_length'], '.2f')} | {_num(r['mean_reprojection_error'], '.3f')} | "
                         f"{r['num_verified_pairs']} | {_num(gt.get('median_position_error'), '.4f')} | "
                         f"{_num(gt.get('relative_position_error'), '.4f')} | "
                         f"{_num(gt.get('max_rotation_error_deg'), '.2f')} | "
                         f"{_num((rel.get('pose_accuracy') or {}).get('10'), '.3f')} | "
                         f"{_num((rel.get('registered_pose_accuracy') or {}).get('10'), '.3f')} | "
                         f"{r['seconds'].get('wall', 0):.0f} |")
    if "scenes" in res and len(scenes) > 1:
        for m, r in res["methods"].items():
            lines.append(f"| all | {m} | {r['num_images_registered']}/{r['num_images_used']} | {r['num_points3D']} | "
                         f"{_num(r['mean_track_length'], '.2f')} | {_num(r['mean_reprojection_error'], '.3f')} | "
                         f"{r['num_verified_pairs']} | | {_num(r['median_relative_position_error'], '.4f')} | "
                         f"{_num(r['median_max_rotation_error_deg'], '.2f')} | "
                         f"{_num((r.get('mean_pose_accuracy') or {}).get('10'), '.3f')} | "
                         f"{_num((r.get('mean_registered_pose_accuracy') or {}).get('10'), '.3f')} | "
                         f"{r['seconds'].get('wall', 0):.0f} |")
    if res.get("seeds"):
        from .sfm import spread_text as rng

        n = next(iter(res["seeds"].values()))["seeds"]
        lines += ["", f"Over {n} mapping seeds on the same matches (mean, and range):", "",
                  "| method | registered | 3D points | pose acc. @10 deg | own pairs @10 deg |", "|---|---|---|---|---|"]
        for m, r in res["seeds"].items():
            lines.append(f"| {m} | {rng(r['registered'], '.1f')} | {rng(r['points'], '.0f')} | "
                         f"{rng(r['acc10'], '.3f')} | {rng(r['own10'], '.3f')} |")
    return "\n".join(lines + _absent(res))


def kind_of(res: dict) -> str:
    k = (res.get("meta") or {}).get("kind")
    if k:
        return k
    if "sequences" in res:
        return "hpatches"
    if "per_pair" in res:
        return "pairs"
    return "sfm"


def markdown_report(results: list[dict]) -> str:
    fmt = {"hpatches": hpatches_md, "pairs": pairs_md, "sfm": sfm_md}
    order = {"hpatches": 0, "pairs": 1, "sfm": 2}
    parts = [fmt[kind_of(r)](r) for r in sorted(results, key=lambda r: order[kind_of(r)])]
    return "\n\n".join(parts) + "\n"
