"""The extra views the view-based terms need, and the tower adapters behind them.

image.py (the second image view in open_clip's pipeline, the two-view forward), text.py (the second
caption, ``--text-aug``), heads.py (the separation heads and their checkpoint file), towers.py
(where each tower family's final projection reads its pooled features), audio.py (CLAP on open_clip
main: which terms apply to audio-text)."""
