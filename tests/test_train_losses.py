import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from cd_sfm.train import losses


def _pairs(b=64, d=128, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(b, d)).astype(np.float32)
    p = a + noise * rng.normal(size=(b, d)).astype(np.float32)
    return tf.constant(a), tf.constant(p), tf.constant(rng.normal(size=(b, d)).astype(np.float32))


def test_npair_perfect_lower_than_random_and_finite_grads():
    a, p, r = _pairs()
    scales = tf.constant(np.full((64, 2), 5.0, np.float32))
    log_scale = tf.Variable(2.3)
    good, acc_good = losses.scale_aware_npair_loss(a, p, log_scale, scales)
    bad, acc_bad = losses.scale_aware_npair_loss(a, r, log_scale, scales)
    assert float(good) < float(bad)
    assert float(acc_good) == 1.0 and float(acc_bad) < 0.2
    x = tf.Variable(r)
    with tf.GradientTape() as tape:
        loss, _ = losses.scale_aware_npair_loss(a, x, log_scale, scales)
    g = tape.gradient(loss, [x, log_scale])
    assert all(np.isfinite(v.numpy()).all() for v in g)


def test_scale_weights_filter_and_ids_mask():
    w = losses.scale_ratio_weights(tf.constant([[2.0, 2.0], [2.0, 4.0], [1.0, 8.0]]), max_ratio=4.0).numpy()
    assert w[0] == pytest.approx(1.0) and w[1] == pytest.approx(0.5) and w[2] == 0.0
    # two pairs of the same keypoint are not each other's negatives
    a, p, _ = _pairs(b=8)
    a = tf.concat([a[:1], a[1:]], 0)
    p2 = tf.concat([p[:1], p[:1], p[2:]], 0)  # pair 1 has the positive of pair 0
    ids = tf.constant([0, 0, 2, 3, 4, 5, 6, 7])
    l_mask, _ = losses.scale_aware_npair_loss(tf.concat([a[:1], a[:1], a[2:]], 0), p2, tf.constant(2.3), None, ids)
    l_nomask, _ = losses.scale_aware_npair_loss(tf.concat([a[:1], a[:1], a[2:]], 0), p2, tf.constant(2.3), None, None)
    assert float(l_mask) < float(l_nomask)


def test_triplet_perfect_lower_than_random_and_finite_grads():
    a, p, r = _pairs()
    good, _ = losses.hardest_triplet_loss(a, p)
    bad, _ = losses.hardest_triplet_loss(a, r)
    assert float(good) < float(bad)
    x = tf.Variable(r)
    with tf.GradientTape() as tape:
        loss, _ = losses.hardest_triplet_loss(a, x)
    assert np.isfinite(tape.gradient(loss, x).numpy()).all()


def test_matchability_loss_targets():
    a, p, r = _pairs(b=32)
    mb_conf = tf.fill((32,), 0.99)
    mb_unconf = tf.fill((32,), -0.99)
    # all nearest neighbours correct: confident matchability is cheap, unconfident is expensive
    assert float(losses.matchability_loss(mb_conf, a, p)) < float(losses.matchability_loss(mb_unconf, a, p))
    mb = tf.Variable(tf.zeros(32))
    with tf.GradientTape() as tape:
        loss = losses.matchability_loss(mb, a, r)
    assert np.isfinite(tape.gradient(loss, mb).numpy()).all()
