"""The :class:`FSDPModel` container (DDP-like, full state dicts that open_clip's rank-0-only
saving can use), the full-state gather every rank runs, the separation heads' binding and the
unsharded replica for rank-0 evaluation."""
from __future__ import annotations

import copy
import types
from typing import Dict, Optional

import torch
from torch import nn

from .common import (PREFIX, StaleStateError, _AlreadyLoaded, _checkpoint_shapes, is_dtensor, load_full_params,
                   _model_shapes, _rank, _reshard, _scalars_out, _State, _state, _strip_prefix, _versions, _world)
from .optimizer import gather_optimizer_state

class FSDPModel(nn.Module):
    """DDP-like container of a ``fully_shard``-ed model; see :mod:`openclip_structure.fsdp`.

    ``forward`` calls the sharded model and returns ``logit_scale``/``logit_bias`` with their usual
    0-D shape. ``state_dict``/``load_state_dict`` work on FULL state dicts (rank-0-only safe after
    :func:`gather_full_state`). Attributes the container lacks are looked up on ``.module``.
    """

    def __init__(self, module: nn.Module, state: _State):
        super().__init__()
        self.module = module
        object.__setattr__(self, "_fsdp", state)

    # ---- forward ----
    def forward(self, *args, **kwargs):
        return _scalars_out(self.module(*args, **kwargs), self._fsdp.reshaped)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("module", "_fsdp") or "module" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self._modules["module"], name)

    # ---- full state dicts ----
    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """The stashed full state dict (unprefixed keys, checkpoint shapes). Raises
        :class:`StaleStateError` if the stash is missing or the weights changed since."""
        st = self._fsdp
        if not has_full_state(self):
            if _world() == 1:
                gather_full_state(self)  # no other rank to wait for
            else:
                raise StaleStateError(
                    "openclip-structure --fsdp: state_dict() of a sharded model needs a current "
                    "fsdp.gather_full_state(model, optimizer) on ALL ranks first (the launcher calls it "
                    "after every train_one_epoch); the weights changed since the last gather, or there "
                    "was none.")
        if _rank() != 0 and not st.full_model and _world() > 1:
            raise StaleStateError("openclip-structure --fsdp: the full state dict is only kept on rank 0")
        return st.full_model

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        if args:  # torch's deprecated positional (destination, prefix, keep_vars)
            destination = args[0]
            prefix = args[1] if len(args) > 1 else prefix
        full = self.full_state_dict()
        out = destination if destination is not None else {}
        for k, v in full.items():
            out[prefix + PREFIX + k] = v
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Distribute a FULL state dict (``module.``-prefixed or not, 0-D or [1] scalars) into the
        shards. Every rank must call it with the full state dict (as open_clip's resume does)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.nn.modules.module import _IncompatibleKeys

        if isinstance(state_dict, _AlreadyLoaded):
            return _IncompatibleKeys([], [])
        st = self._fsdp
        sd = _strip_prefix(_strip_prefix(state_dict, PREFIX), "_orig_mod.")
        sd = _model_shapes(sd, st.reshaped)
        hidden = {k: sd.pop(k) for k in list(sd) if k in st.hidden}
        _reshard(self.module)  # every rank: load into the shards, not into a stale unsharded copy
        if hidden:
            load_full_params(st.params, hidden)
        result = set_model_state_dict(self.module, sd, options=StateDictOptions(full_state_dict=True, strict=strict))
        st.invalidate()
        return result


def is_wrapped(model) -> bool:
    return isinstance(model, FSDPModel)


# ---- submodules hidden from state_dict (separation heads) ----------------------------------------

def bind_submodule(container: FSDPModel, submodule: nn.Module) -> nn.Module:
    """Give ``submodule`` (part of the sharded model) rank-0-safe full ``state_dict()`` from the
    stash and a ``load_state_dict(full)`` that writes each rank's shards (all ranks call it)."""
    inner = container.module
    sub_prefix = next((n + "." for n, m in inner.named_modules() if m is submodule), None)
    if sub_prefix is None:
        raise ValueError("openclip-structure --fsdp: bind_submodule needs a submodule of the wrapped model")

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        if args or destination is not None:  # part of a parent's state_dict(): the usual behaviour
            return type(self).state_dict(self, *args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        st = container._fsdp
        container.full_state_dict()  # raises if stale
        merged = {**(st.full_model or {}), **(st.full_hidden or {})}
        out = destination if destination is not None else {}
        for k, v in merged.items():
            if k.startswith(sub_prefix):
                out[prefix + k[len(sub_prefix):]] = v
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        from torch.nn.modules.module import _IncompatibleKeys

        names = {n for n, _ in self.named_parameters()}
        missing = sorted(names - set(state_dict))
        unexpected = sorted(k for k in state_dict if k not in names and k not in dict(self.named_buffers()))
        if strict and (missing or unexpected):
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}: "
                               f"missing {missing}, unexpected {unexpected}")
        _reshard(inner)  # (all ranks call this)
        load_full_params(container._fsdp.params, {sub_prefix + k: v for k, v in state_dict.items() if k in names})
        with torch.no_grad():
            for k, b in self.named_buffers():
                if k in state_dict:
                    b.copy_(state_dict[k])
        container._fsdp.invalidate()
        return _IncompatibleKeys(missing, unexpected)

    submodule.__dict__["state_dict"] = types.MethodType(state_dict, submodule)
    submodule.__dict__["load_state_dict"] = types.MethodType(load_state_dict, submodule)
    return submodule


