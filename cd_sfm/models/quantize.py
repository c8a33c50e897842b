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

import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from ..io import CdSfmError, hash_file, open_h5

logger = logging.getLogger(__name__)

INT8_FILE = "local_int8.tflite"
INT8_META = "local_int8.json"
STANDARDIZE_EPS = 1e-5  # PatchStandardize's


def file_sha256(path) -> str:
    return hash_file(hashlib.sha256(), path).hexdigest()


def standardize(patches: np.ndarray) -> np.ndarray:
    """(N, 32, 32[, 1]) -> (N, 32, 32, 1) float32, (p - mean) / sqrt(var + eps) per patch, as ``PatchStandardize``."""
    x = np.asarray(patches, np.float32).reshape(-1, 32, 32, 1)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    var = x.var(axis=(1, 2, 3), keepdims=True)
    return (x - mean) / np.sqrt(var + STANDARDIZE_EPS)


def _tower(model):
    """Keras model (N, 32, 32, 1) standardised patches -> (conv6_feat (N, 128), kpt_mb (N,)) from the folded twin of
    the fp32 local ``model`` (shares its layers)."""
    import keras

    from .fold import fold_batchnorm
    from .local import builder_for

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


_STDERR_SWAP = threading.Lock()  # fd 2 is process-wide: one swap at a time, or a second one saves the first's file


@contextlib.contextmanager
def _native_stderr_to_log():
    """Send what native code writes to stderr inside the block to the log instead: TFLite prints "INFO: Created
    TensorFlow Lite XNNPACK delegate for CPU." there, past Python's logging (kept at debug; anything else a warning).
    Blocks of several threads run one after the other (the block only builds an interpreter), so the real stderr is
    always the one saved and restored."""
    with _STDERR_SWAP:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (AttributeError, OSError, ValueError):
            yield
            return
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                tmp.seek(0)
                for line in tmp.read().decode(errors="replace").splitlines():
                    if line.strip():
                        (logger.debug if "XNNPACK delegate" in line else logger.warning)("%s", line)


def _interpreter_class():
    """LiteRT's interpreter where installed (``ai-edge-litert``), else TensorFlow's ``tf.lite.Interpreter``."""
    try:
        from ai_edge_litert.interpreter import Interpreter  # type: ignore

        return Interpreter
    except ImportError:
        import warnings

        import tensorflow as tf

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tf.lite.Interpreter


class Int8Local:
    """Runs ``local_int8.tflite``: ``(patches) -> (conv6_feat (N, 128), kpt_mb (N,))`` float32, like the Keras model.

    Patches go through in chunks of ``batch_size`` (the interpreter is resized to a chunk's size; full chunks keep one
    allocation). ``threads``: 0 = the cores this process may use."""

    def __init__(self, path, threads: int = 0, batch_size: int = 256):
        import warnings

        from .runner import available_cores

        self.path = Path(path)
        self.threads = int(threads)
        try:
            content = self.path.read_bytes()
        except OSError as e:
            raise CdSfmError(f"{self.path}: cannot read the int8 local model ({e.strerror or e})") from e
        cls = _interpreter_class()
        with warnings.catch_warnings(), _native_stderr_to_log():
            warnings.simplefilter("ignore")
            try:
                self._it = cls(model_content=content, num_threads=int(threads) or available_cores())
            except (ValueError, RuntimeError) as e:
                raise CdSfmError(f"{self.path}: not a TFLite model ({str(e).splitlines()[0]})") from e
            self._in = self._it.get_input_details()[0]["index"]
            outs = self._it.get_output_details()
            if len(outs) != 2:
                raise CdSfmError(f"{self.path}: expected 2 outputs (descriptor, matchability), found {len(outs)}")
            self._it.resize_tensor_input(self._in, (1, 32, 32, 1))
            self._it.allocate_tensors()
        # which output is which: the descriptor has 128 values per patch
        by_size = {int(np.prod(o["shape"][1:])): o["index"] for o in self._it.get_output_details()}
        if set(by_size) != {1, 128}:
            raise CdSfmError(f"{self.path}: outputs are not (N, 128) and (N,)")
        self._feat, self._mb = by_size[128], by_size[1]
        self.batch_size = int(batch_size)
        self._size = 1

    def __call__(self, patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = standardize(patches)
        n = len(x)
        feat = np.empty((n, 128), np.float32)
        mb = np.empty((n,), np.float32)
        for i in range(0, n, self.batch_size):
            chunk = x[i : i + self.batch_size]
            if len(chunk) != self._size:
                self._it.resize_tensor_input(self._in, chunk.shape)
                self._it.allocate_tensors()
                self._size = len(chunk)
            self._it.set_tensor(self._in, chunk)
            self._it.invoke()
            feat[i : i + len(chunk)] = self._it.get_tensor(self._feat).reshape(-1, 128)
            mb[i : i + len(chunk)] = self._it.get_tensor(self._mb).reshape(-1)
        return feat, mb


def agreement(model, int8: Int8Local, patches: np.ndarray) -> dict:
    """Cosine of the int8 descriptors to the float model's on ``patches``, and the largest matchability difference."""
    import tensorflow as tf

    from .runner import l2_normalize

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


def int8_path(folder, local_npz=None) -> Path | None:
    """The folder's ``local_int8.tflite`` when it was made from its current ``local.npz``, else None (a stale file is
    reported once in the log)."""
    folder = Path(folder)
    p = folder / INT8_FILE
    if not p.is_file():
        return None
    local_npz = Path(local_npz) if local_npz else folder / "local.npz"
    try:
        meta = json.loads((folder / INT8_META).read_text())
        ok = meta.get("local_sha256") == file_sha256(local_npz)
    except (OSError, ValueError):
        ok = False
    if not ok:
        logger.warning("%s: made from other local weights than %s (or %s is missing); ignored - rerun `cd-sfm models "
                       "quantize`", p, local_npz.name, INT8_META)
        return None
    return p


def quantize_folder(folder, calibration: np.ndarray, source: str, holdout: float = 0.25) -> dict:
    """Write ``local_int8.tflite`` + ``local_int8.json`` into a model folder holding ``local.npz``; returns the meta.

    The last ``holdout`` share of ``calibration`` is kept out of the calibration and measures the agreement."""
    from .local import load_local_model

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
    from . import registry

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
