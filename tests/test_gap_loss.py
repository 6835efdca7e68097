"""Gap loss (Grassucci et al. 2026) against explicit double loops, gradcheck, and the composite
loss's contract with open_clip (keys, no-op, schedules, accum-freq, bad input)."""
import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, CoCaLoss, SigLipLoss

from openclip_structure.factory import NonFiniteLossError, StructureLoss, create_loss
from openclip_structure.losses import (AlignTruePairs, CentroidUniformity, align_true_pairs,
                                       centroid_uniformity, modality_uniformity)
from openclip_structure.schedule import TrainingProgress

from helpers import make_args


def unit(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)


# ---- independent references: plain Python loops over samples and pairs -------------------

def ref_atp(zs, anchor):
    n = zs[0].shape[0]
    total = 0.0
    others = [m for m in range(len(zs)) if m != anchor]
    for m in others:
        for i in range(n):
            total += float(sum((zs[m][i, d] - zs[anchor][i, d]) ** 2 for d in range(zs[m].shape[1])))
    return total / (len(others) * n)


def ref_uniformity_of(points, t):
    n = len(points)
    acc, pairs = 0.0, 0
    for i in range(n):
        for j in range(i + 1, n):
            diff = [a - b for a, b in zip(points[i], points[j])]
            acc += math.exp(-t * sum(x * x for x in diff))
            pairs += 1
    return math.log(acc / pairs)


def ref_cu(zs, t):
    n, d = zs[0].shape
    cents = []
    for i in range(n):
        c = [sum(float(z[i, k]) for z in zs) / len(zs) for k in range(d)]
        norm = math.sqrt(sum(x * x for x in c))
        cents.append([x / norm for x in c])
    return ref_uniformity_of(cents, t)


def ref_modality_uniformity(zs, t):
    return sum(ref_uniformity_of(z.tolist(), t) for z in zs) / len(zs)


@pytest.mark.parametrize("m,anchor", [(2, 0), (2, 1), (3, 0), (3, 2)])
def test_align_true_pairs_matches_loop(m, anchor):
    zs = [unit(7, 5, seed=s) for s in range(m)]
    assert align_true_pairs(zs, anchor=anchor).item() == pytest.approx(ref_atp(zs, anchor), rel=1e-12)


@pytest.mark.parametrize("m,t", [(2, 2.0), (3, 2.0), (3, 0.5)])
def test_centroid_uniformity_matches_loop(m, t):
    zs = [unit(9, 4, seed=10 + s) for s in range(m)]
    assert centroid_uniformity(zs, t=t).item() == pytest.approx(ref_cu(zs, t), rel=1e-10)


@pytest.mark.parametrize("m", [2, 3])
def test_modality_uniformity_matches_loop(m):
    zs = [unit(8, 3, seed=20 + s) for s in range(m)]
    assert modality_uniformity(zs).item() == pytest.approx(ref_modality_uniformity(zs, 2.0), rel=1e-10)


def test_gap_terms_see_the_gap():
    # identical modalities: no misalignment; a shifted modality: larger ATP
    z = unit(16, 8, seed=1)
    assert align_true_pairs([z, z]).item() == 0.0
    shifted = F.normalize(z + 0.5 * torch.eye(8, dtype=z.dtype)[0], dim=-1)
    assert align_true_pairs([z, shifted]).item() > 0.05
    # collapsed centroids are maximally non-uniform: log(mean exp(0)) = 0
    same = unit(1, 8, seed=2).expand(10, 8)
    assert centroid_uniformity([same, same]).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("fn", [
    lambda a, b, c: align_true_pairs([a, b, c], anchor=1),
    lambda a, b, c: centroid_uniformity([a, b, c]),
    lambda a, b, c: modality_uniformity([a, b, c]),
])
def test_gradcheck(fn):
    # inputs pass through normalize so the check covers the unit-sphere use in training
    xs = [torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(s), requires_grad=True)
          for s in range(3)]
    assert torch.autograd.gradcheck(lambda a, b, c: fn(*(F.normalize(x, dim=-1) for x in (a, b, c))), xs)


def test_bad_input_messages():
    z = unit(4, 3, seed=0)
    with pytest.raises(ValueError, match="at least 2 modalities"):
        align_true_pairs([z])
    with pytest.raises(ValueError, match="same shape"):
        centroid_uniformity([z, unit(5, 3, seed=1)])
    with pytest.raises(ValueError, match="same shape"):
        align_true_pairs([z, unit(4, 2, seed=1)])
    with pytest.raises(ValueError, match="anchor"):
        AlignTruePairs(anchor="audio")
    with pytest.raises(ValueError, match="temperature t"):
        CentroidUniformity(t=-1)
    with pytest.raises(ValueError, match="at least 2 samples"):
        centroid_uniformity([z[:1], z[:1]])
    with pytest.raises(ValueError, match=r"\[N, D\] tensor"):
        align_true_pairs([z.view(2, 2, 3), z.view(2, 2, 3)])


