"""The trainer's random streams: per-rank seeding, and blocks that must not move them."""
from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch


def rank_seed(seed: int, rank: int) -> int:
    return seed * 1000 + rank + 1


def seed_rank_streams(seed: int, rank: int) -> None:
    """Per-rank randomness (drop path, augmentation in the main process) differs between ranks
    but is reproducible: torch, random and numpy from (seed, rank)."""
    s = rank_seed(seed, rank)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s)


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Run a block without touching the training RNG streams (data loader iterators draw seeds
    from the global torch RNG; evaluation must not shift training randomness either). This is
    what makes a resumed run bit-identical to an uninterrupted one."""
    state = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    try:
        yield
    finally:
        torch.set_rng_state(state[0])
        random.setstate(state[1])
        np.random.set_state(state[2])
