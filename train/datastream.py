"""The training batch stream: `open_stream` is the one place the trainer constructs it.

The stream is swinv2_train.data.TrainStream (the elastic order: a global batch is the same
samples on any ranks x workers dividing data.canonical_streams). `next_batch()` gives this
rank's next micro-batch, `accum` of them make one optimizer step (`batches_per_epoch` counts
steps); `global_position()` (collective) is the world-independent position a checkpoint keeps.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional

from swinv2_train.data import TrainStream
from swinv2_train.tasks import task_class

log = logging.getLogger("train")


def open_stream(spec, env, position: Optional[Dict[str, Any]] = None) -> TrainStream:
    """This rank's training stream of `spec`, from a saved data position (None: the start). A
    task without labels (SimMIM) has the stream draw its masks per sample instead."""
    task = task_class(spec)
    masks = None if getattr(task, "labels", True) else task.stream_masks(spec)
    return TrainStream(spec.data, img_size=spec.model.img_size, global_batch=spec.batch.global_batch,
                       grad_accum=spec.batch.accum, rank=env.rank, world_size=env.world_size,
                       seed=spec.run.seed, position=position, masks=masks)


def saved_position(client: Dict[str, Any], warn: bool = True) -> Optional[Dict[str, Any]]:
    """The data position of a checkpoint's client state. A checkpoint written before the elastic
    order holds (epoch, micro-batch) of the old per-rank order: no batch of the new order
    corresponds to it, so that epoch starts again from its first batch (the weights and the
    optimizer state are valid; refusing would strand runs in progress). Every sample of the
    epoch is then read at least once; the ones read before the checkpoint are read twice."""
    pos = client.get("data_position")
    if pos is None or isinstance(pos, dict):
        return pos
    epoch = int(pos[0])
    if warn:
        log.warning("the checkpoint's data position %s is of the per-rank order used before the elastic "
                    "data order: epoch %d starts again from its first batch (samples read before the "
                    "checkpoint in this epoch are read again)", list(pos), epoch)
    return {"epoch": epoch, "batch": 0}
