"""Errors raised by the data layer, each worded as one sentence naming the thing and the fix."""

from __future__ import annotations


class DataError(ValueError):
    """Bad or unreadable data: a corrupt shard, a wrong rank, non-finite values, a bad request."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A data file or folder that should exist does not."""
