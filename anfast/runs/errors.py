"""The errors of a run the command line reports in one line: ConfigError, raised before any
compute for an option that cannot work, and RunStoppedError, for a run that stopped itself.

The command line prints each of them (and CheckpointError / DiskFullError of
anfast.runs.checkpoint) as one line; see anfast/cli/main.py.
"""

from __future__ import annotations

__all__ = ["ConfigError", "RunStoppedError"]


class ConfigError(ValueError):
    """A training option that cannot work; raised before the first step."""


class RunStoppedError(RuntimeError):
    """A run that stopped on what it computed, not on its input (a loss that stays
    non-finite); the command exits with status 1, after the message."""
