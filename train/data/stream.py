"""Elastic train order: an epoch's global sample sequence that does not depend on ranks x workers.

The idea is MosaicML Streaming's canonical partitions, done for tar shards (our own code):

* C canonical streams (`data.canonical_streams`; null = the first run's ranks x workers, kept in
  the checkpoint's data position and reused on resume). Shard i belongs to stream i % C: shards
  are the unit of reading. A stream's encoded samples come in an order seeded by (seed, epoch,
  stream) only: its shard order, then its own shuffle buffer (`data.shuffle_buffer` samples per
  stream). A sample's augmentation is seeded by (seed, epoch, stream, its index in the stream),
  so its pixels do not depend on who decodes it. Resampled mode: each stream draws shards of the
  whole set with replacement from its own (seed, epoch, stream) RNG.
* Global batch b (B = `train.batch_size` samples) is chunk b of every stream: the stream's next
  B/C good samples (a bad one is counted and skipped; the stream takes the next good one).
  B must be divisible by C.
* Rank r of R owns the streams s with s % R == r; its share of batch b is its streams' chunks in
  stream order (B/R samples), cut into `train.grad_accum` micro-batches. Worker w of W reads
  every W-th of the rank's streams and yields (batch, stream, chunk) items; the rank's main
  process assembles the share in stream order, so nothing depends on W. R x W must divide C
  (else a `DataGeometryError` naming `data.canonical_streams` and the counts that fit), which
  gives every worker the same number of streams and DataLoader's round robin stays in step.
* Epoch length: the number of full global batches every stream can supply, from the usable
  samples per shard: `_info.json`'s shard lengths, or (without it) counted once by decoding every
  sample (`sources.TrainCounts`) and kept in the data position, so the run keeps that epoch. What
  a stream holds beyond that is dropped for the epoch (like drop_last; the shuffle makes it a
  different set each epoch). A stream that still runs short (a count that overestimates, shards
  that failed) reads its shards again in a new seeded order (a warning says so); that pass skips
  the bad samples the first one met without decoding or counting them again.
* Failed shards (unreadable, or cut short, after `data.io_retries`): skipped and counted; each
  stream records them by read ordinal (the j-th shard it opened this epoch -> samples it gave)
  in the position, and a resumed stream gives a recorded shard's samples only up to that point,
  even if the shard reads whole again, so the skip lands where the first run was. More than
  `data.max_failed_shards` of the shards a worker reads failing stops the run
  (`ShardFailureBudget`).
* Position (saved with every checkpoint): epoch, global batch index and, per stream, how many encoded
  samples its chunks so far consumed (and its failed shards; the measured shard lengths). It is world-independent: resuming at batch b on any
  (R', W') has each stream skip that many encoded samples (read, not decoded) and go on; with the
  offsets the skip is exact even past bad samples. A resize mid-epoch therefore reads every
  sample of the epoch exactly once.

Global batch b is the same set of samples for every R x W dividing C; the loss of a step (the
mean over its B samples) then matches to float tolerance, provided the per-sample randomness
outside this module (mixup pairs within a micro-batch, drop path per rank) is off or also
world-independent.
"""
from __future__ import annotations

import dataclasses
import logging
import random
from collections import Counter, deque
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset

from . import shards as S
from .config import DataConfig, as_data_config
from .masking import MaskGenerator, sample_mask_rng
from .pipeline import (BadSampleTracker, DataGeometryError, DataPipelineError, _Decoder,
                       _shuffled, _worker_id, _worker_init, mix_seed)
from .remote import ShardIO
from .sources import TrainCounts, resolve_sources
from .feed import attach_erase, check_worker_cores, mover_for
from .transforms import build_transform

log = logging.getLogger(__name__)

Position = Dict[str, Any]  # {"epoch", "batch", "canonical_streams", "global_batch", "offsets",
#                              "failed_shards" (since http streaming), "shard_lengths" (measured only)}
FailedShards = Dict[int, int]  # one stream's failed shards: read ordinal -> samples read before


# ----------------------------------------------------------------------------- geometry
def divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def resolve_canonical_streams(configured: Optional[int], saved: Optional[Position],
                              world_size: int, workers: int) -> int:
    """C: the configured value, else the one in the saved position, else ranks x workers."""
    saved_c = saved.get("canonical_streams") if saved else None
    if configured is None:
        return saved_c or world_size * workers
    if saved_c and configured != saved_c and _mid_epoch(saved):
        raise DataGeometryError(
            f"data.canonical_streams={configured}, but the checkpoint was written mid-epoch with "
            f"{saved_c} streams, which fix this epoch's order: set data.canonical_streams="
            f"{saved_c} (or null) to resume; a new value can start with a new epoch")
    return configured


