"""Data hook: with ``--text-aug``, the TRAIN dataset tokenizes two captions per sample
(:func:`openclip_structure.views.text.wrap_get_data`); the two image views come from the train
preprocess that the model hook returns."""
from __future__ import annotations

from ..views import image as views
from . import state


def wrap_get_data(get_data):
    return views.wrap_get_data(get_data, state.current_args)
