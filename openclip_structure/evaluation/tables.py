"""Plain-text tables of the evaluator's results (one column per checkpoint; the shift diagnostic)."""
from __future__ import annotations

import math
from typing import Dict, List


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def _table(header: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def format_metrics_table(results: Dict[str, dict]) -> str:
    """One row per metric, one column per checkpoint (``{label: evaluate_checkpoint result}``)."""
    labels = list(results)
    keys: List[str] = []
    for r in results.values():
        keys += [k for k in r["metrics"] if k not in keys]
    rows = [["samples"] + [str(results[c]["num_samples"]) for c in labels],
            ["classes"] + [_fmt(results[c].get("num_classes")) for c in labels]]
    rows += [[k] + [_fmt(results[c]["metrics"].get(k)) for c in labels] for k in keys]
    out = _table(["metric"] + labels, rows)
    notes = [f"note [{c}]: {results[c]['labels_note']}" for c in labels if results[c].get("labels_note")]
    return out + ("\n" + "\n".join(notes) if notes else "")


def format_shift_table(rows: List[dict], label: str = "") -> str:
    """The shift diagnostic as a table, one row per alpha."""
    cols: List[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    title = f"shift along the gap (Liang et al. 2022){': ' + label if label else ''}"
    return title + "\n" + _table(cols, [[_fmt(r.get(c)) if c != "alpha" else f"{r['alpha']:+.2f}" for c in cols]
                                        for r in rows])
