"""Errors a user can act on, and how an exception becomes one line.

The CLI prints a `ShardlightError` as one line (never a traceback) and exits 2; per-sample problems are
records (`shardlight.core.schema.SampleError`), not exceptions.
"""


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


def first_line(err: BaseException, with_type: bool = True) -> str:
    """`TypeName: first line of the message` — how an exception is shown in a one-line error or record."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    if not with_type:
        return lines[0] if lines else type(err).__name__
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def last_line(err: BaseException) -> str:
    """`TypeName: last line of the message`: the line that names the cause in a remote or C++ traceback."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1]}" if lines else type(err).__name__
