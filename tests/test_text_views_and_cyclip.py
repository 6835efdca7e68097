"""Text views: no degenerate text halves, real second captions from multi-caption data; and the
flag set that reproduces CyCLIP's objective, against a plain reimplementation of CyCLIP's loss."""
import os
import random

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from openclip_structure.factory import build_terms, create_loss, skipped_halves
from openclip_structure.losses import InModalContrastive, SeparationInModalContrast
from openclip_structure.data.reader import Sample
from openclip_structure.data.sources import digits_samples
from openclip_structure.data.writer import write_shards
from openclip_structure.data.captions import CaptionPair, EDAPair, split_captions
from openclip_structure.views.text import TwoCaptions

import openclip_structure

from helpers import make_args

open_clip.add_model_config(os.path.join(os.path.dirname(openclip_structure.__file__), "model_configs"))


def unit(g, n, d=6):
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_(True)


# ---- no degenerate text halves ----------------------------------------------------------------

def test_without_a_second_caption_the_text_halves_are_skipped():
    on = {t.name: t for t, _ in build_terms(make_args(["--inmodal-weight", "1", "--sep-weight", "1"]))}
    assert on["inmodal"].keys == ("image", "image_aug") and on["sep_icon"].keys == ("image_ind", "image_aug_ind")
    notes = skipped_halves(on.values())
    assert len(notes) == 1 and "sep_icon and inmodal" in notes[0] and "--text-aug captions" in notes[0]
    for aug in ("eda", "captions"):
        args = make_args(["--inmodal-weight", "1", "--sep-weight", "1", "--text-aug", aug])
        terms = {t.name: t for t, _ in build_terms(args)}
        assert "text_aug" in terms["inmodal"].keys and "text_aug_ind" in terms["sep_icon"].keys
        assert skipped_halves(terms.values()) == []


def test_image_half_alone_equals_the_image_infonce():
    g = torch.Generator().manual_seed(0)
    v, va = unit(g, 5), unit(g, 5)
    scale = torch.tensor(7.0, dtype=torch.float64)
    logits = scale * v @ va.T
    by_loop = sum(-torch.log_softmax(logits[i], dim=0)[i] for i in range(5)) / 5
    assert InModalContrastive(text=False)({"image": v, "image_aug": va}, logit_scale=scale).item() == \
        pytest.approx(by_loop.item(), rel=1e-12)
    u, ua = unit(g, 5), unit(g, 5)
    by_loop = sum(-torch.log_softmax(10.0 * u @ ua.T, dim=1)[i, i] for i in range(5)) / 5
    assert SeparationInModalContrast(0.1, text=False)({"image_ind": u, "image_aug_ind": ua}).item() == \
        pytest.approx(by_loop.item(), rel=1e-12)


def test_no_gradient_pushes_captions_apart_without_text_views():
    """--inmodal-weight without a text view: the term gives the text embeddings no gradient (before,
    its text half contrasted each caption with itself and pushed captions apart)."""
    loss = create_loss(make_args(["--inmodal-weight", "1"]))
    g = torch.Generator().manual_seed(1)
    v, t, va = unit(g, 6), unit(g, 6), unit(g, 6)
    out = loss(image_features=v, text_features=t, image_aug_features=va,
               logit_scale=torch.tensor(5.0, dtype=torch.float64), output_dict=True)
    grad_t, grad_v = torch.autograd.grad(out["inmodal_loss"], [t, v], allow_unused=True)
    assert grad_t is None and grad_v is not None and grad_v.abs().max() > 1e-4


# ---- several captions per sample --------------------------------------------------------------

def test_caption_pair_uses_two_different_captions_of_the_sample():
    rng = random.Random(0)
    text = "a handwritten seven\n\n  the digit 7  \nseven, written by hand\n"
    assert split_captions(text) == ["a handwritten seven", "the digit 7", "seven, written by hand"]
    pairs = {CaptionPair()(text, rng) for _ in range(60)}
    assert all(a != b and {a, b} <= set(split_captions(text)) for a, b in pairs)
    assert len(pairs) == 6  # every ordered pair of the three captions is drawn
    # a single caption falls back to its EDA copy; EDA pairs keep the caption itself first
    caption, view = CaptionPair()("one lonely caption here", random.Random(3))
    assert caption == "one lonely caption here" and set(view.split()) <= set(caption.split())
    assert EDAPair()("a b c", random.Random(0))[0] == "a b c"


