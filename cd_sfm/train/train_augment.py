"""Train the geometric-only ContextDesc augmentation network, and end-to-end tuning of local + augmentation.

Data: an h5 pair file from :mod:`cd_sfm.train.pair_data` (image + random homographic warp, keypoints detected
independently in both, ground-truth correspondences, cached raw local descriptors and matchability of the frozen local
model). Pairs of held-out TRAIN images (``is_val``) are the validation set.

Model: ``build_augment_model(visual=False)`` (no regional weights exist here): augmented = L2normalise(raw local
``conv6_feat`` + geometric context(kpt_mb, x, y) over the whole keypoint set of the image). The geometric term does not
depend on the local descriptors, so a step computes it for the whole keypoint sets (padded to ``max_kpts`` with a
mask) and adds it to the local descriptors of a random subset of ``matches_per_pair`` corresponding keypoints only.
Its last layer (``geo_context_context_trans``) starts at zero, so training starts from the raw local descriptors.
Batch norms of the geometric branch follow context normalisation (zero mean, unit variance per image), so they run
in inference mode with their initial statistics (0, 1) - an exact identity that padding cannot disturb.

Loss over the corresponding keypoints of each pair (in-pair negatives): ``npair`` (the authors' N-pair loss, no
scale weighting; the default: it beat ``triplet``, hardest-in-pair, on the held-out pairs) or ``triplet``.

``mode="e2e"``: the local CNN is trained too (gradient through the 32x32 patches of the subset, BN in training mode);
the matchability head gets its own BCE (as in :mod:`train_local`); the geometric branch takes the cached matchability.

Validation on the held-out pairs, raw vs augmented: ``top1`` = in-pair top-1 accuracy among the ground-truth
correspondences (rows and columns), ``mnn`` = correct mutual-nearest-neighbour matches over the whole keypoint sets
per pair (reprojection error under H < 3 px) and their precision. A run directory holds ``ckpt/``, ``log.csv``,
``curves.png``, ``best.npz`` (augmentation weights; ``best_local.npz`` for e2e), ``final*.npz``, ``conf.json``;
running the same command again resumes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..geometry import l2_normalize
from ..io import CdSfmError, atomic_write_text, hash_file
from ..models.registry import FULL_MODEL
from .pair_data import read_pairs
from .runlog import append_log, read_log, warmup_cosine, write_log

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
LOG_FIELDS = ["step", "time_s", "kind", "loss", "acc", "mb_loss", "scale", "lr", "val_top1_raw", "val_top1_aug",
              "val_mnn_raw", "val_mnn_aug", "val_prec_raw", "val_prec_aug"]
CORRECT_PX = 3.0


@dataclass
class AugTrainConf:
    data: str = ""
    # more pair files whose training pairs are mixed in (e.g. homographic warps beside SfM pairs); validation (and the
    # best step) uses the main file's held-out pairs only
    data_extra: list = field(default_factory=list)
    run_dir: str = ""
    mode: str = "augment"  # augment | e2e
    steps: int = 1500
    pairs_per_step: int = 2
    matches_per_pair: int = 512  # e2e default 128 (2 x 128 patches per pair through the CNN)
    loss: str = "npair"  # npair (won the held-out comparison, docs/training.md) | triplet
    lr: float = 1e-3
    local_lr: float = 1e-4  # e2e: learning rate of the local CNN
    lr_min: float = 1e-5
    warmup: int = 50
    weight_decay: float = 1e-4
    init_log_scale: float = 2.3
    seed: int = 0
    time_budget_min: float = 30.0
    val_every: int = 100
    val_pairs: int = 0  # 0 = all held-out pairs; else that many, evenly spread (e2e re-describes every patch)
    ckpt_every: int = 50
    log_every: int = 10
    keep_ckpts: int = 3
    max_kpts: int = 4096  # padded keypoint-set size
    threads: int = 0
    local: str = ""  # e2e: initial local weights (default: the model the pair file was described with)
    init_augment: str = ""  # e2e: initial augmentation weights (.npz, e.g. an augment run's best.npz)
    export: str = ""  # model name -> <export_dir>/<name>/augment.npz (+ local.npz for e2e), info.json
    export_dir: str = ""  # default cd_sfm/weights


# --------------------------------------------------------------------------------------------------------------------
# data


def _pad_sets(pairs, idx, n_max):
    """Padded geometric inputs of the 2P images of pairs ``idx``: mb (2P, N, 1), xy (2P, N, 2), mask (2P, N)."""
    B = 2 * len(idx)
    mb = np.zeros((B, n_max, 1), np.float32)
    xy = np.zeros((B, n_max, 2), np.float32)
    mask = np.zeros((B, n_max), np.float32)
    for r, p in enumerate(idx):
        for s in range(2):
            n = min(len(pairs[p]["xy"][s]), n_max)
            mb[2 * r + s, :n, 0] = pairs[p]["mb"][s][:n]
            xy[2 * r + s, :n] = pairs[p]["xy"][s][:n]
            mask[2 * r + s, :n] = 1
    return mb, xy, mask


def sample_batch(pairs, step: int, conf: AugTrainConf, patches: bool = False):
    """Batch seeded by (seed, step): ``pairs_per_step`` pairs, ``matches_per_pair`` correspondences each (with
    replacement when a pair has fewer; duplicates share an id and are not negatives of each other)."""
    rng = np.random.default_rng([conf.seed, step])
    idx = rng.choice(len(pairs), conf.pairs_per_step, replace=len(pairs) < conf.pairs_per_step)
    K = conf.matches_per_pair
    sel = np.zeros((len(idx), K, 2), np.int32)
    ids = np.zeros((len(idx), K), np.int32)
    for r, p in enumerate(idx):
        m = pairs[p]["matches"]
        m = m[(m < conf.max_kpts).all(1)]
        k = rng.choice(len(m), K, replace=len(m) < K)
        sel[r], ids[r] = m[k], k
    mb, xy, mask = _pad_sets(pairs, idx, conf.max_kpts)
    out = {"mb": mb, "xy": xy, "mask": mask, "sel": sel, "ids": ids}
    if patches:
        out["patches"] = np.stack([np.stack([pairs[p]["patches"][s][sel[i, :, s]] for s in range(2)], 1)
                                   for i, p in enumerate(idx)])  # (P, K, 2, 32, 32) uint8
    else:
        out["local"] = np.stack([np.stack([pairs[p]["feat"][s][sel[i, :, s]] for s in range(2)], 1)
                                 for i, p in enumerate(idx)]).astype(np.float32)  # (P, K, 2, 128)
    return out


# --------------------------------------------------------------------------------------------------------------------
# model / trainer


def zero_init_output(aug) -> None:
    """Zero the last geometric layer: the untrained model returns the (normalised) raw local descriptors."""
    layer = aug.get_layer("geo_context_context_trans")
    layer.set_weights([np.zeros_like(w) for w in layer.get_weights()])


def geo_submodel(aug):
    import keras

    return keras.Model(aug.inputs, aug.get_layer("geo_context_feat").output, name="geo_context")


class AugTrainer:
    def __init__(self, conf: AugTrainConf, local_weights: str | None = None):
        import keras
        import tensorflow as tf

        from ..models.augment import build_augment_model

        self.tf = tf
        self.conf = conf
        if conf.threads:
            tf.config.threading.set_intra_op_parallelism_threads(conf.threads)
            tf.config.threading.set_inter_op_parallelism_threads(min(2, conf.threads))
        keras.utils.set_random_seed(conf.seed)
        self.aug = build_augment_model(visual=False)
        zero_init_output(self.aug)
        if conf.init_augment:
            from ..models.weights import load_weights_npz

            load_weights_npz(self.aug, conf.init_augment, allow_extra=True)
        self.geo = geo_submodel(self.aug)
        self.e2e = conf.mode == "e2e"
        self.local = None
        self.log_scale = tf.Variable(conf.init_log_scale, dtype=tf.float32, name="log_scale")
        self.aug_vars = list(self.aug.trainable_weights) + ([self.log_scale] if conf.loss == "npair" else [])
        self.opt = keras.optimizers.AdamW(learning_rate=conf.lr, weight_decay=conf.weight_decay)
        objects = {"augment": self.aug, "optimizer": self.opt, "log_scale": self.log_scale}
        if self.e2e:
            from ..models.local import load_local_model

            self.local = load_local_model(local_weights)
            self.head_vars = [v for l in self.local.layers if l.name.startswith("kpt_m") for v in l.trainable_weights]
            hid = {id(v) for v in self.head_vars}
            self.trunk_vars = [v for v in self.local.trainable_weights if id(v) not in hid]
            self.local_opt = keras.optimizers.AdamW(learning_rate=conf.local_lr, weight_decay=conf.weight_decay)
            objects.update(local=self.local, local_optimizer=self.local_opt)
            self._embed = tf.function(lambda x: self.local(x, training=False), reduce_retracing=True)
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.ckpt = tf.train.Checkpoint(step=self.step, **objects)
        self.manager = None
        self._train_step = tf.function(self._step_impl, reduce_retracing=True)
        self._geo = tf.function(self._geo_terms, reduce_retracing=True)

    def _geo_terms(self, mb, xy, mask):
        tf = self.tf
        zeros = tf.zeros(tf.concat([tf.shape(xy)[:2], [128]], 0))
        return self.geo({"local_feat": zeros, "kpt_m": mb, "kpt_xy": xy, "kpt_mask": mask}, training=False)

    def _desc_loss(self, anc, pos, ids):
        from . import losses

        if self.conf.loss == "npair":
            return losses.scale_aware_npair_loss(anc, pos, self.log_scale, None, ids)
        return losses.hardest_triplet_loss(anc, pos, ids)

    def _step_impl(self, mb, xy, mask, sel, ids, local_or_patches):
        from . import losses

        tf = self.tf
        P, K = tf.shape(sel)[0], tf.shape(sel)[1]
        with tf.GradientTape(persistent=True) as tape:
            if self.e2e:
                x = tf.cast(tf.reshape(local_or_patches, (-1, 32, 32, 1)), tf.float32)
                out = self.local(x, training=True)
                local = tf.reshape(out["conv6_feat"], (P, K, 2, 128))
                kmb = tf.reshape(out["kpt_mb"], (P, K, 2))
            else:
                local = local_or_patches
            geo = tf.reshape(self._geo_terms(mb, xy, mask), (P, 2, -1, 128))
            loss_sum, acc_sum, mb_sum = 0.0, 0.0, 0.0
            for r in range(self.conf.pairs_per_step):
                ga = tf.gather(geo[r, 0], sel[r, :, 0])
                gp = tf.gather(geo[r, 1], sel[r, :, 1])
                anc = tf.math.l2_normalize(local[r, :, 0] + ga, axis=-1)
                pos = tf.math.l2_normalize(local[r, :, 1] + gp, axis=-1)
                loss, acc = self._desc_loss(anc, pos, ids[r])
                loss_sum += loss
                acc_sum += acc
                if self.e2e:
                    mb_sum += 0.5 * (losses.matchability_loss(kmb[r, :, 0], local[r, :, 0], local[r, :, 1], ids[r])
                                     + losses.matchability_loss(kmb[r, :, 1], local[r, :, 1], local[r, :, 0], ids[r]))
            n = float(self.conf.pairs_per_step)
            loss, acc, mb_loss = loss_sum / n, acc_sum / n, mb_sum / n
        if self.e2e:
            grads = tape.gradient(loss, self.aug_vars + self.trunk_vars)
            g_head = tape.gradient(mb_loss, self.head_vars)
            na = len(self.aug_vars)
            self.opt.apply_gradients(zip(grads[:na], self.aug_vars))
            self.local_opt.apply_gradients(zip(grads[na:] + g_head, self.trunk_vars + self.head_vars))
        else:
            grads = tape.gradient(loss, self.aug_vars)
            self.opt.apply_gradients(zip(grads, self.aug_vars))
        del tape
        return loss, acc, mb_loss

    def train_step(self, batch: dict):
        tf = self.tf
        x = batch["patches"] if self.e2e else batch["local"]
        out = self._train_step(tf.constant(batch["mb"]), tf.constant(batch["xy"]), tf.constant(batch["mask"]),
                               tf.constant(batch["sel"]), tf.constant(batch["ids"]), tf.constant(x))
        return [float(v) for v in out]

    # ---- inference
    def describe_local(self, patches: np.ndarray, batch: int = 512):
        """e2e: raw local descriptors and matchability of (N, 32, 32) patches with the current local model."""
        tf = self.tf
        feats, mbs = [], []
        for i in range(0, len(patches), batch):
            x = np.asarray(patches[i : i + batch], np.float32)
            m = len(x)
            if m < batch:
                x = np.concatenate([x, np.zeros((batch - m,) + x.shape[1:], np.float32)])
            out = self._embed(tf.constant(x[..., None]))
            feats.append(out["conv6_feat"].numpy()[:m])
            mbs.append(out["kpt_mb"].numpy()[:m])
        return np.concatenate(feats), np.concatenate(mbs)

    def geo_terms(self, mb: np.ndarray, xy: np.ndarray) -> np.ndarray:
        """Geometric context (N, 128) of one image's whole keypoint set."""
        n = len(xy)
        size = max(self.conf.max_kpts, n)
        m = np.zeros((1, size, 1), np.float32)
        k = np.zeros((1, size, 2), np.float32)
        mask = np.zeros((1, size), np.float32)
        m[0, :n, 0], k[0, :n], mask[0, :n] = mb, xy, 1
        return self._geo(m, k, mask).numpy()[0, :n]

    def validate(self, val_pairs) -> dict:
        def describe(pair, s):
            if self.e2e:
                feat, mb = self.describe_local(pair["patches"][s])
            else:
                feat, mb = pair["feat"][s].astype(np.float32), pair["mb"][s]
            raw = _l2n(feat)
            aug = _l2n(feat + self.geo_terms(mb, pair["xy"][s]))
            return raw, aug

        return validation_metrics(val_pairs, describe)

    # ---- checkpoints
    def open_run(self, run_dir: Path) -> int:
        tf = self.tf
        self.manager = tf.train.CheckpointManager(self.ckpt, str(run_dir / "ckpt"), max_to_keep=self.conf.keep_ckpts)
        if self.manager.latest_checkpoint:
            self.opt.build(self.aug_vars)
            if self.e2e:
                self.local_opt.build(self.trunk_vars + self.head_vars)
            self.ckpt.restore(self.manager.latest_checkpoint).expect_partial()
            logger.info("resumed %s at step %d", self.manager.latest_checkpoint, int(self.step.numpy()))
        return int(self.step.numpy())

    def save(self):
        self.manager.save(checkpoint_number=int(self.step.numpy()))


