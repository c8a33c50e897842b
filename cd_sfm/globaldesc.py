"""Global image descriptors for retrieval: one L2-normalised vector per image in an hloc-style ``global-feats.h5``.

Two families:

* **regional** (``gem``, ``rmac``): pooling of the regional ResNet50 ``res5c`` map (h, w, 2048) -- GeM with p = 3, or
  R-MAC (max-pooled regions at ``rmac_levels`` scales, each L2-normalised, summed). Needs the regional model's
  weights (``cd_sfm.models.regional``); when the extraction already stored a ``global_descriptor`` per image in
  ``features.h5`` (the ContextDesc backend runs the same network), it is copied instead of running the network again.
* **local** (``vlad``, ``asmk``): aggregation of the image's own local descriptors from ``features.h5``; no pretrained
  network. A codebook of ``num_clusters`` centres is learned by seeded k-means (k-means++ start, vectorised Lloyd
  iterations) on a sample of the collection's descriptors. ``vlad``: residual sums per centre, signed power
  normalisation, intra-normalisation, L2, optional PCA(-whitening) learned on the collection. ``asmk``: the same
  per-centre aggregated residuals, each L2-normalised (empty centres zero), compared by the selective match kernel
  sum_c sigma(<u_c, v_c>) with sigma(u) = sign(u)|u|^alpha [u > tau] (``pairs.retrieval`` reads the kernel from the
  model file and uses it automatically).

Layout: ``global-feats.h5`` holds a group per image name with a ``global_descriptor`` (D,) dataset (as hloc's). What
was learned from the collection (codebook, PCA, and the options that shaped the vectors) sits next to it in
``<global-feats.h5>.model.npz``; a resumed run reuses it so that every vector of a collection lives in one space.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterable, Sequence

import h5py
import numpy as np

from .geometry import l2_normalize
from .io import ATTRS_KEY, CdSfmError, H5Appender, completed_names, entry_attrs, feature_version, read_npz
from .progress import tqdm

logger = logging.getLogger(__name__)

GLOBAL_KEY = "global_descriptor"
LOCAL_METHODS = ("vlad", "asmk")
REGIONAL_METHODS = ("gem", "rmac")


@dataclass
class GlobalConf:
    method: str = "vlad"  # gem | rmac (regional ResNet50 map) | vlad | asmk (own local descriptors)
    dtype: str = "float16"  # storage of global_descriptor (hloc stores half precision)
    # regional pooling
    gem_p: float = 3.0
    rmac_levels: int = 3
    max_size: int = 1024  # longest image side fed to the regional network
    regional_model: str | None = None  # registry model holding the regional weights (default: see load_regional_model)
    # local aggregation
    num_clusters: int = 64
    sample_per_image: int = 256  # descriptors drawn from each image for the codebook
    max_samples: int = 100_000  # total codebook sample (drawn from as many images as it takes, spread evenly)
    kmeans_iters: int = 20
    seed: int = 0
    power: float = 0.5  # VLAD signed power normalisation exponent (1 = off)
    pca_dim: int | None = None  # VLAD: project to this many dimensions (PCA learned on the collection)
    pca_whiten: bool = True
    pca_max_images: int = 4096  # images whose VLADs train the PCA
    asmk_alpha: float = 3.0
    asmk_threshold: float = 0.0

    @classmethod
    def from_any(cls, conf: "GlobalConf | dict | str | None") -> "GlobalConf":
        if conf is None:
            return cls()
        if isinstance(conf, cls):
            return conf
        if isinstance(conf, str):
            if conf not in confs:
                raise CdSfmError(f"unknown global descriptor preset {conf!r}; available: {', '.join(confs)}")
            conf = confs[conf]
        known = {f.name for f in fields(cls)}
        unknown = set(conf) - known - {"name", "output"}
        if unknown:
            raise CdSfmError(f"unknown global descriptor option(s): {', '.join(sorted(unknown))}")
        out = cls(**{k: v for k, v in conf.items() if k in known})
        if out.method not in LOCAL_METHODS + REGIONAL_METHODS:
            raise CdSfmError(f"unknown global descriptor method {out.method!r}; use one of "
                             f"{', '.join(REGIONAL_METHODS + LOCAL_METHODS)}")
        return out


# named presets (hloc style); ``--retrieval regional`` -> "gem", ``--retrieval local`` -> "vlad"
confs: dict[str, dict] = {
    "gem": {"output": "global-feats-gem", "method": "gem", "gem_p": 3.0},
    "rmac": {"output": "global-feats-rmac", "method": "rmac", "rmac_levels": 3},
    "vlad": {"output": "global-feats-vlad", "method": "vlad", "num_clusters": 64},
    "vlad-pca": {"output": "global-feats-vlad-pca", "method": "vlad", "num_clusters": 64, "pca_dim": 512},
    "asmk": {"output": "global-feats-asmk", "method": "asmk", "num_clusters": 64},
}
RETRIEVAL_PRESETS = {"regional": "gem", "local": "vlad"}


# --------------------------------------------------------------------------------------------------------------------
# small numeric helpers


def gem(fmap: np.ndarray, p: float = 3.0, eps: float = 1e-6) -> np.ndarray:
    """Generalised-mean pooling of an (h, w, C) map (values clamped at ``eps``, as res5c is taken before its ReLU),
    L2-normalised -> (C,)."""
    x = np.asarray(fmap, np.float64).reshape(-1, np.shape(fmap)[-1])
    x = np.maximum(x, eps)
    return l2_normalize(np.mean(x**p, axis=0) ** (1.0 / p))


def rmac_regions(h: int, w: int, levels: int = 3, overlap: float = 0.4) -> np.ndarray:
    """R-MAC regions (Tolias et al. 2016, as in cirtorch) of an h x w map as an (R, 4) int array of [y0, x0, y1, x1)
    boxes: the whole map, then at level l square regions of side floor(2 min(h, w) / (l + 1)), l (+ extra along the
    long side, chosen for about ``overlap`` overlap) per dimension."""
    regions = [(0, 0, h, w)]
    mn, mx = min(h, w), max(h, w)
    steps = np.arange(2, 8)
    b = (mx - mn) / (steps - 1)
    extra = int(np.argmin(np.abs((mn**2 - mn * b) / max(mn, 1) ** 2 - overlap))) + 1 if mx != mn else 0
    wd, hd = (extra, 0) if w > h else (0, extra)
    for level in range(1, levels + 1):
        side = int(np.floor(2 * mn / (level + 1)))
        if side < 1:
            break
        nx, ny = level + wd, level + hd
        xs = np.floor(np.linspace(0, w - side, nx)).astype(np.int64) if nx > 1 else np.zeros(1, np.int64)
        ys = np.floor(np.linspace(0, h - side, ny)).astype(np.int64) if ny > 1 else np.zeros(1, np.int64)
        regions += [(int(y0), int(x0), int(y0) + side, int(x0) + side) for y0 in ys for x0 in xs]
    return np.array(regions, np.int64)


def rmac(fmap: np.ndarray, levels: int = 3) -> np.ndarray:
    """R-MAC of an (h, w, C) map: max-pool each region (after ReLU), L2-normalise each, sum, L2-normalise -> (C,)."""
    x = np.maximum(np.asarray(fmap, np.float32), 0)
    h, w, _ = x.shape
    regs = rmac_regions(h, w, levels)
    # region maxima through a 2-D sparse table would be overkill for <= ~20 regions on a 32x32 map
    vecs = np.stack([x[y0:y1, x0:x1].max(axis=(0, 1)) for y0, x0, y1, x1 in regs])
    return l2_normalize(l2_normalize(vecs).sum(0))


def pool_regional(fmap: np.ndarray, conf: GlobalConf) -> np.ndarray:
    if conf.method == "gem":
        return gem(fmap, conf.gem_p)
    if conf.method == "rmac":
        return rmac(fmap, conf.rmac_levels)
    raise ValueError(conf.method)


# --------------------------------------------------------------------------------------------------------------------
# codebook: seeded, vectorised k-means


def _sq_dists(x: np.ndarray, c: np.ndarray, c_sq: np.ndarray | None = None) -> np.ndarray:
    """Squared Euclidean distances (n, k) without forming (n, k, D)."""
    if c_sq is None:
        c_sq = np.einsum("kd,kd->k", c, c)
    d = np.einsum("nd,nd->n", x, x)[:, None] - 2.0 * (x @ c.T) + c_sq[None]
    return np.maximum(d, 0)


def assign(x: np.ndarray, centers: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Index of the nearest centre of each row of ``x`` (chunked so memory stays O(chunk * k))."""
    c_sq = np.einsum("kd,kd->k", centers, centers)
    out = np.empty(len(x), np.int64)
    for s in range(0, len(x), chunk):
        xb = x[s : s + chunk]
        # argmin |x - c|^2 = argmax (x.c - |c|^2 / 2)
        out[s : s + chunk] = np.argmax(xb @ centers.T - 0.5 * c_sq[None], axis=1)
    return out


