"""The independent heads of deep feature separation (Jiang et al., CVPR 2023, arXiv 2303.05952)
as extra trainable parameters of an open_clip model, and their checkpointing.

* :func:`attach_heads` adds ``model.structure_heads`` (an ``nn.ModuleDict`` with one
  :class:`~openclip_structure.losses.IndependentHead` per tower). Being a submodule, the heads are
  in ``model.named_parameters()``: open_clip's AdamW puts their 2-D ``proj`` matrices in the
  weight-decay group (like ``visual.proj`` / ``text_projection``) and DDP broadcasts and
  all-reduces them. They are kept OUT of ``model.state_dict()`` (a state-dict post hook drops
  ``*structure_heads.*``) so ``open_clip.create_model(name, pretrained=ckpt)`` still loads the
  checkpoint strictly, and a load-state-dict post hook forgives their absence, so
  ``model.load_state_dict(sd)`` stays strict for everything else.
* :class:`CheckpointHooks` restores saved heads into the model on ``--resume`` and keeps the
  optimizer state loadable when the checkpoint and the run disagree about the heads. Where the heads
  are written (their own file beside each checkpoint) and read back is
  :mod:`openclip_structure.integration.checkpoints`.
* :func:`check_separation_support` finds, on every open_clip tower family, the pooled features the
  tower's final projection reads (:mod:`openclip_structure.views.towers`), or refuses the model naming why.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, Optional

import torch
from torch import nn

from . import towers
from ..losses import IndependentHead
from .towers import UnsupportedModelError  # noqa: F401 (public name)

#: attribute of the model and top-level key of the checkpoint that hold the heads
HEADS_KEY = "structure_heads"
#: the heads of epoch N are saved beside open_clip's checkpoints, in the same folder, under this name
HEADS_FILE = "structure_heads_epoch_{epoch}.pth"


def heads_path(checkpoint_dir: str, epoch: int) -> str:
    return os.path.join(checkpoint_dir, HEADS_FILE.format(epoch=int(epoch)))


def read_heads_beside(path, epoch) -> Optional[Dict[str, torch.Tensor]]:
    """The heads file of ``epoch`` beside the checkpoint ``path``, or None."""
    beside = heads_path(os.path.dirname(str(path)), epoch)
    if not os.path.isfile(beside):
        return None
    return torch.load(beside, map_location="cpu", weights_only=True)


def beside_label(path, epoch) -> str:
    """``path (+ structure_heads_epoch_N.pth)``: where restored heads came from, for the log."""
    return f"{path} (+ {os.path.basename(heads_path(os.path.dirname(str(path)), epoch))})"


def saved_heads(checkpoint: dict, path) -> Optional[Dict[str, torch.Tensor]]:
    """The heads that belong to a training checkpoint: ``checkpoint["structure_heads"]`` (earlier
    versions of the plugin) or the file of its epoch beside it; None when there are none."""
    if not isinstance(checkpoint, dict):
        return None
    if checkpoint.get(HEADS_KEY):
        return checkpoint[HEADS_KEY]
    if "epoch" in checkpoint and isinstance(path, (str, os.PathLike)):
        return read_heads_beside(path, checkpoint["epoch"])
    return None


def check_separation_support(model: nn.Module, model_name: str = "?") -> Dict[str, "towers.Projection"]:
    """The towers' projections the heads read beside (:func:`openclip_structure.views.towers.projections`);
    raises :class:`UnsupportedModelError` naming the model and the reason where there is none."""
    return towers.projections(model, model_name)


def _drop_heads_from_state_dict(module, state_dict, prefix, local_metadata) -> None:
    start = prefix + HEADS_KEY + "."
    for k in [k for k in state_dict if k.startswith(start)]:
        del state_dict[k]


def _is_head_key(key: str) -> bool:
    return key.startswith(HEADS_KEY + ".") or f".{HEADS_KEY}." in key


def _forgive_missing_heads(module, incompatible_keys) -> None:
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not _is_head_key(k)]


def attach_heads(model: nn.Module, model_name: str = "?") -> nn.ModuleDict:
    """Attach (once) and return ``model.structure_heads`` = {"image": head, "text": head}."""
    heads = getattr(model, HEADS_KEY, None)
    if heads is not None:
        return heads
    found = check_separation_support(model, model_name)
    widths, dim = towers.head_widths(model, found), towers.embed_dim(model, found)
    ref = next(p for p in model.parameters() if p.is_floating_point())
    heads = nn.ModuleDict({m: IndependentHead(widths[m], dim, dtype=ref.dtype, device=ref.device)
                           for m in towers.MODALITIES})
    logging.info(f"openclip-structure: separation heads for '{model_name}': {towers.describe(found)}")
    setattr(model, HEADS_KEY, heads)  # a submodule: optimizer, DDP, .to(), .train() see it
    model.register_state_dict_post_hook(_drop_heads_from_state_dict)
    model.register_load_state_dict_post_hook(_forgive_missing_heads)
    return heads


def restore_saved(heads: nn.Module, saved: Optional[Dict[str, torch.Tensor]], where, load=None) -> bool:
    """Load ``saved`` (the heads as saved; None: there are none) into ``heads`` and say so, or warn that
    the heads start fresh. The one place every route (``--resume`` on 3.x and on open_clip main,
    ``--pretrained`` fine-tuning) restores heads through; ``load(saved)`` replaces the strict
    ``load_state_dict`` (e.g. into sharded parameters)."""
    if saved is None:
        logging.warning(f"openclip-structure: {where} has no '{HEADS_KEY}' entry: the deep-feature-"
                        f"separation heads start from a fresh initialisation")
        return False
    (load or (lambda sd: heads.load_state_dict(sd, strict=True)))(saved)
    logging.info(f"openclip-structure: restored the separation heads ({HEADS_KEY}) from {where}")
    return True


def restore_pretrained(heads: nn.Module, path) -> bool:
    """Fine-tuning (``--pretrained`` a plugin checkpoint): the heads saved beside (or inside) that
    checkpoint, else a warning that they start fresh. Paths that are not a local file (open_clip's
    named pretrained weights, hub ids) hold no heads and are passed over silently."""
    if not path or not os.path.isfile(str(path)):
        return False
    try:  # mmap: only the small "epoch" entry is read from a large checkpoint
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - open_clip has loaded it already; report and go on
        logging.warning(f"openclip-structure: --pretrained {path}: cannot read it for separation heads ({error}); "
                        "the heads start from a fresh initialisation")
        return False
    return restore_saved(heads, saved_heads(checkpoint, path), f"--pretrained {path}")


def heads_state(heads: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in heads.state_dict().items()}


def _last_group_ids(opt_sd) -> Optional[list]:
    groups = opt_sd.get("param_groups") if isinstance(opt_sd, dict) else None
    return groups[-1]["params"] if groups else None


class CheckpointHooks:
    """Restores ``checkpoint["structure_heads"]`` (the heads as saved) into the model on resume.

    ``heads`` and ``model`` are set once the model exists (heads None: separation is off).
    """

    def __init__(self):
        self.heads: Optional[nn.Module] = None
        self.model: Optional[nn.Module] = None

    def restore(self, checkpoint, where="checkpoint") -> None:
        """Load ``checkpoint["structure_heads"]`` (removed from the dict) into the heads; keep the
        optimizer state loadable when the checkpoint and this run disagree about the heads."""
        if not isinstance(checkpoint, dict):
            return
        saved = checkpoint.pop(HEADS_KEY, None)
        training_ckpt = "epoch" in checkpoint and "state_dict" in checkpoint
        if self.heads is not None:
            if restore_saved(self.heads, saved, where):
                return
            if training_ckpt:
                self._align_optimizer(checkpoint, add=sum(p.requires_grad for p in self.heads.parameters()))
        elif saved is not None:
            logging.warning(f"openclip-structure: {where} holds separation heads ({HEADS_KEY}) but "
                            f"--sep-weight is 0 in this run: the heads are dropped")
            if training_ckpt:
                self._align_optimizer(checkpoint, drop=len(saved))

    def _align_optimizer(self, checkpoint, add: int = 0, drop: int = 0) -> None:
        """Make a saved optimizer state fit this run when exactly the heads' parameters differ.

        open_clip's AdamW lists ``model.named_parameters()`` (trainable) in two groups; the heads
        are registered last and are 2-D, so their parameters are the last entries of the last
        (weight-decay) group. Only applied when the saved parameter count differs from this
        model's by exactly the heads (e.g. a plain CLIP checkpoint resumed with --sep-weight):
        added heads start with fresh optimizer state, dropped heads lose theirs.
        """
        opt = checkpoint.get("optimizer")
        ids = _last_group_ids(opt)
        if ids is None or self.model is None:
            return
        saved = sum(len(g["params"]) for g in opt["param_groups"])
        live = sum(p.requires_grad for p in self.model.parameters())
        if add and saved + add == live:
            nxt = 1 + max((i for g in opt["param_groups"] for i in g["params"]), default=-1)
            ids.extend(range(nxt, nxt + add))
        elif drop and saved - drop == live and len(ids) >= drop:
            dropped = ids[len(ids) - drop:]
            del ids[len(ids) - drop:]
            state = opt.get("state", {})
            for i in dropped:
                state.pop(i, None)
