"""The plugin on a CUDA device (marker ``cuda``; every test skips without CUDA; run by section 1 of
``scripts/gpu_check.py`` as ``pytest -m cuda tests``).

* every regularizer term's value and gradient on CUDA equal the CPU ones in float64 (same
  algorithm, so to round-off) and stay close in float32;
* under bf16 / fp16 autocast with low-precision features, StructureLoss still returns float32,
  finite terms close to the float32 values, and finite gradients reach the low-precision inputs;
* the launcher's two-view forward with the separation heads (structure-tiny) gives the same
  features on CUDA as on CPU (float64), and one bf16-autocast training step with every term
  yields finite gradients for every parameter, heads included.

``GPU_CHECK_TEST_DEVICE=cpu`` runs the same code with the CPU as the "other" device (a self-check
of the tests on machines without a GPU; it proves nothing about CUDA).
"""
import copy
import os

import pytest
import torch
import torch.nn.functional as F

from openclip_structure import registry
from openclip_structure.factory import StructureLoss
from openclip_structure.schedule import constant

from helpers import make_args

DEVICE = os.environ.get("GPU_CHECK_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                       reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]



def _built(extra=()):
    """Every term the registry builds (its flag defaults, every weight 1, a text view), by logged name."""
    args = make_args(registry.weight_flags(default=1) + ["--text-aug", "eda", *extra])
    return {term.name: term for spec in registry.TERMS for term in spec.build(args)}


#: term name -> factory: every term of the registry, and gap_cu's per-modality uniformity variant
TERMS = {name: (lambda name=name: _built()[name]) for name in _built()}
TERMS["gap_cu(modality)"] = lambda: _built(["--gap-uniformity", "modality"])["gap_cu"]
KEYS = ["image", "text", "image_aug", "text_aug", "image_ind", "text_ind", "image_aug_ind", "text_aug_ind"]
N, D = 24, 32


def features(dtype=torch.float64, device="cpu"):
    """Correlated unit embeddings for every key (as real paired embeddings are)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(N, D, generator=g, dtype=torch.float64)
    out = {k: F.normalize(base + torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1) for k in KEYS}
    return {k: v.to(device=device, dtype=dtype).requires_grad_() for k, v in out.items()}


def value_and_grads(name, feats, logit_scale):
    term = TERMS[name]()
    used = {k: feats[k] for k in term.keys}
    value = term(used, logit_scale=logit_scale)
    grads = torch.autograd.grad(value, list(used.values()))
    return value.detach(), dict(zip(used, grads))


def scale(device, dtype):
    return torch.tensor(1 / 0.07, device=device, dtype=dtype)


@pytest.mark.parametrize("name", list(TERMS))
def test_term_value_and_gradient_match_cpu_float64(name):
    ref_v, ref_g = value_and_grads(name, features(), scale("cpu", torch.float64))
    v, g = value_and_grads(name, features(device=DEVICE), scale(DEVICE, torch.float64))
    assert v.device.type == torch.device(DEVICE).type and v.dtype == torch.float64
    assert v.item() == pytest.approx(ref_v.item(), rel=1e-10, abs=1e-12)
    for k in ref_g:
        torch.testing.assert_close(g[k].cpu(), ref_g[k], rtol=1e-8, atol=1e-12, msg=f"{name}: d/d{k}")


@pytest.mark.parametrize("name", list(TERMS))
def test_term_float32_close_to_float64(name):
    ref_v, ref_g = value_and_grads(name, features(), scale("cpu", torch.float64))
    v, g = value_and_grads(name, features(torch.float32, DEVICE), scale(DEVICE, torch.float32))
    assert v.dtype == torch.float32
    assert v.item() == pytest.approx(ref_v.item(), rel=1e-4, abs=1e-6)
    for k in ref_g:
        torch.testing.assert_close(g[k].double().cpu(), ref_g[k], rtol=1e-3, atol=1e-5, msg=f"{name}: d/d{k}")


def all_terms_loss():
    from open_clip.loss import ClipLoss

    return StructureLoss(ClipLoss(), [(TERMS[n](), constant(1.0)) for n in TERMS if n != "gap_cu(modality)"])


def structure_loss_out(feats, logit_scale):
    kw = {f"{k}_features": v for k, v in feats.items() if k not in ("image", "text")}
    return all_terms_loss()(feats["image"], feats["text"], logit_scale, output_dict=True, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_low_precision_inputs_give_float32_terms(dtype):
    device_type = torch.device(DEVICE).type
    ref = structure_loss_out(features(torch.float32, DEVICE), scale(DEVICE, torch.float32))
    feats = features(dtype, DEVICE)
    with torch.autocast(device_type, dtype=dtype):
        out = structure_loss_out(feats, scale(DEVICE, torch.float32))
        total = sum(out.values())
    assert set(out) == set(ref) and len(out) == 10  # contrastive + 9 terms
    for k, v in out.items():
        if k == "contrastive_loss":  # open_clip's own loss follows autocast
            continue
        assert v.dtype == torch.float32, (k, v.dtype)
        assert torch.isfinite(v), k
        # the inputs were rounded to 8 (bf16) / 11 (fp16) mantissa bits, nothing else differs
        assert v.item() == pytest.approx(ref[k].item(), rel=5e-2, abs=2e-2), k
    grads = torch.autograd.grad(total, list(feats.values()))
    for k, gr in zip(feats, grads):
        assert gr.dtype == dtype and bool(torch.isfinite(gr).all()), k


def tiny_two_view_model():
    import open_clip

    from openclip_structure.views import heads
    from openclip_structure.integration.forward import install_forward
    from openclip_structure.main import register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("structure-tiny", output_dict=True)
    heads.attach_heads(model, "structure-tiny")
    install_forward(model)
    return model


def batch(model, n=6):
    g = torch.Generator().manual_seed(1)
    size = model.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    images = torch.randn(n, 2, 3, *size, generator=g)
    texts = torch.randint(1, model.vocab_size - 1, (n, model.context_length), generator=g)
    return images, texts


def test_two_view_forward_with_heads_matches_cpu_float64():
    model = tiny_two_view_model().double().eval()
    images, texts = batch(model)
    ref = model(images.double(), texts)
    other = copy.deepcopy(model).to(DEVICE)
    assert other.forward.__self__ is other  # the two-view forward is bound to the copy, not the original
    out = other(images.double().to(DEVICE), texts.to(DEVICE))
    keys = {k for k in ref if k.endswith("_features")}
    assert {"image_aug_features", "image_ind_features", "text_ind_features", "image_aug_ind_features"} <= keys
    for k in keys:
        assert out[k].device.type == torch.device(DEVICE).type, k
        torch.testing.assert_close(out[k].cpu(), ref[k], rtol=1e-8, atol=1e-10, msg=k)


def test_bf16_training_step_with_every_term_has_finite_gradients():
    model = tiny_two_view_model().to(DEVICE).train()
    images, texts = batch(model, n=8)
    loss = all_terms_loss()
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        out = model(images.to(DEVICE), texts.to(DEVICE))
        losses = loss(**out, output_dict=True)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    assert not bad, bad
    assert any(n.startswith("structure_heads") for n, _ in model.named_parameters())
