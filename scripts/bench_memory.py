"""Memory measurement helpers of the benchmark scripts: the peak increase of resident memory over
a block (:class:`PeakRSS`, Linux) and the bytes autograd saves for backward
(:func:`saved_bytes_counter`).

Importing it does nothing else (torch is imported when :func:`saved_bytes_counter` runs; glibc's
mmap threshold is pinned only when a :class:`PeakRSS` is created).
"""
from __future__ import annotations

import contextlib
import ctypes
from typing import Dict


class PeakRSS:
    """Peak increase of resident memory over a block (Linux).

    torch's CPU allocator keeps no peak counter. With glibc's mmap threshold pinned at 64 KiB,
    every tensor above that size is its own ``mmap``, returned to the OS when freed, and
    ``malloc_trim`` gives free heap memory back before the block, so the peak RSS (``VmHWM``, reset
    through ``/proc/self/clear_refs``) minus the RSS at the start of the block is the peak of live
    tensor memory in the block (plus allocator noise of a few 100 KiB).
    ``available`` is False elsewhere (values are then NaN).
    """

    def __init__(self):
        self.available = False
        self.start = 0
        try:
            libc = self._libc = ctypes.CDLL("libc.so.6")
            ok = libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, disables the dynamic threshold
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.available = bool(ok)
        except (OSError, AttributeError):
            self.available = False

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def reset(self) -> None:
        if self.available:
            # give free heap memory back first: a freed chunk reused from the heap would not raise
            # the RSS (its pages are faulted in again, and counted, when touched after the trim)
            self._libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.start = self._status("VmRSS")

    def peak(self) -> float:
        return float(self._status("VmHWM") - self.start) if self.available else float("nan")


@contextlib.contextmanager
def saved_bytes_counter(out: Dict[str, int]):
    """Sum of the bytes of unique storages autograd saves for backward inside the block."""
    import torch

    seen = set()
    out["bytes"] = 0

    def pack(t):
        try:
            key = t.untyped_storage().data_ptr()
            nbytes = t.untyped_storage().nbytes()
        except Exception:  # pragma: no cover
            key, nbytes = id(t), t.numel() * t.element_size()
        if key not in seen:
            seen.add(key)
            out["bytes"] += nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out