def _l2n(x):
    return l2_normalize(np.asarray(x, np.float32))


def pair_metrics(d0: np.ndarray, d1: np.ndarray, pair: dict) -> dict:
    """top-1 among the ground-truth correspondences; correct mutual NN over the whole sets (error < 3 px)."""
    from ..geometry import sampson_distance
    from .homography import warp_points

    m = pair["matches"]
    if len(m):
        sim = d0[m[:, 0]] @ d1[m[:, 1]].T
        ar = np.arange(len(m))
        top1 = 0.5 * (np.mean(sim.argmax(1) == ar) + np.mean(sim.argmax(0) == ar))
    else:
        top1 = float("nan")
    sim = d0 @ d1.T
    nn01, nn10 = sim.argmax(1), sim.argmax(0)
    i = np.flatnonzero(nn10[nn01] == np.arange(len(d0)))
    j = nn01[i]
    if np.isfinite(pair["H"]).all():
        err = np.linalg.norm(warp_points(pair["H"], pair["kpts"][0][i]) - pair["kpts"][1][j], axis=1)
    else:  # an SfM pair: distance to the epipolar line of the model's poses (Sampson, pixels)
        err = sampson_distance(pair["F"], pair["kpts"][0][i], pair["kpts"][1][j])
    correct = int(np.sum(err < CORRECT_PX))
    return {"top1": float(top1), "mnn": correct, "prec": correct / max(len(i), 1)}


