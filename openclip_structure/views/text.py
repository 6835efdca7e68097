"""The text view of ``--text-aug``, carried through open_clip's own train data pipeline.

* :class:`TwoCaptions` wraps the tokenizer of the TRAIN dataset only: each caption text becomes
  ``[2, L]`` tokens, the caption and its text view (:mod:`openclip_structure.data.captions`: with
  ``captions`` two captions of the sample with different texts, with ``eda`` an EDA copy).
* On open_clip main with ``--json-text-key 'a;b'`` and ``--text-aug captions``, the train dataset
  is built with open_clip's own plain-text reader pointed at the ``json`` member (``--text-key
  json`` for that one call), so the tokenizer sees the whole JSON and draws the caption with
  open_clip's own ``JsonCaptionExtractor`` (``--json-text-key-probs`` keep their meaning) and the
  view from the other keys. open_clip drops a sample whose keys are all empty; here it trains with
  an empty caption and is counted below.
* The train-data hook that builds the train dataset with it, and counts the samples without a
  different view: :mod:`openclip_structure.integration.loaders`.
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch

from ..data.captions import CaptionPair, EDAPair

__all__ = ["TEXT_VIEW_PAIRS", "TwoCaptions", "json_keys", "text_pair"]

TEXT_VIEW_PAIRS = {"eda": EDAPair, "captions": CaptionPair}


class TwoCaptions:
    """Tokenizer wrapper: ``[N, 2, L]`` tokens (caption, its text view) for N caption texts;
    ``pair(text) -> (caption, view)`` (:class:`EDAPair`, :class:`CaptionPair`)."""

    def __init__(self, tokenizer: Callable, pair: Callable[[str], Tuple[str, str]]):
        self.tokenizer, self.pair = tokenizer, pair

    def __call__(self, texts, *args, **kwargs) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        pairs = [self.pair(t) for t in texts]
        a = self.tokenizer([p[0] for p in pairs], *args, **kwargs)
        b = self.tokenizer([p[1] for p in pairs], *args, **kwargs)
        return torch.stack([a, b], dim=1)

    def __getattr__(self, name):
        if name in ("tokenizer", "pair"):
            raise AttributeError(name)
        return getattr(self.tokenizer, name)


def json_keys(args):
    """The ``--json-text-key`` fields that hold a sample's captions, when ``--text-aug captions`` draws
    the caption and its view from them (open_clip main); else None."""
    return getattr(args, "json_text_key", None) if getattr(args, "text_aug", None) == "captions" else None


def text_pair(args) -> Callable:
    """The ``(caption, view)`` pair of ``args.text_aug``; with ``--json-text-key`` on open_clip main,
    the captions are those JSON fields and open_clip's extractor picks the caption."""
    keys = json_keys(args)
    if keys:
        from open_clip_train.data import JsonCaptionExtractor  # open_clip main only (has --json-text-key)

        return CaptionPair(json_keys=keys,
                           json_caption=JsonCaptionExtractor(keys, sample_probs=getattr(args, "json_text_key_probs",
                                                                                        None)))
    return TEXT_VIEW_PAIRS[args.text_aug]()
