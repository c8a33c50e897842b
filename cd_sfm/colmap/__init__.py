"""COLMAP back end: database writing (``database``), two-view geometric verification (``verify``) and mapping
(``mapping``), all through pycolmap. Each module has an hloc-style ``main(conf, ...)`` and a ``confs``/``default_conf``.
"""

import logging as _logging


def quiet_colmap(level: int | None = None) -> None:
    """Route COLMAP's glog output according to Python's logging level (INFO logs only under ``-v``)."""
    import pycolmap

    if level is None:
        level = _logging.getLogger("cd_sfm").getEffectiveLevel()
    # glog: 0 INFO, 1 WARNING, 2 ERROR
    pycolmap.logging.minloglevel = 0 if level <= _logging.DEBUG else 2 if level >= _logging.ERROR else 1
