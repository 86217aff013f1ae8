"""`swinv2-train` entry point (also `python train/main.py`, as the deepspeed launcher and torchrun
start it). See configs/train.yaml and docs/DESIGN.md."""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    # Started as a script: sys.path[0] is train/, which would shadow nothing useful and hide the
    # `train` package itself; put the repository root there instead.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import train.config  # noqa: E402,F401  (registers the schema in Hydra's ConfigStore)
from train.config import expected_rank  # noqa: E402
from train.distributed import strip_launcher_args  # noqa: E402


# "../configs" relative to this file, made absolute: a relative config_path in a package module
# is looked up as a python package (pkg://configs), which fails when started from another cwd.
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    from train.config import ConfigError
    from train.loop import run
    try:
        run(cfg)
    except ConfigError as e:  # a user error: one clear line, no traceback
        print(f"swinv2-train: config error: {e}", file=sys.stderr)
        sys.exit(2)


def _rank_overrides(argv: list[str]) -> list[str]:
    """Ranks > 0 share rank 0's run dir: no .hydra/ copy and no log file of their own."""
    if expected_rank() == 0:
        return argv
    return argv + ["hydra.output_subdir=null", "hydra/job_logging=stdout"]


def main() -> None:
    sys.argv = _rank_overrides(strip_launcher_args(sys.argv))  # before Hydra parses argv
    _hydra_main()


if __name__ == "__main__":
    main()
