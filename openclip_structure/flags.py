"""The plugin's command-line flags and their validation.

The flags are added to open_clip_train's own parser (so they appear in ``--help``, in
``params.txt`` and in the wandb config) and checked before any data or model is touched. Every
weight defaults to 0 = off; with everything off the plugin is an exact no-op.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable

GROUP_TITLE = "openclip-structure (modality gap and latent modality structure)"


class FlagError(ValueError):
    """A plugin flag value, or a combination of flags, that cannot work."""


def _number(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
            what: str = "number") -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a {what}, got {text!r}") from None
        bad = not math.isfinite(value)
        bad |= lo is not None and (value <= lo if lo_open else value < lo)
        bad |= hi is not None and value > hi
        if bad:
            left = "(" if lo_open else "["
            rng = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
            raise argparse.ArgumentTypeError(f"must be a finite {what} in {rng}, got {text!r}")
        return value

    parse.__name__ = what
    return parse


weight = _number(lo=0.0, what="weight")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the plugin's argument group to ``parser`` (open_clip_train's parser)."""
    g = parser.add_argument_group(GROUP_TITLE)
    g.add_argument("--gap-atp-weight", type=weight, default=0.0,
                   help="Weight of Align-True-Pairs, the modality-gap alignment term "
                        "(Grassucci et al. 2026; the paper uses 1). Logged as gap_atp_loss. 0 = off.")
    g.add_argument("--gap-cu-weight", type=weight, default=0.0,
                   help="Weight of Centroid-Uniformity (Grassucci et al. 2026; the paper uses 1). "
                        "Logged as gap_cu_loss. 0 = off.")
    g.add_argument("--gap-uniformity", choices=["centroid", "modality"], default="centroid",
                   help="Uniformity term weighted by --gap-cu-weight: 'centroid' = uniformity of the "
                        "re-normalised per-sample centroids (Grassucci et al.); 'modality' = mean of "
                        "per-modality uniformities (Fahim et al. 2024 baseline).")
    g.add_argument("--gap-uniformity-t", type=_number(lo=0.0, hi=50.0, lo_open=True, what="temperature"),
                   default=2.0, help="t of the Wang & Isola uniformity kernel exp(-t||x-y||^2) (default 2).")
    g.add_argument("--gap-anchor", choices=["image", "text"], default="image",
                   help="Anchor modality of Align-True-Pairs (default image).")
    g.add_argument("--gap-schedule", choices=["constant", "ramp"], default="constant",
                   help="'constant': the weights as given (the paper). 'ramp': the authors' schedule "
                        "in fractions of total steps: CU x1 until 20%%, linear to 0 by 70%%; ATP x1 "
                        "until 50%%, linear to x2 by 100%%.")
    g.add_argument("--fixed-temperature", type=_number(lo=0.01, hi=1.0, what="temperature"), default=None,
                   help="Freeze the contrastive temperature at this value (logit scale 1/T) instead of "
                        "learning it; Grassucci et al. train with 0.1. Default: learned, as open_clip.")
    g.add_argument("--structure-nonfinite", choices=["raise", "warn", "off"], default="raise",
                   help="What to do when a loss term is NaN/inf: 'raise' stops with the term's name and "
                        "the step, 'warn' logs it and goes on, 'off' skips the check (no sync).")
    return parser


def plugin_destinations(parser: argparse.ArgumentParser) -> list:
    """``dest`` names of the plugin's flags in ``parser``."""
    for group in parser._action_groups:  # argparse keeps groups only privately
        if group.title == GROUP_TITLE:
            return [a.dest for a in group._group_actions]
    return []


def regularizers_enabled(args) -> bool:
    return args.gap_atp_weight > 0 or args.gap_cu_weight > 0


def validate(args) -> None:
    """Cross-flag checks; raises :class:`FlagError` naming the flags and the allowed values."""
    if args.gap_schedule == "ramp" and not regularizers_enabled(args):
        raise FlagError("--gap-schedule ramp needs --gap-atp-weight or --gap-cu-weight > 0")
    if not regularizers_enabled(args) and args.fixed_temperature is None:
        return
    if getattr(args, "horovod", False):
        raise FlagError("--horovod is not supported by openclip-structure's regularizers or "
                        "--fixed-temperature; use torchrun (torch.distributed) instead")
    if args.gap_schedule == "ramp" and getattr(args, "skip_scheduler", False):
        raise FlagError("--gap-schedule ramp follows the LR scheduler's step; it cannot be used "
                        "with --skip-scheduler (use --gap-schedule constant)")
