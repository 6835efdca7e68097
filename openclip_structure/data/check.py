"""Data sources as open_clip reads them, checked before the run.

:func:`expand_sources` is the one expansion of a ``--train-data``/``--val-data`` value in this
package: several sources joined with ``::``, each brace-expanded (``shards/{00000..00007}.tar``),
by open_clip's own ``open_clip_train.data.expand_urls`` where it exists (webdataset's, with its
``${WDS_...}`` variables, else plain braceexpand). The shard readers, the evaluator and the
zero-shot file lookup use it too.

:func:`check_data_args` runs with the flag validation, before anything is built: every local file
that ``--train-data`` and ``--val-data`` name must exist. Without it, a pattern that names no file
(a shell glob ``*.tar``, a wrong folder or brace range) makes open_clip retry forever and write
hundreds of MB of warnings. Remote sources (``pipe:``, ``s3://``, ``http://``, ...) are left to
open_clip. A missing path raises :class:`FlagError` (an argparse error, exit status 2) naming it;
for a glob, with the brace pattern that matches the files the glob finds.
"""
from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import List, Optional, Sequence

from ..errors import FlagError

#: a URL scheme (``s3://``, ``http://``, ``pipe:``, ``gs://``...): two characters at least, so a
#: Windows drive letter is not one
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")
_GLOB = re.compile(r"[*?\[]")


def expand_sources(pattern) -> List[str]:
    """The paths/URLs of ``pattern``: a string (``::``-joined brace patterns) or a path, expanded
    as open_clip expands ``--train-data``; a list or tuple is taken as it is."""
    if isinstance(pattern, (list, tuple)):
        return [str(p) for p in pattern]
    try:
        from open_clip_train.data import expand_urls
    except ImportError:  # open_clip 2.x (module `training`) or no training extras
        try:
            from webdataset.shardlists import expand_urls as wds_expand
        except ImportError:
            from braceexpand import braceexpand

            return [u for part in str(pattern).split("::") for u in braceexpand(part)]
        return list(wds_expand(str(pattern)))
    return list(expand_urls(str(pattern))[0])


def is_remote(url: str) -> bool:
    """A source open_clip opens itself (``pipe:cmd``, ``s3://...``, ``https://...``), not a local file."""
    return bool(_SCHEME.match(url)) and not url.startswith("file:")


def _local(url: str) -> str:
    return re.sub(r"^file:(//)?", "", url)


def _csv(value: str, dataset_type: str) -> bool:
    return dataset_type == "csv" or (dataset_type == "auto" and value.split(".")[-1] in ("csv", "tsv"))


def brace_pattern(paths: Sequence[str]) -> str:
    """One brace pattern that braceexpand turns into exactly ``paths`` (sorted): a numbered range
    ``prefix{00000..00007}suffix`` when the names are consecutive numbers of one width, else a
    ``prefix{a,b,c}suffix`` list."""
    from braceexpand import braceexpand

    paths = sorted(paths)
    if len(paths) == 1:
        return paths[0]
    prefix = os.path.commonprefix(paths)
    suffix = os.path.commonprefix([p[len(prefix):][::-1] for p in paths])[::-1]
    middles = [p[len(prefix):len(p) - len(suffix)] for p in paths]
    # keep the digits of a number whole: move shared leading digits back out of the prefix
    while prefix and prefix[-1].isdigit() and all(m.isdigit() for m in middles):
        prefix, middles = prefix[:-1], [prefix[-1] + m for m in middles]
    candidates = []
    if all(m.isdigit() for m in middles) and len({len(m) for m in middles}) == 1:
        numbers = [int(m) for m in middles]
        if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
            candidates.append(f"{prefix}{{{middles[0]}..{middles[-1]}}}{suffix}")
    candidates.append(f"{prefix}{{{','.join(middles)}}}{suffix}")
    return next(c for c in candidates if sorted(braceexpand(c)) == paths)


def _glob_hint(flag: str, value: str, source: str) -> str:
    matches = sorted(p for p in glob.glob(_local(source)) if os.path.isfile(p))
    head = (f"{flag} {value!r}: open_clip expands brace patterns ({{00000..00007}}, {{a,b}}), not shell globs: "
            f"it would look for a file literally named {_local(source)!r}")
    if not matches:
        return f"{head}; and the glob matches no file either"
    return f"{head}. The {len(matches)} file(s) the glob matches: {flag} '{brace_pattern(matches)}'"


def missing_source(flag: str, value: Optional[str], dataset_type: str = "auto") -> Optional[str]:
    """Why ``value`` (a ``--train-data``/``--val-data`` value) names a local file that does not
    exist, or None when every local file is there."""
    if not value or dataset_type.startswith("synthetic"):
        return None
    sources = [value] if _csv(value, dataset_type) else expand_sources(value)
    if not sources:
        return f"{flag} {value!r} names no file"
    for source in sources:
        if is_remote(source):
            continue
        path = _local(source)
        if os.path.isfile(path):
            continue
        if _GLOB.search(path):
            return _glob_hint(flag, value, source)
        what = "is a directory, not a file" if os.path.isdir(path) else "does not exist"
        where = "" if source == value else f" (one of the {len(sources)} paths of {value!r})"
        parent = Path(path).parent
        if not parent.is_dir():
            what += f"; nor does its folder {str(parent)!r}"
        return f"{flag}: {path!r}{where} {what}"
    return None


def check_data_args(args) -> None:
    """Raise :class:`FlagError` for the first ``--train-data``/``--val-data`` file that is missing."""
    dataset_type = getattr(args, "dataset_type", None) or "auto"
    for flag, value in (("--train-data", getattr(args, "train_data", None)),
                        ("--val-data", getattr(args, "val_data", None))):
        problem = missing_source(flag, value, dataset_type)
        if problem:
            raise FlagError(problem)
