"""The evaluation toolkit: gap and group-level metrics, retrieval, zero-shot classification,
per-term diagnostics, the standalone evaluator, plots, export to a local-dir model, and the
metrics computed inside open_clip's ``--val-data`` evaluation. Training imports it only lazily."""
