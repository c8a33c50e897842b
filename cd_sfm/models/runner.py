"""Fast inference of the three ContextDesc models: ``tf.function`` with fixed signatures, padded batches, CPU threads,
optional XLA and a bf16 path.

* local: patches go through the model in fixed batches of ``batch_size`` (the last one zero-padded), so the graph is
  traced once for every image;
* augmentation: keypoints are padded to a bucket size (``max_keypoints``, or the next multiple of 1024) with a mask
  that keeps the padding out of the context normalisation, the regional map has a dynamic (h, w): one trace;
* regional: one dynamic (1, H, W, 3) signature.

bf16: a second copy of each model built under Keras' ``mixed_bfloat16`` policy (weights and normalisation statistics
stay float32). It is used only when the CPU has AMX or AVX512-BF16 (read from ``/proc/cpuinfo`` at run time); oneDNN
then runs the convolutions in bf16. Elsewhere the request falls back to fp32 with a warning.

int8: the local model runs as its quantised TFLite form (``quantize.py``, ``local_int8.tflite`` of the model folder; run
by OpenVINO where installed, else TFLite: ``int8.py``);
augmentation and regional models run in bf16 where the CPU has it, else fp32. ``auto`` picks int8 when the model has
an up-to-date int8 file (except on CPUs where int8 was not measured faster - AMX, where oneDNN runs bf16 on the
matrix units, or no AVX512-VNNI with TFLite as the engine: there it times int8 and the float form once with
``probe_local_speed`` and keeps the faster), else bf16 when the CPU computes it natively, else fp32.

:class:`LiteRunner`: where the local network runs as int8 without a probe and no regional network is in use (the
shipped models), the int8 network and the geometric-only augmentation in numpy (``augment_numpy``), the same
descriptors without importing TensorFlow (:func:`int8_without_probe`; chosen by ``ContextDescBackend``).
"""

from __future__ import annotations

import logging
import os
import threading
from functools import lru_cache

import numpy as np

from . import PRECISIONS

logger = logging.getLogger(__name__)

_PROBES: dict = {}  # (int8 file, float precision, threads) -> probe_local_speed result, once per process
_THREADS_SET = False


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def bf16_support() -> str | None:
    """'AMX' or 'AVX512-BF16' when the CPU computes bf16 natively, else None."""
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    return None


def resolve_precision(precision: str, int8_available: bool = False) -> str:
    """fp32 | bf16 | int8 as run here: ``auto`` is int8 when ``int8_available``, else bf16 where the CPU computes it
    natively, else fp32; an explicit bf16 on a CPU without bf16 falls back to fp32 with a warning."""
    from ..io import CdSfmError

    if precision not in PRECISIONS:
        raise CdSfmError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return "fp32"
    if precision == "int8" or precision == "auto" and int8_available:
        if not int8_available:
            raise CdSfmError("precision int8: this model has no int8 local model (make one with `cd-sfm models "
                             "quantize NAME`)")
        from .int8 import int8_engine

        logger.info("int8 local model (%s)", {"openvino": "OpenVINO", "tflite": "TFLite"}[int8_engine()])
        return "int8"
    hw = bf16_support()
    if hw is None:
        if precision == "bf16":
            logger.warning("bf16 requested but this CPU has neither AMX nor AVX512-BF16: using fp32")
        return "fp32"
    logger.info("bf16 inference (%s)", hw)
    return "bf16"


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def configure_threads(n: int | None = None) -> None:
    """Match TensorFlow's thread pools to the cores this process may use (only possible before TF starts)."""
    global _THREADS_SET
    if _THREADS_SET:
        return
    import tensorflow as tf

    n = n or available_cores()
    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, n))
        logger.debug("TensorFlow threads: intra %d, inter %d", n, min(2, n))
    except RuntimeError:
        logger.debug("TensorFlow already initialised; thread pools left as they are")
    _THREADS_SET = True


def build_with_policy(builder, policy: str | None, *args, **kw):
    """Build a Keras model under a dtype policy (e.g. ``mixed_bfloat16``), restoring the global policy after."""
    import keras

    if not policy:
        return builder(*args, **kw)
    old = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        return builder(*args, **kw)
    finally:
        keras.config.set_dtype_policy(old)


