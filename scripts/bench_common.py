"""Helpers shared by the benchmark and check scripts (``bench_losses.py``, ``bench_step.py``,
``check_precision.py``): the machine description, the median of timings, the ``--json`` writer.

Importable from any script in this folder (Python puts a script's own folder on ``sys.path``);
importing it does nothing else (torch and open_clip are imported when :func:`machine_info` runs).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
from typing import Dict, List


def machine_info(device: str = "cpu") -> Dict[str, object]:
    """CPU, core and torch-thread counts, versions, the device and the load at start."""
    import torch

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import open_clip
        oc = open_clip.__version__
    except Exception:  # pragma: no cover - informative only
        oc = "?"
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover
        load = None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "open_clip": oc, "python": platform.python_version(),
            "device": device if device == "cpu" else f"{device} ({torch.cuda.get_device_name(torch.device(device))})",
            "dtype": "float32", "load_avg_1min_at_start": load}


def describe(info: Dict[str, object]) -> str:
    """One line naming the machine of :func:`machine_info`."""
    return (f"machine: {info['cpu']} ({info['cores']} cores, {info['torch_threads']} torch threads), "
            f"torch {info['torch']}, open_clip {info['open_clip']}, python {info['python']}, "
            f"{info['dtype']} on {info['device']}; 1-min load average at start: {info['load_avg_1min_at_start']}")


def median(xs: List[float]) -> float:
    """The median of the numbers that are not NaN (NaN when none is)."""
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def write_json(res, dest) -> None:
    """``--json DEST``: the results as JSON to a file, or to stdout with ``-``."""
    if not dest:
        return
    text = json.dumps(res, indent=1)
    if dest == "-":
        print(text)
    else:
        with open(dest, "w") as f:
            f.write(text)


def finish(res: dict, t0: float, path, log=print) -> dict:
    """Record and log the elapsed time since ``t0``, write ``res`` to ``path`` (``--json``), return it."""
    import time

    res["elapsed_s"] = time.time() - t0
    log(f"(elapsed {res['elapsed_s']:.0f} s)")
    write_json(res, path)
    return res
