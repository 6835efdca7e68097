"""The cases of the loss-only benchmark (``bench_losses.py``), built from the term registry:
every term alone, a few option variants, the gap loss, the no-view terms, all of them.

Every case is built from the term registry (openclip_structure.registry.TERMS) as training builds
it, from the plugin's own flag defaults (e.g. --sep-temperature, --bridge-t), with a text view on
(``--text-aug eda``: the in-modal terms build with their text halves). A case feeds ``text_aug`` =
``text`` (no distinct augmented caption, as training without a text view) unless it says otherwise.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from openclip_structure import flags as plugin_flags, registry  # noqa: E402


#: variants of one registry term: case name -> (term key, extra plugin flags, distinct augmented caption)
VARIANTS: Dict[str, Tuple[str, List[str], bool]] = {
    "gap_cu(modality)": ("gap_cu", ["--gap-uniformity", "modality"], False),
    "gc_aug(text-aug)": ("gc_aug", [], True),
}


def term_args(extra: Optional[List[str]] = None) -> argparse.Namespace:
    """The plugin's flags at their defaults, every term's weight 1, a text view, plus ``extra``."""
    argv = registry.weight_flags(default=1) + ["--text-aug", "eda"] + (extra or [])
    return plugin_flags.add_arguments(argparse.ArgumentParser()).parse_args(argv)


def _built(specs, extra: Optional[List[str]] = None, name: Optional[str] = None) -> Callable[[], list]:
    """Factory of the terms ``specs`` build (only the one called ``name`` when given)."""
    args = term_args(extra)
    return lambda: [t for spec in specs for t in spec.build(args) if name is None or t.name == name]


def build_cases() -> Dict[str, Tuple[Callable[[], list], bool]]:
    """Case name -> (terms factory, uses an augmented caption distinct from the caption): each
    registry term alone (a term that adds several, e.g. separation, as one case per added term,
    named as logged), the :data:`VARIANTS` after their term, then the gap loss (the terms
    ``--gap-schedule`` ramps), the terms that need no view, and all of them together."""
    cases: Dict[str, Tuple[Callable[[], list], bool]] = {}
    for spec in registry.TERMS:
        names = [t.name for t in spec.build(term_args())]
        for name in names:
            cases[spec.key if len(names) == 1 else name] = (_built([spec], name=name), False)
        for variant, (key, extra, text_aug) in VARIANTS.items():
            if key == spec.key:
                cases[variant] = (_built([spec], extra), text_aug)
    gap = [s for s in registry.TERMS if s.gap_schedule]
    no_view = [s for s in registry.TERMS if not s.views and not s.heads]
    cases[f"gap ({'+'.join(s.key.split('_', 1)[-1] for s in gap)})"] = (_built(gap), False)  # gap (atp+cu)
    groups = dict.fromkeys("gap" if s.gap_schedule else s.key for s in no_view)
    cases[f"no-view ({'+'.join(groups)})"] = (_built(no_view), False)  # no-view (gap+gc)
    cases["all"] = (_built(registry.TERMS), False)
    return cases


#: case name -> (terms factory, uses an augmented caption distinct from the caption)
CASES: Dict[str, Tuple[Callable[[], list], bool]] = build_cases()
#: the cases of one term each (every case but the combinations)
SINGLE_TERMS = [n for n in CASES if n != "all" and not n.startswith(("gap (", "no-view ("))]