def validation_metrics(val_pairs, describe) -> dict:
    """Averages over the held-out pairs of :func:`pair_metrics`, raw and augmented; ``describe(pair, side)`` returns
    (raw, augmented) L2-normalised descriptors of one side."""
    rows = {"raw": [], "aug": []}
    for pair in val_pairs:
        (r0, a0), (r1, a1) = describe(pair, 0), describe(pair, 1)
        rows["raw"].append(pair_metrics(r0, r1, pair))
        rows["aug"].append(pair_metrics(a0, a1, pair))
    out = {}
    for kind, rs in rows.items():
        for k in ("top1", "mnn", "prec"):
            out[f"val_{k}_{kind}"] = float(np.nanmean([r[k] for r in rs])) if rs else float("nan")
    return out


# --------------------------------------------------------------------------------------------------------------------
# log / curves


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
        ax[1].plot(s, [float(r["acc"]) for r in tr], label="train in-pair top-1")
    if va:
        s = [int(r["step"]) for r in va]
        for kind, style in (("raw", "--"), ("aug", "o-")):
            ax[1].plot(s, [float(r[f"val_top1_{kind}"]) for r in va], style, label=f"val top-1 {kind}")
            ax[2].plot(s, [float(r[f"val_mnn_{kind}"]) for r in va], style, label=f"val correct mutual NN {kind}")
    for a, t in zip(ax, ["loss", "accuracy (in-pair)", "correct mutual-NN matches per pair"]):
        a.set_title(t)
        a.set_xlabel("step")
        a.grid(alpha=0.3)
        if a.lines:
            a.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------------
