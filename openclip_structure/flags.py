"""The plugin's command-line flags and their validation.

The flags are added to open_clip_train's own parser (so they appear in ``--help``, in
``params.txt`` and in the wandb config) and checked before any data or model is touched. Every
weight defaults to 0 = off; with everything off the plugin is an exact no-op.
"""
from __future__ import annotations

import argparse
from typing import List, Tuple

from .configs import config_dir
from .errors import FlagError
from .registry import (TERMS, TEXT_AUGS, VIEW_AUGS, Option, TermSpec, enabled, number, regularizers_enabled, separation_enabled,
                       text_views_enabled, view_flags, views_enabled, weight)

__all__ = ["FlagError", "add_arguments", "validate", "flag_table", "option_help", "weight_help", "plugin_destinations",
           "regularizers_enabled", "separation_enabled", "text_views_enabled", "views_enabled", "VIEW_AUGS", "TEXT_AUGS"]

GROUP_TITLE = "openclip-structure (modality gap and latent modality structure)"





def _prompt_file(kind: str):
    """argparse type: a zero-shot class-name or template file that reads (checked at parse time)."""
    def parse(text: str) -> str:
        from .evaluation import zeroshot

        try:
            (zeroshot.read_classnames if kind == "classnames" else zeroshot.read_templates)(text)
        except (OSError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e)) from e
        return text
    parse.__name__ = f"{kind} file"
    return parse



#: flags that are not a term's own (the terms' flags come from the registry); each ``text`` is the
#: flag's one description: its ``--help`` and its README table line are built from it
GENERAL_OPTIONS: Tuple[Option, ...] = (
    Option("--gap-schedule", dict(choices=["constant", "ramp"], default="constant"),
           f"`constant`: the gap weights ({', '.join(f'`{s.flag}`' for s in TERMS if s.gap_schedule)}) as given (the "
           "paper); `ramp`: the authors' schedule in fractions of total steps (CU ×1 until 20 %, linear → 0 by "
           "70 %; ATP ×1 until 50 %, linear → ×2 at 100 %)"),
    Option("--fixed-temperature", dict(type=number(lo=0.01, hi=1.0, what="temperature"), default=None),
           "freeze the contrastive temperature at this value (logit scale = 1/T) instead of learning it "
           "(Grassucci et al. train with 0.1)", "learned, as open_clip"),
    Option("--model-config-dir", dict(type=config_dir, action="append", default=None, metavar="DIR"),
           "a folder of your own open_clip model configs (`<model>.json`), registered before the model is built, "
           "so that `--model <model>` trains it (and `--pretrained ckpt.pt` fine-tunes it); repeatable", "none"),
    Option("--view-aug", dict(choices=list(VIEW_AUGS), default="crop"),
           f"second image view of the view-based terms ({', '.join(f'`{s.flag}`' for s in TERMS if s.views)}): "
           "`crop` = RandomResizedCrop(scale=(0.5, 1)) + horizontal flip; `autoaugment` = resize, torchvision "
           "AutoAugment (ImageNet policy); then the model's own normalisation"),
    Option("--text-aug", dict(choices=list(TEXT_AUGS), default="none"),
           "the text view of the view-based terms: `none` = no text view: the text halves of `inmodal` and "
           "`sep_icon` are skipped and z^a_T = z_T in `gc_aug`; `captions` = another caption of the same sample: "
           "the train data's caption (webdataset `<key>.txt`, CSV caption column) holds several, one per line, or "
           "on open_clip main the `.json` fields of `--json-text-key 'a;b'` are the captions; each step uses one "
           "caption and a different one as its view (a sample with a single caption gets its EDA copy); `eda` = "
           "word dropout (p=0.1) + one word swap (the thesaurus-free part of EDA)"),
    Option("--val-structure-metrics", dict(choices=["gap", "all", "none"], default="gap"),
           "extra `val/...` metrics with `--val-data`: `gap` = label-free gap measures from open_clip's own "
           "validation embeddings; `all` = also group-level clustering, class-level retrieval and zero-shot "
           "classification, which need a `<key>.cls` label in every webdataset validation sample (one extra pass "
           "over the validation shards); `none`"),
    Option("--val-zeroshot-classnames", dict(type=_prompt_file("classnames"), default=None, metavar="FILE"),
           "with `--val-structure-metrics all`: the class names of the zero-shot classification "
           "(`val/zeroshot_top1`), one per line, line i = `.cls` id i",
           "`classnames.txt` beside the validation shards, else the `.cls` ids"),
    Option("--val-zeroshot-templates", dict(type=_prompt_file("templates"), default=None, metavar="FILE"),
           "with `--val-structure-metrics all`: zero-shot prompt templates, one per line with a `{c}` placeholder",
           "CLIP_benchmark's `zeroshot_classification_templates.txt` beside the validation shards, else open_clip's "
           "`SIMPLE_IMAGENET_TEMPLATES`"),
    Option("--structure-nonfinite", dict(choices=["raise", "skip", "warn", "off"], default="raise"),
           "what a NaN/inf loss term does: `raise` stops training with the term's name and the step; `skip` logs it "
           "and zeroes every loss term of that step (zero gradients; AdamW still applies its momentum and weight "
           "decay); `warn` logs it and goes on; `off` skips the check (saves one host sync per step)"),
    Option("--fsdp", dict(action="store_true"),
           "shard the model with PyTorch FSDP2 (`fully_shard` per transformer block and at the root) instead of "
           "DDP; needs more than one process; checkpoints stay in open_clip's format (full state dict on rank 0)"),
    Option("--fsdp-param-dtype", dict(choices=["fp32", "bf16", "fp16"], default="fp32"),
           "FSDP2 mixed precision: the dtype the sharded blocks compute in (`fp32` = no cast)"),
    Option("--fsdp-reduce-dtype", dict(choices=["fp32", "bf16"], default="fp32"),
           "FSDP2 mixed precision: the dtype of the gradient reduce-scatter"),
    Option("--fsdp-sharded-checkpoint", dict(action="store_true"),
           "with `--fsdp`, also a sharded `torch.distributed.checkpoint` copy per epoch (`checkpoints/epoch_N_dcp/`, "
           "fast to save and resume for very large models; `--resume` accepts that folder)"),
)

