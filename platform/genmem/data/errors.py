"""Errors raised by the data layer, each worded as one sentence naming the thing and the fix."""

from __future__ import annotations


from genmem.errors import DataError, DataNotFoundError

__all__ = ["DataError", "DataNotFoundError"]
