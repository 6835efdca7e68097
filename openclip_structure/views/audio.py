"""Audio-text (CLAP) training on open_clip main: which terms apply, and how its modalities are named.

open_clip main trains CLAP models with ``CLAPTask``, which hands its ``ClipLoss`` the audio
embeddings as ``image_features`` and the caption embeddings as ``text_features``. The plugin's loss
sits in the same place, so every loss-only term (``--gap-atp-weight``, ``--gap-cu-weight``,
``--gc-weight``) and ``--fixed-temperature`` act between the audio and the text embeddings; where a
flag or a term says *image* (``--gap-anchor image``), it is the audio side there.

The view terms need a second, augmented view of each sample, and there is no audio view: they are
refused before anything is built (:func:`check_audio_args`, an ``error:`` line and exit code 2).
"""
from __future__ import annotations

import logging

from ..errors import FlagError
from ..registry import TERMS

#: open_clip main's audio dataset types (``--dataset-type``)
AUDIO_DATASET_TYPES = ("webdataset-audio", "synthetic-audio")


def audio_model(args) -> bool:
    """Whether this run trains an audio-text model: an audio dataset type, or a model config with an
    ``audio_cfg`` (built-in or ``local-dir:``; an ``hf-hub:`` config is not fetched here)."""
    if getattr(args, "dataset_type", None) in AUDIO_DATASET_TYPES:
        return True
    name = getattr(args, "model", None) or ""
    if not name or name.startswith("hf-hub:"):
        return False
    try:
        from open_clip import get_model_config

        cfg = get_model_config(name)
    except Exception:  # noqa: BLE001 - an unreadable config is open_clip's to report
        return False
    return isinstance(cfg, dict) and "audio_cfg" in cfg


def refused_view_terms(args):
    """The weight flags set > 0 whose terms need a second view."""
    return [spec.flag for spec in TERMS if spec.views and spec.weight(args) > 0]


def check_audio_args(args) -> None:
    """Raise :class:`openclip_structure.errors.FlagError` for a view term on an audio-text model."""
    if not audio_model(args):
        return
    flags = refused_view_terms(args)
    if flags:
        raise FlagError(
            f"{', '.join(flags)} cannot train the audio-text model {args.model!r} (CLAP): "
            f"{'this term needs' if len(flags) == 1 else 'these terms need'} a second, augmented view of "
            f"each sample, and there is no audio view. On CLAP use the loss-only terms "
            f"({', '.join(spec.flag for spec in TERMS if not spec.views)}) and --fixed-temperature.")


def modality_note(task_name: str, primary: str) -> str:
    """The startup line that names the modalities of a non-image task (``primary``: e.g. ``audio``)."""
    return (f"openclip-structure: {task_name} trains {primary}-text: the terms read {primary}_features where "
            f"the flags say image (--gap-anchor image anchors the {primary} embeddings) and text_features; "
            f"the validation metric intra_image_cos is logged as intra_{primary}_cos")


def name_modalities(task, loss, rank: int = 0) -> str:
    """On a task whose first modality is not ``image`` (``CLAPTask``: ``audio``), name it in the loss's
    messages and log once which embeddings the terms read. Returns the modality's name."""
    primary = str(getattr(task, "primary_key", "image"))
    if primary != "image":
        if isinstance(getattr(loss, "input_names", None), dict):
            loss.input_names["image"] = f"{primary}_features"
        if rank == 0:
            logging.info(modality_note(type(task).__name__, primary))
    return primary
