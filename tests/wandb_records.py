"""Read an offline W&B run's own records: the run-*.wandb transaction log that `wandb sync`
uploads. The installed wandb (0.31) writes and reads it in its Go core and ships no Python reader,
only the record schema (wandb.proto.wandb_internal_pb2.Record), so the framing is read here: a
LevelDB-style log (a 7-byte ':W&B' header, 32 KiB blocks, each record split into fragments of
crc32 u32, length u16, type u8 (1 full, 2 first, 3 middle, 4 last), data)."""
from __future__ import annotations

import glob
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str) -> Iterator[Any]:
    """Every wandb_internal_pb2.Record of a .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, parts = HEADER, []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a fragment header is padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and n == 0:  # zero padding up to the block's end
            pos += left
            continue
        parts.append(data[pos + HEADER:pos + HEADER + n])
        pos += HEADER + n
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(b"".join(parts))
            parts = []
            yield rec


@dataclass
class OfflineRun:
    """What one offline run holds, from its records."""

    name: str = ""
    group: str = ""
    tags: List[str] = field(default_factory=list)
    config: Dict[str, Any] = field(default_factory=dict)
    history: List[Dict[str, Any]] = field(default_factory=list)   # one dict per logged row (JSON values)
    summary: Dict[str, Any] = field(default_factory=dict)
    metrics: Dict[str, str] = field(default_factory=dict)         # define_metric: glob/name -> step metric
    files: List[str] = field(default_factory=list)                # files saved with the run (media/...)

    def images(self, key: str) -> List[Dict[str, Any]]:
        """The image entries logged under `key`, with their step (`_step`)."""
        return [{**row[key], "_step": row.get("_step")} for row in self.history
                if isinstance(row.get(key), dict) and row[key].get("_type") == "image-file"]


def _items(items) -> Dict[str, Any]:
    """{key: value} of history / summary / config items; a value of nested keys (an image's
    _type, path, ...) comes as one item per leaf and is put back together here."""
    out: Dict[str, Any] = {}
    for it in items:
        path = [it.key] if it.key else list(it.nested_key)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(it.value_json)
    return out


def read_run(wandb_file: str) -> OfflineRun:
    run = OfflineRun()
    for rec in records(wandb_file):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run.name, run.group, run.tags = rec.run.display_name, rec.run.run_group, list(rec.run.tags)
            run.config.update(_items(rec.run.config.update))
        elif kind == "config":
            run.config.update(_items(rec.config.update))
        elif kind == "history":
            run.history.append(_items(rec.history.item))
        elif kind == "summary":
            run.summary.update(_items(rec.summary.update))
        elif kind == "metric":
            run.metrics[rec.metric.glob_name or rec.metric.name] = rec.metric.step_metric
        elif kind == "files":
            run.files += [f.path for f in rec.files.files]
    return run


def offline_runs(run_dir: str) -> List[str]:
    """The .wandb files of a run directory's offline W&B runs (one per start of the run)."""
    return sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb")))
