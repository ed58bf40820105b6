"""genmem's errors: one base the CLI turns into one line and exit code 2.

Each kind is raised for a problem the *user* can fix (a config key, a file, a server, the
cluster's size) and is worded as one sentence naming the thing and what to do. Anything else is
a bug and shows its traceback. Each kind also derives from the built-in exception a Python
caller would expect (a bad config is a ``ValueError``, an unreachable server a ``RuntimeError``).
"""

from __future__ import annotations


class GenmemError(Exception):
    """A problem the user can fix; the message is one sentence naming the thing and the fix."""


class ConfigError(GenmemError, ValueError):
    """A configuration or search-space problem, naming the key."""


class DataError(GenmemError, ValueError):
    """Bad or unreadable data: a corrupt shard, a wrong rank, non-finite values, a bad request."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A data file or folder that should exist does not."""


class CheckpointError(GenmemError, ValueError):
    """A checkpoint that is missing, incomplete or of another architecture."""


class StorageError(GenmemError, PermissionError):
    """A storage root that cannot be written or read."""


class TrackingError(GenmemError, RuntimeError):
    """The tracking server cannot be used; the message names the URI."""


class TrackingUnavailable(TrackingError):
    """The tracking server went away and did not come back in time: nothing more can be written
    to it (the failing job's run is left as it is, not marked FAILED)."""


class ClusterError(GenmemError, RuntimeError):
    """The Ray cluster cannot run the request (too small, or the job runs where its results would be lost)."""


class TrainingError(GenmemError, RuntimeError):
    """Training cannot go on (a NaN loss, say); the message names the step."""


class SolverError(GenmemError, RuntimeError):
    """A numerical solve did not converge within its budget."""