# ---- the composite loss built from flags --------------------------------------------------

def clip_inputs(n=12, d=8, seed=0):
    return dict(image_features=unit(n, d, seed, torch.float32), text_features=unit(n, d, seed + 1, torch.float32),
                logit_scale=torch.tensor(10.0))


def test_plugin_off_is_open_clips_own_loss():
    loss = create_loss(make_args())
    assert type(loss) is ClipLoss  # exactly the object open_clip would have built
    assert type(create_loss(make_args(["--siglip"]))) is SigLipLoss


def test_composite_keys_values_and_weights():
    inputs = clip_inputs()
    loss = create_loss(make_args(["--gap-atp-weight", "0.5", "--gap-cu-weight", "2"]))
    assert isinstance(loss, StructureLoss)
    out = loss(**inputs, output_dict=True)
    assert set(out) == {"contrastive_loss", "gap_atp_loss", "gap_cu_loss"}
    zs = [inputs["image_features"].double(), inputs["text_features"].double()]
    base = ClipLoss()(**inputs)
    assert out["contrastive_loss"].item() == pytest.approx(base.item(), rel=1e-6)
    assert out["gap_atp_loss"].item() == pytest.approx(0.5 * ref_atp(zs, 0), rel=1e-5)
    assert out["gap_cu_loss"].item() == pytest.approx(2.0 * ref_cu(zs, 2.0), rel=1e-5)
    total = loss(**inputs, output_dict=False)
    assert total.item() == pytest.approx(sum(v.item() for v in out.values()), abs=1e-5)
    # the Fahim et al. variant is logged under the same key
    out2 = create_loss(make_args(["--gap-cu-weight", "1", "--gap-uniformity", "modality"]))(**inputs, output_dict=True)
    assert out2["gap_cu_loss"].item() == pytest.approx(ref_modality_uniformity(zs, 2.0), rel=1e-5)


def test_text_anchor():
    inputs = clip_inputs()
    zs = [inputs["image_features"].double(), inputs["text_features"].double()]
    out = create_loss(make_args(["--gap-atp-weight", "1", "--gap-anchor", "text"]))(**inputs, output_dict=True)
    assert out["gap_atp_loss"].item() == pytest.approx(ref_atp(zs, 1), rel=1e-5)


def test_ramp_schedule_follows_progress():
    progress = TrainingProgress()
    loss = create_loss(make_args(["--gap-atp-weight", "1", "--gap-cu-weight", "3", "--gap-schedule", "ramp"]),
                       progress=progress)
    expected = {0.0: (1.0, 3.0), 0.1: (1.0, 3.0), 0.45: (1.0, 1.5), 0.6: (1.2, 0.6), 0.8: (1.6, 0.0), 1.0: (2.0, 0.0)}
    progress.total_steps = 1000
    for frac, (w_atp, w_cu) in expected.items():
        progress.step = int(frac * 1000)
        w = loss.weights()
        assert w["gap_atp"] == pytest.approx(w_atp) and w["gap_cu"] == pytest.approx(w_cu), frac
    # a zero-weight term is still logged (constant keys across steps and ranks)
    out = loss(**clip_inputs(), output_dict=True)
    assert out["gap_cu_loss"].item() == 0.0 and out["gap_atp_loss"].item() > 0


def test_fixed_temperature_overrides_logit_scale():
    inputs = clip_inputs()
    out = create_loss(make_args(["--fixed-temperature", "0.1"]))(**{**inputs, "logit_scale": torch.tensor(3.0)},
                                                                 output_dict=True)
    ref = ClipLoss()(**{**inputs, "logit_scale": torch.tensor(10.0)})
    assert out["contrastive_loss"].item() == pytest.approx(ref.item(), rel=1e-6)


def test_siglip_and_coca_bases_get_their_inputs():
    inputs = clip_inputs()
    out = create_loss(make_args(["--siglip", "--gap-atp-weight", "1"]))(
        **inputs, logit_bias=torch.tensor(-10.0), output_dict=True)
    ref = SigLipLoss()(**inputs, logit_bias=torch.tensor(-10.0))
    assert out["contrastive_loss"].item() == pytest.approx(ref.item(), rel=1e-6)
    assert "gap_atp_loss" in out
    logits = torch.randn(12, 5, 30)
    labels = torch.randint(0, 30, (12, 5))
    out = create_loss(make_args(["--model", "coca_tiny", "--gap-cu-weight", "1"]))(
        **inputs, logits=logits, labels=labels, output_dict=True)
    ref = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)(**inputs, logits=logits, labels=labels,
                                                                 output_dict=True)
    assert set(out) == {"contrastive_loss", "caption_loss", "gap_cu_loss"}
    assert out["caption_loss"].item() == pytest.approx(ref["caption_loss"].item(), rel=1e-6)


