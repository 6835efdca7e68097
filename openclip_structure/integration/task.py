"""open_clip main (4.x dev): the hooks on its task API.

open_clip main trains a *task* (``open_clip.create_task`` -> ``CLIPTask(model, loss=...)``, which
sums the ``*_loss`` keys the loss returns) and shards with its own ``--fsdp`` (FSDP2). Here the
plugin

* hands the task our loss (:func:`openclip_structure.factory.create_loss` on top of the loss the
  task built: every key ends in ``_loss`` and every rank returns the same keys at every step);
* lets open_clip's own ``--fsdp`` (and ``prepare_distributed``) wrap the model: the plugin's FSDP
  flags are not added there; on CPU, ``prepare_distributed`` of that task object drops
  ``device_ids=[cpu]`` as on 3.x;
* prepares the model, data, progress and validation metrics with the same hooks as on 3.x, and
  keeps the separation heads beside each checkpoint (read back after ``load_checkpoint``);
* scores multi-caption ``--val-data`` with the COCO protocol, the 3.x pass on the task's evaluation
  model (:func:`wrap_evaluate`; the captions are the ``.txt`` lines or the ``--json-text-key`` fields).

Names replaced inside open_clip_train's modules (checked at startup like the 3.x table):
:data:`TABLE`. Supported scope: CLIP models (CLIPTask and its SigLIP/CoCa siblings for the loss-
only terms) and audio-text CLAP models (CLAPTask: the loss-only terms, ``--fixed-temperature`` and the
validation gap metrics between audio and text; the view terms are refused, :mod:`..audio`);
``--val-structure-metrics all`` is refused there (the label pass uses 3.x's model handling). Under
open_clip's ``--fsdp`` every term, the views and the heads train and follow the
DDP run exactly (tested); the two-view forward calls the model class's ``encode_*``, not the FSDP
forward methods open_clip registers on the instance (those would reshard the root mid-forward).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

from .. import factory, flags, fsdp
from ..registry import view_flags
from ..schedule import PROGRESS
from ..views.audio import name_modalities
from . import checkpoints, progress, shim, state, validation
from .model import refuse
from .parallel import _cpu_only

#: open_clip main snapshots the task table was checked against
VERSIONS_CHECKED = ("4.2.0.dev0 (git main snapshot)",)


def wrap_create_task(create_task):
    @functools.wraps(create_task)
    def create(args, *a, **kw):
        task = create_task(args, *a, **kw)
        run = state.current()
        if run is None:
            return task
        run.upstream_fsdp = True
        if getattr(args, "val_structure_metrics", "gap") == "all":
            refuse(args, flags.FlagError("--val-structure-metrics all is not supported on open_clip main's task "
                                         "API (use 'gap', or python -m openclip_structure.evaluate on a checkpoint)"))
        if flags.views_enabled(args) and hasattr(task, "_build_loss_inputs"):  # CoCaTask
            refuse(args, flags.FlagError(
                f"the view-based terms ({view_flags()}) cannot train a {type(task).__name__} on open_clip main: "
                "it builds its loss inputs itself and drops the second view (they train CoCa on open_clip 3.x; "
                "on main use the loss-only terms)"))
        base = getattr(task, "loss", None)
        if base is not None:
            task.loss = factory.create_loss(args, base_factory=lambda _args: base, progress=PROGRESS)
        name_modalities(task, getattr(task, "loss", None), getattr(args, "rank", 0))  # CLAPTask: audio, text
        prepare = task.prepare_distributed

        def prepare_distributed(device_ids=None, **ddp_kwargs):  # this task object only
            return prepare(device_ids=None if _cpu_only(device_ids) else device_ids, **ddp_kwargs)

        task.prepare_distributed = prepare_distributed
        return task

    return create


def wrap_train_one_epoch(train_one_epoch):
    @functools.wraps(train_one_epoch)
    def train_and_record(train_state, data, args, *a, **kw):
        out = train_one_epoch(train_state, data, args, *a, **kw)
        run = state.current()
        if run is not None:
            progress.check_tracked(args)
            if run.heads is not None:  # all ranks (the gather of sharded heads is collective)
                checkpoints.save_heads(run, train_state.epoch + 1, checkpoints.full_heads_state(run.heads))
        return out

    return train_and_record


def wrap_load_checkpoint(load_checkpoint):
    @functools.wraps(load_checkpoint)
    def load(task, path, *a, **kw):
        run = state.current()
        if run is None:
            return load_checkpoint(task, path, *a, **kw)
        path, epoch = checkpoints.load_resume_checkpoint(run, lambda p: load_checkpoint(task, p, *a, **kw), path)
        checkpoints.restore_heads(run, path, epoch=epoch,
                                  load=lambda saved: fsdp.load_full_params(dict(run.heads.named_parameters()), saved))
        return epoch

    return load


def _eval_model(task):
    """The module main's validation encodes with (the EMA copy when there is one; DDP unwrapped)."""
    from open_clip.task import get_model_from_task

    get = getattr(task, "get_trainable_module", None)
    return get(use_ema=True) if callable(get) else get_model_from_task(task)


