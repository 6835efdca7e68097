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
* The two-view forward (:mod:`openclip_structure.integration.forward`) replaces the ``forward`` of the created model INSTANCE. With 5-D images
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

from typing import Callable

import torch
from torchvision import transforms as T

from .. import registry


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
