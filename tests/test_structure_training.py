"""The latent-structure regularizers (Jiang et al., CVPR 2023) inside open_clip training: flags and
their validation, the two-view preprocess and model-forward wrapper (one image-tower forward of 2B,
independent features from the pre-projection pooled output), the separation heads (optimised,
outside state_dict, saved as checkpoint["structure_heads"], restored by --resume), real training
runs with every term (1 process and 2-process torchrun) and a fresh-process create_model load."""
import json
import logging
import os
import re
import subprocess
import sys
import types

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from openclip_structure.configs import MODEL_CONFIG_DIR
from openclip_structure import flags
from openclip_structure import main as launcher
from openclip_structure.registry import TERMS, weight_flags
from openclip_structure.factory import MissingFeaturesError, build_terms, create_loss
from openclip_structure.views.heads import HEADS_KEY, attach_heads, check_separation_support
from openclip_structure.data.sources import digits_samples
from openclip_structure.data.writer import write_dataset
from openclip_structure.data.captions import EDA
from openclip_structure.integration.forward import install_forward
from openclip_structure.integration.model import prepare_model
from openclip_structure.views.image import TwoViews, augmented_view_transform
from openclip_structure.views.text import TwoCaptions

from helpers import VAL_TAR, X_TAR, logged, make_args, run  # noqa: E402
CONFIG_DIR = MODEL_CONFIG_DIR
TRAIN = ["--model", "structure-tiny", "--lr", "2e-3", "--warmup", "5", "--wd", "0.1", "--workers", "1",
         "--seed", "0", "--log-every-n-steps", "1", "--report-to", "tensorboard"]
#: every term but the gap loss (the latent-structure terms and CyCLIP's in-modal terms), the
#: geometric-consistency pair at 0.25 (CyCLIP's cyclic weight), the others at 1
JIANG = weight_flags({spec.key: 0.25 if spec.key in ("gc", "gc_aug") else 1
                      for spec in TERMS if not spec.gap_schedule})
ALL_LOSS_KEYS = ("contrastive_loss",) + tuple(key for spec in TERMS for key in spec.logged)

launcher.register_model_configs()


# ---- helpers ---------------------------------------------------------------------------------

def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def tiny(**kw):
    return open_clip.create_model("structure-tiny", output_dict=True, **kw)


def digit_images(n=4):
    import io
    return [Image.open(io.BytesIO(s.image)) for s in digits_samples()[:n]]


def tokens(n=4, context_length=16):
    return open_clip.tokenize([f"a handwritten digit number {i}" for i in range(n)], context_length=context_length)


def plugin_args(argv):
    """Parsed launcher flags (open_clip's parser + the plugin group), plus what open_clip adds later
    (tests/helpers.py), for ``--train-data`` X_TAR."""
    return make_args(["--train-data", X_TAR] + argv)


# ---- the two-view preprocess ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["crop", "autoaugment"])
def test_view_preprocess_gives_two_different_views(kind):
    _, preprocess_train, _ = open_clip.create_model_and_transforms("structure-tiny")
    two = TwoViews(preprocess_train, augmented_view_transform(preprocess_train, kind))
    torch.manual_seed(0)
    img = digit_images(1)[0]
    x = two(img)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert (x[0] - x[1]).abs().max() > 0.1  # different views
    # both views normalised like the model's own train view (same Normalize statistics)
    norm = [t for t in two.aug.transforms if type(t).__name__ == "Normalize"][0]
    assert list(norm.mean) == list(preprocess_train.transforms[-1].mean)
    # a batch of such samples collates to [B, 2, C, H, W]
    batch = torch.utils.data.default_collate([two(im) for im in digit_images(3)])
    assert batch.shape == (3, 2, 3, 32, 32)


def test_eda_and_two_caption_tokenizer():
    import random
    rng = random.Random(0)
    caption = "a handwritten seven on white paper"
    outs = {EDA()(caption, rng=rng) for _ in range(20)}
    assert len(outs) > 1 and all(set(o.split()) <= set(caption.split()) for o in outs)
    assert EDA()("seven", rng=rng) == "seven"  # one word is always kept
    tok = TwoCaptions(open_clip.get_tokenizer("structure-tiny"), pair=lambda s, rng=None: (s, s + " again"))
    t = tok("a seven")
    assert t.shape == (1, 2, 16) and not torch.equal(t[0, 0], t[0, 1])
    assert torch.equal(t[0, 0], open_clip.tokenize(["a seven"], context_length=16)[0])


