"""Through the launcher: the same flags train the same model on 1, 2 and 4 processes.

The experiment of a user checking that a regularizer weight does not depend on the number of
GPUs: 32 digit images as a CSV data set, global batch 32 (one optimizer step per epoch, so the
sample order cannot matter), 3 epochs, AdamW with eps 1e-12 (invariant to a constant gradient scale
per parameter), full-image crops, fp32; 1 process x 32, 2 x 16 and 4 x 8; every regularizer on
(views made deterministic by tests/deterministic_views_launcher.py); for open_clip's default
distributed flags and for --local-loss --gather-with-grad. The trained weights must agree as
closely as those of plain open_clip runs do (~1e-6); before the gradient-scale fix the default
flags gave differences of ~5e-3.
"""
import csv
import os

import pytest
import torch

from openclip_structure.data.sources import digits_samples
from openclip_structure.registry import weight_flags

from helpers import ROOT, logged, run

DRIVER = os.path.join(ROOT, "tests", "deterministic_views_launcher.py")
TERMS = weight_flags(default=1) + ["--text-aug", "eda"]  # every registry term at weight 1
FLAG_SETS = {"default": [], "local+gwg": ["--local-loss", "--gather-with-grad"]}
GLOBAL_BATCH = 32


@pytest.fixture(scope="module")
def digits_csv(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits32")
    with open(root / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title"])
        for s in digits_samples()[:GLOBAL_BATCH]:
            p = root / f"{s.key}.png"
            p.write_bytes(s.image)
            w.writerow([str(p), s.caption])
    return str(root / "train.csv")


def train(csv_path, logs, name, nproc, extra):
    argv = ["--train-data", csv_path, "--dataset-type", "csv", "--csv-separator", ",",
            "--aug-cfg", "scale=(1.0,1.0)", "--batch-size", str(GLOBAL_BATCH // nproc), "--logs", str(logs),
            "--name", name, "--model", "structure-tiny", "--epochs", "3", "--lr", "2e-3", "--warmup", "1",
            "--wd", "0.1", "--eps", "1e-12", "--precision", "fp32", "--workers", "1", "--seed", "0",
            "--log-every-n-steps", "1", "--report-to", ""] + TERMS + extra
    run(argv, nproc=nproc, script=DRIVER, timeout=600)
    ckpt = torch.load(os.path.join(logs, name, "checkpoints", "epoch_3.pt"), map_location="cpu", weights_only=True)
    weights = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    heads = torch.load(os.path.join(logs, name, "checkpoints", "structure_heads_epoch_3.pth"), map_location="cpu",
                       weights_only=True)  # the separation heads, saved beside open_clip's checkpoint
    weights.update({f"structure_heads.{k}": v for k, v in heads.items()})
    return weights


def max_diff(a, b):
    # attention in_proj_bias holds the key bias, whose true gradient is exactly 0 (softmax is
    # shift-invariant): AdamW turns its float round-off into lr-sized steps in any run.
    keys = [k for k in a if not k.endswith("attn.in_proj_bias")]
    assert keys == [k for k in b if not k.endswith("attn.in_proj_bias")]
    return max((a[k].double() - b[k].double()).abs().max().item() for k in keys)


@pytest.fixture(scope="module")
def one_process(digits_csv, tmp_path_factory):
    logs = tmp_path_factory.mktemp("one")
    return train(digits_csv, logs, "one", 1, []), logs / "one"


@pytest.mark.slow
@pytest.mark.parametrize("flag_set", list(FLAG_SETS))
def test_same_weights_on_1_2_4_processes(digits_csv, one_process, tmp_path, flag_set):
    single, single_dir = one_process
    assert any(k.startswith("structure_heads.") for k in single)  # the separation heads are compared too
    for nproc in (2, 4):
        name = f"w{nproc}"
        weights = train(digits_csv, tmp_path, name, nproc, FLAG_SETS[flag_set])
        log = open(tmp_path / name / "out.log").read()
        assert f"total {nproc}" in log
        scale = 1.0 / nproc if flag_set == "default" else 1.0  # said once at startup
        assert log.count(f"regularizer gradient scale {scale:g} (") == 1
        diff = max_diff(single, weights)
        print(f"{flag_set}: max |weight diff| 1 vs {nproc} processes after 3 steps: {diff:.2e}")
        for key in ("gc_loss", "inmodal_loss", "sep_icon_loss", "bridge_loss"):
            assert logged(tmp_path / name, key) == pytest.approx(logged(single_dir, key), rel=1e-4), key
        assert diff < 2e-5
