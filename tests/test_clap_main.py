"""CLAP (audio-text) on open_clip main, through the launcher: the loss-only terms and
``--fixed-temperature`` train between the audio and the text embeddings of ``CLAPTask``, the validation
gap metrics are computed from open_clip main's own validation embeddings, and the view terms are
refused before anything is built.

Model: the bundled ``structure-clap-tiny`` (open_clip main's Whisper-tiny audio tower on 1 s clips at
16 kHz, a 2-layer built-in text transformer). Data: sine-tone WAV shards in open_clip main's
``webdataset-audio`` layout (``tests/clap_audio.py``). open_clip main's audio preprocessing imports
torchaudio: it is installed with ``pip install --target data/torchaudio/V --no-deps torchaudio==V``
(torchaudio >= 2.9 loads beside this project's torch; its own torch pin is ignored), and the tests skip
with the reason if that fails. torchaudio >= 2.9 decodes with torchcodec + FFmpeg's shared libraries,
which PyPI cannot provide here, so the runs go through ``tests/clap_launcher.py`` (stdlib WAV decoding
where torchcodec cannot decode; everything else is open_clip main's code).
"""
import argparse
import json
import math
import os
import subprocess
import sys

import pytest

from openclip_structure.registry import TERMS as REGISTRY, view_flags, weight_flags

from helpers import ROOT, logged

HERE = os.path.dirname(os.path.abspath(__file__))
SNAPSHOTS = [os.path.join(os.path.dirname(ROOT), "shared", "upstream", "open_clip-main"),
             "/work/shared/upstream/open_clip-main"]
SNAPSHOT = next((p for p in SNAPSHOTS if os.path.isdir(os.path.join(p, "src", "open_clip_train"))), None)
needs_main = pytest.mark.skipif(SNAPSHOT is None, reason="no open_clip main snapshot at ../shared/upstream/"
                                                         "open_clip-main (relative to the repository root)")
TORCHAUDIO = "2.11.1"
TERMS = ["--gap-atp-weight", "1", "--gap-cu-weight", "1", "--gc-weight", "0.25"]
VIEW_TERMS = weight_flags({spec.key: 1 for spec in REGISTRY if spec.views})  # every view term of the registry


def torchaudio_site() -> str:
    """A folder holding torchaudio (pip runs once), importable beside this torch; else skip."""
    target = os.path.join(ROOT, "data", "torchaudio", TORCHAUDIO)
    if not os.path.isfile(os.path.join(target, "torchaudio", "__init__.py")):
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", target, "--no-deps",
                               f"torchaudio=={TORCHAUDIO}"], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            pytest.skip(f"cannot install torchaudio {TORCHAUDIO} from PyPI: {proc.stderr.strip()[-300:]}")
    probe = subprocess.run([sys.executable, "-c", "import torchaudio"], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=target), timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"torchaudio {TORCHAUDIO} does not import beside this torch: {probe.stderr.strip()[-300:]}")
    return target


def env(site=None):
    e = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    e["PYTHONPATH"] = os.pathsep.join([os.path.join(SNAPSHOT, "src"), ROOT] + ([site] if site else []))
    e["OMP_NUM_THREADS"] = "1"
    return e


