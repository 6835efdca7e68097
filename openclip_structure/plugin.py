"""openclip-structure as an open_clip_train plugin (entry-point group ``open_clip_train.plugins``).

With open_clip_train's generic plugin hook in place (``patches/open_clip_train-3.x-plugins.patch``,
applied by ``python scripts/apply_open_clip_patch.py``) the plain entrypoint trains with the plugin::

    python -m open_clip_train.main ... --gap-atp-weight 1
    torchrun --nproc_per_node N -m open_clip_train.main ... --gap-atp-weight 1

exactly like ``python -m openclip_structure.main ...``. Without the patch nothing calls this module.
The hooks (see the patch's ``open_clip_train/plugins.py``):

* ``add_arguments(parser)``: the plugin's flag group; also registers the bundled model configs
  (``--model structure-tiny``);
* ``validate(args, parser)``: :func:`openclip_structure.flags.validate`, ``parser.error`` on a
  :class:`~openclip_structure.flags.FlagError`;
* ``wrap_create_loss(create_loss)``: :func:`openclip_structure.factory.create_loss` on top of
  open_clip's own ``create_loss``;
* ``install(args)``: the launcher's other run-time patches (:func:`openclip_structure.main.installed`:
  model preparation, ``--fixed-temperature``, LR-schedule progress, CPU DDP, validation metrics,
  two views, separation heads in checkpoints) on the running ``open_clip_train.main`` module,
  without its ``parse_args``/``create_loss`` patches (the two hooks above do that).

When the launcher itself runs on a patched open_clip_train (``python -m openclip_structure.main``),
these hooks stand aside: the launcher already does all of it.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
from types import ModuleType


from . import factory, flags
from . import main as launcher
from .schedule import PROGRESS

TRAIN_MODULE = "open_clip_train.main"

def launcher_active() -> bool:
    """Whether the launcher (``python -m openclip_structure.main``) is running: it adds the flags,
    validates them and builds the loss itself, so the hooks below stand aside."""
    return launcher.launcher_owns_parsing()


def training_module() -> ModuleType:
    """The ``open_clip_train.main`` module whose ``main()`` runs: ``__main__`` under
    ``python -m open_clip_train.main`` (also via torchrun) or ``python .../open_clip_train/main.py``,
    otherwise the imported module (``open_clip_train.main.main(argv)`` called from code)."""
    top = sys.modules.get("__main__")
    spec = getattr(top, "__spec__", None)
    if spec is not None and spec.name == TRAIN_MODULE:
        return top
    found = importlib.util.find_spec(TRAIN_MODULE)
    path = getattr(top, "__file__", None)
    if spec is None and path and found is not None and found.origin and \
            os.path.realpath(path) == os.path.realpath(found.origin):
        return top
    import open_clip_train.main as ocm
    return ocm


def add_arguments(parser) -> None:
    launcher.register_model_configs()
    if not launcher_active():  # the launcher adds the group itself
        flags.add_arguments(parser)


def validate(args, parser) -> None:
    if launcher_active():
        return
    try:
        flags.validate(args)
    except flags.FlagError as e:
        parser.error(str(e))


def wrap_create_loss(create_loss):
    if launcher_active():  # ``create_loss`` already is the launcher's
        return create_loss

    @functools.wraps(create_loss)
    def create_structure_loss(args):
        return factory.create_loss(args, base_factory=create_loss, progress=PROGRESS)

    return create_structure_loss


def install(args):
    """The launcher's run-time patches for this run, or None when the launcher runs."""
    if launcher_active():
        return None
    return _installed(training_module(), args)


@contextlib.contextmanager
def _installed(ocm: ModuleType, args):
    """The launcher's patches with the already parsed ``args``; parse_args/create_loss are left to
    open_clip_train's own hook (this plugin's ``add_arguments``/``validate``/``wrap_create_loss``)."""
    with launcher.installed(ocm, args=args):
        yield