#: what a term needs, as its README line and its ``--help`` say it
NEEDS = (("views", "needs the second view (`--view-aug`)"), ("heads", "adds separation heads"))


def weight_option(spec: TermSpec) -> Option:
    """The term's weight flag (its ``text`` is unused: :func:`weight_help` and :func:`flag_table`
    build its description from the spec's fields)."""
    return Option(spec.flag, dict(type=weight, default=0.0), spec.title)


def all_options() -> List[Tuple[Option, TermSpec | None]]:
    """Every plugin flag in ``--help`` order: each term's weight and own options, then the general ones."""
    out: List[Tuple[Option, TermSpec | None]] = []
    for spec in TERMS:
        out.append((weight_option(spec), spec))
        out.extend((o, spec) for o in spec.options)
    out.extend((o, None) for o in GENERAL_OPTIONS)
    return out


#: the README's typography as ``--help`` writes it (plain ASCII, whatever the terminal)
_ASCII = str.maketrans({"`": None, "×": "x", "→": "->", "‖": "||", "²": "^2", "–": "-", "%": "%%"})


def _plain(text: str) -> str:
    """Markdown text as ``--help`` shows it: no backticks, ASCII, ``%`` escaped for argparse."""
    return text.translate(_ASCII)


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _needs(spec: TermSpec) -> List[str]:
    return [what for attr, what in NEEDS if getattr(spec, attr)]


