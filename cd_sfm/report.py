"""A reconstruction people look at: ``OUT/report.html`` (one self-contained page) and ``OUT/overview.png``.

``write_report(out_dir)`` reads what a run left in ``out_dir`` (``summary.json``, ``sparse/0`` and ``points.ply``,
``database.db``, the images named in the summary) and writes

* ``report.html``: no network, everything inline: an interactive 3D view of the sparse points (their colours) and the
  registered cameras (frusta) drawn by a small hand-written canvas viewer (drag: rotate, wheel: zoom, shift-drag or
  right-drag: pan, double-click: reset), the run's numbers (registered images, points, track length, reprojection
  error, features, precision, Ray), a per-image table (registered, keypoints, verified pairs, inlier matches,
  observations of 3D points, why an image is missing), a few match plots (the pairs with the most, the median and
  the fewest inliers, as small JPEG data URIs) and the stage times of ``summary.json``;
* ``overview.png``: the same scene from above (matplotlib) with a few numbers, for terminals.

The 3D view is in a frame made for looking: origin at the median point, "up" the mean up direction of the registered
cameras (COLMAP's world has no up), the viewer first placed on the side of the cameras. At most :data:`MAX_POINTS`
points go into the page (a seeded random subset beyond that). The pipeline calls this at the end of ``reconstruct``
and ``sfm``; ``cd-sfm report OUT`` writes it again.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
from pathlib import Path

import numpy as np

from .io import CdSfmError, atomic_write_text, output_lock

logger = logging.getLogger(__name__)

REPORT, OVERVIEW = "report.html", "overview.png"
MAX_POINTS = 60000
NUM_MATCH_PLOTS = 3
PLOT_HEIGHT = 220  # pixels of each image in a match plot
MAX_PLOT_LINES = 150
PAIR_ID_FACTOR = 2147483647  # COLMAP's pair id: id1 * 2147483647 + id2


# --------------------------------------------------------------------------------------------------------------------
# reading the run


def read_ply_points(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(xyz float64 (N, 3), rgb uint8 (N, 3)) of a PLY file as COLMAP writes ``points.ply`` (binary little endian,
    float x y z, uchar red green blue), or None when the file is absent or another layout."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    end = data.find(b"end_header\n")
    if end < 0:
        return None
    header = data[:end].decode("ascii", "replace").split("\n")
    props = [ln.split()[-1] for ln in header if ln.startswith("property")]
    count = [int(ln.split()[-1]) for ln in header if ln.startswith("element vertex")]
    if "format binary_little_endian 1.0" not in header or props != ["x", "y", "z", "red", "green", "blue"] \
            or not count:
        return None
    dt = np.dtype([("xyz", "<f4", 3), ("rgb", "u1", 3)])
    body = data[end + len(b"end_header\n"):]
    if len(body) < count[0] * dt.itemsize:
        return None
    arr = np.frombuffer(body, dt, count[0])
    return arr["xyz"].astype(np.float64), arr["rgb"].copy()


def model_points(rec, ply: Path) -> tuple[np.ndarray, np.ndarray]:
    got = read_ply_points(ply)
    if got is not None and len(got[0]) == rec.num_points3D():
        return got
    pts = list(rec.points3D.values())  # no (matching) PLY: read the model itself
    return (np.array([p.xyz for p in pts], np.float64).reshape(-1, 3),
            np.array([p.color for p in pts], np.uint8).reshape(-1, 3))


def database_stats(database: Path) -> dict:
    """Per image (by name): id, camera, keypoints, verified pairs, inlier matches; and the verified pairs as
    ``(id1, id2, inliers)`` rows."""
    import pycolmap

    out = {"images": {}, "pairs": np.zeros((0, 3), np.int64)}
    if not database.exists():
        return out
    db = pycolmap.Database.open(str(database))
    try:
        images = db.read_all_images()
        pair_ids, counts = db.read_two_view_geometry_num_inliers()
        pid = np.asarray(pair_ids, np.int64)
        cnt = np.asarray(counts, np.int64)
        keep = cnt > 0
        pairs = np.column_stack([pid[keep] // PAIR_ID_FACTOR, pid[keep] % PAIR_ID_FACTOR, cnt[keep]])
        ids = np.array([im.image_id for im in images], np.int64)
        size = int(ids.max()) + 1 if len(ids) else 1
        npairs, inl = np.zeros(size, np.int64), np.zeros(size, np.int64)
        for col in (0, 1):
            np.add.at(npairs, pairs[:, col], 1)
            np.add.at(inl, pairs[:, col], pairs[:, 2])
        for im in images:
            out["images"][im.name] = {"image_id": int(im.image_id), "camera_id": int(im.camera_id),
                                      "keypoints": int(db.num_keypoints_for_image(im.image_id)),
                                      "verified_pairs": int(npairs[im.image_id]), "inliers": int(inl[im.image_id])}
        out["pairs"] = pairs
    finally:
        db.close()
    return out


def view_frame(centers: np.ndarray, ups: np.ndarray, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(origin, rotation (rows: the frame's x, y = up, z = towards the cameras), scale) of the viewing frame.
    ``centers`` / ``ups``: the registered cameras' centres and up directions (-y of their axes) in the world."""
    ref = xyz if len(xyz) else centers
    origin = np.median(ref, axis=0) if len(ref) else np.zeros(3)
    up = ups.mean(axis=0) if len(ups) else np.array([0.0, -1.0, 0.0])  # COLMAP: the first camera's y points down
    up = up / np.linalg.norm(up) if np.linalg.norm(up) > 1e-9 else np.array([0.0, -1.0, 0.0])
    toward = (centers.mean(axis=0) - origin) if len(centers) else np.array([0.0, 0.0, -1.0])
    toward = toward - up * (toward @ up)
    if np.linalg.norm(toward) < 1e-9:  # cameras around the scene centre: any horizontal direction
        toward = np.cross(up, [1.0, 0, 0]) if abs(up[0]) < 0.9 else np.cross(up, [0, 0, 1.0])
    z = toward / np.linalg.norm(toward)
    x = np.cross(up, z)
    R = np.stack([x / np.linalg.norm(x), up, z])
    # the radius that holds 95 % of the points and 90 % of the cameras becomes 1: the first view shows both
    radius = [float(np.percentile(np.linalg.norm(a - origin, axis=1), q)) for a, q in ((xyz, 95), (centers, 90))
              if len(a)]
    scale = 1.0 / max(max(radius, default=1.0), 1e-9)
    return origin, R, scale


