"""The integration layer: no library attribute is replaced, the shim's table is checked at
startup, and the separation heads' checkpoint files survive a kill at any point.

Real training runs go through test drivers in subprocesses: ``attribute_probe.py`` snapshots the
attributes of every loaded module but this package's (torch, argparse, open_clip, open_clip_train,
webdataset, the standard library, ...) before, during (from inside the plugin's end-of-epoch hook)
and after training; ``kill_worker.py`` kills the launcher at a chosen point.
"""
import json
import os
import types

import pytest
import torch

from openclip_structure.integration import shim
from openclip_structure.data.sources import digits_samples
from openclip_structure.data.writer import write_dataset

from helpers import ROOT, run
from test_patch import copy_package, register_plugin, script, train_main

TESTS = os.path.join(ROOT, "tests")
PROBE = os.path.join(TESTS, "attribute_probe.py")
TERMS = ["--gap-atp-weight", "1", "--gc-aug-weight", "0.25", "--sep-weight", "1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_dataset(digits_samples()[:160], tmp_path_factory.mktemp("data") / "wds", train_shards=2,
                         val_shards=1)


def train_args(shards, logs, name, epochs=1, samples=64, val=True):
    validation = ["--val-data", shards["val"]["pattern"], "--val-num-samples", "32"] if val else []
    return ["--train-data", shards["train"]["pattern"], "--dataset-type", "webdataset", "--train-num-samples",
            str(samples), "--model", "structure-tiny", "--batch-size", "32", "--epochs", str(epochs),
            "--workers", "1", "--lr", "1e-3", "--warmup", "2", "--logs", str(logs), "--name", name] + validation + TERMS


def _libraries(names):
    return [n for n in names if n.split(":")[0].split(".")[0] in ("torch", "argparse")
            or n.startswith(("argparse.", "torch."))]


# ---- no attribute of any library is replaced (the unpatched 3.x shim: its table in open_clip_train) -

@pytest.mark.slow
def test_unpatched_3x_run_changes_no_attribute_of_torch_or_argparse(shards, tmp_path):
    out = tmp_path / "probe.json"
    run([str(out), "launcher"] + train_args(shards, tmp_path, "u"), script=PROBE)
    probe = json.loads(out.read_text())
    assert probe["epochs_seen"], "the probe never ran inside training"
    assert _libraries(probe["during"]) == [] and _libraries(probe["after"]) == []
    # of all loaded modules: exactly the shim's table (in open_clip_train) while training, nothing afterwards
    assert set(probe["during"]) == {f"{r.module}:{r.name}" for r in shim.TABLE}
    assert probe["after"] == []
    log = (tmp_path / "u" / "out.log").read_text()
    assert "Sep_icon_loss" in log and "modality_gap" in log


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["open_clip_train", "launcher"])
def test_hook_patched_run_changes_no_attribute_at_all(shards, tmp_path, entry):
    """``python -m open_clip_train.main`` and the launcher, on a hook-patched open_clip_train."""
    site = copy_package(tmp_path / "site")
    assert script("--target", site).returncode == 0
    register_plugin(site)
    out = tmp_path / "probe.json"
    proc = train_main(site, PROBE, str(out), entry, *train_args(shards, tmp_path, "p"), module=None)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    probe = json.loads(out.read_text())
    assert probe["epochs_seen"], "the probe never ran inside training"
    assert probe["during"] == [] and probe["after"] == []  # no loaded module at all, open_clip_train included
    log = (tmp_path / "p" / "out.log").read_text()
    assert "Sep_icon_loss" in log and "modality_gap" in log
    assert "through open_clip_train's plugin hook" in log
    assert (tmp_path / "p" / "checkpoints" / "structure_heads_epoch_1.pth").exists()


# ---- the shim's startup check ----------------------------------------------------------------------

def test_shim_table_holds_for_the_installed_open_clip_train():
    shim.check(shim.training_modules())


def _modules_with(module_name, **changes):
    modules = dict(shim.training_modules())
    fake = types.ModuleType(module_name)
    fake.__dict__.update(vars(modules[module_name]))
    fake.__dict__.update(changes)
    for k, v in changes.items():
        if v is None:
            del fake.__dict__[k]
    modules[module_name] = fake
    return modules


def test_shim_refuses_a_missing_name_naming_the_version():
    modules = _modules_with("open_clip_train.main", cosine_lr=None)
    with pytest.raises(shim.IntegrationError, match=r"open_clip_torch 9\.9\.9: open_clip_train.main has no "
                                                     r"'cosine_lr' \(progress"):
        shim.check(modules, version="9.9.9")


def test_shim_refuses_a_name_that_is_no_longer_called():
    """A scheduler renamed upstream: the old name may stay importable but is not called any more."""
    def main(args):  # a main() that builds its scheduler under another name
        return make_schedule(args)  # noqa: F821

    modules = _modules_with("open_clip_train.main", main=main)
    with pytest.raises(shim.IntegrationError, match=r"open_clip_train.main.main no longer refers to create_loss"):
        shim.check(modules, version="3.9.0")


@pytest.mark.parametrize("version", ["2.32.0", "4.0.0"])
def test_launcher_refuses_unsupported_versions_naming_them(version):
    with pytest.raises(shim.IntegrationError, match=rf"open_clip_torch {version}.*supported are 3\.x"):
        shim.check_version(version)