def test_multi_caption_webdataset_through_open_clips_pipeline(tmp_path):
    """Shards whose <key>.txt holds two captions per line feed, through open_clip_train's own
    webdataset pipeline, a caption and a DIFFERENT caption of the same image as its text view."""
    from open_clip_train.data import get_wds_dataset
    samples = [Sample(s.key, s.image, f"{s.caption}, picture {i}\nthe number {s.label} in picture {i}", s.label)
               for i, s in enumerate(digits_samples()[:16])]  # every caption unique
    shards = write_shards(samples, tmp_path, num_shards=2)
    tok = open_clip.get_tokenizer("structure-tiny")
    args = make_args(["--train-data", shards["pattern"], "--train-num-samples", "16", "--batch-size", "8",
                      "--workers", "0", "--seed", "0"])
    _, _, preprocess = open_clip.create_model_and_transforms("structure-tiny")
    data = get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=TwoCaptions(tok, CaptionPair()))
    batches = list(data.dataloader)
    texts = torch.cat([t for _, t in batches])
    assert texts.shape == (16, 2, 16)
    by_tokens = {}
    for s in samples:
        for c in split_captions(s.caption):
            by_tokens[tuple(tok([c])[0].tolist())] = s.key
    keys = [(by_tokens[tuple(t[0].tolist())], by_tokens[tuple(t[1].tolist())]) for t in texts]
    assert all(a == b for a, b in keys)  # both rows are captions of the same sample ...
    assert all(not torch.equal(t[0], t[1]) for t in texts)  # ... and never the same caption
    assert sorted(k for k, _ in keys) == sorted(s.key for s in samples)


def test_text_aug_captions_needs_a_view_term(capsys):
    with pytest.raises(SystemExit) as e:
        make_args(["--text-aug", "captions"])
    assert e.value.code == 2
    assert "--text-aug captions only feeds the two-view regularizers" in capsys.readouterr().err


# ---- CyCLIP parity ----------------------------------------------------------------------------

def cyclip_objective(v, t, va, ta, scale, lambda1=0.25, lambda2=0.25):
    """CyCLIP's training loss (Goel et al., NeurIPS 2022; its train.py get_loss with --inmodal),
    written out plainly: 0.5 (cross-modal + in-modal contrastive) + lambda1 in-modal cyclic +
    lambda2 cross-modal cyclic, cyclic terms as mean squared logit differences / scale^2 x N."""
    n = v.shape[0]
    target = torch.arange(n)
    text_per_image = scale * v @ t.T
    cross = (F.cross_entropy(text_per_image, target) + F.cross_entropy(text_per_image.T, target)) / 2
    inmodal = (F.cross_entropy(scale * v @ va.T, target) + F.cross_entropy(scale * t @ ta.T, target)) / 2
    contrastive = (cross + inmodal) / 2
    inmodal_cyclic = (scale * v @ v.T - scale * t @ t.T).square().mean() / scale ** 2 * n
    crossmodal_cyclic = (text_per_image - text_per_image.T).square().mean() / scale ** 2 * n
    return contrastive + lambda1 * inmodal_cyclic + lambda2 * crossmodal_cyclic


@pytest.mark.parametrize("lam", [0.25, 1.0])
def test_flag_set_reproduces_cyclip_up_to_a_factor_of_two(lam):
    """--inmodal-weight 1 --gc-weight 2*lambda with a text view = 2 x CyCLIP's objective with
    cylambda1 = cylambda2 = lambda: value and gradient (embeddings and logit scale)."""
    args = make_args(["--inmodal-weight", "1", "--gc-weight", str(2 * lam), "--text-aug", "eda"])
    loss = create_loss(args)
    assert isinstance(loss.base, ClipLoss)
    g = torch.Generator().manual_seed(2)
    v, t, va, ta = (unit(g, 7) for _ in range(4))
    log_scale = torch.tensor(2.3, dtype=torch.float64, requires_grad=True)
    ours = sum(loss(image_features=v, text_features=t, image_aug_features=va, text_aug_features=ta,
                    logit_scale=log_scale.exp(), output_dict=True).values())
    theirs = cyclip_objective(v, t, va, ta, log_scale.exp(), lam, lam)
    assert ours.item() == pytest.approx(2 * theirs.item(), rel=1e-12)
    inputs = [v, t, va, ta, log_scale]
    for a, b in zip(torch.autograd.grad(ours, inputs), torch.autograd.grad(theirs, inputs)):
        assert torch.allclose(a, 2 * b, rtol=1e-10, atol=1e-12)


def test_two_views_work_with_open_clips_synthetic_dataset():
    """--dataset-type synthetic with a view term: open_clip reads the image size from the train
    preprocess (it failed with AttributeError on the two-view wrapper)."""
    from open_clip_train.data import get_synthetic_dataset
    from openclip_structure.views.image import TwoViews, augmented_view_transform
    _, preprocess, _ = open_clip.create_model_and_transforms("structure-tiny")
    two = TwoViews(preprocess, augmented_view_transform(preprocess, "crop"))
    args = make_args(["--dataset-type", "synthetic", "--train-num-samples", "4", "--batch-size", "2",
                      "--workers", "0"])
    images, texts = next(iter(get_synthetic_dataset(args, two, is_train=True, tokenizer=open_clip.get_tokenizer(
        "structure-tiny")).dataloader))
    assert images.shape == (2, 2, 3, 32, 32)
