"""The one registry of regularizer terms.

Each :class:`TermSpec` names a method once: its weight flag, the flags that configure it, the term
objects it adds to the loss (each logged as ``{name}_loss``), whether it needs the second view or
the separation heads, and the paper. From :data:`TERMS` come the command-line flags
(:func:`openclip_structure.flags.add_arguments`), the checks that depend on which terms are on
(:func:`views_enabled`, :func:`separation_enabled`, ...), the loss factory
(:func:`openclip_structure.factory.build_terms`) and the README's flag table
(:func:`openclip_structure.flags.flag_table`). Adding a method = one entry here.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

from .losses import (AlignTruePairs, AugmentedGeometricConsistency, BrownianBridge, CentroidUniformity,
                     GeometricConsistency, InModalContrastive, ModalityUniformity, RegularizerTerm,
                     SeparationInModalContrast, SeparationOrthogonality, SeparationUniformity)

# ---- argparse value types (shared with the general flags in flags.py) --------------------------


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           what: str = "number") -> Callable[[str], float]:
    """argparse type: a finite float in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""
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


weight = number(lo=0.0, what="weight")


def bridge_t(text: str):
    """``--bridge-t``: a number in the open interval (0, 1), or the string ``uniform``."""
    if text == "uniform":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1) or 'uniform', got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1) or 'uniform', got {text!r}")
    return value


#: second image view (``--view-aug``) and text view (``--text-aug``) of the view-based terms
VIEW_AUGS = ("crop", "autoaugment")
TEXT_AUGS = ("none", "captions", "eda")


@dataclass(frozen=True)
class Option:
    """A flag: ``kwargs`` go to ``argparse.add_argument``; ``short`` is its README table line."""

    flag: str
    kwargs: Dict
    short: str
    #: the README's "default" cell when the argparse default (None) says nothing
    shown_default: str = ""

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class TermSpec:
    """One method: weight flag ``--{key}-weight`` (dest ``{key}_weight``, default 0 = off)."""

    key: str
    title: str  # README line
    paper: str
    help: str
    build: Callable[[argparse.Namespace], List[RegularizerTerm]]
    logged: Tuple[str, ...]
    views: bool = False  # needs the augmented second view of each sample
    heads: bool = False  # needs the separation heads attached to the model
    gap_schedule: bool = False  # follows --gap-schedule ramp
    options: Tuple[Option, ...] = field(default=())

    @property
    def flag(self) -> str:
        return f"--{self.key.replace('_', '-')}-weight"

    @property
    def dest(self) -> str:
        return f"{self.key}_weight"

    def weight(self, args) -> float:
        return float(getattr(args, self.dest, 0.0) or 0.0)


def _gap_uniformity(args):
    cls = CentroidUniformity if args.gap_uniformity == "centroid" else ModalityUniformity
    return [cls(t=args.gap_uniformity_t)]


def _bridge(args):
    t = args.bridge_t
    # same seed on every rank: the per-sample t of the global batch equals one process's draws
    seed = int(getattr(args, "seed", 0) or 0) if t == "uniform" else None
    return [BrownianBridge(t=t, seed=seed)]


def _separation(args):
    return [SeparationOrthogonality(),
            SeparationInModalContrast(temperature=args.sep_temperature, text=text_views_enabled(args)),
            SeparationUniformity()]


GRASSUCCI = "Grassucci et al., ICLR 2026"
JIANG = "Jiang et al., CVPR 2023"

