"""``create_loss(args)``: open_clip's own loss plus the enabled regularizer terms.

The base loss is whatever open_clip would pick (ClipLoss, SigLipLoss with ``--siglip``, CoCaLoss
for CoCa models, DistillClipLoss with distillation). Each enabled term is added as its own
``{name}_loss`` entry of the returned dict, so open_clip sums it into the total and logs it as
``train/{name}_loss``. With every plugin flag at its default, ``create_loss`` returns open_clip's
loss object itself: an exact no-op.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .losses.runtime import FeatureBatch, distributed_context, reduce_statistics, scale_grad
from . import registry
from .losses import RegularizerTerm
from .registry import regularizers_enabled
from .scaling import base_gradient_scale
from .schedule import GAP_RAMP_KNOTS, PROGRESS, PiecewiseLinear, TrainingProgress, constant

#: keys of open_clip's model output that hold the two modalities' embeddings
FEATURE_KEYS = {"image": "image_features", "text": "text_features"}
#: every other ``<key>_features`` tensor of the model output (except ``dist_*``) is passed to the
#: terms as ``<key>`` (``image_aug_features`` -> ``image_aug``); without text augmentation the
#: augmented text IS the text:
FEATURE_ALIASES = {"text_aug": "text", "text_aug_ind": "text_ind"}


class MissingFeaturesError(ValueError):
    """A term needs embeddings (augmented views, independent features) the model did not return."""


def extra_feature_keys(model_out: Dict[str, object]) -> Dict[str, torch.Tensor]:
    """``{"image_aug": ..., "text_ind": ...}`` from extra ``*_features`` model-output tensors."""
    return {k[:-len("_features")]: v for k, v in model_out.items()
            if k.endswith("_features") and not k.startswith("dist_") and k not in FEATURE_KEYS.values()
            and isinstance(v, torch.Tensor)}


def term_inputs(features: Dict[str, torch.Tensor], terms) -> Dict[str, torch.Tensor]:
    """The embeddings the given terms read, with :data:`FEATURE_ALIASES` applied; raises
    :class:`MissingFeaturesError` naming the terms and the model-output keys they lack."""
    out, missing = {}, {}
    for term in terms:
        for key in term.keys:
            if key in out:
                continue
            if features.get(key) is not None:
                out[key] = features[key]
            elif key in FEATURE_ALIASES and features.get(FEATURE_ALIASES[key]) is not None:
                out[key] = features[FEATURE_ALIASES[key]]
            else:
                missing.setdefault(f"{key}_features", []).append(term.name)
    if missing:
        need = "; ".join(f"{k} (for {', '.join(dict.fromkeys(v))})" for k, v in missing.items())
        raise MissingFeaturesError(
            f"openclip-structure: the model output lacks {need}. Augmented views come from the launcher's "
            f"two-view train preprocess and model-forward wrapper, *_ind_features from the separation heads "
            f"it attaches with --sep-weight: train with `python -m openclip_structure.main ...` (or "
            f"torchrun -m openclip_structure.main), not `open_clip_train.main`.")
    return out


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN/inf; the message names the term, the step and the bad inputs."""


def build_terms(args) -> List[Tuple[RegularizerTerm, PiecewiseLinear]]:
    """The enabled regularizer terms with their weight schedules, from parsed flags (one entry of
    :data:`openclip_structure.registry.TERMS` per weight flag; all of a method's terms share its weight)."""
    terms: List[Tuple[RegularizerTerm, PiecewiseLinear]] = []
    for spec in registry.enabled(args):
        w = spec.weight(args)
        ramp = spec.gap_schedule and getattr(args, "gap_schedule", "constant") == "ramp"
        for term in spec.build(args):
            terms.append((term, PiecewiseLinear(w, GAP_RAMP_KNOTS[term.name]) if ramp else constant(w)))
    return terms


def skipped_halves(terms) -> List[str]:
    """Startup notes on the text halves the built ``terms`` leave out (no second caption)."""
    names = [t.name for t in terms if getattr(t, "text", None) is False]
    if not names:
        return []
    return [f"--text-aug none: the text halves of {' and '.join(names)} are skipped (a caption contrasted "
            f"with itself gives no invariance signal, it only pushes captions apart); those terms are "
            f"their image halves alone. Use --text-aug captions (several captions per sample) or "
            f"--text-aug eda for the text halves."]


