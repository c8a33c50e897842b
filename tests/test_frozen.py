"""Import of frozen graphs with the official tensor names (built by tests/cd_graphs.py from random weights) and parity
of our Keras models with the graphs themselves (tf.compat.v1 Session)."""

import numpy as np
import pytest

from cd_graphs import build_augment_graph, build_local_graph, build_regional_graph
from cd_sfm.modeltools import frozen


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    d = tmp_path_factory.mktemp("graphs")
    return {
        "local": build_local_graph(d / "loc.pb", seed=1),
        "aug": build_augment_graph(d / "aug.pb", seed=2),
        "aug_uniform": build_augment_graph(d / "aug_u.pb", seed=3, uniform_weights=True),
        "aug_geo": build_augment_graph(d / "aug_geo.pb", seed=4, visual=False),
    }


def test_local_import_parity(graphs):
    model, report = frozen.import_local(graphs["local"])
    assert report.pairs == 21 and not report.name_mismatches
    patches, _, _ = frozen.generated_patches(96)
    assert frozen.parity_local(graphs["local"], model, patches) < 1e-5
    # the imported weights really are the graph's (a fresh model is far off)
    from cd_sfm.models.local import build_local_model

    assert frozen.parity_local(graphs["local"], build_local_model(), patches) > 1e-2


@pytest.mark.parametrize("key,mode", [("aug", "inverse_distance"), ("aug_uniform", "uniform")])
def test_augment_import_parity(graphs, key, mode):
    model, report = frozen.import_augment(graphs[key])
    assert report.visual and report.interp == mode and report.pairs == 20 and not report.name_mismatches
    res = frozen.check_parity(aug_pb=graphs[key], aug_model=model, n=80)
    assert res["augment"] < 1e-5


def test_geometric_only_graph(graphs):
    model, report = frozen.import_augment(graphs["aug_geo"])
    assert report.visual is False and "regional_feat" not in {i.name for i in model.inputs}
    assert frozen.check_parity(aug_pb=graphs["aug_geo"], aug_model=model, n=50)["augment"] < 1e-5


def test_check_parity_local_and_augment_together(graphs):
    res = frozen.check_parity(local_pb=graphs["local"], aug_pb=graphs["aug"], n=64)
    assert res["local"] < 1e-5 and res["augment"] < 1e-5


def test_decomposed_batch_norm_graphs(tmp_path):
    """Batch norms written as tf.nn.batch_normalization (x * a + c, as Keras or hand-written graphs have them)."""
    loc = build_local_graph(tmp_path / "loc.pb", seed=7, decomposed_bn=True)
    aug = build_augment_graph(tmp_path / "aug.pb", seed=8, decomposed_bn=True)
    res = frozen.check_parity(local_pb=loc, aug_pb=aug, n=64)
    assert res["local"] < 1e-5 and res["augment"] < 1e-5


def test_wrong_graph_is_a_clear_error(graphs):
    with pytest.raises(frozen.FrozenImportError, match="l2norm"):
        frozen.import_augment(graphs["local"])
    with pytest.raises(frozen.FrozenImportError, match="conv6_feat"):
        frozen.import_local(graphs["aug"])
    from cd_sfm.io import CdSfmError

    with pytest.raises(CdSfmError, match="not found"):
        frozen.FrozenGraph("/nonexistent/loc.pb")


def test_layout_mismatch_is_reported(tmp_path):
    # a local graph whose conv4 has 96 channels instead of 128 cannot be imported
    import tensorflow as tf

    import cd_graphs

    v1 = tf.compat.v1
    g = tf.Graph()
    with g.as_default():
        V = cd_graphs._Vars(0)
        x = v1.placeholder(tf.float32, (None, 32, 32, 1), name="input")
        for i, (c, s) in enumerate(((32, 1), (32, 1), (64, 2), (64, 1), (96, 2), (128, 1))):
            x = V.conv_bn(x, f"conv{i}", 3, c, s)
        f = tf.reshape(V.conv(x, "conv6", 8, 128, padding="VALID", bias=False), (-1, 128))
        tf.identity(f, name="conv6_feat")
        tf.reshape(tf.tanh(tf.reduce_mean(x, axis=[1, 2, 3])), (-1,), name="kpt_mb")
    pb = cd_graphs._freeze(g, ["conv6_feat", "kpt_mb"], tmp_path / "bad.pb")
    with pytest.raises(frozen.FrozenImportError, match="parameter ops|does not fit"):
        frozen.import_local(pb)


def test_regional_import_parity_small(tmp_path):
    """Caffe-style ResNet50 with a conv1 bias and affine batch norms (folded on import), at 64x64."""
    pb = build_regional_graph(tmp_path / "retrieval_resnet50.pb", seed=5)
    model, report = frozen.import_regional(pb)
    assert report.pairs == 106 and not report.name_mismatches
    assert any("bias conv1" in f for f in report.folded)
    img = frozen.generated_image(64, 64, seed=1).astype(np.float32)
    d, rel = frozen.parity_regional(pb, model, img)
    assert rel < 1e-5, (d, rel)


@pytest.mark.slow
def test_regional_import_parity_full_size(tmp_path):
    pb = build_regional_graph(tmp_path / "retrieval_resnet50.pb", seed=6)
    model, _ = frozen.import_regional(pb)
    img = frozen.generated_image(768, 1024, seed=2).astype(np.float32)
    d, rel = frozen.parity_regional(pb, model, img)
    assert rel < 1e-5, (d, rel)


def test_graph_frozen_from_keras_tf2(tmp_path):
    """Another construction path: our Keras model traced by tf.function and frozen with
    convert_variables_to_constants_v2 (decomposed batch norms, Keras op names), official interface names."""
    import keras
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    from cd_sfm.models.local import build_local_model

    rng = np.random.default_rng(3)
    src = build_local_model()
    for layer in src.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.set_weights([rng.normal(0, 0.2, c), rng.uniform(0.5, 2.0, c)])

    @tf.function(input_signature=[tf.TensorSpec((None, 32, 32, 1), tf.float32, name="input")])
    def f(x):
        o = src(x, training=False)
        return {"conv6_feat": tf.identity(o["conv6_feat"], name="conv6_feat"),
                "kpt_mb": tf.identity(o["kpt_mb"], name="kpt_mb")}

    pb = tmp_path / "keras_loc.pb"
    pb.write_bytes(convert_variables_to_constants_v2(f.get_concrete_function()).graph.as_graph_def()
                   .SerializeToString())
    assert frozen.check_parity(local_pb=pb, n=64)["local"] < 1e-5
