"""Flags hook: the plugin's argument group on open_clip_train's own parser, validated there.

``add_arguments(parser)`` / ``validate(args, parser)`` are the hook-patched open_clip_train's call
sites. Unpatched, :class:`PluginArgumentParser` does the same from inside ``parse_args``: the shim
hands ``open_clip_train.params`` a view of ``argparse`` whose ``ArgumentParser`` is this subclass
(argparse itself is untouched).
"""
from __future__ import annotations

import argparse

from .. import flags
from ..data.check import check_data_args
from ..configs import register_model_configs, register_user_configs
from . import state


def add_arguments(parser: argparse.ArgumentParser) -> None:
    register_model_configs()  # --model structure-tiny
    flags.add_arguments(parser)


def validate(args, parser: argparse.ArgumentParser) -> None:
    register_user_configs(getattr(args, "model_config_dir", None))  # --model-config-dir: before any check
    try:
        flags.validate(args)
        check_data_args(args)  # a missing --train-data/--val-data file: stop now, not retry forever
    except flags.FlagError as e:
        parser.error(str(e))
    run = state.current()
    if run is not None:
        run.set_args(args)


class PluginArgumentParser(argparse.ArgumentParser):
    """open_clip_train's parser with the plugin's group added before parsing and validated after."""

    def parse_args(self, args=None, namespace=None):
        add_arguments(self)
        ns = super().parse_args(args, namespace)
        validate(ns, self)
        return ns
