"""Optimizers of a sharded model: instance-level ``state_dict``/``load_state_dict`` overrides
(:func:`bind_optimizer`) that give and take full optimizer state dicts in torch's standard
integer-indexed format, and the conversion to and from DSD's FQN-keyed format."""
from __future__ import annotations

import contextlib
import types
import weakref
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from .common import _CONTAINERS, StaleStateError, _AlreadyLoaded, _rank, _state, _world

def owner_of(optimizer: torch.optim.Optimizer) -> Optional[nn.Module]:
    ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if not ids:
        return None
    for c in list(_CONTAINERS):
        owned = ids & c._fsdp.param_ids
        if owned:
            if owned != ids:
                raise ValueError("openclip-structure --fsdp: an optimizer mixes parameters of a sharded model "
                                 "with others; optimize the sharded model's parameters only")
            return c
    return None


@contextlib.contextmanager
def _raw(optimizer: Optional[torch.optim.Optimizer]) -> Iterator[None]:
    """Hide the instance-level overrides while torch's own state-dict code runs on ``optimizer``."""
    saved = {}
    if optimizer is not None:
        for k in ("state_dict", "load_state_dict"):
            if k in optimizer.__dict__:
                saved[k] = optimizer.__dict__.pop(k)
    try:
        yield
    finally:
        if optimizer is not None:
            optimizer.__dict__.update(saved)


def _param_fqns(container: nn.Module, optimizer) -> List[str]:
    names = {id(p): n for n, p in container._fsdp.params.items()}
    out = []
    for g in optimizer.param_groups:
        for p in g["params"]:
            if id(p) not in names:
                raise ValueError("openclip-structure --fsdp: the optimizer holds a parameter of no sharded model")
            out.append(names[id(p)])
    return out


def _indexed_optimizer_state(container, optimizer, osd) -> Dict[str, Any]:
    """DSD's FQN-keyed full optimizer state -> torch's standard integer-indexed format, scalars 0-D."""
    fqns = _param_fqns(container, optimizer)
    index = {f: i for i, f in enumerate(fqns)}
    reshaped = container._fsdp.reshaped
    state = {}
    for fqn, s in osd["state"].items():
        if fqn in reshaped:
            s = {k: (v.reshape(()) if isinstance(v, torch.Tensor) and v.dim() == 1 and v.numel() == 1 else v)
                 for k, v in s.items()}
        state[index[fqn]] = s
    state = dict(sorted(state.items()))
    groups, start = [], 0
    for g_opt, g in zip(optimizer.param_groups, osd["param_groups"]):
        new = {k: v for k, v in g.items() if k != "params"}
        new["params"] = list(range(start, start + len(g_opt["params"])))
        start += len(g_opt["params"])
        groups.append(new)
    return {"state": state, "param_groups": groups}


def _fqn_optimizer_state(container, optimizer, osd) -> Dict[str, Any]:
    """torch's standard format (or DSD's FQN-keyed format) -> DSD's FQN-keyed format, scalars [1]."""
    groups = osd.get("param_groups") or []
    if any(isinstance(i, str) for g in groups for i in g.get("params", [])):
        fqn_state, fqn_groups = dict(osd["state"]), [dict(g) for g in groups]
    else:
        fqns = _param_fqns(container, optimizer)
        if len(groups) != len(optimizer.param_groups) or any(
                len(g["params"]) != len(go["params"]) for g, go in zip(groups, optimizer.param_groups)):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                             "optimizer's group")
        order = [i for g in groups for i in g["params"]]
        by_id = dict(zip(order, fqns))
        fqn_state = {by_id[int(i)]: s for i, s in osd["state"].items()}
        fqn_groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [by_id[i] for i in g["params"]]}
                      for g in groups]
    for fqn in container._fsdp.reshaped:
        if fqn in fqn_state:
            fqn_state[fqn] = {k: (v.reshape(1) if isinstance(v, torch.Tensor) and v.dim() == 0 and k != "step" else v)
                              for k, v in fqn_state[fqn].items()}
    return {"state": fqn_state, "param_groups": fqn_groups}


