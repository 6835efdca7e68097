"""Model hook: what the plugin does to the freshly created training model and its transforms:
``--fixed-temperature``, the separation heads (restored from beside a ``--pretrained`` plugin
checkpoint), the two-view forward (:mod:`.forward`) and train preprocess (:func:`prepare_model`);
a model that cannot carry the requested terms stops the run like a flag error (:func:`refuse`)."""
from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import sys

import torch

from .. import registry
from ..views.heads import attach_heads
from ..views.image import TwoViews, augmented_view_transform
from ..views.towers import UnsupportedModelError
from . import checkpoints, state
from .forward import install_forward


def fix_temperature(model, temperature: float) -> None:
    """Freeze the logit scale at ``1 / temperature``."""
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1.0 / temperature))
    model.logit_scale.requires_grad_(False)


def prepare_model(args, model_name: str, model, preprocess_train):
    """What the launcher does to the freshly created training model: attach separation heads,
    install the two-view forward, wrap the train preprocess. Returns ``(preprocess_train, heads)``."""
    heads = None
    if registry.separation_enabled(args):
        heads = attach_heads(model, model_name)
    if registry.views_enabled(args):
        install_forward(model)
        image_size = getattr(getattr(model, "visual", None), "image_size", None)
        aug = augmented_view_transform(preprocess_train, args.view_aug, image_size=image_size)
        preprocess_train = TwoViews(preprocess_train, aug)
        if getattr(args, "rank", 0) == 0:
            logging.info(f"openclip-structure: two views per sample (--view-aug {args.view_aug}, "
                         f"--text-aug {args.text_aug}); separation heads: {'on' if heads is not None else 'off'}")
    return preprocess_train, heads


def prepare(run: state.Run, model_name: str, model, preprocess_train, preprocess_val):
    """Prepare the training model (once per run); returns the train preprocess to use."""
    args = run.args
    run.model = model
    if getattr(args, "rank", 0) == 0:
        logging.info(f"openclip-structure: {state.route_description()}")
    run.preprocess_val = preprocess_val
    if args.fixed_temperature is not None:
        fix_temperature(model, args.fixed_temperature)
    try:  # two views + separation heads
        preprocess_train, run.heads = prepare_model(args, model_name, model, preprocess_train)
    except UnsupportedModelError as e:
        refuse(args, e)
    checkpoints.restore_pretrained(run, getattr(args, "pretrained", None))  # fine-tuning: the heads too
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