# main loop


def lr_at(step: int, conf: AugTrainConf, base: float | None = None) -> float:
    base = conf.lr if base is None else base
    return warmup_cosine(step, base, min(conf.lr_min, base), conf.warmup, conf.steps)


def _local_weights_path(name: str) -> Path:
    p = Path(name)
    if p.suffix == ".npz":
        return p
    from ..models import registry

    return registry.resolve(name).path("local")


def _sha1(path) -> str:
    return hash_file(hashlib.sha1(), path).hexdigest()


def train_augment(conf: AugTrainConf) -> dict:
    """Train (or resume) an augmentation / e2e run; returns validation metrics and paths."""
    if conf.mode not in ("augment", "e2e"):
        raise CdSfmError(f"mode {conf.mode!r}: expected augment or e2e")
    if conf.loss not in ("triplet", "npair"):
        raise CdSfmError(f"--loss {conf.loss}: expected triplet or npair")
    if not conf.run_dir:
        raise CdSfmError("train augment: a run directory is required")
    e2e = conf.mode == "e2e"
    run_dir = Path(conf.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "conf.json").write_text(json.dumps(asdict(conf), indent=2) + "\n")
    t_start = time.time()
    data = read_pairs(conf.data, "all", patches=e2e)
    attrs = data["attrs"]
    train = [p for p in data["pairs"] if not p["is_val"] and len(p["matches"])]
    val = [p for p in data["pairs"] if p["is_val"]]
    for extra in conf.data_extra:
        more = [p for p in read_pairs(extra, "train", patches=e2e)["pairs"] if len(p["matches"])]
        logger.info("extra data %s: %d training pairs", extra, len(more))
        train += more
    if conf.val_pairs and len(val) > conf.val_pairs:
        val = [val[i] for i in np.unique(np.linspace(0, len(val) - 1, conf.val_pairs).round().astype(int))]
    if not train:
        raise CdSfmError(f"{conf.data}: no training pairs with correspondences")
    local_name = conf.local or str(attrs.get("local_model", FULL_MODEL))
    local_path = _local_weights_path(local_name)
    logger.info("data: %d training pairs, %d validation pairs; local model %s", len(train), len(val), local_path)
    trainer = AugTrainer(conf, str(local_path) if e2e else None)
    step0 = trainer.open_run(run_dir)
    log_path = run_dir / "log.csv"
    write_log(log_path, read_log(log_path, upto=step0), LOG_FIELDS)
    best_path = run_dir / "best.json"
    best = json.loads(best_path.read_text()) if best_path.exists() else {"val_top1_aug": -1.0, "step": -1}
    if step0 == 0 and val and not read_log(log_path):
        v0 = trainer.validate(val)
        append_log(log_path, {"step": 0, "time_s": "0", "kind": "val", **{k: f"{x:.4f}" for k, x in v0.items()}}, LOG_FIELDS)
        logger.info("step 0: %s", ", ".join(f"{k}={x:.4f}" for k, x in v0.items()))
    buf, last_val, step, stopped = [], None, step0, False
    pbar = tqdm(total=conf.steps, initial=step0, desc=f"train {conf.mode} ({conf.loss})", unit="step",
                dynamic_ncols=True)
    t_run = time.time()
    try:
        while step < conf.steps:
            if conf.time_budget_min and time.time() - t_start > 60 * conf.time_budget_min:
                stopped = True
                logger.info("time budget of %.1f min reached at step %d", conf.time_budget_min, step)
                break
            lr = lr_at(step, conf)
            trainer.opt.learning_rate = lr
            if e2e:
                trainer.local_opt.learning_rate = lr_at(step, conf, conf.local_lr)
            loss, acc, mb_loss = trainer.train_step(sample_batch(train, step, conf, patches=e2e))
            if not np.isfinite(loss):
                raise RuntimeError(f"non-finite loss at step {step}")
            step += 1
            trainer.step.assign(step)
            buf.append([loss, acc, mb_loss])
            pbar.update(1)
            if step % conf.log_every == 0 or step == conf.steps:
                m = np.mean(buf, 0)
                buf = []
                pbar.set_postfix(loss=f"{m[0]:.3f}", acc=f"{m[1]:.3f}")
                append_log(log_path, {"step": step, "time_s": f"{time.time() - t_run:.1f}", "kind": "train",
                                       "loss": f"{m[0]:.5f}", "acc": f"{m[1]:.4f}", "mb_loss": f"{m[2]:.5f}",
                                       "scale": f"{math.exp(float(trainer.log_scale.numpy())):.3f}",
                                       "lr": f"{lr:.2e}"}, LOG_FIELDS)
            if val and (step % conf.val_every == 0 or step == conf.steps):
                last_val = trainer.validate(val)
                append_log(log_path, {"step": step, "time_s": f"{time.time() - t_run:.1f}", "kind": "val",
                                       **{k: f"{x:.4f}" for k, x in last_val.items()}}, LOG_FIELDS)
                logger.info("step %d: %s", step, ", ".join(f"{k}={x:.4f}" for k, x in last_val.items()))
                if last_val["val_top1_aug"] > best["val_top1_aug"]:
                    best = {"step": step, **last_val}
                    _save_weights(trainer, run_dir, "best", {"step": step, **last_val})
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
    logger.info("trained steps %d..%d in %.0f s (%.3f s/step)", step0, step, elapsed, 1 / rate if rate else 0)
    if last_val is None and val:
        last_val = trainer.validate(val)
    if log_path.exists():
        plot_curves(log_path, run_dir / "curves.png")
    meta = _meta(conf, step, attrs, last_val, "final", local_path)
    _save_weights(trainer, run_dir, "final", meta)
    result = {"step": step, "s_per_step": 1 / rate if rate else float("nan"), "val": last_val, "best": best,
              "run_dir": str(run_dir), "stopped_by_budget": stopped}
    if conf.export and (step >= conf.steps or stopped):
        if stopped:
            meta["stopped_by_time_budget"] = f"step {step} of {conf.steps}"
        result["exported"] = str(export_weights(trainer.aug, trainer.local, conf.export, meta, conf.export_dir or None,
                                                local_path, [log_path, run_dir / "curves.png"]))
    elif conf.export:
        logger.info("not exported: run stopped at step %d of %d (run again to resume)", step, conf.steps)
    return result


