"""Test driver: train through ``openclip_structure.main`` (``launcher``) or ``open_clip_train.main``
(``open_clip_train``) and record which module attributes change.

    python tests/attribute_probe.py OUT.json {launcher,open_clip_train} <training flags>

Snapshots (id of every value that is a module, a class or a callable, i.e. what a patch would
replace; values kept alive) of every loaded module but this package's and the probe's own (torch,
argparse, open_clip, open_clip_train, webdataset, numpy, the standard library, ...) and of the
methods of a few classes a global patch would touch, taken
before training, during training (at the end of each epoch, from inside the plugin's checkpoint
hook), and after. OUT.json: ``{"during": [changed names], "after": [changed names], "epochs_seen": n}``.
"""
import argparse
import json
import sys
import types

import torch
import torch.nn.parallel  # noqa: F401

OWN = ("openclip_structure", "__main__", "attribute_probe")  # everything else is a library
_alive = []


def _replaceable(value) -> bool:
    return isinstance(value, (types.ModuleType, type)) or callable(value)


def snapshot():
    snap = {}
    for name, module in list(sys.modules.items()):
        if module is None or name.split(".")[0] in OWN:
            continue
        for key, value in list(vars(module).items()):
            if _replaceable(value):
                snap[f"{name}:{key}"] = id(value)
                _alive.append(value)
    for cls in (argparse.ArgumentParser, torch.optim.Optimizer, torch.optim.AdamW, torch.nn.Module,
                torch.nn.parallel.DistributedDataParallel, torch.amp.GradScaler):
        for key, value in vars(cls).items():
            snap[f"{cls.__module__}.{cls.__qualname__}.{key}"] = id(value)
            _alive.append(value)
    return snap


def changed(before, now):
    return sorted(k for k in before if k in now and now[k] != before[k]) + \
        sorted(k for k in before if k not in now)


def main():
    out_path, mode, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    import open_clip_train.main  # noqa: F401 - load every module before the first snapshot
    import open_clip_train.train  # noqa: F401
    from openclip_structure.integration import checkpoints

    before = snapshot()
    during, calls = [], []
    original = checkpoints.after_train_epoch

    def after_train_epoch(*args, **kwargs):
        calls.append(1)
        during.extend(changed(before, snapshot()))
        return original(*args, **kwargs)

    checkpoints.after_train_epoch = after_train_epoch  # our own module: the probe's way in
    if mode == "launcher":
        from openclip_structure.main import main as run
    else:
        import open_clip_train.main as ocm
        run = ocm.main
    result = run(argv)
    checkpoints.after_train_epoch = original
    after = changed(before, snapshot())
    with open(out_path, "w") as f:
        json.dump({"during": sorted(set(during)), "after": after, "epochs_seen": len(calls),
                   "result": result}, f)


if __name__ == "__main__":
    main()
