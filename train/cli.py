"""Command-line plumbing shared by `swinv2-train` and `swinv2-eval`.

* :func:`prepare_overrides` turns argv, as a shell delivers it, into overrides Hydra can parse:
  a shard pattern typed without quotes arrives brace-expanded by bash (one argument per shard)
  and is joined again with ``::``; a pattern with braces (quoted in the shell, so Hydra sees the
  braces) is quoted for Hydra's grammar; any other override Hydra cannot parse is reported in
  one line that names it.
* :func:`user_errors_as_messages` prints a :class:`~swinv2_train.errors.UserError` as one short
  message (no traceback) and exits non-zero; the traceback goes to the run's log file (Hydra's
  ``<job>.log`` in the run dir) and, with ``HYDRA_FULL_ERROR=1``, to the terminal too.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import traceback
from typing import Iterator, List, NoReturn, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser

from swinv2.config import VARIANT_FIELDS
from .config import ConfigError
from .errors import UsageError, UserError

# Keys whose values are shard patterns: several values are joined with '::' (expand_shards).
SHARD_KEYS = ("data.train_shards", "data.val_shards")
# Keys whose values are paths that may hold characters Hydra's grammar reserves ({ } [ ] , ...).
PATH_KEYS = SHARD_KEYS + ("data.root", "run.dir", "run.resume", "model.pretrained",
                          "model.pretrained_class_map", "train.eval_class_map")
SHARD_SEPARATOR = "::"

# Hydra's own flags that take the next argument as their value (it is not an override).
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun", "--shell-completion", "-sc"}
_INFO_FLAGS = {"--info", "-i"}  # optional value, one of these topics
_INFO_TOPICS = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}

DEBUG_ENV = "HYDRA_FULL_ERROR"  # Hydra's own switch for full tracebacks; we honour it too


# ----------------------------------------------------------------------------- overrides
def split_override(arg: str) -> tuple[str, Optional[str]]:
    """('key', 'value') of `key=value` (the key keeps a +/++/~ prefix); value None without '='."""
    key, sep, value = arg.partition("=")
    return (key, value) if sep else (arg, None)


def plain_key(key: str) -> str:
    return key.lstrip("+~")


def override_positions(args: List[str]) -> List[int]:
    """Indices of the arguments that are overrides (not Hydra flags or a flag's value)."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        flag = arg.split("=", 1)[0]
        if arg.startswith("-"):
            takes_value = "=" not in arg and (
                flag in _FLAGS_WITH_VALUE
                or (flag in _INFO_FLAGS and i + 1 < len(args) and args[i + 1] in _INFO_TOPICS))
            i += 2 if takes_value else 1
            continue
        out.append(i)
        i += 1
    return out


def join_expanded_shards(args: List[str]) -> List[str]:
    """Rejoin what bash's brace expansion split: consecutive `K=a K=b ...` for a shard key K
    become one `K=a::b::...` (expand_shards reads '::' as a list of patterns)."""
    out: List[str] = []
    for arg in args:
        key, value = split_override(arg)
        if out and value is not None and plain_key(key) in SHARD_KEYS:
            prev_key, prev_value = split_override(out[-1])
            if prev_key == key and prev_value is not None:
                out[-1] = f"{key}={prev_value}{SHARD_SEPARATOR}{value}"
                continue
        out.append(arg)
    return out


def _parse(arg: str):
    return OverridesParser.create().parse_overrides([arg])[0]


def _is_quoted(value: str) -> bool:
    return len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""


def hydra_quote(value: str) -> str:
    """`value` as one quoted string of Hydra's override grammar."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    return "'" + value.replace("'", "\\'") + "'"


def quote_path_value(arg: str) -> str:
    """Quote the value of a path key when Hydra would not read it back as that same string
    (braces, a sweep-like comma, a bracket...). `null`, interpolations and quoted values stay."""
    key, value = split_override(arg)
    if value is None or plain_key(key) not in PATH_KEYS or _is_quoted(value):
        return arg
    try:
        parsed = _parse(arg).value()
        if parsed is None or parsed == value:
            return arg
    except Exception:  # noqa: BLE001 - Hydra's parse errors: quoting is the fix
        pass
    return f"{key}={hydra_quote(value)}"


def check_override(arg: str) -> None:
    """Raise UsageError naming `arg` when Hydra's override parser rejects it."""
    try:
        _parse(arg)
    except Exception as e:  # noqa: BLE001 - OverrideParseException and friends
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        key, value = split_override(arg)
        hint = (f"; quote the value for Hydra, e.g. '{key}=\"{value}\"' (inside single quotes in the shell)"
                if value is not None else "")
        raise UsageError(f"cannot parse override {arg!r}: {reason}{hint}") from None


def prepare_overrides(args: List[str]) -> List[str]:
    """Command-line arguments (without argv[0]) -> arguments for Hydra; see the module docstring.
    Hydra's own flags (--help, --cfg job, -cn NAME, ...) pass through untouched."""
    positions = set(override_positions(args))
    overrides = join_expanded_shards([a for i, a in enumerate(args) if i in positions])
    overrides = [quote_path_value(a) for a in overrides]
    for arg in overrides:
        check_override(arg)
    flags = [a for i, a in enumerate(args) if i not in positions]
    return flags + with_variant_sizes(overrides)


def with_variant_sizes(overrides: List[str]) -> List[str]:
    """A model the user names (`model.variant=X` or `model=X`) is built with X's sizes from
    swinv2's variant table: the sizes a recipe or the embedded default states for its own model
    (model.embed_dim, depths, ...) are reset to null, unless the user types them too."""
    typed = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    if not typed & {"model.variant", "model"}:
        return overrides
    return overrides + [f"model.{k}=null" for k in VARIANT_FIELDS if f"model.{k}" not in typed]


# ----------------------------------------------------------------------------- errors
def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


_WORKER_TRACEBACK = re.compile(r"Original Traceback \(most recent call last\):\n")


def user_message(exc: BaseException) -> str:
    """The message of `exc` without the worker traceback a DataLoader embeds when it re-raises
    an exception from a worker process ("Caught X in DataLoader worker process 0. Original
    Traceback ...": the last 'Type: message' entry is what the worker raised)."""
    text = str(exc)
    if not _WORKER_TRACEBACK.search(text):
        return text
    tail = _WORKER_TRACEBACK.split(text)[-1]
    name = type(exc).__name__
    m = re.search(rf"^[\w.]*\b{re.escape(name)}: (.*)\Z", tail, flags=re.MULTILINE | re.DOTALL)
    return m.group(1).strip() if m else tail.strip().splitlines()[-1]


def log_traceback_to_files(exc: BaseException) -> List[str]:
    """Write `exc` with its traceback to the root logger's file handlers only (Hydra's job log
    in the run dir), not to the console. Returns the log files written."""
    record = logging.LogRecord("swinv2", logging.ERROR, __file__, 0, "stopped: %s: %s",
                               (type(exc).__name__, user_message(exc)), (type(exc), exc, exc.__traceback__))
    written = []
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
            handler.flush()
            written.append(handler.baseFilename)
    return written


def exit_code_for(exc: UserError) -> int:
    """Config errors exit with status 2 (as they always did), others with their exit_code."""
    return 2 if isinstance(exc, ConfigError) else getattr(exc, "exit_code", 1)


def report_user_error(prog: str, exc: UserError, rank: int = 0, kind: str = "error") -> None:
    """Print `exc` for a person: rank 0 the whole message, other ranks one line (none for an
    error that every rank raised from one shared decision: `exc.same_on_every_rank`)."""
    if rank != 0 and getattr(exc, "same_on_every_rank", False):
        return
    if debug_enabled():
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    message = user_message(exc)
    if rank == 0:
        print(f"{prog}: {kind}: {message}", file=sys.stderr, flush=True)
    else:
        first = message.splitlines()[0] if message else type(exc).__name__
        print(f"{prog} (rank {rank}): {first[:200]}", file=sys.stderr, flush=True)


def exit_with_message(prog: str, exc: UserError, rank: int = 0) -> NoReturn:
    log_traceback_to_files(exc)  # the terminal gets the message only (docs/configuration.md: "When it stops")
    kind = "config error" if isinstance(exc, ConfigError) else "error"
    report_user_error(prog, exc, rank, kind)
    sys.exit(exit_code_for(exc))


@contextlib.contextmanager
def user_errors_as_messages(prog: str, rank: int = 0) -> Iterator[None]:
    """Run a block; a UserError ends the process with a message (see module docstring). Any
    other exception is a bug: logged to the job log file too, then re-raised with its traceback."""
    try:
        yield
    except UserError as e:
        exit_with_message(prog, e, rank)
    except Exception as e:
        log_traceback_to_files(e)
        raise
