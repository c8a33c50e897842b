"""The int8 local model at run time: ``local_int8.tflite`` of a model folder (made by ``cd-sfm models quantize``,
:mod:`cd_sfm.modeltools.quantize`), its staleness check against ``local.npz`` and its runner.

The runner's engine (:func:`int8_engine`): OpenVINO where it is installed (a dependency; it reads the same TFLite
file and ran it 1.35-1.45x faster than TFLite's XNNPACK on a 2-core AVX2 CPU, same outputs to cosine 0.9999), else
TFLite (LiteRT's interpreter where ``ai-edge-litert`` is installed, else TensorFlow's). ``$CD_SFM_INT8_ENGINE``
(``openvino`` | ``tflite``) picks one.

The graph is the folded inference form of ``local.build_local_model`` without its ``PatchStandardize`` layer: the
runner standardises in numpy with the same formula (:func:`standardize`), so the integer ranges start from
unit-variance inputs.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import threading
from pathlib import Path

import numpy as np

from ..native_stderr import to_log as native_stderr_to_log
from ..io import CdSfmError, hash_file

logger = logging.getLogger(__name__)

INT8_FILE = "local_int8.tflite"
ENV_ENGINE = "CD_SFM_INT8_ENGINE"
ENGINES = ("openvino", "tflite")
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


def int8_engine(engine: str | None = None) -> str:
    """The engine that runs int8 local models here: ``engine`` or ``$CD_SFM_INT8_ENGINE`` if given, else "openvino"
    when it imports, else "tflite"."""
    engine = (engine or os.environ.get(ENV_ENGINE) or "").strip().lower()
    if engine and engine not in ENGINES:
        raise CdSfmError(f"int8 engine {engine!r} (${ENV_ENGINE}): expected one of {', '.join(ENGINES)}")
    if engine == "tflite":
        return engine
    try:
        importlib.import_module("openvino")
    except ImportError:
        if engine == "openvino":
            raise CdSfmError(f"int8 engine openvino (${ENV_ENGINE}): openvino is not installed (pip install openvino)")
        return "tflite"
    return "openvino"


def _descriptor_and_matchability(path, sizes: list[int]) -> tuple[int, int]:
    """Positions of the descriptor (128 values per patch) and the matchability (1) among a model's outputs, given
    each output's values per patch; a clear error for any other layout."""
    if len(sizes) != 2:
        raise CdSfmError(f"{path}: expected 2 outputs (descriptor, matchability), found {len(sizes)}")
    if sorted(sizes) != [1, 128]:
        raise CdSfmError(f"{path}: outputs are not (N, 128) and (N,)")
    return sizes.index(128), sizes.index(1)


_OV_CORE = None
_OV_LOCK = threading.Lock()


def _openvino_core():
    global _OV_CORE
    with _OV_LOCK:
        if _OV_CORE is None:
            import openvino as ov

            _OV_CORE = ov.Core()
        return _OV_CORE


class _OpenVinoNet:
    """``local_int8.tflite`` compiled by OpenVINO for this CPU (dynamic batch, ``threads`` threads, one stream, no
    thread pinning: two nets of one thread each, as two images at a time use them, would otherwise share a core)."""

    def __init__(self, path: Path, threads: int):
        core = _openvino_core()
        try:
            model = core.read_model(str(path))
            self._compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                                                               "INFERENCE_NUM_THREADS": int(threads),
                                                               "ENABLE_CPU_PINNING": False})
        except RuntimeError as e:
            raise CdSfmError(f"{path}: not a TFLite model OpenVINO can run ({str(e).strip().splitlines()[0]})") from e
        outs = self._compiled.outputs
        f, m = _descriptor_and_matchability(
            path, [int(np.prod([d.get_length() for d in o.get_partial_shape()[1:]])) for o in outs])
        self._feat, self._mb = outs[f], outs[m]
        self._req = self._compiled.create_infer_request()

    def __call__(self, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r = self._req.infer({0: chunk})
        return r[self._feat].reshape(-1, 128), r[self._mb].reshape(-1)


class Int8Local:
    """Runs ``local_int8.tflite``: ``(patches) -> (conv6_feat (N, 128), kpt_mb (N,))`` float32, like the Keras model.

    Patches go through in chunks of ``batch_size`` (TFLite: the interpreter is resized to a chunk's size; full chunks
    keep one allocation). ``threads``: 0 = the cores this process may use. ``engine``: see :func:`int8_engine`."""

    def __init__(self, path, threads: int = 0, batch_size: int = 256, engine: str | None = None):
        import warnings

        from .runner import available_cores

        self.path = Path(path)
        self.threads = int(threads)
        self.batch_size = int(batch_size)
        try:
            with open(self.path, "rb") as f:
                self.engine = int8_engine(engine)
                # OpenVINO reads the file itself; TFLite takes its bytes
                content = f.read() if self.engine == "tflite" else b""
        except OSError as e:
            raise CdSfmError(f"{self.path}: cannot read the int8 local model ({e.strerror or e})") from e
        if self.engine == "openvino":
            self._ov = _OpenVinoNet(self.path, int(threads) or available_cores())
            return
        self._ov = None
        cls = _interpreter_class()
        with warnings.catch_warnings(), native_stderr_to_log():
            warnings.simplefilter("ignore")
            try:
                self._it = cls(model_content=content, num_threads=int(threads) or available_cores())
            except (ValueError, RuntimeError) as e:
                raise CdSfmError(f"{self.path}: not a TFLite model ({str(e).splitlines()[0]})") from e
            self._in = self._it.get_input_details()[0]["index"]
            self._it.resize_tensor_input(self._in, (1, 32, 32, 1))
            self._it.allocate_tensors()
        outs = self._it.get_output_details()
        f, m = _descriptor_and_matchability(self.path, [int(np.prod(o["shape"][1:])) for o in outs])
        self._feat, self._mb = outs[f]["index"], outs[m]["index"]
        self._size = 1

    def __call__(self, patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = standardize(patches)
        n = len(x)
        feat = np.empty((n, 128), np.float32)
        mb = np.empty((n,), np.float32)
        for i in range(0, n, self.batch_size):
            chunk = x[i : i + self.batch_size]
            if self._ov is not None:
                feat[i : i + len(chunk)], mb[i : i + len(chunk)] = self._ov(chunk)
                continue
            if len(chunk) != self._size:
                self._it.resize_tensor_input(self._in, chunk.shape)
                self._it.allocate_tensors()
                self._size = len(chunk)
            self._it.set_tensor(self._in, chunk)
            self._it.invoke()
            feat[i : i + len(chunk)] = self._it.get_tensor(self._feat).reshape(-1, 128)
            mb[i : i + len(chunk)] = self._it.get_tensor(self._mb).reshape(-1)
        return feat, mb


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
