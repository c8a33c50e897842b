"""Small frozen graphs with the official tensor names, written in raw TF1 ops (variables, tf.nn ops, fused batch
norm, ``convert_variables_to_constants``) the way the authors' graphs are built, from random weights. Test helper,
not a test module: ``build_local_graph(path)``, ``build_augment_graph(path)``, ``build_regional_graph(path)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

v1 = tf.compat.v1


class _Vars:
    def __init__(self, seed: int, decomposed_bn: bool = False):
        self.rng = np.random.default_rng(seed)
        self.decomposed_bn = decomposed_bn  # tf.nn.batch_normalization (Mul + Add) instead of FusedBatchNorm

    def var(self, name, value):
        return v1.get_variable(name, initializer=np.asarray(value, np.float32), use_resource=False)

    def conv(self, x, name, k, cout, stride=1, padding="SAME", bias=True, gain=1.0):
        cin = int(x.shape[-1])
        with v1.variable_scope(name):
            w = self.var("kernel", self.rng.normal(0, gain * np.sqrt(1.0 / (k * k * cin)), (k, k, cin, cout)))
            y = tf.nn.conv2d(x, w, [1, stride, stride, 1], padding)
            if bias:
                y = tf.nn.bias_add(y, self.var("bias", self.rng.normal(0, 0.1, cout)))
        return y

    def bn(self, x, name, relu=True, affine=False, gamma_scale=1.0):
        c = int(x.shape[-1])
        with v1.variable_scope(name):
            mean = self.var("moving_mean", self.rng.normal(0, 0.1, c))
            var = self.var("moving_variance", self.rng.uniform(0.5, 1.5, c))
            if affine:
                gamma = self.var("gamma", gamma_scale * self.rng.uniform(0.5, 1.0, c))
                beta = self.var("beta", self.rng.normal(0, 0.1, c))
            else:
                gamma, beta = tf.ones([c]), tf.zeros([c])
            if self.decomposed_bn:
                y = tf.nn.batch_normalization(x, mean, var, beta, gamma, 1e-5)
            else:
                y, _, _ = v1.nn.fused_batch_norm(x, gamma, beta, mean, var, epsilon=1e-5, is_training=False)
        return tf.nn.relu(y) if relu else y

    def conv_bn(self, x, name, k, cout, stride=1, padding="SAME", relu=True):
        return self.bn(self.conv(x, name, k, cout, stride, padding, bias=False), name + "/bn", relu=relu)


def _freeze(graph, outputs, path):
    with v1.Session(graph=graph) as sess:
        sess.run(v1.global_variables_initializer())
        gd = v1.graph_util.convert_variables_to_constants(sess, graph.as_graph_def(), outputs)
    Path(path).write_bytes(gd.SerializeToString())
    return Path(path)


def _cn(x, eps=1e-5):
    mean, var = tf.nn.moments(x, axes=[1], keepdims=True)
    return (x - mean) / tf.sqrt(var + eps)


def build_local_graph(path, seed: int = 0, decomposed_bn: bool = False):
    g = tf.Graph()
    with g.as_default():
        V = _Vars(seed, decomposed_bn)
        inp = v1.placeholder(tf.float32, (None, 32, 32, 1), name="input")
        mean, var = tf.nn.moments(inp, axes=[1, 2, 3], keepdims=True)
        x = (inp - mean) / tf.sqrt(var + 1e-5)
        for i, (c, s) in enumerate(((32, 1), (32, 1), (64, 2), (64, 1), (128, 2), (128, 1))):
            x = V.conv_bn(x, f"conv{i}", 3, c, s)
        f = V.conv(x, "conv6", 8, 128, padding="VALID", bias=False)
        f = tf.reshape(f, (-1, 128))
        tf.identity(f, name="conv6_feat")
        tf.nn.l2_normalize(f, axis=-1, name="l2norm_feat")
        with v1.variable_scope("kpt_m"):
            m = V.conv_bn(x, "kpt_m_conv0", 8, 128, padding="VALID")
            m = V.conv_bn(m, "kpt_m_conv1", 1, 32)
            m = V.conv_bn(m, "kpt_m_conv2", 1, 32)
            m = V.conv(m, "kpt_m", 1, 1, padding="VALID", bias=True)
            with v1.variable_scope("dense"):
                w = V.var("kernel", V.rng.normal(0, 1.0, (1, 1)))
                b = V.var("bias", V.rng.normal(0, 0.1, (1,)))
                m = tf.nn.bias_add(tf.tensordot(m, w, axes=[[3], [0]]), b)
            m = tf.tanh(m)
        tf.reshape(m, (-1,), name="kpt_mb")
    return _freeze(g, ["conv6_feat", "kpt_mb", "l2norm_feat"], path)


def build_augment_graph(path, seed: int = 0, uniform_weights: bool = False, visual: bool = True,
                        decomposed_bn: bool = False):
    """``uniform_weights`` clamps the negated top-k values as in the authors' code (all weights 1/3)."""
    g = tf.Graph()
    with g.as_default():
        V = _Vars(seed, decomposed_bn)
        with tf.name_scope("input"):
            local = v1.placeholder(tf.float32, (1, None, 128), name="local_feat")
            regional = v1.placeholder(tf.float32, (1, None, None, 2048), name="regional_feat")
            kpt_m = v1.placeholder(tf.float32, (1, None, 1), name="kpt_m")
            kpt_xy = v1.placeholder(tf.float32, (1, None, 2), name="kpt_xy")
        terms = [local]
        if visual:
            with v1.variable_scope("vis_context"):
                v = tf.reshape(regional, (1, -1, 1, 2048))
                v = V.conv(v, "conv1", 1, 1024)
                v = V.bn(_cn(v), "conv1_bn")
                v = V.conv(v, "conv2", 1, 512)
                v = V.bn(_cn(v), "conv2_bn")
                v = tf.squeeze(v, axis=2)
                h, w = tf.shape(regional)[1], tf.shape(regional)[2]
                gx, gy = tf.meshgrid(tf.linspace(-1.0, 1.0, w), tf.linspace(-1.0, 1.0, h))
                grid = tf.reshape(tf.stack([gx, gy], axis=-1), (1, -1, 2))
                d = tf.matmul(kpt_xy, grid, transpose_b=True)
                n1 = tf.reduce_sum(kpt_xy * kpt_xy, axis=-1, keepdims=True)
                n2 = tf.reduce_sum(grid * grid, axis=-1, keepdims=True)
                d = tf.sqrt(n1 - 2 * d + tf.linalg.matrix_transpose(n2) + 1e-6)
                vals, idx = tf.math.top_k(tf.negative(d), k=3)
                dist = tf.maximum(vals if uniform_weights else tf.negative(vals), 1e-10)
                inv = 1.0 / dist
                weight = inv / tf.reduce_sum(inv, axis=2, keepdims=True)
                nn = tf.gather(v, idx, batch_dims=1)
                inter = tf.reduce_sum(weight[..., None] * nn, axis=-2)
                x = tf.expand_dims(tf.concat([inter, local], axis=-1), 2)
                for i, c in enumerate((512, 256, 128)):
                    x = V.conv_bn(x, f"fuse_photo_context_{i}", 1, c, padding="VALID")
                terms.append(tf.squeeze(x, axis=2))
        with v1.variable_scope("geo_context"):
            pts = tf.expand_dims(tf.concat([kpt_m, kpt_xy], axis=-1), 2)
            x = V.conv(pts, "dim_control", 1, 128)
            for i in range(1, 5):
                y = V.bn(_cn(x), f"cn{i}_bn1")
                y = V.conv(y, f"cn{i}_conv1", 1, 128)
                x = tf.add(x, y, name=f"res{i}")
            x = V.conv(x, "context_trans", 1, 128)
            terms.append(tf.squeeze(x, axis=2))
        tf.nn.l2_normalize(tf.add_n(terms), axis=-1, name="l2norm")
    return _freeze(g, ["l2norm"], path)


