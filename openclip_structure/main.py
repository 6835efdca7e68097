"""Launcher: open_clip_train's training entrypoint with the plugin installed.

    python -m openclip_structure.main [--] <open_clip_train flags> <plugin flags>
    torchrun --nproc_per_node N -m openclip_structure.main -- <flags>

This is the only place that patches open_clip_train. While :func:`main` runs it

* adds the plugin's argument group to open_clip_train's own parser (``--help``, ``params.txt``
  and the wandb config show the flags) and validates it before anything else happens;
* replaces ``create_loss`` with :func:`openclip_structure.factory.create_loss`;
* wraps the LR-scheduler factories so loss-weight schedules know the global step;
* applies ``--fixed-temperature`` to the created model (logit scale frozen at 1/T);
* lets DistributedDataParallel run on CPU (open_clip 3.x passes ``device_ids=[cpu]``), or shards
  the model with FSDP2 instead with ``--fsdp`` (:mod:`openclip_structure.fsdp`: full-state
  checkpoints on rank 0, optional sharded copies, rank-0 evaluation on an unsharded replica);
* adds the gap (and optionally group-level) metrics to ``--val-data`` validation
  (:mod:`openclip_structure.validation`);
* with the two-view regularizers, wraps the train preprocess / train tokenizer and the model's
  forward (:mod:`openclip_structure.views`); with ``--sep-weight``, attaches the separation heads,
  saves them as ``checkpoint["structure_heads"]`` (``torch.save`` wrapper, training-checkpoint
  dicts only) and restores them on ``--resume`` (``pt_load`` wrapper) (:mod:`openclip_structure.heads`).

Everything is restored when :func:`main` returns.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import sys
from typing import List, Optional, Sequence

import torch

from . import factory, flags, fsdp, views
from .distributed import CPUFriendlyDDP
from .heads import CheckpointHooks
from .schedule import PROGRESS
from .validation import ValidationHook

MODEL_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "model_configs")


def register_model_configs() -> None:
    """Make the bundled tiny configs (e.g. ``structure-tiny``) known to open_clip."""
    import open_clip

    open_clip.add_model_config(MODEL_CONFIG_DIR)


def parse_args_with_plugin(original_parse_args, argv: Sequence[str]) -> argparse.Namespace:
    """open_clip_train's ``parse_args`` with the plugin group added to the same parser."""
    original = argparse.ArgumentParser.parse_args

    def parse_with_plugin(parser, args=None, namespace=None):
        flags.add_arguments(parser)
        ns = original(parser, args, namespace)
        try:
            flags.validate(ns)
        except flags.FlagError as e:
            parser.error(str(e))
        return ns

    argparse.ArgumentParser.parse_args = parse_with_plugin
    try:
        return original_parse_args(list(argv))
    finally:
        argparse.ArgumentParser.parse_args = original


def _wrap_scheduler(factory_fn):
    @functools.wraps(factory_fn)
    def make(optimizer, base_lr, warmup_length, steps, *args, **kwargs):
        adjust = factory_fn(optimizer, base_lr, warmup_length, steps, *args, **kwargs)
        PROGRESS.total_steps = int(steps)

        def adjust_and_record(step):
            PROGRESS.step = int(step)
            return adjust(step)

        return adjust_and_record

    return make


def _fix_temperature(model, temperature: float) -> None:
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1.0 / temperature))
    model.logit_scale.requires_grad_(False)


_launcher_parsing = False  # installed() entered by the launcher itself (it parses and builds the loss)


def launcher_owns_parsing() -> bool:
    """True while the launcher's own :func:`installed` (``args=None``) is in effect: open_clip_train's
    plugin hook (:mod:`openclip_structure.plugin`) then stands aside."""
    return _launcher_parsing