def read_run(out_dir: str | Path) -> dict:
    """Everything the report shows, from the files of ``out_dir``."""
    import pycolmap

    out_dir = Path(out_dir)
    path = out_dir / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        raise CdSfmError(f"{path}: not found (run `cd-sfm reconstruct` or `cd-sfm sfm` first)") from None
    except ValueError as e:
        raise CdSfmError(f"{path}: not valid JSON ({e})") from None
    db = database_stats(out_dir / "database.db")
    model = out_dir / "sparse" / "0"
    rec = pycolmap.Reconstruction(str(model)) if (model / "cameras.bin").exists() else None
    cams = []
    xyz, rgb = np.zeros((0, 3)), np.zeros((0, 3), np.uint8)
    observed: dict[str, int] = {}
    if rec is not None:
        xyz, rgb = model_points(rec, out_dir / "points.ply")
        for image_id in sorted(rec.reg_image_ids()):
            im = rec.images[image_id]
            cam = rec.cameras[im.camera_id]
            R = im.cam_from_world().rotation.matrix()
            corners = np.array([[0, 0], [cam.width, 0], [cam.width, cam.height], [0, cam.height]], np.float64)
            rays = np.column_stack([cam.cam_from_img(corners), np.ones(4)])
            cams.append({"name": im.name, "center": np.asarray(im.projection_center(), np.float64),
                         "up": -R[1], "rays": rays @ R})  # rays in world directions (R^T applied)
            observed[im.name] = int(im.num_points3D)
    centers = np.array([c["center"] for c in cams]).reshape(-1, 3)
    origin, R, scale = view_frame(centers, np.array([c["up"] for c in cams]).reshape(-1, 3), xyz)
    return {"summary": summary, "db": db, "rec": rec, "xyz": xyz, "rgb": rgb, "cameras": cams, "observed": observed,
            "frame": (origin, R, scale), "out_dir": out_dir}


# --------------------------------------------------------------------------------------------------------------------
# pieces of the page


