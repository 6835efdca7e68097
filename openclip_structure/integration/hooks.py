"""The hook table: hook name -> ``wrap_<name>`` (the concerns: see the package docstring)."""
from __future__ import annotations

from .checkpoints import wrap_pt_load, wrap_train_one_epoch
from .loaders import wrap_get_data
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
