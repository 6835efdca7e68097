"""Every open_clip model family users train carries every term, separation included: built-in ViT +
text transformer, ModifiedResNet, a timm tower, an HF text tower, CustomTextCLIP, CoCa and SigLIP
(tiny configs written offline by tests/families.py).

* The heads read what each tower's final projection reads: checked against the projection's own
  gradient (for one sample, the gradient of its first weight is the outer product of the pooled
  input with the output's gradient), which needs no hook and no change to the model.
* The family matrix, through the launcher: 1 epoch with every term of the registry, each term logged
  and finite; ``--resume latest`` restores the heads exactly; every checkpoint loads with plain
  ``open_clip.create_model`` in a fresh process; ``--pretrained`` fine-tuning restores the heads.
* Refusals: ``--torchscript`` before anything is built; a model the heads cannot read (a ViT that
  returns tokens outside CoCa) as a clean ``error:`` line, exit code 2, and no run folder left behind.
"""
import json
import os
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from openclip_structure import registry
from openclip_structure.views import towers
from openclip_structure.views.heads import HEADS_KEY, attach_heads
from openclip_structure.data.sources import digits_samples
from openclip_structure.data.writer import write_dataset
from openclip_structure.integration.forward import install_forward
from openclip_structure.views.towers import encode_pooled

from families import FAMILIES, write_family_configs
from helpers import logged, run

TRAIN = ["--lr", "1e-3", "--warmup", "2", "--workers", "0", "--seed", "0", "--log-every-n-steps", "1",
         "--batch-size", "16", "--train-num-samples", "64", "--report-to", "tensorboard", "--text-aug", "eda"]
#: every term of the registry at a small weight
EVERY_TERM = [a for spec in registry.TERMS for a in (spec.flag, "0.25")]
LOGGED = ["contrastive_loss"] + [k for spec in registry.TERMS for k in spec.logged]


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    names = write_family_configs(str(root))
    folder = str(root / "configs")
    open_clip.add_model_config(folder)
    return folder, names


def _model(name):
    torch.manual_seed(0)
    return open_clip.create_model(name)


def _first_weight(proj):
    """The projection's first weight, oriented ``[outputs, width]``."""
    if isinstance(proj, torch.Tensor):
        return proj, lambda g: g.T  # pooled @ P: P is [width, embed]
    first = next(m for m in proj.modules() if isinstance(m, nn.Linear))
    return first.weight, lambda g: g


@pytest.mark.parametrize("family", list(FAMILIES))
def test_heads_read_the_input_of_each_towers_projection(configs, family):
    _, names = configs
    name = names[family]
    model = _model(name)
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    inputs = {"image": torch.randn(1, 3, 32, 32), "text": tokenizer(["a photo of the number seven"])}
    found = towers.projections(model, name)
    for modality, x in inputs.items():
        projection = found[modality]
        assert not projection.identity, (family, modality)
        # the model's own tower output, no tap: its projection's gradient holds the pooled input
        encode = model.encode_image if modality == "image" else model.encode_text
        weight, orient = _first_weight(projection.module)
        model.zero_grad()
        encode(x, normalize=False).float().sum().backward()  # (CoCa normalises by default)
        rows = orient(weight.grad)  # [outputs, width]: row j = d(sum)/dh_j * pooled
        out, pooled = encode_pooled(model, x, modality)
        assert pooled.shape == (1, projection.width)
        row = rows[rows.norm(dim=1).argmax()]
        assert F.cosine_similarity(row, pooled[0].detach(), dim=0).abs() > 1 - 1e-4, (family, modality)
        if isinstance(projection.module, torch.Tensor) or isinstance(projection.module, nn.Linear):
            assert torch.allclose(rows[0], pooled[0].detach(), atol=1e-5), (family, modality)  # linear: exact
        with torch.no_grad():  # the tapped call returns what the tower returns untapped
            assert torch.allclose(out, encode(x), atol=1e-5), (family, modality)
    # the projections are back in place
    assert all(not p.identity for p in towers.projections(model, name).values())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_view_forward_with_heads_on_every_family(configs, family):
    _, names = configs
    name = names[family]
    model = _model(name)
    heads = attach_heads(model, name)
    install_forward(model)
    model.eval()  # BatchNorm (ResNet towers) would use each call's own batch statistics
    tokenizer = open_clip.get_tokenizer(name)
    t = tokenizer(["a photo of one", "two", "a drawn digit"])
    images = torch.randn(3, 2, 3, 32, 32)
    calls = []
    model.visual.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    out = model(images, torch.stack([t, t.roll(1, 0)], dim=1))
    assert calls == [6]  # one image-tower forward of both views
    for key in ("image_ind_features", "image_aug_ind_features", "text_ind_features", "text_aug_ind_features"):
        assert out[key].shape == (3, heads["image"].embed_dim), key
        assert torch.allclose(out[key].norm(dim=-1), torch.ones(3), atol=1e-5), key
    with torch.no_grad():  # the independent features are the heads applied to each view's pooled features
        _, pooled = encode_pooled(model, images[:, 1], "image")
        assert torch.allclose(out["image_aug_ind_features"], heads["image"](pooled), atol=1e-5)
    loss = sum(v.float().sum() for k, v in out.items() if k.endswith("_features"))
    loss = loss + out["logit_scale"] + (out["logits"].float().mean() if "logits" in out else 0)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters())
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None and "logit_bias" not in n]
    assert unused == []  # DDP would stop on an unused parameter