def _mid_epoch(pos: Position) -> bool:
    return pos.get("batch", 0) > 0


def check_geometry(streams: int, global_batch: int, grad_accum: int, world_size: int,
                   workers: int) -> None:
    """Raise a `DataGeometryError` naming the keys when the batch cannot be dealt as designed."""
    C, B, R, W = streams, global_batch, world_size, workers
    if B < 1 or B % (R * grad_accum):
        raise DataGeometryError(
            f"train.batch_size={B} must be a positive multiple of world_size x train.grad_accum "
            f"= {R} x {grad_accum}")
    if B % C:
        raise DataGeometryError(
            f"train.batch_size={B} is not divisible by data.canonical_streams={C} (null: ranks "
            f"x data.num_workers; each global batch takes the same number of samples from every "
            f"stream): {_streams_that_fit(B, R, W)}")
    if C % R:
        raise DataGeometryError(
            f"data.canonical_streams={C} cannot be dealt to {R} ranks: the rank count must divide "
            f"{C} (one of {divisors(C)}), or start a new epoch with data.canonical_streams set to "
            f"a multiple of {R} x data.num_workers")
    if C % (R * W):
        raise DataGeometryError(
            f"data.canonical_streams={C} cannot be dealt to {R} ranks x {W} data workers: with "
            f"{R} ranks data.num_workers must divide {C // R} (one of {divisors(C // R)}), or "
            f"start a new epoch with data.canonical_streams set to a multiple of {R * W}")


def _streams_that_fit(global_batch: int, world_size: int, workers: int) -> str:
    B, R, W = global_batch, world_size, workers
    fit = [c for c in divisors(B) if c % (R * W) == 0]
    if fit:
        return (f"set data.canonical_streams to one of {fit[:8]} (they divide the batch and "
                f"{R} ranks x {W} workers divide them), or change train.batch_size")
    workers_fit = [w for w in range(1, 2 * W + 1) if B % (R * w) == 0]
    return (f"no stream count fits {R} ranks x {W} workers: set data.num_workers to one of "
            f"{workers_fit} (then data.canonical_streams=null works), or change train.batch_size")


def rank_streams(streams: int, rank: int, world_size: int) -> List[int]:
    """The canonical streams rank `rank` reads, in stream order."""
    return list(range(rank, streams, world_size))


@dataclasses.dataclass(frozen=True)
class StreamPlan:
    """The world-independent layout of the train order: shards, C streams, batches per epoch."""

    urls: Tuple[str, ...]
    pattern: str
    streams: int
    chunk: int                 # samples per stream per global batch (B / C)
    batches_per_epoch: int
    resampled: bool

    def shards_of(self, stream: int) -> List[str]:
        return list(self.urls[stream::self.streams])


def plan_streams(cfg: DataConfig, global_batch: int, streams: int,
                 lengths: Optional[Sequence[int]] = None) -> StreamPlan:
    """Layout for a resolved DataConfig (train shards and train_samples filled in); `lengths`:
    the usable samples per shard when they were counted (else _info.json's are used)."""
    pattern = cfg.train_shards
    urls = S.expand_shards(pattern)
    if not cfg.resampled and len(urls) < streams:
        raise DataGeometryError(
            f"shard pattern {pattern!r} has {len(urls)} shards for data.canonical_streams="
            f"{streams} (ranks x workers when null): each stream needs at least one shard; "
            f"re-shard finer, set data.canonical_streams <= {len(urls)}, or set "
            f"data.resampled=true")
    chunk = global_batch // streams
    if cfg.resampled:
        smallest = cfg.train_samples // streams  # every stream draws without end
    else:
        smallest = min(stream_sizes(cfg, urls, streams, lengths))
    batches = smallest // chunk
    if batches < 1:
        raise DataGeometryError(
            f"an epoch of {cfg.train_samples} samples over data.canonical_streams={streams} "
            f"gives a stream {smallest} samples, fewer than train.batch_size / streams = "
            f"{chunk}: lower train.batch_size or data.canonical_streams, or add data")
    return StreamPlan(tuple(urls), pattern, streams, chunk, batches, cfg.resampled)