def weight_help(spec: TermSpec) -> str:
    """``--help`` of the term's weight flag, from the spec's fields (as its README line)."""
    needs = "; ".join(_needs(spec))
    return _plain(f"Weight of {spec.title} [{spec.paper}]. " + (f"{_sentence(needs)}. " if needs else "")
                  + f"Logged as {', '.join(spec.logged)}. 0 = off.")


def option_help(option: Option, spec: TermSpec | None = None) -> str:
    """``--help`` of a flag: its ``text``, the term it configures (for a term's option) and its default."""
    if spec is not None and option.flag == spec.flag:
        return weight_help(spec)
    text = _sentence(option.text) + "."
    if spec is not None:
        text += f" With {spec.flag} ({spec.name})" + ("." if option.kwargs.get("action") == "store_true" else ";")
    if option.kwargs.get("action") != "store_true":
        text += f" {'default' if spec is not None else 'Default'}: {_default(option)}."
    return _plain(text)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the plugin's argument group to ``parser`` (open_clip_train's parser). Idempotent: the
    launcher and open_clip_train's plugin hook (when the patch is applied) may both call it. Where
    open_clip has its own ``--fsdp`` (open_clip main), the plugin's FSDP flags are left out."""
    if plugin_destinations(parser):
        return parser
    upstream_fsdp = parser_has_own_fsdp(parser)
    g = parser.add_argument_group(GROUP_TITLE)
    for option, spec in all_options():
        if not (upstream_fsdp and option.flag.startswith("--fsdp")):
            g.add_argument(option.flag, **option.kwargs, help=option_help(option, spec))
    return parser


def parser_has_own_fsdp(parser: argparse.ArgumentParser) -> bool:
    """open_clip main's parser already has ``--fsdp`` (its own FSDP2)."""
    return "--fsdp" in parser._option_string_actions


def _default(option: Option) -> str:
    if option.kwargs.get("action") == "store_true":
        return "off"
    if option.shown_default:
        return option.shown_default
    value = option.kwargs.get("default")
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def flag_table() -> str:
    """The README's flag table (markdown), from the registry and :data:`GENERAL_OPTIONS`: the same
    fields as each flag's ``--help``."""
    rows = ["| flag | default | what |", "|---|---|---|"]
    for option, spec in all_options():
        if spec is not None and option.flag == spec.flag:
            what = "; ".join([spec.title, spec.paper, f"logged {', '.join(f'`{k}`' for k in spec.logged)}"]
                             + _needs(spec))
            rows.append(f"| `{option.flag} W` | 0 (off) | {what} |")
        else:
            choices = option.kwargs.get("choices")
            takes_value = option.kwargs.get("action") != "store_true"
            shown = (f"{option.flag} {{{','.join(map(str, choices))}}}" if choices
                     else f"{option.flag} {option.kwargs.get('metavar', 'V')}" if takes_value else option.flag)
            rows.append(f"| `{shown}` | {_default(option)} | {option.text} |")
    return "\n".join(rows)


def plugin_destinations(parser: argparse.ArgumentParser) -> list:
    """``dest`` names of the plugin's flags in ``parser``."""
    for group in parser._action_groups:  # argparse keeps groups only privately
        if group.title == GROUP_TITLE:
            return [a.dest for a in group._group_actions]
    return []


def _launched_world_size() -> int:
    """The number of processes the launcher (torchrun, SLURM, MPI) started, as open_clip_train reads it."""
    from open_clip_train.distributed import world_info_from_env

    return world_info_from_env()[2]


