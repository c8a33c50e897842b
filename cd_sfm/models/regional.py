"""Regional model: caffe-style ResNet50 v1 feature map (docs/contextdesc.md, "Regional network").

Input (B, H, W, 3) RGB in 0..255 (longest side <= 1024 in use); the mean [124, 117, 104] is subtracted in the model,
no scaling. Output ``res5c``: the last residual sum *before* its ReLU, about (H/32, W/32, 2048).

Caffe-style: the stride-2 of stages 3..5 sits on the first 1x1 convolution of the block (``branch2a``) and on the
projection shortcut (``branch1``), not on the 3x3. Every convolution is "conv_bn" (no bias, batch norm without
centre/scale, epsilon 1e-5), TensorFlow SAME padding. Layer names are Caffe's (``conv1``, ``bn_conv1``, ``pool1``,
``res2a_branch1``, ``bn2a_branch1``, ``res2a_branch2a`` ... ``res5c``) so an importer can cross-check them; biases or
affine batch-norm parameters of an imported graph are folded exactly into these layers (see ``frozen.py``).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import layers

BN_EPS = 1e-5
RGB_MEAN = (124.0, 117.0, 104.0)
STAGES = ((2, 64, 3, 1), (3, 128, 4, 2), (4, 256, 6, 2), (5, 512, 3, 2))  # stage, width, blocks, stride
OUTPUT_STRIDE = 32
FEATURE_DIM = 2048


class SubtractMean(layers.Layer):
    def __init__(self, mean=RGB_MEAN, **kw):
        kw.setdefault("dtype", "float32")
        super().__init__(**kw)
        self.mean = tuple(float(m) for m in mean)

    def call(self, x):
        return tf.cast(x, tf.float32) - tf.constant(self.mean, tf.float32)

    def get_config(self):
        return {**super().get_config(), "mean": self.mean}


def _conv_bn(x, filters, kernel, stride, conv_name, bn_name, relu, fold_bn=False):
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=fold_bn, name=conv_name)(x)
    if not fold_bn:
        x = layers.BatchNormalization(center=False, scale=False, epsilon=BN_EPS, name=bn_name)(x)
    if relu:
        x = layers.ReLU(name=f"{conv_name}_relu")(x)
    return x


def _block(x, stage: int, block: str, width: int, stride: int, project: bool, last: bool, fold_bn: bool):
    tag, f = f"{stage}{block}", fold_bn
    if project:
        short = _conv_bn(x, 4 * width, 1, stride, f"res{tag}_branch1", f"bn{tag}_branch1", relu=False, fold_bn=f)
    else:
        short = x
    y = _conv_bn(x, width, 1, stride, f"res{tag}_branch2a", f"bn{tag}_branch2a", relu=True, fold_bn=f)
    y = _conv_bn(y, width, 3, 1, f"res{tag}_branch2b", f"bn{tag}_branch2b", relu=True, fold_bn=f)
    y = _conv_bn(y, 4 * width, 1, 1, f"res{tag}_branch2c", f"bn{tag}_branch2c", relu=False, fold_bn=f)
    out = layers.Add(name=f"res{tag}")([short, y])
    if not last:
        out = layers.ReLU(name=f"res{tag}_relu")(out)
    return out


def build_regional_model(name: str = "contextdesc_regional", fold_bn: bool = False) -> keras.Model:
    """The regional model; ``fold_bn=True`` builds its inference form (batch norms folded into the convolutions by
    ``cd_sfm.models.fold``)."""
    inp = keras.Input((None, None, 3), name="input")
    x = SubtractMean(name="sub_mean")(inp)
    x = _conv_bn(x, 64, 7, 2, "conv1", "bn_conv1", relu=True, fold_bn=fold_bn)
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="pool1")(x)
    for si, (stage, width, blocks, stride) in enumerate(STAGES):
        for b in range(blocks):
            last = si == len(STAGES) - 1 and b == blocks - 1
            x = _block(x, stage, "abcdef"[b], width, stride if b == 0 else 1, project=b == 0, last=last,
                       fold_bn=fold_bn)
    out = layers.Activation("linear", name="res5c_out", dtype="float32")(x)
    return keras.Model(inp, {"res5c": out}, name=name)


def regional_input_size(height: int, width: int, max_size: int = 1024) -> tuple[int, int]:
    """(h, w) the image is resized to before the regional model: longest side at most ``max_size``."""
    scale = min(1.0, max_size / max(height, width)) if max_size else 1.0
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def feature_map_size(height: int, width: int) -> tuple[int, int]:
    """Size of res5c for an input of (height, width): five SAME stride-2 steps."""
    h, w = height, width
    for _ in range(5):
        h, w = -(-h // 2), -(-w // 2)
    return h, w


def prepare_image(image: np.ndarray, max_size: int = 1024) -> np.ndarray:
    """RGB uint8 (H, W, 3) or gray (H, W) -> float32 (1, h, w, 3) input of the regional model."""
    import cv2

    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    h, w = regional_input_size(img.shape[0], img.shape[1], max_size)
    if (h, w) != img.shape[:2]:
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)  # as the original front end
    return img.astype(np.float32)[None]
