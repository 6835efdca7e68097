"""The two-view forward: the created model INSTANCE's ``forward`` replaced (open_clip's CLIP,
CustomTextCLIP and CoCa; no class is touched).

With 5-D images (or 3-D texts) it encodes both views in ONE image-tower forward of ``2B`` images
and returns open_clip's output dict plus batch-first ``image_aug_features``
(``text_aug_features``) and, when separation heads are attached, ``image_ind_features``,
``text_ind_features``, ``image_aug_ind_features`` (``text_aug_ind_features``) computed by the heads
from the SAME pooled backbone output that feeds the shared projection
(:func:`openclip_structure.views.towers.encode_pooled`: the towers run once). 4-D images
(evaluation, zero-shot) and 2-D texts go to the model's original forward unchanged.
``encode_image``/``encode_text``, ``logit_scale``, ``lock_*``, ``set_grad_checkpointing`` are
untouched. CoCa: the image tower runs once on ``2B`` images; the caption decoder sees the original
view only; an augmented caption costs one extra text-tower forward.
"""
from __future__ import annotations

import contextlib
import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..views.heads import HEADS_KEY
from ..views.towers import UnsupportedModelError, class_method, encode_pooled, projections

ORIG_FORWARD = "_structure_original_forward"


def _both_views(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.shape[1] != 2:
        raise ValueError(f"openclip-structure views: expected 2 {what} views in dim 1, got shape {tuple(x.shape)}")
    return torch.cat([x[:, 0], x[:, 1]], dim=0)  # [2B, ...]: originals first, then the augmented views


def _encode(model, x, modality: str, heads):
    """Unit features (and unit independent features when ``heads``) of a batch."""
    if heads is None:
        feats = class_method(model, "encode_image" if modality == "image" else "encode_text")(x)
        return F.normalize(feats, dim=-1), None
    feats, pooled = encode_pooled(model, x, modality)
    return F.normalize(feats, dim=-1), heads[modality](pooled)


def _clip_forward(self, image: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None):
    two_images = image is not None and image.dim() == 5
    two_texts = text is not None and text.dim() == 3
    if not (two_images or two_texts):
        return getattr(self, ORIG_FORWARD)(image, text)
    heads = getattr(self, HEADS_KEY, None)
    out, extra = {}, {}
    for modality, x, two in (("image", image, two_images), ("text", text, two_texts)):
        if x is None:
            out[f"{modality}_features"] = None
            continue
        b = x.shape[0]
        feats, ind = _encode(self, _both_views(x, modality) if two else x, modality, heads)
        out[f"{modality}_features"] = feats[:b]
        if two:
            extra[f"{modality}_aug_features"] = feats[b:]
        if ind is not None:
            extra[f"{modality}_ind_features"] = ind[:b]
            if two:
                extra[f"{modality}_aug_ind_features"] = ind[b:]
    out["logit_scale"] = self.logit_scale.exp()
    if getattr(self, "logit_bias", None) is not None:
        out["logit_bias"] = self.logit_bias
    out.update(extra)
    return out


def _tapped(model, heads, modality: str):
    """Record the pooled features of ``modality``'s tower while inside (a no-op without heads)."""
    if heads is None:
        return contextlib.nullcontext([])
    return projections(model)[modality].tapped()


def _coca_forward(self, image=None, text=None, image_latent=None, image_embs=None, **kwargs):
    two_images = image is not None and image.dim() == 5 and image_latent is None
    two_texts = text is not None and text.dim() == 3
    orig = getattr(self, ORIG_FORWARD)
    if not (two_images or two_texts):
        return orig(image, text, image_latent=image_latent, image_embs=image_embs, **kwargs)
    heads = getattr(self, HEADS_KEY, None)
    extra = {}
    if two_images:
        b = image.shape[0]
        with _tapped(self, heads, "image") as seen:
            latent, embs = self._encode_image(_both_views(image, "image"))  # ONE image-tower forward of 2B
        image_latent, image_embs = latent[:b], embs[:b]
        extra["image_aug_features"] = latent[b:]
        if heads is not None:
            ind = heads["image"](seen[0])
            extra["image_ind_features"], extra["image_aug_ind_features"] = ind[:b], ind[b:]
        image = None
    if two_texts:
        with _tapped(self, heads, "text") as seen:
            extra["text_aug_features"] = self.encode_text(text[:, 1])  # one extra text-tower forward
        if heads is not None:
            extra["text_aug_ind_features"] = heads["text"](seen[0])
        text = text[:, 0]
    with _tapped(self, heads, "image") as seen_image, _tapped(self, heads, "text") as seen_text:
        out = orig(image, text, image_latent=image_latent, image_embs=image_embs, **kwargs)
    if heads is not None:  # the towers CoCa's own forward ran (the caption decoder sees the same outputs)
        if seen_image:
            extra["image_ind_features"] = heads["image"](seen_image[0])
        if seen_text:
            extra["text_ind_features"] = heads["text"](seen_text[0])
    out.update(extra)
    return out


def install_forward(model: nn.Module) -> nn.Module:
    """Replace ``model.forward`` (this instance only) by the two-view forward; idempotent."""
    if getattr(model, ORIG_FORWARD, None) is not None:
        return model
    from open_clip.coca_model import CoCa
    from open_clip.model import CLIP, CustomTextCLIP

    if isinstance(model, CoCa):
        fn = _coca_forward
    elif isinstance(model, (CLIP, CustomTextCLIP)):
        fn = _clip_forward
    else:
        raise UnsupportedModelError(
            f"openclip-structure: the two-view regularizers support open_clip's CLIP, CustomTextCLIP and "
            f"CoCa models, not {type(model).__module__}.{type(model).__qualname__}")
    object.__setattr__(model, ORIG_FORWARD, model.forward)
    object.__setattr__(model, "forward", types.MethodType(fn, model))
    return model