def inference_twin(model, builder, policy: str | None, fold_bn: bool):
    """The form of ``model`` that inference runs: with ``fold_bn`` the builder's ``fold_bn=True`` model with the batch
    norms folded in, else (under a dtype ``policy``) a copy; built under ``policy``. None: ``model`` itself serves."""
    from .fold import fold_batchnorm

    if fold_bn:
        twin = build_with_policy(builder, policy, fold_bn=True)
        fold_batchnorm(model, twin)
        return twin
    if policy:
        twin = build_with_policy(builder, policy)
        twin.set_weights(model.get_weights())
        return twin
    return None


def int8_measured_faster() -> bool:
    """Whether this CPU is of the kind where the int8 local network was measured faster than the float one: AVX512-VNNI
    without AMX (TFLite: 1.6x bf16, 3x fp32 on Zen 4), or AVX2 without AMX when OpenVINO runs it (1.55x fp32 on an
    AVX2-only Zen 3, where TFLite's int8 was no faster than fp32). Elsewhere (AMX, where oneDNN runs bf16 on the
    matrix units; TFLite without VNNI) ``auto`` times both once (``probe_local_speed``)."""
    from .int8 import int8_engine

    flags = cpu_flags()
    if "amx_bf16" in flags:
        return False
    return "avx512_vnni" in flags or "avx2" in flags and int8_engine() == "openvino"


def probe_local_speed(int8_path, local_model, builder, float_precision: str = "bf16", threads: int | None = None,
                      fold_bn: bool = True, n: int = 1024, batch: int = 256, repeats: int = 2) -> dict:
    """Patches/s of the local network on this CPU as the int8 TFLite model and as the Keras model in
    ``float_precision`` (bf16: the fp32 ``local_model`` copied into a ``mixed_bfloat16`` twin; fp32), on ``n`` random
    patches after a warm-up; ``choice`` is the faster of "int8" and ``float_precision``."""
    import tensorflow as tf

    from .int8 import Int8Local

    x = np.random.default_rng(0).normal(size=(n, 32, 32, 1)).astype(np.float32)
    policy = "mixed_bfloat16" if float_precision == "bf16" else None
    twin = inference_twin(local_model, builder, policy, fold_bn) or local_model
    fn = tf.function(lambda a: twin(a, training=False))
    net = Int8Local(int8_path, threads=threads or 0, batch_size=batch)

    def run_float():
        for i in range(0, n, batch):
            fn(x[i : i + batch])["conv6_feat"].numpy()

    def run_int8():
        net(x)

    speed = {}
    for name, run in (("int8", run_int8), (float_precision, run_float)):
        run()  # warm-up (traces the float function)
        best = min(_timed(run) for _ in range(repeats))
        speed[name] = n / max(best, 1e-9)
    return {**speed, "choice": max(speed, key=speed.get)}


