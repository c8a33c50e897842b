"""Local model: L2-Net / GeoDesc layout with the ContextDesc matchability head (docs/contextdesc.md).

Input (N, 32, 32, 1) patches (raw or standardised: the model standardises each patch itself), outputs
``conv6_feat`` (N, 128, not normalised) and ``kpt_mb`` (N,) matchability in (-1, 1). Layer names follow the authors'
graphs (``conv0``..``conv6``, ``kpt_m_conv0..2``, ``kpt_m``, ``kpt_m_dense``) so imported weights map one to one.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers

BN_EPS = 1e-5  # Caffe's epsilon, as the original graphs


class PatchStandardize(layers.Layer):
    """(p - mean) / sqrt(var + eps) over the pixels of each patch."""

    def __init__(self, eps: float = 1e-5, **kw):
        kw.setdefault("dtype", "float32")  # statistics in float32 also under a mixed (bf16) policy
        super().__init__(**kw)
        self.eps = eps

    def call(self, x):
        x = tf.cast(x, tf.float32)
        mean, var = tf.nn.moments(x, axes=[1, 2, 3], keepdims=True)
        return (x - mean) / tf.sqrt(var + self.eps)

    def get_config(self):
        return {**super().get_config(), "eps": self.eps}


def conv_bn(x, filters, kernel, stride=1, padding="same", relu=True, name=None, fold_bn=False):
    """Convolution without bias, batch norm without centre/scale (eps 1e-5), ReLU.

    ``fold_bn``: the inference form, one convolution with bias (batch norm folded in by ``fold.fold_batchnorm``)."""
    if fold_bn:
        x = layers.Conv2D(filters, kernel, strides=stride, padding=padding, use_bias=True, name=name)(x)
        return layers.ReLU(name=f"{name}_relu")(x) if relu else x
    x = layers.Conv2D(filters, kernel, strides=stride, padding=padding, use_bias=False, name=name)(x)
    x = layers.BatchNormalization(center=False, scale=False, epsilon=BN_EPS, momentum=0.99, name=f"{name}_bn")(x)
    if relu:
        x = layers.ReLU(name=f"{name}_relu")(x)
    return x


def build_local_model(name: str = "contextdesc_local", fold_bn: bool = False) -> keras.Model:
    """The local model; ``fold_bn=True`` builds its inference form (batch norms folded into the convolutions, see
    ``cd_sfm.models.fold``), which has no BN layers and so cannot load the npz files directly."""
    f = fold_bn
    inp = keras.Input((32, 32, 1), name="input")
    x = PatchStandardize(name="standardize")(inp)
    x = conv_bn(x, 32, 3, name="conv0", fold_bn=f)
    x = conv_bn(x, 32, 3, name="conv1", fold_bn=f)
    x = conv_bn(x, 64, 3, stride=2, name="conv2", fold_bn=f)
    x = conv_bn(x, 64, 3, name="conv3", fold_bn=f)
    x = conv_bn(x, 128, 3, stride=2, name="conv4", fold_bn=f)
    c5 = conv_bn(x, 128, 3, name="conv5", fold_bn=f)
    feat = layers.Conv2D(128, 8, padding="valid", use_bias=False, name="conv6")(c5)
    feat = layers.Reshape((128,), name="conv6_feat")(feat)
    m = conv_bn(c5, 128, 8, padding="valid", name="kpt_m_conv0", fold_bn=f)
    m = conv_bn(m, 32, 1, name="kpt_m_conv1", fold_bn=f)
    m = conv_bn(m, 32, 1, name="kpt_m_conv2", fold_bn=f)
    m = layers.Conv2D(1, 1, use_bias=True, name="kpt_m")(m)
    m = layers.Reshape((1,), name="kpt_m_flat")(m)
    m = layers.Dense(1, name="kpt_m_dense")(m)
    m = layers.Activation("tanh", name="kpt_mb_tanh")(m)
    m = layers.Reshape((), name="kpt_mb")(m)
    return keras.Model(inp, {"conv6_feat": feat, "kpt_mb": m}, name=name)
