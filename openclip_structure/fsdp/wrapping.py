"""Sharding an open_clip model with FSDP2: which blocks are sharded, the mixed-precision policy
from the flags, and :func:`wrap`."""
from __future__ import annotations

import copy
import logging
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .common import _CONTAINERS, DTYPES, _rank, _State, _world
from .container import FSDPModel, bind_submodule, is_wrapped

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
    from ..views.heads import HEADS_KEY  # the separation heads hide from state_dict(): bind them
    heads = getattr(model, HEADS_KEY, None)
    if isinstance(heads, nn.Module):
        bind_submodule(container, heads)
    if _rank() == 0:
        logging.info(f"openclip-structure --fsdp: sharded {len(blocks)} blocks + root over {_world()} ranks "
                     f"({mesh.device_type}), param dtype {mp.param_dtype or 'as stored'}, "
                     f"reduce dtype {mp.reduce_dtype or 'as params'}"
                     + (f"; {sorted(reshaped)} held as [1]" if reshaped else ""))
    return container
