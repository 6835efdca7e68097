"""Reliability: every plugin flag refuses bad values with its name, degenerate batches give finite
losses and gradients (or a clear error), corrupt data is skipped as open_clip skips it, a run
killed mid-epoch resumes, and a tampered checkpoint is refused."""
import argparse
import io
import os
import re
import signal
import tarfile
import time

import pytest
import torch
import torch.nn.functional as F

from openclip_structure import flags
from openclip_structure import main as launcher
from openclip_structure.factory import create_loss
from openclip_structure.shards import Sample, digits_samples, write_dataset, write_shards

from helpers import launch
TRAIN = ["--model", "structure-tiny", "--lr", "2e-3", "--warmup", "5", "--wd", "0.1", "--workers", "1",
         "--seed", "0", "--log-every-n-steps", "1", "--batch-size", "32"]
BAD_VALUES = ["-1", "nan", "inf", "bogus"]


def plugin_actions():
    parser = flags.add_arguments(argparse.ArgumentParser())
    group = next(g for g in parser._action_groups if g.title == flags.GROUP_TITLE)
    return [a for a in group._group_actions if a.option_strings]


def parse(argv):
    import open_clip_train.params as params
    return launcher.parse_args_with_plugin(params.parse_args, argv)


# ---- 1. every flag: bad values refused with the flag named, before anything runs --------------

@pytest.mark.parametrize("action", plugin_actions(), ids=lambda a: a.option_strings[0])
def test_every_plugin_flag_refuses_bad_values(action, capsys):
    flag = action.option_strings[0]
    if action.nargs == 0:  # store_true flags take no value
        needs = ["--fsdp"] if flag.startswith("--fsdp-") else []
        assert parse(["--train-data", "x.tar", flag] + needs).__dict__[action.dest] is True
        if needs:  # ... and are refused without the flag they refine
            with pytest.raises(SystemExit):
                parse(["--train-data", "x.tar", flag])
            assert f"{flag} need --fsdp" in capsys.readouterr().err
        return
    tried = 0
    for bad in BAD_VALUES:
        if action.choices is not None and bad in action.choices:
            continue
        with pytest.raises(SystemExit) as e:
            parse(["--train-data", "x.tar", f"{flag}={bad}"])
        assert e.value.code == 2, (flag, bad)
        err = capsys.readouterr().err
        assert f"argument {flag}" in err, (flag, bad, err)
        if action.choices is not None:
            assert all(str(c) in err for c in action.choices), err  # the allowed values are listed
        tried += 1
    assert tried >= 3
    # the default is accepted
    args = parse(["--train-data", "x.tar"])
    assert getattr(args, action.dest) == action.default


def test_flag_table_covers_every_plugin_flag():
    dests = {a.dest for a in plugin_actions()}
    assert {"gap_atp_weight", "gap_cu_weight", "gc_weight", "bridge_weight", "sep_weight",
            "inmodal_weight", "fixed_temperature"} <= dests


def test_group_metrics_without_labels_refused_before_training(tmp_path, capsys):
    unlabelled = write_shards([Sample(f"s{i}", s.image, s.caption, None)
                               for i, s in enumerate(digits_samples()[:8])], str(tmp_path / "val"))
    for argv, message in [
        ([], r"--val-structure-metrics all needs --val-data"),
        (["--val-data", unlabelled["pattern"]], r"has no \.cls label"),
        (["--val-data", str(tmp_path / "nope-{0..1}.tar")], r"cannot read"),
    ]:
        with pytest.raises(SystemExit) as e:
            parse(["--train-data", "x.tar", "--val-structure-metrics", "all"] + argv)
        assert e.value.code == 2
        assert re.search(message, capsys.readouterr().err)


def test_zero_shot_prompt_files_need_labelled_validation(tmp_path, capsys):
    (tmp_path / "names.txt").write_text("zero\none\n")
    with pytest.raises(SystemExit) as e:
        parse(["--train-data", "x.tar", "--val-zeroshot-classnames", str(tmp_path / "names.txt")])
    assert e.value.code == 2
    assert "--val-zeroshot-classnames only feed the labelled validation metrics" in capsys.readouterr().err
    (tmp_path / "t.txt").write_text("a photo\n")
    with pytest.raises(SystemExit):
        parse(["--train-data", "x.tar", "--val-zeroshot-templates", str(tmp_path / "t.txt")])
    assert "argument --val-zeroshot-templates" in capsys.readouterr().err


# ---- 2. degenerate batches: finite values and gradients for every term ------------------------

def all_terms_loss():
    ns = flags.add_arguments(argparse.ArgumentParser()).parse_args(
        ["--gap-atp-weight", "1", "--gap-cu-weight", "1", "--gc-weight", "1", "--gc-aug-weight", "1",
         "--bridge-weight", "1", "--sep-weight", "1", "--inmodal-weight", "1"])
    for k, v in dict(local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
                     horovod=False, distill=False, siglip=False, model="structure-tiny",
                     loss_dist_impl=None).items():
        setattr(ns, k, v)
    return create_loss(ns)


FEATURE_KEYS = ["image_features", "text_features", "image_aug_features", "image_ind_features",
                "text_ind_features", "image_aug_ind_features", "text_aug_ind_features"]


def make_features(raw):
    leaves = {k: raw(k).clone().requires_grad_(True) for k in FEATURE_KEYS}
    feats = {k: F.normalize(v, dim=-1) for k, v in leaves.items()}
    return leaves, feats