def _save_weights(trainer: AugTrainer, run_dir: Path, which: str, meta: dict):
    from ..models.weights import save_weights_npz

    save_weights_npz(trainer.aug, run_dir / f"{which}.npz", meta=meta)
    if trainer.local is not None:
        save_weights_npz(trainer.local, run_dir / f"{which}_local.npz", meta=meta)


_SFM_TEXT = ("image pairs of SfM reconstructions of the TRAIN scenes of configs/split.yaml (whole SIFT keypoint sets, "
             "correspondences from the tracks, poses for validation)")
_WARP_TEXT = ("image + random homographic warp of the TRAIN scenes of configs/split.yaml, SIFT keypoints detected "
              "independently in both, correspondences by the known homography")


def _trained_on(sfm_main: bool, extra: bool) -> str:
    if not sfm_main:
        return _WARP_TEXT
    return _SFM_TEXT + (", with " + _WARP_TEXT if extra else "")


def _meta(conf: AugTrainConf, step: int, attrs: dict, val: dict | None, source: str, local_path: Path) -> dict:
    pconf = json.loads(attrs.get("conf", "{}")) if isinstance(attrs.get("conf", "{}"), str) else {}
    names = json.loads(attrs.get("image_names", "[]"))
    e2e = conf.mode == "e2e"
    recipe = (f"cd-sfm train {conf.mode} {conf.data} {conf.run_dir} --steps {conf.steps} --loss {conf.loss} "
              + "".join(f"--data-extra {x} " for x in conf.data_extra)
              + 
              f"--pairs-per-step {conf.pairs_per_step} --matches-per-pair {conf.matches_per_pair} --lr {conf.lr:g}"
              + (f" --local-lr {conf.local_lr:g}" if e2e else "")
              + (f" --init-augment {conf.init_augment}" if conf.init_augment else "")
              + f" --seed {conf.seed} --time-budget {conf.time_budget_min:g}"
              + (f" --export {conf.export}" if conf.export else "")
              + (f" --export-dir {conf.export_dir}" if conf.export_dir else ""))
    return {
        "model": "contextdesc_augment_geometric" + ("_e2e" if e2e else ""),
        "visual": False,
        "mode": conf.mode,
        "trained_on": _trained_on(attrs.get("source") == "sfm_pairs", bool(conf.data_extra)),
        "train_images": len(names),
        "val_images": json.loads(attrs.get("val_images", "[]")),
        "pair_data": {"path": conf.data, "extra": list(conf.data_extra), "source": str(attrs.get("source", "")),
                      "warps_per_image": pconf.get("warps_per_image"),
                      "val_warps_per_image": pconf.get("val_warps_per_image"),
                      "homography": pconf.get("homography"), "match": pconf.get("match")},
        "local_model_used": {"source": str(attrs.get("local_model", "")), "path": str(local_path),
                             "sha1": _sha1(local_path) if Path(local_path).is_file() else None},
        "loss": conf.loss,
        "steps": step,
        "pairs_per_step": conf.pairs_per_step,
        "matches_per_pair": conf.matches_per_pair,
        "weights_from": source,
        "validation": val or {},
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "recipe": recipe,
        "train_conf": asdict(conf),
    }