def build_regional_graph(path, seed: int = 0, conv1_bias: bool = True, affine: bool = True,
                         decomposed_bn: bool = False):
    """Caffe-converted style: a bias on conv1 and affine batch norms (both folded by the importer)."""
    g = tf.Graph()
    with g.as_default():
        V = _Vars(seed, decomposed_bn)
        inp = v1.placeholder(tf.float32, (1, None, None, 3), name="input")
        x = inp - tf.constant([124.0, 117.0, 104.0])

        def cbn(x, conv, bn, k, c, s, relu, bias=False, gamma_scale=1.0):
            y = V.conv(x, conv, k, c, s, bias=bias, gain=np.sqrt(2.0))
            return V.bn(y, bn, relu=relu, affine=affine, gamma_scale=gamma_scale)

        x = cbn(x, "conv1", "bn_conv1", 7, 64, 2, True, bias=conv1_bias)
        x = tf.nn.max_pool2d(x, 3, 2, "SAME", name="pool1")
        for stage, width, blocks, stride in ((2, 64, 3, 1), (3, 128, 4, 2), (4, 256, 6, 2), (5, 512, 3, 2)):
            for b in range(blocks):
                t = f"{stage}{'abcdef'[b]}"
                s = stride if b == 0 else 1
                short = cbn(x, f"res{t}_branch1", f"bn{t}_branch1", 1, 4 * width, s, False) if b == 0 else x
                y = cbn(x, f"res{t}_branch2a", f"bn{t}_branch2a", 1, width, s, True)
                y = cbn(y, f"res{t}_branch2b", f"bn{t}_branch2b", 3, width, 1, True)
                y = cbn(y, f"res{t}_branch2c", f"bn{t}_branch2c", 1, 4 * width, 1, False, gamma_scale=0.3)
                x = tf.add(short, y, name=f"res{t}")
                if t != "5c":
                    x = tf.nn.relu(x, name=f"res{t}_relu")
    return _freeze(g, ["res5c"], path)
