"""The error types that a user sees, with a message that says what to do."""

from __future__ import annotations


class KaedamaError(Exception):
    """Base class for errors reported to the user without a traceback."""