def export_weights(aug, local, name: str, meta: dict, export_dir=None, local_path=None, extra_files=()) -> Path:
    """Write ``<export_dir>/<name>/augment.npz`` (float16; e2e: also ``local.npz``) and update ``info.json`` (its
    ``augment`` entry; e2e also the top-level training facts). A folder without ``local.npz`` gets a copy of the
    local weights the augmentation was trained with, so it is a complete model."""
    from ..models.weights import save_weights_npz

    out = Path(export_dir or WEIGHTS_DIR) / name
    out.mkdir(parents=True, exist_ok=True)
    save_weights_npz(aug, out / "augment.npz", meta=meta)
    os.chmod(out / "augment.npz", 0o644)
    if local is not None:
        save_weights_npz(local, out / "local.npz", meta=meta)
        os.chmod(out / "local.npz", 0o644)
    elif not (out / "local.npz").exists() and local_path is not None:
        shutil.copy2(local_path, out / "local.npz")
        os.chmod(out / "local.npz", 0o644)
        src_info = Path(local_path).parent / "info.json"
        if src_info.exists() and not (out / "info.json").exists():
            shutil.copy2(src_info, out / "info.json")
    elif (out / "local.npz").exists() and local_path is not None and Path(local_path).is_file() \
            and _sha1(out / "local.npz") != _sha1(local_path):
        logger.warning("%s: its local.npz is not the local model the augmentation was trained with (%s)",
                       out, local_path)
    info = json.loads((out / "info.json").read_text()) if (out / "info.json").exists() else {}
    info["name"] = name
    info.setdefault("source", "shipped")
    info["augment"] = meta
    if local is not None:
        info["description"] = ("our own ContextDesc model, local and geometric-only augmentation tuned end to end "
                               "on CPU; no regional weights")
        info["local_e2e"] = {k: meta[k] for k in ("steps", "recipe", "validation", "date")}
    else:
        desc = info.get("description", "")
        if "augmentation" in desc and "no augmentation" in desc:
            info["description"] = desc.replace("no augmentation/regional weights",
                                               "geometric-only augmentation (no regional weights)")
    atomic_write_text(out / "info.json", json.dumps(info, indent=2) + "\n")
    os.chmod(out / "info.json", 0o644)
    for f in extra_files:
        f = Path(f)
        if f.exists():
            shutil.copy2(f, out / f"{'e2e' if local is not None else 'augment'}_{f.name}")
    logger.info("exported %s", out / "augment.npz")
    return out / "augment.npz"


