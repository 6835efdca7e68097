"""The launcher end to end: flags in open_clip's parser, validation before training, real
training runs (1 process and 2-process torchrun on CPU/gloo), logging of each term, checkpoints
that load with plain open_clip.create_model in a fresh process, --resume, exact no-op."""
import csv
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from openclip_structure.integration.progress import wrap_lr_scheduler
from openclip_structure.configs import MODEL_CONFIG_DIR
from openclip_structure import flags
from openclip_structure import main as launcher
from openclip_structure.registry import TERMS
from openclip_structure.schedule import PROGRESS
from openclip_structure.data.sources import digits_samples
from openclip_structure.data.writer import write_dataset

from helpers import ROOT, logged, run

TESTS = os.path.join(ROOT, "tests")
CONFIG_DIR = MODEL_CONFIG_DIR
TRAIN = ["--model", "structure-tiny", "--epochs", "1", "--lr", "2e-3", "--warmup", "5", "--wd", "0.1",
         "--workers", "1", "--seed", "0", "--log-every-n-steps", "1", "--report-to", "tensorboard"]


def state_dict(path):
    sd = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("module."): v for k, v in sd.items()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    samples = digits_samples()[:400]
    shards = write_dataset(samples, str(root / "wds"), val_fraction=0.2, train_shards=4, val_shards=1)
    (root / "img").mkdir()
    with open(root / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title"])
        for s in samples[:320]:
            p = root / "img" / f"{s.key}.png"
            p.write_bytes(s.image)
            w.writerow([str(p), s.caption])
    return {"wds": shards["train"]["pattern"], "wds_n": shards["train"]["num_samples"],
            "val": shards["val"]["pattern"],
            "csv": str(root / "train.csv"), "root": root}


def csv_args(data, logs, name, batch):
    # csv + fixed augmentation (full-image crop) = a deterministic data path in open_clip
    return ["--train-data", data["csv"], "--dataset-type", "csv", "--csv-separator", ",",
            "--aug-cfg", "scale=(1.0,1.0)", "--batch-size", str(batch), "--logs", str(logs),
            "--name", name] + TRAIN


# ---- parsing and validation: in-process, nothing trains ------------------------------------

def test_help_lists_every_plugin_flag_with_its_help(capsys):
    """``--help`` is open_clip's own (its flags are there) with the plugin's group: every flag of
    the registry (each term's weight and options, the general options), each with its help text."""
    import argparse

    with pytest.raises(SystemExit) as e:
        launcher.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--train-data", "--model", "--local-loss", "--siglip"):  # open_clip_train's own
        assert re.search(rf"^\s+{flag}(?![\w-])", out, re.M), flag
    assert flags.GROUP_TITLE in out
    plugin_help = out.split(flags.GROUP_TITLE, 1)[1]
    squeezed = "".join(plugin_help.split())  # argparse wraps (and may break at hyphens) to the terminal width
    # each flag's help text as the plugin declares it (argparse expands %-escapes when it prints)
    declared = {a.option_strings[0]: a.help % dict(vars(a), prog="")
                for a in flags.add_arguments(argparse.ArgumentParser())._actions if a.option_strings}
    upstream_fsdp = launcher.uses_task_api()  # open_clip main: --fsdp is its own, the plugin's are left out
    options = [o for o, _ in flags.all_options() if not (upstream_fsdp and o.flag.startswith("--fsdp"))]
    assert len(options) >= 2 * len(TERMS)
    for option in options:
        assert re.search(rf"^\s+{option.flag}(?![\w-])", plugin_help, re.M), option.flag
        text = declared[option.flag]
        assert len(text) > 20 and "".join(text.split()) in squeezed, (option.flag, text)


@pytest.mark.parametrize("argv,message", [
    (["--gap-atp-weight", "-1"], r"--gap-atp-weight: must be a finite weight in \[0.0, inf\], got '-1'"),
    (["--gap-cu-weight", "nan"], r"--gap-cu-weight: must be a finite weight"),
    (["--gap-uniformity", "sphere"], r"--gap-uniformity: invalid choice: 'sphere' \(choose from '?centroid'?, '?modality'?\)"),
    (["--gap-uniformity-t", "0"], r"--gap-uniformity-t: must be a finite temperature in \(0.0, 50.0\]"),
    (["--fixed-temperature", "5"], r"--fixed-temperature: must be a finite temperature in \[0.01, 1.0\]"),
    (["--gap-schedule", "ramp"], r"--gap-schedule ramp needs --gap-atp-weight or --gap-cu-weight"),
    (["--gap-atp-weight", "1", "--gap-schedule", "ramp", "--skip-scheduler"], r"cannot be used with --skip-scheduler"),
    (["--gap-cu-weight", "1", "--horovod"], r"--horovod is not supported"),
])
def test_bad_flags_fail_before_training(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        launcher.main(["--train-data", "x.tar", "--logs", str(tmp_path)] + argv)
    assert e.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert os.listdir(tmp_path) == []  # nothing was created: training never started


def test_shim_names_are_replaced_only_while_the_run_lasts(capsys):
    """Exactly the names of the shim's table are replaced inside open_clip_train's modules while a
    run is installed and restored after it (also when open_clip's main exits, as with --help); no
    attribute of torch or argparse is ever replaced."""
    import argparse

    from openclip_structure.integration import shim

    modules = shim.training_modules()

    def table_names():
        return {(r.module, r.name): getattr(modules[r.module], r.name) for r in shim.TABLE}

    def library_names():
        return (torch.nn.parallel.DistributedDataParallel, torch.optim.AdamW, argparse.ArgumentParser)

    before, libraries = table_names(), library_names()
    assert len(before) == len(shim.TABLE)  # one entry per name
    with launcher.installed():
        during = table_names()
        assert [k for k in before if during[k] is before[k]] == []  # every table name is replaced ...
        assert library_names() == libraries  # ... and the libraries themselves are not
        assert modules["open_clip_train.main"].torch.nn.parallel.DistributedDataParallel is not libraries[0]
    after = table_names()
    assert [k for k in before if after[k] is not before[k]] == []
    with pytest.raises(SystemExit):
        launcher.main(["--help"])
    assert flags.GROUP_TITLE in capsys.readouterr().out  # the run parsed with the shim's argparse view
    after = table_names()
    assert [k for k in before if after[k] is not before[k]] == []
    assert library_names() == libraries


def test_scheduler_hook_records_progress():
    from open_clip_train.scheduler import cosine_lr
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    PROGRESS.reset()
    adjust = wrap_lr_scheduler(cosine_lr)(opt, 0.1, 10, 200)
    adjust(57)
    assert (PROGRESS.step, PROGRESS.total_steps, PROGRESS.fraction) == (57, 200, 57 / 200)
    assert opt.param_groups[0]["lr"] == pytest.approx(cosine_lr(opt, 0.1, 10, 200)(57))
    PROGRESS.reset()


# ---- real training runs ----------------------------------------------------------------

@pytest.mark.slow
def test_plugin_without_flags_is_exactly_open_clip(data, tmp_path):
    plain = os.path.join(TESTS, "plain_open_clip_train.py")
    run(csv_args(data, tmp_path, "plain", 32), script=plain)
    run(csv_args(data, tmp_path, "plugin", 32))
    assert logged(tmp_path / "plain", "contrastive_loss") == logged(tmp_path / "plugin", "contrastive_loss")
    a, b = state_dict(tmp_path / "plain/checkpoints/epoch_1.pt"), state_dict(tmp_path / "plugin/checkpoints/epoch_1.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_one_vs_two_processes_same_global_batches(data, tmp_path):
    """torchrun 2 x batch 16 vs 1 process x batch 32 over the same sample order: the gap terms
    (global values) are logged equal at every step and the trained weights agree."""
    # fp32: with AMP fp16 the GradScaler may skip a different first step in each run
    flags = ["--gap-atp-weight", "1", "--gap-cu-weight", "1", "--local-loss", "--gather-with-grad",
             "--precision", "fp32"]
    single = os.path.join(TESTS, "single_process_with_distributed_sampler.py")
    run(csv_args(data, tmp_path, "one", 32) + flags, script=single)
    run(csv_args(data, tmp_path, "two", 16) + flags, nproc=2)
    assert "total 2" in open(tmp_path / "two/out.log").read()
    for key in ("gap_atp_loss", "gap_cu_loss"):
        a, b = logged(tmp_path / "one", key), logged(tmp_path / "two", key)
        assert len(a) == len(b) == 10
        print(key, "1 proc:", a[:3], "2 proc:", b[:3])
        assert a == pytest.approx(b, rel=2e-4, abs=2e-5), key
    sd1, sd2 = state_dict(tmp_path / "one/checkpoints/epoch_1.pt"), state_dict(tmp_path / "two/checkpoints/epoch_1.pt")
    # attention in_proj_bias holds the key bias, whose true gradient is exactly 0 (softmax is
    # shift-invariant): AdamW turns its float round-off into lr-sized steps in either run.
    keys = [k for k in sd1 if not k.endswith("attn.in_proj_bias")]
    diff = max((sd1[k].float() - sd2[k].float()).abs().max().item() for k in keys)
    print(f"max |param diff| 1 vs 2 processes after 10 AdamW steps: {diff:.2e}")
    assert diff < 2e-5


@pytest.fixture(scope="module")
def gap_run(data, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    argv = ["--train-data", data["wds"], "--dataset-type", "webdataset", "--train-num-samples", "256",
            "--batch-size", "32", "--logs", str(logs), "--name", "gap", "--save-most-recent",
            "--gap-atp-weight", "1", "--gap-cu-weight", "1", "--gap-schedule", "ramp",
            "--fixed-temperature", "0.1", "--val-data", data["val"], "--val-structure-metrics", "all"] + TRAIN
    run(argv)
    return logs / "gap", argv


@pytest.mark.slow
def test_training_logs_terms_params_and_tensorboard(gap_run):
    run_dir, _ = gap_run
    assert len(logged(run_dir, "gap_atp_loss")) == 8 and len(logged(run_dir, "gap_cu_loss")) == 8
    params = open(run_dir / "params.txt").read()
    assert "gap_atp_weight: 1.0" in params and "gap_schedule: ramp" in params and "fixed_temperature: 0.1" in params
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/gap_atp_loss", "train/gap_cu_loss", "train/contrastive_loss", "train/loss"} <= tags
    # fixed temperature: logit scale stays exactly 1/0.1
    assert all(abs(ev.value - 10.0) < 1e-4 for ev in acc.Scalars("train/scale"))


@pytest.mark.slow
def test_validation_adds_gap_and_group_metrics(gap_run):
    run_dir, _ = gap_run
    results = [json.loads(line) for line in open(run_dir / "checkpoints" / "results.jsonl")]
    assert len(results) == 1 and results[0]["epoch"] == 1
    r = results[0]
    assert "image_to_text_R@1" in r  # open_clip's own metrics are still there
    for key in ("modality_gap", "cos_true_pairs", "modality_separability", "fang_uniformity",
                "mixed_v_measure", "image_v_measure", "text_v_measure", "mixed_knn_accuracy",
                "zeroshot_top1", "i2t_class_r1", "t2i_class_r1"):
        assert isinstance(r[key], float) and r[key] == r[key], key
    assert 0.0 <= r["modality_gap"] <= 2.0 and 0.0 <= r["mixed_v_measure"] <= 1.0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = set(EventAccumulator(str(run_dir / "tensorboard")).Reload().Tags()["scalars"])
    assert {"val/modality_gap", "val/mixed_v_measure"} <= tags


@pytest.mark.slow
def test_checkpoint_loads_with_plain_open_clip_in_fresh_process(gap_run):
    run_dir, _ = gap_run
    ckpt = str(run_dir / "checkpoints" / "epoch_1.pt")
    code = (
        "import sys, torch, open_clip\n"
        "open_clip.add_model_config(sys.argv[1])\n"
        "m = open_clip.create_model('structure-tiny', pretrained=sys.argv[2])\n"
        "sd = torch.load(sys.argv[2], weights_only=True)['state_dict']\n"
        "print(max((m.state_dict()[k] - v).abs().max().item() for k, v in sd.items()))\n"
        "print(m.logit_scale.exp().item())\n"
    )
    out = subprocess.run([sys.executable, "-c", code, CONFIG_DIR, ckpt], capture_output=True, text=True,
                         timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr[-3000:]
    diff, scale = map(float, out.stdout.split())
    assert diff == 0.0 and scale == pytest.approx(10.0, rel=1e-5)


@pytest.mark.slow
def test_resume_continues(gap_run):
    run_dir, argv = gap_run
    argv = [a if a != "1" or argv[i - 1] != "--epochs" else "2" for i, a in enumerate(argv)]
    argv = [a if a != "all" else "gap" for a in argv]  # skip the extra labelled pass here
    run(argv + ["--resume", "latest"])
    log = open(run_dir / "out.log").read()
    assert "resuming checkpoint" in log and "Train Epoch: 1" in log
    assert os.path.exists(run_dir / "checkpoints" / "epoch_2.pt")
    ckpt = torch.load(run_dir / "checkpoints" / "epoch_2.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and len(ckpt["optimizer"]["state"]) > 0


@pytest.mark.slow
def test_two_process_webdataset_accum_freq(data, tmp_path):
    """torchrun 2 processes on webdataset shards with --accum-freq 2 and the gap loss."""
    argv = ["--train-data", data["wds"], "--dataset-type", "webdataset", "--train-num-samples", "256",
            "--batch-size", "16", "--accum-freq", "2", "--logs", str(tmp_path), "--name", "ddp",
            "--gap-atp-weight", "1", "--gap-cu-weight", "1"] + TRAIN
    run(argv, nproc=2)
    log = open(tmp_path / "ddp/out.log").read()
    assert "total 2" in log
    assert len(logged(tmp_path / "ddp", "gap_cu_loss")) == 4  # 256 / (16 * 2 ranks * 2 accum)
    sd = torch.load(tmp_path / "ddp/checkpoints/epoch_1.pt", weights_only=True)["state_dict"]
    assert all(k.startswith("module.") for k in sd)  # DDP checkpoint, create_model strips the prefix
