"""Train the ContextDesc local model (descriptor + matchability head) on mined patch pairs.

Data: an h5 file from :mod:`cd_sfm.train.homography` (pairs of held-out images, ``is_val``, are the validation set;
evaluation scenes are never in it). The whole training part is held in memory as uint8, so a step never waits on I/O.

A run lives in a directory: ``ckpt/`` (tf.train.CheckpointManager: model, optimiser, loss scale, step), ``log.csv``
(training loss/accuracy averaged over ``log_every`` steps, and validation rows), ``curves.png``, ``best.npz`` (weights of
the best validation top-1 accuracy so far), ``conf.json``. Running the same command again resumes from the last
checkpoint; batches are drawn from a generator seeded by (seed, step), so a resumed run sees the same batches.

Losses: ``triplet`` (HardNet, the default: it won the validation comparison) or ``npair`` (scale-aware N-pair), plus the matchability BCE that only
trains the ``kpt_m*`` head (the descriptor trunk gets the descriptor loss only).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from ..geometry import l2_normalize
from ..io import CdSfmError, atomic_write_text, open_h5
from .runlog import append_log, read_log, warmup_cosine, write_log

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
LOG_FIELDS = ["step", "time_s", "kind", "loss", "acc", "mb_loss", "mb_acc", "scale", "lr", "val_fpr95", "val_acc",
              "val_mb_auc"]


@dataclass
class TrainConf:
    data: str = ""
    run_dir: str = ""
    # more mined files (e.g. SfM tracks from `cd-sfm train mine`, warps of single photos): their training pairs are
    # mixed in; one path or a list. Their validation pairs are validated too (logged as val_acc_x1, ...); the
    # main file's validation selects the best step.
    data_extra: str | list = ""
    extra_ratio: float | list = 0.0  # share of each batch from each extra file; 0 = the natural share of all pairs
    # defaults = the default recipe: <= 60 min on the 2-core CPU (the time budget stops, checkpoints and exports)
    steps: int = 1800
    batch: int = 256  # matching pairs per step (2 * batch patches)
    loss: str = "triplet"  # triplet | npair (triplet won the validation comparison, docs/training.md)
    lr: float = 1e-3
    lr_min: float = 1e-5
    warmup: int = 100
    weight_decay: float = 1e-4
    scale_aware: bool = True
    max_ratio: float = 4.0
    init_log_scale: float = 2.3  # exp(2.3) ~ 10
    mb_weight: float = 1.0
    seed: int = 0
    time_budget_min: float = 50.0  # stop (checkpoint, export) after this many minutes of this process; 0 = none
    val_every: int = 250
    val_pairs: int = 2048
    val_block: int = 1024  # in-batch top-1 accuracy among blocks of this many pairs
    ckpt_every: int = 100
    log_every: int = 25
    keep_ckpts: int = 3
    threads: int = 0
    jit: bool = False
    max_train_pairs: int = 0  # 0 = all
    upright: bool = False
    arch: str = "official"  # local layout (models.local.ARCHS): official (the authors', imported weights), compact, mini
    teacher: str = ""  # local weights (.npz, model name or folder) to distil from: its descriptors and matchability
    distill_weight: float = 1.0  # weight of the distillation terms next to the descriptor / matchability losses
    init: str = ""  # start from these local weights (.npz, model name or folder; same arch) instead of random ones
    # draw each file's share of a batch from this many scenes (image folders) instead of from all pairs: the in-batch
    # negatives then come from the same scenes, the confusers a matcher meets (repeated structure); 0 = off
    batch_groups: int = 0
    export: str = ""  # model name: export to cd_sfm/weights/<name>/ at the end
    export_dir: str = ""  # default: cd_sfm/weights


def split_indices(is_val: np.ndarray, max_train_pairs: int = 0, val_pairs: int = 4096,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The training and validation pairs a run uses of a mined file (``is_val`` marks the held-out ones): all
    training pairs (or ``max_train_pairs`` of them) and ``val_pairs`` of the held-out ones, drawn with ``seed``."""
    tr = np.flatnonzero(~is_val)
    va = np.flatnonzero(is_val)
    rng = np.random.default_rng(seed + 12345)
    if max_train_pairs and len(tr) > max_train_pairs:
        tr = np.sort(rng.choice(tr, max_train_pairs, replace=False))
    if len(va) > val_pairs:
        va = np.sort(rng.choice(va, val_pairs, replace=False))
    return tr, va