def stream_sizes(cfg: DataConfig, urls: Sequence[str], streams: int,
                 lengths: Optional[Sequence[int]] = None) -> List[int]:
    """Samples per stream: exact from the counted or _info.json shard lengths when they add up to
    the epoch, else the epoch's samples spread over the shards (an estimate: a short stream
    re-reads)."""
    if lengths is None:
        lengths = S.info_shard_lengths(cfg.train_shards, cfg.train_split, list(urls), ShardIO.of(cfg))
    if lengths is None or sum(lengths) != cfg.train_samples:
        lengths = [cfg.train_samples / len(urls)] * len(urls)
    return [int(sum(lengths[s::streams])) for s in range(streams)]


# ----------------------------------------------------------------------------- one stream
MIN_SHARDS_JUDGED = 20  # a worker with fewer shards is judged as if it had this many


class ShardFailureBudget:
    """One worker's failed shards this epoch; more than `data.max_failed_shards` of the shards
    it reads (at least MIN_SHARDS_JUDGED) stops the run with one message naming them."""

    def __init__(self, cfg: DataConfig, planned: int, where: str):
        self.cfg, self.planned, self.where = cfg, planned, where
        self.tried = 0
        self.failed: Dict[str, int] = {}  # url -> samples it gave before failing (once a url)

    def opened(self) -> None:
        self.tried += 1

    def fail(self, url: str, samples: int) -> None:
        if url in self.failed:
            return  # a short stream's re-read of it, or a resampled stream's draw again
        self.failed[url] = samples
        judged = max(self.tried, self.planned, MIN_SHARDS_JUDGED)
        if len(self.failed) > self.cfg.max_failed_shards * judged:
            raise DataPipelineError(self._message(judged))

    def _message(self, judged: int) -> str:
        shown = [f"{u} ({'unreadable' if n == 0 else f'cut short after {n} samples'})"
                 for u, n in list(self.failed.items())[:20]]
        more = f" and {len(self.failed) - 20} more" if len(self.failed) > 20 else ""
        return (f"{len(self.failed)} of the {judged} shards {self.where} reads this epoch failed "
                f"(remote ones after data.io_retries={self.cfg.io_retries} retries each), more "
                f"than data.max_failed_shards={self.cfg.max_failed_shards}: {', '.join(shown)}{more}. "
                f"Check that the server is up and the shard URLs are right (data.train_shards / "
                f"data.root); for a slow source raise data.io_retries or data.io_timeout_s; to "
                f"train on what can be read, raise data.max_failed_shards (1.0: never stop)")


class _StreamShards:
    """The shards one stream opens in an epoch, with its record of the failed ones (see
    FailedShards). A shard the record names gives at most the recorded samples (0: not opened),
    whether or not it reads whole now: a resumed run replays the first run's batches. A shard
    that fails is counted once per epoch (not again when a short stream re-reads it)."""

    def __init__(self, recorded: FailedShards, io: ShardIO, budget: ShardFailureBudget):
        self.record: FailedShards = dict(recorded)
        self.io, self.budget = io, budget
        self.opened = 0
        self.failed_urls: Dict[str, int] = {}  # this epoch's: url -> samples before the failure

    def read(self, urls: Sequence[str], counts: Counter) -> Iterator[dict]:
        for url in urls:
            yield from self.read_one(url, counts)

    def read_one(self, url: str, counts: Counter) -> Iterator[dict]:
        j, self.opened = self.opened, self.opened + 1
        self.budget.opened()
        if j not in self.record and url in self.failed_urls:
            # failed earlier this epoch (a short stream reads its shards again): only the
            # samples before the failure are read again, so its stall is not waited twice
            self.record[j] = self.failed_urls[url]
        recorded = self.record.get(j)
        events: Counter = Counter()
        n = 0
        if recorded != 0:
            for sample in S.iter_shard(url, events, self.io):
                n += 1
                yield sample
                if n == recorded:
                    break  # where it failed before: not a byte further
        counts.update(events)  # a failure now, the retries; a recorded one was counted before
        if any(events[r] for r in S.SHARD_REASONS):
            self.record[j] = n
        elif recorded is None:
            return  # read whole
        self.failed_urls[url] = n
        self.budget.fail(url, n)


