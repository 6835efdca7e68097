"""Turn an open_clip training checkpoint into a self-contained ``local-dir`` model folder.

    python -m openclip_structure.export --model structure-tiny \\
        --checkpoint logs/run/checkpoints/epoch_10.pt --out exported/run

writes ``exported/run/open_clip_config.json`` and ``open_clip_model.safetensors``: the layout of
open_clip's own Hugging Face export (``open_clip.push_to_hf_hub.save_config_for_hf`` writes the
config, ``{"model_cfg": ..., "preprocess_cfg": ...}``; the weights go to open_clip's
``HF_SAFE_WEIGHTS_NAME``), which open_clip's ``local-dir:`` loader reads. The folder then loads
anywhere with plain open_clip, no config registration needed::

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:exported/run")
    tokenizer = open_clip.get_tokenizer("local-dir:exported/run")

The checkpoint is read by open_clip's own reader (``open_clip.factory.load_state_dict`` with
``weights_only=True``): a file holding pickled Python objects (e.g. an ``argparse.Namespace``) is
refused, never unpickled. ``module.`` prefixes (DistributedDataParallel) are stripped, top-level
keys other than ``state_dict`` (``epoch``, ``optimizer``, a plugin's extra entries ...) are
ignored, and the weights must match the model built from ``--model`` exactly (same keys, same
shapes; only a scalar's 0-D vs ``[1]`` shape, which open_clip's loader converts, is let through)
before anything is written; the model is then built with ``open_clip.create_model(model,
pretrained=checkpoint)``. After writing, the folder is loaded back through ``local-dir:`` and
compared tensor by tensor (``--no-verify`` skips that).

The helpers :func:`read_checkpoint_state_dict`, :func:`key_mismatch` and
:class:`CheckpointError` are shared with :mod:`openclip_structure.evaluation.loading` (the evaluator).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from open_clip.constants import HF_CONFIG_NAME as CONFIG_NAME  # open_clip_config.json
from open_clip.constants import HF_SAFE_WEIGHTS_NAME as WEIGHTS_NAME  # open_clip_model.safetensors

LOCAL_DIR_PREFIX = "local-dir:"

__all__ = [
    "CheckpointError",
    "read_checkpoint_state_dict",
    "key_mismatch",
    "format_key_mismatch",
    "check_state_dict",
    "export_checkpoint",
    "main",
]


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unsafe to load, or does not fit the model."""


def _unpickling_reason(err: BaseException) -> str:
    text = str(err)
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if m:
        return f"it contains a pickled object of type {m.group(1)}"
    first = next((line.strip() for line in text.splitlines() if "error" in line.lower()), "")
    return f"it contains pickled Python objects ({first or type(err).__name__})"


def read_checkpoint_state_dict(path) -> Dict[str, torch.Tensor]:
    """The model weights of a training checkpoint (or a bare state dict / ``.safetensors`` file).

    Read by open_clip's own ``open_clip.factory.load_state_dict`` (``weights_only=True``, on the
    CPU; ``.safetensors`` too): a dict with a ``state_dict`` entry (open_clip's ``{"epoch",
    "name", "state_dict", "optimizer", ...}``) gives that entry, every other top-level key being
    ignored; otherwise the dict itself must map names to tensors. ``module.`` prefixes are
    removed. Raises :class:`CheckpointError` when the file is missing, holds pickled non-tensor
    objects, or holds no tensor state dict.
    """
    from open_clip.factory import load_state_dict

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        state_dict = load_state_dict(str(path), device="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load checkpoint {path}: {_unpickling_reason(e)}, which "
            "torch.load(weights_only=True) does not unpickle. Only tensors and plain containers "
            "(dict, list, str, numbers) are accepted; re-save it without that object, e.g. "
            "torch.save({'state_dict': model.state_dict()}, path)."
        ) from e
    except Exception as e:  # truncated / not a torch file / no dict of weights
        raise CheckpointError(f"cannot read model weights from checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise CheckpointError(
            f"checkpoint {path} holds no model weights: expected a dict with a 'state_dict' entry "
            f"or a dict of tensors, got {type(state_dict).__name__}"
        )
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {path}: the weights contain non-tensor entries {bad[:5]}")
    return dict(state_dict)


def key_mismatch(model_or_keys, state_dict: Mapping[str, torch.Tensor]) -> Tuple[List[str], List[str], List[str]]:
    """``(missing, unexpected, shape_mismatch)`` of ``state_dict`` against a model (or its state dict).

    ``shape_mismatch`` entries read ``"name: checkpoint (a, b) vs model (c, d)"``. A one-element
    ``logit_scale`` / ``logit_bias`` stored 0-D vs ``[1]`` is no mismatch: open_clip's
    ``load_checkpoint`` reshapes it (releases differ in which one they use).
    """
    expected = model_or_keys.state_dict() if hasattr(model_or_keys, "state_dict") else model_or_keys
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]

    def fits(k):
        a, b = tuple(state_dict[k].shape), tuple(expected[k].shape)
        return a == b or (k in ("logit_scale", "logit_bias") and a in ((), (1,)) and b in ((), (1,)))

    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and hasattr(expected[k], "shape") and not fits(k)
    ]
    return missing, unexpected, shapes


