"""Zero-shot classification: class names + prompt templates -> a text classifier -> top-k accuracy.

The headline metric of Jiang et al. (CVPR 2023) and of CLIP itself. The classifier is built with
open_clip's own :func:`open_clip.build_zero_shot_classifier` (each class: the mean of the
L2-normalised embeddings of its prompts, re-normalised), and images are assigned to the class of
highest cosine, as open_clip_train's ImageNet zero-shot and CLIP_benchmark do.

Class names and templates follow CLIP_benchmark's webdataset convention: ``classnames.txt`` (one
name per line, line ``i`` = class id ``i`` of the ``<key>.cls`` labels) and
``zeroshot_classification_templates.txt`` (one template per line with a ``{c}`` placeholder).
:func:`resolve_prompts` takes them from explicit files, else from those files beside the shards
(the shard folder or its parent), else names the classes by their ``.cls`` ids and uses
open_clip's ``SIMPLE_IMAGENET_TEMPLATES``.

- :func:`zero_shot_accuracy`   top-k accuracy and mean per-class recall from embeddings (numpy).
- :func:`build_classifier`     the ``[C, D]`` class embeddings of a model (open_clip's utility).
- :func:`zero_shot_metrics`    both, for the evaluator and ``--val-data`` validation.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"

Template = Union[str, Callable[[str], str]]

__all__ = ["CLASSNAMES_FILE", "TEMPLATES_FILE", "read_classnames", "read_templates", "find_prompt_files",
           "resolve_prompts", "template_text", "zero_shot_accuracy", "build_classifier", "zero_shot_metrics",
           "default_prompt_source"]


def _lines(path, what: str) -> List[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise ValueError(f"{what} file {path} has no non-empty line")
    return lines


def read_classnames(path) -> List[str]:
    """Class names, one per line (line i = class id i); blank lines are ignored."""
    return _lines(path, "class names")


def read_templates(path) -> List[str]:
    """Prompt templates, one per line, each with a ``{c}`` placeholder (CLIP_benchmark's format)."""
    templates = _lines(path, "zero-shot templates")
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise ValueError(f"every zero-shot template needs a {{c}} placeholder for the class name; "
                         f"{path} has {bad[:3]}")
    for t in templates:
        try:
            t.format(c="x")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"zero-shot template {t!r} in {path} is not a valid format string "
                             f"(only {{c}} is allowed): {e}") from e
    return templates


def _first_shard_dir(pattern) -> Optional[Path]:
    from ..data.check import expand_sources

    first = expand_sources(pattern)[:1]
    return Path(first[0]).parent if first else None


def find_prompt_files(pattern) -> Tuple[Optional[Path], Optional[Path]]:
    """``(classnames.txt, zeroshot_classification_templates.txt)`` found beside the shards of
    ``pattern`` (in the first shard's folder, else its parent: CLIP_benchmark's layout); None
    for a file that is not there."""
    folder = _first_shard_dir(pattern)
    found = []
    for name in (CLASSNAMES_FILE, TEMPLATES_FILE):
        hit = None
        for d in ([folder, folder.parent] if folder is not None else []):
            if (d / name).is_file():
                hit = d / name
                break
        found.append(hit)
    return found[0], found[1]


def _fill(template: str, c: str) -> str:
    return template.format(c=c)


def template_text(template: Template) -> str:
    """A template as text with a ``{c}`` placeholder (callables are called with ``"{c}"``)."""
    return template if isinstance(template, str) else template("{c}")


def resolve_prompts(labels, pattern=None, classnames_file=None, templates_file=None):
    """``(classnames, templates, source)`` for zero-shot classification of ``labels``.

    Class names: ``classnames_file``, else ``classnames.txt`` beside the shards of ``pattern``,
    else the ids themselves (``"0"``, ``"1"``, ...). Templates: ``templates_file``, else
    ``zeroshot_classification_templates.txt`` beside the shards, else open_clip's
    ``SIMPLE_IMAGENET_TEMPLATES``. ``source`` says where each came from. Raises ``ValueError``
    when a label is negative or has no class name.
    """
    import open_clip

    y = np.asarray(labels)
    if y.size == 0:
        raise ValueError("zero-shot classification needs at least one labelled sample")
    if y.min() < 0:
        raise ValueError(f"zero-shot classification needs class ids >= 0, got {int(y.min())}")
    found_names, found_templates = find_prompt_files(pattern) if pattern is not None else (None, None)
    names_path = classnames_file or found_names
    if names_path:
        classnames = read_classnames(names_path)
        names_source = str(names_path)
    else:
        classnames = [str(i) for i in range(int(y.max()) + 1)]
        names_source = "the .cls ids"
    if int(y.max()) >= len(classnames):
        raise ValueError(f"label {int(y.max())} has no class name: {names_source} names "
                         f"{len(classnames)} classes (line i = class id i)")
    templates_path = templates_file or found_templates
    if templates_path:
        templates: List[Template] = list(read_templates(templates_path))
        templates_source = str(templates_path)
    else:
        templates = list(open_clip.SIMPLE_IMAGENET_TEMPLATES)
        templates_source = "open_clip.SIMPLE_IMAGENET_TEMPLATES"
    return classnames, templates, {"classnames": names_source, "templates": templates_source}


