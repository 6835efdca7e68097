"""The GPU check's plumbing (``gpu_check.py``): wall-time caps, subprocess runs with this checkout
importable, the end of a run's output, JSON reading, ratios. Standard library only.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


class Deadline:
    def __init__(self, cap_s: float):
        self.cap_s, self.t0 = cap_s, time.time()

    def left(self) -> float:
        return self.cap_s - (time.time() - self.t0)


def env() -> Dict[str, str]:
    """This environment without torchrun's variables, with this checkout importable first."""
    e = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT")}
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return e


def run(cmd: List[str], timeout: float, cwd: str = ROOT) -> Dict:
    """Run a command to completion or to ``timeout``; the output so far is kept either way."""
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=cwd, timeout=max(1.0, timeout))
        return {"rc": p.returncode, "out": p.stdout, "err": p.stderr, "timed_out": False, "wall_s": time.time() - t0}
    except subprocess.TimeoutExpired as e:
        def text(x):
            return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
        return {"rc": None, "out": text(e.stdout), "err": text(e.stderr), "timed_out": True, "wall_s": time.time() - t0}


def tail(r: Dict, n: int = 1500) -> str:
    """The end of a run's output: from its last Python traceback when there is one."""
    text = "\n".join(line for line in (r["out"] + "\n" + r["err"]).splitlines()
                     if not re.match(r"[IWE]\d{4} ", line))  # torch's glog-style info lines at exit
    at = text.rfind("Traceback (most recent call last)")
    return (text[at:] if at >= 0 else text)[-n:].strip()


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b and math.isfinite(a) and math.isfinite(b) and b > 0 else None