def test_module_view_changes_nothing_in_the_real_module():
    view = shim.ModuleView(torch, save=lambda *a: None)
    assert view.save is not torch.save and view.nn is torch.nn and view.Tensor is torch.Tensor
    assert torch.save.__module__ == "torch.serialization"


# ---- heads beside checkpoints: killed at any point, --resume latest continues --------------------------

def _heads(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _resumed_from(log_text, n_resumes):
    """The log of the last launch (open_clip's "(epoch N)" and our heads message are in it)."""
    assert log_text.count("=> resuming checkpoint") == n_resumes, log_text[-3000:]
    return log_text.split("Running with a single process")[-1]


@pytest.mark.slow
def test_killed_at_any_point_of_checkpointing_resume_latest_continues(shards, tmp_path):
    """One run directory, killed in turn (1) while the heads file of epoch 2 is half written, (2) after
    it is complete but before open_clip saves epoch 2, then (3) with open_clip's epoch_2.pt half written
    (open_clip writes it in place); each time ``--resume latest`` continues from epoch 1 with the
    heads of epoch 1, and the last run trains on to the end."""
    ckpts, log = tmp_path / "k" / "checkpoints", tmp_path / "k" / "out.log"
    worker = os.path.join(TESTS, "kill_worker.py")
    argv = train_args(shards, tmp_path, "k", epochs=2, val=False)

    proc = run(["heads_mid_write", "2"] + argv, script=worker, check=False)  # (1)
    assert proc.returncode == 9, proc.stderr[-3000:]
    assert (ckpts / "epoch_1.pt").exists() and not (ckpts / "epoch_2.pt").exists()
    assert not (ckpts / "structure_heads_epoch_2.pth").exists()
    assert any(".pth.tmp" in n for n in os.listdir(ckpts))  # the half-written temporary
    heads_1 = _heads(ckpts / "structure_heads_epoch_1.pth")

    proc = run(["after_heads", "2"] + argv + ["--resume", "latest"], script=worker, check=False)  # (2)
    assert proc.returncode == 9, proc.stderr[-3000:]
    last = _resumed_from(log.read_text(), 1)
    assert "(epoch 1)" in last and "restored the separation heads" in last and "structure_heads_epoch_1.pth" in last
    assert (ckpts / "structure_heads_epoch_2.pth").exists() and not (ckpts / "epoch_2.pt").exists()
    assert not any(".pth.tmp" in n for n in os.listdir(ckpts))  # cleaned up by the next writer

    run(argv + ["--resume", "latest"])  # completes epoch 2
    last = _resumed_from(log.read_text(), 2)
    assert "(epoch 1)" in last and "structure_heads_epoch_1.pth" in last
    data = (ckpts / "epoch_2.pt").read_bytes()
    (ckpts / "epoch_2.pt").write_bytes(data[: len(data) // 2])  # (3)

    run(train_args(shards, tmp_path, "k", epochs=3, val=False) + ["--resume", "latest"])
    last = _resumed_from(log.read_text(), 3)
    assert "epoch_2.pt is unreadable" in last and "(epoch 1)" in last and "structure_heads_epoch_1.pth" in last
    assert (ckpts / "epoch_3.pt").exists() and (ckpts / "structure_heads_epoch_3.pth").exists()
    heads_3 = _heads(ckpts / "structure_heads_epoch_3.pth")
    assert any(not torch.equal(heads_1[k], heads_3[k]) for k in heads_1)  # trained on from there


# ---- open_clip main's task API: what the task hook does to the task object ----------------------------

class _FakeTask(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.loss = torch.nn.Identity()
        self.prepared = None

    def prepare_distributed(self, device_ids=None, **kwargs):
        self.prepared = device_ids
        return self


def _task_args(**kw):
    from openclip_structure import flags
    import argparse

    ns = flags.add_arguments(argparse.ArgumentParser()).parse_args([])
    ns.__dict__.update(dict(fsdp=False, distributed=False, rank=0, world_size=1, distill=False, horovod=False), **kw)
    return ns


def test_task_hook_hands_the_task_our_loss_and_fixes_cpu_ddp_on_that_object_only():
    from openclip_structure.factory import StructureLoss
    from openclip_structure.integration import state, task

    args = _task_args(gap_atp_weight=1.0)
    with state.running(args):
        t = task.wrap_create_task(lambda a, *rest, **kw: _FakeTask())(args, None)
    assert isinstance(t.loss, StructureLoss) and isinstance(t.loss.base, torch.nn.Identity)
    t.prepare_distributed(device_ids=[torch.device("cpu")])
    assert t.prepared is None  # device_ids dropped for CPU
    assert "prepare_distributed" in vars(t)  # an attribute of that task object; the class is untouched:
    fresh = _FakeTask()
    fresh.prepare_distributed(device_ids=[torch.device("cpu")])
    assert fresh.prepared == [torch.device("cpu")]
    with state.running(_task_args()):  # no plugin flag: the task keeps its own loss object
        plain = task.wrap_create_task(lambda a, *rest, **kw: _FakeTask())(_task_args(), None)
    assert isinstance(plain.loss, torch.nn.Identity)