# ---- the family matrix through the launcher ------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    shards = write_dataset(digits_samples()[:100], str(root / "wds"), val_fraction=0.2, train_shards=2, val_shards=1)
    return shards["train"]["pattern"], shards["val"]["pattern"]


def _argv(configs, data, logs, family, *extra):
    folder, names = configs
    name, flags = FAMILIES[family]
    return (["--model", names[family], "--model-config-dir", folder, "--train-data", data[0], "--dataset-type",
             "webdataset", "--logs", str(logs), "--name", family] + TRAIN + flags + EVERY_TERM + list(extra))


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def matrix(configs, data, tmp_path_factory):
    """Each family: 1 epoch with every term, then --resume latest for a second epoch at lr 0."""
    logs = tmp_path_factory.mktemp("matrix")
    for family in FAMILIES:
        run(_argv(configs, data, logs, family, "--epochs", "1", "--val-data", data[1]), timeout=600)
        resumed = [a if a != "1e-3" else "0" for a in _argv(configs, data, logs, family, "--epochs", "2",
                                                            "--resume", "latest")]
        run(resumed, timeout=600)
    return logs


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_with_every_term_and_logs_each(matrix, family):
    run_dir = matrix / family
    for key in LOGGED:
        values = logged(run_dir, key)
        assert len(values) >= 4 and all(np.isfinite(values)), (family, key)
    log = open(run_dir / "out.log").read()
    assert "separation heads: on" in log and "head reads the input of" in log
    assert "val/modality_gap" in log or "modality_gap" in log


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_resume_restores_the_heads_exactly(matrix, family):
    ckpts = matrix / family / "checkpoints"
    log = open(matrix / family / "out.log").read()
    assert "restored the separation heads (structure_heads)" in log
    h1, h2 = _load(ckpts / "structure_heads_epoch_1.pth"), _load(ckpts / "structure_heads_epoch_2.pth")
    assert set(h1) == {"image.proj", "text.proj"}
    for k in h1:  # lr 0 in epoch 2: the heads it saved are the ones it restored
        assert torch.equal(h1[k], h2[k]), (family, k)
    e1, e2 = _load(ckpts / "epoch_1.pt"), _load(ckpts / "epoch_2.pt")
    assert e2["epoch"] == 2 and not any(HEADS_KEY in k for k in e2["state_dict"])
    buffers = ("running_mean", "running_var", "num_batches_tracked")  # BatchNorm statistics move at lr 0
    assert all(torch.equal(e1["state_dict"][k], e2["state_dict"][k]) for k in e1["state_dict"]
               if not k.endswith(buffers))