def test_text_aug_tokenizer_only_for_the_train_dataset():
    from openclip_structure.integration.loaders import wrap_get_data
    args = plugin_args(["--bridge-weight", "1", "--text-aug", "eda", "--val-data", VAL_TAR])
    seen = []

    def fake_get_data(a, fns, epoch=0, tokenizer=None):
        data = {}
        if a.train_data:
            data["train"] = tokenizer("a handwritten seven")
        if a.val_data:
            data["val"] = tokenizer("a handwritten seven")
        seen.append((a.train_data, a.val_data))
        return data

    tok = open_clip.get_tokenizer("structure-tiny")
    data = wrap_get_data(fake_get_data, lambda: args)(args, (None, None), epoch=0, tokenizer=tok)
    assert data["train"].shape == (1, 2, 16) and data["val"].shape == (1, 16)
    assert seen == [(X_TAR, None), (None, VAL_TAR)]
    assert (args.train_data, args.val_data) == (X_TAR, VAL_TAR)  # restored
    plain = plugin_args(["--bridge-weight", "1", "--val-data", VAL_TAR])
    assert wrap_get_data(fake_get_data, lambda: plain)(plain, (None, None), tokenizer=tok)["train"].shape == (1, 16)


# ---- the model-forward wrapper --------------------------------------------------------------------

def _model_with_views(sep=True, seed=0):
    torch.manual_seed(seed)
    m = tiny()
    if sep:
        attach_heads(m, "structure-tiny")
    install_forward(m)
    return m


def _count_calls(module):
    calls = []
    module.register_forward_pre_hook(lambda mod, inp: calls.append(tuple(inp[0].shape)))
    return calls


@pytest.mark.parametrize("sep,two_texts", [(True, False), (True, True), (False, False)])
def test_forward_wrapper_keys_shapes_and_one_tower_call(sep, two_texts):
    m = _model_with_views(sep=sep)
    b = 4
    images = torch.randn(b, 2, 3, 32, 32)
    texts = torch.stack([tokens(b), tokens(b).roll(1, 0)], dim=1) if two_texts else tokens(b)
    vis, txt = _count_calls(m.visual), _count_calls(m.transformer)
    out = m(images, texts)
    assert vis == [(2 * b, 3, 32, 32)]  # ONE image-tower forward of 2B images
    assert len(txt) == 1 and txt[0][0] == (2 * b if two_texts else b)
    expected = {"image_features", "text_features", "logit_scale", "image_aug_features"}
    if two_texts:
        expected |= {"text_aug_features"}
    if sep:
        expected |= {"image_ind_features", "text_ind_features", "image_aug_ind_features"}
        if two_texts:
            expected |= {"text_aug_ind_features"}
    assert set(out) == expected
    for k, v in out.items():
        if k != "logit_scale":
            assert v.shape == (b, 32), k  # batch-first: --accum-freq can concatenate them
            assert torch.allclose(v.norm(dim=-1), torch.ones(b), atol=1e-5), k
    # the shared features of each view are those of the unwrapped encoders
    with torch.no_grad():
        assert torch.allclose(out["image_features"], m.encode_image(images[:, 0], normalize=True), atol=1e-5)
        assert torch.allclose(out["image_aug_features"], m.encode_image(images[:, 1], normalize=True), atol=1e-5)
        assert torch.allclose(out["text_features"], m.encode_text(texts[:, 0] if two_texts else texts,
                                                                  normalize=True), atol=1e-5)
    # gradients reach every parameter, heads included (DDP would fail on an unused one)
    (sum(v.sum() for k, v in out.items() if k.endswith("_features")) + out["logit_scale"]).backward()
    assert [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None] == []
    assert sep == any(n.startswith(HEADS_KEY) for n, _ in m.named_parameters())