def export_run(run_dir, name: str, which: str = "final", export_dir=None) -> Path:
    """Export a run's ``final`` or ``best`` weights (augment.npz, plus local.npz for e2e)."""
    from ..models.augment import build_augment_model
    from ..models.local import load_local_model
    from ..models.weights import load_weights_npz

    run_dir = Path(run_dir)
    conf_d = json.loads((run_dir / "conf.json").read_text())
    conf = AugTrainConf(**{f.name: conf_d[f.name] for f in fields(AugTrainConf) if f.name in conf_d})
    src = run_dir / f"{which}.npz"
    if not src.exists():
        raise CdSfmError(f"{src}: not found")
    aug = build_augment_model(visual=False)
    stored = load_weights_npz(aug, src)
    local = None
    if conf.mode == "e2e":
        local = load_local_model(run_dir / f"{which}_local.npz")
    final = load_weights_npz(build_augment_model(visual=False), run_dir / "final.npz") \
        if (run_dir / "final.npz").exists() else {}
    meta = dict(final) if final else {}
    meta.update({"steps": int(stored.get("step", stored.get("steps", -1))), "weights_from": which,
                 "validation": {k: v for k, v in stored.items() if k.startswith("val_")} or stored.get("validation",
                                                                                                    {})})
    conf.export = name
    local_path = Path(meta.get("local_model_used", {}).get("path", "")) if meta else None
    return export_weights(aug, local, name, meta, export_dir, local_path if local_path and local_path.is_file()
                          else None, [run_dir / "log.csv", run_dir / "curves.png"])


# --------------------------------------------------------------------------------------------------------------------
# command line


