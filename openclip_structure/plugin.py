"""openclip-structure as an open_clip_train plugin (entry-point group ``open_clip_train.plugins``).

With open_clip_train's generic plugin hook in place (``openclip_structure/patches/``, applied by
``python -m openclip_structure.patch``) the plain entrypoint trains with the plugin::

    python -m open_clip_train.main ... --gap-atp-weight 1
    torchrun --nproc_per_node N -m open_clip_train.main ... --gap-atp-weight 1

exactly like ``python -m openclip_structure.main ...`` (which, on a patched open_clip_train, just
lets these hooks work). Nothing is replaced anywhere: open_clip calls

* ``add_arguments(parser)`` / ``validate(args, parser)``: the flags (and the bundled model configs);
* ``install(args)``: the run's state (:mod:`openclip_structure.integration.state`) around training;
* ``wrap_<name>(fn)`` at each ``plugins.wrap(name, fn)`` call site: the hooks of
  :mod:`openclip_structure.integration` (loss, model, data, parallel, checkpoints, validation,
  progress).

Under the launcher's shim (an older patch that still calls ``add_arguments``/``install``), a run
is already current and these hooks stand aside.
"""
from __future__ import annotations

from .integration import arguments as _flags
from .integration import state
from .integration.hooks import (wrap_create_loss, wrap_create_model_and_transforms,  # noqa: F401 (the hooks)
                          wrap_distributed_data_parallel, wrap_evaluate, wrap_get_clip_metrics, wrap_get_data,
                          wrap_lr_scheduler, wrap_optimizer, wrap_pt_load, wrap_train_one_epoch)


def add_arguments(parser) -> None:
    _flags.add_arguments(parser)  # idempotent


def validate(args, parser) -> None:
    _flags.validate(args, parser)


def install(args):
    """The run's state for the duration of training (None when the launcher's run is current)."""
    if state.current() is not None:
        return None
    return state.running(args)