def _load_data(path: str, max_train_pairs: int = 0, val_pairs: int = 4096, seed: int = 0):
    path = Path(path)
    with open_h5(path, ("patches", "scales", "kpt_ids", "is_val"), "mined patch-pair file",
                 "training data not found (mine it with 'cd-sfm train mine-homography')") as f:
        is_val = f["is_val"][()]
        n = len(is_val)
        patches = np.empty((n, 2, 32, 32), np.uint8)
        if n:
            f["patches"].read_direct(patches)
        scales = f["scales"][()]
        ids = f["kpt_ids"][()]
        image_ids = f["image_ids"][()] if "image_ids" in f else np.zeros(n, np.int32)
        attrs = {k: f.attrs[k] for k in f.attrs}
    groups = scene_groups(image_ids, json.loads(attrs.get("image_names", "[]")))
    tr, va = split_indices(is_val, max_train_pairs, val_pairs, seed)
    if len(tr) == 0:
        raise CdSfmError(f"{path}: no training pairs")
    train = {"patches": patches[tr], "scales": scales[tr], "ids": ids[tr], "groups": groups[tr]}
    val = {"patches": patches[va], "scales": scales[va], "ids": ids[va]}
    del patches
    return train, val, attrs


def scene_groups(image_ids: np.ndarray, image_names: list[str]) -> np.ndarray:
    """Scene index of each pair: the folder of its image (``<scene>/images``); 0 for all without image names."""
    if not image_names:
        return np.zeros(len(image_ids), np.int32)
    folders = [str(Path(name).parent) for name in image_names]
    _, index = np.unique(folders, return_inverse=True)
    return index.astype(np.int32)[image_ids]


def extra_files(conf: TrainConf) -> list[str]:
    e = conf.data_extra
    return [x for x in ([e] if isinstance(e, str) else list(e or [])) if x]


def extra_ratios(conf: TrainConf) -> list[float]:
    r = conf.extra_ratio
    r = [float(r)] if isinstance(r, (int, float)) else [float(x) for x in (r or [])]
    n = len(extra_files(conf)) or 1
    if len(r) == 1 and n > 1:
        r = r * n
    return (r + [0.0] * n)[:n]


def lr_at(step, conf: TrainConf) -> float:
    return warmup_cosine(step, conf.lr, conf.lr_min, conf.warmup, conf.steps)


def _draw(train: dict, rng, lo: int, hi: int, k: int, n_groups: int) -> np.ndarray:
    """``k`` pair indices in [lo, hi): uniformly, or (``n_groups`` > 0) from the scenes of ``n_groups`` pairs drawn
    uniformly, so that a scene is chosen as often as its pairs would be."""
    if n_groups > 0 and "groups" in train:
        g = train["groups"][lo:hi]
        pool = np.flatnonzero(np.isin(g, g[rng.integers(0, hi - lo, n_groups)]))
        return lo + pool[rng.choice(len(pool), k, replace=len(pool) < k)]
    return lo + rng.choice(hi - lo, k, replace=hi - lo < k)


def sample_batch(train: dict, step: int, conf: TrainConf):
    """Batch of ``conf.batch`` pairs, seeded by (seed, step); anchors and positives randomly swapped per pair."""
    rng = np.random.default_rng([conf.seed, step])
    n = len(train["ids"])
    bounds = list(train.get("bounds") or ([train["n_main"], n] if train.get("n_main", n) < n else [n]))
    ratios = extra_ratios(conf)[: len(bounds) - 1]
    if len(bounds) > 1 and any(r > 0 for r in ratios):  # mixed data: a fixed share of every batch from each file
        ks = [int(round(r * conf.batch)) for r in ratios]
        counts = [conf.batch - sum(ks)] + ks
        starts = [0] + bounds[:-1]
        idx = np.concatenate([_draw(train, rng, lo, hi, k, conf.batch_groups)
                              for lo, hi, k in zip(starts, bounds, counts) if k > 0])
    else:
        idx = _draw(train, rng, 0, n, conf.batch, conf.batch_groups)
    p = train["patches"][idx]
    s = train["scales"][idx]
    swap = rng.random(conf.batch) < 0.5
    p[swap] = p[swap][:, ::-1]
    s[swap] = s[swap][:, ::-1]
    return p, s, train["ids"][idx]


