"""The hooks on an UNPATCHED open_clip_train 3.x: names replaced inside open_clip_train's own
modules, and only there, while the launcher's run lasts.

Every replaced name is in :data:`TABLE`. Before anything is replaced, :func:`check` verifies for
each entry that the module still has the name and that the function which should call it still
refers to it (and, for a namespace such as ``torch``, to the attributes the hook serves); a
missing one is a clear error naming the open_clip version. Namespaces (``torch``, ``optim``,
``argparse``) are replaced by a :class:`ModuleView`: an object that answers every attribute from
the real module except the few the hook serves, so the library module itself never changes.
"""
from __future__ import annotations

import contextlib
import importlib
import types
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Tuple

from .hooks import HOOKS
from .arguments import PluginArgumentParser
from .state import open_clip_version

#: open_clip_torch releases the table was checked against (tests/test_version_matrix.py trains on each)
VERSIONS_CHECKED = ("3.0.0", "3.1.0", "3.2.0", "3.3.0")


class IntegrationError(RuntimeError):
    """This open_clip_train does not have (or no longer calls) a name the plugin hooks into."""


class ModuleView(types.ModuleType):
    """A stand-in for ``module`` inside ONE open_clip_train module: the attributes in ``overrides``
    are answered from there, every other attribute (read or written) is the real module's."""

    def __init__(self, module: types.ModuleType, **overrides):
        super().__init__(module.__name__, module.__doc__)
        self.__dict__.update(overrides)
        object.__setattr__(self, "_module", module)

    def __getattr__(self, name):  # only reached for names not overridden
        return getattr(object.__getattribute__(self, "_module"), name)

    def __setattr__(self, name, value):
        setattr(object.__getattribute__(self, "_module"), name, value)

    def __repr__(self) -> str:
        return f"<view of {object.__getattribute__(self, '_module')!r} for openclip-structure>"


def _torch_view(torch_module):
    """``torch`` for open_clip_train.main: ``nn.parallel.DistributedDataParallel`` goes through the
    parallel hook (torch's own ``amp.GradScaler`` serves FSDP2 too)."""
    nn = torch_module.nn
    parallel = ModuleView(nn.parallel, DistributedDataParallel=HOOKS["distributed_data_parallel"](
        nn.parallel.DistributedDataParallel))
    return ModuleView(torch_module, nn=ModuleView(nn, parallel=parallel))


def _optim_view(optim):
    return ModuleView(optim, AdamW=HOOKS["optimizer"](optim.AdamW))


def _argparse_view(argparse_module):
    return ModuleView(argparse_module, ArgumentParser=PluginArgumentParser)


@dataclass(frozen=True)
class Replacement:
    module: str                      # the open_clip_train module whose global name is replaced
    name: str                        # that global name
    caller: str                      # the function of ``module`` that must refer to it
    why: str
    hook: Optional[object] = None       # HOOKS entry that wraps the original (or the wrapping function)
    view: Optional[Callable] = None  # or: a ModuleView builder for a namespace
    uses: Tuple[str, ...] = ()       # attribute names the caller must still use on the namespace

    def replacement(self, original):
        if self.view is not None:
            return self.view(original)
        return (self.hook if callable(self.hook) else HOOKS[self.hook])(original)


MAIN, PARAMS, TRAIN = "open_clip_train.main", "open_clip_train.params", "open_clip_train.train"

#: every name the shim replaces (versions checked: VERSIONS_CHECKED)
TABLE: Tuple[Replacement, ...] = (
    Replacement(PARAMS, "argparse", "parse_args", "flags: the plugin's group on open_clip's own parser "
                "(--help, params.txt, wandb config), validated before anything is built",
                view=_argparse_view, uses=("ArgumentParser",)),
    Replacement(MAIN, "create_loss", "main", "loss: open_clip's loss plus the enabled terms", hook="create_loss"),
    Replacement(MAIN, "create_model_and_transforms", "main", "model: --fixed-temperature, separation heads, "
                "two-view forward and train preprocess", hook="create_model_and_transforms"),
    Replacement(MAIN, "get_data", "main", "data: two captions per train sample (--text-aug)", hook="get_data"),
    Replacement(MAIN, "torch", "main", "parallel: DDP on CPU (device_ids=[cpu]) or FSDP2 with --fsdp",
                view=_torch_view, uses=("nn", "parallel", "DistributedDataParallel")),
    Replacement(MAIN, "optim", "main", "parallel: --fsdp optimizers get full-state (de)serialisation",
                view=_optim_view, uses=("AdamW",)),
    Replacement(MAIN, "cosine_lr", "main", "progress: global step for --gap-schedule", hook="lr_scheduler"),
    Replacement(MAIN, "const_lr", "main", "progress: global step for --gap-schedule", hook="lr_scheduler"),
    Replacement(MAIN, "const_lr_cooldown", "main", "progress: global step for --gap-schedule",
                hook="lr_scheduler"),
    Replacement(MAIN, "train_one_epoch", "main", "checkpoints: separation heads beside each checkpoint, "
                "FSDP2 full/sharded state after each epoch", hook="train_one_epoch"),
    Replacement(MAIN, "pt_load", "main", "checkpoints: heads and FSDP2 shards on --resume, skip a "
                "half-written latest checkpoint", hook="pt_load"),
    Replacement(MAIN, "evaluate", "main", "validation: group metrics pass; FSDP2 rank-0 replica",
                hook="evaluate"),
    Replacement(TRAIN, "get_clip_metrics", "evaluate", "validation: gap metrics from open_clip's "
                "validation embeddings", hook="get_clip_metrics"),
)