def launch(argv, site=None, timeout=400):
    return subprocess.run([sys.executable, os.path.join(HERE, "clap_launcher.py")] + list(argv),
                          capture_output=True, text=True, env=env(site), cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from clap_audio import write_audio_shards

    return write_audio_shards(tmp_path_factory.mktemp("clap") / "wds", n_train=64, n_val=32)


def clap_args(shards, logs, name, extra=()):
    return ["--train-data", shards["train"], "--val-data", shards["val"], "--val-num-samples", "32",
            "--dataset-type", "webdataset-audio", "--audio-ext", "wav", "--train-num-samples", "64",
            "--model", "structure-clap-tiny", "--batch-size", "16", "--epochs", "1", "--workers", "0",
            "--lr", "1e-3", "--warmup", "2", "--seed", "0", "--logs", str(logs), "--name", name] + list(extra)


def val_results(run_dir) -> dict:
    lines = open(os.path.join(run_dir, "checkpoints", "results.jsonl")).read().splitlines()
    assert len(lines) == 1, lines
    return json.loads(lines[0])


def test_view_terms_refused_on_an_audio_model_in_process():
    from openclip_structure.views.audio import check_audio_args
    from openclip_structure.errors import FlagError

    ns = dict(model="some-clap", gc_aug_weight=0.0, bridge_weight=0.0, sep_weight=1.0, inmodal_weight=0.0,
              gap_atp_weight=1.0)
    with pytest.raises(FlagError, match=r"--sep-weight cannot train the audio-text model 'some-clap' \(CLAP\).*"
                                        r"no audio view"):
        check_audio_args(argparse.Namespace(dataset_type="webdataset-audio", **ns))
    check_audio_args(argparse.Namespace(dataset_type="webdataset", **ns))  # an image model: not refused here
    check_audio_args(argparse.Namespace(dataset_type="webdataset-audio", **dict(ns, sep_weight=0.0)))


@needs_main
def test_view_terms_refused_on_clap_before_anything_is_built(shards, tmp_path):
    proc = launch(clap_args(shards, tmp_path, "views", VIEW_TERMS + TERMS), timeout=120)
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-3000:])
    error = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and f"error: {view_flags()} cannot " \
        "train the audio-text model 'structure-clap-tiny' (CLAP)" in error[0] and "no audio view" in error[0], \
        proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "views").exists()  # refused while parsing: no run folder


@needs_main
@pytest.mark.slow
def test_clap_trains_gap_and_gc_terms_with_a_frozen_temperature(shards, tmp_path):
    """1 epoch (4 steps) with ATP, CU, gc and --fixed-temperature 0.1; each term is logged with finite
    values, the logit scale is ln 10 in every step and in the checkpoint, and the validation gap metrics
    match an independent computation on embeddings of the checkpoint loaded with create_model."""
    import torch

    site = torchaudio_site()
    # fp32 (open_clip main's default is amp_bf16): the independent computation below then matches to 1e-5
    proc = launch(clap_args(shards, tmp_path, "clap", TERMS + ["--fixed-temperature", "0.1", "--precision", "fp32"]),
                  site)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    run_dir = tmp_path / "clap"
    log = (run_dir / "out.log").read_text()
    assert "CLAPTask trains audio-text" in log and "--gap-anchor image anchors the audio embeddings" in log
    assert "openclip-structure loss: base ClipLoss, terms {'gap_atp': 1.0, 'gap_cu': 1.0, 'gc': 0.25}" in log
    for key in ("contrastive_loss", "gap_atp_loss", "gap_cu_loss", "gc_loss"):
        values = logged(run_dir, key)
        assert len(values) == 2 and all(math.isfinite(v) for v in values), (key, values)
        assert any(v != 0 for v in values), (key, values)  # the term is on, not a placeholder 0
    scales = [float(s) for s in __import__("re").findall(r"Logit Scale: ([0-9.]+)", log)]
    assert len(scales) == 2 and all(s == pytest.approx(10.0, abs=1e-3) for s in scales), scales
    ckpt = torch.load(run_dir / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=True)
    assert float(ckpt["state_dict"]["logit_scale"]) == pytest.approx(math.log(10.0), abs=1e-6)  # init: ln(1/0.07)

    res = val_results(run_dir)
    for key in ("modality_gap", "cos_true_pairs", "intra_audio_cos", "intra_text_cos", "relative_modality_gap"):
        assert math.isfinite(res[key]), key
    assert "intra_image_cos" not in res and res["num_samples"] == 32

    code = r"""
import io, json, sys, tarfile
import numpy as np, torch, open_clip
sys.path.insert(0, sys.argv[3])
from clap_audio import decode_wav
open_clip.add_model_config(sys.argv[1])
model, _, preprocess = open_clip.create_model_and_transforms("structure-clap-tiny", pretrained=sys.argv[2],
                                                           output_dict=True)
tokenizer = open_clip.get_tokenizer("structure-clap-tiny")
model.eval()
members = {}
with tarfile.open(sys.argv[4]) as tar:
    for m in tar.getmembers():
        key, ext = m.name.rsplit(".", 1)
        members.setdefault(key, {})[ext] = tar.extractfile(m).read()
keys = sorted(members)
audio = [preprocess(decode_wav(members[k]["wav"])) for k in keys]
a, t = [], []
for i in range(0, len(keys), 16):  # open_clip's validation batches (Whisper's log-mel floor is per batch)
    batch = {"waveform": torch.stack([x["waveform"] for x in audio[i:i + 16]]),
             "longer": torch.tensor([x["longer"] for x in audio[i:i + 16]])}
    with torch.no_grad():
        out = model(audio=batch, text=tokenizer([members[k]["txt"].decode() for k in keys[i:i + 16]]))
    a.append(out["audio_features"].double())
    t.append(out["text_features"].double())
a, t = torch.cat(a).numpy(), torch.cat(t).numpy()
print(json.dumps({"gap": float(np.linalg.norm(a.mean(0) - t.mean(0))), "cos": float((a * t).sum(1).mean()),
                  "n": len(keys), "scale": float(out["logit_scale"])}))
"""
    out = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "openclip_structure", "model_configs"),
                          str(run_dir / "checkpoints" / "epoch_1.pt"), HERE, shards["val"]],
                         capture_output=True, text=True, env=env(site), cwd="/", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ours = json.loads(out.stdout.strip().splitlines()[-1])
    assert ours["n"] == 32 and ours["scale"] == pytest.approx(10.0, rel=1e-5)
    assert res["modality_gap"] == pytest.approx(ours["gap"], abs=1e-5)
    assert res["cos_true_pairs"] == pytest.approx(ours["cos"], abs=1e-5)  # the same audio-caption pairs