class LocalTrainer:
    def __init__(self, conf: TrainConf):
        import keras
        import tensorflow as tf

        from ..models.local import build_local_model

        self.tf = tf
        self.conf = conf
        if conf.threads:
            tf.config.threading.set_intra_op_parallelism_threads(conf.threads)
            tf.config.threading.set_inter_op_parallelism_threads(min(2, conf.threads))
        keras.utils.set_random_seed(conf.seed)
        self.model = build_local_model(arch=conf.arch)
        self.teacher = _load_teacher(conf.teacher) if conf.teacher else None
        self.head_vars = [v for l in self.model.layers if l.name.startswith("kpt_m") for v in l.trainable_weights]
        head_ids = {id(v) for v in self.head_vars}
        self.trunk_vars = [v for v in self.model.trainable_weights if id(v) not in head_ids]
        self.log_scale = tf.Variable(conf.init_log_scale, dtype=tf.float32, name="log_scale")
        self.opt = keras.optimizers.AdamW(learning_rate=conf.lr, weight_decay=conf.weight_decay)
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.ckpt = tf.train.Checkpoint(model=self.model, optimizer=self.opt, log_scale=self.log_scale, step=self.step)
        self.manager = None
        self._train_step = tf.function(self._step_impl, jit_compile=conf.jit, reduce_retracing=True)
        self._embed = tf.function(lambda x: self.model(x, training=False), jit_compile=conf.jit, reduce_retracing=True)

    # --- one optimisation step -------------------------------------------------------------------
    def _step_impl(self, patches, scales, ids):
        from . import losses

        tf = self.tf
        b = tf.shape(patches)[0]
        x = tf.cast(tf.reshape(tf.concat([patches[:, 0], patches[:, 1]], 0), (-1, 32, 32, 1)), tf.float32)
        train_vars = self.trunk_vars + ([self.log_scale] if self.conf.loss == "npair" else [])
        with tf.GradientTape(persistent=True) as tape:
            out = self.model(x, training=True)
            feat, mb = out["conv6_feat"], out["kpt_mb"]
            anc, pos = feat[:b], feat[b:]
            if self.conf.loss == "npair":
                loss, acc = losses.scale_aware_npair_loss(
                    anc, pos, self.log_scale, scales if self.conf.scale_aware else None, ids, self.conf.max_ratio
                )
            else:
                loss, acc = losses.hardest_triplet_loss(anc, pos, ids)
            mb_a = losses.matchability_loss(mb[:b], anc, pos, ids)
            mb_p = losses.matchability_loss(mb[b:], pos, anc, ids)
            mb_loss = 0.5 * (mb_a + mb_p)
            if self.teacher is not None:  # distillation: the teacher's descriptors and matchability, inference mode
                t_out = self.teacher(x, training=False)
                w = self.conf.distill_weight
                loss = loss + w * losses.distillation_loss(feat, tf.stop_gradient(t_out["conv6_feat"]), b)
                mb_loss = mb_loss + w * tf.reduce_mean(tf.square(mb - tf.stop_gradient(t_out["kpt_mb"])))
        g_trunk = tape.gradient(loss, train_vars)
        g_head = tape.gradient(mb_loss, self.head_vars)
        del tape
        self.opt.apply_gradients(zip(g_trunk + g_head, train_vars + self.head_vars))
        target = tf.cast(losses.nn_is_positive(anc, pos, ids), tf.float32)
        mb_acc = tf.reduce_mean(tf.cast(tf.equal(tf.cast(mb[:b] > 0, tf.float32), target), tf.float32))
        return loss, acc, mb_loss, mb_acc

    def train_step(self, patches, scales, ids):
        tf = self.tf
        return [float(v) for v in self._train_step(tf.constant(patches), tf.constant(scales), tf.constant(ids))]

    # --- inference / validation ------------------------------------------------------------------
    def describe(self, patches: np.ndarray, batch: int = 1024):
        """Raw conv6 descriptors and matchability of (N, 32, 32) patches (any scale; eval-mode BN)."""
        tf = self.tf
        feats, mbs = [], []
        for i in range(0, len(patches), batch):
            x = np.asarray(patches[i : i + batch], np.float32)
            m = len(x)
            if m < batch:  # fixed shapes: pad the last chunk, no retracing
                x = np.concatenate([x, np.zeros((batch - m,) + x.shape[1:], np.float32)])
            out = self._embed(tf.constant(x[..., None]))
            feats.append(out["conv6_feat"].numpy()[:m])
            mbs.append(out["kpt_mb"].numpy()[:m])
        if not feats:
            return np.zeros((0, 128), np.float32), np.zeros((0,), np.float32)
        return np.concatenate(feats), np.concatenate(mbs)

    def validate(self, val: dict) -> dict:
        return validation_metrics(self.describe, val, self.conf.val_block, self.conf.seed)

    # --- checkpoints -----------------------------------------------------------------------------
    def open_run(self, run_dir: Path) -> int:
        tf = self.tf
        self.manager = tf.train.CheckpointManager(self.ckpt, str(run_dir / "ckpt"), max_to_keep=self.conf.keep_ckpts)
        if self.manager.latest_checkpoint:
            # build optimiser slots before restoring so they are restored too
            self.opt.build(self.trunk_vars + [self.log_scale] + self.head_vars
                           if self.conf.loss == "npair" else self.trunk_vars + self.head_vars)
            self.ckpt.restore(self.manager.latest_checkpoint).expect_partial()
            logger.info("resumed %s at step %d", self.manager.latest_checkpoint, int(self.step.numpy()))
        elif self.conf.init:  # a new run fine-tuned from given weights
            from ..models.weights import load_weights_npz

            path = _local_npz(self.conf.init, "initial")
            load_weights_npz(self.model, path)
            logger.info("initial weights: %s", path)
        return int(self.step.numpy())

    def save(self):
        self.manager.save(checkpoint_number=int(self.step.numpy()))


