"""Shared pieces of :mod:`openclip_structure.fsdp`: dtypes, rank helpers, the per-container
bookkeeping (:class:`_State`), the registry of wrapped models and the conversions between the
checkpoint shapes (0-D ``logit_scale``) and the sharded model's ([1])."""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
import torch.distributed as dist
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: prefix of the container's parameter / state-dict keys (the same as DDP's)
PREFIX = "module."


class StaleStateError(RuntimeError):
    """``state_dict()`` was called on a sharded model without a current :func:`gather_full_state`."""


# ---- helpers -------------------------------------------------------------------------------------

def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if is_dtensor(t) else t


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _strip_prefix(sd: Dict[str, Any], prefix: str = PREFIX) -> Dict[str, Any]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return dict(sd)


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


def load_full_params(params: Dict[str, nn.Parameter], full: Dict[str, torch.Tensor]) -> None:
    """Copy full tensors into (possibly sharded) parameters: each rank keeps its own shard
    (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    with torch.no_grad():
        for name, value in full.items():
            p = params[name]
            if is_dtensor(p):
                value = value.to(device=local_tensor(p).device, dtype=p.dtype).reshape(p.shape)
                shard = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)
                local_tensor(p).copy_(local_tensor(shard))
            else:
                p.copy_(value.reshape(p.shape))


def _state(container: nn.Module) -> _State:
    st = getattr(container, "__dict__", {}).get("_fsdp")
    if st is None:
        raise TypeError(f"openclip-structure --fsdp: {type(container).__name__} is not a model returned by fsdp.wrap")
    return st


class _AlreadyLoaded(dict):
    """Marker: the state was loaded from a sharded checkpoint already; load_state_dict is a no-op."""
