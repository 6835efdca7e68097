"""--fsdp through the launcher (torchrun, 2 processes, gloo/CPU): the same loss trajectory as DDP
on the same data, open_clip-format checkpoints that plain create_model loads, resume from the
full checkpoint and from the sharded (torch.distributed.checkpoint) copy."""
import csv
import subprocess
import sys

import pytest
import torch

from openclip_structure.configs import MODEL_CONFIG_DIR
from openclip_structure.data.sources import digits_samples

from helpers import logged, run
TRAIN = ["--model", "structure-tiny", "--lr", "2e-3", "--warmup", "2", "--wd", "0.1", "--workers", "1",
         "--seed", "0", "--log-every-n-steps", "1", "--precision", "fp32", "--batch-size", "16",
         "--local-loss", "--gather-with-grad", "--gap-atp-weight", "1", "--gap-cu-weight", "1",
         "--sep-weight", "1"]


@pytest.fixture(scope="module")
def csv_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp_data")
    (root / "img").mkdir()
    with open(root / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title"])
        for s in digits_samples()[:128]:
            p = root / "img" / f"{s.key}.png"
            p.write_bytes(s.image)
            w.writerow([str(p), s.caption])
    return str(root / "train.csv")


def data_args(csv_path, logs, name, epochs):
    return ["--train-data", csv_path, "--dataset-type", "csv", "--csv-separator", ",",
            "--aug-cfg", "scale=(1.0,1.0)", "--logs", str(logs), "--name", name, "--epochs", str(epochs)]


@pytest.mark.slow
def test_fsdp_matches_ddp_and_checkpoints_round_trip(csv_data, tmp_path):
    run(nproc=2, argv=data_args(csv_data, tmp_path, "ddp", 1) + TRAIN)
    run(nproc=2, argv=data_args(csv_data, tmp_path, "fsdp", 1) + TRAIN + ["--fsdp", "--fsdp-sharded-checkpoint"])
    keys = ["contrastive_loss", "gap_atp_loss", "gap_cu_loss", "sep_ortho_loss", "sep_icon_loss", "sep_iuni_loss"]
    for key in keys:
        a, b = logged(tmp_path / "ddp", key), logged(tmp_path / "fsdp", key)
        assert len(a) == len(b) == 4, key
        assert b == pytest.approx(a, rel=1e-3, abs=1e-4), key

    full = tmp_path / "fsdp/checkpoints/epoch_1.pt"
    sharded = tmp_path / "fsdp/checkpoints/epoch_1_dcp"
    assert full.exists() and (sharded / ".metadata").exists()
    ckpt = torch.load(full, weights_only=True)
    ddp_ckpt = torch.load(tmp_path / "ddp/checkpoints/epoch_1.pt", weights_only=True)
    assert ckpt["state_dict"].keys() == ddp_ckpt["state_dict"].keys()  # same format as DDP's
    assert "structure_heads" not in ckpt and (tmp_path / "fsdp/checkpoints/structure_heads_epoch_1.pth").exists()
    diff = max((ckpt["state_dict"][k].float() - ddp_ckpt["state_dict"][k].float()).abs().max().item()
               for k in ckpt["state_dict"] if not k.endswith("attn.in_proj_bias"))
    assert diff < 1e-4

    code = ("import sys, open_clip\nopen_clip.add_model_config(sys.argv[1])\n"
            "m = open_clip.create_model('structure-tiny', pretrained=sys.argv[2])\nprint('loaded')\n")
    out = subprocess.run([sys.executable, "-c", code, MODEL_CONFIG_DIR, str(full)],
                         capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0 and "loaded" in out.stdout, out.stderr[-2000:]

    # resume from the full checkpoint, and from the sharded copy, for one more epoch
    for name, source in (("resume_full", full), ("resume_dcp", sharded)):
        run(nproc=2, argv=data_args(csv_data, tmp_path, name, 2) + TRAIN + ["--fsdp", "--resume", str(source)])
        log = open(tmp_path / name / "out.log").read()
        assert "Train Epoch: 1" in log and "Train Epoch: 0" not in log, name
        assert (tmp_path / name / "checkpoints/epoch_2.pt").exists()
    a = logged(tmp_path / "resume_full", "contrastive_loss")
    b = logged(tmp_path / "resume_dcp", "contrastive_loss")
    assert b == pytest.approx(a, rel=1e-4, abs=1e-5)  # both resumed from the same state
