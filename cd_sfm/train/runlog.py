"""Bookkeeping shared by the trainers (``train_local``, ``train_augment``): the run's CSV log, kept consistent with
its checkpoints on resume, and the learning-rate schedule (linear warm-up, then cosine decay)."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path


def read_log(path: Path, upto: int | None = None) -> list[dict]:
    """The rows of a run's ``log.csv`` (none when absent), only those up to step ``upto`` when given."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [r for r in rows if upto is None or int(r["step"]) <= upto]


def write_log(path: Path, rows: list[dict], fields) -> None:
    """Rewrite the log atomically (on resume: drop the rows written after the last checkpoint)."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in fields})
    os.replace(tmp, path)


def append_log(path: Path, row: dict, fields) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fields)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in fields})


def warmup_cosine(step: int, base: float, low: float, warmup: int, steps: int) -> float:
    """Linear warm-up to ``base`` over ``warmup`` steps, then cosine decay to ``low`` at ``steps``."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    return low + 0.5 * (base - low) * (1 + math.cos(math.pi * t))