# ---- full state ----------------------------------------------------------------------------------

def has_full_state(container: FSDPModel) -> bool:
    """Whether a gather is current on this rank (same answer on every rank in lockstep training)."""
    st = _state(container)
    return st.versions is not None and st.versions == _versions(st)


def gather_full_state(container: FSDPModel, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """ALL ranks: gather the full model (and optimizer) state dicts and stash them on rank 0 (CPU),
    for ``container.state_dict()`` / ``optimizer.state_dict()`` / :func:`eval_model` there.

    ``optimizer`` defaults to the optimizer(s) bound to ``container``; it is bound if it is not.
    The stash is freed/invalidated by the next change of the weights (optimizer step, load).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    st = _state(container)
    inner = container.module
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    st.invalidate()
    _reshard(inner)
    sd = get_model_state_dict(inner, options=opts)
    hidden = {}
    for name in st.hidden:
        p = st.params[name]
        full = p.full_tensor() if is_dtensor(p) else p.detach().clone()
        if _rank() == 0:
            hidden[name] = full.cpu()
    st.full_model = _checkpoint_shapes(dict(sd), st.reshaped)
    st.full_hidden = hidden
    optimizers = [optimizer] if optimizer is not None else list(st.optimizers)
    for opt in optimizers:
        gather_optimizer_state(container, opt, opts)
    st.versions = _versions(st)


# ---- evaluation ----------------------------------------------------------------------------------

class _Replica(nn.Module):
    """An unsharded replica with a DDP-like ``.module`` (what open_clip's evaluate unwraps)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def eval_model(container: FSDPModel, device=None) -> nn.Module:
    """An unsharded copy of the model on this rank, from the stashed full state dict (call after
    :func:`gather_full_state`, on rank 0, e.g. for open_clip's rank-0-only ``evaluate``).

    Costs one full copy of the parameters on ``device`` (default: the model's device) while it is
    alive; drop it after evaluating. Returns a container with ``.module``.
    """
    st = _state(container)
    full = container.full_state_dict()
    device = torch.device(device) if device is not None else st.device
    replica = copy.deepcopy(st.skeleton)
    made: Dict[int, nn.Parameter] = {}
    for mod in replica.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in made:
                    made[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device),
                                               requires_grad=p.requires_grad)
                mod._parameters[name] = made[id(p)]
    replica.to(device)
    replica.load_state_dict(full, strict=True)
    if st.full_hidden:
        with torch.no_grad():
            for name, v in st.full_hidden.items():
                replica.get_parameter(name).copy_(v)
    replica.train(container.training)
    return _Replica(replica)
