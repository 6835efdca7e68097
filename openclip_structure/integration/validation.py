"""Validation hook: gap (and group) metrics in open_clip's ``--val-data`` evaluation
(:class:`openclip_structure.evaluation.in_training.ValidationHook`), and evaluation of an FSDP2-sharded model
on an unsharded rank-0 replica."""
from __future__ import annotations

import functools

from .. import fsdp
from . import state


def wrap_get_clip_metrics(get_clip_metrics):
    @functools.wraps(get_clip_metrics)
    def get_clip_and_structure_metrics(image_features, text_features, logit_scale, **kwargs):
        run = state.current()
        if run is None:
            return get_clip_metrics(image_features=image_features, text_features=text_features,
                                    logit_scale=logit_scale, **kwargs)
        return run.validation.wrap_get_clip_metrics(get_clip_metrics)(image_features, text_features, logit_scale,
                                                                       **kwargs)

    return get_clip_and_structure_metrics


def wrap_evaluate(evaluate):
    @functools.wraps(evaluate)
    def evaluate_with_structure(model, data, epoch, args, *a, **kw):
        run = state.current()
        if run is None:
            return evaluate(model, data, epoch, args, *a, **kw)
        if fsdp.is_wrapped(model):  # evaluation runs on rank 0 only: give it an unsharded replica
            if not fsdp.has_full_state(model):
                fsdp.gather_full_state(model)
            if args.rank != 0:
                return {}
            model = fsdp.eval_model(model)
        return run.validation.wrap_evaluate(evaluate)(model, data, epoch, args, *a, **kw)

    return evaluate_with_structure
