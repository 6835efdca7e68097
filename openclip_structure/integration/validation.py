"""Validation hook: gap (and group) metrics in open_clip's ``--val-data`` evaluation (the measures:
:mod:`openclip_structure.evaluation.in_training`), and evaluation of an FSDP2-sharded model on an
unsharded rank-0 replica.

open_clip's ``evaluate`` runs first through :meth:`ValidationHook.wrap_evaluate` (rank 0's extra
passes: the labelled group metrics with ``--val-structure-metrics all``, the COCO protocol with
several captions per image), then open_clip's ``get_clip_metrics`` through
:meth:`ValidationHook.wrap_get_clip_metrics`, which adds the label-free measures and the pending
extra-pass results to open_clip's own metrics.
"""
from __future__ import annotations

import functools
import logging
import time
from typing import Callable, Dict

import torch

from .. import fsdp
from . import state


def _measures():
    """The measures (training reaches the evaluation toolkit only lazily)."""
    from ..evaluation import in_training

    return in_training


def of(run: state.Run) -> "ValidationHook":
    """The run's validation hook (created on first use)."""
    if run.validation is None:
        run.validation = ValidationHook(run)
    return run.validation


def wrap_get_clip_metrics(get_clip_metrics):
    @functools.wraps(get_clip_metrics)
    def get_clip_and_structure_metrics(image_features, text_features, logit_scale, **kwargs):
        run = state.current()
        if run is None:
            return get_clip_metrics(image_features=image_features, text_features=text_features,
                                    logit_scale=logit_scale, **kwargs)
        return of(run).wrap_get_clip_metrics(get_clip_metrics)(image_features, text_features, logit_scale,
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
        return of(run).wrap_evaluate(evaluate)(model, data, epoch, args, *a, **kw)

    return evaluate_with_structure


def _unwrap(model):  # DDP's .module
    return getattr(model, "module", model)


def _val_runs_this_epoch(data, epoch, args) -> bool:  # the condition open_clip's evaluate uses
    return "val" in data and bool(args.val_frequency) and (epoch % args.val_frequency == 0 or epoch == args.epochs)


class ValidationHook:
    """What the two validation hooks of one run share: the run (its args and the validation
    preprocess), the COCO-protocol pass, and the group metrics computed in ``evaluate`` and reported
    through ``get_clip_metrics``. One per run: :func:`of`."""

    def __init__(self, run: state.Run):
        from ..evaluation.coco import CocoValidation

        self.run = run
        self.pending: Dict[str, float] = {}
        self.coco = CocoValidation()  # several captions per image: the COCO protocol

    def wrap_get_clip_metrics(self, original):
        @functools.wraps(original)
        def get_clip_metrics(image_features, text_features, logit_scale, **kwargs):
            out = original(image_features=image_features, text_features=text_features, logit_scale=logit_scale,
                           **kwargs)
            mode = getattr(self.run.args, "val_structure_metrics", "none")
            if mode != "none":
                start = time.perf_counter()
                out.update(_measures().gap_val_metrics(image_features, text_features, kwargs.get("image_key") or "image"))
                out.update(self.pending)
                logging.info(f"openclip-structure: validation structure metrics in {time.perf_counter() - start:.2f}s")
            self.pending = {}
            return out

        return get_clip_metrics

    def wrap_evaluate(self, original, encoder: Callable = _unwrap, every_rank: bool = False):
        """``original(model, data, epoch, args, ...)`` after rank 0's extra passes; ``encoder(model)``
        is the module with ``encode_image``/``encode_text`` (open_clip main hands over its task).
        ``every_rank`` (a model sharded by open_clip main's ``--fsdp``): every rank runs the COCO
        pass in lockstep over the same data (the sharded model's collectives), rank 0 keeps it."""
        @functools.wraps(original)
        def evaluate(model, data, epoch, args, tb_writer=None, tokenizer=None):
            self.pending = {}
            mode = getattr(args, "val_structure_metrics", "none")
            if mode != "none" and (args.rank == 0 or every_rank) and _val_runs_this_epoch(data, epoch, args):
                if mode == "all" and not every_rank:  # main (every_rank) refuses 'all'
                    self.pending = self.group_metrics(encoder(model), args, tokenizer)
                coco = _measures().extra_pass("COCO-protocol validation", lambda: self.coco.compute(
                    encoder(model), self.run.preprocess_val, tokenizer, args))
                if args.rank == 0:
                    self.pending.update(coco)
            return original(model, data, epoch, args, tb_writer=tb_writer, tokenizer=tokenizer)

        return evaluate

    def group_metrics(self, model, args, tokenizer) -> Dict[str, float]:
        """Group metrics from a labelled pass over the validation shards (:func:`extra_pass`: a
        problem with the data, missing labels or an unreadable shard, skips them for this evaluation)."""
        from ..evaluation.evaluator import encode_shards, labelled_metrics

        def compute():
            stats: dict = {}
            with torch.inference_mode():
                img, txt, labels = encode_shards(model, self.run.preprocess_val, tokenizer, args.val_data,
                                                 batch_size=args.batch_size, device=args.device, stats=stats)
            if labels is None:
                raise ValueError(f"some validation samples of {args.val_data} have no .cls label")
            return (labelled_metrics(model, tokenizer, img, txt, labels, args.val_data,
                                     getattr(args, "val_zeroshot_classnames", None),
                                     getattr(args, "val_zeroshot_templates", None), text_image=stats["text_image"]),
                    f"{len(labels)} labelled validation pairs")

        return _measures().extra_pass("group metrics", compute)
