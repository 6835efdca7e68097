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
* :func:`saved_heads`: the heads that belong to a training checkpoint (their own file beside it,
  :data:`HEADS_FILE`). Writing that file, and restoring the heads on every route (``--resume`` on
  open_clip 3.x and main, ``--pretrained`` fine-tuning) is
  :func:`openclip_structure.integration.checkpoints.restore_heads`.
* :func:`check_separation_support` finds, on every open_clip tower family, the pooled features the
  tower's final projection reads (:mod:`openclip_structure.views.towers`), or refuses the model naming why.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from . import towers
from ..losses import IndependentHead

#: attribute of the model and top-level key of the checkpoint that hold the heads
HEADS_KEY = "structure_heads"
#: the heads of epoch N are saved beside open_clip's checkpoints, in the same folder, under this name
HEADS_FILE = "structure_heads_epoch_{epoch}.pth"


def heads_path(checkpoint_dir: str, epoch: int) -> str:
    return os.path.join(checkpoint_dir, HEADS_FILE.format(epoch=int(epoch)))


def saved_heads(path, checkpoint=None, epoch=None) -> Tuple[Optional[Dict[str, torch.Tensor]], str]:
    """The heads that belong to the training checkpoint at ``path``, and where they came from (for
    the log): ``checkpoint["structure_heads"]`` (earlier versions of the plugin) or the file of its
    epoch beside it (the epoch is ``checkpoint["epoch"]``, or ``epoch`` where open_clip loaded the
    checkpoint itself); ``(None, path)`` when there are none."""
    if isinstance(checkpoint, dict) and checkpoint.get(HEADS_KEY):
        return checkpoint[HEADS_KEY], str(path)
    if epoch is None and isinstance(checkpoint, dict):
        epoch = checkpoint.get("epoch")
    if epoch is not None and isinstance(path, (str, os.PathLike)):
        beside = heads_path(os.path.dirname(str(path)), epoch)
        if os.path.isfile(beside):
            return torch.load(beside, map_location="cpu", weights_only=True), f"{path} (+ {os.path.basename(beside)})"
    return None, str(path)


def check_separation_support(model: nn.Module, model_name: str = "?") -> Dict[str, "towers.Projection"]:
    """The towers' projections the heads read beside (:func:`openclip_structure.views.towers.projections`);
    raises :class:`~openclip_structure.views.towers.UnsupportedModelError` naming the model and the
    reason where there is none."""
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


def heads_state(heads: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in heads.state_dict().items()}
