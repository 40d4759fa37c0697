"""The base of every error a user can fix: the CLI prints its message (which names the input and the
fix) and exits 1, without a traceback."""

from __future__ import annotations


class PipelineError(Exception):
    """Bad input or state that the message explains; anything else is a bug and keeps its traceback."""
