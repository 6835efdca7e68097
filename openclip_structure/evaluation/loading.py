"""Loading a model for evaluation: a training checkpoint (with an open_clip config name), an
exported ``local-dir:`` folder or an open_clip pretrained tag, through plain open_clip
(``create_model_and_transforms``), with short errors for weights that do not fit."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple

import torch

from .exporter import CheckpointError, format_key_mismatch, key_mismatch, quiet_open_clip_logging, \
    read_checkpoint_state_dict

LOCAL_DIR = "local-dir:"


def _device(device: Optional[str]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here")
    return d


def _resolve_source(model_name: Optional[str], pretrained: Optional[str]) -> Tuple[str, Optional[str]]:
    """``(name for open_clip, pretrained or None)``; validates paths before open_clip sees them."""
    import open_clip

    if pretrained and pretrained.startswith(LOCAL_DIR):
        name, pretrained = pretrained, None
    elif model_name and model_name.startswith(LOCAL_DIR):
        if pretrained:
            raise ValueError(f"--model {model_name} already names the weights; drop --pretrained {pretrained}")
        name = model_name
    else:
        if not model_name:
            raise ValueError("--model NAME is needed for a training checkpoint (or pass local-dir:PATH)")
        if open_clip.get_model_config(model_name) is None:
            raise ValueError(f"unknown model config {model_name!r} (bundled: structure-*; "
                             f"open_clip has e.g. {', '.join(open_clip.list_models()[:5])}, ...)")
        name = model_name
        if not pretrained:
            raise ValueError("no weights given: pass --pretrained CKPT (a file, an open_clip tag, or local-dir:PATH)")
        if os.path.isdir(pretrained):
            raise CheckpointError(f"{pretrained} is a folder: pass local-dir:{pretrained} for an exported model")
        if not os.path.isfile(pretrained) and not open_clip.get_pretrained_cfg(model_name, pretrained):
            raise CheckpointError(f"checkpoint file not found: {pretrained}")
    if name.startswith(LOCAL_DIR):
        folder = Path(name[len(LOCAL_DIR):])
        if not folder.is_dir():
            raise CheckpointError(f"model folder not found: {folder}")
        if not (folder / "open_clip_config.json").is_file():
            raise CheckpointError(f"{folder} has no open_clip_config.json (export a checkpoint with "
                                  "python -m openclip_structure.export)")
    return name, pretrained


def _diagnose_load_failure(name: str, path: str, err: BaseException) -> None:
    """Turn open_clip's failure to load ``path`` into a short :class:`CheckpointError`, if possible."""
    import open_clip

    state_dict = read_checkpoint_state_dict(path)  # raises CheckpointError for pickled objects
    with quiet_open_clip_logging():
        bare = open_clip.create_model(name, pretrained=None, device="cpu")
    missing, unexpected, shapes = key_mismatch(bare, state_dict)
    if missing or unexpected or shapes:
        raise CheckpointError(f"checkpoint {path} does not match model {name!r}: "
                              f"{format_key_mismatch(missing, unexpected, shapes)}") from err


def load_model(model_name: Optional[str], pretrained: Optional[str], device=None):
    """``(model, preprocess_val, tokenizer)`` in eval mode on ``device``.

    ``pretrained`` is a training checkpoint (with ``model_name`` an open_clip config name),
    ``local-dir:PATH`` (``model_name`` ignored), or an open_clip pretrained tag. The bundled
    model configs are registered first. Raises :class:`CheckpointError` with the missing /
    unexpected keys when the weights do not fit the model, or when the file holds pickled
    non-tensor objects.
    """
    import open_clip

    from ..configs import register_model_configs

    register_model_configs()
    dev = _device(device)
    name, pretrained = _resolve_source(model_name, pretrained)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=dev)
    except Exception as e:
        if pretrained and os.path.isfile(pretrained):
            _diagnose_load_failure(name, pretrained, e)
        raise
    tokenizer = open_clip.get_tokenizer(name)
    model.eval()
    return model, preprocess, tokenizer