def validate(args) -> None:
    """Cross-flag checks; raises :class:`FlagError` naming the flags and the allowed values."""
    if args.val_structure_metrics == "all":
        if not getattr(args, "val_data", None):
            raise FlagError("--val-structure-metrics all needs --val-data (webdataset shards with a .cls label)")
        if getattr(args, "dataset_type", "auto") not in ("webdataset", "auto") or (
                args.dataset_type == "auto" and ".tar" not in args.val_data):
            raise FlagError("--val-structure-metrics all reads labels from webdataset validation shards "
                            f"(<key>.cls); --val-data {args.val_data} is not webdataset (use 'gap')")
        from .evaluation.in_training import first_sample_problem
        problem = first_sample_problem(args.val_data)
        if problem:
            raise FlagError(f"--val-structure-metrics all: {problem} (use 'gap', or add a <key>.cls label)")
    prompt_files = [f for f, v in (("--val-zeroshot-classnames", getattr(args, "val_zeroshot_classnames", None)),
                                   ("--val-zeroshot-templates", getattr(args, "val_zeroshot_templates", None))) if v]
    if prompt_files and args.val_structure_metrics != "all":
        raise FlagError(f"{', '.join(prompt_files)} only feed the labelled validation metrics: "
                        "add --val-structure-metrics all")
    if getattr(args, "text_aug", "none") != "none" and not views_enabled(args):
        raise FlagError(f"--text-aug {args.text_aug} only feeds the two-view regularizers: set one of "
                        f"{view_flags()} > 0 (or drop --text-aug)")
    own_fsdp = hasattr(args, "fsdp_param_dtype")  # else --fsdp is open_clip main's own
    fsdp_options = [f for f, on in (("--fsdp-param-dtype", getattr(args, "fsdp_param_dtype", "fp32") != "fp32"),
                                    ("--fsdp-reduce-dtype", getattr(args, "fsdp_reduce_dtype", "fp32") != "fp32"),
                                    ("--fsdp-sharded-checkpoint", getattr(args, "fsdp_sharded_checkpoint", False)))
                    if on]
    if fsdp_options and not args.fsdp:
        raise FlagError(f"{', '.join(fsdp_options)} need --fsdp")
    if getattr(args, "fsdp", False) and getattr(args, "horovod", False):
        raise FlagError("--fsdp cannot be combined with --horovod")
    if own_fsdp and args.fsdp and _launched_world_size() < 2:
        raise FlagError("--fsdp needs more than one process (torchrun --nproc_per_node N ...): with one process "
                        "open_clip builds no data-parallel wrapper, so nothing would be sharded")
    ramped = [spec.flag for spec in TERMS if spec.gap_schedule]
    if args.gap_schedule == "ramp" and not any(spec.gap_schedule for spec in enabled(args)):
        raise FlagError(f"--gap-schedule ramp needs {' or '.join(ramped)} > 0")
    if not regularizers_enabled(args) and args.fixed_temperature is None:
        return
    if getattr(args, "horovod", False):
        raise FlagError("--horovod is not supported by openclip-structure's regularizers or "
                        "--fixed-temperature; use torchrun (torch.distributed) instead")
    if views_enabled(args) and (getattr(args, "distill_model", None) or getattr(args, "distill_pretrained", None)):
        raise FlagError("distillation (--distill-model/--distill-pretrained) cannot be combined with the "
                        f"two-view regularizers ({view_flags()}): the teacher would see the stacked views")
    from .views.audio import check_audio_args
    check_audio_args(args)  # a view term on an audio-text (CLAP) model: no audio view
    if separation_enabled(args):
        from .views import towers

        why = towers.config_problem(getattr(args, "model", None))
        if why:
            raise FlagError(towers.refusal(args.model, why))
    if views_enabled(args) and getattr(args, "torchscript", False):
        raise FlagError(f"--torchscript cannot be combined with the two-view regularizers ({view_flags()}): "
                        "open_clip compiles the model's class forward with torch.jit.script, which cannot run the "
                        "plugin's two-view forward or read the pooled features beside each projection "
                        "(drop --torchscript for training; a checkpoint can be scripted afterwards)")
    if args.gap_schedule == "ramp" and getattr(args, "skip_scheduler", False):
        raise FlagError("--gap-schedule ramp follows the LR scheduler's step; it cannot be used "
                        "with --skip-scheduler (use --gap-schedule constant)")
