"""``--verbose``: whether Ray's own log lines show. Its own module, without Ray, so the command
line sets it before anything heavy loads."""

from __future__ import annotations

import os


def set_verbose(verbose: bool) -> None:
    """Show Ray's own log lines (``--verbose``); by default only genmem's progress shows. An
    environment variable, so Ray job drivers and workers started from here inherit it."""
    os.environ["GENMEM_VERBOSE"] = "1" if verbose else "0"


def verbose() -> bool:
    return os.environ.get("GENMEM_VERBOSE", "0") == "1"