def test_four_d_images_behave_exactly_as_before():
    m = _model_with_views(sep=True)
    plain = tiny()
    plain.load_state_dict(m.state_dict())
    images, texts = torch.randn(3, 3, 32, 32), tokens(3)
    a, b = m(images, texts), plain(images, texts)
    assert set(a) == set(b) == {"image_features", "text_features", "logit_scale"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    # zero-shot style calls are untouched
    assert torch.equal(m.encode_image(images), plain.encode_image(images))
    assert m.visual.proj is not None and m.text_projection is not None  # projections restored


def test_independent_features_come_from_the_pre_projection_pooled_output():
    m = _model_with_views(sep=True)
    m.eval()
    images, texts = torch.randn(3, 2, 3, 32, 32), tokens(3)
    with torch.no_grad():
        out = m(images, texts)
        v = m.visual  # manual: VisionTransformer.forward without the final `@ proj`
        flat = torch.cat([images[:, 0], images[:, 1]])
        pooled_v, _ = v._pool(v.transformer(v._embeds(flat)))
        x = m.token_embedding(texts) + m.positional_embedding  # manual CLIP.encode_text without projection
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
        pooled_t = x[torch.arange(3), texts.argmax(dim=-1)]
    heads = getattr(m, HEADS_KEY)
    ind_v = F.normalize(pooled_v @ heads["image"].proj, dim=-1)
    ind_t = F.normalize(pooled_t @ heads["text"].proj, dim=-1)
    assert torch.allclose(out["image_ind_features"], ind_v[:3], atol=1e-5)
    assert torch.allclose(out["image_aug_ind_features"], ind_v[3:], atol=1e-5)
    assert torch.allclose(out["text_ind_features"], ind_t, atol=1e-5)
    assert torch.allclose(out["image_features"], F.normalize(pooled_v[:3] @ v.proj, dim=-1), atol=1e-5)
    assert torch.allclose(out["text_features"], F.normalize(pooled_t @ m.text_projection, dim=-1), atol=1e-5)
    # ... and not from the shared embedding z
    assert not torch.allclose(out["image_ind_features"],
                              F.normalize(out["image_features"] @ heads["image"].proj[:32], dim=-1), atol=1e-3)


def test_coca_views_one_image_tower_forward(tmp_path):
    cfg = {"embed_dim": 64,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8,
                          "attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 8,
                          "output_tokens": True},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1,
                        "embed_cls": True, "output_tokens": True},
           "multimodal_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1,
                              "attn_pooler_heads": 2},
           "custom_text": True}
    (tmp_path / "coca-structure-tiny.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(tmp_path))
    torch.manual_seed(0)
    m = open_clip.create_model("coca-structure-tiny")
    with torch.no_grad():  # open_clip 3.3 leaves this one uninitialised (torch.empty): a NaN caption loss by chance
        torch.nn.init.normal_(m.text_decoder.text_projection, std=0.02)
    install_forward(m)
    calls = _count_calls(m.visual)
    images, texts = torch.randn(2, 2, 3, 32, 32), tokens(2)
    out = m(images, texts)
    assert calls == [(4, 3, 32, 32)]
    assert {"image_features", "text_features", "logits", "labels", "image_aug_features"} <= set(out)
    assert out["image_aug_features"].shape == out["image_features"].shape == (2, 64)
    # CoCaLoss + two-view terms on CoCa's contrastive features
    args = plugin_args(["--model", "coca-structure-tiny", "--gc-aug-weight", "1", "--inmodal-weight", "1",
                        "--bridge-weight", "1", "--gap-atp-weight", "1"])
    loss = create_loss(args)
    assert type(loss.base).__name__ == "CoCaLoss"
    losses = loss(**out, output_dict=True)
    assert {"contrastive_loss", "caption_loss", "gc_aug_loss", "inmodal_loss", "bridge_loss", "gap_atp_loss"} == set(losses)
    sum(losses.values()).backward()
    assert m.visual.proj.grad is not None and m.visual.proj.grad.abs().sum() > 0


@pytest.mark.parametrize("siglip", [False, True])
def test_loss_reads_extra_features_with_clip_and_siglip(siglip):
    m = _model_with_views(sep=True)
    args = plugin_args(["--model", "structure-tiny"] + JIANG + ["--gap-cu-weight", "1"]
                       + (["--siglip"] if siglip else []))
    loss = create_loss(args)
    assert type(loss.base).__name__ == ("SigLipLoss" if siglip else "ClipLoss")
    out = m(torch.randn(4, 2, 3, 32, 32), tokens(4))
    if siglip:
        out["logit_bias"] = torch.tensor(-10.0)
    losses = loss(**out, output_dict=True)
    assert set(losses) == {"contrastive_loss", "gc_loss", "gc_aug_loss", "bridge_loss", "sep_ortho_loss",
                           "sep_icon_loss", "sep_iuni_loss", "inmodal_loss", "gap_cu_loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    # inmodal uses the CLIP logit scale: a different scale changes it
    out2 = dict(out, logit_scale=out["logit_scale"] * 2)
    assert loss(**out2, output_dict=True)["inmodal_loss"] != losses["inmodal_loss"]
    sum(losses.values()).backward()
    assert getattr(m, HEADS_KEY)["text"].proj.grad.abs().sum() > 0


def test_terms_without_views_raise_a_clear_error():
    args = plugin_args(["--model", "structure-tiny", "--bridge-weight", "1", "--sep-weight", "1"])
    loss = create_loss(args)
    z = F.normalize(torch.randn(4, 8), dim=-1)
    with pytest.raises(MissingFeaturesError) as e:
        loss(image_features=z, text_features=z, logit_scale=torch.tensor(10.0))
    msg = str(e.value)
    assert "image_aug_features (for bridge" in msg and "image_ind_features" in msg
    assert "openclip_structure.main" in msg


def test_text_aug_falls_back_to_text():
    args = plugin_args(["--model", "structure-tiny", "--gc-aug-weight", "1", "--inmodal-weight", "1"])
    loss = create_loss(args)
    g = torch.Generator().manual_seed(0)
    z = {k: F.normalize(torch.randn(6, 8, generator=g), dim=-1) for k in ("i", "t", "ia")}
    with_alias = loss(image_features=z["i"], text_features=z["t"], image_aug_features=z["ia"],
                      logit_scale=torch.tensor(10.0), output_dict=True)
    explicit = loss(image_features=z["i"], text_features=z["t"], image_aug_features=z["ia"],
                    text_aug_features=z["t"].clone(), logit_scale=torch.tensor(10.0), output_dict=True)
    for k in ("gc_aug_loss", "inmodal_loss"):
        assert torch.allclose(with_alias[k], explicit[k], atol=1e-6)
    # dist_* features (distillation's teacher) are not the terms' inputs: a wrong shape is ignored
    loss(image_features=z["i"], text_features=z["t"], image_aug_features=z["ia"], logit_scale=torch.tensor(10.0),
         dist_image_features=torch.randn(6, 3))


# ---- separation heads: parameters, state_dict, checkpoints ------------------------------------------

def test_heads_are_parameters_but_not_in_state_dict():
    m = _model_with_views(sep=True)
    names = [n for n, _ in m.named_parameters()]
    assert names[-2:] == [f"{HEADS_KEY}.image.proj", f"{HEADS_KEY}.text.proj"]
    assert not any(HEADS_KEY in k for k in m.state_dict())
    wrapped = nn.ModuleDict({"module": m})  # DDP-style "module." prefix
    assert not any(HEADS_KEY in k for k in wrapped.state_dict())
    # strict loading both ways
    plain = tiny()
    plain.load_state_dict(m.state_dict(), strict=True)
    m.load_state_dict(plain.state_dict(), strict=True)
    wrapped.load_state_dict({f"module.{k}": v for k, v in plain.state_dict().items()}, strict=True)
    sd = plain.state_dict()
    sd.pop("logit_scale")
    with pytest.raises(RuntimeError, match="logit_scale"):  # other missing keys still fail
        m.load_state_dict(sd, strict=True)
    # open_clip's optimizer grouping: 2-D heads get weight decay
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    assert all(not exclude(n, p) for n, p in m.named_parameters() if HEADS_KEY in n)


def _open_clip_adamw(model):
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    return torch.optim.AdamW([{"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.},
                              {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad],
                               "weight_decay": 0.1}], lr=1e-3)


def _step(model, opt):
    out = model(torch.randn(4, 2, 3, 32, 32), tokens(4))
    sum(v.sum() for k, v in out.items() if k.endswith("_features")).backward()
    opt.step()


def test_heads_file_beside_checkpoint_restores_and_optimizer_alignment(tmp_path, caplog):
    from openclip_structure.integration import checkpoints, state

    src = _model_with_views(sep=True, seed=1)
    opt = _open_clip_adamw(src)
    _step(src, opt)
    ckpt = {"epoch": 1, "name": "x", "state_dict": src.state_dict(), "optimizer": opt.state_dict()}
    torch.save(ckpt, tmp_path / "epoch_1.pt")  # as open_clip saves it: no heads inside
    run_src = state.Run(types.SimpleNamespace(save_logs=True, checkpoint_path=str(tmp_path), resume=None))
    run_src.heads = getattr(src, HEADS_KEY)
    path = checkpoints.save_heads(run_src, 1)
    assert path == str(tmp_path / "structure_heads_epoch_1.pth")
    assert set(load(path)) == {"image.proj", "text.proj"}
    assert HEADS_KEY not in load(tmp_path / "epoch_1.pt")
    assert sorted(os.listdir(tmp_path)) == ["epoch_1.pt", "structure_heads_epoch_1.pth"]  # no temporary left

    # resume into a fresh model with heads: restored exactly from the file of the checkpoint's epoch
    dst = _model_with_views(sep=True, seed=2)
    run_dst = state.Run(types.SimpleNamespace(resume=str(tmp_path / "epoch_1.pt")))
    run_dst.heads, run_dst.model = getattr(dst, HEADS_KEY), dst
    ck = load(tmp_path / "epoch_1.pt")
    assert checkpoints.restore_heads(run_dst, str(tmp_path / "epoch_1.pt"), ck)
    assert HEADS_KEY not in ck
    dst.load_state_dict(ck["state_dict"])
    _open_clip_adamw(dst).load_state_dict(ck["optimizer"])
    for k in ("image", "text"):
        assert torch.equal(getattr(dst, HEADS_KEY)[k].proj, getattr(src, HEADS_KEY)[k].proj)
    saved_with_heads = dict(load(tmp_path / "epoch_1.pt"), **{HEADS_KEY: load(path)})
    torch.save(saved_with_heads, tmp_path / "c.pt")  # the layout of earlier plugin versions

    # a plain CLIP checkpoint (no heads, smaller optimizer) resumed with separation: warning, fresh heads
    plain = tiny()
    popt = _open_clip_adamw(plain)
    plain_ckpt = {"epoch": 1, "state_dict": plain.state_dict(), "optimizer": popt.state_dict()}
    fresh = _model_with_views(sep=True, seed=3)
    before = getattr(fresh, HEADS_KEY)["image"].proj.detach().clone()
    run3 = state.Run(types.SimpleNamespace(resume="plain.pt"))
    run3.heads, run3.model = getattr(fresh, HEADS_KEY), fresh
    with caplog.at_level(logging.WARNING):
        assert not checkpoints.restore_heads(run3, "plain.pt", plain_ckpt)
    assert "no 'structure_heads' entry" in caplog.text
    fresh.load_state_dict(plain_ckpt["state_dict"])
    o = _open_clip_adamw(fresh)
    o.load_state_dict(plain_ckpt["optimizer"])
    _step(fresh, o)  # the heads train with fresh optimizer state
    assert not torch.equal(getattr(fresh, HEADS_KEY)["image"].proj, before)

    # a separation checkpoint resumed WITHOUT separation: heads dropped, optimizer still loads
    nosep = tiny()
    run4 = state.Run(types.SimpleNamespace(resume="c.pt"))
    run4.model = nosep
    ck = load(tmp_path / "c.pt")
    assert HEADS_KEY in ck
    with caplog.at_level(logging.WARNING):
        assert not checkpoints.restore_heads(run4, str(tmp_path / "c.pt"), ck)
    assert "--sep-weight is 0" in caplog.text
    nosep.load_state_dict(ck["state_dict"])
    _open_clip_adamw(nosep).load_state_dict(ck["optimizer"])


# ---- flags and model validation ----------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["--gc-weight", "-1"], r"--gc-weight: must be a finite weight in \[0.0, inf\], got '-1'"),
    (["--gc-aug-weight", "-0.5"], r"--gc-aug-weight: must be a finite weight"),
    (["--bridge-weight", "inf"], r"--bridge-weight: must be a finite weight"),
    (["--sep-weight", "-2"], r"--sep-weight: must be a finite weight"),
    (["--inmodal-weight", "x"], r"--inmodal-weight: must be a weight, got 'x'"),
    (["--bridge-weight", "1", "--bridge-t", "1"], r"--bridge-t: must be a number in \(0, 1\) or 'uniform', got '1'"),
    (["--bridge-weight", "1", "--bridge-t", "0"], r"--bridge-t: must be a number in \(0, 1\) or 'uniform'"),
    (["--bridge-weight", "1", "--bridge-t", "random"], r"--bridge-t: must be a number in \(0, 1\) or 'uniform', got 'random'"),
    (["--sep-weight", "1", "--sep-temperature", "0"], r"--sep-temperature: must be a finite temperature in \(0.0, 10.0\]"),
    (["--view-aug", "mixup"], r"--view-aug: invalid choice: 'mixup'"),
    (["--text-aug", "backtranslate"], r"--text-aug: invalid choice: 'backtranslate'"),
    (["--text-aug", "eda"], r"--text-aug eda only feeds the two-view regularizers"),
    (["--sep-weight", "1", "--horovod"], r"--horovod is not supported"),
    (["--gc-weight", "1", "--horovod"], r"--horovod is not supported"),
    (["--bridge-weight", "1", "--distill-model", "ViT-B-32", "--distill-pretrained", "openai"],
     r"distillation .* cannot be combined with the two-view regularizers"),
    (["--gc-weight", "1", "--gap-schedule", "ramp"], r"--gap-schedule ramp needs --gap-atp-weight or --gap-cu-weight"),
])
def test_bad_structure_flags_fail_before_training(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        launcher.main(["--train-data", X_TAR, "--logs", str(tmp_path)] + argv)
    assert e.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert os.listdir(tmp_path) == []


def test_flag_defaults_are_off_and_enable_the_right_machinery():
    args = plugin_args([])
    assert (args.gc_weight, args.gc_aug_weight, args.bridge_weight, args.sep_weight, args.inmodal_weight) == (0,) * 5
    assert (args.bridge_t, args.sep_temperature, args.view_aug, args.text_aug) == (0.25, 0.1, "crop", "none")
    assert not flags.regularizers_enabled(args) and not flags.views_enabled(args)
    args = plugin_args(["--gc-weight", "1"])
    assert flags.regularizers_enabled(args) and not flags.views_enabled(args)
    args = plugin_args(["--bridge-weight", "1", "--bridge-t", "uniform", "--text-aug", "eda"])
    assert args.bridge_t == "uniform" and flags.views_enabled(args) and flags.text_views_enabled(args)
    assert not flags.separation_enabled(args)
    terms = [t for t, _ in build_terms(plugin_args(JIANG + ["--sep-temperature", "0.2"]))]
    assert [t.name for t in terms] == ["gc", "gc_aug", "bridge", "sep_ortho", "sep_icon", "sep_iuni", "inmodal"]
    assert terms[4].temperature == 0.2


def test_separation_reads_resnet_and_custom_text_towers_and_views_work_on_rn50():
    """The towers the heads read (every family: tests/test_tower_families.py), on open_clip's own RN50."""
    rn50 = open_clip.create_model("RN50", pretrained=None)
    found = check_separation_support(rn50, "RN50")
    assert found["image"].path == "visual.attnpool.c_proj" and found["image"].width == 2048
    assert found["text"].path == "text_projection" and found["text"].width == 512
    custom = open_clip.create_model("structure-tiny", force_custom_text=True)
    assert check_separation_support(custom, "structure-tiny")["text"].path == "text.text_projection"
    # views and heads with the ResNet tower (one forward of 2B through encode_image)
    args = plugin_args(["--model", "RN50", "--inmodal-weight", "1", "--sep-weight", "1"])
    preprocess, heads = prepare_model(args, "RN50", rn50, open_clip.image_transform(224, is_train=True))
    assert heads is not None and isinstance(preprocess, TwoViews)
    rn50.eval()
    with torch.no_grad():
        out = rn50(torch.randn(2, 2, 3, 224, 224), open_clip.tokenize(["a", "b"]))
    assert out["image_aug_features"].shape == out["image_aug_ind_features"].shape == (2, 1024)


def test_launcher_refuses_a_tower_it_cannot_read_before_and_after_the_model_is_built(capsys, tmp_path):
    """Where the config tells (a CLIP ViT returning tokens), at parse time; where only the built model
    does, in the launcher's create_model_and_transforms wrapper: an error line and exit code 2 both."""
    cfg = open_clip.get_model_config("structure-tiny")
    tokens = dict(cfg, vision_cfg=dict(cfg["vision_cfg"], output_tokens=True))
    (tmp_path / "structure-tiny-tokens.json").write_text(json.dumps(tokens))
    with launcher.installed() as ocm:
        with pytest.raises(SystemExit) as stop:
            ocm.parse_args(["--train-data", X_TAR, "--model", "structure-tiny-tokens", "--sep-weight", "1",
                            "--model-config-dir", str(tmp_path)])
        assert stop.value.code == 2
        assert "not supported for model 'structure-tiny-tokens'" in capsys.readouterr().err
        ocm.parse_args(["--train-data", X_TAR, "--model", "structure-tiny", "--sep-weight", "1"])
        # the config changes after the flags were checked: only the built model tells
        open_clip.factory._MODEL_CONFIGS["structure-tiny"] = tokens
        try:
            with pytest.raises(SystemExit) as stop:
                ocm.create_model_and_transforms("structure-tiny", None, output_dict=True)
        finally:
            open_clip.factory._MODEL_CONFIGS["structure-tiny"] = cfg
    assert stop.value.code == 2
    assert "error: --sep-weight (deep feature separation) is not supported for model 'structure-tiny'" \
        in capsys.readouterr().err


# ---- real training runs ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    shards = write_dataset(digits_samples()[:400], str(root / "wds"), val_fraction=0.2, train_shards=4, val_shards=1)
    return {"wds": shards["train"]["pattern"]}


def wds_args(data, logs, name, batch=32, samples=256):
    return ["--train-data", data["wds"], "--dataset-type", "webdataset", "--train-num-samples", str(samples),
            "--batch-size", str(batch), "--logs", str(logs), "--name", name] + TRAIN


@pytest.fixture(scope="module")
def all_run(data, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    argv = wds_args(data, logs, "all") + ["--epochs", "1", "--save-most-recent", "--text-aug", "eda",
                                          "--gap-atp-weight", "1", "--gap-cu-weight", "1"] + JIANG
    run(argv)
    return logs / "all", argv


@pytest.mark.slow
def test_training_with_every_regularizer_logs_every_term(all_run):
    run_dir, _ = all_run
    for key in ALL_LOSS_KEYS:
        values = logged(run_dir, key)
        assert len(values) == 8 and all(np.isfinite(values)), key
    params = open(run_dir / "params.txt").read()
    assert "sep_weight: 1.0" in params and "text_aug: eda" in params and "bridge_t: 0.25" in params
    log = open(run_dir / "out.log").read()
    assert "two views per sample" in log and "separation heads: on" in log
    ckpt = load(run_dir / "checkpoints" / "epoch_1.pt")
    heads = load(run_dir / "checkpoints" / "structure_heads_epoch_1.pth")  # beside open_clip's checkpoint
    assert set(heads) == {"image.proj", "text.proj"}
    assert heads["image.proj"].shape == (64, 32)
    assert HEADS_KEY not in ckpt and not any(HEADS_KEY in k for k in ckpt["state_dict"])
    # the heads were optimised: AdamW state for the last two entries of the weight-decay group
    ids = ckpt["optimizer"]["param_groups"][-1]["params"][-2:]
    assert len(ckpt["optimizer"]["state"]) == sum(len(g["params"]) for g in ckpt["optimizer"]["param_groups"])
    for i, k in zip(ids, ("image.proj", "text.proj")):
        exp_avg = ckpt["optimizer"]["state"][i]["exp_avg"]
        assert exp_avg.shape == (64, 32) and exp_avg.abs().sum() > 0


@pytest.mark.slow
def test_checkpoint_loads_with_plain_open_clip_in_fresh_process(all_run):
    run_dir, _ = all_run
    ckpt = str(run_dir / "checkpoints" / "epoch_1.pt")
    code = (
        "import sys, torch, open_clip\n"
        "open_clip.add_model_config(sys.argv[1])\n"
        "m = open_clip.create_model('structure-tiny', pretrained=sys.argv[2])\n"
        "c = torch.load(sys.argv[2], weights_only=True)\n"
        "assert 'structure_heads' not in c\n"
        "print(max((m.state_dict()[k] - v).abs().max().item() for k, v in c['state_dict'].items()))\n"
        "print(len(m.state_dict()) == len(c['state_dict']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, CONFIG_DIR, ckpt], capture_output=True, text=True,
                         timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr[-3000:]
    diff, same_keys = out.stdout.split()[-2:]
    assert float(diff) == 0.0 and same_keys == "True"


@pytest.mark.slow
def test_resume_latest_restores_heads_exactly(all_run):
    """--resume latest --epochs 2 with lr 0: parameters cannot move in epoch 2, so the heads saved at
    epoch 2 are exactly the heads the resumed run started from, which must be those of epoch 1."""
    run_dir, argv = all_run
    argv = [a if argv[i - 1] != "--epochs" else "2" for i, a in enumerate(argv)]
    argv = [a if argv[i - 1] != "--lr" else "0" for i, a in enumerate(argv)]
    argv = [a if argv[i - 1] != "--train-num-samples" else "64" for i, a in enumerate(argv)]
    run(argv + ["--resume", "latest"])
    log = open(run_dir / "out.log").read()
    assert "restored the separation heads (structure_heads)" in log and "resuming checkpoint" in log
    e1, e2 = load(run_dir / "checkpoints" / "epoch_1.pt"), load(run_dir / "checkpoints" / "epoch_2.pt")
    assert e2["epoch"] == 2
    h1 = load(run_dir / "checkpoints" / "structure_heads_epoch_1.pth")
    h2 = load(run_dir / "checkpoints" / "structure_heads_epoch_2.pth")
    for k in ("image.proj", "text.proj"):
        assert torch.equal(h1[k], h2[k]), k
    assert all(torch.equal(e1["state_dict"][k], e2["state_dict"][k]) for k in e1["state_dict"])


@pytest.mark.slow
def test_resume_from_checkpoint_without_heads_warns_and_starts_fresh(all_run, tmp_path):
    run_dir, argv = all_run
    stripped = load(run_dir / "checkpoints" / "epoch_1.pt")
    heads_e1 = load(run_dir / "checkpoints" / "structure_heads_epoch_1.pth")
    torch.save(stripped, tmp_path / "no_heads.pt")  # a copy without the heads file beside it
    argv = [a if argv[i - 1] != "--epochs" else "2" for i, a in enumerate(argv)]
    argv = [a if argv[i - 1] != "--lr" else "0" for i, a in enumerate(argv)]
    argv = [a if argv[i - 1] != "--train-num-samples" else "64" for i, a in enumerate(argv)]
    argv = [a if argv[i - 1] != "--logs" else str(tmp_path) for i, a in enumerate(argv)]
    run(argv + ["--resume", str(tmp_path / "no_heads.pt")])
    log = open(tmp_path / "all" / "out.log").read()
    assert "has no 'structure_heads' entry: the deep-feature-separation heads start from a fresh" in log
    e2 = load(tmp_path / "all" / "checkpoints" / "epoch_2.pt")
    h2 = load(tmp_path / "all" / "checkpoints" / "structure_heads_epoch_2.pth")
    for k in ("image.proj", "text.proj"):  # lr 0: these are the fresh heads, not epoch 1's
        assert not torch.allclose(h2[k], heads_e1[k], atol=1e-3), k
    assert all(torch.equal(stripped["state_dict"][k], e2["state_dict"][k]) for k in stripped["state_dict"])


@pytest.mark.slow
def test_two_process_views_and_separation_with_local_loss(data, tmp_path):
    """torchrun, 2 processes (gloo), --local-loss --gather-with-grad, --accum-freq 2, two-view terms
    and separation: DDP with the heads completes (no unused-parameter error)."""
    argv = wds_args(data, tmp_path, "ddp", batch=16) + [
        "--epochs", "1", "--local-loss", "--gather-with-grad", "--accum-freq", "2", "--view-aug", "autoaugment",
        "--gc-aug-weight", "0.25", "--bridge-weight", "1", "--bridge-t", "uniform", "--sep-weight", "1",
        "--inmodal-weight", "1"]
    run(argv, nproc=2)
    log = open(tmp_path / "ddp" / "out.log").read()
    assert "total 2" in log
    for key in ("gc_aug_loss", "bridge_loss", "sep_ortho_loss", "sep_icon_loss", "sep_iuni_loss", "inmodal_loss"):
        values = logged(tmp_path / "ddp", key)
        assert len(values) == 4 and all(np.isfinite(values)), key  # 256 / (16 * 2 ranks * 2 accum)
    ckpt = load(tmp_path / "ddp" / "checkpoints" / "epoch_1.pt")
    assert all(k.startswith("module.") for k in ckpt["state_dict"])
    assert not any(HEADS_KEY in k for k in ckpt["state_dict"])
    assert set(load(tmp_path / "ddp" / "checkpoints" / "structure_heads_epoch_1.pth")) == {"image.proj", "text.proj"}
