"""The errors of a run that the user fixes: one class each, raised before any compute.

The command line prints each of them (and CheckpointError / DiskFullError of
anfast.runs.checkpoint) as one line; see anfast/cli/main.py.
"""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A training option that cannot work; raised before the first step."""
