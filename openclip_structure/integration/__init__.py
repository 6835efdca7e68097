"""The plugin's integration with open_clip training: one hook per point it needs, one module per
concern, and nothing that replaces an attribute of torch, argparse or any other library.

=================  ===========================================  =================================
concern            hooks (``wrap_<name>(callable) -> callable``)  module
=================  ===========================================  =================================
flags              ``add_arguments``, ``validate``               :mod:`.flags`
loss               ``create_loss``                               :mod:`.loss`
model              ``create_model_and_transforms``               :mod:`.model`
data               ``get_data``                                  :mod:`.data`
parallel           ``distributed_data_parallel``, ``optimizer``  :mod:`.parallel`
checkpoints        ``train_one_epoch``, ``pt_load``              :mod:`.checkpoints`
validation         ``evaluate``, ``get_clip_metrics``            :mod:`.validation`
progress           ``lr_scheduler``                              :mod:`.progress`
=================  ===========================================  =================================

Where they are called from:

* a hook-patched open_clip_train (``python -m openclip_structure.patch``): its
  ``plugins.wrap(name, fn)`` call sites apply our ``wrap_<name>`` (the entry point
  :mod:`openclip_structure.plugin`); nothing is replaced;
* an unpatched open_clip_train 3.x: :mod:`.shim` replaces the names listed in its ``TABLE``
  inside open_clip_train's own modules, for the duration of the launcher's run only;
* open_clip main (4.x dev, task API): :mod:`.task`.

The hooks share one :class:`.state.Run` per training run.
"""
from __future__ import annotations

from .checkpoints import wrap_pt_load, wrap_train_one_epoch
from .data import wrap_get_data
from .loss import wrap_create_loss
from .model import wrap_create_model_and_transforms
from .parallel import wrap_distributed_data_parallel, wrap_optimizer
from .progress import wrap_lr_scheduler
from .validation import wrap_evaluate, wrap_get_clip_metrics

#: hook name -> ``wrap_<name>``
HOOKS = {
    "create_loss": wrap_create_loss,
    "create_model_and_transforms": wrap_create_model_and_transforms,
    "get_data": wrap_get_data,
    "distributed_data_parallel": wrap_distributed_data_parallel,
    "optimizer": wrap_optimizer,
    "lr_scheduler": wrap_lr_scheduler,
    "train_one_epoch": wrap_train_one_epoch,
    "pt_load": wrap_pt_load,
    "evaluate": wrap_evaluate,
    "get_clip_metrics": wrap_get_clip_metrics,
}

__all__ = ["HOOKS"] + [f"wrap_{name}" for name in HOOKS]