@pytest.mark.slow
def test_every_family_checkpoint_loads_with_plain_create_model(matrix, configs):
    folder, names = configs
    code = (
        "import json, sys, torch, open_clip\n"
        "open_clip.add_model_config(sys.argv[1])\n"
        "out = {}\n"
        "for family, name, path in json.loads(sys.argv[2]):\n"
        "    m = open_clip.create_model(name, pretrained=path)\n"
        "    sd = torch.load(path, map_location='cpu', weights_only=True)['state_dict']\n"
        "    sd = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in sd.items()}\n"
        "    mine = m.state_dict()\n"
        "    out[family] = [sorted(mine) == sorted(sd), max((mine[k] - v).abs().max().item() for k, v in sd.items())]\n"
        "print(json.dumps(out))\n")
    todo = [(f, names[f], str(matrix / f / "checkpoints" / "epoch_2.pt")) for f in FAMILIES]
    proc = subprocess.run([sys.executable, "-c", code, folder, json.dumps(todo)], capture_output=True, text=True,
                          timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {f: [True, 0.0] for f in FAMILIES}


@pytest.mark.slow
def test_pretrained_fine_tuning_restores_the_heads(matrix, configs, data, tmp_path):
    family = "resnet"
    ckpt = matrix / family / "checkpoints" / "epoch_2.pt"
    argv = _argv(configs, data, tmp_path, family, "--epochs", "1", "--pretrained", str(ckpt))
    run([a if a != "1e-3" else "0" for a in argv], timeout=600)
    log = open(tmp_path / family / "out.log").read()
    assert f"restored the separation heads (structure_heads) from --pretrained {ckpt}" in log
    saved = _load(matrix / family / "checkpoints" / "structure_heads_epoch_2.pth")
    tuned = _load(tmp_path / family / "checkpoints" / "structure_heads_epoch_1.pth")
    assert all(torch.equal(saved[k], tuned[k]) for k in saved)  # lr 0: exactly the heads it started from
    # ... and the model's weights are the checkpoint's: open_clip loaded --pretrained for the user's config
    start, now = _load(ckpt)["state_dict"], _load(tmp_path / family / "checkpoints" / "epoch_1.pt")["state_dict"]
    strip = lambda k: k[len("module."):] if k.startswith("module.") else k  # noqa: E731
    start = {strip(k): v for k, v in start.items()}
    assert all(torch.equal(start[strip(k)], v) for k, v in now.items()
               if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    # a plain open_clip checkpoint (no heads file beside it): a warning, fresh heads
    plain = tmp_path / "plain" / "epoch_2.pt"
    os.makedirs(plain.parent)
    plain.write_bytes(ckpt.read_bytes())
    argv = _argv(configs, data, tmp_path, family, "--epochs", "1", "--pretrained", str(plain))
    run([a if a != family else "fresh" for a in argv], timeout=600)
    log = open(tmp_path / "fresh" / "out.log").read()
    assert f"--pretrained {plain} has no 'structure_heads' entry" in log and "fresh initialisation" in log


# ---- refusals ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_torchscript_is_refused_before_anything_is_built(configs, data, tmp_path):
    proc = run(_argv(configs, data, tmp_path, "vit", "--epochs", "1", "--torchscript"), check=False, timeout=120)
    assert proc.returncode == 2
    assert "error: --torchscript cannot be combined with the two-view regularizers" in proc.stderr
    assert not os.path.exists(tmp_path / "vit")


@pytest.mark.slow
def test_a_model_the_heads_cannot_read_is_a_clean_error_with_no_run_folder(configs, data, tmp_path):
    folder, _ = configs
    cfg = json.load(open(os.path.join(folder, "family-vit.json")))
    cfg["vision_cfg"]["output_tokens"] = True  # a CLIP whose ViT returns (pooled, tokens)
    own = tmp_path / "own"
    own.mkdir()
    (own / "tokens-vit.json").write_text(json.dumps(cfg))
    argv = ["--model", "tokens-vit", "--model-config-dir", str(own), "--train-data", data[0], "--dataset-type",
            "webdataset", "--logs", str(tmp_path / "logs"), "--name", "refused", "--epochs", "1"] + TRAIN[:-2] \
        + ["--sep-weight", "1"]
    proc = run(argv, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: --sep-weight (deep feature separation) is not supported for model 'tokens-vit'" in proc.stderr
    assert "output_tokens=True" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "logs" / "refused")


def test_unknown_model_class_is_refused_naming_it():
    class Odd(nn.Module):
        pass

    with pytest.raises(towers.UnsupportedModelError, match=r"model 'odd'.*Odd, not open_clip's CLIP"):
        towers.projections(Odd(), "odd")


# ---- open_clip main (its snapshot in ../shared/upstream/open_clip-main) ------------------------------------

def _main_env():
    from test_open_clip_main import SNAPSHOT

    if SNAPSHOT is None:
        pytest.skip("no open_clip main snapshot at ../shared/upstream/open_clip-main")
    from test_open_clip_main import env

    return env()


@pytest.mark.slow
def test_every_family_on_open_clip_main():
    """The heads' reading and the two-view forward of every family, under open_clip main's classes (its
    ModifiedResNet calls c_proj as a module, its CoCa forward has no output_labels)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-m", "not slow",
                           "-k", "heads_read or two_view_forward"], capture_output=True, text=True, env=_main_env(),
                          cwd=os.path.dirname(__file__), timeout=600)
    assert proc.returncode == 0 and f"{2 * len(FAMILIES)} passed" in proc.stdout, proc.stdout[-3000:]


@pytest.mark.slow
def test_resnet_separation_and_coca_refusal_through_the_launcher_on_open_clip_main(configs, data, tmp_path):
    from helpers import command

    def launch(family):
        return subprocess.run(command(_argv(configs, data, tmp_path, family, "--epochs", "1")), capture_output=True,
                              text=True, env=_main_env(), timeout=600)

    proc = launch("resnet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key in LOGGED:
        values = logged(tmp_path / "resnet", key)
        assert values and all(np.isfinite(values)), key
    assert (tmp_path / "resnet" / "checkpoints" / "structure_heads_epoch_1.pth").exists()
    # CoCaTask builds its own loss inputs and would drop the second view: a clear refusal, not a crash
    proc = launch("coca")
    assert proc.returncode == 2 and "cannot train a CoCaTask on open_clip main" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not os.path.exists(tmp_path / "coca")
