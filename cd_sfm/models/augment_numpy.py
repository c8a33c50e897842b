"""The geometric-context augmentation in numpy: the function of ``augment.build_augment_model(visual=False)`` on the
weights of an ``augment.npz``, without TensorFlow.

The shipped models have no regional weights, so their augmentation is this small point network (five 128x128 matrix
products per keypoint). With the int8 local network on OpenVINO, extraction then never imports TensorFlow, which
alone took about 7 s of every run on a 2-core CPU (``runner.LiteRunner``).

Per image of N keypoints (no padding, so context normalisation runs over the N real ones, as the Keras model's mask
makes it do)::

    x = [kpt_m, kpt_xy] @ W_dim_control + b
    4 x:  x += relu(bn(context_norm(x))) @ W_conv1 + b          (cn1 .. cn4)
    out = l2_normalize(local_feat + x @ W_context_trans + b)
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from ..blas import one_blas_thread
from ..io import CdSfmError, read_npz

_ONE_AT_A_TIME = threading.Lock()
BN_EPS = 1e-5  # the Keras model's batch norms (augment.py imports these: this module must not import TensorFlow)
CN_EPS = 1e-5  # its context normalisation
P = "geo_context_"
BLOCKS = 4


def has_visual_weights(keys) -> bool:
    """Whether a weight file (its keys) holds the visual branch."""
    return any(str(k).startswith("vis_context_") for k in keys)


def _dense(arrays: dict, name: str, path, fan_in: int, fan_out: int) -> tuple[np.ndarray, np.ndarray]:
    """(kernel (fan_in, fan_out), bias (fan_out,)) float32 of a 1x1 convolution ``name``."""
    try:
        k, b = arrays[f"{name}/kernel"], arrays[f"{name}/bias"]
    except KeyError as e:
        raise CdSfmError(f"{path}: no weights for {e.args[0]}") from None
    if k.shape != (1, 1, fan_in, fan_out) or b.shape != (fan_out,):
        raise CdSfmError(f"{path}: {name} has shapes {k.shape} / {b.shape}, expected (1, 1, {fan_in}, {fan_out}) / "
                         f"({fan_out},)")
    return k.reshape(fan_in, fan_out).astype(np.float32), b.astype(np.float32)


def _bn(arrays: dict, name: str, path, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(moving mean, 1 / sqrt(moving variance + eps)) float32 of a batch norm without centre / scale."""
    try:
        mean, var = arrays[f"{name}/moving_mean"], arrays[f"{name}/moving_variance"]
    except KeyError as e:
        raise CdSfmError(f"{path}: no weights for {e.args[0]}") from None
    if mean.shape != (dim,) or var.shape != (dim,):
        raise CdSfmError(f"{path}: {name} statistics have shapes {mean.shape} / {var.shape}, expected ({dim},)")
    return mean.astype(np.float32), (1.0 / np.sqrt(var.astype(np.float64) + BN_EPS)).astype(np.float32)


class GeometricAugment:
    """``(local_feat (N, 128), kpt_m (N,), kpt_xy (N, 2)) -> (N, 128)`` L2-normalised float32 descriptors, the
    geometric-only augmentation of the weights ``arrays`` (an ``augment.npz``'s ``geo_context_*`` entries; a visual
    branch in the file is ignored, as ``geometric_only`` does). ``path`` names the file in errors."""

    def __init__(self, arrays: dict, path="augment weights"):
        self.path = path
        self.dim_control = _dense(arrays, P + "dim_control", path, 3, 128)
        self.blocks = [(_bn(arrays, f"{P}cn{i}_bn1", path, 128), _dense(arrays, f"{P}cn{i}_conv1", path, 128, 128))
                       for i in range(1, BLOCKS + 1)]
        self.context_trans = _dense(arrays, P + "context_trans", path, 128, 128)

    @classmethod
    def from_file(cls, path) -> GeometricAugment:
        path = Path(path)
        return cls(read_npz(path), path)

    def __call__(self, local_feat: np.ndarray, kpt_m: np.ndarray, kpt_xy: np.ndarray) -> np.ndarray:
        # BLAS rounds differently with other thread counts (cd_sfm.blas), and a limit set in one thread may be undone
        # by another leaving its own block: one image at a time (the products take 0.05-0.1 s of an image's seconds)
        with _ONE_AT_A_TIME, one_blas_thread():
            return self._run(local_feat, kpt_m, kpt_xy)

    def _run(self, local_feat, kpt_m, kpt_xy) -> np.ndarray:
        lf = np.asarray(local_feat, np.float32).reshape(-1, 128)
        n = len(lf)
        if n == 0:
            return np.zeros((0, 128), np.float32)
        pts = np.concatenate([np.asarray(kpt_m, np.float32).reshape(n, 1),
                              np.asarray(kpt_xy, np.float32).reshape(n, 2)], axis=1)
        w, b = self.dim_control
        x = pts @ w
        x += b
        y, z = np.empty_like(x), np.empty_like(x)  # work buffers: no (N, 128) temporaries per operation
        for (mm, inv_std), (w, b) in self.blocks:
            # context normalisation over the image's keypoints, batch norm (inference) and ReLU folded into one
            # scale and shift per channel: relu(((x - mean) / s - mm) * inv_std) = relu(x * a + c)
            mean = x.mean(axis=0)
            np.subtract(x, mean, out=y)
            s = np.sqrt(np.square(y, out=y).mean(axis=0) + CN_EPS)
            a = inv_std / s
            c = -(mean / s + mm) * inv_std
            np.multiply(x, a, out=y)
            y += c
            np.maximum(y, 0.0, out=y)
            x += np.matmul(y, w, out=z)
            x += b
        w, b = self.context_trans
        out = np.matmul(x, w, out=y)
        out += b
        out += lf
        norm = np.sqrt(np.maximum(np.einsum("ij,ij->i", out, out)[:, None], 1e-12))  # tf.math.l2_normalize
        out /= norm
        return out
