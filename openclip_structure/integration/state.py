"""The state of the training run the hooks serve (one per process at a time)."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from ..schedule import PROGRESS


class Run:
    """What the hooks of one training run share: the parsed args, the training model as created,
    its separation heads, the FSDP2 container, the validation preprocess and the validation hook
    (:func:`openclip_structure.integration.validation.of`)."""

    def __init__(self, args=None):
        self.args = args
        self.model = None       # the training model as open_clip created it (before DDP/FSDP)
        self.heads = None       # separation heads (None: --sep-weight 0)
        self.container = None   # the fsdp.FSDPModel with --fsdp
        self.resume_latest = False
        self.upstream_fsdp = False  # open_clip main: its own --fsdp shards the model, not ours
        self.preprocess_val = None
        self.validation = None  # the run's integration.validation.ValidationHook, made on first use
        if args is not None:
            self.set_args(args)

    def set_args(self, args) -> None:
        self.args = args
        self.resume_latest = getattr(args, "resume", None) == "latest"

    def uses_fsdp(self) -> bool:
        """Our FSDP2 (this plugin's ``--fsdp``; on open_clip main the flag is open_clip's own)."""
        return bool(getattr(self.args, "fsdp", False)) and not self.upstream_fsdp


_current: Optional[Run] = None
#: how the hooks reach open_clip in this process (set by the launcher; logged with the model)
ROUTE = [None]


def open_clip_version() -> str:
    try:
        from open_clip.version import __version__
    except ImportError:  # pragma: no cover - every release since 2.0 has it
        return "unknown"
    return str(__version__)


def route_description() -> str:
    return ROUTE[0] or (f"open_clip {open_clip_version()} through open_clip_train's plugin hook "
                        "(python -m openclip_structure.patch)")


def current() -> Optional[Run]:
    return _current


def current_args():
    return _current.args if _current is not None else None


@contextlib.contextmanager
def running(args=None) -> Iterator[Run]:
    """A :class:`Run` is current for the duration of the block (the training progress is reset)."""
    global _current
    outer, _current = _current, Run(args)
    PROGRESS.reset()
    try:
        yield _current
    finally:
        _current = outer
