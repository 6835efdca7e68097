"""Checkpoint hook: the separation heads beside open_clip's checkpoints, FSDP2 full/sharded
state, and ``--resume``.

open_clip writes ``{"epoch", "name", "state_dict", "optimizer"[, "scaler"]}`` itself; the plugin
never touches that file or ``torch.save``. At the end of every epoch (after ``train_one_epoch``,
before open_clip saves), rank 0 writes the heads to their own file in the checkpoint folder,
``structure_heads_epoch_<N>.pth`` (not ``*.pt``, so ``--resume latest`` never picks it), atomically:
a temporary file, flushed and fsynced, then ``os.replace``. The files of the current and the
previous epoch, and of every epoch that has an ``epoch_<N>.pt``, are kept. So a process killed at
any moment leaves, for every checkpoint open_clip may resume from, the heads of the same epoch:

* killed while the heads file is written: only a temporary file is incomplete; open_clip has not
  written epoch N yet, and the previous epoch's heads are still there;
* killed after the heads file, before or while open_clip writes epoch N: the previous checkpoint
  (or, with ``--save-most-recent``, the untouched ``epoch_latest.pt``) and its heads are used; a
  half-written ``epoch_N.pt`` (open_clip writes it in place) is unreadable, and ``--resume latest``
  then falls back to the newest readable checkpoint (logged).

Every route restores the heads through :func:`restore_heads` (``--resume`` on open_clip 3.x and on
open_clip main, ``--pretrained`` fine-tuning): from ``checkpoint["structure_heads"]`` (checkpoints
of earlier versions of the plugin) or from the file of the checkpoint's epoch beside it
(:func:`openclip_structure.views.heads.saved_heads`).
"""
from __future__ import annotations

import functools
import glob
import logging
import os
import re
from typing import Callable, Optional

import torch

from .. import fsdp
from ..views.heads import HEADS_KEY, heads_path, heads_state, saved_heads
from . import progress
from . import state
from .parallel import bound_optimizer

_HEADS_RE = re.compile(r"structure_heads_epoch_(\d+)\.pth$")


