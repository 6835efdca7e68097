"""Launcher: open_clip's training entrypoint with the plugin's hooks in place.

    python -m openclip_structure.main [--] <open_clip_train flags> <plugin flags>
    torchrun --nproc_per_node N -m openclip_structure.main -- <flags>

The hooks themselves are in :mod:`openclip_structure.integration` (one module per concern). How
they reach open_clip depends on what is installed:

* open_clip_train with the hook patch (``python -m openclip_structure.patch``) and this plugin
  registered: open_clip calls the hooks itself (:mod:`openclip_structure.plugin`); the launcher
  only calls ``open_clip_train.main.main(argv)`` and replaces nothing;
* an unpatched open_clip_train 3.x: :mod:`openclip_structure.integration.shim` replaces the names
  of its table inside open_clip_train's modules while the run lasts (checked at startup);
* open_clip main (4.x dev, task API): :mod:`openclip_structure.integration.task`.

No attribute of torch, argparse or any other library is ever replaced.
"""
from __future__ import annotations

import contextlib
import sys
from typing import List, Optional

from .configs import register_model_configs
from .integration import shim, state


def hook_patch_serves_us() -> bool:
    """open_clip_train has the hook patch (with ``plugins.wrap``) and this plugin is registered."""
    try:
        from open_clip_train import plugins
    except ImportError:
        return False
    if not callable(getattr(plugins, "wrap", None)):
        return False
    from . import plugin

    return any(p is plugin for p in plugins.load_plugins())


def uses_task_api() -> bool:
    """open_clip main (4.x dev): training goes through ``open_clip.create_task``."""
    import open_clip_train.main as ocm

    return hasattr(ocm, "create_task") and not hasattr(ocm, "create_loss")


def route() -> str:
    """How the hooks reach open_clip here: ``task API``, ``hook patch`` or ``shim``; refuses (with
    the version named) what the plugin does not support."""
    version = shim.open_clip_version()
    if not version.startswith("3."):
        try:
            task_api = uses_task_api()
        except ImportError:
            task_api = False
        if not task_api:
            shim.check_version(version)  # raises IntegrationError naming the version
        return "task API"
    return "hook patch" if hook_patch_serves_us() else "shim"


@contextlib.contextmanager
def installed(ocm=None):
    """A run is current and the shim's names are in place (unpatched open_clip_train 3.x)."""
    with state.running(), shim.installed(ocm) as ocm:
        yield ocm


def parse_args(argv: List[str]):
    """open_clip_train's ``parse_args`` with the plugin's group (as the launcher parses)."""
    with installed() as ocm:
        return ocm.parse_args(list(argv))


def main(argv: Optional[List[str]] = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `torchrun ... -m openclip_structure.main -- --flags`
        argv = argv[1:]
    register_model_configs()
    try:
        how = route()
    except shim.IntegrationError as e:
        raise SystemExit(f"error: {e}") from None
    state.ROUTE[0] = None if how == "hook patch" else f"open_clip {shim.open_clip_version()} through the {how}"
    if how == "task API":
        from .integration import task

        with task.installed() as ocm:
            result = ocm.main(argv)
    elif how == "hook patch":
        import open_clip_train.main as ocm

        result = ocm.main(argv)
    else:
        with installed() as ocm:
            result = ocm.main(argv)
    _shutdown_process_group()
    return result


def _shutdown_process_group() -> None:
    """open_clip_train never destroys its process group; do it once every rank is done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    # run the imported module's main(), not this __main__ copy's, so that there is one run state
    from openclip_structure.main import main as _main

    sys.exit(_main())