def validation_metrics(describe, val: dict, block: int = 1024, seed: int = 0) -> dict:
    """FPR95 (negatives: each anchor against a shuffled positive), in-batch top-1 accuracy in blocks of ``block``
    pairs, and the AUC of matchability as a predictor of 'nearest neighbour is correct'."""
    n = len(val["ids"])
    if n == 0:
        return {"val_fpr95": float("nan"), "val_acc": float("nan"), "val_mb_auc": float("nan")}
    feats, mbs = describe(val["patches"].reshape(-1, 32, 32))
    feats = l2_normalize(feats, axis=1)
    a, p = feats[0::2], feats[1::2]
    mb = mbs[0::2]
    d_pos = np.linalg.norm(a - p, axis=1)
    rng = np.random.default_rng(seed + 777)
    perm = rng.permutation(n)
    keep = val["ids"][perm] != val["ids"]
    d_neg = np.linalg.norm(a - p[perm], axis=1)[keep]
    thr = np.percentile(d_pos, 95)
    fpr95 = float(np.mean(d_neg <= thr)) if len(d_neg) else float("nan")
    correct = np.zeros(n, bool)
    for i in range(0, n, block):
        sa, sp, ids = a[i : i + block], p[i : i + block], val["ids"][i : i + block]
        sim = sa @ sp.T
        sim[(ids[:, None] == ids[None, :]) & ~np.eye(len(ids), dtype=bool)] = -10
        correct[i : i + block] = np.argmax(sim, 1) == np.arange(len(ids))
    return {"val_fpr95": fpr95, "val_acc": float(correct.mean()), "val_mb_auc": _auc(mb, correct)}


def _auc(score, label) -> float:
    label = np.asarray(label, bool)
    npos, nneg = label.sum(), (~label).sum()
    if npos == 0 or nneg == 0:
        return float("nan")
    from scipy.stats import rankdata

    r = rankdata(score)
    return float((r[label].sum() - npos * (npos + 1) / 2) / (npos * nneg))


# --- log / curves ----------------------------------------------------------------------------------
def plot_curves(log_path: Path, out_png: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log_path)
    tr = [r for r in rows if r["kind"] == "train"]
    va = [r for r in rows if r["kind"] == "val"]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    if tr:
        s = [int(r["step"]) for r in tr]
        ax[0].plot(s, [float(r["loss"]) for r in tr], label="descriptor loss")
        ax[0].plot(s, [float(r["mb_loss"]) for r in tr], label="matchability BCE")
        ax[1].plot(s, [float(r["acc"]) for r in tr], label="train in-batch top-1")
    if va:
        s = [int(r["step"]) for r in va]
        ax[1].plot(s, [float(r["val_acc"]) for r in va], "o-", label="val top-1 (blocks of 1024)")
        ax[2].plot(s, [float(r["val_fpr95"]) for r in va], "o-", label="val FPR95")
        ax[2].plot(s, [float(r["val_mb_auc"]) for r in va], "s-", label="val matchability AUC")
    titles = ["loss", "accuracy", "validation"]
    for a, t in zip(ax, titles):
        a.set_title(t)
        a.set_xlabel("step")
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    plt.close(fig)


