"""Loss hook: open_clip's loss factory plus the enabled regularizer terms."""
from __future__ import annotations

import functools

from .. import factory
from ..schedule import PROGRESS


def wrap_create_loss(create_loss):
    """``create_loss(args)`` -> :func:`openclip_structure.factory.create_loss` on top of it."""
    if getattr(create_loss, "_structure_hook", False):
        return create_loss

    @functools.wraps(create_loss)
    def create_structure_loss(args):
        return factory.create_loss(args, base_factory=create_loss, progress=PROGRESS)

    create_structure_loss._structure_hook = True
    return create_structure_loss
