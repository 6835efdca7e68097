"""Progress hook: the LR-scheduler factories record the global step and the total number of
steps in :data:`openclip_structure.schedule.PROGRESS` (what ``--gap-schedule ramp`` reads)."""
from __future__ import annotations

import functools

from ..schedule import PROGRESS


class ProgressNotTrackedError(RuntimeError):
    """The LR scheduler hook was never called: a weight schedule would stay at its first value."""


def wrap_lr_scheduler(factory_fn):
    @functools.wraps(factory_fn)
    def make(optimizer, base_lr, warmup_length, steps, *args, **kwargs):
        from .parallel import bind_optimizer

        bind_optimizer(optimizer)  # (--fsdp: optimizers no other hook saw, e.g. timm's)
        adjust = factory_fn(optimizer, base_lr, warmup_length, steps, *args, **kwargs)
        PROGRESS.total_steps = int(steps)

        def adjust_and_record(step):
            PROGRESS.step = int(step)
            return adjust(step)

        return adjust_and_record

    return make


def check_tracked(args) -> None:
    """After an epoch: a schedule that follows training progress must have seen the scheduler."""
    if getattr(args, "gap_schedule", "constant") != "constant" and PROGRESS.total_steps is None:
        raise ProgressNotTrackedError(
            f"openclip-structure: --gap-schedule {args.gap_schedule} follows the LR scheduler, but no "
            "LR scheduler hook was called during the epoch (this open_clip version creates its scheduler "
            "under another name): the loss weights would stay at their first values")