class StructureLoss(nn.Module):
    """open_clip base loss + weighted regularizer terms, one ``{name}_loss`` entry per term.

    Called exactly like open_clip's losses (``loss(**model_out, output_dict=True)``). The terms
    run in float32 outside autocast, share one gather and one all-reduce per call (see
    :mod:`openclip_structure.losses.runtime`), and are exact under DDP/FSDP and ``--accum-freq``.
    Besides ``image_features``/``text_features`` the terms read every other ``<key>_features``
    tensor of the model output (not ``dist_*``) as ``<key>`` (``image_aug``, ``text_ind``, ...; see
    :mod:`openclip_structure.views.image`), with ``text_aug`` = ``text`` when the text is not augmented,
    and the step's ``logit_scale`` (``inmodal``).
    """

    def __init__(
        self,
        base: nn.Module,
        terms: List[Tuple[RegularizerTerm, PiecewiseLinear]],
        rank: int = 0,
        world_size: int = 1,
        progress: TrainingProgress = PROGRESS,
        nonfinite: str = "raise",
        fixed_logit_scale: Optional[float] = None,
        grad_scale: float = 1.0,
        logit_grad_scale: float = 1.0,
    ):
        super().__init__()
        self.base = base
        #: factors on the terms' gradients into the embeddings and into the logit scale (values are
        #: untouched): the base loss's own gradient scales on this number of processes
        #: (:func:`openclip_structure.scaling.base_gradient_scale`)
        self.grad_scale, self.logit_grad_scale = float(grad_scale), float(logit_grad_scale)
        self.terms = nn.ModuleList([t for t, _ in terms])
        self.schedules = [s for _, s in terms]
        self.rank, self.world_size = rank, world_size
        self.progress = progress
        self.nonfinite = nonfinite
        self.fixed_logit_scale = fixed_logit_scale
        #: model-output name of each modality's embeddings, for messages (CLAPTask: image -> audio_features)
        self.input_names = dict(FEATURE_KEYS)
        params = inspect.signature(base.forward).parameters
        self._base_accepts_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
        self._base_params = set(params)

    def weights(self) -> Dict[str, float]:
        """Current weight of each term (after its schedule)."""
        f = self.progress.fraction
        return {t.name: s(f) for t, s in zip(self.terms, self.schedules)}

    def forward(self, image_features, text_features, logit_scale, output_dict: bool = False, **kwargs):
        if self.fixed_logit_scale is not None:
            logit_scale = torch.full_like(logit_scale, self.fixed_logit_scale)
        inputs = dict(image_features=image_features, text_features=text_features,
                      logit_scale=logit_scale, **kwargs)
        base_inputs = {k: v for k, v in inputs.items()
                       if self._base_accepts_any or k in self._base_params}
        out = self.base(**base_inputs, output_dict=True)
        if not isinstance(out, dict):  # a custom base loss returning a tensor
            out = {"contrastive_loss": out}
        out = dict(out)
        features = {m: inputs[k] for m, k in FEATURE_KEYS.items()}
        features.update(extra_feature_keys(kwargs))
        out.update(self.regularizer_losses(features, logit_scale=logit_scale))
        if self.nonfinite != "off" and not self._check_finite(out, features):
            out = self._skipped(out, features, logit_scale)
        return out if output_dict else sum(out.values())

    def regularizer_losses(self, features: Dict[str, torch.Tensor],
                           logit_scale: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """``{name}_loss`` of every term (weighted), computed in float32 (float64 inputs stay
        float64) on the gathered batch. ``features`` maps FeatureBatch keys ("image", "text",
        "image_aug", "text_ind", ...) to local ``[B, D]`` embeddings; ``logit_scale`` (the CLIP
        logit scale) is passed on for terms that share its temperature (``inmodal``)."""
        if len(self.terms) == 0:
            return {}
        ref = next(iter(features.values()))
        weights = self.weights()
        active = [t for t in self.terms if weights[t.name] != 0.0]
        used = term_inputs(features, self.terms)
        shapes = {k: tuple(v.shape) for k, v in used.items()}
        if len(set(shapes.values())) != 1:
            raise ValueError(f"openclip-structure: embeddings must have the same [batch, dim] shape, got {shapes}")
        losses = {f"{t.name}_loss": ref.new_zeros((), dtype=torch.float32) for t in self.terms}
        if not active:
            return losses
        autocast_off = (torch.autocast(ref.device.type, enabled=False)
                        if ref.device.type in ("cuda", "cpu", "xpu") else contextlib.nullcontext())
        with autocast_off:
            converted: Dict[int, torch.Tensor] = {}  # keep aliases (text_aug is text) the same tensor
            for v in used.values():
                if id(v) not in converted:
                    converted[id(v)] = scale_grad(_at_least_float32(v), self.grad_scale)
            local = {k: converted[id(v)] for k, v in used.items()}
            scale = None if logit_scale is None else \
                scale_grad(_at_least_float32(torch.as_tensor(logit_scale)), self.logit_grad_scale)
            batch = FeatureBatch(local, self.rank, self.world_size, logit_scale=scale)
            stats = reduce_statistics([t.statistics(batch) for t in active], self.world_size)
            for term, s in zip(active, stats):
                losses[f"{term.name}_loss"] = weights[term.name] * term.finalize(s)
        return losses

    def _check_finite(self, out: Dict[str, torch.Tensor], features: Dict[str, torch.Tensor]) -> bool:
        """True when every loss value is finite; else raise, or log (warn/skip) and return False."""
        values = torch.stack([v.detach().float().reshape(()) for v in out.values()])
        if bool(torch.isfinite(values).all()):
            return True
        bad = [k for k, v in out.items() if not bool(torch.isfinite(v.detach()).all())]
        inputs = [f"{self.input_names.get(k, k + '_features')} has {int((~torch.isfinite(v.detach())).sum())} non-finite values"
                  for k, v in features.items() if not bool(torch.isfinite(v.detach()).all())]
        msg = (f"openclip-structure: non-finite loss term(s) {', '.join(bad)} at step {self.progress.step} "
               f"(rank {self.rank}); " + ("; ".join(inputs) if inputs else "the input embeddings are finite")
               + ". Use --structure-nonfinite skip (or warn) to continue anyway.")
        if self.nonfinite == "raise":
            raise NonFiniteLossError(msg)
        logging.warning(msg + (" Skipping this step: every loss term is set to 0 with zero gradients."
                               if self.nonfinite == "skip" else ""))
        return self.nonfinite != "skip"

    @staticmethod
    def _skipped(out, features, logit_scale) -> Dict[str, torch.Tensor]:
        """Same keys, value 0 and exactly zero gradients, still connected to every embedding (and
        so to every parameter that produced them: DDP needs each one used in each step). The term
        graphs are not backpropagated, so a NaN inside them cannot leak into the gradients."""
        parts = list(features.values()) + [torch.as_tensor(logit_scale)]
        anchor = sum(v.float().sum() * 0.0 for v in parts if bool(torch.isfinite(v).all()))
        return {k: anchor.clone() for k in out}


def create_loss(args, base_factory: Optional[Callable] = None, progress: TrainingProgress = PROGRESS) -> nn.Module:
    """open_clip's ``create_loss(args)`` plus the regularizers enabled in ``args``.

    ``base_factory`` defaults to ``open_clip.create_loss``. Returns the base loss unchanged when
    no plugin flag is set.
    """
    if base_factory is None:
        from open_clip import create_loss as base_factory
    base = base_factory(args)
    fixed_t = getattr(args, "fixed_temperature", None)
    if not regularizers_enabled(args) and fixed_t is None:
        return base
    rank, world_size = distributed_context(args)
    scale = base_gradient_scale(base, world_size)
    loss = StructureLoss(
        base, build_terms(args), rank=rank, world_size=world_size, progress=progress,
        nonfinite=args.structure_nonfinite,
        fixed_logit_scale=None if fixed_t is None else 1.0 / fixed_t,
        grad_scale=scale.factor, logit_grad_scale=scale.logit_scale,
    )
    if rank == 0:
        logging.info(f"openclip-structure loss: base {type(base).__name__}, terms {loss.weights()}, "
                     f"regularizer gradient scale {scale.factor:g} ({scale.reason})")
        if not scale.exact and len(loss.terms):
            logging.warning(f"openclip-structure: {scale.reason}.")
        for note in skipped_halves(loss.terms):
            logging.info(f"openclip-structure: {note}")
    return loss