@needs_main
@pytest.mark.slow
def test_gap_terms_shrink_the_clap_audio_text_gap(shards, tmp_path):
    """Same data, seed and steps: the validation audio-text gap after training with ATP + CU is smaller
    than after plain CLAP training (no plugin flag: the task keeps open_clip's own loss)."""
    site = torchaudio_site()
    gaps = {}
    for name, extra in (("plain", []), ("gap", TERMS[:4])):
        proc = launch(clap_args(shards, tmp_path, name, extra), site)
        assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
        gaps[name] = val_results(tmp_path / name)["modality_gap"]
    assert "openclip-structure loss:" not in (tmp_path / "plain" / "out.log").read_text()
    print(f"CLAP validation modality gap: plain {gaps['plain']:.4f}, with --gap-atp-weight 1 --gap-cu-weight 1 "
          f"{gaps['gap']:.4f}")
    assert gaps["gap"] < gaps["plain"] - 0.1, gaps


def test_clap_task_names_the_audio_embeddings_in_the_nonfinite_error(caplog):
    """On a task whose first modality is audio (CLAPTask's ``primary_key``), a NaN in the embeddings the
    task hands over as ``image_features`` is reported as ``audio_features``, and the startup note says so."""
    import logging

    import torch
    from open_clip import ClipLoss

    from openclip_structure.views.audio import name_modalities
    from openclip_structure.factory import NonFiniteLossError, create_loss
    from test_gap_loss import make_args

    class CLAPTask:  # what name_modalities reads of open_clip main's CLAPTask: its name and primary_key
        primary_key = "audio"

    loss = create_loss(make_args(gap_atp_weight=1.0), base_factory=lambda a: ClipLoss())
    with caplog.at_level(logging.INFO):
        assert name_modalities(CLAPTask(), loss) == "audio"
    assert "CLAPTask trains audio-text" in caplog.text and "intra_audio_cos" in caplog.text
    audio = torch.nn.functional.normalize(torch.randn(8, 4), dim=-1)
    audio[2, 0] = float("nan")
    text = torch.nn.functional.normalize(torch.randn(8, 4), dim=-1)
    with pytest.raises(NonFiniteLossError, match="audio_features has 1 non-finite"):
        loss(image_features=audio, text_features=text, logit_scale=torch.tensor(10.0), output_dict=True)