def test_accum_freq_gradient_equals_full_batch_gradient():
    """open_clip's --accum-freq k calls the loss k times on the concatenated features with grad
    only through chunk j; the accumulated gradient must equal the full-batch gradient."""
    torch.manual_seed(0)
    w = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    x_img, x_txt = torch.randn(16, 6, dtype=torch.float64), torch.randn(16, 6, dtype=torch.float64)
    loss = create_loss(make_args(["--gap-atp-weight", "1", "--gap-cu-weight", "1"]))
    scale = torch.tensor(5.0, dtype=torch.float64)

    def feats(rows):
        return F.normalize(x_img[rows] @ w, dim=-1), F.normalize(x_txt[rows] @ w, dim=-1)

    full = loss(*feats(slice(None)), scale, output_dict=False)
    g_full, = torch.autograd.grad(full, w)

    k, chunks = 4, [slice(i * 4, (i + 1) * 4) for i in range(4)]
    g_acc = torch.zeros_like(w)
    with torch.no_grad():
        cached = [feats(c) for c in chunks]
    for j in range(k):
        img_j, txt_j = feats(chunks[j])
        img = torch.cat([c[0] for c in cached[:j]] + [img_j] + [c[0] for c in cached[j + 1:]])
        txt = torch.cat([c[1] for c in cached[:j]] + [txt_j] + [c[1] for c in cached[j + 1:]])
        g_acc += torch.autograd.grad(loss(img, txt, scale, output_dict=False), w)[0]
    torch.testing.assert_close(g_acc, g_full, rtol=1e-9, atol=1e-12)


def test_nonfinite_features_name_term_and_step():
    progress = TrainingProgress()
    progress.step = 7
    loss = create_loss(make_args(["--gap-atp-weight", "1"]), progress=progress)
    inputs = clip_inputs()
    inputs["image_features"] = inputs["image_features"].clone()
    inputs["image_features"][3, 1] = float("nan")
    with pytest.raises(NonFiniteLossError) as e:
        loss(**inputs, output_dict=True)
    msg = str(e.value)
    assert "gap_atp_loss" in msg and "step 7" in msg and "image_features has 1 non-finite" in msg
    # 'warn' logs and returns; 'off' does not check
    warn = create_loss(make_args(["--gap-atp-weight", "1", "--structure-nonfinite", "warn"]))
    assert torch.isnan(warn(**inputs, output_dict=True)["gap_atp_loss"])


class _ShapeBlindBase(torch.nn.Module):
    """A base loss that accepts any shapes, so that only the plugin's own check can refuse them."""

    def forward(self, image_features, text_features, logit_scale, output_dict=False):
        return {"contrastive_loss": image_features.sum() * 0 + text_features.sum() * 0}


def test_mismatched_feature_shapes_are_refused():
    inputs = clip_inputs()
    inputs["text_features"] = unit(12, 6, 3, torch.float32)
    loss = create_loss(make_args(["--gap-atp-weight", "1"]), base_factory=lambda args: _ShapeBlindBase())
    with pytest.raises(ValueError, match=r"openclip-structure: embeddings must have the same \[batch, dim\] "
                                         r"shape, got \{'image': \(\d+, \d+\), 'text': \(12, 6\)\}"):
        loss(**inputs, output_dict=True)


def test_bf16_autocast_terms_in_float32():
    inputs = clip_inputs()
    loss = create_loss(make_args(["--gap-atp-weight", "1", "--gap-cu-weight", "1"]))
    ref = loss(**inputs, output_dict=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(**{k: (v.bfloat16() if v.dim() else v) for k, v in inputs.items()}, output_dict=True)
    assert out["gap_cu_loss"].dtype == torch.float32
    # only the bf16 rounding of the inputs remains (~3 significant digits)
    assert out["gap_cu_loss"].item() == pytest.approx(ref["gap_cu_loss"].item(), rel=2e-2)
    assert out["gap_atp_loss"].item() == pytest.approx(ref["gap_atp_loss"].item(), rel=2e-2)


def test_nonfinite_skip_gives_zero_gradients_and_keeps_keys():
    loss = create_loss(make_args(["--gap-atp-weight", "1", "--gap-cu-weight", "1", "--structure-nonfinite", "skip"]))
    w = torch.randn(6, 8, requires_grad=True)
    x = torch.randn(12, 6)
    img = F.normalize(x @ w, dim=-1)
    txt = F.normalize(torch.randn(12, 8), dim=-1)
    clean = loss(img, txt, torch.tensor(10.0), output_dict=True)
    # a term that becomes NaN (here: a NaN logit scale inside the base loss) while the embeddings stay finite
    out = loss(img, txt, torch.tensor(float("nan")), output_dict=True)
    assert set(out) == set(clean)
    assert all(v.item() == 0.0 for v in out.values())
    sum(out.values()).backward()
    assert w.grad is not None and torch.equal(w.grad, torch.zeros_like(w))