def build_parser(parser: argparse.ArgumentParser | None = None, mode: str = "augment") -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog=f"cd-sfm train {mode}", description=__doc__.split("\n")[0])
    p.add_argument("data", help="pair data (.h5 from 'cd-sfm train mine-pairs' or 'mine-sfm-pairs'); its held-out "
                                "pairs validate and choose the best step")
    p.add_argument("--data-extra", action="append", default=[],
                   help="more pair data whose training pairs are mixed in (repeatable)")
    p.add_argument("run_dir", help="run directory (checkpoints, log, curves); an existing run is resumed")
    d = AugTrainConf()
    e2e = mode == "e2e"
    p.add_argument("--steps", type=int, default=600 if e2e else d.steps)
    p.add_argument("--pairs-per-step", type=int, default=d.pairs_per_step)
    p.add_argument("--matches-per-pair", type=int, default=128 if e2e else d.matches_per_pair)
    p.add_argument("--loss", choices=["triplet", "npair"], default=d.loss)
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate of the augmentation network")
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--time-budget", type=float, default=d.time_budget_min,
                   help="minutes of this process; checkpoint, stop (and export) when reached; 0 = no limit")
    p.add_argument("--val-every", type=int, default=d.val_every)
    p.add_argument("--val-pairs", type=int, default=8 if e2e else d.val_pairs,
                   help="held-out pairs used for validation (0 = all)")
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    p.add_argument("--threads", type=int, default=0)
    if e2e:
        p.add_argument("--local-lr", type=float, default=d.local_lr, help="learning rate of the local CNN")
        p.add_argument("--local", default="", help="initial local weights (name, folder or .npz; default: the "
                                                   "model the pair data was described with)")
        p.add_argument("--init-augment", default="", help="initial augmentation weights (.npz, e.g. RUN/best.npz)")
    p.add_argument("--export", default="", help="model name: write <export-dir>/<name>/ when the run completes")
    p.add_argument("--export-dir", default="", help="default: cd_sfm/weights")
    p.set_defaults(mode=mode)
    return p


def conf_from_args(args) -> AugTrainConf:
    return AugTrainConf(
        data=args.data, data_extra=list(args.data_extra), run_dir=args.run_dir, mode=args.mode, steps=args.steps, pairs_per_step=args.pairs_per_step,
        matches_per_pair=args.matches_per_pair, loss=args.loss, lr=args.lr, warmup=args.warmup, seed=args.seed,
        time_budget_min=args.time_budget, val_every=args.val_every, val_pairs=args.val_pairs,
        ckpt_every=args.ckpt_every,
        threads=args.threads, local_lr=getattr(args, "local_lr", AugTrainConf.local_lr),
        local=getattr(args, "local", ""), init_augment=getattr(args, "init_augment", ""), export=args.export,
        export_dir=args.export_dir,
    )


def cli_train_augment(args, mode: str = "augment") -> dict:
    if not isinstance(args, argparse.Namespace):
        args = build_parser(mode=mode).parse_args(args)
    res = train_augment(conf_from_args(args))
    v = res["val"] or {}
    print(f"step {res['step']}  {res['s_per_step']:.3f} s/step  val top-1 raw {v.get('val_top1_raw', float('nan')):.4f}"
          f" aug {v.get('val_top1_aug', float('nan')):.4f}  correct mutual NN raw "
          f"{v.get('val_mnn_raw', float('nan')):.1f} aug {v.get('val_mnn_aug', float('nan')):.1f}  run {res['run_dir']}"
          + (f"  exported {res['exported']}" if "exported" in res else ""))
    return res


def cli_train_e2e(args) -> dict:
    return cli_train_augment(args, mode="e2e")


def build_export_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="cd-sfm train export-augment",
                                          description="export an augment/e2e run's weights")
    p.add_argument("run_dir")
    p.add_argument("name")
    p.add_argument("--which", choices=["final", "best"], default="final")
    p.add_argument("--export-dir", default="")
    return p


def cli_export_augment(args) -> Path:
    if not isinstance(args, argparse.Namespace):
        args = build_export_parser().parse_args(args)
    out = export_run(args.run_dir, args.name, args.which, args.export_dir or None)
    print(f"exported {out}")
    return out


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    logger.info("command: %s", " ".join(shlex.quote(a) for a in argv))
    mode = "augment"
    if argv and argv[0] in ("augment", "e2e"):
        mode, argv = argv[0], argv[1:]
    return cli_train_augment(build_parser(mode=mode).parse_args(argv), mode)


if __name__ == "__main__":
    main()
