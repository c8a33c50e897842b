"""Compact weight files for our Keras models: one ``.npz`` per model, arrays keyed by ``layer/variable``.

Shipped weights are stored as float16 (half the size, well inside the descriptor tolerance); loading casts back to the
model's dtype. Keys use the layer names of the authors' graphs, so the same files come out of an official import.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import keras
import numpy as np

from ..io import CdSfmError, read_npz


def _var_key(layer: keras.layers.Layer, var) -> str:
    return f"{layer.name}/{var.path.rsplit('/', 1)[-1]}"


def model_arrays(model: keras.Model) -> dict[str, np.ndarray]:
    out = {}
    for layer in model.layers:
        for var in layer.weights:
            out[_var_key(layer, var)] = np.asarray(var.numpy())
    return out


def save_weights_npz(model: keras.Model, path: str | Path, dtype: str | None = "float16", meta: dict | None = None):
    """Write all weights of ``model`` (trainable and BN statistics) atomically to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: (v.astype(dtype) if dtype else v) for k, v in model_arrays(model).items()}
    if meta is not None:
        arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    os.close(fd)
    try:
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_weights_npz(model: keras.Model, path: str | Path, strict: bool = True, allow_extra: bool = False) -> dict:
    """Load weights saved by ``save_weights_npz`` into ``model``; returns the stored metadata (or {}).

    ``strict``: every model weight must be in the file and (unless ``allow_extra``, e.g. the visual branch of an
    augmentation file loaded into the geometric-only model) every file entry must belong to the model."""
    arrays = read_npz(path)
    try:
        meta = json.loads(arrays.pop("__meta__").tobytes().decode()) if "__meta__" in arrays else {}
    except (ValueError, UnicodeDecodeError) as e:
        raise CdSfmError(f"{path}: unreadable metadata in the weights file ({e})") from None
    expected = set()
    for layer in model.layers:
        for var in layer.weights:
            key = _var_key(layer, var)
            expected.add(key)
            if key not in arrays:
                if strict:
                    raise KeyError(f"{path}: no weights for {key}")
                continue
            value = arrays[key]
            if tuple(value.shape) != tuple(var.shape):
                raise ValueError(f"{path}: {key} has shape {value.shape}, model expects {tuple(var.shape)}")
            var.assign(value.astype(var.dtype))
    extra = set(arrays) - expected
    if strict and extra and not allow_extra:
        raise KeyError(f"{path}: weights for layers the model does not have: {sorted(extra)[:5]}")
    return meta
