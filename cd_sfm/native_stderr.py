"""What native libraries write straight to the process's stderr (file descriptor 2), past Python's logging, sent to
the log instead, so that a run's stderr holds our own lines: one line for an error, as the CLI promises.

Two writers need it. TFLite prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." when an interpreter is
built. TensorFlow 2.21, on CPUs where it turns oneDNN on (AVX512 and newer), prints absl's "WARNING: All log
messages before absl::InitializeLog() is called are written to STDERR" and an ``I0000 ... port.cc] oneDNN custom
operations are on`` line twice while it is imported, whatever ``TF_CPP_MIN_LOG_LEVEL`` says (absl logs before its
initialisation regardless of level). :func:`quiet_import` wraps the import of such a package once;
:func:`to_log` wraps any block.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import os
import re
import sys
import tempfile
import threading

logger = logging.getLogger(__name__)

_SWAP = threading.Lock()  # fd 2 is process-wide: one swap at a time, or a second one saves the first's file
# informational lines of native code: absl / glog "I0000 00:00:..." lines, absl's note on its uninitialised logging,
# TFLite's "INFO: ..." lines; kept at debug level, anything else becomes a warning
_INFO = re.compile(r"^(I\d{4} |INFO: |WARNING: All log messages before absl::InitializeLog\(\))")


@contextlib.contextmanager
def to_log():
    """Send what native code writes to stderr inside the block to the log: informational lines at debug level,
    anything else as a warning. Blocks of several threads run one after the other (the blocks are short: building an
    interpreter, importing a package), so the real stderr is always the one saved and restored."""
    with _SWAP:
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
                        (logger.debug if _INFO.match(line) else logger.warning)("%s", line)


class _QuietImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for the named top-level packages it hands back the usual spec with the loader's
    ``exec_module`` run inside :func:`to_log`, once each, then takes itself off ``sys.meta_path``."""

    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.names:
            return None
        self.names.discard(fullname)
        if not self.names and self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def quiet_exec(module):
            with to_log():
                exec_module(module)

        loader.exec_module = quiet_exec
        return spec


def quiet_import(*names: str) -> None:
    """The first import of each of these top-level packages (not yet imported) writes its native stderr to the log
    (:func:`to_log`). Costs nothing until then, and nothing is imported here."""
    todo = [n for n in names if n not in sys.modules]
    finder = next((f for f in sys.meta_path if isinstance(f, _QuietImport)), None)
    if finder is not None:
        finder.names.update(todo)  # a second call adds its packages to the hook already in place
    elif todo:
        sys.meta_path.insert(0, _QuietImport(todo))
