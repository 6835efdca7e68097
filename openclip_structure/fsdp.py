"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for open_clip_train, with full checkpoints that
open_clip's rank-0-only saving and its ``--resume`` code can use unchanged.

open_clip releases have no FSDP. This module shards an open_clip model and keeps the contracts
that ``open_clip_train.main`` / ``train.py`` rely on (the launcher calls it; nothing here runs
unless it is called):

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

import contextlib
import copy
import logging
import os
import sys
import types
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "FSDPModel", "wrap", "is_wrapped", "gather_full_state", "has_full_state", "bind_optimizer",
    "bind_submodule", "eval_model", "save_sharded", "load_sharded",
    "is_sharded_checkpoint", "sharded_resume_checkpoint", "mixed_precision_policy",
    "shard_modules", "StaleStateError",
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: prefix of the container's parameter / state-dict keys (the same as DDP's)
PREFIX = "module."


class StaleStateError(RuntimeError):
    """``state_dict()`` was called on a sharded model without a current :func:`gather_full_state`."""


# ---- helpers -------------------------------------------------------------------------------------

def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if _is_dtensor(t) else t


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _strip_prefix(sd: Dict[str, Any], prefix: str = PREFIX) -> Dict[str, Any]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return dict(sd)


def shard_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The submodules :func:`wrap` shards individually (before the root), outermost first."""
    from open_clip.transformer import ResidualAttentionBlock
    types_: List[type] = [ResidualAttentionBlock]
    for mod, name in (("open_clip.transformer", "CustomResidualAttentionBlock"),
                      ("open_clip.transformer", "ModernTextBlock"),
                      ("open_clip.modified_resnet", "Bottleneck"),
                      ("timm.models.vision_transformer", "Block")):
        cls = getattr(sys.modules.get(mod), name, None)  # not imported: none in the model either
        if isinstance(cls, type):
            types_.append(cls)
    found, inside = [], set()
    for name, m in model.named_modules():
        if isinstance(m, tuple(types_)) and not any(name.startswith(p + ".") for p in inside):
            found.append((name, m))
            inside.add(name)
    return found


def mixed_precision_policy(args=None, param_dtype: Optional[str] = None, reduce_dtype: Optional[str] = None):
    """``MixedPrecisionPolicy`` from ``--fsdp-param-dtype`` / ``--fsdp-reduce-dtype``.

    ``fp32`` (the default) for the parameters means "no cast": compute in the dtype the model is
    stored in (fp32, or bf16/fp16 with open_clip's ``--precision pure_*``). The reduction dtype
    defaults to fp32 when the parameters are cast, else to the parameters' own dtype.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    p = param_dtype or getattr(args, "fsdp_param_dtype", None) or "fp32"
    r = reduce_dtype or getattr(args, "fsdp_reduce_dtype", None) or "fp32"
    for what, v in (("param", p), ("reduce", r)):
        if v not in DTYPES:
            raise ValueError(f"--fsdp-{what}-dtype must be one of {sorted(DTYPES)}, got {v!r}")
    pd = None if p == "fp32" else DTYPES[p]
    rd = None if (r == "fp32" and pd is None) else DTYPES[r]
    return MixedPrecisionPolicy(param_dtype=pd, reduce_dtype=rd)


# ---- per-container bookkeeping ------------------------------------------------------------------

@dataclass
class _State:
    skeleton: nn.Module                     # unsharded copy with meta parameters (for eval_model)
    reshaped: Set[str]                      # parameter names held as [1] instead of 0-D
    hidden: List[str]                       # parameters the model's state_dict() hides (heads)
    device: torch.device
    params: Dict[str, nn.Parameter] = field(default_factory=dict)  # name -> sharded parameter
    param_ids: Set[int] = field(default_factory=set)
    full_model: Optional[Dict[str, torch.Tensor]] = None    # unprefixed, checkpoint shapes (rank 0)
    full_hidden: Optional[Dict[str, torch.Tensor]] = None
    versions: Optional[Tuple[int, ...]] = None               # parameter versions at the gather
    optimizers: "weakref.WeakSet" = field(default_factory=weakref.WeakSet)

    def invalidate(self) -> None:
        self.full_model = self.full_hidden = self.versions = None


_CONTAINERS: "weakref.WeakSet" = weakref.WeakSet()


def _reshard(module: nn.Module) -> None:
    """Put every FSDP group of ``module`` back in its sharded state: after a forward without
    backward (e.g. under no_grad) the root's parameters stay unsharded. Local, but ONLY for code
    that every rank runs: a rank that reshards alone would all-gather alone in the next forward."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _versions(st: "_State") -> Tuple[int, ...]:
    # the sharded parameters (FSDP2 keeps these objects for the module's life, whether or not it
    # is unsharded at the moment); the DTensor wrapper's version counter moves with in-place updates
    return tuple(p._version for p in st.params.values())


class FSDPModel(nn.Module):
    """DDP-like container of a ``fully_shard``-ed model; see the module docstring.

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
            _load_full_params(st.params, hidden)
        result = set_model_state_dict(self.module, sd, options=StateDictOptions(full_state_dict=True, strict=strict))
        st.invalidate()
        return result


def _scalars_out(out, reshaped: Set[str]):
    """Give the [1]-shaped ``logit_scale``/``logit_bias`` outputs their usual 0-D shape back."""
    if not reshaped:
        return out
    if isinstance(out, dict):
        for key in ("logit_scale", "logit_bias"):
            v = out.get(key)
            if isinstance(v, torch.Tensor) and v.dim() == 1 and v.numel() == 1:
                out[key] = v.reshape(())
        return out
    if isinstance(out, tuple) and len(out) >= 3:  # (image_features, text_features, logit_scale[, logit_bias])
        return out[:2] + tuple(v.reshape(()) if isinstance(v, torch.Tensor) and v.dim() == 1 and v.numel() == 1
                               else v for v in out[2:])
    return out


def _checkpoint_shapes(sd: Dict[str, torch.Tensor], reshaped: Set[str]) -> Dict[str, torch.Tensor]:
    for k in reshaped:
        if k in sd and sd[k].dim() == 1:
            sd[k] = sd[k].reshape(())
    return sd


def _model_shapes(sd: Dict[str, torch.Tensor], reshaped: Set[str]) -> Dict[str, torch.Tensor]:
    for k in reshaped:
        if k in sd and isinstance(sd[k], torch.Tensor) and sd[k].dim() == 0:
            sd[k] = sd[k].reshape(1)
    return sd


def _load_full_params(params: Dict[str, nn.Parameter], full: Dict[str, torch.Tensor]) -> None:
    """Copy full tensors into (possibly sharded) parameters: each rank keeps its own shard
    (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    with torch.no_grad():
        for name, value in full.items():
            p = params[name]
            if _is_dtensor(p):
                value = value.to(device=_local(p).device, dtype=p.dtype).reshape(p.shape)
                shard = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)
                _local(p).copy_(_local(shard))
            else:
                p.copy_(value.reshape(p.shape))


def _state(container: nn.Module) -> _State:
    st = getattr(container, "__dict__", {}).get("_fsdp")
    if st is None:
        raise TypeError(f"openclip-structure --fsdp: {type(container).__name__} is not a model returned by fsdp.wrap")
    return st


def is_wrapped(model) -> bool:
    return isinstance(model, FSDPModel)


# ---- wrapping ------------------------------------------------------------------------------------

def _meta_skeleton(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters are on the meta device (buffers are real)."""
    memo: Dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


def _sync_from_rank0(model: nn.Module) -> None:
    """Every rank takes rank 0's parameters and persistent buffers (as DDP does), so every rank
    shards the same model: torch's ``set_model_state_dict(..., broadcast_from_rank0=True)`` with
    rank 0's full state. Parameters are taken from ``named_parameters()`` (the separation heads
    are hidden from ``state_dict()`` by a hook, but must be synced too). Non-persistent buffers
    (e.g. open_clip's attention mask) are not sent: they are built from the model config."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if _world() == 1:
        return
    full: Dict[str, torch.Tensor] = {}
    if _rank() == 0:
        full.update((n, p.detach()) for n, p in model.named_parameters())
        for prefix, mod in model.named_modules():
            for n, b in mod.named_buffers(recurse=False):
                if n not in mod._non_persistent_buffers_set:
                    full[f"{prefix}.{n}" if prefix else n] = b
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def wrap(model: nn.Module, args=None, *, mesh=None, reshard_after_forward: bool = True,
         sync_module_states: bool = True, param_dtype: Optional[str] = None,
         reduce_dtype: Optional[str] = None) -> FSDPModel:
    """Shard ``model`` with FSDP2 and return its :class:`FSDPModel` container.

    Call where open_clip builds DistributedDataParallel (after ``set_grad_checkpointing``, locking,
    the launcher's heads/two-view forward), on every rank, with the process group initialised.
    ``args``: open_clip's namespace (``fsdp_param_dtype``, ``fsdp_reduce_dtype``); keyword
    arguments override it. The parameters are first broadcast from rank 0 (like DDP), so the
    ranks need not have initialised identically.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if is_wrapped(model):
        return model
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("openclip-structure --fsdp needs an initialised torch.distributed process group")
    params = list(model.parameters())
    if not params:
        raise ValueError("openclip-structure --fsdp: the model has no parameters")
    device = params[0].device
    if device.type == "meta":
        raise ValueError("openclip-structure --fsdp: materialise the model before wrapping it")
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        torch.cuda.set_device(device)
    if mesh is None:
        mesh = init_device_mesh(device.type, (_world(),))
    mp = mixed_precision_policy(args, param_dtype, reduce_dtype)

    if sync_module_states:
        _sync_from_rank0(model)
    skeleton = _meta_skeleton(model)
    visible = set(model.state_dict(keep_vars=True))
    hidden = [n for n, _ in model.named_parameters() if n not in visible]

    reshaped = set()
    for name, p in list(model.named_parameters()):
        if p.dim() == 0:
            owner, _, attr = name.rpartition(".")
            parent = model.get_submodule(owner) if owner else model
            setattr(parent, attr, nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad))
            reshaped.add(name)

    blocks = shard_modules(model)
    for _, block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp)  # root: default (kept unsharded between fwd and bwd)

    state = _State(skeleton=skeleton, reshaped=reshaped, hidden=hidden, device=device)
    container = FSDPModel(model, state)
    state.params = dict(model.named_parameters())
    state.param_ids = {id(p) for p in state.params.values()}
    _CONTAINERS.add(container)
    from .heads import HEADS_KEY  # the separation heads hide from state_dict(): bind them
    heads = getattr(model, HEADS_KEY, None)
    if isinstance(heads, nn.Module):
        bind_submodule(container, heads)
    if _rank() == 0:
        logging.info(f"openclip-structure --fsdp: sharded {len(blocks)} blocks + root over {_world()} ranks "
                     f"({mesh.device_type}), param dtype {mp.param_dtype or 'as stored'}, "
                     f"reduce dtype {mp.reduce_dtype or 'as params'}"
                     + (f"; {sorted(reshaped)} held as [1]" if reshaped else ""))
    return container


