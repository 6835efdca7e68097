"""Shared plumbing of the tests that launch real training processes."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env():
    """This environment without torchrun's variables, with the repository importable."""
    e = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return e


def command(argv, nproc=1, script=None):
    """The launcher (or a test driver ``script``), under torchrun when ``nproc`` > 1."""
    target = [script] if script else ["-m", "openclip_structure.main"]
    if nproc > 1:
        return ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                + target + ["--"] + list(argv))
    return [sys.executable] + target + list(argv)


def run(argv, nproc=1, script=None, timeout=300, check=True):
    """Run a training job to completion; with ``check`` it must exit 0 (the log tails are shown)."""
    proc = subprocess.run(command(argv, nproc, script), capture_output=True, text=True, timeout=timeout,
                          env=env(), cwd=ROOT)
    if check:
        assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    return proc


def launch(argv, **kw):
    """Start a single-process training job in the background (for kill/resume tests)."""
    return subprocess.Popen(command(argv), env=env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def logged(run_dir, key):
    """Values of one loss key as open_clip prints them in out.log ("Gap_atp_loss: 0.123 (avg)")."""
    text = open(os.path.join(run_dir, "out.log")).read()
    return [float(v) for v in re.findall(rf"{key.capitalize()}: ([-0-9.e]+) \(", text)]


_PLACEHOLDERS = []


def placeholder_file(name: str) -> str:
    """An existing empty file ``name`` (in a folder of this test session), for tests that only parse
    flags: the launcher refuses a ``--train-data``/``--val-data`` that names a missing file."""
    import tempfile

    if not _PLACEHOLDERS:
        _PLACEHOLDERS.append(tempfile.mkdtemp(prefix="openclip-structure-placeholders-"))
    path = os.path.join(_PLACEHOLDERS[0], name)
    open(path, "a").close()
    return path


X_TAR = placeholder_file("x.tar")
VAL_TAR = placeholder_file("val.tar")
