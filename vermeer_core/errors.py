"""Errors a user can cause and fix. The CLI prints their message (no traceback) and exits 1;
spec errors (:class:`vermeer_core.spec.SpecError`) exit 2."""

from __future__ import annotations

__all__ = ["VermeerError", "DataError"]


class VermeerError(RuntimeError):
    """A problem the user can fix (a path, a checkpoint, data, a diverged run). The message
    says what was wrong, where, and what to do."""


class DataError(VermeerError):
    """The data cannot be read as asked (missing shards, too many corrupt samples...)."""