# ---- optimizers ----------------------------------------------------------------------------------

def _owner_of(optimizer: torch.optim.Optimizer) -> Optional[FSDPModel]:
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


def _param_fqns(container: FSDPModel, optimizer) -> List[str]:
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


def bind_optimizer(container: FSDPModel, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
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
                gather_full_state(c, self)
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
        _load_full_params(container._fsdp.params, {sub_prefix + k: v for k, v in state_dict.items() if k in names})
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
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    st = _state(container)
    inner = container.module
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    st.invalidate()
    _reshard(inner)
    sd = get_model_state_dict(inner, options=opts)
    hidden = {}
    for name in st.hidden:
        p = st.params[name]
        full = p.full_tensor() if _is_dtensor(p) else p.detach().clone()
        if _rank() == 0:
            hidden[name] = full.cpu()
    st.full_model = _checkpoint_shapes(dict(sd), st.reshaped)
    st.full_hidden = hidden
    optimizers = [optimizer] if optimizer is not None else list(st.optimizers)
    for opt in optimizers:
        bind_optimizer(container, opt)
        ost = opt.__dict__["_fsdp_opt"]
        if not opt.state:  # nothing to gather (DSD would take a fake step to create the state)
            ost.full = type(opt).state_dict(opt)
        else:
            with _raw(opt):
                osd = get_optimizer_state_dict(inner, opt, options=opts)
            ost.full = (_indexed_optimizer_state(container, opt, osd) if osd.get("state") or _rank() == 0
                        else {"state": {}, "param_groups": []})
        ost.versions = _opt_versions(opt)
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


# ---- sharded (torch.distributed.checkpoint) checkpoints ------------------------------------------

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


def save_sharded(container: FSDPModel, optimizer: Optional[torch.optim.Optimizer], directory: str,
                 epoch: int) -> str:
    """ALL ranks: write model (+ optimizer) shards and ``epoch`` to the DCP ``directory``
    (on a filesystem every rank can reach). Returns ``directory``."""
    import torch.distributed.checkpoint as dcp

    state = _sharded_state(container, optimizer)
    state["epoch"] = int(epoch)
    dcp.save(state, checkpoint_id=directory)
    return directory


def load_sharded(container: FSDPModel, optimizer: Optional[torch.optim.Optimizer], directory: str) -> int:
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


class _AlreadyLoaded(dict):
    """Marker: the state was loaded from a sharded checkpoint already; load_state_dict is a no-op."""


def sharded_resume_checkpoint(container: FSDPModel, directory: str,
                              optimizer: Optional[torch.optim.Optimizer] = None) -> Dict[str, Any]:
    """ALL ranks: :func:`load_sharded`, then return ``{"epoch", "state_dict", "optimizer"}`` whose
    state entries make ``container.load_state_dict`` and the bound ``optimizer.load_state_dict``
    no-ops, for a ``pt_load`` wrapper to hand to open_clip's own resume code."""
    epoch = load_sharded(container, optimizer, directory)
    return {"epoch": epoch, "state_dict": _AlreadyLoaded(), "optimizer": _AlreadyLoaded()}
