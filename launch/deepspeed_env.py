"""Write ``.deepspeed_env``: the variables the multi-node ``deepspeed`` launcher exports on
every node (it reads ``./.deepspeed_env`` and ``~/.deepspeed_env``, or ``$DS_ENV_FILE``).

    python -m swinv2_launch.deepspeed_env          # NCCL_*, WANDB_*, PYTHONPATH, ... -> ./.deepspeed_env
    python -m swinv2_launch.deepspeed_env --var HF_HOME --prefix FI_ -o ~/.deepspeed_env

Only needed for pdsh/ssh-style multi-node launches: locally and under srun the environment is
inherited anyway. The launcher parses each line as ``KEY=VALUE`` (split at the first ``=``,
stripped, double-quoted if it has shell-special characters), so values containing newlines are
skipped and no blank lines are written (either would break its parser). The pdsh launcher then
puts each one into the nodes' shell command as ``export KEY="VALUE"`` without escaping, so a
value with ``"``, ``$``, a backquote or a backslash would arrive changed (a ``$(...)`` would even
run): such variables are left out too, and named on stderr.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Iterable, Mapping, Optional

DEFAULT_PREFIXES = ("NCCL_", "WANDB_", "SWINV2_", "TORCH_NCCL_", "FI_", "UCX_")
DEFAULT_VARS = ("PYTHONPATH", "LD_LIBRARY_PATH", "CUDA_HOME", "DS_ACCELERATOR",
                "OMP_NUM_THREADS", "HYDRA_FULL_ERROR")
# Characters a value cannot carry through the launcher's parser and the remote shell unchanged.
UNSAFE_CHARS = frozenset('\n"$`\\')


def unsafe(value: str) -> bool:
    """True when the deepspeed launcher cannot pass ``value`` to the nodes unchanged."""
    return not UNSAFE_CHARS.isdisjoint(value)


def select(env: Mapping[str, str], names: Iterable[str] = DEFAULT_VARS,
           prefixes: Iterable[str] = DEFAULT_PREFIXES) -> dict[str, str]:
    names, prefixes = set(names), tuple(prefixes)
    out = {}
    for k in sorted(env):
        if (k in names or k.startswith(prefixes)) and not unsafe(env[k]) and env[k] != "":
            # WANDB_API_KEY is a secret: the file would spread it to every node's disk view.
            if k == "WANDB_API_KEY":
                continue
            out[k] = env[k]
    return out


def render(variables: Mapping[str, str]) -> str:
    return "".join(f"{k}={v}\n" for k, v in variables.items())


def write(path: str, variables: Mapping[str, str]) -> str:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(render(variables))
    os.replace(tmp, path)  # never leave a half-written file for the launcher to parse
    return path


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="write .deepspeed_env from the current environment")
    p.add_argument("-o", "--output", default=os.environ.get("DS_ENV_FILE", ".deepspeed_env"))
    p.add_argument("--var", action="append", default=[], help="extra variable name (repeat)")
    p.add_argument("--prefix", action="append", default=[], help="extra name prefix (repeat)")
    p.add_argument("--only", action="store_true", help="only --var/--prefix, no defaults")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="explicit value (repeat), e.g. --set NCCL_DEBUG=WARN")
    a = p.parse_args(argv)
    names = list(a.var) + ([] if a.only else list(DEFAULT_VARS))
    prefixes = list(a.prefix) + ([] if a.only else list(DEFAULT_PREFIXES))
    variables = select(os.environ, names, prefixes)
    left_out = sorted(k for k in os.environ if (k in names or k.startswith(tuple(prefixes)))
                      and unsafe(os.environ[k]))
    if left_out:
        print(f"left out (a newline, quote, $, backquote or backslash would not reach the nodes "
              f"as written): {', '.join(left_out)}", file=sys.stderr)
    for kv in a.set:
        k, sep, v = kv.partition("=")
        if not sep or not k or unsafe(v):
            p.error(f"--set expects KEY=VALUE without newlines, quotes, $, backquotes or "
                    f"backslashes in VALUE, got {kv!r}")
        variables[k] = v
    write(os.path.expanduser(a.output), variables)
    print(f"wrote {a.output}: {', '.join(variables) or '(empty)'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
