"""Progress bars that suit where the output goes: tqdm on a terminal, a log line now and then elsewhere.

tqdm redraws its bar with carriage returns; written to a file (``cd-sfm reconstruct ... 2> run.log``, a CI log, a
batch system) that becomes one endless line of frames. :func:`tqdm` (a drop-in for ``tqdm.tqdm``) therefore returns
the usual bar when stderr is a terminal and otherwise a :class:`LogBar`: the same counting, but each refresh is a
plain ``logging`` line (``extract: 40/120 img (33 %), 00:21 elapsed, 00:42 left, 1.9 img/s``) at most every
:data:`LOG_INTERVAL` seconds, plus the final one. ``disable=True`` (``-q``) still silences both.
"""

from __future__ import annotations

import io
import logging
import sys

from tqdm import tqdm as _tqdm

logger = logging.getLogger("cd_sfm.progress")

LOG_INTERVAL = 30.0  # seconds between log lines of a bar that is not on a terminal
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f} %), {elapsed} elapsed, {remaining} left, {rate_fmt}"
LOG_FORMAT_NO_TOTAL = "{desc}: {n_fmt} {unit}, {elapsed} elapsed, {rate_fmt}"


def on_terminal(stream=None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


class LogBar(_tqdm):
    """A tqdm that logs a line per refresh (refreshes at most every ``mininterval`` seconds) instead of drawing."""

    def __init__(self, *args, **kwargs):
        kwargs["file"] = io.StringIO()  # tqdm's own drawing goes nowhere
        kwargs.setdefault("mininterval", LOG_INTERVAL)
        kwargs["maxinterval"] = max(float(kwargs.get("maxinterval") or 0), kwargs["mininterval"])
        kwargs["miniters"] = 1
        self._logged = None
        self._opened = False
        super().__init__(*args, **kwargs)
        self._opened = True

    def display(self, msg=None, pos=None):
        if not self._opened or self.disable or self.n == self._logged or self.n == 0:
            return True  # nothing at creation or after a reset (0 %), nothing twice
        self._logged = self.n
        d = self.format_dict
        fmt = LOG_FORMAT if d.get("total") else LOG_FORMAT_NO_TOTAL
        d["bar_format"] = fmt
        logger.info("%s", self.format_meter(**d))
        return True

    def close(self):
        if not self.disable and self._opened and self.n != self._logged:
            self.display()
        self._opened = False
        super().close()


def tqdm(*args, **kwargs):
    """``tqdm.tqdm`` on a terminal (or when disabled), a :class:`LogBar` otherwise."""
    if kwargs.get("disable") or on_terminal(kwargs.get("file")):
        return _tqdm(*args, **kwargs)
    kwargs.pop("file", None)
    kwargs.pop("dynamic_ncols", None)
    return LogBar(*args, **kwargs)