@dataclass
class _OptState:
    container: "weakref.ref"
    full: Optional[Dict[str, Any]] = None  # stashed standard-format full state (rank 0)
    versions: Optional[Tuple[int, ...]] = None


def bind_optimizer(container: nn.Module, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Bind instance-level ``state_dict``/``load_state_dict`` overrides on ``optimizer``
    (idempotent; returns it).

    * ``optimizer.state_dict()`` returns the full state dict stashed by the last
      :func:`gather_full_state` (standard integer-indexed format, rank 0), and raises
      :class:`StaleStateError` if the optimizer stepped since;
    * ``optimizer.load_state_dict(full)`` distributes a full state dict (standard format, e.g.
      from a DDP or FSDP checkpoint, or DSD's FQN-keyed one) into the shards; ALL ranks call it.

    ``del optimizer.state_dict, optimizer.load_state_dict`` removes the overrides.
    """
    st = _state(container)
    if "_fsdp_opt" in optimizer.__dict__:
        return optimizer
    _param_fqns(container, optimizer)  # validates ownership
    ost = _OptState(container=weakref.ref(container))
    optimizer.__dict__["_fsdp_opt"] = ost
    st.optimizers.add(optimizer)

    def state_dict(self):
        c = ost.container()
        if ost.full is None or ost.versions != _opt_versions(self):
            if _world() == 1 and c is not None:
                gather_optimizer_state(c, self)
            else:
                raise StaleStateError(
                    "openclip-structure --fsdp: optimizer.state_dict() of a sharded model needs a current "
                    "fsdp.gather_full_state(model, optimizer) on ALL ranks first (the optimizer stepped "
                    "since the last gather, or there was none).")
        if _rank() != 0 and not ost.full["state"] and _world() > 1:
            raise StaleStateError("openclip-structure --fsdp: the full optimizer state is only kept on rank 0")
        return {"state": dict(ost.full["state"]), "param_groups": [dict(g) for g in ost.full["param_groups"]]}

    def load_state_dict(self, state_dict):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if isinstance(state_dict, _AlreadyLoaded):
            return
        c = ost.container()
        osd = _fqn_optimizer_state(c, self, state_dict)
        with _raw(self):
            set_optimizer_state_dict(c.module, self, osd, options=StateDictOptions(full_state_dict=True))
        ost.full = ost.versions = None

    optimizer.__dict__["state_dict"] = types.MethodType(state_dict, optimizer)
    optimizer.__dict__["load_state_dict"] = types.MethodType(load_state_dict, optimizer)
    return optimizer


def _opt_versions(optimizer) -> Tuple[int, ...]:
    return tuple(v._version for s in optimizer.state.values() for v in s.values()
                 if isinstance(v, torch.Tensor))


def gather_optimizer_state(container: nn.Module, optimizer: torch.optim.Optimizer, options=None) -> None:
    """ALL ranks: stash ``optimizer``'s full state dict (standard integer-indexed format) on rank 0
    for its bound ``state_dict()``; binds the optimizer if it is not. Part of
    :func:`~openclip_structure.fsdp.gather_full_state`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = options or StateDictOptions(full_state_dict=True, cpu_offload=True)
    bind_optimizer(container, optimizer)
    ost = optimizer.__dict__["_fsdp_opt"]
    if not optimizer.state:  # nothing to gather (DSD would take a fake step to create the state)
        ost.full = type(optimizer).state_dict(optimizer)
    else:
        with _raw(optimizer):
            osd = get_optimizer_state_dict(container.module, optimizer, options=options)
        ost.full = (_indexed_optimizer_state(container, optimizer, osd) if osd.get("state") or _rank() == 0
                    else {"state": {}, "param_groups": []})
    ost.versions = _opt_versions(optimizer)


def bound_optimizers(container: nn.Module) -> List[torch.optim.Optimizer]:
    """The optimizers bound to ``container`` (:func:`bind_optimizer`, :func:`gather_optimizer_state`)."""
    return list(_state(container).optimizers)
