"""Where each open_clip tower's final projection reads its pooled features.

Deep feature separation (Jiang et al., CVPR 2023, arXiv 2303.05952, Sec. 3.2) gives each tower an
independent head beside the shared projection: both must read the SAME pooled backbone features.
Every open_clip tower family ends in a projection, but each holds it differently:

==============================  ==========================================  ======================
tower                           the final projection (what the head reads)  stood in for by
==============================  ==========================================  ======================
VisionTransformer (ViT, CoCa)   ``visual.proj`` (``pooled @ proj``)          None
built-in text (``CLIP``)        ``text_projection`` in ``CLIP.encode_text``  None
TextTransformer (custom text,   ``text.text_projection``                     None
CoCa; Modern text on main)
ModifiedResNet (RN50 ...)       ``visual.attnpool.c_proj`` (the attention    an identity linear map
                                pool's output before ``c_proj``)
TimmModel                       ``visual.head.proj`` / ``head.mlp`` /         ``nn.Identity``
                                ``head.pool.proj`` (custom attention pool
                                without proj), else the trunk's classifier
HFTextEncoder                   ``text.proj`` (Linear or MLP)                ``nn.Identity``
==============================  ==========================================  ======================

One mechanism reads them all (:meth:`Projection.tapped`): for the duration of a call the
projection is swapped for its identity, so the tower computes its pooled output, and a forward
hook on the tower module records that output and applies the real projection to it, so that the
tower's callers (the two-view forward, CoCa's own forward, its caption decoder) see exactly the
output they always see, and the tower runs once. ``CLIP``'s built-in text tower is no module (its
projection is applied inside ``CLIP.encode_text``): there the caller applies it
(:meth:`Projection.encode`). A tower whose projection is an identity (timm ``proj 'none'``, an HF
tower with ``d_model == embed_dim``, ``proj_type 'none'``) has no projection: its head reads the
tower's output, which is its pooled output (said once, :func:`describe`).
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..errors import FlagError

MODALITIES = ("image", "text")


class UnsupportedModelError(FlagError):
    """The model's towers cannot carry what the requested regularizer needs."""