TERMS: Tuple[TermSpec, ...] = (
    TermSpec(
        "gap_atp", "Align-True-Pairs, the gap alignment term (paper: 1)", GRASSUCCI,
        "Weight of Align-True-Pairs, the modality-gap alignment term (Grassucci et al. 2026; the paper "
        "uses 1). Logged as gap_atp_loss. 0 = off.",
        lambda a: [AlignTruePairs(anchor=a.gap_anchor)], ("gap_atp_loss",), gap_schedule=True,
        options=(Option("--gap-anchor", dict(choices=["image", "text"], default="image",
                                             help="Anchor modality of Align-True-Pairs (default image)."),
                        "anchor modality of ATP"),)),
    TermSpec(
        "gap_cu", "Centroid Uniformity (paper: 1)", GRASSUCCI,
        "Weight of Centroid-Uniformity (Grassucci et al. 2026; the paper uses 1). Logged as gap_cu_loss. 0 = off.",
        _gap_uniformity, ("gap_cu_loss",), gap_schedule=True,
        options=(
            Option("--gap-uniformity", dict(
                choices=["centroid", "modality"], default="centroid",
                help="Uniformity term weighted by --gap-cu-weight: 'centroid' = uniformity of the re-normalised "
                     "per-sample centroids (Grassucci et al.); 'modality' = mean of per-modality uniformities "
                     "(Fahim et al. 2024 baseline)."),
                "`modality` = Fahim et al. 2024 per-modality uniformity instead"),
            Option("--gap-uniformity-t", dict(
                type=number(lo=0.0, hi=50.0, lo_open=True, what="temperature"), default=2.0,
                help="t of the Wang & Isola uniformity kernel exp(-t||x-y||^2) (default 2)."),
                "t of the uniformity kernel `exp(-t‖x-y‖²)`"),
        )),
    TermSpec(
        "gc", "geometric consistency L_gc (= CyCLIP's cyclic loss)", JIANG,
        "Weight of geometric consistency L_gc (Jiang et al. 2023; = CyCLIP's cyclic loss, CyCLIP uses 0.25 "
        "with its contrastive loss halved, i.e. 0.5 here). Logged as gc_loss. 0 = off.",
        lambda a: [GeometricConsistency()], ("gc_loss",)),
    TermSpec(
        "gc_aug", "augmented geometric consistency L_gc^a", JIANG,
        "Weight of augmented geometric consistency L_gc^a (Jiang et al. 2023). Needs the second view "
        "(--view-aug). Logged as gc_aug_loss. 0 = off.",
        lambda a: [AugmentedGeometricConsistency()], ("gc_aug_loss",), views=True),
    TermSpec(
        "bridge", "Brownian bridge: the augmented image view onto the image–caption bridge", JIANG,
        "Weight of the Brownian-bridge loss (Jiang et al. 2023): the augmented image embedding should lie on "
        "normalize(t z_V + (1-t) z_T). Logged as bridge_loss. 0 = off.",
        _bridge, ("bridge_loss",), views=True,
        options=(Option("--bridge-t", dict(
            type=bridge_t, default=0.25,
            help="Image weight t of the bridge point: a number in (0, 1) (default 0.25, the paper's value) or "
                 "'uniform' (t ~ U(0,1) per sample, seeded by --seed)."),
            "image weight t of the bridge point, or `uniform` per sample"),)),
    TermSpec(
        "sep", "deep feature separation: independent heads, three terms", JIANG,
        "Weight of deep feature separation (Jiang et al. 2023), applied alike to its three terms sep_ortho, "
        "sep_icon, sep_iuni (logged separately). Adds one trainable independent head per tower (saved with "
        "the checkpoints as 'structure_heads', not in state_dict). Needs open_clip's VisionTransformer + "
        "built-in text transformer. 0 = off.",
        _separation, ("sep_ortho_loss", "sep_icon_loss", "sep_iuni_loss"), views=True, heads=True,
        options=(Option("--sep-temperature", dict(
            type=number(lo=0.0, hi=10.0, lo_open=True, what="temperature"), default=0.1,
            help="Temperature of sep_icon's InfoNCE between independent features of the two views (default "
                 "0.1: our choice, SimCLR-style; the paper does not state it)."),
            "temperature of `sep_icon`'s InfoNCE"),)),
    TermSpec(
        "inmodal", "in-modal contrastive terms between original and augmented views", "Goel et al. (CyCLIP), NeurIPS 2022",
        "Weight of CyCLIP's in-modal contrastive terms (L_V2Va + L_T2Ta)/2 with the CLIP temperature; the "
        "text half needs a text view (--text-aug). With --gc-weight 0.5 and a text view: 2 x CyCLIP's "
        "objective. Logged as inmodal_loss. 0 = off.",
        lambda a: [InModalContrastive(text=text_views_enabled(a))], ("inmodal_loss",), views=True),
)

BY_KEY = {spec.key: spec for spec in TERMS}


def enabled(args) -> List[TermSpec]:
    """The specs whose weight is > 0."""
    return [spec for spec in TERMS if spec.weight(args) > 0]


def regularizers_enabled(args) -> bool:
    return bool(enabled(args))


def views_enabled(args) -> bool:
    """Whether an enabled term needs the second (augmented) view: the train preprocess then yields
    two views per image and the model forward encodes both."""
    return any(spec.views for spec in enabled(args))


def separation_enabled(args) -> bool:
    """Whether the separation heads are attached to the model."""
    return any(spec.heads for spec in enabled(args))


def text_views_enabled(args) -> bool:
    return views_enabled(args) and getattr(args, "text_aug", "none") != "none"


def view_flags() -> str:
    """``--gc-aug-weight, --bridge-weight, ...``: the weight flags of the terms that need views."""
    return ", ".join(spec.flag for spec in TERMS if spec.views)