# --- export ----------------------------------------------------------------------------------------
def export_weights(model, name: str, meta: dict, export_dir: str | Path | None = None, extra_files=()) -> Path:
    """Write ``<export_dir>/<name>/local.npz`` (float16) and ``info.json``; copy small ``extra_files`` beside them."""
    import shutil

    from ..models.weights import save_weights_npz

    out = Path(export_dir or WEIGHTS_DIR) / name
    out.mkdir(parents=True, exist_ok=True)
    save_weights_npz(model, out / "local.npz", meta=meta)
    os.chmod(out / "local.npz", 0o644)  # mkstemp makes 0600; shipped files must be world-readable
    atomic_write_text(out / "info.json", json.dumps(meta, indent=2) + "\n")
    for f in extra_files:
        f = Path(f)
        if f.exists():
            shutil.copy2(f, out / f.name)
    logger.info("exported %s", out / "local.npz")
    return out / "local.npz"


def _data_attrs(conf: TrainConf) -> list[tuple[str, dict]]:
    """(path, attributes) of the main and the extra mined files (attributes are small: names, conf)."""
    out = []
    for path in [conf.data] + extra_files(conf):
        with h5py.File(path, "r") as f:
            out.append((path, {k: f.attrs[k] for k in f.attrs}))
    return out


def _describe_data(path: str, attrs: dict, share) -> str:
    kind = "SfM-track patch pairs" if attrs.get("source") == "sfm_tracks" else "random homographic warps"
    return f"{kind} ({Path(path).name}" + (f", batch share {share:g})" if share is not None else ")")


def _meta(conf: TrainConf, step: int, val_metrics: dict | None, source: str) -> dict:
    from ..models.local import arch_name, arch_widths, multiply_adds
    from ..split import SPLIT_FILE, load_split

    split = load_split(SPLIT_FILE) if SPLIT_FILE.exists() else None
    files = _data_attrs(conf)
    names = {n for _, a in files for n in json.loads(a.get("image_names", "[]"))}
    scenes = sorted({_scene_of(n) for n in names})
    # one name per image (mined files name the same image relative or absolute)
    num_images = len({_rel_data(n) for n in names})
    val_images = sorted({_rel_data(n) for _, a in files for n in json.loads(a.get("val_images", "[]"))})
    ratios = extra_ratios(conf)
    shares = [None if not any(ratios) else 1 - sum(ratios)] + [r if any(ratios) else None for r in ratios]
    return {
        "model": "contextdesc_local",
        "name": conf.export or Path(conf.run_dir).name,
        "source": "shipped",
        "description": "our own ContextDesc local model (descriptor + matchability), trained on CPU "
                       + (f"(fine-tuned from {conf.init})" if conf.init else "from scratch")
                       + "; no augmentation/regional weights",
        "upright": conf.upright,
        "local_arch": arch_name(arch_widths(conf.arch)),
        "multiply_adds_per_patch": multiply_adds(conf.arch),
        **({"teacher": conf.teacher, "distill_weight": conf.distill_weight} if conf.teacher else {}),
        **({"initial_weights": conf.init} if conf.init else {}),
        "trained_on": " + ".join(_describe_data(p, a, sh) for (p, a), sh in zip(files, shares))
                      + " of the TRAIN scenes of cd_sfm/split.yaml",
        "train_scenes": scenes,
        "train_images": num_images,
        "val_images": val_images,
        "split": split,
        "loss": conf.loss + (" (scale-aware)" if conf.loss == "npair" and conf.scale_aware else ""),
        "steps": step,
        "batch_pairs": conf.batch,
        "weights_from": source,
        "validation": val_metrics or {},
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "recipe": f"cd-sfm train local {conf.data} {conf.run_dir} --steps {conf.steps} --batch {conf.batch} "
                  f"--loss {conf.loss} --seed {conf.seed} --time-budget {conf.time_budget_min:g}"
                  + "".join(f" --data-extra {x}" for x in extra_files(conf))
                  + "".join(f" --extra-ratio {r:g}" for r in extra_ratios(conf) if any(extra_ratios(conf)))
                  + (f" --arch {conf.arch}" if conf.arch != "official" else "")
                  + (f" --teacher {conf.teacher} --distill-weight {conf.distill_weight:g}" if conf.teacher else "")
                  + (f" --init {conf.init} --lr {conf.lr:g} --warmup {conf.warmup}" if conf.init else "")
                  + (f" --export {conf.export}" if conf.export else ""),
        "train_conf": asdict(conf),
    }


def _local_npz(spec: str, what: str) -> Path:
    """The ``local.npz`` of a ``.npz`` path, a model name or a folder of the registry."""
    p = Path(spec)
    if p.suffix != ".npz":
        from ..models import registry

        p = registry.resolve(spec).path("local")
    if p is None or not Path(p).is_file():
        raise CdSfmError(f"{spec}: {what} weights not found")
    return Path(p)


