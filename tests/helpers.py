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


def __getattr__(name):
    """``X_TAR`` / ``VAL_TAR``: placeholder shards, made on first use (not by the torchrun workers
    that import this module only for :func:`make_args`)."""
    files = {"X_TAR": "x.tar", "VAL_TAR": "val.tar"}
    if name in files:
        return placeholder_file(files[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: what open_clip_train's main sets on the parsed args before it builds anything (its
#: init_distributed_device), here for one CPU process; overridable through make_args
AFTER_PARSING = dict(rank=0, local_rank=0, world_size=1, distributed=False, device="cpu")


def make_args(argv=(), validate=True, **overrides):
    """The args open_clip_train's main trains with: its OWN parser with the plugin's group
    (:func:`openclip_structure.main.parse_args`, which also validates the flags), on ``argv`` after
    ``--model structure-tiny`` (a later ``--model`` wins); then what open_clip_train's main sets
    after parsing (:data:`AFTER_PARSING`, ``distill`` from the two distill flags), then ``overrides``
    (``distributed`` follows an overridden ``world_size`` unless given). An override must name an
    attribute the parser or open_clip's main sets (a typo fails). With ``validate`` the plugin's
    cross-flag checks run again on the result."""
    from openclip_structure import flags
    from openclip_structure.main import parse_args

    args = parse_args(["--model", "structure-tiny", *argv])
    args.distill = args.distill_model is not None and args.distill_pretrained is not None
    after = dict(AFTER_PARSING, **overrides)
    if "world_size" in overrides and "distributed" not in overrides:
        after["distributed"] = overrides["world_size"] > 1
    unknown = sorted(k for k in overrides if not hasattr(args, k) and k not in AFTER_PARSING)
    if unknown:
        raise TypeError(f"make_args: {unknown} is not an argument of open_clip_train's parser")
    for k, v in after.items():
        setattr(args, k, v)
    if validate:
        flags.validate(args)
    return args