def stream_samples(plan: StreamPlan, cfg: DataConfig, stream: int, seed: int, epoch: int,
                   counts: Counter, shards: Optional[_StreamShards] = None) -> Iterator[dict]:
    """Encoded samples of canonical stream `stream`, without end: a pure function of
    (data, seed, epoch, stream) and the shards that failed (`shards` reads them)."""
    if shards is None:
        shards = _StreamShards({}, ShardIO.of(cfg), ShardFailureBudget(cfg, 0, f"stream {stream}"))
    if plan.resampled:
        return _resampled(plan, cfg, stream, seed, epoch, counts, shards)
    return _passes(plan, cfg, stream, seed, epoch, counts, shards)


def _passes(plan, cfg, stream, seed, epoch, counts, reader: _StreamShards) -> Iterator[dict]:
    # pass 0 is the epoch; later passes only fill a stream that ran short
    own = plan.shards_of(stream)
    p = 0
    while True:
        shards = list(own)
        if cfg.shard_shuffle:
            random.Random(mix_seed("shards", seed, epoch, stream, p)).shuffle(shards)
        rng = random.Random(mix_seed("buf", seed, epoch, stream, p))
        got = False
        for s in _shuffled(reader.read(shards, counts), cfg.shuffle_buffer, rng):
            got = True
            if p:
                s["__repass__"] = True  # its bad samples were met (and counted) in pass 0
            yield s
        if not got:
            raise DataPipelineError(
                f"canonical stream {stream} of shard pattern {plan.pattern!r} has no readable "
                f"sample (shards {own[:3]}{' ...' if len(own) > 3 else ''}; counts "
                f"{dict(counts)}): inspect or rebuild these shards, or set data.resampled=true")
        if p == 0:
            log.warning("canonical stream %d of %r ran short of samples for the epoch (bad "
                        "samples, or the sample count overestimates it): re-reading its shards",
                        stream, plan.pattern)
        p += 1


def _resampled(plan, cfg, stream, seed, epoch, counts, reader: _StreamShards) -> Iterator[dict]:
    rng = random.Random(mix_seed("resampled", seed, epoch, stream))
    limit = min(max(3 * len(plan.urls), 10), 1000)

    def draws():
        empty = 0
        while True:
            got = False
            for s in reader.read_one(rng.choice(plan.urls), counts):
                got = True
                yield s
            empty = 0 if got else empty + 1
            if empty >= limit:
                raise DataPipelineError(
                    f"shard pattern {plan.pattern!r} yielded no sample: {empty} shards in a row "
                    f"were empty or unreadable (counts: {dict(counts)}); inspect or rebuild "
                    f"the shards")

    return _shuffled(draws(), cfg.shuffle_buffer, rng)


class _StreamReader:
    """One stream's samples as chunks of good decoded samples; `consumed` counts encoded ones."""

    def __init__(self, samples: Iterator[dict], stream: int, skip: int,
                 shards: Optional[_StreamShards] = None):
        self.samples, self.stream, self.consumed, self.shards = samples, stream, 0, shards
        self.bad_keys: set = set()  # this epoch's bad samples: a re-read skips them uncounted
        for _ in range(skip):  # resume: read, do not decode
            next(self.samples)
            self.consumed += 1

    def chunk(self, n: int, decode: _Decoder, mask_of=None) -> Tuple[torch.Tensor, torch.Tensor, List[str], torch.Tensor]:
        """n good samples: (uint8 images, targets, keys, (n, 5) erase boxes). Targets are the
        labels, or with `mask_of` ((stream, index) -> (h, w) bool mask) the samples' masks, drawn
        for the same index the augmentation is seeded with: a resumed or resized run replays them."""
        got: List[Tuple[Any, Any, str]] = []
        while len(got) < n:
            sample = next(self.samples)
            index, self.consumed = self.consumed, self.consumed + 1
            if sample.get("__repass__") and sample["__key__"] in self.bad_keys:
                continue  # met and counted in the epoch's first pass
            decoded = decode(sample, (self.stream, index))
            if decoded is None:
                self.bad_keys.add(sample["__key__"])
            else:
                x, y = decoded
                got.append((x, y if mask_of is None else mask_of(self.stream, index), sample["__key__"]))
        targets = (torch.tensor([y for _, y, _ in got], dtype=torch.int64) if mask_of is None
                   else torch.stack([y for _, y, _ in got]))
        images = torch.stack([x for (x, _), _, _ in got])  # the one CHW copy of each sample
        erase = torch.tensor([e for (_, e), _, _ in got], dtype=torch.int64)
        return images, targets, [k for _, _, k in got], erase

    def read_state(self) -> Tuple[int, FailedShards]:
        """What the position keeps of this stream: encoded samples read, failed shards."""
        return self.consumed, dict(self.shards.record) if self.shards is not None else {}


