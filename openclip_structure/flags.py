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

VIEW_AUGS = ("crop", "autoaugment")
TEXT_AUGS = ("none", "eda")


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


def _prompt_file(kind: str):
    def parse(text: str) -> str:
        from . import zeroshot

        try:
            (zeroshot.read_classnames if kind == "classnames" else zeroshot.read_templates)(text)
        except (OSError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e)) from e
        return text
    parse.__name__ = f"{kind} file"
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the plugin's argument group to ``parser`` (open_clip_train's parser). Idempotent: the
    launcher and open_clip_train's plugin hook (when the patch is applied) may both call it."""
    if plugin_destinations(parser):
        return parser
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
    g.add_argument("--val-structure-metrics", choices=["gap", "all", "none"], default="gap",
                   help="Extra validation metrics with --val-data (logged as val/...): 'gap' = label-free "
                        "gap measures from open_clip's own validation embeddings (default); 'all' = also "
                        "group-level clustering, class-level retrieval and zero-shot classification, which need a <key>.cls label in every webdataset "
                        "validation sample (one extra pass over the validation shards); 'none'.")
    g.add_argument("--val-zeroshot-classnames", type=_prompt_file("classnames"), default=None, metavar="FILE",
                   help="With --val-structure-metrics all: class names of the zero-shot classification "
                        "(val/zeroshot_top1), one per line, line i = .cls id i. Default: classnames.txt "
                        "beside the validation shards, else the .cls ids.")
    g.add_argument("--val-zeroshot-templates", type=_prompt_file("templates"), default=None, metavar="FILE",
                   help="With --val-structure-metrics all: zero-shot prompt templates, one per line with a "
                        "{c} placeholder. Default: zeroshot_classification_templates.txt beside the "
                        "validation shards, else open_clip's SIMPLE_IMAGENET_TEMPLATES.")
    g.add_argument("--fsdp", action="store_true",
                   help="Shard the model with PyTorch FSDP2 (fully_shard per transformer block and at the "
                        "root) instead of DistributedDataParallel; needs more than one process. Checkpoints "
                        "stay in open_clip's format (full state dict on rank 0).")
    g.add_argument("--fsdp-param-dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="FSDP2 mixed precision: dtype the sharded blocks compute in (fp32 = no cast).")
    g.add_argument("--fsdp-reduce-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="FSDP2 mixed precision: dtype of the gradient reduce-scatter.")
    g.add_argument("--fsdp-sharded-checkpoint", action="store_true",
                   help="With --fsdp, also write a sharded torch.distributed.checkpoint copy each epoch "
                        "(checkpoints/epoch_N_dcp/, fast to save/resume for very large models; "
                        "--resume accepts that directory).")
    g.add_argument("--structure-nonfinite", choices=["raise", "skip", "warn", "off"], default="raise",
                   help="What to do when a loss term is NaN/inf: 'raise' stops with the term's name and "
                        "the step; 'skip' logs it and zeroes every loss term of that step (zero gradients; "
                        "AdamW still applies its momentum and weight decay); 'warn' logs it and goes on; "
                        "'off' skips the check (saves one host sync per step).")
    # ---- latent modality structures (Jiang et al., CVPR 2023, arXiv 2303.05952) ----
    g.add_argument("--gc-weight", type=weight, default=0.0,
                   help="Weight of geometric consistency L_gc (Jiang et al. 2023; = CyCLIP's cyclic loss, "
                        "CyCLIP uses 0.25). Logged as gc_loss. 0 = off.")
    g.add_argument("--gc-aug-weight", type=weight, default=0.0,
                   help="Weight of augmented geometric consistency L_gc^a (Jiang et al. 2023; CyCLIP-style "
                        "0.25 is a reasonable start). Needs the second view (--view-aug). Logged as gc_aug_loss.")
    g.add_argument("--bridge-weight", type=weight, default=0.0,
                   help="Weight of the Brownian-bridge loss (Jiang et al. 2023): the augmented image "
                        "embedding should lie on normalize(t z_V + (1-t) z_T). Logged as bridge_loss. 0 = off.")
    g.add_argument("--bridge-t", type=bridge_t, default=0.25,
                   help="Image weight t of the bridge point: a number in (0, 1) (default 0.25, the paper's "
                        "value) or 'uniform' (t ~ U(0,1) per sample, seeded by --seed).")
    g.add_argument("--sep-weight", type=weight, default=0.0,
                   help="Weight of deep feature separation (Jiang et al. 2023), applied alike to its three "
                        "terms sep_ortho, sep_icon, sep_iuni (logged separately). Adds one trainable "
                        "independent head per tower (saved as 'structure_heads' in checkpoints, not in "
                        "state_dict). Needs open_clip's VisionTransformer + built-in text transformer. 0 = off.")
    g.add_argument("--sep-temperature", type=_number(lo=0.0, hi=10.0, lo_open=True, what="temperature"),
                   default=0.1,
                   help="Temperature of sep_icon's InfoNCE between independent features of the two views "
                        "(default 0.1: our choice, SimCLR-style; the paper does not state it).")
    g.add_argument("--inmodal-weight", type=weight, default=0.0,
                   help="Weight of CyCLIP's in-modal contrastive terms (L_V2Va + L_T2Ta)/2 with the CLIP "
                        "temperature (CyCLIP's L_con = 1/4 (..) corresponds to weight 1 with the CLIP loss "
                        "halved). Logged as inmodal_loss. 0 = off.")
    g.add_argument("--view-aug", choices=list(VIEW_AUGS), default="crop",
                   help="Second image view, used by --gc-aug/--bridge/--sep/--inmodal-weight: 'crop' = "
                        "RandomResizedCrop(scale=(0.5, 1)) + horizontal flip; 'autoaugment' = resize, "
                        "torchvision AutoAugment (ImageNet policy); then the model's own normalisation.")
    g.add_argument("--text-aug", choices=list(TEXT_AUGS), default="none",
                   help="Second caption: 'none' = the caption itself (z^a_T = z_T); 'eda' = EDA-style "
                        "random word dropout (p=0.1) and one random swap of two words.")
    return parser


def plugin_destinations(parser: argparse.ArgumentParser) -> list:
    """``dest`` names of the plugin's flags in ``parser``."""
    for group in parser._action_groups:  # argparse keeps groups only privately
        if group.title == GROUP_TITLE:
            return [a.dest for a in group._group_actions]
    return []


def regularizers_enabled(args) -> bool:
    return (args.gap_atp_weight > 0 or args.gap_cu_weight > 0 or getattr(args, "gc_weight", 0) > 0
            or views_enabled(args))


def separation_enabled(args) -> bool:
    """Deep feature separation: independent heads are attached to the model."""
    return getattr(args, "sep_weight", 0) > 0


def views_enabled(args) -> bool:
    """Whether a term needs the second (augmented) view: the train preprocess then yields two views
    per image and the model forward encodes both."""
    return any(getattr(args, k, 0) > 0 for k in ("gc_aug_weight", "bridge_weight", "sep_weight", "inmodal_weight"))


def text_views_enabled(args) -> bool:
    return views_enabled(args) and getattr(args, "text_aug", "none") != "none"


def validate(args) -> None:
    """Cross-flag checks; raises :class:`FlagError` naming the flags and the allowed values."""
    if args.val_structure_metrics == "all":
        if not getattr(args, "val_data", None):
            raise FlagError("--val-structure-metrics all needs --val-data (webdataset shards with a .cls label)")
        if getattr(args, "dataset_type", "auto") not in ("webdataset", "auto") or (
                args.dataset_type == "auto" and ".tar" not in args.val_data):
            raise FlagError("--val-structure-metrics all reads labels from webdataset validation shards "
                            f"(<key>.cls); --val-data {args.val_data} is not webdataset (use 'gap')")
        from .validation import first_sample_problem
        problem = first_sample_problem(args.val_data)
        if problem:
            raise FlagError(f"--val-structure-metrics all: {problem} (use 'gap', or add a <key>.cls label)")
    prompt_files = [f for f, v in (("--val-zeroshot-classnames", getattr(args, "val_zeroshot_classnames", None)),
                                   ("--val-zeroshot-templates", getattr(args, "val_zeroshot_templates", None))) if v]
    if prompt_files and args.val_structure_metrics != "all":
        raise FlagError(f"{', '.join(prompt_files)} only feed the labelled validation metrics: "
                        "add --val-structure-metrics all")
    if getattr(args, "text_aug", "none") != "none" and not views_enabled(args):
        raise FlagError(f"--text-aug {args.text_aug} only feeds the two-view regularizers: set --gc-aug-weight, "
                        "--bridge-weight, --sep-weight or --inmodal-weight > 0 (or drop --text-aug)")
    fsdp_options = [f for f, on in (("--fsdp-param-dtype", args.fsdp_param_dtype != "fp32"),
                                    ("--fsdp-reduce-dtype", args.fsdp_reduce_dtype != "fp32"),
                                    ("--fsdp-sharded-checkpoint", args.fsdp_sharded_checkpoint)) if on]
    if fsdp_options and not args.fsdp:
        raise FlagError(f"{', '.join(fsdp_options)} need --fsdp")
    if args.fsdp and getattr(args, "horovod", False):
        raise FlagError("--fsdp cannot be combined with --horovod")
    if args.gap_schedule == "ramp" and not (args.gap_atp_weight > 0 or args.gap_cu_weight > 0):
        raise FlagError("--gap-schedule ramp needs --gap-atp-weight or --gap-cu-weight > 0")
    if not regularizers_enabled(args) and args.fixed_temperature is None:
        return
    if getattr(args, "horovod", False):
        raise FlagError("--horovod is not supported by openclip-structure's regularizers or "
                        "--fixed-temperature; use torchrun (torch.distributed) instead")
    if views_enabled(args) and (getattr(args, "distill_model", None) or getattr(args, "distill_pretrained", None)):
        raise FlagError("distillation (--distill-model/--distill-pretrained) cannot be combined with the "
                        "two-view regularizers (--gc-aug-weight, --bridge-weight, --sep-weight, "
                        "--inmodal-weight): the teacher would see the stacked views")
    if args.gap_schedule == "ramp" and getattr(args, "skip_scheduler", False):
        raise FlagError("--gap-schedule ramp follows the LR scheduler's step; it cannot be used "
                        "with --skip-scheduler (use --gap-schedule constant)")
