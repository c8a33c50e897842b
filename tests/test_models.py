"""Shapes and normalisation of the three Keras models."""

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from cd_sfm.models.augment import GridInterpolate, build_augment_model  # noqa: E402
from cd_sfm.models.local import build_local_model  # noqa: E402
from cd_sfm.models.regional import build_regional_model, feature_map_size, prepare_image  # noqa: E402


@pytest.fixture(scope="module")
def local_model():
    return build_local_model()


def _aug_inputs(n, rng, regional=(3, 4)):
    return {
        "local_feat": rng.normal(0, 1, (1, n, 128)).astype(np.float32),
        "kpt_m": rng.uniform(-1, 1, (1, n, 1)).astype(np.float32),
        "kpt_xy": rng.uniform(-1, 1, (1, n, 2)).astype(np.float32),
        "kpt_mask": np.ones((1, n), np.float32),
        "regional_feat": rng.normal(0, 1, (1, *regional, 2048)).astype(np.float32),
    }


def test_local_shapes_and_standardisation(local_model):
    rng = np.random.default_rng(0)
    p = rng.normal(0, 1, (5, 32, 32, 1)).astype(np.float32)
    out = local_model(p)
    assert tuple(out["conv6_feat"].shape) == (5, 128) and tuple(out["kpt_mb"].shape) == (5,)
    mb = np.asarray(out["kpt_mb"])
    assert np.all(np.abs(mb) < 1)
    # the model standardises each patch itself: affine changes of the intensities do not matter
    out2 = local_model(p * 7.0 + 100.0)
    assert np.allclose(out["conv6_feat"], out2["conv6_feat"], atol=1e-4)
    names = {layer.name for layer in local_model.layers}
    assert {"conv0", "conv5", "conv6", "kpt_m_conv0", "kpt_m_conv2", "kpt_m", "kpt_m_dense"} <= names


@pytest.mark.parametrize("visual", [True, False])
def test_augment_shapes_normalised(visual):
    model = build_augment_model(visual=visual)
    rng = np.random.default_rng(1)
    inp = _aug_inputs(37, rng)
    if not visual:
        inp.pop("regional_feat")
        assert "regional_feat" not in {i.name for i in model.inputs}
    out = np.asarray(model(inp)["l2norm"])
    assert out.shape == (1, 37, 128)
    assert np.allclose(np.linalg.norm(out, axis=-1), 1, atol=1e-5)


def test_augment_padding_is_masked_out():
    model = build_augment_model(visual=True)
    rng = np.random.default_rng(2)
    n, pad = 50, 14
    inp = _aug_inputs(n, rng)
    ref = np.asarray(model(inp)["l2norm"])[0]
    padded = {k: v for k, v in inp.items()}
    for k in ("local_feat", "kpt_m", "kpt_xy"):
        padded[k] = np.concatenate([inp[k], rng.normal(0, 5, (1, pad, inp[k].shape[-1])).astype(np.float32)], 1)
    padded["kpt_mask"] = np.concatenate([np.ones((1, n)), np.zeros((1, pad))], 1).astype(np.float32)
    out = np.asarray(model(padded)["l2norm"])[0, :n]
    assert np.abs(out - ref).max() < 1e-5


def _interp_reference(xy, feats, h, w, mode):
    gx, gy = np.meshgrid(np.linspace(-1, 1, w), np.linspace(-1, 1, h))
    grid = np.stack([gx.ravel(), gy.ravel()], -1)
    out = []
    for p in xy:  # a per-keypoint loop: the reference may loop
        d = np.sqrt(np.sum((grid - p) ** 2, -1) + 1e-6)
        idx = np.argsort(d)[:3]
        wts = 1 / np.maximum(d[idx], 1e-10) if mode == "inverse_distance" else np.ones(3)
        out.append((wts[:, None] * feats[idx]).sum(0) / wts.sum())
    return np.array(out)


@pytest.mark.parametrize("mode", ["inverse_distance", "uniform"])
def test_grid_interpolation_reference(mode):
    rng = np.random.default_rng(3)
    h, w, n = 3, 5, 20
    xy = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
    feats = rng.normal(0, 1, (h * w, 8)).astype(np.float32)
    layer = GridInterpolate(mode=mode)
    out = np.asarray(layer([xy[None], feats[None], np.zeros((1, h, w, 1), np.float32)]))[0]
    assert np.abs(out - _interp_reference(xy, feats, h, w, mode)).max() < 1e-4


def test_regional_shape_and_no_final_relu():
    model = build_regional_model()
    img = prepare_image(np.random.default_rng(4).integers(0, 255, (70, 100, 3)).astype(np.uint8))
    out = np.asarray(model(img)["res5c"])
    assert out.shape == (1, *feature_map_size(70, 100), 2048) == (1, 3, 4, 2048)
    assert out.min() < 0  # res5c is taken before the last ReLU
    names = {layer.name for layer in model.layers}
    assert {"conv1", "bn_conv1", "res2a_branch1", "bn5c_branch2c", "res5c"} <= names
    big = prepare_image(np.zeros((1500, 2000, 3), np.uint8), max_size=1024)
    assert big.shape == (1, 768, 1024, 3)


def test_folded_inference_form_equals_model(local_model):
    from cd_sfm.models.fold import fold_batchnorm

    rng = np.random.default_rng(5)
    for layer in local_model.layers:  # non-trivial batch-norm statistics
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.set_weights([rng.normal(0, 0.2, c), rng.uniform(0.5, 2.0, c)])
    folded = build_local_model(fold_bn=True)
    assert fold_batchnorm(local_model, folded) == 9
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    p = rng.normal(0, 1, (6, 32, 32, 1)).astype(np.float32)
    a, b = local_model(p), folded(p)
    assert np.abs(np.asarray(a["conv6_feat"]) - np.asarray(b["conv6_feat"])).max() < 1e-4
    assert np.abs(np.asarray(a["kpt_mb"]) - np.asarray(b["kpt_mb"])).max() < 1e-5
    reg, reg_f = build_regional_model(), build_regional_model(fold_bn=True)
    assert fold_batchnorm(reg, reg_f) == 53
    img = prepare_image(rng.integers(0, 255, (64, 64, 3)).astype(np.uint8))
    ra, rb = np.asarray(reg(img)["res5c"]), np.asarray(reg_f(img)["res5c"])
    assert np.abs(ra - rb).max() <= 1e-5 * max(1.0, np.abs(ra).max())
