"""``cd-sfm models ...``: the CLI hook of the weights manager (see :mod:`cd_sfm.models.registry`)."""

from __future__ import annotations


def add_parser(subparsers):
    from .registry import add_models_subparser

    return add_models_subparser(subparsers)