def entries(*names: Tuple[str, str]) -> Tuple[Replacement, ...]:
    """The entries of :data:`TABLE` for ``(module, name)`` pairs (open_clip main's task table reuses
    the ones its open_clip_train shares with 3.x)."""
    by_name = {(r.module, r.name): r for r in TABLE}
    return tuple(by_name[n] for n in names)


def _names(code: types.CodeType) -> set:
    """Global and attribute names a function's code (and its nested code) refers to."""
    out = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            out |= _names(const)
    return out


def check(modules: Dict[str, types.ModuleType], version: Optional[str] = None,
          table: Tuple[Replacement, ...] = TABLE, checked: Tuple[str, ...] = VERSIONS_CHECKED) -> None:
    """Raise :class:`IntegrationError` unless every ``table`` name exists and is still used."""
    version = version or open_clip_version()
    problems = []
    for r in table:
        module = modules[r.module]
        caller = getattr(module, r.caller, None)
        if not hasattr(module, r.name):
            problems.append(f"{r.module} has no '{r.name}' ({r.why})")
        elif not isinstance(caller, types.FunctionType):
            problems.append(f"{r.module} has no function '{r.caller}' that uses '{r.name}'")
        else:
            missing = [n for n in (r.name,) + r.uses if n not in _names(caller.__code__)]
            if missing:
                problems.append(f"{r.module}.{r.caller} no longer refers to {', '.join(missing)} ({r.why})")
    if problems:
        raise IntegrationError(
            f"openclip-structure cannot hook into open_clip_torch {version}: " + "; ".join(problems)
            + f". The plugin's shim was checked with open_clip {', '.join(checked)}; use one of "
            "those, or apply the hook patch (python -m openclip_structure.patch).")


def check_version(version: Optional[str] = None) -> str:
    version = version or open_clip_version()
    if version.split(".")[0] != "3":
        raise IntegrationError(
            f"openclip-structure does not support open_clip_torch {version} through its launcher on open_clip_train: "
            f"supported are 3.x (checked: {', '.join(VERSIONS_CHECKED)}) and open_clip main's task API (4.x dev); "
            "open_clip 2.16 - 2.24: apply the hook patch (python -m openclip_structure.patch) and train with "
            "python -m training.main")
    return version


def training_modules(ocm: Optional[types.ModuleType] = None,
                     table: Tuple[Replacement, ...] = TABLE) -> Dict[str, types.ModuleType]:
    """The open_clip_train modules a table names (``ocm``: the ``open_clip_train.main`` to use)."""
    modules = {name: importlib.import_module(name) for name in {r.module for r in table}}
    if ocm is not None:
        modules[MAIN] = ocm
    return modules


@contextlib.contextmanager
def replaced(table: Tuple[Replacement, ...], modules: Dict[str, types.ModuleType]) -> Iterator[None]:
    """Replace the ``table`` names in ``modules`` for the block; restore them after."""
    saved = []
    try:
        for r in table:
            module = modules[r.module]
            original = getattr(module, r.name)
            saved.append((module, r.name, original))
            setattr(module, r.name, r.replacement(original))
        yield
    finally:
        for module, name, original in reversed(saved):
            setattr(module, name, original)


@contextlib.contextmanager
def installed(ocm: Optional[types.ModuleType] = None) -> Iterator[types.ModuleType]:
    """The :data:`TABLE` names replaced in open_clip_train 3.x's modules for the block (checked first)."""
    modules = training_modules(ocm)
    check(modules, check_version())
    with replaced(TABLE, modules):
        yield modules[MAIN]


def support_table(table: Tuple[Replacement, ...] = TABLE, checked: Tuple[str, ...] = VERSIONS_CHECKED) -> str:
    """A table as markdown (name, why, versions checked)."""
    rows = ["| name | caller | why | versions checked |", "|---|---|---|---|"]
    for r in table:
        rows.append(f"| `{r.module}.{r.name}` | `{r.caller}` | {r.why} | {', '.join(checked)} |")
    return "\n".join(rows)