def cluster_sums(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums (k, D) and counts (k,) of the rows of ``x``: one sort and a segmented sum, O(n D) (no (n, k)
    one-hot matrix, no scatter-add)."""
    counts = np.bincount(labels, minlength=k)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    sums = np.zeros((k, x.shape[1]), np.float32)
    nz = counts > 0
    if nz.any():
        sums[nz] = np.add.reduceat(x[np.argsort(labels, kind="stable")], starts[nz], axis=0)
    return sums, counts.astype(np.float32)


def kmeans(x: np.ndarray, k: int, iters: int = 20, seed: int = 0, tol: float = 1e-6) -> np.ndarray:
    """Lloyd's k-means with a k-means++ start; deterministic for a given ``seed``. Returns (k, D) float32 centres.

    Empty clusters are re-seeded with the points farthest from their centres.
    """
    x = np.ascontiguousarray(x, np.float32)
    n = len(x)
    if n == 0:
        raise CdSfmError("no local descriptors to learn a codebook from")
    k = min(k, n)
    rng = np.random.default_rng(seed)
    # k-means++ (greedy-free variant), on at most 20k points to keep it O(k * 20k)
    pool = x if n <= 20000 else x[rng.choice(n, 20000, replace=False)]
    centers = np.empty((k, x.shape[1]), np.float32)
    centers[0] = pool[rng.integers(len(pool))]
    d2 = _sq_dists(pool, centers[:1])[:, 0]
    for i in range(1, k):
        total = d2.sum()
        j = rng.choice(len(pool), p=d2 / total) if total > 0 else rng.integers(len(pool))
        centers[i] = pool[j]
        d2 = np.minimum(d2, _sq_dists(pool, centers[i : i + 1])[:, 0])
    prev = np.inf
    for _ in range(iters):
        lab = assign(x, centers)
        sums, counts = cluster_sums(x, lab, k)
        empty = counts == 0
        new = sums / np.maximum(counts, 1)[:, None]
        dist = np.einsum("nd,nd->n", x - new[lab], x - new[lab])
        if empty.any():
            far = np.argsort(-dist)[: int(empty.sum())]
            new[empty] = x[far]
        inertia = float(dist.sum())
        centers = new.astype(np.float32)
        if prev - inertia <= tol * max(prev, 1e-12) and not empty.any():
            break
        prev = inertia
    return centers


# --------------------------------------------------------------------------------------------------------------------
# local aggregation


def prepare_local(desc: np.ndarray) -> np.ndarray:
    """Local descriptors (n, D) as float32 unit rows (ContextDesc's already are; SIFT's are not)."""
    return l2_normalize(np.asarray(desc, np.float32).reshape(len(desc), -1))


def aggregate_residuals(desc: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-centre sums of residuals (k, D) and counts (k,) of the hard assignment of ``desc`` to ``centers``."""
    k = len(centers)
    if len(desc) == 0:
        return np.zeros_like(centers), np.zeros(k, np.float32)
    lab = assign(desc, centers)
    sums, counts = cluster_sums(desc, lab, k)
    return sums - counts[:, None] * centers, counts


def vlad(desc: np.ndarray, centers: np.ndarray, power: float = 0.5) -> np.ndarray:
    """VLAD of one image: residual sums, signed power normalisation, intra-normalisation, L2 -> (k * D,)."""
    res, _ = aggregate_residuals(desc, centers)
    if power != 1.0:
        res = np.sign(res) * np.abs(res) ** power
    res = l2_normalize(res, axis=1)
    return l2_normalize(res.reshape(-1))


def asmk_vector(desc: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """ASMK-style per-centre aggregated residuals, each L2-normalised (empty centres zero) -> (k * D,).

    Compared with ``asmk_similarity``; the vector itself is not unit-norm (its squared norm counts the non-empty centres).
    """
    res, counts = aggregate_residuals(desc, centers)
    res = l2_normalize(res, axis=1) * (counts > 0)[:, None]
    return res.reshape(-1).astype(np.float32)


def asmk_similarity(q: np.ndarray, db: np.ndarray, num_clusters: int, alpha: float = 3.0,
                    threshold: float = 0.0, db_norm: np.ndarray | None = None) -> np.ndarray:
    """Selective match kernel between query vectors (b, k*D) and database vectors (n, k*D) -> (b, n).

    S = gamma(q) gamma(x) sum_c sigma(<q_c, x_c>), sigma(u) = sign(u)|u|^alpha for u > threshold else 0, gamma = one
    over the square root of the number of non-empty centres (so that an image's similarity to itself is 1). One (b, n)
    matmul per centre: memory O(b * n).
    """
    k = num_clusters
    qv = np.asarray(q, np.float32).reshape(len(q), k, -1)
    dv = np.asarray(db, np.float32).reshape(len(db), k, -1)
    q_norm = 1.0 / np.sqrt(np.maximum((np.abs(qv).sum(-1) > 0).sum(-1), 1))
    if db_norm is None:
        db_norm = 1.0 / np.sqrt(np.maximum((np.abs(dv).sum(-1) > 0).sum(-1), 1))
    s = np.zeros((len(q), len(db)), np.float32)
    for c in range(k):
        u = qv[:, c] @ dv[:, c].T
        u = np.where(u > threshold, np.abs(u) ** alpha, 0.0).astype(np.float32)
        s += u
    return s * q_norm[:, None] * db_norm[None]


# --------------------------------------------------------------------------------------------------------------------
# model file (codebook, PCA, options) next to global-feats.h5


def model_path(global_path: str | Path) -> Path:
    global_path = Path(global_path)
    return global_path.with_name(global_path.name + ".model.npz")


def _model_signature(conf: GlobalConf) -> dict:
    keep = ["method", "num_clusters", "sample_per_image", "max_samples", "kmeans_iters", "seed", "power", "pca_dim",
            "pca_whiten", "asmk_alpha", "asmk_threshold", "gem_p", "rmac_levels", "max_size", "regional_model"]
    d = asdict(conf)
    return {k: d[k] for k in keep}


def save_model(path: Path, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npz")
    os.close(fd)
    try:
        np.savez(tmp, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_model(global_path: str | Path) -> tuple[dict, dict[str, np.ndarray]] | None:
    """(meta, arrays) of the model file next to ``global_path``, or None when there is none."""
    path = model_path(global_path)
    if not path.exists():
        return None
    arrays = read_npz(path, "retrieval model file")
    if "__meta__" not in arrays:
        raise CdSfmError(f"{path}: not a retrieval model file (no metadata)")
    meta = json.loads(arrays.pop("__meta__").tobytes().decode())
    return meta, arrays


# --------------------------------------------------------------------------------------------------------------------
# reading local descriptors


def _feature_names(features_path: Path) -> list[str]:
    from .io import list_h5_names

    return list_h5_names(features_path)


def iter_local_descriptors(features_path: Path, names: Sequence[str], desc: str = "local descriptors"):
    """Yield (name, (n, D) float32 unit descriptors) for each name, from one open features file."""
    with h5py.File(features_path, "r", libver="latest") as f:
        for name in tqdm(names, desc=desc, unit="img", disable=len(names) < 50):
            if name not in f or "descriptors" not in f[name]:
                raise CdSfmError(f"{features_path}: no descriptors for image {name!r}")
            d = f[name]["descriptors"][()]  # stored (D, n)
            yield name, prepare_local(d.T)


def sample_descriptors(features_path: Path, names: Sequence[str], conf: GlobalConf) -> np.ndarray:
    """A seeded sample of the collection's local descriptors: up to ``sample_per_image`` from each of an evenly
    spread subset of images, ``max_samples`` in all."""
    rng = np.random.default_rng(conf.seed)
    n_img = max(1, min(len(names), int(np.ceil(conf.max_samples / max(conf.sample_per_image, 1)))))
    pick = np.unique(np.linspace(0, len(names) - 1, n_img).round().astype(np.int64)) if names else []
    chosen = [names[i] for i in pick]
    out = []
    for name, d in iter_local_descriptors(features_path, chosen, "codebook sample"):
        # per-image generator seeded by the name: the sample does not depend on the order images come in
        r = np.random.default_rng([conf.seed, zlib.crc32(name.encode())])
        if len(d) > conf.sample_per_image:
            d = d[np.sort(r.choice(len(d), conf.sample_per_image, replace=False))]
        out.append(d)
    x = np.concatenate(out) if out else np.zeros((0, 128), np.float32)
    if len(x) > conf.max_samples:
        x = x[np.sort(rng.choice(len(x), conf.max_samples, replace=False))]
    return x


def learn_local_model(features_path: Path, names: Sequence[str], conf: GlobalConf) -> dict[str, np.ndarray]:
    """Codebook (and PCA for VLAD with ``pca_dim``) learned from the collection."""
    sample = sample_descriptors(features_path, names, conf)
    logger.info("Learning a %d-word codebook from %d local descriptors", conf.num_clusters, len(sample))
    centers = kmeans(sample, conf.num_clusters, conf.kmeans_iters, conf.seed)
    arrays = {"centers": centers}
    if conf.method == "vlad" and conf.pca_dim:
        rng = np.random.default_rng(conf.seed + 1)
        subset = list(names)
        if len(subset) > conf.pca_max_images:
            subset = [subset[i] for i in np.sort(rng.choice(len(subset), conf.pca_max_images, replace=False))]
        vecs = np.stack([vlad(d, centers, conf.power) for _, d in
                         iter_local_descriptors(features_path, subset, "PCA sample")])
        arrays.update(learn_pca(vecs, conf.pca_dim, conf.pca_whiten))
    return arrays


def learn_pca(x: np.ndarray, dim: int, whiten: bool = True, eps: float = 1e-6) -> dict[str, np.ndarray]:
    """PCA of row vectors; at most min(dim, n - 1, D) components. Returns mean, components (d, D), scale (d,)."""
    x = np.asarray(x, np.float64)
    mean = x.mean(0)
    xc = x - mean
    # thin SVD of the (n, D) sample: O(n^2 D) for n < D, cheap for the few thousand images used
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    d = max(1, min(dim, len(x) - 1 if len(x) > 1 else 1, x.shape[1]))
    var = s[:d] ** 2 / max(len(x) - 1, 1)
    scale = 1.0 / np.sqrt(var + eps * max(var.max(initial=0), eps)) if whiten else np.ones(d)
    return {"pca_mean": mean.astype(np.float32), "pca_components": vt[:d].astype(np.float32),
            "pca_scale": scale.astype(np.float32)}


def apply_pca(v: np.ndarray, arrays: dict[str, np.ndarray]) -> np.ndarray:
    if "pca_components" not in arrays:
        return v
    y = (np.atleast_2d(v) - arrays["pca_mean"]) @ arrays["pca_components"].T * arrays["pca_scale"]
    y = l2_normalize(y)
    return y[0] if np.ndim(v) == 1 else y


def local_global_descriptor(desc: np.ndarray, arrays: dict[str, np.ndarray], conf: GlobalConf) -> np.ndarray:
    """Global descriptor of one image from its (n, D) local descriptors and the learned model."""
    d = prepare_local(desc)
    if conf.method == "vlad":
        return apply_pca(vlad(d, arrays["centers"], conf.power), arrays)
    if conf.method == "asmk":
        return asmk_vector(d, arrays["centers"])
    raise ValueError(conf.method)


# --------------------------------------------------------------------------------------------------------------------
# stage entry point


def _prepare_model(conf: GlobalConf, export_path: Path, overwrite: bool, learn: Callable[[], dict]) -> tuple[dict, bool]:
    """Load the stored model when it matches ``conf``; otherwise learn one. Returns (arrays, must_redo_all)."""
    sig = _model_signature(conf)
    stored = None if overwrite else load_model(export_path)
    if stored is not None and stored[0].get("signature") == sig:
        return stored[1], False
    if stored is not None:
        logger.info("%s: global descriptor options changed; recomputing every image", export_path)
    arrays = learn()
    save_model(model_path(export_path), {"signature": sig}, arrays)
    return arrays, True


def _drop_outputs(export_path: Path) -> None:
    export_path.unlink(missing_ok=True)
    parts = export_path.with_name(export_path.name + ".parts")
    if parts.exists():
        for p in parts.iterdir():
            p.unlink(missing_ok=True)
        parts.rmdir()


def main(conf: GlobalConf | dict | str | None, export_path: str | Path, features_path: str | Path | None = None,
         image_dir: str | Path | None = None, names: Sequence[str] | None = None, overwrite: bool = False,
         regional_fn: Callable[[str], np.ndarray] | None = None) -> Path:
    """Compute a global descriptor for every image into ``export_path`` (hloc ``global-feats.h5`` layout).

    ``names``: the images (default: all in ``features_path``, else all images under ``image_dir``). Local methods
    read ``features_path``; regional methods use ``global_descriptor`` entries stored in ``features_path`` when all
    images have one, otherwise run the regional network on the images in ``image_dir`` (``regional_fn(name) ->
    (h, w, C) map`` overrides the network, e.g. for tests). Resumable: images already in the file are skipped as long
    as the stored model (``<export_path>.model.npz``) matches the options and their features are the version the
    descriptor was made from (:func:`cd_sfm.io.feature_version`; an image re-extracted is described again).
    """
    conf = GlobalConf.from_any(conf)
    export_path = Path(export_path)
    features_path = Path(features_path) if features_path is not None else None
    if names is None:
        if features_path is not None and features_path.exists():
            names = _feature_names(features_path)
        elif image_dir is not None:
            from . import images as images_mod  # noqa: PLC0415 (images.py belongs to the extraction stage)

            names = images_mod.list_images(image_dir)
        else:
            raise CdSfmError("global descriptors need a features file or an image folder")
    names = list(names)
    if not names:
        raise CdSfmError(f"{features_path or image_dir}: no images to describe")

    if conf.method in LOCAL_METHODS:
        if features_path is None or not features_path.exists():
            raise CdSfmError(f"{features_path}: local features not found; extract features before retrieval")
        arrays, redo = _prepare_model(conf, export_path, overwrite,
                                      lambda: learn_local_model(features_path, names, conf))
        compute = None
    else:
        arrays, redo = _prepare_model(conf, export_path, overwrite, lambda: {})
        compute = _regional_source(conf, names, features_path, image_dir, regional_fn)

    if redo or overwrite:
        _drop_outputs(export_path)
    done = completed_names(export_path)
    # each image's feature version: an image extracted again since (replaced, or its mask changed) is described again
    versions = ({n: feature_version(a) for n, a in entry_attrs(features_path, names).items()}
                if features_path is not None and features_path.exists() else {})
    if done and versions:
        stale = {n for n, a in entry_attrs(export_path, sorted(done & set(names))).items()
                 if "features" in a and str(a["features"]) != versions.get(n, "")}
        if stale:
            logger.info("%d image(s) extracted again since their global descriptors were made: describing them again",
                        len(stale))
        done -= stale
    todo = [n for n in names if n not in done]
    logger.info("Global descriptors (%s): %d images to do, %d already done", conf.method, len(todo), len(done))
    if not todo:
        return export_path
    with H5Appender(export_path, flush_every=256) as out:
        if conf.method in LOCAL_METHODS:
            for name, d in iter_local_descriptors(features_path, todo, f"global ({conf.method})"):
                v = local_global_descriptor(d, arrays, conf)
                out.add(name, {GLOBAL_KEY: v.astype(conf.dtype), ATTRS_KEY: {"features": versions.get(name, "")}})
        else:
            for name in tqdm(todo, desc=f"global ({conf.method})", unit="img", disable=len(todo) < 10):
                out.add(name, {GLOBAL_KEY: compute(name).astype(conf.dtype),
                               ATTRS_KEY: {"features": versions.get(name, "")}})
    return export_path


def _regional_source(conf: GlobalConf, names: Sequence[str], features_path: Path | None, image_dir,
                     regional_fn: Callable[[str], np.ndarray] | None) -> Callable[[str], np.ndarray]:
    """A function name -> global vector for the regional methods."""
    if regional_fn is not None:
        return lambda name: pool_regional(regional_fn(name), conf)
    if conf.method == "gem" and features_path is not None and features_path.exists():
        with h5py.File(features_path, "r", libver="latest") as f:
            stored = all(n in f and GLOBAL_KEY in f[n] for n in names)
        if stored:
            logger.info("Using the GeM descriptors stored during feature extraction in %s", features_path)

            def from_features(name: str) -> np.ndarray:
                with h5py.File(features_path, "r", libver="latest") as f:
                    return l2_normalize(f[name][GLOBAL_KEY][()])

            return from_features
    if image_dir is None:
        raise CdSfmError("regional global descriptors need the image folder (or use --retrieval local)")
    return lambda name: pool_regional(_regional_map(conf, Path(image_dir), name), conf)


_REGIONAL_MODEL = None


def load_regional_model(model: str | None = None):
    """The regional ResNet50 with its weights, loaded once per process (TensorFlow is imported only here).

    Looks in the model registry (``cd_sfm.models.registry``) for regional weights: the named ``model``, else the
    default ContextDesc model, else the official ``retrieval`` model (``cd-sfm models download retrieval``). A
    ``cd_sfm.models.regional.load_regional_model()``, when the models package offers one, takes precedence. Without
    weights: ``CdSfmError`` pointing to the local fallback (``--retrieval local``)."""
    global _REGIONAL_MODEL
    if _REGIONAL_MODEL is not None:
        return _REGIONAL_MODEL
    from .models import regional

    loader = getattr(regional, "load_regional_model", None)
    if loader is not None:
        try:
            _REGIONAL_MODEL = loader()
            return _REGIONAL_MODEL
        except (FileNotFoundError, KeyError, OSError, CdSfmError) as e:
            raise CdSfmError(f"regional ResNet50 weights unavailable ({e}); use --retrieval local") from e
    from .models import registry

    entry, tried = registry.find_component("regional", [model, registry.DEFAULT_MODEL, "retrieval"])
    if entry is not None:
        _REGIONAL_MODEL = registry.load_keras_models(entry, ("regional",))["regional"]
        logger.info("Regional ResNet50 for retrieval: weights of model %r", entry.name)
        return _REGIONAL_MODEL
    raise CdSfmError(f"no regional ResNet50 weights (looked in models {', '.join(tried)}; get them with "
                     "`cd-sfm models download retrieval`); use --retrieval local")


def retrieval_preset(kind: str = "auto") -> str:
    """The preset behind ``--retrieval``: ``regional`` -> "gem", ``local`` -> "vlad", ``auto`` -> "gem" when the
    regional weights can be loaded, else "vlad" (logged)."""
    if kind in RETRIEVAL_PRESETS:
        return RETRIEVAL_PRESETS[kind]
    if kind != "auto":
        raise CdSfmError(f"--retrieval must be regional, local or auto, not {kind!r}")
    try:
        load_regional_model()
        return RETRIEVAL_PRESETS["regional"]
    except (CdSfmError, ImportError) as e:
        logger.info("Retrieval from the images' own local descriptors (VLAD): %s", e)
        return RETRIEVAL_PRESETS["local"]


def _regional_map(conf: GlobalConf, image_dir: Path, name: str) -> np.ndarray:
    """res5c map (h, w, 2048) of one image (RGB, longest side <= ``max_size``) from the regional ResNet50."""
    from . import images as images_mod
    from .models import regional

    model = load_regional_model(conf.regional_model)
    image, _ = images_mod.read_image(image_dir / name)
    out = model(regional.prepare_image(image, conf.max_size), training=False)
    fmap = out["res5c"] if isinstance(out, dict) else out
    return np.asarray(fmap)[0]


def read_global(global_path: str | Path, names: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
    """(names, (N, D) float32 matrix) of the global descriptors in ``global_path`` (all of them when names is None)."""
    global_path = Path(global_path)
    if not global_path.exists():
        raise CdSfmError(f"{global_path}: global descriptors not found")
    if names is None:
        names = _feature_names(global_path)
    names = list(names)
    with h5py.File(global_path, "r", libver="latest") as f:
        missing = [n for n in names if n not in f or GLOBAL_KEY not in f[n]]
        if missing:
            raise CdSfmError(f"{global_path}: no global descriptor for {len(missing)} image(s), e.g. {missing[0]!r}")
        if not names:
            return names, np.zeros((0, 0), np.float32)
        dim = f[names[0]][GLOBAL_KEY].shape[0]
        out = np.empty((len(names), dim), np.float32)
        for i, n in enumerate(names):
            out[i] = f[n][GLOBAL_KEY][()]
    return names, out


__all__: Iterable[str] = ["GlobalConf", "confs", "main", "read_global", "gem", "rmac", "vlad", "asmk_vector",
                          "asmk_similarity", "kmeans", "load_model", "RETRIEVAL_PRESETS", "retrieval_preset"]
