"""Data hook: with ``--text-aug``, the TRAIN dataset tokenizes two captions per sample
(:class:`openclip_structure.views.text.TwoCaptions`); the two image views come from the train
preprocess that the model hook returns.

* On open_clip main with ``--json-text-key 'a;b'`` and ``--text-aug captions``, the train dataset
  is built with open_clip's own plain-text reader pointed at the ``json`` member (``--text-key
  json`` for that one call), so the tokenizer sees the whole JSON and draws the caption with
  open_clip's own ``JsonCaptionExtractor`` (``--json-text-key-probs`` keep their meaning) and the
  view from the other keys. open_clip drops a sample whose keys are all empty; here it trains with
  an empty caption and is counted below.
* The train loader counts, in the main process, the samples whose view tokens equal the caption
  tokens (no different view: a single caption whose EDA copy is unchanged, e.g. one word;
  duplicate lines; no caption) and says so once, with the count, at the end of the first epoch.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from .. import registry
from ..views.text import TwoCaptions, json_keys as caption_json_keys, text_pair
from . import state


class ViewCountingLoader:
    """The train dataloader, counting (main process) the samples whose text-view tokens equal the
    caption's; at the end of the first epoch logs the count once. Every attribute is the loader's."""

    def __init__(self, loader, text_aug: str, where: str = ""):
        self.loader, self.text_aug, self.where = loader, text_aug, where
        self.seen = self.same = 0
        self.reported = False

    def __getattr__(self, name):
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __len__(self):
        return len(self.loader)

    def count(self, batch) -> None:
        texts = batch.get("text") if isinstance(batch, dict) else (batch[1] if len(batch) > 1 else None)
        if torch.is_tensor(texts) and texts.dim() == 3 and texts.shape[1] == 2:
            self.seen += texts.shape[0]
            self.same += int((texts[:, 0] == texts[:, 1]).all(dim=-1).sum())

    def __iter__(self):
        for batch in self.loader:
            if not self.reported:
                self.count(batch)
            yield batch
        self.report()

    def report(self) -> None:
        if self.reported or not self.seen:
            return
        self.reported = True
        what = f"--text-aug {self.text_aug}: {self.same} of {self.seen} training samples{self.where} in the first epoch"
        if self.same:
            logging.warning(f"openclip-structure: {what} had no text view different from the caption (a single "
                            "caption whose EDA copy is unchanged, e.g. one word; only duplicate caption lines or "
                            "JSON fields; no caption): for them the text view equals the caption")
        else:
            logging.info(f"openclip-structure: {what}: every text view differs from its caption")


def wrap_get_data(get_data: Callable, get_args: Callable = state.current_args) -> Callable:
    """open_clip_train's ``get_data`` whose TRAIN dataset tokenizes two captions per sample when
    ``--text-aug`` is on; validation and ImageNet data keep the plain tokenizer. ``get_args()``: the
    args of the run the hook serves (default: the current run's)."""

    def get_data_with_text_views(args, preprocess_fns, epoch=0, tokenizer=None, **kwargs):
        ours = get_args()
        if ours is None or args is not ours or not registry.text_views_enabled(args) or tokenizer is None:
            return get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer, **kwargs)
        eval_keys = ("val_data", "imagenet_val", "imagenet_v2")
        pair, json_keys = text_pair(args), caption_json_keys(args)
        text_keys = ("json_text_key", "text_key") if json_keys else ()
        saved = {k: getattr(args, k, None) for k in eval_keys + text_keys + ("train_data", "dataset_type")}
        try:
            for k in eval_keys:
                setattr(args, k, None)
            if json_keys:  # open_clip's plain-text reader hands the whole JSON to the tokenizer
                args.json_text_key, args.text_key = None, "json"
            data = get_data(args, preprocess_fns, epoch=epoch, tokenizer=TwoCaptions(tokenizer, pair), **kwargs)
            for k in eval_keys + text_keys:
                setattr(args, k, saved[k])
            if any(saved[k] for k in eval_keys):
                args.train_data = None
                if args.dataset_type == "synthetic":
                    args.dataset_type = "auto"
                data.update(get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer, **kwargs))
        finally:
            for k, v in saved.items():
                setattr(args, k, v)
        train = data.get("train")
        if train is not None and hasattr(train, "dataloader"):
            where = f" on rank {args.rank}" if getattr(args, "world_size", 1) > 1 else ""
            train.dataloader = ViewCountingLoader(train.dataloader, args.text_aug, where)
        return data

    return get_data_with_text_views