def image_rows(run: dict) -> list[dict]:
    """One row per image the run knew about: database images, then images skipped before the database."""
    s = run["summary"]
    registered = set(run["observed"])
    rows = []
    for name, d in sorted(run["db"]["images"].items()):
        note = "" if name in registered else "not registered"
        rows.append({"name": name, "registered": name in registered, "camera_id": d["camera_id"],
                     "keypoints": d["keypoints"], "verified_pairs": d["verified_pairs"], "inliers": d["inliers"],
                     "points3D": run["observed"].get(name, 0), "note": note})
    for name, reason in sorted((s.get("skipped") or {}).items()):
        if name not in run["db"]["images"]:
            rows.append({"name": name, "registered": False, "camera_id": None, "keypoints": 0, "verified_pairs": 0,
                         "inliers": 0, "points3D": 0, "note": f"skipped: {reason}"})
    return rows


def pick_pairs(pairs: np.ndarray, k: int = NUM_MATCH_PLOTS) -> list[tuple[int, int, int]]:
    """The verified pairs with the most, the median and the fewest inliers (up to ``k``, distinct)."""
    if not len(pairs):
        return []
    order = pairs[np.argsort(-pairs[:, 2], kind="stable")]
    idx = sorted(set(np.linspace(0, len(order) - 1, min(k, len(order))).round().astype(int).tolist()))
    return [tuple(int(v) for v in order[i]) for i in idx]


