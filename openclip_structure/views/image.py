"""Two views per training sample, carried through open_clip's own data pipelines and model call.

The two-view regularizers (L_gc^a, the Brownian bridge, deep feature separation, CyCLIP's in-modal
terms) need the embedding of an augmented view of each image (and, optionally, of each caption).

* :class:`TwoViews` wraps open_clip's train preprocess: ``img -> torch.stack([base(img), aug(img)])``
  (``[2, C, H, W]``), so open_clip's csv/webdataset/synthetic datasets and their collation carry
  both views as a ``[B, 2, C, H, W]`` batch, with no change to open_clip.
* :class:`TwoCaptions` wraps the tokenizer of the TRAIN dataset only (``--text-aug captions|eda``):
  each caption text becomes ``[2, L]`` tokens, the caption and its text view: with ``captions``
  two different lines of a multi-caption sample (:class:`CaptionPair`), with ``eda`` the caption
  and an EDA-style perturbed copy (:class:`EDAPair`).
* :func:`install_forward` replaces the ``forward`` of the created model INSTANCE. With 5-D images
  (or 3-D texts) it encodes both views in ONE image-tower forward of ``2B`` images and returns
  open_clip's output dict plus batch-first ``image_aug_features`` (``text_aug_features``) and, when
  separation heads are attached, ``image_ind_features``, ``text_ind_features``,
  ``image_aug_ind_features`` (``text_aug_ind_features``) computed by the heads from the SAME pooled
  backbone output that feeds the shared projection (the projection is detached for the tower call
  and applied by hand, so the towers run once). 4-D images (evaluation, zero-shot) and 2-D texts go
  to the model's original forward unchanged. ``encode_image``/``encode_text``, ``logit_scale``,
  ``lock_*``, ``set_grad_checkpointing`` are untouched.

Supported models for views: ``open_clip.model.CLIP`` (any image tower), ``CustomTextCLIP`` (via
``encode_image``/``encode_text``) and ``CoCa`` (the image tower runs once on ``2B`` images; the
caption decoder sees the original view only; an augmented caption costs one extra text-tower
forward).
"""
from __future__ import annotations

import contextlib
import logging
import types
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms as T

from .. import registry
from . import towers
from .heads import HEADS_KEY, UnsupportedModelError, attach_heads

ORIG_FORWARD = "_structure_original_forward"


# ---- data side ---------------------------------------------------------------------------------

class _ToRGB:
    def __call__(self, img):
        return img.convert("RGB") if hasattr(img, "convert") and getattr(img, "mode", "RGB") != "RGB" else img


def _find(transform, cls):
    """First transform of type ``cls`` inside (nested) Compose objects."""
    if isinstance(transform, cls):
        return transform
    for t in getattr(transform, "transforms", None) or []:
        found = _find(t, cls)
        if found is not None:
            return found
    return None


def augmented_view_transform(base, kind: str = "crop", image_size=None):
    """The second-view transform, ending in ``base``'s own ``Normalize``.

    ``crop``: RandomResizedCrop(image_size, scale=(0.5, 1), bicubic) + RandomHorizontalFlip;
    ``autoaugment``: Resize + CenterCrop to image_size, then torchvision AutoAugment (ImageNet
    policy). The size is that of ``base``'s RandomResizedCrop, else ``image_size``.
    """
    normalize = _find(base, T.Normalize)
    if normalize is None:
        raise ValueError(f"openclip-structure views: cannot find the Normalize step in the train transform {base!r}")
    crop = _find(base, T.RandomResizedCrop)
    if crop is not None:
        image_size = crop.size
    if image_size is None:
        raise ValueError("openclip-structure views: give image_size (no RandomResizedCrop in the train transform)")
    bicubic = T.InterpolationMode.BICUBIC
    if kind == "crop":
        geo = [T.RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=bicubic), T.RandomHorizontalFlip()]
    elif kind == "autoaugment":
        geo = [T.Resize(image_size, interpolation=bicubic), T.CenterCrop(image_size),
               T.AutoAugment(T.AutoAugmentPolicy.IMAGENET)]
    else:
        raise ValueError(f"openclip-structure views: unknown view augmentation {kind!r} (choose from {registry.VIEW_AUGS})")
    return T.Compose([_ToRGB()] + geo + [T.ToTensor(), T.Normalize(normalize.mean, normalize.std)])


class TwoViews:
    """Train preprocess returning ``torch.stack([base(img), aug(img)])``, shape ``[2, C, H, W]``."""

    def __init__(self, base: Callable, aug: Callable):
        self.base, self.aug = base, aug

    def __call__(self, img) -> torch.Tensor:
        return torch.stack([self.base(img), self.aug(img)])

    @property
    def transforms(self):
        """The base transform's steps: open_clip's synthetic dataset reads its image size from
        ``preprocess.transforms[0].size``."""
        return self.base.transforms

    def __repr__(self) -> str:
        return f"TwoViews(\n  base={self.base!r},\n  aug={self.aug!r})"


# The text view (--text-aug): the caption pairs live in openclip_structure.data.captions, the tokenizer
# wrapper and the train-data hook in openclip_structure.views.text; re-exported here.
from ..data.captions import EDA, CaptionPair, EDAPair, split_captions  # noqa: E402,F401
from .text import TEXT_VIEW_PAIRS, TwoCaptions, wrap_get_data  # noqa: E402,F401


# ---- model side --------------------------------------------------------------------------------

def _both_views(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.shape[1] != 2:
        raise ValueError(f"openclip-structure views: expected 2 {what} views in dim 1, got shape {tuple(x.shape)}")
    return torch.cat([x[:, 0], x[:, 1]], dim=0)  # [2B, ...]: originals first, then the augmented views


def _class_method(model, name: str):
    """``model.<name>`` as the class defines it: an FSDP2 forward method registered on the instance
    (open_clip main's ``--fsdp`` registers ``encode_image``/``encode_text``) would reshard the root's
    parameters in the middle of the model's forward."""
    return getattr(type(model), name).__get__(model)


def encode_pooled(model, x: torch.Tensor, modality: str):
    """(the tower's embedding, the pooled features its final projection reads) from ONE tower forward,
    on every tower family (:mod:`openclip_structure.views.towers`)."""
    fn = _class_method(model, "encode_image" if modality == "image" else "encode_text")
    return towers.projections(model)[modality].encode(fn, x)


def _encode(model, x, modality: str, heads):
    """Unit features (and unit independent features when ``heads``) of a batch."""
    if heads is None:
        feats = _class_method(model, "encode_image" if modality == "image" else "encode_text")(x)
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
    return towers.projections(model)[modality].tapped()


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


def prepare_model(args, model_name: str, model: nn.Module, preprocess_train):
    """What the launcher does to the freshly created training model: attach separation heads,
    install the two-view forward, wrap the train preprocess. Returns ``(preprocess_train, heads)``."""
    heads = None
    if registry.separation_enabled(args):
        heads = attach_heads(model, model_name)
    if registry.views_enabled(args):
        install_forward(model)
        image_size = getattr(getattr(model, "visual", None), "image_size", None)
        aug = augmented_view_transform(preprocess_train, args.view_aug, image_size=image_size)
        preprocess_train = TwoViews(preprocess_train, aug)
        if getattr(args, "rank", 0) == 0:
            logging.info(f"openclip-structure: two views per sample (--view-aug {args.view_aug}, "
                         f"--text-aug {args.text_aug}); separation heads: {'on' if heads is not None else 'off'}")
    return preprocess_train, heads