def write_atomically(obj, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:  # the rename itself survives a crash once the folder is synced
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def prune_heads_files(checkpoint_dir: str, epoch: int) -> None:
    """Remove heads files no checkpoint can refer to (keep epochs ``epoch``, ``epoch - 1`` and every
    epoch with an ``epoch_<N>.pt``) and temporary files left by killed writers."""
    for name in os.listdir(checkpoint_dir):
        path = os.path.join(checkpoint_dir, name)
        if ".pth.tmp" in name and name.startswith("structure_heads_epoch_"):
            try:
                os.remove(path)
            except OSError:
                pass
            continue
        m = _HEADS_RE.match(name)
        if m is None:
            continue
        n = int(m.group(1))
        if n < epoch - 1 and not os.path.exists(os.path.join(checkpoint_dir, f"epoch_{n}.pt")):
            os.remove(path)


def full_heads_state(heads) -> dict:
    """The heads' full tensors (ALL ranks: sharded parameters are gathered)."""
    return {k: (v.full_tensor() if fsdp.is_dtensor(v) else v).detach().cpu()
            for k, v in heads.state_dict().items()}


def save_heads(run: state.Run, epoch: int, heads_sd: Optional[dict] = None) -> Optional[str]:
    """Rank 0 (open_clip's ``save_logs``): the heads of ``epoch`` beside the checkpoints."""
    args = run.args
    if run.heads is None or not getattr(args, "save_logs", False) or not getattr(args, "checkpoint_path", None):
        return None
    path = heads_path(args.checkpoint_path, epoch)
    write_atomically(heads_state(run.heads) if heads_sd is None else heads_sd, path)
    prune_heads_files(args.checkpoint_path, epoch)
    return path


def after_train_epoch(run: state.Run, model, optimizer, epoch: int) -> None:
    """All ranks, right after ``train_one_epoch`` (before open_clip evaluates and saves)."""
    args = run.args
    progress.check_tracked(args)
    if fsdp.is_wrapped(model):  # all ranks: rank 0 then saves open_clip's full checkpoint
        fsdp.gather_full_state(model, optimizer)
        if args.fsdp_sharded_checkpoint:
            where = os.path.join(args.logs, args.name, "checkpoints", f"epoch_{epoch + 1}_dcp")
            os.makedirs(where, exist_ok=True)
            fsdp.save_sharded(model, optimizer, where, epoch + 1)
    save_heads(run, epoch + 1)


def wrap_train_one_epoch(train_one_epoch):
    @functools.wraps(train_one_epoch)
    def train_and_record(model, data, loss, epoch, optimizer, *args, **kwargs):
        out = train_one_epoch(model, data, loss, epoch, optimizer, *args, **kwargs)
        run = state.current()
        if run is not None and run.args is not None:
            after_train_epoch(run, model, optimizer, epoch)
        return out

    return train_and_record


# ---- resume ---------------------------------------------------------------------------------------

def _natural_key(text: str):
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", text.lower())]


def older_checkpoints(path: str):
    """The other ``*.pt`` files beside ``path``, newest first (open_clip's ``--resume latest`` order)."""
    others = [p for p in glob.glob(os.path.join(os.path.dirname(path), "*.pt"))
              if os.path.abspath(p) != os.path.abspath(path)]
    return sorted(others, key=_natural_key, reverse=True)


def load_resume_checkpoint(run: Optional[state.Run], pt_load, path, *args, **kwargs):
    """``pt_load(path)``; with ``--resume latest``, an unreadable newest checkpoint (a process killed
    while open_clip wrote it) gives way to the newest readable one."""
    try:
        return path, pt_load(path, *args, **kwargs)
    except Exception as error:  # noqa: BLE001 - re-raised unless an older checkpoint loads
        if run is None or not run.resume_latest or not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
            raise
        for older in older_checkpoints(str(path)):
            try:
                checkpoint = pt_load(older, *args, **kwargs)
            except Exception:  # noqa: BLE001
                continue
            logging.warning(f"openclip-structure: --resume latest: {path} is unreadable ({error}); resuming "
                            f"from {older} instead")
            return older, checkpoint
        raise


def restore_heads(run: state.Run, path, checkpoint=None, epoch=None, *, load: Optional[Callable] = None,
                  label: str = "", resume: bool = True) -> bool:
    """The one restore of the separation heads, for every route: ``--resume`` on open_clip 3.x
    (``checkpoint``: the dict open_clip loaded; its heads entry is removed before open_clip reads it),
    on open_clip main (``epoch``: main's ``load_checkpoint`` loaded the state itself; ``load(saved)``
    replaces the strict ``load_state_dict``, e.g. into sharded parameters) and ``--pretrained``
    fine-tuning (``resume=False``). Logs where the heads came from, or warns that they start fresh
    or are dropped; on resume, keeps the optimizer state loadable when the checkpoint and this run
    disagree about the heads (:func:`align_optimizer`). True when heads were loaded."""
    saved, where = saved_heads(path, checkpoint, epoch)
    where = f"{label} {where}" if label else where
    if isinstance(checkpoint, dict):
        checkpoint.pop(HEADS_KEY, None)
    training = resume and isinstance(checkpoint, dict) and "epoch" in checkpoint and "state_dict" in checkpoint
    if run.heads is None:
        if saved is not None and resume:
            logging.warning(f"openclip-structure: {where} holds separation heads ({HEADS_KEY}) but "
                            f"--sep-weight is 0 in this run: the heads are dropped")
            if training:
                align_optimizer(checkpoint, run.model, drop=len(saved))
        return False
    if saved is None:
        logging.warning(f"openclip-structure: {where} has no '{HEADS_KEY}' entry: the deep-feature-"
                        f"separation heads start from a fresh initialisation")
        if training:
            align_optimizer(checkpoint, run.model, add=sum(p.requires_grad for p in run.heads.parameters()))
        return False
    (load or (lambda sd: run.heads.load_state_dict(sd, strict=True)))(saved)
    logging.info(f"openclip-structure: restored the separation heads ({HEADS_KEY}) from {where}")
    return True


def restore_pretrained(run: state.Run, path) -> bool:
    """Fine-tuning (``--pretrained`` a plugin checkpoint): the heads saved beside (or inside) that
    checkpoint. Paths that are not a local file (open_clip's named pretrained weights, hub ids) hold
    no heads and are passed over silently."""
    if run.heads is None or not path or not os.path.isfile(str(path)):
        return False
    try:  # mmap: only the small "epoch" entry is read from a large checkpoint
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - open_clip has loaded it already; report and go on
        logging.warning(f"openclip-structure: --pretrained {path}: cannot read it for separation heads ({error}); "
                        "the heads start from a fresh initialisation")
        return False
    return restore_heads(run, path, checkpoint, label="--pretrained", resume=False)


def _last_group_ids(opt_sd) -> Optional[list]:
    groups = opt_sd.get("param_groups") if isinstance(opt_sd, dict) else None
    return groups[-1]["params"] if groups else None


def align_optimizer(checkpoint: dict, model, add: int = 0, drop: int = 0) -> None:
    """Make a saved optimizer state fit this run when exactly the heads' parameters differ.

    open_clip's AdamW lists ``model.named_parameters()`` (trainable) in two groups; the heads
    are registered last and are 2-D, so their parameters are the last entries of the last
    (weight-decay) group. Only applied when the saved parameter count differs from this
    model's by exactly the heads (e.g. a plain CLIP checkpoint resumed with --sep-weight):
    added heads start with fresh optimizer state, dropped heads lose theirs.
    """
    opt = checkpoint.get("optimizer")
    ids = _last_group_ids(opt)
    if ids is None or model is None:
        return
    saved = sum(len(g["params"]) for g in opt["param_groups"])
    live = sum(p.requires_grad for p in model.parameters())
    if add and saved + add == live:
        nxt = 1 + max((i for g in opt["param_groups"] for i in g["params"]), default=-1)
        ids.extend(range(nxt, nxt + add))
    elif drop and saved - drop == live and len(ids) >= drop:
        dropped = ids[len(ids) - drop:]
        del ids[len(ids) - drop:]
        state_ = opt.get("state", {})
        for i in dropped:
            state_.pop(i, None)


def wrap_pt_load(pt_load):
    @functools.wraps(pt_load)
    def pt_load_for_resume(path, *args, **kwargs):
        run = state.current()
        if run is None or run.args is None:
            return pt_load(path, *args, **kwargs)
        if run.container is not None and fsdp.is_sharded_checkpoint(path):
            optimizer = bound_optimizer(run)
            if optimizer is None:
                raise RuntimeError("openclip-structure --fsdp: resuming a sharded checkpoint needs the optimizer "
                                   "bound to the sharded model; this optimizer was created where no hook sees it "
                                   "(use --opt adamw, or the hook patch)")
            return fsdp.sharded_resume_checkpoint(run.container, path, optimizer)
        if run.container is not None and bound_optimizer(run) is None and \
                str(getattr(run.args, "opt", "adamw")).startswith("timm/"):
            raise RuntimeError("openclip-structure --fsdp: resuming needs the optimizer bound to the sharded model; "
                               "this optimizer was created where no hook sees it (use --opt adamw, or the hook patch)")
        path, checkpoint = load_resume_checkpoint(run, pt_load, path, *args, **kwargs)
        restore_heads(run, path, checkpoint)
        return checkpoint

    return pt_load_for_resume
