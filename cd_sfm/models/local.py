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


# Channel widths: conv0..conv5 of the trunk, then kpt_m_conv0..2 of the matchability head. ``official`` is the authors'
# layout (39 M multiply-adds per patch; imported weights always use it); ``compact`` a student of a quarter of the
# trunk's width per layer pair (about 10 M multiply-adds), distilled from an official-layout teacher (issue 13);
# ``mini`` half of compact's trunk width again (2.8 M multiply-adds, 3.2x compact's int8 speed on an AVX2 CPU).
ARCHS = {
    "official": (32, 32, 64, 64, 128, 128, 128, 32, 32),
    "compact": (16, 16, 32, 32, 64, 64, 64, 32, 32),
    "mini": (8, 8, 16, 16, 32, 32, 32, 32, 32),
}
_WIDTH_LAYERS = ("conv0", "conv1", "conv2", "conv3", "conv4", "conv5", "kpt_m_conv0", "kpt_m_conv1", "kpt_m_conv2")


def arch_widths(arch: str | tuple | list | None) -> tuple:
    """The widths of ``arch``: a name of :data:`ARCHS`, a tuple of 9 widths, or None (official)."""
    if arch is None:
        return ARCHS["official"]
    if isinstance(arch, str):
        if arch not in ARCHS:
            raise ValueError(f"unknown local architecture {arch!r}; known: {', '.join(ARCHS)}")
        return ARCHS[arch]
    widths = tuple(int(w) for w in arch)
    if len(widths) != len(_WIDTH_LAYERS) or min(widths) < 1:
        raise ValueError(f"a local architecture has {len(_WIDTH_LAYERS)} positive widths, not {arch!r}")
    return widths


def arch_name(widths) -> str:
    widths = tuple(widths)
    return next((k for k, v in ARCHS.items() if v == widths), ",".join(map(str, widths)))


def widths_of_arrays(shapes: dict) -> tuple:
    """The widths of a weight file (``{key: shape}`` of ``layer/kernel`` entries, as ``weights.save_weights_npz``
    writes them)."""
    try:
        return tuple(int(shapes[f"{n}/kernel"][-1]) for n in _WIDTH_LAYERS)
    except KeyError as e:
        raise ValueError(f"not local-model weights (no {e.args[0]})") from None


def widths_of_model(model: keras.Model) -> tuple:
    return tuple(int(model.get_layer(n).filters) for n in _WIDTH_LAYERS)


def builder_for(model: keras.Model):
    """A builder (``fold_bn=...`` keyword, as :func:`build_local_model`) of models with ``model``'s widths: what the
    inference runner uses for its folded / bf16 twins."""
    import functools

    return functools.partial(build_local_model, arch=widths_of_model(model))


def load_local_model(path) -> keras.Model:
    """The fp32 local model of a ``local.npz`` of any architecture (its widths read from the file)."""
    from ..io import read_npz
    from .weights import load_weights_npz

    arrays = read_npz(path)
    try:
        widths = widths_of_arrays({k: v.shape for k, v in arrays.items()})
    except ValueError as e:
        from ..io import CdSfmError

        raise CdSfmError(f"{path}: {e}") from None
    model = build_local_model(arch=widths)
    load_weights_npz(model, path)
    return model


def multiply_adds(arch=None) -> int:
    """Multiply-adds per 32x32 patch of the local model of ``arch`` (trunk, descriptor and matchability head)."""
    c = arch_widths(arch)
    sizes = (32, 32, 16, 16, 8, 8)
    total, cin = 0, 1
    for w, s in zip(c[:6], sizes):
        total += s * s * 9 * cin * w
        cin = w
    total += 64 * c[5] * 128  # conv6: 8x8 VALID -> 128
    total += 64 * c[5] * c[6] + c[6] * c[7] + c[7] * c[8] + c[8]  # matchability head
    return total


def build_local_model(name: str = "contextdesc_local", fold_bn: bool = False, arch=None) -> keras.Model:
    """The local model; ``fold_bn=True`` builds its inference form (batch norms folded into the convolutions, see
    ``cd_sfm.models.fold``), which has no BN layers and so cannot load the npz files directly. ``arch``: a name of
    :data:`ARCHS` or a tuple of widths (default: the official layout)."""
    f = fold_bn
    c = arch_widths(arch)
    inp = keras.Input((32, 32, 1), name="input")
    x = PatchStandardize(name="standardize")(inp)
    x = conv_bn(x, c[0], 3, name="conv0", fold_bn=f)
    x = conv_bn(x, c[1], 3, name="conv1", fold_bn=f)
    x = conv_bn(x, c[2], 3, stride=2, name="conv2", fold_bn=f)
    x = conv_bn(x, c[3], 3, name="conv3", fold_bn=f)
    x = conv_bn(x, c[4], 3, stride=2, name="conv4", fold_bn=f)
    c5 = conv_bn(x, c[5], 3, name="conv5", fold_bn=f)
    feat = layers.Conv2D(128, 8, padding="valid", use_bias=False, name="conv6")(c5)
    feat = layers.Reshape((128,), name="conv6_feat")(feat)
    m = conv_bn(c5, c[6], 8, padding="valid", name="kpt_m_conv0", fold_bn=f)
    m = conv_bn(m, c[7], 1, name="kpt_m_conv1", fold_bn=f)
    m = conv_bn(m, c[8], 1, name="kpt_m_conv2", fold_bn=f)
    m = layers.Conv2D(1, 1, use_bias=True, name="kpt_m")(m)
    m = layers.Reshape((1,), name="kpt_m_flat")(m)
    m = layers.Dense(1, name="kpt_m_dense")(m)
    m = layers.Activation("tanh", name="kpt_mb_tanh")(m)
    m = layers.Reshape((), name="kpt_mb")(m)
    return keras.Model(inp, {"conv6_feat": feat, "kpt_mb": m}, name=name)
