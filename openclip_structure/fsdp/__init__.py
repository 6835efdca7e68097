"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for open_clip_train, with full checkpoints that
open_clip's rank-0-only saving and its ``--resume`` code can use unchanged.

open_clip 3.x releases have no FSDP (on open_clip main the plugin uses open_clip's own
``--fsdp`` instead, see docs/open_clip_main.md). This package shards an open_clip model and keeps
the contracts that ``open_clip_train.main`` / ``train.py`` rely on (the launcher calls it;
nothing here runs unless it is called). One module per concern:

=========================  ==================================================================
:mod:`.wrapping`           :func:`wrap`, :func:`shard_modules`, :func:`mixed_precision_policy`
:mod:`.container`          :class:`FSDPModel`, :func:`gather_full_state`, :func:`has_full_state`,
                           :func:`bind_submodule` (separation heads), :func:`eval_model`
:mod:`.optimizer`          :func:`bind_optimizer` and the optimizer state-dict formats
:mod:`.sharded`            ``torch.distributed.checkpoint`` save / load / resume
:mod:`.base`               dtypes, rank helpers, per-container bookkeeping, shape conversions
=========================  ==================================================================


* :func:`wrap` shards every transformer block (open_clip's ``ResidualAttentionBlock`` and
  ``CustomResidualAttentionBlock`` of both towers and of CoCa's text decoder, ResNet
  ``Bottleneck``\\ s, timm ViT ``Block``\\ s) and then the root, with a
  ``MixedPrecisionPolicy`` from ``--fsdp-param-dtype`` / ``--fsdp-reduce-dtype``, and returns a
  :class:`FSDPModel` container whose ``.module`` is the sharded model (what ``unwrap_model``,
  ``evaluate``'s ``model.module`` and open_clip's ``logit_scale.clamp_`` use). The container's
  ``named_parameters()`` are ``module.``-prefixed like DDP's, so open_clip's AdamW groups are the
  same. FSDP2 cannot shard 0-D parameters: ``logit_scale`` (and SigLIP's ``logit_bias``) are held
  as ``[1]`` inside the sharded model; the container returns them 0-D from ``forward`` and every
  state dict it produces or accepts uses the usual 0-D shapes.
* Full checkpoints. open_clip calls ``original_model.state_dict()`` and ``optimizer.state_dict()``
  on rank 0 only, so no collective may run inside them. :func:`gather_full_state` (ALL ranks, at a
  point every rank passes, e.g. right after ``train_one_epoch``) computes the full model and
  optimizer state dicts (``get_model_state_dict``/``get_optimizer_state_dict`` with
  ``full_state_dict=True, cpu_offload=True``) and stashes them on rank 0;
  ``container.state_dict()`` then returns the stashed model state dict (keys ``module.``-prefixed,
  exactly what a DDP run saves, so ``open_clip.create_model(name, pretrained=ckpt)`` loads it
  strictly) and ``optimizer.state_dict()`` the stashed optimizer state dict in torch's standard
  integer-indexed format (what a DDP run saves). Both raise if the stash is stale (weights changed
  since the gather) or missing, instead of silently writing old weights.
  ``container.load_state_dict(full_sd)`` (``module.``-prefixed or not) and
  ``optimizer.load_state_dict(full_osd)`` distribute a full state dict into the shards
  (``set_model_state_dict``/``set_optimizer_state_dict``; all ranks call them, as open_clip's
  resume does). Full checkpoints of FSDP and DDP runs are interchangeable.
* The optimizer overrides are INSTANCE attributes bound by :func:`bind_optimizer`
  (``optimizer.state_dict`` / ``optimizer.load_state_dict`` shadow the class methods on that one
  object; ``del optimizer.state_dict`` restores the class behaviour). open_clip creates the
  optimizer inside its ``main`` and resumes right after: the plugin's optimizer hook
  (:mod:`openclip_structure.integration.parallel`) binds it as it is created.
  :func:`gather_full_state` binds the optimizer it is given too.
* Submodules whose parameters a state-dict hook hides (the separation heads,
  ``model.structure_heads``) get the same treatment: their ``state_dict()`` returns full tensors
  from the stash (rank-0 safe) and ``load_state_dict(full)`` puts the local shards in place.
* Evaluation: open_clip evaluates on rank 0 only, which a sharded model cannot do (its forward
  all-gathers). :func:`eval_model` builds, on the calling rank, an unsharded replica from the
  stashed full state dict (a DDP-like container with ``.module``) for ``evaluate``.
* Sharded checkpoints: :func:`save_sharded` / :func:`load_sharded` write and read a
  ``torch.distributed.checkpoint`` directory (model, optimizer, epoch; every rank writes its own
  shards, so no full copy is ever materialised; it can be loaded with another world size);
  :func:`is_sharded_checkpoint` recognises such a directory; :func:`sharded_resume_checkpoint`
  returns a checkpoint-like dict that open_clip's own resume code consumes as a no-op after the
  shards are loaded.
* ``--precision amp`` needs nothing from here: torch's own ``torch.amp.GradScaler`` handles the
  sharded (DTensor) gradients; DTensor all-reduces the found-inf flag, so every rank skips the
  same steps (tests/test_fsdp_grad_scaler.py).

Works with gloo on CPU and NCCL on GPU: the device mesh takes the device type of the model's
parameters, and all state-dict gathers offload to CPU.
"""
from __future__ import annotations

from .common import DTYPES, PREFIX, StaleStateError, is_dtensor, load_full_params, local_tensor
from .container import FSDPModel, bind_submodule, eval_model, gather_full_state, has_full_state, is_wrapped
from .optimizer import bind_optimizer, bound_optimizers, gather_optimizer_state, owner_of
from .sharded import is_sharded_checkpoint, load_sharded, save_sharded, sharded_resume_checkpoint
from .wrapping import mixed_precision_policy, shard_modules, wrap

__all__ = [
    "FSDPModel", "wrap", "is_wrapped", "gather_full_state", "has_full_state", "bind_optimizer",
    "bind_submodule", "eval_model", "save_sharded", "load_sharded",
    "is_sharded_checkpoint", "sharded_resume_checkpoint", "mixed_precision_policy",
    "shard_modules", "StaleStateError", "owner_of", "bound_optimizers", "gather_optimizer_state",
    "is_dtensor", "local_tensor", "load_full_params", "DTYPES", "PREFIX",
]