def _timed(fn) -> float:
    import time

    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _round_up(n: int, m: int) -> int:
    return max(m, -(-n // m) * m)


class _Int8Nets:
    """The int8 local network of a runner: one interpreter per calling thread and engine (they are not thread-safe),
    ``int8_threads`` threads each (0 = all cores); ``int8_engine`` None is ``int8.int8_engine()``'s choice (OpenVINO
    where installed), else "tflite" / "openvino"."""

    def _init_int8(self, int8_path, threads: int | None) -> None:
        self._int8_path = int8_path
        self._int8_tls = threading.local()
        self.int8_threads = int(threads or 0)
        self.int8_engine = None
        if self._int8_path is not None:
            self._int8_net()  # a bad file fails here, not in a worker thread

    def _int8_net(self, threads: int | None = None):
        """This thread's interpreter with ``threads`` threads (default ``int8_threads``; 0 = all cores)."""
        from .int8 import Int8Local

        threads = self.int8_threads if threads is None else int(threads)
        nets = getattr(self._int8_tls, "nets", None)
        if nets is None:
            nets = self._int8_tls.nets = {}
        key = (threads, self.int8_engine)
        if key not in nets:
            nets[key] = Int8Local(self._int8_path, threads=threads, engine=self.int8_engine)
        return nets[key]


class LiteRunner(_Int8Nets):
    """The runner of the int8 local network and the geometric-only augmentation (``augment_numpy``), without
    TensorFlow: what the shipped models need where int8 is the precision without a timing probe (see
    :func:`int8_without_probe`). Same interface as :class:`ContextDescRunner` (no regional model)."""

    probe = None
    float_precision = "fp32"  # the numpy augmentation
    has_regional = False

    def __init__(self, int8_path, augment=None, threads: int | None = None):
        """``augment``: a :class:`augment_numpy.GeometricAugment`, or None (raw local descriptors)."""
        self.precision = resolve_precision("int8", int8_path is not None)  # logs the engine
        self._init_int8(int8_path, threads)
        self._aug = augment
        self.models = {"local": None, **({"augment": None} if augment is not None else {})}

    @property
    def has_augment(self) -> bool:
        return self._aug is not None

    def local(self, patches: np.ndarray, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(patches, np.float32)
        if len(x) == 0:
            return np.zeros((0, 128), np.float32), np.zeros((0,), np.float32)
        return self._int8_net(threads)(x.reshape(len(x), 32, 32, 1))

    def regional(self, image: np.ndarray) -> np.ndarray:
        raise RuntimeError("no regional model loaded")

    def augment(self, local_feat: np.ndarray, kpt_m: np.ndarray, kpt_xy: np.ndarray,
                regional_map: np.ndarray | None = None) -> np.ndarray:
        if self._aug is None:
            raise RuntimeError("no augmentation model loaded")
        return self._aug(local_feat, kpt_m, kpt_xy)


def int8_without_probe(precision: str, int8_available: bool) -> bool:
    """Whether ``precision`` runs the local network as int8 here with no timing probe (``int8``, or ``auto`` on a CPU
    where int8 was measured faster; ``auto`` elsewhere times int8 against the float network first). Then a model
    without a regional network needs no TensorFlow (``LiteRunner``)."""
    if not int8_available:
        return False
    return precision == "int8" or precision == "auto" and int8_measured_faster()


class ContextDescRunner(_Int8Nets):
    """Runs given fp32 Keras models (``local`` required, ``augment`` and ``regional`` optional).

    ``builders`` maps the same keys to the functions that build each model; the local and regional builders take
    ``fold_bn=True`` for the inference form (batch norms folded into the convolutions, ``fold.py``), used unless
    ``fold_bn=False``. bf16 builds these copies under the ``mixed_bfloat16`` policy.

    Local batches: full chunks of ``batch_size`` patches, the last chunk zero-padded to the smallest of
    ``batch_size / 8, / 4, / 2, / 1`` that holds it, so the local function has at most four traces ever."""

    def __init__(self, models: dict, builders: dict | None = None, precision: str = "fp32", xla: bool = False,
                 batch_size: int = 1024, bucket: int = 4096, threads: int | None = None, fold_bn: bool = True,
                 int8_path=None):
        import tensorflow as tf

        configure_threads(threads)
        self.precision = resolve_precision(precision, int8_path is not None)
        self.probe = None
        if (self.precision == "int8" and not int8_without_probe(precision, True) and builders
                and builders.get("local") is not None):
            # a CPU where int8 was not measured faster (AMX: oneDNN's bf16 on the matrix units; no VNNI): time the
            # int8 and the float local network once and keep the faster
            float_precision = "bf16" if bf16_support() else "fp32"
            key = (str(int8_path), float_precision, threads or 0)
            if key not in _PROBES:  # once per process
                _PROBES[key] = probe_local_speed(int8_path, models["local"], builders["local"], float_precision,
                                                 threads=threads, fold_bn=fold_bn)
            self.probe = _PROBES[key]
            self.precision = self.probe["choice"]
            logger.info("precision auto: local network int8 %.0f patches/s, %s %.0f patches/s -> %s",
                        self.probe["int8"], float_precision, self.probe[float_precision], self.precision)
        self._init_int8(int8_path if self.precision == "int8" else None, threads)
        self.xla = bool(xla)
        self.batch_size = int(batch_size)
        self.bucket = int(bucket) if bucket else 1024
        self.models = dict(models)
        # the float models: bf16 when asked, and beside the int8 local model where the CPU computes bf16 natively
        float_bf16 = self.precision == "bf16" or self.precision == "int8" and bf16_support() is not None
        self.float_precision = "bf16" if float_bf16 else "fp32"  # the networks other than an int8 local one
        policy = "mixed_bfloat16" if float_bf16 else None
        builders = builders or {}
        for key, model in list(self.models.items()):
            if key == "local" and self._int8_path is not None:
                continue  # runs as the TFLite model
            builder = builders.get(key)
            if builder is None:
                if policy:
                    raise ValueError(f"bf16 needs the builder of the {key} model")
                continue
            twin = inference_twin(model, builder, policy, fold_bn and key in ("local", "regional"))
            if twin is not None:
                self.models[key] = twin
        self.visual = "augment" in self.models and "regional_feat" in {i.name for i in self.models["augment"].inputs}
        f32 = tf.float32
        local = self.models["local"]

        def run_local(x):
            out = local(x, training=False)
            return tf.cast(out["conv6_feat"], f32), tf.cast(out["kpt_mb"], f32)

        # no input signature: called only with the (at most four) bucket shapes of ``local()``
        self._local = tf.function(run_local, jit_compile=self.xla)
        self._regional = self._augment = None
        if "regional" in self.models:
            regional = self.models["regional"]

            def run_regional(img):
                return tf.cast(regional(img, training=False)["res5c"], f32)

            self._regional = tf.function(run_regional, input_signature=[tf.TensorSpec((1, None, None, 3), f32)],
                                         jit_compile=self.xla)
        if "augment" in self.models:
            aug = self.models["augment"]
            sig = [tf.TensorSpec((1, None, 128), f32), tf.TensorSpec((1, None, 1), f32),
                   tf.TensorSpec((1, None, 2), f32), tf.TensorSpec((1, None), f32)]
            if self.visual:
                sig.append(tf.TensorSpec((1, None, None, 2048), f32))

            def run_augment(local_feat, kpt_m, kpt_xy, mask, regional=None):
                inputs = {"local_feat": local_feat, "kpt_m": kpt_m, "kpt_xy": kpt_xy, "kpt_mask": mask}
                if regional is not None:
                    inputs["regional_feat"] = regional
                return tf.cast(aug(inputs, training=False)["l2norm"], f32)

            self._augment = tf.function(run_augment, input_signature=sig, jit_compile=self.xla)

    def _chunk_sizes(self, n: int) -> list[tuple[int, int]]:
        """(real, padded) sizes of the local-model calls for n patches."""
        B = self.batch_size
        out = [(B, B)] * (n // B)
        rest = n - B * (n // B)
        if rest:
            size = B
            while size // 2 >= rest and size // 2 >= max(B // 8, 1):
                size //= 2
            out.append((rest, size))
        return out

    @property
    def has_regional(self) -> bool:
        return self._regional is not None and self.visual

    @property
    def has_augment(self) -> bool:
        return self._augment is not None

    def local(self, patches: np.ndarray, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(N, 32, 32[, 1]) patches -> raw local descriptors (N, 128) float32 and matchability (N,).
        ``threads``: the int8 interpreter's threads for this call (default ``int8_threads``; 0 = all cores)."""
        x = np.asarray(patches, np.float32)
        n = len(x)
        if n == 0:
            return np.zeros((0, 128), np.float32), np.zeros((0,), np.float32)
        x = x.reshape(n, 32, 32, 1)
        if self._int8_path is not None:
            return self._int8_net(threads)(x)
        feats, mbs, i = [], [], 0
        for real, size in self._chunk_sizes(n):
            chunk = x[i : i + real]
            i += real
            if real < size:
                chunk = np.concatenate([chunk, np.zeros((size - real, 32, 32, 1), np.float32)])
            f, m = self._local(chunk)
            feats.append(f.numpy()[:real])
            mbs.append(m.numpy()[:real])
        return np.concatenate(feats), np.concatenate(mbs)

    def regional(self, image: np.ndarray) -> np.ndarray:
        """(1, H, W, 3) float32 RGB 0..255 (see ``regional.prepare_image``) -> (1, h, w, 2048)."""
        if self._regional is None:
            raise RuntimeError("no regional model loaded")
        return self._regional(np.asarray(image, np.float32)).numpy()

    def augment(self, local_feat: np.ndarray, kpt_m: np.ndarray, kpt_xy: np.ndarray,
                regional_map: np.ndarray | None = None) -> np.ndarray:
        """Augmented, L2-normalised descriptors (N, 128). ``kpt_xy`` already normalised to [-1, 1]."""
        n = len(local_feat)
        if n == 0:
            return np.zeros((0, 128), np.float32)
        size = self.bucket if n <= self.bucket else _round_up(n, 1024)
        pad = size - n
        lf = np.pad(np.asarray(local_feat, np.float32), ((0, pad), (0, 0)))[None]
        km = np.pad(np.asarray(kpt_m, np.float32).reshape(-1), (0, pad))[None, :, None]
        kx = np.pad(np.asarray(kpt_xy, np.float32).reshape(-1, 2), ((0, pad), (0, 0)))[None]
        mask = np.zeros((1, size), np.float32)
        mask[0, :n] = 1.0
        args = [lf, km, kx, mask]
        if self.visual:
            if regional_map is None:
                raise RuntimeError("this augmentation model needs a regional feature map")
            args.append(np.asarray(regional_map, np.float32).reshape((1,) + np.shape(regional_map)[-3:]))
        return self._augment(*args).numpy()[0, :n]
