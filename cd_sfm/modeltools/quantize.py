"""int8 form of the local model: full-integer post-training quantisation to a TFLite flatbuffer, and its runner.

The local network is 80% of ContextDesc's extraction time and already runs near the bf16 peak of a CPU without AMX.
Integer arithmetic (AVX512-VNNI / AVX-VNNI, or AVX2's 16-bit multiply-add elsewhere) through TFLite's XNNPACK
kernels is the remaining speed-up: weights int8 per output channel, activations int8 per tensor with ranges
calibrated on real patches; input and output stay float32 (the model quantises and dequantises at its ends).

The quantised file ``local_int8.tflite`` sits beside ``local.npz`` in a model folder, with ``local_int8.json``
recording the SHA-256 of the ``local.npz`` it was made from (a file made from other weights is ignored as stale),
the calibration source and the agreement with the float model on held-out calibration patches.
``cd-sfm models quantize NAME`` makes it; ``precision: int8`` (or ``auto`` when the file exists) uses it.

The graph is the folded inference form of ``local.build_local_model`` without its ``PatchStandardize`` layer: the
runner standardises in numpy with the same formula, so the integer ranges start from unit-variance inputs.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from ..io import CdSfmError, open_h5
from ..models.int8 import INT8_FILE, INT8_META, Int8Local, file_sha256, standardize

logger = logging.getLogger(__name__)


def _tower(model):
    """Keras model (N, 32, 32, 1) standardised patches -> (conv6_feat (N, 128), kpt_mb (N,)) from the folded twin of
    the fp32 local ``model`` (shares its layers)."""
    import keras

    from ..models.fold import fold_batchnorm
    from ..models.local import builder_for

    folded = builder_for(model)(fold_bn=True)
    fold_batchnorm(model, folded)
    inp = keras.Input((32, 32, 1), name="patches")
    names = [layer.name for layer in folded.layers]
    start = names.index("standardize") + 1
    tensors = {"standardize": inp}
    for layer in folded.layers[start:]:
        nodes = layer._inbound_nodes[0].parent_nodes
        args = [tensors[n.operation.name] for n in nodes]
        tensors[layer.name] = layer(args[0] if len(args) == 1 else args)
    return keras.Model(inp, [tensors["conv6_feat"], tensors["kpt_mb"]], name="local_tower")


def convert(model, calibration: np.ndarray, batch: int = 64) -> bytes:
    """Full-integer TFLite flatbuffer of the local ``model`` (fp32 Keras, as loaded from ``local.npz``), activation
    ranges calibrated on ``calibration`` patches (N, 32, 32[, 1], raw or standardised)."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    cal = standardize(calibration)
    if len(cal) == 0:
        raise CdSfmError("int8 quantisation: no calibration patches")
    tower = _tower(model)
    fn = tf.function(lambda x: tower(x, training=False))
    frozen = convert_variables_to_constants_v2(fn.get_concrete_function(tf.TensorSpec((None, 32, 32, 1), tf.float32)))
    conv = tf.lite.TFLiteConverter.from_concrete_functions([frozen])
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([cal[i : i + batch]] for i in range(0, len(cal), batch))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    import warnings

    with warnings.catch_warnings():  # "Statistics for quantized inputs were expected": float input, by design
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
        return conv.convert()


def agreement(model, int8: Int8Local, patches: np.ndarray) -> dict:
    """Cosine of the int8 descriptors to the float model's on ``patches``, and the largest matchability difference."""
    import tensorflow as tf

    from ..geometry import l2_normalize

    x = standardize(patches)
    ref = model(tf.constant(x), training=False)
    m32 = np.asarray(ref["kpt_mb"], np.float32).reshape(-1)
    f8, m8 = int8(x)
    cos = (l2_normalize(ref["conv6_feat"]) * l2_normalize(f8)).sum(1)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "matchability_max_abs": float(np.abs(m32 - m8).max()), "patches": int(len(x))}


# --------------------------------------------------------------------------------------------------------------------
# calibration patches