class _ChunkSource(IterableDataset):
    """Items (batch, stream, images, targets, keys, consumed, stats, erase) of one rank's streams for
    one epoch from `start_batch`, each DataLoader worker reading every W-th of them."""

    def __init__(self, plan: StreamPlan, cfg: DataConfig, transform, *, streams: List[int],
                 workers: int, seed: int, epoch: int, start_batch: int, offsets: Dict[int, int],
                 masks: Optional[MaskGenerator] = None,
                 failed: Optional[Dict[int, FailedShards]] = None):
        self.plan, self.cfg, self.transform, self.streams = plan, cfg, transform, streams
        self.W, self.seed, self.epoch = workers, seed, epoch
        self.start_batch, self.offsets, self.masks = start_batch, offsets, masks
        self.failed = failed or {}

    def _budget(self, worker: int, mine: List[int]) -> ShardFailureBudget:
        planned = 0 if self.plan.resampled else sum(len(self.plan.shards_of(s)) for s in mine)
        return ShardFailureBudget(self.cfg, planned, f"data worker {worker} (streams {mine})")

    def _reader(self, stream: int, counts: Counter, budget: ShardFailureBudget) -> _StreamReader:
        shards = _StreamShards(self.failed.get(stream, {}), ShardIO.of(self.cfg), budget)
        samples = stream_samples(self.plan, self.cfg, stream, self.seed, self.epoch, counts, shards)
        return _StreamReader(samples, stream, self.offsets[stream], shards)

    def _mask_of(self, stream: int, index: int) -> torch.Tensor:
        return self.masks(sample_mask_rng(self.seed, self.epoch, stream, index))

    def __iter__(self):
        w, nw = _worker_id()
        if nw != self.W:
            raise RuntimeError(f"expected {self.W} DataLoader workers, got {nw}")
        mine = self.streams[w::self.W]
        tracker = BadSampleTracker(self.cfg.max_bad_fraction, self.cfg.bad_window,
                                   f"train shards {self.plan.pattern!r} (streams {mine})")
        decode = _Decoder(self.cfg, self.transform, tracker, ("aug", self.seed, self.epoch),
                          labels=self.masks is None)
        mask_of = self._mask_of if self.masks is not None else None
        readers = [self._reader(s, tracker.counts, self._budget(w, mine)) for s in mine]
        for b in range(self.start_batch, self.plan.batches_per_epoch):
            for r in readers:
                images, targets, keys, erase = r.chunk(self.plan.chunk, decode, mask_of)
                yield b, r.stream, images, targets, keys, r.read_state(), (w, dict(tracker.counts)), erase