def wrap_evaluate(evaluate):
    """main's ``evaluate(task, data, epoch, args, ...)``: rank 0's COCO-protocol pass over multi-caption
    ``--val-data`` (the ``.txt`` lines, or the ``--json-text-key`` fields), the 3.x hook's own
    (:meth:`.validation.ValidationHook.wrap_evaluate`) on the task's evaluation model. Under main's
    distributed ``--fsdp`` every rank encodes in lockstep (main's own zero-shot evaluation calls the
    sharded ``encode_*`` the same way) and rank 0 keeps the result. Not for a task whose first
    modality is not images (CLAP)."""
    @functools.wraps(evaluate)
    def evaluate_with_coco(task, data, epoch, args, *a, **kw):
        run = state.current()
        if run is None or getattr(task, "primary_key", "image") != "image":
            return evaluate(task, data, epoch, args, *a, **kw)
        sharded = bool(getattr(args, "fsdp", False) and getattr(args, "distributed", False))
        return validation.of(run).wrap_evaluate(evaluate, encoder=_eval_model, every_rank=sharded)(task, data, epoch,
                                                                                               args, *a, **kw)

    return evaluate_with_coco


_MAIN, R = shim.MAIN, shim.Replacement

#: the names replaced in open_clip main's open_clip_train: those it shares with 3.x (the shim's own
#: entries), then the task API's
TABLE = shim.entries((shim.PARAMS, "argparse"), (_MAIN, "create_model_and_transforms"), (_MAIN, "get_data"),
                     (_MAIN, "cosine_lr"), (_MAIN, "const_lr"), (_MAIN, "const_lr_cooldown"),
                     (shim.TRAIN, "get_clip_metrics")) + (
    R(_MAIN, "create_task", "main", "loss: the task's loss plus the enabled terms; CPU DDP", hook=wrap_create_task),
    R(_MAIN, "train_one_epoch", "main", "checkpoints: separation heads beside each checkpoint",
      hook=wrap_train_one_epoch),
    R(_MAIN, "load_checkpoint", "main", "checkpoints: heads on --resume, skip a half-written latest checkpoint",
      hook=wrap_load_checkpoint),
    R(_MAIN, "evaluate", "main", "validation: COCO-protocol pass over multi-caption --val-data", hook=wrap_evaluate),
)


@contextlib.contextmanager
def installed() -> Iterator:
    """A run is current and :data:`TABLE`'s names are in place in open_clip main's open_clip_train."""
    modules = shim.training_modules(table=TABLE)
    shim.check(modules, table=TABLE, checked=VERSIONS_CHECKED)
    with state.running() as run, shim.replaced(TABLE, modules):
        run.upstream_fsdp = True
        yield modules[_MAIN]