@contextlib.contextmanager
def installed(ocm=None, args=None):
    """Patch ``open_clip_train.main`` (module ``ocm``) for the duration of the block.

    ``args``: already parsed by open_clip_train's plugin hook (:mod:`openclip_structure.plugin`),
    which also adds/validates the flags and wraps ``create_loss``: those two are then left alone.
    """
    if ocm is None:
        import open_clip_train.main as ocm
    state = {}
    orig = {name: getattr(ocm, name) for name in
            ("parse_args", "create_loss", "create_model_and_transforms", "evaluate", "train_one_epoch",
             "cosine_lr", "const_lr", "const_lr_cooldown", "pt_load", "get_data")}
    orig_ddp = torch.nn.parallel.DistributedDataParallel
    orig_scaler = torch.amp.GradScaler
    orig_save = torch.save
    ckpt_hooks = CheckpointHooks()  # separation heads <-> checkpoint["structure_heads"]

    import open_clip_train.train as oct
    hook = ValidationHook()
    orig_metrics = oct.get_clip_metrics

    def parse_args(argv):
        args = parse_args_with_plugin(orig["parse_args"], argv)
        state["args"] = hook.args = args
        return args

    def create_model_and_transforms(model_name, *a, **kw):
        out = orig["create_model_and_transforms"](model_name, *a, **kw)
        args = state.get("args")
        if args is not None and model_name == args.model:
            hook.preprocess_val = out[2]
            if args.fixed_temperature is not None:
                _fix_temperature(out[0], args.fixed_temperature)
            # two views + separation heads (raises UnsupportedModelError before training)
            preprocess_train, ckpt_hooks.heads = views.prepare_model(args, model_name, out[0], out[1])
            ckpt_hooks.model = out[0]
            out = (out[0], preprocess_train) + tuple(out[2:])
        return out

    def create_loss(args):
        return factory.create_loss(args, base_factory=orig["create_loss"], progress=PROGRESS)

    def use_fsdp() -> bool:
        return bool(getattr(state.get("args"), "fsdp", False))

    class DataParallel(CPUFriendlyDDP):
        """open_clip's DDP call: FSDP2 with --fsdp, else DDP that also runs on CPU."""

        def __new__(cls, module, *a, **kw):
            if use_fsdp():
                state["fsdp_model"] = fsdp.wrap(module, state["args"])
                return state["fsdp_model"]  # not a cls instance: __init__ is skipped
            return super().__new__(cls)

    def grad_scaler(*a, **kw):
        return (fsdp.GradScaler if use_fsdp() else orig_scaler)(*a, **kw)

    def train_one_epoch(model, data, loss, epoch, optimizer, *a, **kw):
        out = orig["train_one_epoch"](model, data, loss, epoch, optimizer, *a, **kw)
        if fsdp.is_wrapped(model):  # all ranks: rank 0 then saves open_clip's full checkpoint
            fsdp.gather_full_state(model, optimizer)
            args = state["args"]
            if args.fsdp_sharded_checkpoint:
                where = os.path.join(args.logs, args.name, "checkpoints", f"epoch_{epoch + 1}_dcp")
                os.makedirs(where, exist_ok=True)
                fsdp.save_sharded(model, optimizer, where, epoch + 1)
        return out

    validation_evaluate = hook.wrap_evaluate(orig["evaluate"])

    def evaluate(model, data, epoch, args, *a, **kw):
        if fsdp.is_wrapped(model):  # evaluation runs on rank 0 only: give it an unsharded replica
            if not fsdp.has_full_state(model):
                fsdp.gather_full_state(model)
            if args.rank != 0:
                return {}
            model = fsdp.eval_model(model)
        return validation_evaluate(model, data, epoch, args, *a, **kw)

    heads_pt_load = ckpt_hooks.wrap_pt_load(orig["pt_load"])

    def pt_load(path, *a, **kw):
        container = state.get("fsdp_model")
        if container is not None and fsdp.is_sharded_checkpoint(path):
            optimizer = next(iter(fsdp._state(container).optimizers), None)
            return fsdp.sharded_resume_checkpoint(container, path, optimizer)
        return heads_pt_load(path, *a, **kw)

    if args is not None:
        state["args"] = hook.args = args
    PROGRESS.reset()
    patches = dict(parse_args=parse_args, create_loss=create_loss,
                   create_model_and_transforms=create_model_and_transforms,
                   evaluate=evaluate, train_one_epoch=train_one_epoch, pt_load=pt_load,
                   get_data=views.wrap_get_data(orig["get_data"], lambda: state.get("args")),
                   **{k: _wrap_scheduler(orig[k]) for k in ("cosine_lr", "const_lr", "const_lr_cooldown")})
    if args is not None:
        del patches["parse_args"], patches["create_loss"]
    for k, v in patches.items():
        setattr(ocm, k, v)
    torch.nn.parallel.DistributedDataParallel = DataParallel
    torch.amp.GradScaler = grad_scaler
    binding = fsdp.optimizer_binding()  # sharded models' optimizers get full-state (de)serialisation
    binding.__enter__()
    global _launcher_parsing
    outer_parsing, _launcher_parsing = _launcher_parsing, args is None
    torch.save = ckpt_hooks.wrap_save(orig_save)
    oct.get_clip_metrics = hook.wrap_get_clip_metrics(orig_metrics)
    try:
        yield ocm
    finally:
        for k, v in orig.items():
            setattr(ocm, k, v)
        torch.nn.parallel.DistributedDataParallel = orig_ddp
        torch.amp.GradScaler = orig_scaler
        binding.__exit__(None, None, None)
        _launcher_parsing = outer_parsing
        torch.save = orig_save
        oct.get_clip_metrics = orig_metrics


def main(argv: Optional[List[str]] = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `torchrun ... -m openclip_structure.main -- --flags`
        argv = argv[1:]
    register_model_configs()
    with installed() as ocm:
        result = ocm.main(argv)
    _shutdown_process_group()
    return result


def _shutdown_process_group() -> None:
    """open_clip_train never destroys its process group; do it once every rank is done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    # run the imported module's main(), not this __main__ copy's, so that there is one launcher
    # state (launcher_owns_parsing) for open_clip_train's plugin hook to see
    from openclip_structure.main import main as _main

    sys.exit(_main())
