"""Model hook: what the plugin does to the freshly created training model and its transforms:
``--fixed-temperature``, the separation heads, the two-view forward and train preprocess
(:func:`openclip_structure.views.prepare_model`)."""
from __future__ import annotations

import functools
import logging
import math

import torch

from .. import views
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
    # two views + separation heads (raises UnsupportedModelError before training)
    preprocess_train, run.heads = views.prepare_model(args, model_name, model, preprocess_train)
    return preprocess_train


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
