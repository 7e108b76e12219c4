"""Errors a user can act on. The CLI prints them as one line (never a traceback) and exits non-zero."""


class ShardlightError(Exception):
    """Base of every expected, user-facing failure."""


class InputError(ShardlightError, ValueError):
    """A problem with what the user asked for: paths, patterns, config keys, query arguments."""


class ModelLoadError(ShardlightError, RuntimeError):
    """A model could not be built or its weights found."""


class ClusterError(ShardlightError, RuntimeError):
    """Ray cannot give the pool what it needs (no resources, no cluster)."""


class IndexStateError(ShardlightError, RuntimeError):
    """The index is missing or inconsistent."""
