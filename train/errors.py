"""Failures a user can cause and fix (a config value, a data source, a checkpoint, the launch).

`swinv2-train` (and the other entry points) print a `UserError` as one short message naming the
input and the way out, without a traceback; the traceback still goes to the run's train.log and,
with HYDRA_FULL_ERROR=1, to the terminal. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An expected failure; the message names the input and what to do about it."""

    exit_code = 1


class UsageError(UserError):
    """The command line itself is wrong (an override Hydra cannot parse, ...)."""

    exit_code = 2


class CheckpointError(UserError):
    """A checkpoint cannot be read (truncated or partly copied files)."""


class ResumeMismatchError(UserError):
    """The checkpoint to resume does not fit this run (model, task, world size, precision)."""


class NonFiniteError(UserError, RuntimeError):
    """Training produced non-finite losses or gradients and the NaN policy says stop."""
