"""Exceptions shared across modules (no imports here, so any module may raise them)."""


class FlagError(ValueError):
    """A plugin flag value, or a combination of flags, that cannot work."""