# ----------------------------------------------------------------------------- one rank
class TrainStream:
    """Micro-batches of one rank across epochs, in the elastic order (module docstring); its
    position resumes on any ranks x workers that divide the canonical stream count.

    `masks` (SimMIM): the samples' labels are not read (unlabeled shards work) and each sample
    gets the mask `masks(sample_mask_rng(seed, epoch, stream, index))`; micro-batches are then
    (images, (B, h, w) bool masks).

    Images are uint8 (feed.DeviceFeed normalises and erases them on the device; a micro-batch's
    erase boxes ride on its images, feed.erase_boxes). `device`: "auto" moves each global
    batch's chunks to the current CUDA device while the step before it runs (none on a CPU-only
    machine), a device does so to it, None never moves."""

    def __init__(self, data_cfg: Any, *, img_size: int, global_batch: int, grad_accum: int,
                 rank: int, world_size: int, seed: int, position: Optional[Position] = None,
                 masks: Optional[MaskGenerator] = None, device: Any = "auto"):
        pos = position or {}
        counted = TrainCounts.of_position(position, labels=masks is None)
        cfg = resolve_sources(as_data_config(data_cfg).resolved(), ("train",), counted)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank/world_size: {rank}/{world_size}")
        W = max(1, cfg.num_workers)
        C = resolve_canonical_streams(cfg.canonical_streams, position, world_size, W)
        check_geometry(C, global_batch, grad_accum, world_size, W)
        _check_saved_batch(position, global_batch)
        self.cfg, self.seed, self.workers, self.masks = cfg, seed, W, masks
        self.global_batch, self.grad_accum = global_batch, grad_accum
        self.shard_lengths = counted.lengths  # counted here (or by the first run): kept with the run
        self.plan = plan_streams(cfg, global_batch, C, self.shard_lengths)
        self.streams = rank_streams(C, rank, world_size)
        self.transform = build_transform(cfg, img_size, train=True)
        self._mover = mover_for(device)
        check_worker_cores(cfg.num_workers)
        self.last_keys: List[str] = []  # sample keys of the micro-batch last returned
        self._counts_done: Counter = Counter()
        self._counts: Dict[int, Dict[str, int]] = {}  # this epoch's, by worker
        self._micro: deque = deque()
        self._it = None
        batch = pos.get("batch", 0)
        # int keys: a position that went through JSON comes back with string keys
        offsets = {int(s): int(n) for s, n in (pos.get("offsets") or {}).items()}
        # a stream without an offset: as if it met no bad sample so far
        failed = {int(s): {int(j): int(n) for j, n in rec.items()}  # absent before http streaming
                  for s, rec in (pos.get("failed_shards") or {}).items()}
        self._start(pos.get("epoch", 0), batch,
                    {s: offsets.get(s, batch * self.plan.chunk) for s in self.streams},
                    {s: failed.get(s, {}) for s in self.streams})

    # -- what the trainer reads
    @property
    def canonical_streams(self) -> int:
        return self.plan.streams

    @property
    def batches_per_epoch(self) -> int:
        """Global batches (= optimizer steps) per epoch."""
        return self.plan.batches_per_epoch

    def next_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The next micro-batch (images, targets or masks) of this rank; `last_keys` names its samples.
        Draws nothing from the global RNGs (the DataLoader gets its own generator)."""
        if not self._micro:
            self._micro.extend(self._next_share())
        images, targets, self.last_keys, erase = self._micro.popleft()
        if not self._micro and self._mover is not None and self.batch < self.plan.batches_per_epoch:
            self._pull(self.batch)  # the next global batch moves while this one's step runs
        return attach_erase(images, erase), targets

    def position(self) -> Position:
        """This rank's data position, between global batches (offsets of its streams only)."""
        if self._micro:
            raise RuntimeError("position() in the middle of a global batch: save at step boundaries")
        if self.batch >= self.plan.batches_per_epoch:
            return self._position(self.epoch + 1, 0, {s: 0 for s in self.streams}, {})
        return self._position(self.epoch, self.batch, dict(self.offsets),
                              {s: dict(r) for s, r in self.failed.items() if r})

    def global_position(self) -> Position:
        """The position of all ranks (a collective when distributed: call it on every rank)."""
        mine = self.position()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return mine
        lengths = mine.pop("shard_lengths", None)  # the same on every rank: not gathered
        parts: List[Optional[Position]] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        merged = merge_positions(parts)
        return merged if lengths is None else {**merged, "shard_lengths": lengths}

    def bad_samples(self) -> Dict[str, int]:
        """Bad-sample counts by reason on this rank, over the chunks handed out so far (failed
        shards included: unreadable_shard, truncated_tar)."""
        counts = self._counts_done + self._epoch_counts()
        return {k: v for k, v in counts.items() if k not in S.IO_EVENTS}

    def io_events(self) -> Dict[str, int]:
        """Remote-read events on this rank so far: {"retries": n} (logged as data/io/retries)."""
        counts = self._counts_done + self._epoch_counts()
        return {k[len("io_"):]: v for k, v in counts.items() if k in S.IO_EVENTS}

    def _epoch_counts(self) -> Counter:
        total: Counter = Counter()
        for c in self._counts.values():  # the latest cumulative counts of each worker
            total.update(c)
        return total

    def close(self) -> None:
        """Stop the DataLoader workers (also done at each epoch end)."""
        if self._it is not None:
            shutdown = getattr(self._it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            self._it = None

    # -- internals
    def _position(self, epoch: int, batch: int, offsets: Dict[int, int],
                  failed: Dict[int, FailedShards]) -> Position:
        pos = {"epoch": epoch, "batch": batch, "canonical_streams": self.plan.streams,
               "global_batch": self.global_batch, "offsets": offsets, "failed_shards": failed}
        if self.shard_lengths is not None:
            pos["shard_lengths"] = list(self.shard_lengths)
        return pos

    def _start(self, epoch: int, batch: int, offsets: Dict[int, int],
               failed: Optional[Dict[int, FailedShards]] = None) -> None:
        failed = failed or {s: {} for s in self.streams}
        if batch >= self.plan.batches_per_epoch:  # saved at an epoch's end
            epoch, batch, offsets = epoch + 1, 0, {s: 0 for s in self.streams}
            failed = {s: {} for s in self.streams}
        self.close()
        self._counts_done.update(self._epoch_counts())  # the epoch that ends, if any
        self._counts = {}
        self.epoch, self.batch, self.offsets, self.failed = epoch, batch, offsets, failed
        self._pending: Dict[Tuple[int, int], tuple] = {}
        source = _ChunkSource(self.plan, self.cfg, self.transform, streams=self.streams,
                              workers=self.workers, seed=self.seed, epoch=epoch,
                              start_batch=batch, offsets=offsets, masks=self.masks,
                              failed=failed)
        pin = self.cfg.pin_memory and self._mover is not None and self._mover.side is not None
        kw = dict(batch_size=None, num_workers=self.cfg.num_workers, pin_memory=pin,  # pinned chunks
                  worker_init_fn=_worker_init,
                  generator=torch.Generator())  # its own seed source: the global RNG is untouched
        if self.cfg.num_workers > 0:
            kw.update(prefetch_factor=self.cfg.prefetch_factor, timeout=self.cfg.timeout_s)
        self._loader = DataLoader(source, **kw)

    def _next_share(self) -> List[Tuple[torch.Tensor, torch.Tensor, List[str]]]:
        """This rank's share of the next global batch, cut into micro-batches."""
        if self.batch >= self.plan.batches_per_epoch:
            self._start(self.epoch + 1, 0, {s: 0 for s in self.streams})
        self._pull(self.batch)
        chunks = [self._pending.pop((self.batch, s)) for s in self.streams]
        for s, (_, _, _, consumed, (worker, counts), _) in zip(self.streams, chunks):
            self.offsets[s], self.failed[s] = consumed  # (samples read, failed shards)
            self._counts[worker] = counts  # counted as its chunk is handed out, not when pulled
        self.batch += 1
        if self._mover is not None:
            self._mover.ready([c[0] for c in chunks])
        images = torch.cat([c[0] for c in chunks])  # on the device when moved, else on the host
        targets = torch.cat([c[1] for c in chunks])
        erase = torch.cat([c[5] for c in chunks])
        keys = [k for c in chunks for k in c[2]]
        n = len(keys) // self.grad_accum
        return [(images[i:i + n], targets[i:i + n], keys[i:i + n], erase[i:i + n])
                for i in range(0, len(keys), n)]

    def _pull(self, batch: int) -> None:
        """Read loader items until every stream's chunk of `batch` is pending; with a mover, the
        images start moving to the device at once. Position and counts are untouched."""
        if self._it is None:
            self._it = iter(self._loader)
        while any((batch, s) not in self._pending for s in self.streams):
            b, s, images, targets, keys, consumed, stats, erase = next(self._it)
            if self._mover is not None:
                images = self._mover.move(images)
            self._pending[(b, s)] = (images, targets, keys, consumed, stats, erase)


def _check_saved_batch(position: Optional[Position], global_batch: int) -> None:
    saved = (position or {}).get("global_batch")
    if saved is not None and saved != global_batch and _mid_epoch(position):
        raise DataGeometryError(
            f"train.batch_size={global_batch}, but the checkpoint was written mid-epoch with "
            f"train.batch_size={saved}, which fixes the epoch's batches: resume with "
            f"train.batch_size={saved}; a new batch size can start with a new epoch")


def merge_positions(parts: Sequence[Position]) -> Position:
    """One position from every rank's: the same epoch and batch, the union of the offsets."""
    first = parts[0]
    for p in parts[1:]:
        if (p["epoch"], p["batch"]) != (first["epoch"], first["batch"]):
            raise RuntimeError(f"ranks disagree on the data position: {[(q['epoch'], q['batch']) for q in parts]}")
    offsets: Dict[int, int] = {}
    failed: Dict[int, FailedShards] = {}
    for p in parts:
        offsets.update(p["offsets"])
        failed.update(p.get("failed_shards") or {})
    return {**first, "offsets": offsets, "failed_shards": failed}


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
