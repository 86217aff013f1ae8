"""`swinv2-train` entry point (also `python -m swinv2_train.main`, or `python train/main.py` in a
checkout, as the deepspeed launcher and torchrun start it). See configs/train.yaml and docs/DESIGN.md."""
from __future__ import annotations

import logging
import os
import sys

if __package__ in (None, ""):
    # Started as a script: sys.path[0] is this folder, whose modules (config, data, metrics, ...)
    # would shadow top-level modules of that name; the package itself is imported as installed.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import swinv2_train.config  # noqa: E402,F401  (registers the schema in Hydra's ConfigStore)
from swinv2_train.cli import prepare_overrides, user_errors_as_messages  # noqa: E402
from swinv2_train.distributed import launch_rank, strip_launcher_args  # noqa: E402


# The config tree ships inside the package (the repository's configs/ folder, installed as
# swinv2_train.configs), so an installed wheel finds it from any directory.
CONFIG_DIR = "pkg://swinv2_train.configs"


PROG = "swinv2-train"


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    if cfg.run.plan:  # the preflight plan: printed before any process group or weights exist, then exit
        from swinv2_train.plan import print_plan
        with user_errors_as_messages(PROG, launch_rank()):
            print_plan(cfg)
        return
    from swinv2_train.lifecycle import run  # deferred: --help and --cfg job need none of the trainer's imports
    # A UserError (bad config, corrupt data, a checkpoint that does not fit, ...) ends as one
    # message; its traceback goes to the run's train.log (and the terminal with HYDRA_FULL_ERROR=1).
    with user_errors_as_messages(PROG, launch_rank()):
        run(cfg)


def _rank_overrides(argv: list[str]) -> list[str]:
    """Ranks > 0 share rank 0's run dir: no .hydra/ copy and no log file of their own. A plan
    (run.plan=true) writes nothing: Hydra gets no run dir either."""
    if any(a.lower() == "run.plan=true" for a in argv[1:]):
        return argv + ["hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra.run.dir=."]
    if launch_rank() == 0:
        return argv
    return argv + ["hydra.output_subdir=null", "hydra/job_logging=stdout"]


def main() -> None:
    argv = strip_launcher_args(sys.argv)
    with user_errors_as_messages(PROG, launch_rank()):  # an override Hydra cannot parse: one line
        args = prepare_overrides(argv[1:])
    sys.argv = _rank_overrides([argv[0], *args])  # before Hydra parses argv
    _hydra_main()


def main_and_exit() -> None:
    """The command (`swinv2-train`, `python -m swinv2_train.main`, `python train/main.py`): `main`,
    then, with everything written, flushed and closed, an exit without the interpreter's teardown.
    There, a finished rank may abort while the C++ threads of its destroyed process group are torn
    down ("terminate called without an active exception", exit 134; about 1 run in 16 on 2 cores),
    and SLURM then marks a completed job FAILED. Errors leave through SystemExit before this."""
    main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main_and_exit()
