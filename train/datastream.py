"""The training batch stream: micro-batches across epochs with a resumable position.

`open_stream` is the one place the trainer constructs its stream (a world-size-independent
stream class can replace DataStream there)."""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from swinv2_train.data import build_train_loader
from swinv2_train.rng import isolated_rng


class DataStream:
    """Micro-batches across epochs with a resumable position (epoch, batch in epoch)."""

    def __init__(self, data_cfg, *, img_size, micro_global, rank, world_size, seed, epoch=0, batch=0):
        self.kw = dict(img_size=img_size, global_batch_size=micro_global, rank=rank,
                       world_size=world_size, seed=seed)
        self.data_cfg = data_cfg
        self.epoch, self.batch = epoch, batch
        self._bad_done: Dict[str, int] = {}
        self._open()
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
            self._open()

    def _open(self):
        self.loader = build_train_loader(self.data_cfg, epoch=self.epoch, start_batch=self.batch, **self.kw)
        self.batches_per_epoch = self.loader.batches_per_epoch
        self._it = None

    def next_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """This rank's next micro-batch (images, targets); opens the next epoch when one ends."""
        with isolated_rng():
            while True:
                if self._it is None:
                    self._it = iter(self.loader)
                try:
                    x, y = next(self._it)
                    break
                except StopIteration:
                    for k, v in self.loader.bad_samples().items():
                        self._bad_done[k] = self._bad_done.get(k, 0) + v
                    self.epoch, self.batch = self.epoch + 1, 0
                    self._open()
        self.batch += 1
        return x, y

    def position(self):
        if self.batch >= self.batches_per_epoch:
            return self.epoch + 1, 0
        return self.epoch, self.batch

    def bad_samples(self) -> Dict[str, int]:
        """This rank's bad-sample counts so far (the trainer sums them over ranks)."""
        out = dict(self._bad_done)
        for k, v in self.loader.bad_samples().items():
            out[k] = out.get(k, 0) + v
        return out


def open_stream(spec, env, epoch: int = 0, batch: int = 0) -> DataStream:
    """The training stream of `spec` on this rank, from data position (epoch, batch)."""
    return DataStream(spec.data, img_size=spec.model.img_size, micro_global=spec.batch.micro_global,
                      rank=env.rank, world_size=env.world_size, seed=spec.run.seed, epoch=epoch, batch=batch)