def _load_teacher(spec: str):
    """The teacher's fp32 local model: a ``.npz``, or a model name / folder of the registry."""
    from ..models.local import load_local_model

    model = load_local_model(_local_npz(spec, "teacher"))
    model.trainable = False
    return model


def _rel_data(name: str) -> str:
    """Image path relative to the shared data root (``.../data/<scene>/...`` -> ``<scene>/...``)."""
    parts = Path(name).parts
    return str(Path(*parts[parts.index("data") + 1 :])) if "data" in parts[:-1] else name


def _scene_of(name: str) -> str:
    parts = Path(name).parts
    if "data" in parts:
        i = parts.index("data")
        if i + 1 < len(parts):
            return parts[i + 1]
    return Path(name).parent.name


# --- main loop -------------------------------------------------------------------------------------
def train_local(conf: TrainConf) -> dict:
    """Train (or resume) a run; returns the final validation metrics and paths."""
    if conf.loss not in ("npair", "triplet"):
        raise CdSfmError(f"--loss {conf.loss}: expected npair or triplet")
    if not conf.run_dir:
        raise CdSfmError("train local: a run directory is required")
    run_dir = Path(conf.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "conf.json").write_text(json.dumps(asdict(conf), indent=2) + "\n")
    t_start = time.time()
    train, val, _ = _load_data(conf.data, conf.max_train_pairs, conf.val_pairs, conf.seed)
    extra_vals = []
    if extra_files(conf):  # the best step is chosen on the main file's validation; ids shifted never to collide
        parts, bounds = [train], [len(train["ids"])]
        shift = int(train["ids"].max()) + 1 if len(train["ids"]) else 0
        group_shift = int(train["groups"].max()) + 1
        for path, ratio in zip(extra_files(conf), extra_ratios(conf)):
            extra, xval, _ = _load_data(path, 0, conf.val_pairs, conf.seed)
            extra["ids"] = extra["ids"] + shift
            xval["ids"] = xval["ids"] + shift
            extra["groups"] = extra["groups"] + group_shift
            group_shift = int(extra["groups"].max()) + 1
            shift = int(extra["ids"].max()) + 1 if len(extra["ids"]) else shift
            parts.append(extra)
            extra_vals.append(xval)
            bounds.append(bounds[-1] + len(extra["ids"]))
            logger.info("extra data %s: %d training pairs, %d validation pairs (batch share %s)", path,
                        len(extra["ids"]), len(xval["ids"]), f"{ratio:g}" if ratio > 0 else "natural")
        train = {k: np.concatenate([p[k] for p in parts]) for k in ("patches", "scales", "ids", "groups")}
        train["bounds"], train["n_main"] = bounds, bounds[0]
        del parts
    fields = LOG_FIELDS + [f"val_acc_x{i + 1}" for i in range(len(extra_vals))]
    logger.info("data: %d training pairs, %d validation pairs", len(train["ids"]), len(val["ids"]))
    trainer = LocalTrainer(conf)
    step0 = trainer.open_run(run_dir)
    log_path = run_dir / "log.csv"
    write_log(log_path, read_log(log_path, upto=step0), fields)  # drop rows written after the last checkpoint
    best_path = run_dir / "best.json"
    best = json.loads(best_path.read_text()) if best_path.exists() else {"val_acc": -1.0, "step": -1}
    acc_buf: list[list[float]] = []
    last_val = None
    step = step0
    stopped_by_budget = False
    pbar = tqdm(total=conf.steps, initial=step0, desc=f"train local ({conf.loss})", unit="step", dynamic_ncols=True)
    t_run = time.time()
    try:
        while step < conf.steps:
            if conf.time_budget_min and (time.time() - t_start) > 60 * conf.time_budget_min:
                stopped_by_budget = True
                logger.info("time budget of %.1f min reached at step %d", conf.time_budget_min, step)
                break
            lr = lr_at(step, conf)
            trainer.opt.learning_rate = lr
            p, s, ids = sample_batch(train, step, conf)
            loss, acc, mb_loss, mb_acc = trainer.train_step(p, s, ids)
            if not np.isfinite(loss):
                raise RuntimeError(f"non-finite loss at step {step}")
            step += 1
            trainer.step.assign(step)
            acc_buf.append([loss, acc, mb_loss, mb_acc])
            pbar.update(1)
            if step % conf.log_every == 0 or step == conf.steps:
                m = np.mean(acc_buf, 0)
                acc_buf = []
                pbar.set_postfix(loss=f"{m[0]:.3f}", acc=f"{m[1]:.3f}", scale=f"{math.exp(float(trainer.log_scale.numpy())):.1f}")
                append_log(log_path, {"step": step, "time_s": f"{time.time() - t_run:.1f}", "kind": "train",
                                       "loss": f"{m[0]:.5f}", "acc": f"{m[1]:.4f}", "mb_loss": f"{m[2]:.5f}",
                                       "mb_acc": f"{m[3]:.4f}", "scale": f"{math.exp(float(trainer.log_scale.numpy())):.3f}",
                                       "lr": f"{lr:.2e}"}, fields)
            if step % conf.val_every == 0 or step == conf.steps:
                last_val = trainer.validate(val)
                for i, xval in enumerate(extra_vals):
                    if len(xval["ids"]):
                        last_val[f"val_acc_x{i + 1}"] = trainer.validate(xval)["val_acc"]
                append_log(log_path, {"step": step, "time_s": f"{time.time() - t_run:.1f}", "kind": "val",
                                       **{k: f"{v:.4f}" for k, v in last_val.items()}}, fields)
                logger.info("step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in last_val.items()))
                if last_val["val_acc"] > best["val_acc"]:
                    from ..models.weights import save_weights_npz

                    best = {"val_acc": last_val["val_acc"], "step": step, **last_val}
                    save_weights_npz(trainer.model, run_dir / "best.npz", meta={"step": step, **last_val})
                    best_path.write_text(json.dumps(best, indent=2) + "\n")
                plot_curves(log_path, run_dir / "curves.png")
            if step % conf.ckpt_every == 0:
                trainer.save()
    finally:
        pbar.close()
        if step > step0:
            trainer.save()
    elapsed = time.time() - t_run
    rate = (step - step0) / elapsed if elapsed > 0 else float("nan")
    logger.info("trained steps %d..%d in %.0f s (%.3f steps/s)", step0, step, elapsed, rate)
    if last_val is None and len(val["ids"]):
        last_val = trainer.validate(val)
    if log_path.exists():
        plot_curves(log_path, run_dir / "curves.png")
    from ..models.weights import save_weights_npz

    meta = _meta(conf, step, last_val, "final")
    save_weights_npz(trainer.model, run_dir / "final.npz", meta=meta)
    result = {"step": step, "steps_per_s": rate, "val": last_val, "best": best, "run_dir": str(run_dir),
              "stopped_by_budget": stopped_by_budget}
    if conf.export and (step >= conf.steps or stopped_by_budget):
        if stopped_by_budget:
            meta["stopped_by_time_budget"] = f"step {step} of {conf.steps}"
        out = export_weights(trainer.model, conf.export, meta, conf.export_dir or None,
                             extra_files=[log_path, run_dir / "curves.png"])
        result["exported"] = str(out)
    elif conf.export:
        logger.info("not exported: run stopped at step %d of %d (run again to resume)", step, conf.steps)
    return result


def export_run(run_dir: str | Path, name: str, which: str = "final", export_dir=None) -> Path:
    """Export a run's ``final``/``best`` npz or the ``latest`` checkpoint as shipped weights ``<name>``."""
    from ..models.local import build_local_model
    from ..models.weights import load_weights_npz

    run_dir = Path(run_dir)
    conf_d = json.loads((run_dir / "conf.json").read_text())
    conf = TrainConf(**{f.name: conf_d[f.name] for f in fields(TrainConf) if f.name in conf_d})
    conf.export = name
    model = build_local_model(arch=conf.arch)
    if which == "latest":
        import tensorflow as tf

        mgr = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), str(run_dir / "ckpt"), max_to_keep=None)
        if not mgr.latest_checkpoint:
            raise CdSfmError(f"{run_dir}: no checkpoint")
        tf.train.Checkpoint(model=model).restore(mgr.latest_checkpoint).expect_partial()
        step = int(Path(mgr.latest_checkpoint).name.rsplit("-", 1)[-1])
        stored = {}
    else:
        src = run_dir / f"{which}.npz"
        if not src.exists():
            raise CdSfmError(f"{src}: not found")
        stored = load_weights_npz(model, src)
        step = int(stored.get("step", stored.get("steps", -1)))
    val = stored.get("validation") or {k: stored[k] for k in ("val_fpr95", "val_acc", "val_mb_auc") if k in stored}
    meta = _meta(conf, step, val, which)
    return export_weights(model, name, meta, export_dir, extra_files=[run_dir / "log.csv", run_dir / "curves.png"])