def patches_from_images(paths, num: int = 4096, seed: int = 0, max_keypoints: int = 2048,
                        max_image_size: int = 1600) -> np.ndarray:
    """``num`` patches sampled evenly over the SIFT keypoints of the images at ``paths`` (raw, standardised later)."""
    from ..features.patches import SiftDetectorConf, detect_sift, extract_patches, to_gray
    from ..images import read_image

    paths = [Path(p) for p in paths]
    if not paths:
        raise CdSfmError("int8 quantisation: no calibration images")
    per = max(1, -(-num // len(paths)))
    rng = np.random.default_rng(seed)
    out = []
    for p in paths:
        img = read_image(p, max_size=max_image_size)[0]
        gray = to_gray(np.asarray(img))
        kp = detect_sift(gray, SiftDetectorConf(max_keypoints=max_keypoints))
        if not len(kp["keypoints"]):
            continue
        idx = rng.choice(len(kp["keypoints"]), size=min(per, len(kp["keypoints"])), replace=False)
        out.append(extract_patches(gray, kp["keypoints"][idx], kp["scales"][idx], kp["angles"][idx]))
    if not out:
        raise CdSfmError(f"int8 quantisation: no SIFT keypoints in the {len(paths)} calibration image(s)")
    pts = np.concatenate(out)
    return pts[rng.permutation(len(pts))[:num]]


def patches_from_h5(path, num: int = 4096, seed: int = 0) -> np.ndarray:
    """``num`` training patches (not the validation ones) of a ``cd-sfm train`` patch file (``patches`` (N, 2, 32, 32),
    ``is_val``)."""
    with open_h5(path, ("patches",), "`cd-sfm train` patch file", "patch file not found") as f:
        n = len(f["patches"])
        train = np.flatnonzero(~f["is_val"][:]) if "is_val" in f else np.arange(n)
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(train, size=min(num, len(train)), replace=False))
        return np.asarray(f["patches"][idx][:, 0], np.float32)


# --------------------------------------------------------------------------------------------------------------------
# model folders


def quantize_folder(folder, calibration: np.ndarray, source: str, holdout: float = 0.25) -> dict:
    """Write ``local_int8.tflite`` + ``local_int8.json`` into a model folder holding ``local.npz``; returns the meta.

    The last ``holdout`` share of ``calibration`` is kept out of the calibration and measures the agreement."""
    from ..models.local import load_local_model

    folder = Path(folder)
    npz = folder / "local.npz"
    if not npz.is_file():
        raise CdSfmError(f"{folder}: no local.npz to quantise")
    model = load_local_model(npz)
    calibration = np.asarray(calibration, np.float32)
    k = max(1, int(len(calibration) * (1 - holdout)))
    t = time.perf_counter()
    content = convert(model, calibration[:k])
    fd, tmp = tempfile.mkstemp(prefix=".local_int8.", suffix=".tflite", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide a shared model from other users
        held = calibration[k:] if len(calibration) > k else calibration
        agree = agreement(model, Int8Local(tmp), held)
        meta = {"local_sha256": file_sha256(npz), "calibration": source, "calibration_patches": k,
                "agreement_on_held_out": agree, "created": time.strftime("%Y-%m-%d"),
                "seconds": round(time.perf_counter() - t, 1)}
        from ..io import atomic_write_text

        os.replace(tmp, folder / INT8_FILE)
        atomic_write_text(folder / INT8_META, json.dumps(meta, indent=2) + "\n")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("%s: int8 local model, cosine to float %.4f (min %.4f) on %d held-out patches", folder / INT8_FILE,
                agree["cosine_mean"], agree["cosine_min"], agree["patches"])
    return meta


def quantize_model(name, images=None, patches=None, num: int = 4096, seed: int = 0) -> dict:
    """``cd-sfm models quantize``: calibrate on ``num`` patches of the images in folder ``images`` or of a training
    patch file ``patches`` and write the int8 local model into the folder of registry model ``name``."""
    from ..models import registry

    entry = registry.resolve(name)
    if (images is None) == (patches is None):
        raise CdSfmError("models quantize: give --images DIR (photos like the ones you will reconstruct) or --patches "
                         "H5 (a `cd-sfm train` patch file)")
    if images is not None:
        folder = Path(images)
        if not folder.is_dir():
            raise CdSfmError(f"{folder}: not a folder of images")
        from ..images import list_images

        paths = [folder / name for name in list_images(folder)]
        cal = patches_from_images(paths, num=num, seed=seed)
        source = f"{len(cal)} patches of {len(paths)} images in {folder.name}/ (seed {seed})"
    else:
        cal = patches_from_h5(patches, num=num, seed=seed)
        source = f"{len(cal)} training patches of {Path(patches).name} (seed {seed})"
    if not os.access(entry.folder, os.W_OK):
        raise CdSfmError(f"{entry.folder}: model folder is not writable")
    return quantize_folder(entry.folder, cal, source)


def cmd_quantize(args) -> int:
    meta = quantize_model(args.name, images=args.images, patches=args.patches, num=args.num_patches, seed=args.seed)
    a = meta["agreement_on_held_out"]
    print(f"{args.name}: wrote {INT8_FILE} (calibrated on {meta['calibration']}); descriptor cosine to float "
          f"{a['cosine_mean']:.4f} (min {a['cosine_min']:.4f}) on {a['patches']} held-out patches")
    return 0
