"""The two ways a checkpoint can be refused, shared by both entries."""

from __future__ import annotations

__all__ = ["CheckpointMismatchError", "CheckpointReadError"]


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit this run (Muon parameter set, missing state, layout, format)."""


class CheckpointReadError(RuntimeError):
    """The checkpoint's files are missing, truncated, damaged or differ from what was saved."""
