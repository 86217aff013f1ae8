"""Failures a user can cause and fix (a config value, a data source, a checkpoint, the launch).

`swinv2-train` (and the other entry points) print a `UserError` as one short message naming the
input and the way out, without a traceback; the traceback still goes to the run's train.log and,
with HYDRA_FULL_ERROR=1, to the terminal. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An expected failure; the message names the input and what to do about it."""