# --- command line ----------------------------------------------------------------------------------
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="cd-sfm train local", description=__doc__.split("\n")[0])
    p.add_argument("data", help="mined patch pairs (.h5 from mine-homography)")
    p.add_argument("run_dir", help="run directory (checkpoints, log, curves); an existing run is resumed")
    d = TrainConf()
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch", type=int, default=d.batch, help="matching pairs per step")
    p.add_argument("--loss", choices=["npair", "triplet"], default=d.loss)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up steps (then cosine decay)")
    p.add_argument("--no-scale-aware", action="store_true", help="plain N-pair loss (no keypoint-scale weighting)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--time-budget", type=float, default=d.time_budget_min,
                   help="minutes of this process; checkpoint, stop (and export) when reached; 0 = no limit")
    p.add_argument("--val-every", type=int, default=d.val_every)
    p.add_argument("--val-pairs", type=int, default=d.val_pairs)
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--jit", action="store_true", help="XLA-compile the train step")
    p.add_argument("--max-train-pairs", type=int, default=0)
    p.add_argument("--data-extra", action="append", default=[],
                   help="another mined .h5 (e.g. SfM tracks from 'cd-sfm train mine') whose training pairs are mixed "
                        "in; repeatable (its validation pairs are logged as val_acc_x1, ...; the best step is chosen "
                        "on the main file's)")
    p.add_argument("--extra-ratio", type=float, action="append", default=[],
                   help="share of each batch from each --data-extra, in the same order (0 or none: the natural "
                        "share of all pairs)")
    p.add_argument("--upright", action="store_true", help="record the model as upright (mine with --upright too)")
    # the names of models.local.ARCHS, written out: building the parser imports no TensorFlow
    p.add_argument("--arch", default=d.arch, choices=["official", "compact", "mini"],
                   help="local layout: official (the authors'), compact (a student, about 4x fewer multiply-adds) or "
                        "mini (about 14x fewer)")
    p.add_argument("--teacher", default="", help="distil from these local weights (.npz, model name or folder)")
    p.add_argument("--distill-weight", type=float, default=d.distill_weight)
    p.add_argument("--init", default="", help="fine-tune: start a new run from these local weights (.npz, model name "
                                              "or folder; same --arch) instead of random ones")
    p.add_argument("--batch-groups", type=int, default=d.batch_groups,
                   help="draw each file's share of a batch from the scenes of this many pairs (same-scene negatives); "
                        "0 = from all pairs")
    p.add_argument("--export", default="", help="model name: write cd_sfm/weights/<name>/ when the run completes")
    p.add_argument("--export-dir", default="")
    return p


