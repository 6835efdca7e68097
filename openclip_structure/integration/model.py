"""Model hook: what the plugin does to the freshly created training model and its transforms:
``--fixed-temperature``, the separation heads (restored from beside a ``--pretrained`` plugin
checkpoint), the two-view forward and train preprocess (:func:`openclip_structure.views.image.prepare_model`);
a model that cannot carry the requested terms stops the run like a flag error (:func:`refuse`)."""
from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import sys

import torch

from ..views import image as views
from ..views.heads import restore_pretrained
from ..views.towers import UnsupportedModelError
from . import state


def fix_temperature(model, temperature: float) -> None:
    """Freeze the logit scale at ``1 / temperature``."""
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1.0 / temperature))
    model.logit_scale.requires_grad_(False)


def prepare(run: state.Run, model_name: str, model, preprocess_train, preprocess_val):
    """Prepare the training model (once per run); returns the train preprocess to use."""
    args = run.args
    run.model = model
    if getattr(args, "rank", 0) == 0:
        logging.info(f"openclip-structure: {state.route_description()}")
    run.validation.preprocess_val = preprocess_val
    if args.fixed_temperature is not None:
        fix_temperature(model, args.fixed_temperature)
    try:  # two views + separation heads
        preprocess_train, run.heads = views.prepare_model(args, model_name, model, preprocess_train)
    except UnsupportedModelError as e:
        refuse(args, e)
    if run.heads is not None and getattr(args, "pretrained", None):
        restore_pretrained(run.heads, args.pretrained)  # fine-tuning a separation run: its heads too
    return preprocess_train


def _holds_checkpoints(folder: str) -> bool:
    return any(name.endswith((".pt", ".pth", ".safetensors")) or name.endswith("_dcp")
               for _, dirs, files in os.walk(folder) for name in files + dirs)


def refuse(args, error: Exception) -> None:
    """Stop a run whose model cannot carry what the flags ask, as a flag error does: an ``error:`` line on
    stderr and exit code 2, before any training step; the run folder open_clip just created (logs only,
    no checkpoint) is removed so that the same command can be rerun once fixed."""
    folder = os.path.join(getattr(args, "logs", None) or "", getattr(args, "name", None) or "")
    if getattr(args, "rank", 0) == 0 and getattr(args, "logs", None) and getattr(args, "name", None) \
            and os.path.isdir(folder) and not _holds_checkpoints(folder):
        for handler in list(logging.getLogger().handlers):  # open_clip's out.log handler
            if isinstance(handler, logging.FileHandler) and os.path.abspath(handler.baseFilename).startswith(
                    os.path.abspath(folder) + os.sep):
                logging.getLogger().removeHandler(handler)
                handler.close()
        shutil.rmtree(folder, ignore_errors=True)
    print(f"error: {error}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def wrap_create_model_and_transforms(create_model_and_transforms):
    @functools.wraps(create_model_and_transforms)
    def create(model_name, *args, **kwargs):
        out = create_model_and_transforms(model_name, *args, **kwargs)
        run = state.current()
        if run is None or run.args is None or run.model is not None or model_name != run.args.model:
            return out  # not ours to prepare (e.g. a distillation teacher)
        preprocess_train = prepare(run, model_name, out[0], out[1], out[2])
        return (out[0], preprocess_train) + tuple(out[2:])

    return create
