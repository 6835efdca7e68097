"""The contract every regularizer term follows (no open_clip imports here).

A term is split into two steps so that all terms of a step share one gather and one
all-reduce (see :mod:`openclip_structure.losses.runtime`):

* ``statistics(batch)``: a 1-D float32 tensor of sums over the LOCAL rows of ``batch``
  (each row compared with the gathered columns where the term needs pairs);
* ``finalize(stats)``: the scalar loss from the GLOBAL sums.

``term(features)`` on plain tensors runs both steps on one process: this is the pure,
single-device form used in tests and by users outside open_clip.
"""
from __future__ import annotations

from typing import Mapping, Sequence, Tuple

import torch
from torch import nn

from .runtime import FeatureBatch
from ._fused import exp_kernel_sum


def pair_kernel_sums(rows: torch.Tensor, cols: torch.Tensor, diag: torch.Tensor, t: float,
                     symmetric: bool = False) -> torch.Tensor:
    """sum_{i local} sum_{j != i} exp(-t ||x_i - x_j||^2) for unit-norm rows/cols.

    Uses ||x_i - x_j||^2 = 2 - 2 <x_i, x_j>, i.e. ``exp(2t <x_i, x_j> - 2t)`` straight from one
    fused ``addmm``; ``diag[i]`` is the column index of row i's own sample, whose term is removed.
    ``symmetric=True`` when ``rows`` are the local part of the SAME samples as ``cols``: the kernel
    is symmetric, so the rows get the full (doubled) gradient and none flows into ``cols`` (see
    :mod:`._fused`). Memory: one ``B_local x B_global`` matrix, none more in backward.
    """
    return exp_kernel_sum(rows, cols, diag, 2.0 * t, -2.0 * t, symmetric=symmetric)


class RegularizerTerm(nn.Module):
    """Base class: a named loss term computed from sums over local rows (see module doc)."""

    #: key of the term; the composite loss logs it as ``{name}_loss``
    name: str = "term"
    #: feature keys (``FeatureBatch`` modalities) the term reads
    keys: Tuple[str, ...] = ("image", "text")

    def statistics(self, batch: FeatureBatch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def finalize(self, stats: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, features: Mapping[str, torch.Tensor] | Sequence[torch.Tensor], **batch_kwargs) -> torch.Tensor:
        """Single-process value: ``features`` maps keys to ``[N, D]`` tensors (or is a list in
        the order of ``self.keys``); ``batch_kwargs`` go to the FeatureBatch (``logit_scale``)."""
        if not isinstance(features, Mapping):
            features = list(features)
            if len(features) != len(self.keys):
                raise ValueError(f"{self.name}: expected {len(self.keys)} embedding tensors "
                                 f"({', '.join(self.keys)}), got {len(features)}")
            features = dict(zip(self.keys, features))
        missing = [k for k in self.keys if k not in features]
        if missing:
            raise ValueError(f"{self.name}: missing embeddings {missing}")
        batch = FeatureBatch({k: features[k] for k in self.keys}, **batch_kwargs)
        return self.finalize(self.statistics(batch))


def row_count(batch: FeatureBatch, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(float(batch.n_local), dtype=like.dtype, device=like.device)
