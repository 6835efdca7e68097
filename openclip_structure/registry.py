"""The one registry of regularizer terms.

Each :class:`TermSpec` names a method once: its weight flag, the flags that configure it, the term
objects it adds to the loss (each logged as ``{name}_loss``), whether it needs the second view or
the separation heads, and the paper. From :data:`TERMS` come the command-line flags and their
``--help`` (:func:`openclip_structure.flags.add_arguments`), the checks that depend on which terms are on
(:func:`views_enabled`, :func:`separation_enabled`, ...), the loss factory
(:func:`openclip_structure.factory.build_terms`) and the README's flag table
(:func:`openclip_structure.flags.flag_table`). Adding a method = one entry here.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Tuple

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
    """A flag: ``kwargs`` go to ``argparse.add_argument`` (``help`` excepted); ``text`` is its one
    description, from which both its ``--help`` text and its README table line are built
    (:func:`openclip_structure.flags.option_help`, :func:`openclip_structure.flags.flag_table`)."""

    flag: str
    kwargs: Dict
    text: str
    #: the shown default (README cell, ``--help``) when the argparse default (None) says nothing
    shown_default: str = ""

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class TermSpec:
    """One method: weight flag ``--{key}-weight`` (dest ``{key}_weight``, default 0 = off).

    Its text fields (``name``, ``equation``, ``summary``, ``paper``) with ``logged``, ``views`` and
    ``heads`` are the one description of the method: the weight flag's ``--help`` and its README
    table line are both built from them (:func:`openclip_structure.flags.weight_help`,
    :func:`openclip_structure.flags.flag_table`), and its options' help names it by ``name``."""

    key: str
    name: str  # short name, e.g. "Align-True-Pairs"
    paper: str
    build: Callable[[argparse.Namespace], List[RegularizerTerm]]
    logged: Tuple[str, ...]
    equation: str = ""  # symbol or formula after the name, e.g. "L_gc"
    summary: str = ""  # what it does (markdown: `code` spans), after the name and equation
    views: bool = False  # needs the augmented second view of each sample
    heads: bool = False  # needs the separation heads attached to the model
    gap_schedule: bool = False  # follows --gap-schedule ramp
    options: Tuple[Option, ...] = field(default=())

    @property
    def title(self) -> str:
        """``name equation: summary`` (markdown)."""
        head = f"{self.name} {self.equation}" if self.equation else self.name
        return f"{head}: {self.summary}" if self.summary else head

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
        "gap_atp", "Align-True-Pairs", GRASSUCCI,
        lambda a: [AlignTruePairs(anchor=a.gap_anchor)], ("gap_atp_loss",),
        summary="the modality-gap alignment term (paper: 1)", gap_schedule=True,
        options=(Option("--gap-anchor", dict(choices=["image", "text"], default="image"),
                        "the anchor modality: the squared distance of the other modality's embedding to it is the loss"),)),
    TermSpec(
        "gap_cu", "Centroid Uniformity", GRASSUCCI, _gap_uniformity, ("gap_cu_loss",),
        summary="the uniformity of the per-sample image–text centroids (paper: 1)", gap_schedule=True,
        options=(
            Option("--gap-uniformity", dict(choices=["centroid", "modality"], default="centroid"),
                   "the uniformity term: `centroid` = uniformity of the re-normalised per-sample centroids "
                   "(Grassucci et al.); `modality` = mean of the per-modality uniformities instead (Fahim et al. "
                   "2024 baseline)"),
            Option("--gap-uniformity-t", dict(
                type=number(lo=0.0, hi=50.0, lo_open=True, what="temperature"), default=2.0),
                "the t of the Wang & Isola uniformity kernel `exp(-t‖x-y‖²)`"),
        )),
    TermSpec(
        "gc", "geometric consistency", JIANG, lambda a: [GeometricConsistency()], ("gc_loss",),
        equation="L_gc", summary="CyCLIP's cyclic loss (CyCLIP uses 0.25 with its contrastive loss halved, "
                                 "i.e. 0.5 here)"),
    TermSpec(
        "gc_aug", "augmented geometric consistency", JIANG, lambda a: [AugmentedGeometricConsistency()],
        ("gc_aug_loss",), equation="L_gc^a",
        summary="each modality's similarity structure and each pair's image–text cosine the same for the "
                "original and the augmented views", views=True),
    TermSpec(
        "bridge", "Brownian bridge", JIANG, _bridge, ("bridge_loss",),
        summary="the augmented image embedding pulled onto the image–caption bridge point "
                "`normalize(t z_V + (1-t) z_T)`", views=True,
        options=(Option("--bridge-t", dict(type=bridge_t, default=0.25),
                        "image weight t of the bridge point: a number in (0, 1) (0.25: the paper's value), or "
                        "`uniform` (t ~ U(0,1) per sample, seeded by `--seed`)"),)),
    TermSpec(
        "sep", "deep feature separation", JIANG, _separation, ("sep_ortho_loss", "sep_icon_loss", "sep_iuni_loss"),
        summary="one trainable independent head per tower, on the pooled features that feed its final projection "
                "(saved with the checkpoints as `structure_heads`, not in the state_dict); one weight for its "
                "three terms", views=True, heads=True,
        options=(Option("--sep-temperature", dict(
            type=number(lo=0.0, hi=10.0, lo_open=True, what="temperature"), default=0.1),
            "temperature of `sep_icon`'s InfoNCE between the independent features of the two views (0.1: our "
            "choice, SimCLR-style; the paper does not state it)"),)),
    TermSpec(
        "inmodal", "in-modal contrast", "Goel et al. (CyCLIP), NeurIPS 2022",
        lambda a: [InModalContrastive(text=text_views_enabled(a))], ("inmodal_loss",),
        equation="(L_V2Va + L_T2Ta)/2",
        summary="CyCLIP's in-modal contrastive terms between the original and augmented views, with the CLIP "
                "temperature; the text half needs a text view (`--text-aug`); with `--gc-weight 0.5` and a "
                "text view: 2 × CyCLIP's objective", views=True),
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


def weight_flags(weights: Mapping[str, object] | None = None, default: object = None) -> List[str]:
    """Command-line flags that turn terms on: ``[--{key}-weight, W, ...]`` in registry order, W from
    ``weights`` (by term key), else ``default`` (None: the term stays off). A number is written
    with ``:g``, a string as given. Raises ``KeyError`` for a key that is no registry term."""
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(BY_KEY))
    if unknown:
        raise KeyError(f"no registry term {unknown}; terms: {list(BY_KEY)}")
    out: List[str] = []
    for spec in TERMS:
        w = weights.get(spec.key, default)
        if w is not None:
            out += [spec.flag, w if isinstance(w, str) else f"{w:g}"]
    return out


def view_flags() -> str:
    """``--gc-aug-weight, --bridge-weight, ...``: the weight flags of the terms that need views."""
    return ", ".join(spec.flag for spec in TERMS if spec.views)
