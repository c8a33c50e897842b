"""Augmentation model: raw local descriptors + visual context + geometric context, L2-normalised (docs/contextdesc.md).

Interface (batch of B images, usually B = 1 as the authors' graph, N keypoints each, padded N allowed):

* ``local_feat`` (B, N, 128): raw ``conv6_feat`` of the local model (not normalised);
* ``kpt_m`` (B, N, 1): matchability ``kpt_mb``;
* ``kpt_xy`` (B, N, 2): keypoints normalised on the full-resolution image, ``(x - W/2) / (W/2)``, same for y;
* ``kpt_mask`` (B, N): 1 for real keypoints, 0 for padding (context normalisation ignores padding, so a padded batch
  gives the same descriptors as an unpadded one);
* ``regional_feat`` (B, h, w, 2048): res5c map of the regional model (only when ``visual=True``).

Output ``l2norm`` (B, N, 128) = L2 normalise(local_feat + visual + geometric). Without a regional model the model is
built with ``visual=False`` and the visual term is left out.

Layer names follow the authors' scopes (``vis_context/...`` -> ``vis_context_...``; Keras forbids ``/`` in names).
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers

from .augment_numpy import BN_EPS, CN_EPS
REGIONAL_DIM = 2048
INTERP_MODES = ("inverse_distance", "uniform")


class ContextNorm(layers.Layer):
    """Context normalisation: per image and channel, (x - mean) / sqrt(var + eps) over the positions of axis 1,
    counting only positions whose mask is 1. Inputs ``[x (B, N, 1, C), mask (B, N)]`` or ``x`` alone."""

    def __init__(self, eps: float = CN_EPS, **kw):
        kw.setdefault("dtype", "float32")
        super().__init__(**kw)
        self.eps = eps

    def call(self, inputs):
        if isinstance(inputs, (list, tuple)):
            x, mask = inputs
            x = tf.cast(x, tf.float32)
            m = tf.cast(tf.reshape(mask, tf.concat([tf.shape(mask), [1, 1]], 0)), tf.float32)
            cnt = tf.maximum(tf.reduce_sum(m, axis=1, keepdims=True), 1.0)
            mean = tf.reduce_sum(x * m, axis=1, keepdims=True) / cnt
            var = tf.reduce_sum(tf.square(x - mean) * m, axis=1, keepdims=True) / cnt
        else:
            x = tf.cast(inputs, tf.float32)
            mean, var = tf.nn.moments(x, axes=[1], keepdims=True)
        return (x - mean) / tf.sqrt(var + self.eps)

    def get_config(self):
        return {**super().get_config(), "eps": self.eps}


class GridInterpolate(layers.Layer):
    """Interpolate per-position features of an (h, w) grid at keypoints: the 3 nearest grid positions, distance
    sqrt(|a|^2 - 2ab + |b|^2 + 1e-6), weights 1/max(d, 1e-10) normalised to sum 1 (``inverse_distance``, the
    documented rule). ``uniform`` gives the three neighbours equal weights, which is what a graph computes when it
    clamps the top-k values before negating them back (the importer detects that and sets this mode).

    Inputs ``[kpt_xy (B, N, 2), feats (B, h*w, C), regional (B, h, w, *)]`` (the regional map only gives h, w).
    The grid is meshgrid(linspace(-1, 1, w), linspace(-1, 1, h)), row-major, as (x, y) pairs.
    """

    def __init__(self, k: int = 3, mode: str = "inverse_distance", **kw):
        kw.setdefault("dtype", "float32")
        super().__init__(**kw)
        if mode not in INTERP_MODES:
            raise ValueError(f"interpolation mode must be one of {INTERP_MODES}, got {mode!r}")
        self.k = k
        self.mode = mode

    def call(self, inputs):
        xy, feats, regional = inputs
        xy = tf.cast(xy, tf.float32)
        feats = tf.cast(feats, tf.float32)
        shape = tf.shape(regional)
        h, w = shape[1], shape[2]
        gx, gy = tf.meshgrid(tf.linspace(-1.0, 1.0, w), tf.linspace(-1.0, 1.0, h))
        grid = tf.reshape(tf.stack([gx, gy], axis=-1), (1, -1, 2))  # (1, h*w, 2)
        grid = tf.tile(grid, [tf.shape(xy)[0], 1, 1])
        prod = tf.matmul(xy, grid, transpose_b=True)
        n1 = tf.reduce_sum(xy * xy, axis=-1, keepdims=True)
        n2 = tf.reduce_sum(grid * grid, axis=-1, keepdims=True)
        dist = tf.sqrt(tf.maximum(n1 - 2.0 * prod + tf.linalg.matrix_transpose(n2) + 1e-6, 0.0))
        neg, idx = tf.math.top_k(-dist, k=self.k)
        if self.mode == "inverse_distance":
            inv = 1.0 / tf.maximum(-neg, 1e-10)
        else:
            inv = tf.ones_like(neg)
        weight = inv / tf.reduce_sum(inv, axis=-1, keepdims=True)  # (B, N, k)
        nn = tf.gather(feats, idx, batch_dims=1)  # (B, N, k, C)
        return tf.reduce_sum(weight[..., None] * nn, axis=-2)

    def get_config(self):
        return {**super().get_config(), "k": self.k, "mode": self.mode}


class L2Normalize(layers.Layer):
    def __init__(self, axis: int = -1, **kw):
        kw.setdefault("dtype", "float32")
        super().__init__(**kw)
        self.axis = axis

    def call(self, x):
        return tf.math.l2_normalize(tf.cast(x, tf.float32), axis=self.axis)

    def get_config(self):
        return {**super().get_config(), "axis": self.axis}


def _bn(x, name, relu=True):
    x = layers.BatchNormalization(center=False, scale=False, epsilon=BN_EPS, name=name)(x)
    return layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _conv1x1(x, filters, name, bias=True):
    return layers.Conv2D(filters, 1, padding="valid", use_bias=bias, name=name)(x)


def _to_points(x, name):
    """(B, N, C) -> (B, N, 1, C), the authors' layout for per-point 1x1 convolutions."""
    return layers.Reshape((-1, 1, x.shape[-1]), name=name)(x)