def conf_from_args(args) -> TrainConf:
    return TrainConf(
        data=args.data, run_dir=args.run_dir, steps=args.steps, batch=args.batch, loss=args.loss, lr=args.lr, warmup=args.warmup,
        scale_aware=not args.no_scale_aware, seed=args.seed, time_budget_min=args.time_budget,
        val_every=args.val_every, val_pairs=args.val_pairs, ckpt_every=args.ckpt_every, threads=args.threads,
        jit=args.jit, max_train_pairs=args.max_train_pairs, upright=args.upright, export=args.export,
        export_dir=args.export_dir, data_extra=args.data_extra, extra_ratio=args.extra_ratio, arch=args.arch,
        teacher=args.teacher, distill_weight=args.distill_weight, init=args.init, batch_groups=args.batch_groups,
    )


def cli_train_local(args) -> dict:
    if not isinstance(args, argparse.Namespace):
        args = build_parser().parse_args(args)
    res = train_local(conf_from_args(args))
    v = res["val"] or {}
    print(f"step {res['step']}  {res['steps_per_s']:.3f} steps/s  val top-1 {v.get('val_acc', float('nan')):.4f}  "
          f"FPR95 {v.get('val_fpr95', float('nan')):.4f}  run {res['run_dir']}"
          + (f"  exported {res['exported']}" if "exported" in res else ""))
    return res


def build_export_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="cd-sfm train export", description="export a run's weights")
    p.add_argument("run_dir")
    p.add_argument("name")
    p.add_argument("--which", choices=["final", "best", "latest"], default="final")
    p.add_argument("--export-dir", default="")
    return p


def cli_export_local(args) -> Path:
    if not isinstance(args, argparse.Namespace):
        args = build_export_parser().parse_args(args)
    out = export_run(args.run_dir, args.name, args.which, args.export_dir or None)
    print(f"exported {out}")
    return out


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    logger.info("command: %s", " ".join(shlex.quote(a) for a in argv))
    return cli_train_local(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