def class_name(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


class _IdentityLinear(nn.Module):
    """Stands in for ``ModifiedResNet``'s ``attnpool.c_proj``: open_clip 3.x hands ``c_proj.weight`` and
    ``.bias`` to ``F.multi_head_attention_forward``, open_clip main calls ``c_proj(x)``; an identity
    weight and a zero bias make both return the attention pool's output before ``c_proj``."""

    def __init__(self, like: nn.Linear):
        super().__init__()
        n = like.in_features
        self.weight = torch.eye(n, dtype=like.weight.dtype, device=like.weight.device)
        self.bias = torch.zeros(n, dtype=like.weight.dtype, device=like.weight.device)

    def forward(self, x):
        return x


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _with_first(out, value):
    if isinstance(out, (tuple, list)):
        return type(out)((value,) + tuple(out[1:]))
    return value


def _linears(module: nn.Module) -> List[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def _is_identity(proj) -> bool:
    return proj is None or isinstance(proj, nn.Identity)


def _in_width(proj) -> Optional[int]:
    if isinstance(proj, torch.Tensor):
        return int(proj.shape[0])
    lin = _linears(proj) if isinstance(proj, nn.Module) else []
    return int(lin[0].in_features) if lin else None


def _out_width(proj) -> Optional[int]:
    if isinstance(proj, torch.Tensor):
        return int(proj.shape[1])
    lin = _linears(proj) if isinstance(proj, nn.Module) else []
    return int(lin[-1].out_features) if lin else None


def apply(proj, pooled: torch.Tensor) -> torch.Tensor:
    """The projection ``proj`` (a ``width x embed`` parameter or a module) applied to ``pooled``."""
    if proj is None:
        return pooled
    return proj(pooled) if isinstance(proj, nn.Module) else pooled @ proj


@dataclass
class Projection:
    """One tower's final projection: ``getattr(owner, attr)``, applied to the pooled output of
    ``tower`` (None: applied inside ``CLIP.encode_text``; the caller applies it)."""

    modality: str
    tower: Optional[nn.Module]
    owner: nn.Module
    attr: str
    path: str                      # where it is, for messages: "visual.attnpool.c_proj"
    stand_in: Callable[[object], object] = field(repr=False, default=lambda proj: None)
    output_width: Optional[int] = None  # the tower's output width where it has no projection, if it differs

    @property
    def module(self):
        return getattr(self.owner, self.attr)

    @property
    def identity(self) -> bool:
        """The tower has no projection: its output is its pooled output."""
        return _is_identity(self.module)

    @property
    def width(self) -> Optional[int]:
        """Width of the pooled features the projection reads (None for an identity)."""
        return None if self.identity else _in_width(self.module)

    @property
    def out_width(self) -> Optional[int]:
        return None if self.identity else _out_width(self.module)

    @contextlib.contextmanager
    def tapped(self) -> Iterator[List[torch.Tensor]]:
        """While inside, every forward of ``tower`` appends its pooled output to the yielded list and
        returns what it always returns (the projection applied by hand to that pooled output)."""
        seen: List[torch.Tensor] = []
        proj = self.module
        if self.identity:
            if self.tower is None:  # nothing to swap or record: encode() reads the call's output
                yield seen
                return
            handle = self.tower.register_forward_hook(lambda m, a, out: seen.append(_first(out)))
            try:
                yield seen
            finally:
                handle.remove()
            return

        def project(module, args, out):
            pooled = _first(out)
            seen.append(pooled)
            return _with_first(out, apply(proj, pooled))

        setattr(self.owner, self.attr, self.stand_in(proj))
        handle = self.tower.register_forward_hook(project) if self.tower is not None else None
        try:
            yield seen
        finally:
            if handle is not None:
                handle.remove()
            setattr(self.owner, self.attr, proj)

    def encode(self, fn: Callable, x) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(fn(x), pooled)`` for the tower call ``fn`` (e.g. the model's ``encode_image``), from one
        forward of the tower."""
        proj = self.module
        with self.tapped() as seen:
            out = fn(x)
        if self.tower is None:  # CLIP's built-in text: fn returned the pooled output
            pooled = _first(out)
            return _with_first(out, apply(None if self.identity else proj, pooled)), pooled
        if len(seen) != 1:
            raise RuntimeError(f"openclip-structure: expected one forward of the {self.modality} tower "
                               f"({class_name(self.tower)}) per call, saw {len(seen)}")
        return out, seen[0]


# ---- finding a model's projections ------------------------------------------------------------------

def _attr_path(root: nn.Module, target: nn.Module) -> Optional[Tuple[nn.Module, str, str]]:
    """``(parent, attribute, dotted path)`` of the submodule ``target`` inside ``root``."""
    for name, module in root.named_modules():
        if module is target and name:
            parent_name, _, attr = name.rpartition(".")
            return root.get_submodule(parent_name) if parent_name else root, attr, name
    return None


def _none(proj):
    return None


def _identity_module(proj):
    return nn.Identity()


def _timm_projection(visual: nn.Module) -> Tuple[nn.Module, str, str, Optional[int]]:
    head = getattr(visual, "head", None)
    for name in ("proj", "mlp"):
        if head is not None and isinstance(getattr(head, name, None), nn.Module):
            return head, name, f"visual.head.{name}", None
    pool = getattr(head, "pool", None) if head is not None else None
    if pool is not None and isinstance(getattr(pool, "proj", None), nn.Module):
        return pool, "proj", "visual.head.pool.proj", None  # a timm attention pool ending in its projection
    trunk = getattr(visual, "trunk", None)
    classifier = trunk.get_classifier() if trunk is not None and hasattr(trunk, "get_classifier") else None
    found = _attr_path(trunk, classifier) if isinstance(classifier, nn.Module) else None
    if found is None:
        raise UnsupportedModelError(f"its timm image tower ({class_name(trunk)}) has no projection the plugin can "
                                    "find (head.proj, head.mlp, head.pool.proj or the trunk's classifier)")
    parent, attr, path = found
    return parent, attr, f"visual.trunk.{path}", getattr(trunk, "num_features", None)


def _image_projection(model: nn.Module) -> Projection:
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    visual = getattr(model, "visual", None)
    if isinstance(visual, VisionTransformer):
        if getattr(visual, "output_tokens", False) and not _is_coca(model):
            raise UnsupportedModelError("its VisionTransformer returns tokens (output_tokens=True) outside CoCa")
        return Projection("image", visual, visual, "proj", "visual.proj", _none)
    if isinstance(visual, ModifiedResNet):
        pool = visual.attnpool
        return Projection("image", visual, pool, "c_proj", "visual.attnpool.c_proj", _IdentityLinear)
    if isinstance(visual, TimmModel):
        owner, attr, path, features = _timm_projection(visual)
        return Projection("image", visual, owner, attr, path, _identity_module, output_width=features)
    raise UnsupportedModelError(f"its image tower is {class_name(visual)}, which the plugin does not know "
                                "(supported: VisionTransformer, ModifiedResNet, TimmModel)")


def _text_projection(model: nn.Module) -> Projection:
    from open_clip.model import CLIP

    if type(model) is CLIP or (isinstance(model, CLIP) and not hasattr(model, "text")):
        return Projection("text", None, model, "text_projection", "text_projection", _none)
    text = getattr(model, "text", None)
    try:
        from open_clip.hf_model import HFTextEncoder
    except ImportError:  # pragma: no cover - open_clip always ships it
        HFTextEncoder = ()
    if HFTextEncoder and isinstance(text, HFTextEncoder):
        return Projection("text", text, text, "proj", "text.proj", _identity_module)
    if isinstance(text, nn.Module) and hasattr(text, "text_projection"):
        return Projection("text", text, text, "text_projection", "text.text_projection", _none)
    raise UnsupportedModelError(f"its text tower is {class_name(text)}, which the plugin does not know "
                                "(supported: the built-in text transformer, TextTransformer, HFTextEncoder)")


def _is_coca(model) -> bool:
    from open_clip.coca_model import CoCa

    return isinstance(model, CoCa)


def _supported_model(model: nn.Module) -> None:
    from open_clip.coca_model import CoCa
    from open_clip.model import CLIP, CustomTextCLIP

    if not isinstance(model, (CLIP, CustomTextCLIP, CoCa)):
        raise UnsupportedModelError(f"it is a {class_name(model)}, not open_clip's CLIP, CustomTextCLIP or CoCa")


def config_problem(model_name: str) -> Optional[str]:
    """Why the heads cannot read the towers of the registered config ``model_name``, as far as the config
    tells before the model is built (None: nothing against it, or a config open_clip resolves elsewhere,
    e.g. ``hf-hub:``; the built model is checked again by :func:`projections`)."""
    import open_clip

    cfg = open_clip.get_model_config(model_name) if model_name else None
    if not cfg:
        return None
    if "audio_cfg" in cfg:
        return "it is an audio-text (CLAP) model: separation needs an image view"
    if (cfg.get("vision_cfg") or {}).get("output_tokens") and "multimodal_cfg" not in cfg:
        return "its VisionTransformer returns tokens (output_tokens=True) outside CoCa"
    return None


def refusal(model_name: str, why: str, flag: str = "--sep-weight (deep feature separation)") -> str:
    return (f"{flag} is not supported for model '{model_name}': {why}. Separation attaches an independent head "
            "to the pooled features that feed each tower's final projection.")


_CACHE: "weakref.WeakKeyDictionary[nn.Module, Dict[str, Projection]]" = weakref.WeakKeyDictionary()


def projections(model: nn.Module, model_name: str = "?", flag: str = "--sep-weight (deep feature separation)"
                ) -> Dict[str, Projection]:
    """``{"image": Projection, "text": Projection}`` of ``model`` (cached per model object); raises
    :class:`UnsupportedModelError` naming the flag, the model and the reason."""
    found = _CACHE.get(model)
    if found is not None:
        return found
    try:
        _supported_model(model)
        found = {"image": _image_projection(model), "text": _text_projection(model)}
    except UnsupportedModelError as e:
        raise UnsupportedModelError(refusal(model_name, str(e), flag)) from None
    _CACHE[model] = found
    return found


def embed_dim(model: nn.Module, found: Dict[str, Projection]) -> int:
    """The shared embedding width: the output of either projection, else ``model.embed_dim``."""
    for p in found.values():
        if p.out_width is not None:
            return p.out_width
    dim = getattr(model, "embed_dim", None)
    if dim is None:
        raise UnsupportedModelError("neither tower has a projection and the model names no embed_dim")
    return int(dim)


def head_widths(model: nn.Module, found: Dict[str, Projection]) -> Dict[str, int]:
    """Width of the pooled features each head reads (the embedding width where a tower has no projection)."""
    dim = embed_dim(model, found)
    return {m: (p.width if p.width is not None else (p.output_width or dim)) for m, p in found.items()}


def describe(found: Dict[str, Projection]) -> str:
    """One line: what each head reads."""
    parts = []
    for m, p in found.items():
        what = (f"the {class_name(p.tower) if p.tower is not None else 'built-in'} tower's output (it has no "
                f"projection: {p.path} is an identity)") if p.identity else f"the input of {p.path}"
        parts.append(f"{m} head reads {what}")
    return "; ".join(parts)


def class_method(model, name: str):
    """``model.<name>`` as the class defines it: an FSDP2 forward method registered on the instance
    (open_clip main's ``--fsdp`` registers ``encode_image``/``encode_text``) would reshard the root's
    parameters in the middle of the model's forward."""
    return getattr(type(model), name).__get__(model)


def encode_pooled(model, x: torch.Tensor, modality: str):
    """(the tower's embedding, the pooled features its final projection reads) from ONE tower forward,
    on every tower family."""
    fn = class_method(model, "encode_image" if modality == "image" else "encode_text")
    return projections(model)[modality].encode(fn, x)