def build_augment_model(
    visual: bool = True,
    interp: str = "inverse_distance",
    local_dim: int = 128,
    regional_dim: int = REGIONAL_DIM,
    name: str = "contextdesc_augment",
) -> keras.Model:
    """Build the augmentation model; ``visual=False`` gives the geometric-only model (no regional input)."""
    local_feat = keras.Input((None, local_dim), name="local_feat")
    kpt_m = keras.Input((None, 1), name="kpt_m")
    kpt_xy = keras.Input((None, 2), name="kpt_xy")
    kpt_mask = keras.Input((None,), name="kpt_mask")
    inputs = {"local_feat": local_feat, "kpt_m": kpt_m, "kpt_xy": kpt_xy, "kpt_mask": kpt_mask}
    terms = [local_feat]

    if visual:
        regional = keras.Input((None, None, regional_dim), name="regional_feat")
        inputs["regional_feat"] = regional
        p = "vis_context_"
        v = layers.Reshape((-1, 1, regional_dim), name=p + "reshape")(regional)
        v = _conv1x1(v, 1024, p + "conv1")
        v = ContextNorm(name=p + "conv1_cn")(v)
        v = _bn(v, p + "conv1_bn")
        v = _conv1x1(v, 512, p + "conv2")
        v = ContextNorm(name=p + "conv2_cn")(v)
        v = _bn(v, p + "conv2_bn")
        v = layers.Reshape((-1, 512), name=p + "squeeze")(v)
        v = GridInterpolate(mode=interp, name=p + "interp")([kpt_xy, v, regional])
        v = layers.Concatenate(axis=-1, name=p + "concat")([v, local_feat])
        v = _to_points(v, p + "expand")
        for i, c in enumerate((512, 256, 128)):
            v = layers.Conv2D(c, 1, padding="valid", use_bias=False, name=f"{p}fuse_photo_context_{i}")(v)
            v = _bn(v, f"{p}fuse_photo_context_{i}_bn")
        terms.append(layers.Reshape((-1, 128), name=p + "feat")(v))

    p = "geo_context_"
    pts = layers.Concatenate(axis=-1, name=p + "points")([kpt_m, kpt_xy])
    pts = _to_points(pts, p + "expand")
    x = _conv1x1(pts, 128, p + "dim_control")
    for i in range(1, 5):
        y = ContextNorm(name=f"{p}cn{i}_cn1")([x, kpt_mask])
        y = _bn(y, f"{p}cn{i}_bn1")
        y = _conv1x1(y, 128, f"{p}cn{i}_conv1")
        x = layers.Add(name=f"{p}res{i}")([x, y])
    x = _conv1x1(x, 128, p + "context_trans")
    terms.append(layers.Reshape((-1, 128), name=p + "feat")(x))

    out = layers.Add(name="aug_sum", dtype="float32")(terms)
    out = L2Normalize(name="l2norm")(out)
    return keras.Model(inputs, {"l2norm": out}, name=name)


def geometric_only(model: keras.Model) -> keras.Model:
    """The geometric-only model with the geometric weights of a (visual) augmentation model."""
    interp = next((layer.mode for layer in model.layers if isinstance(layer, GridInterpolate)), "inverse_distance")
    geo = build_augment_model(visual=False, interp=interp)
    for layer in geo.layers:
        if layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    return geo
