"""Data-parallel plumbing for the regularizers: one gather per step, shared by every term.

Every regularizer in this package is written as *sums over the local rows* of the batch against
the *globally gathered* batch (columns). A term returns a small vector of such sums (its
statistics); :func:`reduce_statistics` all-reduces the statistics of all terms in one call and
returns a surrogate whose value is the global sum and whose gradient is ``world_size`` times the
local one. Because DDP/FSDP average gradients over processes, the applied gradient is then exactly
the gradient of the single-process loss on the global batch, for any loss that is a function of
such sums (means, log-means, ...). The gather carries gradients (``torch.distributed.nn``), so
pairs that cross process boundaries contribute on both sides.

Memory: a term never builds more than ``B_local x B_global`` per process, whatever the
``--local-loss``/``--gather-with-grad`` setting of the base loss; the regularizers are exact in
every combination of those flags. open_clip's base loss is not always (with its default flags it
applies 1/W of its single-process gradient): the composite loss then scales the terms' gradients by
the same factor (:func:`scale_grad`, :mod:`openclip_structure.scaling`), so that a weight means the
same on any number of processes.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Mapping, Optional

import torch
import torch.distributed as dist

#: torch >= 2.6 warns on every call of torch.distributed.nn's autograd-aware all_gather (the one
#: open_clip's --gather-with-grad uses too) that it is deprecated in favour of a private API; it
#: still works and is what the terms need. Silenced for our own call only (a scoped filter: the
#: process's warning filters, and open_clip's own call, are left as they are).
_GATHER_DEPRECATION = r"torch\.distributed\.nn\.functional\.all_gather is deprecated"


def _gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed.nn.functional as dist_fn

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_GATHER_DEPRECATION, category=FutureWarning)
        return torch.cat(dist_fn.all_gather(x), dim=0)


class FeatureBatch:
    """The embeddings a loss sees in one call: local rows plus lazily gathered global columns.

    ``local`` maps a modality key ("image", "text", "image_aug", ...) to the ``[B_local, D]``
    tensor of this process. ``cols(key)`` returns the ``[B_global, D]`` gathered tensor (computed
    once per key and shared by all terms); ``rows(key)`` the local part. The local rows sit at
    ``offset : offset + n_local`` of the global batch (all processes hold equal batches, as in
    open_clip's ClipLoss).
    """

    def __init__(self, local: Mapping[str, torch.Tensor], rank: int = 0, world_size: int = 1,
                 logit_scale: Optional[torch.Tensor] = None):
        if not local:
            raise ValueError("FeatureBatch needs at least one embedding tensor")
        self.local: Dict[str, torch.Tensor] = dict(local)
        sizes = {k: tuple(v.shape) for k, v in self.local.items()}
        n = None
        for key, t in self.local.items():
            if t.dim() != 2:
                raise ValueError(f"{key} embeddings must be 2-D [batch, dim], got shape {tuple(t.shape)}")
            n = t.shape[0] if n is None else n
            if t.shape[0] != n:
                raise ValueError(f"embeddings have different batch sizes: {sizes}")
        if n == 0:
            raise ValueError("embeddings have an empty batch")
        self.rank = rank
        self.world_size = world_size
        self.n_local = n
        self.n_global = n * world_size
        self.offset = rank * n
        #: the CLIP logit scale (exp of the learnt log-scale) for terms that share its temperature
        self.logit_scale = logit_scale
        self._cols: Dict[str, torch.Tensor] = {}

    def rows(self, key: str) -> torch.Tensor:
        return self.local[key]

    def cols(self, key: str) -> torch.Tensor:
        if key not in self._cols:
            x = self.local[key]
            self._cols[key] = _gather_with_grad(x) if self.world_size > 1 else x
        return self._cols[key]

    def diagonal_index(self) -> torch.Tensor:
        """Global column index of each local row's own sample."""
        device = next(iter(self.local.values())).device
        return torch.arange(self.n_local, device=device) + self.offset


def reduce_statistics(stats: List[torch.Tensor], world_size: int) -> List[torch.Tensor]:
    """Sum each term's statistics over processes in ONE all-reduce; keep local gradients.

    Returns ``S_global.detach() + world_size * (s - s.detach())`` per term: the value is the
    global sum, the gradient ``world_size`` times the local one (see the module docstring).
    """
    if world_size == 1 or not stats:
        return stats
    flat = torch.cat([s.detach().reshape(-1) for s in stats])
    dist.all_reduce(flat)
    out, start = [], 0
    for s in stats:
        g = flat[start:start + s.numel()].view_as(s)
        start += s.numel()
        out.append(g + world_size * (s - s.detach()))
    return out


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient is multiplied by ``factor`` on the way back."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` unchanged in value, its gradient times ``factor`` (``x`` itself when there is nothing
    to scale). The composite loss scales the terms' inputs by the base loss's own gradient scale
    (:mod:`openclip_structure.scaling`)."""
    if factor == 1.0 or not x.requires_grad:
        return x
    return _ScaleGrad.apply(x, float(factor))


def distributed_context(args) -> tuple:
    """(rank, world_size) from open_clip's args, or from an initialised process group."""
    world_size = int(getattr(args, "world_size", 1) or 1)
    rank = int(getattr(args, "rank", 0) or 0)
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("world_size > 1 but torch.distributed is not initialised")
    return rank, world_size
