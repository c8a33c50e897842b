"""Descriptor losses for the local model.

- :func:`scale_aware_npair_loss`: ContextDesc's N-pair loss. Cosine similarity matrix of a batch of matching pairs
  (anchors x positives), multiplied by a learnable scale (the softmax temperature, so no margin to tune), softmax
  cross-entropy along rows and columns with the matching pair as the class. *Scale-aware*: each pair's term is weighted
  by the keypoint scale ratio r = max(s_a, s_p) / min(s_a, s_p) of the pair, w = 1 / (1 + log2 r) (pairs whose two
  keypoints disagree in scale are less reliable supervision), and pairs with r > ``max_ratio`` are filtered out.
- :func:`hardest_triplet_loss`: HardNet's hardest-in-batch triplet loss (margin 1) on L2-normalised descriptors.
- :func:`matchability_loss`: binary target = whether the anchor's in-batch nearest neighbour among the positives is its
  own positive (descriptors under stop-gradient), binary cross-entropy on (kpt_mb + 1) / 2.

``ids`` (optional, (B,) int) marks pairs of the same physical keypoint: such off-diagonal entries are not negatives.
"""

from __future__ import annotations

import tensorflow as tf

_BIG = 1e4


def l2_normalize(x):
    return tf.math.l2_normalize(x, axis=-1, epsilon=1e-12)


def _same_id_mask(ids, b):
    """(B, B) float mask of off-diagonal entries that share an id (false negatives)."""
    if ids is None:
        return tf.zeros((b, b), tf.float32)
    same = tf.cast(tf.equal(ids[:, None], ids[None, :]), tf.float32)
    return same - tf.eye(b)


def scale_ratio_weights(scales, max_ratio: float = 4.0):
    """(B,) weights from the (B, 2) keypoint sizes of each pair: 1 / (1 + log2 r), 0 beyond ``max_ratio``."""
    scales = tf.cast(scales, tf.float32)
    log2r = tf.abs(tf.math.log(scales[:, 0] / scales[:, 1])) / tf.math.log(2.0)
    w = 1.0 / (1.0 + log2r)
    if max_ratio:
        w = tf.where(log2r > tf.math.log(float(max_ratio)) / tf.math.log(2.0), tf.zeros_like(w), w)
    return w


def scale_aware_npair_loss(anc, pos, log_scale, scales=None, ids=None, max_ratio: float = 4.0):
    """Scale-aware N-pair loss. ``anc``, ``pos``: (B, D) raw descriptors (normalised here); ``log_scale``: scalar
    (learnable) log of the similarity scale; ``scales``: (B, 2) keypoint sizes or None (plain N-pair).

    Returns (loss, accuracy): accuracy is the in-batch top-1 rate (row and column) of the matching pair."""
    a, p = l2_normalize(anc), l2_normalize(pos)
    b = tf.shape(a)[0]
    sim = tf.matmul(a, p, transpose_b=True)
    logits = tf.exp(log_scale) * sim - _BIG * _same_id_mask(ids, b)
    labels = tf.range(b)
    loss_row = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    loss_col = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=tf.transpose(logits))
    per_pair = 0.5 * (loss_row + loss_col)
    if scales is not None:
        w = scale_ratio_weights(scales, max_ratio)
        loss = tf.reduce_sum(per_pair * w) / (tf.reduce_sum(w) + 1e-6)
    else:
        loss = tf.reduce_mean(per_pair)
    return loss, in_batch_accuracy(sim, ids)


def hardest_triplet_loss(anc, pos, ids=None, margin: float = 1.0):
    """HardNet: for each pair, the hardest negative over its row and column, max(0, margin + d(a,p) - d_neg)."""
    a, p = l2_normalize(anc), l2_normalize(pos)
    b = tf.shape(a)[0]
    sim = tf.matmul(a, p, transpose_b=True)
    dist = tf.sqrt(tf.maximum(2.0 - 2.0 * sim, 0.0) + 1e-6)
    d_pos = tf.linalg.diag_part(dist)
    masked = dist + 10.0 * (tf.eye(b) + _same_id_mask(ids, b))
    d_neg = tf.minimum(tf.reduce_min(masked, axis=1), tf.reduce_min(masked, axis=0))
    loss = tf.reduce_mean(tf.maximum(margin + d_pos - d_neg, 0.0))
    return loss, in_batch_accuracy(sim, ids)


def distillation_loss(student_feat, teacher_feat, b):
    """Distillation of a teacher's descriptors (issue 13's compact student): ``1 - cos`` of every student descriptor
    with the teacher's of the same patch, plus the squared difference of the two anchor-positive cosine matrices of
    the batch (the similarities matching ranks), both averaged. ``b``: the number of pairs (anchors first)."""
    s, t = l2_normalize(student_feat), l2_normalize(teacher_feat)
    point = tf.reduce_mean(1.0 - tf.reduce_sum(s * t, axis=-1))
    sim_s = tf.matmul(s[:b], s[b:], transpose_b=True)
    sim_t = tf.matmul(t[:b], t[b:], transpose_b=True)
    return point + tf.reduce_mean(tf.square(sim_s - sim_t))


def nn_is_positive(anc, pos, ids=None):
    """(B,) bool: the nearest positive of each anchor (cosine similarity) is its own."""
    a, p = l2_normalize(tf.stop_gradient(anc)), l2_normalize(tf.stop_gradient(pos))
    b = tf.shape(a)[0]
    sim = tf.matmul(a, p, transpose_b=True) - 10.0 * _same_id_mask(ids, b)
    return tf.equal(tf.argmax(sim, axis=1, output_type=tf.int32), tf.range(b))


def matchability_loss(kpt_mb, anc, pos, ids=None):
    """BCE between (kpt_mb + 1)/2 of the anchors and whether each anchor's in-batch nearest neighbour is its positive."""
    target = tf.cast(nn_is_positive(anc, pos, ids), tf.float32)
    prob = tf.clip_by_value((tf.cast(kpt_mb, tf.float32) + 1.0) / 2.0, 1e-6, 1.0 - 1e-6)
    return tf.reduce_mean(-(target * tf.math.log(prob) + (1.0 - target) * tf.math.log(1.0 - prob)))


def in_batch_accuracy(sim, ids=None):
    """Mean of row- and column-wise top-1 rates of the diagonal in a (B, B) similarity matrix."""
    b = tf.shape(sim)[0]
    sim = sim - 10.0 * _same_id_mask(ids, b)
    labels = tf.range(b)
    row = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(sim, 1, output_type=tf.int32), labels), tf.float32))
    col = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(sim, 0, output_type=tf.int32), labels), tf.float32))
    return 0.5 * (row + col)
