"""Parallel hook: open_clip's data-parallel wrapping and optimizer.

* ``DistributedDataParallel(model, device_ids=[device])``: with the plugin's ``--fsdp`` the
  training model is sharded with FSDP2 instead (:func:`openclip_structure.fsdp.wrap`); otherwise
  torch's DDP, with ``device_ids`` dropped for CPU modules (open_clip 3.x passes
  ``device_ids=[cpu]``, which torch rejects), so CPU clusters and the gloo tests work.
* optimizers: under our FSDP2, an optimizer over the sharded model's parameters gets full-state
  (de)serialisation (:func:`openclip_structure.fsdp.bind_optimizer`).
"""
from __future__ import annotations

import functools

import torch

from .. import fsdp
from . import state


def _cpu_only(device_ids) -> bool:
    return device_ids is not None and all(torch.device(d).type == "cpu" for d in device_ids)


class CPUFriendlyDDP(torch.nn.parallel.DistributedDataParallel):
    """torch's DDP with ``device_ids=[cpu]`` dropped, as :func:`wrap_distributed_data_parallel` does
    for open_clip (for code that builds DDP itself: the benchmarks and test workers)."""

    def __init__(self, module, device_ids=None, *args, **kwargs):
        super().__init__(module, None if _cpu_only(device_ids) else device_ids, *args, **kwargs)


def wrap_distributed_data_parallel(ddp_cls):
    @functools.wraps(ddp_cls, updated=())
    def make(module, device_ids=None, *args, **kwargs):
        run = state.current()
        if run is not None and run.uses_fsdp() and (run.model is None or module is run.model):
            run.container = fsdp.wrap(module, run.args)
            return run.container
        if _cpu_only(device_ids):
            device_ids = None
        return ddp_cls(module, device_ids, *args, **kwargs)

    return make


def bind_optimizer(optimizer):
    """Under our FSDP2: bind an optimizer of the sharded model's parameters (idempotent)."""
    run = state.current()
    if run is not None and run.container is not None and isinstance(optimizer, torch.optim.Optimizer):
        if fsdp.owner_of(optimizer) is run.container:
            fsdp.bind_optimizer(run.container, optimizer)
    return optimizer


def wrap_optimizer(factory):
    @functools.wraps(factory, updated=())
    def make(*args, **kwargs):
        return bind_optimizer(factory(*args, **kwargs))

    return make


def bound_optimizer(run: state.Run):
    """The optimizer bound to the run's FSDP2 container, or None."""
    if run is None or run.container is None:
        return None
    return next(iter(fsdp.bound_optimizers(run.container)), None)