def _jpeg_data_uri(bgr: np.ndarray, quality: int = 80) -> str:
    import cv2

    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise CdSfmError("cannot encode a JPEG for the report")
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def match_plot(img0: np.ndarray, img1: np.ndarray, kp0: np.ndarray, kp1: np.ndarray, matches: np.ndarray,
               height: int = PLOT_HEIGHT, max_lines: int = MAX_PLOT_LINES, seed: int = 0,
               read_scales: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """Two RGB images side by side at ``height`` pixels with (a subset of) the matches as lines; BGR uint8.
    ``kp0`` / ``kp1``: (N, 2) pixel coordinates of the original images, OpenCV convention; ``read_scales``: the size
    of ``img0`` / ``img1`` over the original's (images read reduced)."""
    import cv2

    parts, scales = [], []
    for img, r in zip((img0, img1), read_scales):
        s = height / img.shape[0]
        parts.append(cv2.resize(img, (max(1, round(img.shape[1] * s)), height), interpolation=cv2.INTER_AREA))
        scales.append(s * r)
    canvas = cv2.cvtColor(np.hstack(parts), cv2.COLOR_RGB2BGR)
    m = np.asarray(matches, np.int64).reshape(-1, 2)
    if len(m) > max_lines:
        m = m[np.sort(np.random.default_rng(seed).choice(len(m), max_lines, replace=False))]
    p0 = (kp0[m[:, 0]] + 0.5) * scales[0] - 0.5
    p1 = (kp1[m[:, 1]] + 0.5) * scales[1] - 0.5 + np.array([parts[0].shape[1], 0])
    segs = np.round(np.stack([p0, p1], axis=1)).astype(np.int32).reshape(-1, 2, 1, 2)
    cv2.polylines(canvas, list(segs), False, (80, 230, 80), 1, cv2.LINE_AA)
    return canvas


def stored_image(path: Path, max_size: int | None = None) -> tuple[np.ndarray, float]:
    """The file's pixels as COLMAP reads them, RGB, reduced to ``max_size``: EXIF orientation is ignored, as the
    keypoints of the database are in that frame. Returns ``(image, scale)`` as :func:`cd_sfm.images.read_image`."""
    import cv2

    from .images import read_image, resize_max

    arr = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if arr is None:  # a format OpenCV does not decode: the package's reader (these carry no EXIF rotation)
        return read_image(path, max_size=max_size)
    return resize_max(cv2.cvtColor(arr, cv2.COLOR_BGR2RGB), max_size)


def match_plots(run: dict) -> list[dict]:
    """Small JPEG plots of :func:`pick_pairs` (empty when the images or the database are not there)."""
    import pycolmap

    image_dir = Path(run["summary"].get("image_dir") or "")
    by_id = {d["image_id"]: n for n, d in run["db"]["images"].items()}
    chosen = pick_pairs(run["db"]["pairs"])
    if not chosen:
        return []
    plots = []
    db = pycolmap.Database.open(str(run["out_dir"] / "database.db"))
    try:
        for id0, id1, n in chosen:
            n0, n1 = by_id.get(id0), by_id.get(id1)
            if n0 is None or n1 is None:
                continue
            try:  # read reduced: the plot is small
                img0, r0 = stored_image(image_dir / n0, max_size=4 * PLOT_HEIGHT)
                img1, r1 = stored_image(image_dir / n1, max_size=4 * PLOT_HEIGHT)
            except CdSfmError as e:
                logger.info("Report: no match plot of %s / %s (%s)", n0, n1, e)
                continue
            kp0 = np.asarray(db.read_keypoints(id0))[:, :2] - 0.5  # COLMAP -> OpenCV pixel convention
            kp1 = np.asarray(db.read_keypoints(id1))[:, :2] - 0.5
            m = np.asarray(db.read_two_view_geometry(id0, id1).inlier_matches)
            plot = match_plot(img0, img1, kp0, kp1, m, read_scales=(r0, r1))
            plots.append({"name0": n0, "name1": n1, "inliers": n, "shown": min(len(m), MAX_PLOT_LINES),
                          "src": _jpeg_data_uri(plot)})
    finally:
        db.close()
    return plots


def scene_payload(run: dict, max_points: int = MAX_POINTS) -> dict:
    """The 3D view's data: points (base64 float32 xyz, uint8 rgb) and camera frusta in the viewing frame."""
    origin, R, scale = run["frame"]
    xyz, rgb = run["xyz"], run["rgb"]
    if len(xyz) > max_points:
        keep = np.sort(np.random.default_rng(0).choice(len(xyz), max_points, replace=False))
        xyz, rgb = xyz[keep], rgb[keep]
    pts = ((xyz - origin) @ R.T * scale).astype(np.float32)
    size = 0.06  # frustum depth in viewing units (the scene spans about 1)
    cams = []
    for c in run["cameras"]:
        center = (c["center"] - origin) @ R.T * scale
        corners = center + (c["rays"] @ R.T) * size
        cams.append({"name": c["name"], "c": np.round(center, 5).tolist(), "k": np.round(corners, 5).tolist()})
    return {"points": base64.b64encode(np.ascontiguousarray(pts).tobytes()).decode("ascii"),
            "colors": base64.b64encode(np.ascontiguousarray(rgb, np.uint8).tobytes()).decode("ascii"),
            "num_points": int(len(pts)), "num_points_total": int(len(run["xyz"])), "cameras": cams}


def _fmt(v, fmt=".3f", none="n/a") -> str:
    return none if v is None else format(v, fmt) if isinstance(v, (int, float)) else str(v)


def _mapper_fact(s: dict) -> str:
    """The mapper kept, its agreement with the two-view geometries, and a warning when that is not trusted."""
    from .colmap.mapping import MIN_AGREEMENT, agrees

    mapper, agree = str(s.get("mapper_used") or s.get("mapper")), s.get("mapping_agreement")
    weak = s.get("images_left_out") or 0
    left = (f"; {weak} image{'s' if weak > 1 else ''} left out, observing fewer than "
            f"{s.get('min_image_points', 30)} of its 3D points") if weak else ""
    if not isinstance(agree, (int, float)):
        return mapper + (f" ({left[2:]})" if left else "")
    warning = "" if agrees(agree) else \
        f", under the {MIN_AGREEMENT:g} that is trusted: some cameras are likely placed wrongly"
    return f"{mapper} (agreement with the two-view geometries {agree:.2f}{warning}{left})"


def _coordinates_fact(s: dict) -> str:
    """The frame of sparse/0: the mapper's own, or east-north-up metres around the images' GPS positions."""
    g = s.get("georeference") or {}
    if g.get("georeferenced"):
        from .colmap.georeference import describe

        return describe(g)
    if g.get("kept_frame"):
        return "the earlier model's, which --extend continued (georeferenced if that one was)"
    why = f" (not georeferenced: {g['why']})" if g.get("why") else ""
    return "the mapper's own (arbitrary scale)" + why


def facts(summary: dict) -> list[tuple[str, str]]:
    """(label, value) lines of the run's numbers."""
    s = summary
    prec = s.get("precision")
    prec = ", ".join(f"{k} {v}" for k, v in prec.items()) if isinstance(prec, dict) else prec
    ray = s.get("ray")
    out = [
        ("registered images", f"{s.get('num_images_registered', 0)} / {s.get('num_images_used', 0)} used "
                              f"({s.get('num_images_found', 0)} found, {len(s.get('skipped') or {})} skipped)"),
        ("3D points", str(s.get("num_points3D", 0))),
        ("mean track length", _fmt(s.get("mean_track_length"), ".2f")),
        ("mean reprojection error", _fmt(s.get("mean_reprojection_error"), ".3f") + " px"),
        ("models", str(s.get("num_models", "n/a")) + (" (" + ", ".join(f"{n}" for n, _ in s["model_sizes"][:8])
                                                       + " images)" if len(s.get("model_sizes") or []) > 1 else "")),
        ("verified-pair groups", ", ".join(str(g) for g in (s.get("pair_groups") or [])[:8]) or "n/a"),
        ("features", str(s.get("features")) + (f" (model {s['model']})" if s.get("model") else "")),
        ("masks", f"{s['masked_images']} images masked ({s.get('masks')})" if s.get("masked_images") else "none"),
        ("precision", _fmt(prec, none="-")),
        ("pairs", f"{s.get('pairs')}: {s.get('num_pairs', 0)} pairs, {s.get('num_verified_pairs', 0)} verified"),
        ("mapper", _mapper_fact(s) + (f"; extended the earlier model of {s['extended']} images"
                                      if s.get("extended") is not None else "")),
        ("coordinates", _coordinates_fact(s)),
        ("rigs", "none" if not s.get("rig") else f"{s['rig']['rigs']}, {s['rig']['frames']} frames, poses "
                                                 f"{s['rig']['poses']}"),
        ("Ray", "off" if not ray else ", ".join(f"{k} {v}" for k, v in ray.items()) if isinstance(ray, dict)
         else str(ray)),
    ]
    gt = s.get("ground_truth") or {}
    if gt.get("aligned"):
        out.append(("against ground truth", f"max rotation error {gt['max_rotation_error_deg']:.3f} deg, max position "
                                            f"error {100 * gt['max_position_error'] / gt['scene_radius']:.3f} % of "
                                            f"the camera distance"))
    return out


def stage_times(summary: dict) -> list[tuple[str, float]]:
    return [(k, float(v)) for k, v in (summary.get("seconds") or {}).items() if k != "total"]


# --------------------------------------------------------------------------------------------------------------------
# the page

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;background:#f4f4f2;color:#222}
main{max-width:1200px;margin:0 auto;padding:12px 20px 40px}
h1{font-size:1.35em;margin:10px 0 4px} h2{font-size:1.1em;margin:22px 0 8px}
.sub{color:#666;font-size:.9em;word-break:break-all}
#view{position:relative;background:#1b1d22;border-radius:6px;overflow:hidden}
#view canvas{display:block;width:100%;height:540px;cursor:grab;touch-action:none}
#hint{position:absolute;left:10px;bottom:8px;color:#bbb;font-size:.8em;pointer-events:none}
#count{position:absolute;right:10px;bottom:8px;color:#bbb;font-size:.8em;pointer-events:none}
.facts{display:grid;grid-template-columns:max-content 1fr;gap:3px 16px;font-size:.92em}
.facts dt{color:#555} .facts dd{margin:0}
table{border-collapse:collapse;font-size:.85em;background:#fff}
th,td{border-bottom:1px solid #ddd;padding:3px 8px;text-align:right} th{background:#e9e9e6;position:sticky;top:0}
td.name,th.name,td.note{text-align:left} tr.no td{color:#a33}
.tablewrap{max-height:420px;overflow:auto;border:1px solid #ddd;display:inline-block}
.plots{display:flex;flex-wrap:wrap;gap:14px} .plots figure{margin:0;max-width:100%}
.plots img{max-width:100%;border-radius:4px;display:block} figcaption{font-size:.85em;color:#555;max-width:560px}
.bar{display:grid;grid-template-columns:90px 1fr 70px;align-items:center;gap:8px;font-size:.88em;margin:2px 0}
.bar span.b{display:block;height:14px;background:#5a8fd8;border-radius:2px}
.cols{display:flex;flex-wrap:wrap;gap:30px} .cols>div{flex:1 1 380px}
"""

_JS = r"""
(function(){
const D = JSON.parse(document.getElementById('cd-data').textContent);
function bytes(s){const b=atob(s);const u=new Uint8Array(b.length);for(let i=0;i<b.length;i++)u[i]=b.charCodeAt(i);return u;}
const P = new Float32Array(bytes(D.points).buffer), C = bytes(D.colors), N = D.num_points;
const canvas = document.getElementById('scene'), ctx = canvas.getContext('2d');
const home = {yaw: 0.5, pitch: 0.35, zoom: 1.0, px: 0, py: 0};
let v = Object.assign({}, home), drawn = 0, frames = 0, img = null, depth = null, dirty = true;
function project(x, y, z, W, H, f){
  const cy = Math.cos(v.yaw), sy = Math.sin(v.yaw), cp = Math.cos(v.pitch), sp = Math.sin(v.pitch);
  const x1 = cy*x + sy*z, z1 = -sy*x + cy*z;
  const y2 = cp*y - sp*z1, z2 = sp*y + cp*z1;
  const zc = 3.0 - z2;
  return [W/2 + v.px + f*x1/zc, H/2 + v.py - f*y2/zc, zc];
}
function resize(){
  const r = window.devicePixelRatio || 1, W = Math.max(1, Math.round(canvas.clientWidth*r)),
        H = Math.max(1, Math.round(canvas.clientHeight*r));
  if (canvas.width !== W || canvas.height !== H || !img){ canvas.width = W; canvas.height = H;
    img = ctx.createImageData(W, H); depth = new Float32Array(W*H); }
}
function draw(){
  resize();
  const W = canvas.width, H = canvas.height, f = 1.5*Math.min(W, H)*v.zoom;
  const buf = new Uint32Array(img.data.buffer); buf.fill(0xff221d1b); depth.fill(Infinity);
  const r = Math.max(1, Math.round((window.devicePixelRatio || 1)*(N < 5000 ? 3 : N < 30000 ? 2 : 1)*Math.min(2, Math.sqrt(v.zoom))));
  const cy = Math.cos(v.yaw), sy = Math.sin(v.yaw), cp = Math.cos(v.pitch), sp = Math.sin(v.pitch);
  let n = 0;
  for (let i = 0; i < N; i++){
    const x = P[3*i], y = P[3*i+1], z = P[3*i+2];
    const x1 = cy*x + sy*z, z1 = -sy*x + cy*z, y2 = cp*y - sp*z1, z2 = sp*y + cp*z1, zc = 3.0 - z2;
    if (zc < 0.05) continue;
    const u = Math.round(W/2 + v.px + f*x1/zc), w = Math.round(H/2 + v.py - f*y2/zc);
    if (u < 0 || w < 0 || u >= W || w >= H) continue;
    const col = 0xff000000 | (C[3*i+2] << 16) | (C[3*i+1] << 8) | C[3*i];
    for (let dy = 0; dy < r && w+dy < H; dy++) for (let dx = 0; dx < r && u+dx < W; dx++){
      const k = (w+dy)*W + u + dx; if (zc < depth[k]){ depth[k] = zc; buf[k] = col; } }
    n++;
  }
  ctx.putImageData(img, 0, 0);
  ctx.lineWidth = Math.max(1, (window.devicePixelRatio || 1)); ctx.strokeStyle = '#ff5a4e';
  for (const cam of D.cameras){
    const c = project(cam.c[0], cam.c[1], cam.c[2], W, H, f); if (c[2] < 0.05) continue;
    const k = cam.k.map(p => project(p[0], p[1], p[2], W, H, f));
    ctx.beginPath();
    for (const q of k){ ctx.moveTo(c[0], c[1]); ctx.lineTo(q[0], q[1]); }
    ctx.moveTo(k[0][0], k[0][1]); for (const q of [k[1], k[2], k[3], k[0]]) ctx.lineTo(q[0], q[1]);
    ctx.stroke();
  }
  drawn = n; frames++;
  document.getElementById('count').textContent = n + ' of ' + D.num_points_total + ' points, ' + D.cameras.length + ' cameras';
}
function loop(){ if (dirty){ dirty = false; draw(); } requestAnimationFrame(loop); }
let drag = null;
canvas.addEventListener('pointerdown', e => { drag = {x: e.clientX, y: e.clientY, pan: e.shiftKey || e.button === 2};
  canvas.setPointerCapture && canvas.setPointerCapture(e.pointerId); canvas.style.cursor = 'grabbing'; });
canvas.addEventListener('pointermove', e => { if (!drag) return;
  const dx = e.clientX - drag.x, dy = e.clientY - drag.y, r = window.devicePixelRatio || 1; drag.x = e.clientX; drag.y = e.clientY;
  if (drag.pan){ v.px += dx*r; v.py += dy*r; } else { v.yaw += dx*0.008;
    v.pitch = Math.max(-1.55, Math.min(1.55, v.pitch + dy*0.008)); }
  dirty = true; });
function release(){ drag = null; canvas.style.cursor = 'grab'; }
canvas.addEventListener('pointerup', release); canvas.addEventListener('pointercancel', release);
canvas.addEventListener('contextmenu', e => e.preventDefault());
canvas.addEventListener('wheel', e => { e.preventDefault();
  v.zoom = Math.max(0.05, Math.min(50, v.zoom*Math.exp(-e.deltaY*0.0015))); dirty = true; }, {passive: false});
canvas.addEventListener('dblclick', () => { v = Object.assign({}, home); dirty = true; });
window.addEventListener('resize', () => { dirty = true; });
window.cdSfmViewer = {state: () => ({yaw: v.yaw, pitch: v.pitch, zoom: v.zoom, px: v.px, py: v.py, drawn: drawn,
                                     frames: frames, points: N, cameras: D.cameras.length}),
                      redraw: () => { draw(); return drawn; }};
draw(); requestAnimationFrame(loop);
})();
"""


def _title(run: dict) -> str:
    return f"cd-sfm: {Path(run['summary'].get('output_dir') or run['out_dir']).name}"


def _esc(v) -> str:
    return html.escape(str(v), quote=True)


def _figure(p: dict) -> str:
    drawn = f" ({p['shown']} drawn)" if p["shown"] < p["inliers"] else ""
    return (f"<figure><img alt=\"matches {_esc(p['name0'])} / {_esc(p['name1'])}\" src=\"{p['src']}\">"
            f"<figcaption>{_esc(p['name0'])} &ndash; {_esc(p['name1'])}: {p['inliers']} inlier matches{drawn}"
            f"</figcaption></figure>")


def render_html(run: dict, plots: list[dict]) -> str:
    s = run["summary"]
    payload = json.dumps(scene_payload(run), separators=(",", ":")).replace("</", "<\\/")
    rows = image_rows(run)
    facts_html = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in facts(s))
    trs = "".join(
        f"<tr class=\"{'' if r['registered'] else 'no'}\"><td class=name>{_esc(r['name'])}</td>"
        f"<td>{'yes' if r['registered'] else 'no'}</td><td>{_esc(_fmt(r['camera_id'], 'd', '-'))}</td>"
        f"<td>{r['keypoints']}</td><td>{r['verified_pairs']}</td><td>{r['inliers']}</td><td>{r['points3D']}</td>"
        f"<td class=note>{_esc(r['note'])}</td></tr>" for r in rows)
    times = stage_times(s)
    tmax = max([t for _, t in times] + [1e-9])
    bars = "".join(f"<div class=bar><span>{_esc(k)}</span><span><span class=b style=\"width:{100 * t / tmax:.1f}%\">"
                   f"</span></span><span>{t:.1f} s</span></div>" for k, t in times)
    total = (s.get("seconds") or {}).get("total")
    plots_html = "".join(_figure(p) for p in plots) or \
        "<p>No verified pairs to draw (or the images are not where the summary says).</p>"
    title = _title(run)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title><style>{_CSS}</style></head>
<body><main>
<h1>{_esc(title)}</h1>
<div class=sub>{_esc(s.get('image_dir', ''))} &rarr; {_esc(s.get('output_dir', run['out_dir']))}</div>
<h2>Sparse model (sparse/0)</h2>
<div id=view><canvas id=scene></canvas><div id=hint>drag: rotate &middot; wheel: zoom &middot; shift-drag: pan
&middot; double-click: reset</div><div id=count></div></div>
<div class=cols>
<div><h2>Run</h2><dl class=facts>{facts_html}</dl></div>
<div><h2>Stage times{f' (total {total:.1f} s)' if total is not None else ''}</h2>{bars}</div>
</div>
<h2>Images ({sum(r['registered'] for r in rows)} of {len(rows)} registered)</h2>
<div class=tablewrap><table><thead><tr><th class=name>image</th><th>registered</th><th>camera</th><th>keypoints</th>
<th>verified pairs</th><th>inlier matches</th><th>3D points seen</th><th class=name>note</th></tr></thead>
<tbody>{trs}</tbody></table></div>
<h2>Matches (verified inliers)</h2><div class=plots>{plots_html}</div>
</main>
<script type="application/json" id="cd-data">{payload}</script>
<script>{_JS}</script>
</body></html>
"""


def render_overview(run: dict, path: Path) -> None:
    """``overview.png``: the points and cameras from above (in the viewing frame) and the run's numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    origin, R, scale = run["frame"]
    xyz = run["xyz"]
    if len(xyz) > 200000:
        keep = np.random.default_rng(0).choice(len(xyz), 200000, replace=False)
        xyz, rgb = xyz[keep], run["rgb"][keep]
    else:
        rgb = run["rgb"]
    p = (xyz - origin) @ R.T * scale
    fig = plt.figure(figsize=(11, 5.5), dpi=100)
    ax = fig.add_axes([0.03, 0.06, 0.55, 0.86])
    ax.set_facecolor("#1b1d22")
    if len(p):
        ax.scatter(p[:, 0], -p[:, 2], s=float(np.clip(20000 / len(p), 0.5, 6)), c=rgb / 255.0, linewidths=0)
    for c in run["cameras"]:
        cc = (c["center"] - origin) @ R.T * scale
        d = (c["rays"].mean(axis=0) @ R.T)
        d = d / max(np.linalg.norm(d[[0, 2]]), 1e-9) * 0.1
        ax.plot([cc[0], cc[0] + d[0]], [-cc[2], -cc[2] - d[2]], color="#ff5a4e", lw=1.5)
        ax.plot(cc[0], -cc[2], "o", color="#ff5a4e", ms=4)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("top view: points and cameras (red)", fontsize=10)
    s = run["summary"]
    lines = [f"{k}: {v}" for k, v in facts(s)]
    times = stage_times(s)
    tx = fig.add_axes([0.61, 0.40, 0.37, 0.52])
    tx.axis("off")
    tx.text(0, 1, f"{_title(run)}\n\n" + "\n".join(lines), va="top",
            fontsize=8.5, family="monospace", wrap=True)
    if times:
        bx = fig.add_axes([0.70, 0.08, 0.27, 0.28])
        bx.barh([k for k, _ in times][::-1], [t for _, t in times][::-1], color="#5a8fd8")
        bx.set_xlabel("seconds", fontsize=8)
        bx.tick_params(labelsize=8)
        bx.set_title("stage times", fontsize=9)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def write_report(out_dir: str | Path, png: bool = True) -> dict:
    """Write ``OUT/report.html`` (and ``OUT/overview.png``); returns their paths."""
    out_dir = Path(out_dir)
    run = read_run(out_dir)
    plots = match_plots(run)
    page = out_dir / REPORT
    out = {"html": str(page), "num_points": int(len(run["xyz"])), "num_cameras": len(run["cameras"]),
           "num_plots": len(plots)}
    with output_lock(out_dir):  # re-entrant: the pipeline calls this holding it
        atomic_write_text(page, render_html(run, plots))
        if png:
            render_overview(run, out_dir / OVERVIEW)
            out["png"] = str(out_dir / OVERVIEW)
    logger.info("Report: %s%s", page, f" and {out_dir / OVERVIEW}" if png else "")
    return out


# --------------------------------------------------------------------------------------------------------------------
# command line


def cmd_report(args) -> int:
    st = write_report(args.out, png=not args.no_png)
    print(f"Report: {st['html']} ({st['num_points']} points, {st['num_cameras']} cameras, {st['num_plots']} match "
          f"plots)" + (f"; overview: {st['png']}" if st.get("png") else ""))
    return 0


def add_parser(subparsers):
    """CLI hook: ``cd-sfm report OUT``."""
    p = subparsers.add_parser("report", help="write OUT/report.html (3D view, per-image table, match plots) and "
                                             "OUT/overview.png")
    p.add_argument("out", help="output folder of `cd-sfm reconstruct`")
    p.add_argument("--no-png", action="store_true", help="skip overview.png")
    p.add_argument("-v", "--verbose", action="count", default=0, help="debug output")
    p.add_argument("-q", "--quiet", action="count", default=0, help="less output")
    p.set_defaults(func=cmd_report)
    return p