def _few(keys: List[str], n: int) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def format_key_mismatch(missing, unexpected, shapes=(), n: int = 5) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_few(list(missing), n)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_few(list(unexpected), n)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es): {_few(list(shapes), n)}")
    return "; ".join(parts)


def check_state_dict(model, state_dict, what: str = "checkpoint", model_name: str = "the model") -> None:
    """Raise :class:`CheckpointError` unless ``state_dict`` matches ``model`` exactly."""
    missing, unexpected, shapes = key_mismatch(model, state_dict)
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{what} does not match {model_name}: {format_key_mismatch(missing, unexpected, shapes)}"
        )


@contextlib.contextmanager
def quiet_open_clip_logging():
    """Silence open_clip's root-logger chatter (e.g. "No pretrained weights loaded") in a block."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _register_configs() -> None:
    from ..configs import register_model_configs

    register_model_configs()


def export_checkpoint(model_name: str, checkpoint, out_dir, verify: bool = True,
                      overwrite: bool = False) -> Dict[str, str]:
    """Write ``out_dir/open_clip_config.json`` and ``out_dir/open_clip_model.safetensors``.

    ``model_name`` is an open_clip config name (the bundled configs are registered first).
    Raises :class:`CheckpointError` for unreadable / mismatching checkpoints (nothing is
    written then) and ``FileExistsError`` when the files exist and ``overwrite`` is false.
    Returns ``{"dir", "config", "weights", "model"}`` (``model`` is the ``local-dir:`` name).
    """
    import open_clip
    from open_clip.push_to_hf_hub import save_config_for_hf
    from safetensors.torch import save_file

    _register_configs()
    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise CheckpointError(
            f"unknown model config {model_name!r}; known configs include: "
            f"{', '.join(sorted(open_clip.list_models())[:10])}, ... (structure-* are bundled)"
        )
    model_cfg = copy.deepcopy(model_cfg)
    state_dict = read_checkpoint_state_dict(checkpoint)

    with quiet_open_clip_logging():
        bare = open_clip.create_model(model_name, pretrained=None, device="cpu")
    # exact keys and shapes first: open_clip's loader would resize e.g. a positional embedding
    check_state_dict(bare, state_dict, f"checkpoint {checkpoint}", f"model {model_name!r}")
    del bare, state_dict
    model = open_clip.create_model(model_name, pretrained=str(checkpoint), device="cpu")

    out = Path(out_dir)
    config_path, weights_path = out / CONFIG_NAME, out / WEIGHTS_NAME
    if not overwrite and (config_path.exists() or weights_path.exists()):
        raise FileExistsError(f"{out} already holds an exported model (pass overwrite=True / --overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    others = [p.name for p in out.iterdir()
              if p.suffix in (".safetensors", ".bin", ".pth") and p.name != WEIGHTS_NAME]
    if others:
        print(f"warning: {out} also holds weight files {others}; open_clip prefers {WEIGHTS_NAME}",
              file=sys.stderr)

    # as open_clip's save_for_hf: model.state_dict() to HF_SAFE_WEIGHTS_NAME (cloned: safetensors
    # refuses tensors sharing storage), the config by open_clip's save_config_for_hf
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"format": "pt", "source_checkpoint": os.path.abspath(str(checkpoint)), "model_name": model_name}
    save_file(tensors, str(weights_path), metadata=meta)
    os.chmod(weights_path, 0o644)
    save_config_for_hf(model, config_path, model_config=model_cfg)

    local_name = LOCAL_DIR_PREFIX + str(out.resolve())
    if verify:
        loaded = open_clip.create_model(local_name, device="cpu")
        reloaded = loaded.state_dict()
        check_state_dict(reloaded, tensors, f"exported folder {out}", "its own config")
        diff = [k for k, v in tensors.items() if not torch.equal(reloaded[k].to(v.dtype), v)]
        if diff:
            raise CheckpointError(f"exported weights differ after reloading {local_name}: {diff[:5]}")
    return {"dir": str(out), "config": str(config_path), "weights": str(weights_path), "model": local_name}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m openclip_structure.export",
        description="Export an open_clip training checkpoint as a 'local-dir:' model folder "
                    "(open_clip_config.json + open_clip_model.safetensors).",
    )
    p.add_argument("--model", required=True, help="open_clip model config name, e.g. structure-tiny")
    p.add_argument("--checkpoint", required=True, help="training checkpoint, e.g. logs/NAME/checkpoints/epoch_10.pt")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in --out")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip reloading the folder through local-dir: after writing")
    a = p.parse_args(argv)
    try:
        info = export_checkpoint(a.model, a.checkpoint, a.out, verify=a.verify, overwrite=a.overwrite)
    except (CheckpointError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {info['config']}")
    print(f"wrote {info['weights']}")
    print(f"load with: open_clip.create_model_and_transforms({info['model']!r})")
    return 0
