"""Sharded checkpoints: a ``torch.distributed.checkpoint`` directory that every rank writes its
own shards into (model, separation heads, optimizer, epoch), loadable with another world size."""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch
from torch import nn

from .common import _AlreadyLoaded, _reshard, _state
from .optimizer import _raw, bind_optimizer

def is_sharded_checkpoint(path) -> bool:
    """A ``torch.distributed.checkpoint`` directory (has DCP's ``.metadata``)."""
    return isinstance(path, (str, os.PathLike)) and os.path.isdir(path) and \
        os.path.isfile(os.path.join(path, ".metadata"))


def _sharded_state(container, optimizer):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    st = _state(container)
    inner = container.module
    _reshard(inner)
    model_sd = get_model_state_dict(inner)
    for name in st.hidden:
        model_sd[name] = st.params[name].detach()
    state = {"model": model_sd, "epoch": 0}
    if optimizer is not None:
        bind_optimizer(container, optimizer)
        with _raw(optimizer):
            state["optimizer"] = get_optimizer_state_dict(inner, optimizer)
    return state


def save_sharded(container: nn.Module, optimizer: Optional[torch.optim.Optimizer], directory: str,
                 epoch: int) -> str:
    """ALL ranks: write model (+ optimizer) shards and ``epoch`` to the DCP ``directory``
    (on a filesystem every rank can reach). Returns ``directory``."""
    import torch.distributed.checkpoint as dcp

    state = _sharded_state(container, optimizer)
    state["epoch"] = int(epoch)
    dcp.save(state, checkpoint_id=directory)
    return directory


def load_sharded(container: nn.Module, optimizer: Optional[torch.optim.Optimizer], directory: str) -> int:
    """ALL ranks: load a :func:`save_sharded` directory into the wrapped model (+ optimizer);
    returns the saved epoch. The world size may differ from the saving run's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    if not is_sharded_checkpoint(directory):
        raise FileNotFoundError(f"openclip-structure --fsdp: {directory} is not a torch.distributed.checkpoint "
                                "directory")
    st = _state(container)
    inner = container.module
    if optimizer is None and len(st.optimizers) == 1:
        optimizer = next(iter(st.optimizers))
    state = _sharded_state(container, optimizer)
    dcp.load(state, checkpoint_id=directory)
    model_sd = state["model"]
    for name in st.hidden:  # loaded in place into the parameters
        model_sd.pop(name)
    set_model_state_dict(inner, model_sd, options=StateDictOptions(strict=True))
    if optimizer is not None:
        with _raw(optimizer):
            set_optimizer_state_dict(inner, optimizer, state["optimizer"])
        optimizer.__dict__["_fsdp_opt"].full = None
    st.invalidate()
    return int(state["epoch"])


def sharded_resume_checkpoint(container: nn.Module, directory: str,
                              optimizer: Optional[torch.optim.Optimizer] = None) -> Dict[str, Any]:
    """ALL ranks: :func:`load_sharded`, then return ``{"epoch", "state_dict", "optimizer"}`` whose
    state entries make ``container.load_state_dict`` and the bound ``optimizer.load_state_dict``
    no-ops, for a ``pt_load`` wrapper to hand to open_clip's own resume code."""
    epoch = load_sharded(container, optimizer, directory)
    return {"epoch": epoch, "state_dict": _AlreadyLoaded(), "optimizer": _AlreadyLoaded()}
