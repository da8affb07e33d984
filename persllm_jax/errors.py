"""`PersllmError`: the base of every error worded for the user (bad input, a missing file, a config that cannot
work). The CLI catches this one type and prints its message as one line; anything else is a bug and keeps its
traceback. Subsystems subclass it (`ExportError`, `ConfigError`, ...) so callers can be specific when they need
to be. This module imports nothing, so every layer (data_gen included) may use it."""

from __future__ import annotations


class PersllmError(Exception):
    """A problem with the user's input or environment, worded for a person, one line where possible."""


class InputError(PersllmError, ValueError):
    """A file the user gave cannot be read as what it should be: the message names the file, line and column."""


__all__ = ["PersllmError", "InputError"]