@pytest.mark.parametrize("case", ["identical", "duplicates", "zero_vectors", "two_samples"])
def test_degenerate_batches_stay_finite(case):
    loss = all_terms_loss()
    g = torch.Generator().manual_seed(0)
    n, d = (2, 8) if case == "two_samples" else (6, 8)
    base = torch.randn(n, d, generator=g)
    raw = {
        "identical": lambda k: torch.ones(n, d),
        "duplicates": lambda k: base[:1].repeat(n, 1) + (0.0 if "text" in k else 0.0),
        "zero_vectors": lambda k: torch.zeros(n, d) if k.startswith("image") else base,
        "two_samples": lambda k: base,
    }[case]
    leaves, feats = make_features(raw)
    out = loss(**feats, logit_scale=torch.tensor(10.0), output_dict=True)
    assert set(out) >= {"gap_cu_loss", "gc_loss", "bridge_loss", "sep_iuni_loss", "inmodal_loss"}
    for key, value in out.items():
        assert torch.isfinite(value), (case, key, value)
    sum(out.values()).backward()
    for key, leaf in leaves.items():
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all(), (case, key)


def test_batch_of_one_is_a_clear_error():
    loss = all_terms_loss()
    _, feats = make_features(lambda k: torch.randn(1, 8))
    with pytest.raises(ValueError, match="at least 2 samples"):
        loss(**feats, logit_scale=torch.tensor(10.0), output_dict=True)


# ---- 3. data: corrupt shards are skipped as open_clip skips them ----------------------------

@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return write_dataset(digits_samples()[:320], str(root / "wds"), val_fraction=0.2,
                         train_shards=4, val_shards=1)


@pytest.mark.slow
def test_corrupt_and_incomplete_samples_are_skipped(shards, tmp_path):
    train_dir = os.path.dirname(shards["train"]["pattern"])
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    names = sorted(f for f in os.listdir(train_dir) if f.endswith(".tar"))
    for i, name in enumerate(names):
        data = open(os.path.join(train_dir, name), "rb").read()
        if i == 0:
            data = data[: len(data) // 2]  # truncated mid-member
        open(bad_dir / name, "wb").write(data)
    # a shard whose samples miss their caption or image
    with tarfile.open(bad_dir / "00004.tar", "w") as tar:
        for key, ext in [("nocap", "png"), ("noimg", "txt")]:
            payload = b"a digit" if ext == "txt" else digits_samples()[0].image
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    proc = launch(["--train-data", str(bad_dir / "{00000..00004}.tar"), "--dataset-type", "webdataset",
                   "--train-num-samples", "128", "--epochs", "1", "--logs", str(tmp_path), "--name", "bad",
                   "--gap-atp-weight", "1"] + TRAIN)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert os.path.exists(tmp_path / "bad/checkpoints/epoch_1.pt")
    assert re.search(r"Handling webdataset error|ReadError|truncated", out + err)


# ---- 4. interruption: SIGKILL mid-epoch, resume from epoch_latest.pt -----------------------

@pytest.mark.slow
def test_killed_mid_epoch_resumes_from_latest(shards, tmp_path):
    argv = ["--train-data", shards["train"]["pattern"], "--dataset-type", "webdataset",
            "--train-num-samples", "256", "--epochs", "3", "--logs", str(tmp_path), "--name", "kill",
            "--save-most-recent", "--gap-atp-weight", "1", "--gap-schedule", "ramp",
            "--sep-weight", "1"] + TRAIN
    proc = launch(argv)
    latest = tmp_path / "kill/checkpoints/epoch_latest.pt"
    log = tmp_path / "kill/out.log"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and log.exists() and "Train Epoch: 1 [" in log.read_text():
            break
        time.sleep(0.2)
    assert proc.poll() is None, "run ended before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    saved = torch.load(latest, weights_only=True)
    assert saved["epoch"] == 1 and "structure_heads" in saved
    assert not os.path.exists(tmp_path / "kill/checkpoints/epoch_2.pt")

    proc = launch(argv + ["--resume", "latest"])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    text = log.read_text()
    assert "resuming checkpoint" in text
    final = torch.load(tmp_path / "kill/checkpoints/epoch_3.pt", weights_only=True)
    assert final["epoch"] == 3 and "structure_heads" in final
    # the heads kept training from the saved state: not equal to the epoch-1 heads any more
    h1, h3 = saved["structure_heads"], final["structure_heads"]
    assert h1.keys() == h3.keys() and any(not torch.equal(h1[k], h3[k]) for k in h1)


# ---- 5. loading: a checkpoint with a pickled object is refused -----------------------------

@pytest.mark.slow
def test_tampered_checkpoint_is_refused(shards, tmp_path):
    import open_clip
    launcher.register_model_configs()
    model = open_clip.create_model("structure-tiny")
    evil = tmp_path / "evil.pt"
    torch.save({"epoch": 1, "state_dict": model.state_dict(), "optimizer": {},
                "args": argparse.Namespace(x=1)}, evil)
    proc = launch(["--train-data", shards["train"]["pattern"], "--dataset-type", "webdataset",
                   "--train-num-samples", "64", "--epochs", "2", "--logs", str(tmp_path), "--name", "t",
                   "--resume", str(evil), "--gap-atp-weight", "1"] + TRAIN)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert re.search(r"weights_only|Unsupported global|pickled", err), err[-2000:]
    assert not os.path.exists(tmp_path / "t/checkpoints/epoch_2.pt")


def test_adding_the_flags_twice_is_harmless():
    parser = flags.add_arguments(flags.add_arguments(argparse.ArgumentParser()))
    assert parser.parse_args(["--gap-atp-weight", "2"]).gap_atp_weight == 2.0
