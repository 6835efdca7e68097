"""The plugin on open_clip main (4.x dev, task API), from the snapshot in
``../shared/upstream/open_clip-main`` (its ``src`` first on PYTHONPATH): every term, views, heads,
validation metrics, open_clip's own ``--fsdp``, checkpoints loading with ``create_model``, resume."""
import os
import subprocess
import sys

import pytest

from openclip_structure.data.sources import digits_samples

from openclip_structure.data.writer import write_dataset
from openclip_structure.registry import TERMS, weight_flags

from helpers import ROOT, command, logged

SNAPSHOTS = [os.path.join(os.path.dirname(ROOT), "shared", "upstream", "open_clip-main"),
             "/work/shared/upstream/open_clip-main"]
SNAPSHOT = next((p for p in SNAPSHOTS if os.path.isdir(os.path.join(p, "src", "open_clip_train"))), None)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(SNAPSHOT is None, reason="no open_clip main snapshot at ../shared/upstream/"
                                                          "open_clip-main (relative to the repository root)")]
ALL_TERMS = weight_flags({"gc": 0.25, "gc_aug": 0.25}, default=1) + ["--text-aug", "eda"]  # every registry term
KEYS = ["contrastive_loss"] + [key for spec in TERMS for key in spec.logged]


def env():
    e = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    e["PYTHONPATH"] = os.pathsep.join([os.path.join(SNAPSHOT, "src"), ROOT])
    e["OMP_NUM_THREADS"] = "1"
    return e


def on_main(argv, nproc=1, script=None, timeout=400):
    proc = subprocess.run(command(argv, nproc, script), capture_output=True, text=True, env=env(), cwd=ROOT,
                          timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    return proc


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_dataset(digits_samples()[:160], tmp_path_factory.mktemp("data") / "wds", train_shards=2,
                         val_shards=1)


def args(shards, logs, name, epochs=1, batch=32, extra=()):
    return ["--train-data", shards["train"]["pattern"], "--dataset-type", "webdataset", "--train-num-samples", "64",
            "--model", "structure-tiny", "--batch-size", str(batch), "--epochs", str(epochs), "--workers", "1",
            "--lr", "1e-3", "--warmup", "2", "--logs", str(logs), "--name", name] + list(extra)


def test_every_term_views_heads_validation_resume_and_create_model(shards, tmp_path):
    val = ["--val-data", shards["val"]["pattern"], "--val-num-samples", "32"]
    on_main(args(shards, tmp_path, "m", extra=ALL_TERMS + val))
    run_dir, ckpts = tmp_path / "m", tmp_path / "m" / "checkpoints"
    log = (run_dir / "out.log").read_text()
    for key in KEYS:
        assert len(logged(run_dir, key)) == 2, key  # every term, logged by open_clip main's task
    assert "openclip-structure loss: base ClipLoss" in log and "separation heads: on" in log
    assert "modality_gap:" in log and "cos_true_pairs:" in log  # our validation metrics
    assert (ckpts / "structure_heads_epoch_1.pth").exists()

    on_main(args(shards, tmp_path, "m", epochs=2, extra=ALL_TERMS) + ["--resume", "latest"])
    log = (run_dir / "out.log").read_text()
    assert "(epoch 1)" in log and "restored the separation heads (structure_heads) from " in log
    assert "(+ structure_heads_epoch_1.pth)" in log
    assert (ckpts / "epoch_2.pt").exists() and (ckpts / "structure_heads_epoch_2.pth").exists()

    code = ("import sys, open_clip\nopen_clip.add_model_config(sys.argv[1])\n"
            "m = open_clip.create_model('structure-tiny', pretrained=sys.argv[2])\nprint('loaded', open_clip.__version__)\n")
    out = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "openclip_structure", "model_configs"),
                          str(ckpts / "epoch_2.pt")], capture_output=True, text=True, timeout=120, env=env(), cwd="/")
    assert out.returncode == 0 and "loaded 4." in out.stdout, out.stderr[-2000:]


def test_open_clips_own_fsdp_follows_ddp_with_views_and_heads(tmp_path):
    """torchrun, 2 processes (gloo, fp32): open_clip main's own --fsdp (our flags add none there) and
    its DDP on the same deterministic data give the same logged terms step for step and the same
    separation heads after the epoch."""
    import csv

    (tmp_path / "img").mkdir()
    with open(tmp_path / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title"])
        for s in digits_samples()[:64]:
            (tmp_path / "img" / f"{s.key}.png").write_bytes(s.image)
            w.writerow([str(tmp_path / "img" / f"{s.key}.png"), s.caption])
    common = ["--train-data", str(tmp_path / "train.csv"), "--dataset-type", "csv", "--csv-separator", ",",
              "--aug-cfg", "scale=(1.0,1.0)", "--model", "structure-tiny", "--lr", "2e-3", "--warmup", "2",
              "--workers", "1", "--seed", "0", "--log-every-n-steps", "1", "--precision", "fp32", "--batch-size",
              "16", "--epochs", "1", "--local-loss", "--gather-with-grad", "--gap-atp-weight", "1",
              "--gc-aug-weight", "0.25", "--sep-weight", "1", "--logs", str(tmp_path)]
    on_main(common + ["--name", "ddp"], nproc=2)
    on_main(common + ["--name", "fsdp", "--fsdp"], nproc=2)
    assert "FSDP2" in (tmp_path / "fsdp" / "out.log").read_text()
    for key in ("contrastive_loss", "gap_atp_loss", "gc_aug_loss", "sep_ortho_loss", "sep_icon_loss"):
        a, b = logged(tmp_path / "ddp", key), logged(tmp_path / "fsdp", key)
        assert len(a) == len(b) == 2, key
        assert b == pytest.approx(a, rel=1e-3, abs=1e-5), key
    import torch

    heads = [torch.load(tmp_path / run / "checkpoints" / "structure_heads_epoch_1.pth", weights_only=True)
             for run in ("ddp", "fsdp")]
    for k in ("image.proj", "text.proj"):
        assert torch.allclose(heads[0][k], heads[1][k], atol=1e-5), k