def zero_shot_accuracy(img, class_emb, labels, ks: Sequence[int] = (1, 5)) -> dict:
    """Zero-shot accuracy of image embeddings against class embeddings.

    ``img`` ``[N, D]`` and ``class_emb`` ``[C, D]`` (rows L2-normalised here), ``labels`` ``[N]``
    class ids in ``[0, C)``. The score of class ``c`` for image ``i`` is the cosine
    ``<img_i, class_c>``; rank_i = number of classes scoring strictly higher than the true class;
    top-k accuracy = mean [rank_i < k], reported for each ``k <= C`` as ``zeroshot_top{k}``, plus
    ``zeroshot_mean_per_class_recall`` (top-1 recall averaged over the classes present, as
    CLIP_benchmark's balanced accuracy).
    """
    from .metrics import _embeddings, _labels  # the shared input checks of the metrics module

    x = _embeddings(img, "img")
    w = _embeddings(class_emb, "class_emb")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"img and class_emb must have the same dimension, got {x.shape[1]} and {w.shape[1]}")
    y = _labels(labels, x.shape[0]).astype(np.int64)
    c = w.shape[0]
    if y.min() < 0 or y.max() >= c:
        raise ValueError(f"labels must be class ids in [0, {c}), got values in [{y.min()}, {y.max()}]")
    scores = x @ w.T
    true = scores[np.arange(len(y)), y][:, None]
    ranks = (scores > true).sum(axis=1)
    out = {f"zeroshot_top{int(k)}": float((ranks < int(k)).mean()) for k in ks if int(k) <= c}
    hit = ranks == 0
    out["zeroshot_mean_per_class_recall"] = float(np.mean([hit[y == k].mean() for k in np.unique(y)]))
    return out


def build_classifier(model, tokenizer, classnames: Sequence[str], templates: Sequence[Template], device=None):
    """``[C, D]`` class embeddings from :func:`open_clip.build_zero_shot_classifier` (which returns
    them as ``[D, C]`` columns). ``{c}`` templates are passed to it as callables."""
    import open_clip
    import torch

    dev = next(model.parameters()).device if device is None else torch.device(device)
    fns = [functools.partial(_fill, t) if isinstance(t, str) else t for t in templates]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            weights = open_clip.build_zero_shot_classifier(model, tokenizer, list(classnames), fns,
                                                           num_classes_per_batch=10, device=dev)
    finally:
        model.train(was_training)
    return weights.T.float().cpu()


def zero_shot_metrics(model, tokenizer, img, labels, pattern=None, classnames_file=None, templates_file=None,
                      ks: Sequence[int] = (1, 5)) -> Tuple[dict, dict]:
    """``(metrics, prompts)``: :func:`zero_shot_accuracy` of the image embeddings ``img`` with the
    classifier of ``model`` built from :func:`resolve_prompts`; ``prompts`` records the class
    names, the templates (as text) and where they came from."""
    classnames, templates, source = resolve_prompts(labels, pattern, classnames_file, templates_file)
    weights = build_classifier(model, tokenizer, classnames, templates)
    out = zero_shot_accuracy(img, weights.numpy(), labels, ks=ks)
    prompts = {"classnames": classnames, "templates": [template_text(t) for t in templates], "source": source}
    return out, prompts


def default_prompt_source() -> str:
    """What :func:`resolve_prompts` falls back to, for help texts."""
    return (f"{CLASSNAMES_FILE} / {TEMPLATES_FILE} beside the shards (their folder or its parent), else the "
            f".cls ids and open_clip's SIMPLE_IMAGENET_TEMPLATES")
