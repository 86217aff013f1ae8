"""Pieces of the streaming pipeline over webdataset-style tar shards, and the eval loader.

The train stream is `stream.TrainStream` (the elastic order: see train/data/stream.py); it
reads shards with `_read`, shuffles encoded samples with `_shuffled`, decodes with `_Decoder`
(augmentation seeded from `mix_seed` parts, so pixels do not depend on who decodes) and counts
bad samples in a `BadSampleTracker`.

Eval loader of one rank: shards split over ranks then workers (`assign_shards`), every sample
exactly once, partial last batches. Bad-sample counts: each worker attaches its cumulative
counts to every batch it yields; the loader keeps the latest per worker and sums them (no
shared memory, works with fork or spawn, and a dead worker's counts up to its last batch are
kept).
"""
from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter, deque
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import UserError
from . import shards as S
from .config import DataConfig, as_data_config
from .remote import ShardIO
from .feed import build_feed, default_device
from .sources import resolve_sources
from .transforms import CorruptImageError, build_transform

log = logging.getLogger(__name__)


class DataPipelineError(UserError, RuntimeError):
    """Raised for data problems that must stop training (no samples, too many bad samples)."""


class DataGeometryError(UserError, ValueError):
    """The batch, ranks, workers or streams do not fit the shards; the message names the keys."""


def mix_seed(*parts: Any) -> int:
    """Stable 63-bit seed from arbitrary parts (Python's hash() is salted per process)."""
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


# ----------------------------------------------------------------------------- bad samples
class BadSampleTracker:
    """Counts bad samples per reason; raises when the bad fraction in a sliding window of
    `window` samples exceeds `max_fraction`, or when no sample decodes for very long."""

    def __init__(self, max_fraction: float, window: int, where: str):
        self.counts: Counter = Counter()
        self.max_fraction, self.window, self.where = max_fraction, window, where
        self.recent: deque = deque(maxlen=window)
        self.n_bad_recent = 0
        self.seen = 0
        self.consecutive_bad = 0
        self.dead_limit = max(10 * window, 10000)

    def _push(self, bad: bool):
        if len(self.recent) == self.window:
            self.n_bad_recent -= self.recent[0]
        self.recent.append(bad)
        self.n_bad_recent += bad
        self.seen += 1

    def good(self):
        self._push(False)
        self.consecutive_bad = 0

    def bad(self, reason: str):
        self.counts[reason] += 1
        self._push(True)
        self.consecutive_bad += 1
        if self.n_bad_recent > self.max_fraction * self.window:
            raise DataPipelineError(
                f"too many bad samples in {self.where}: {self.n_bad_recent} of the last "
                f"{len(self.recent)} samples are bad (max_bad_fraction={self.max_fraction} of "
                f"bad_window={self.window}); counts so far: {dict(self.counts)}. {_BAD_WAY_OUT}")
        if self.consecutive_bad >= self.dead_limit:
            raise DataPipelineError(
                f"no decodable sample in the last {self.consecutive_bad} samples in "
                f"{self.where}; counts: {dict(self.counts)}. {_BAD_WAY_OUT}")


_BAD_WAY_OUT = ("Inspect the shards (e.g. list a few samples with `tar tf`) and rebuild the "
                "damaged ones (swinv2-make-shards), or raise data.max_bad_fraction to accept "
                "more bad samples")


def load_class_map(path: str) -> Dict[int, int]:
    """22K->1K label map {source label: target label}, read by swinv2's one class-map reader.
    Imported here, only when data.class_map is set: the data package loads no model code otherwise."""
    from swinv2.class_map import ClassMapError, load_class_map as read_class_map

    try:
        return read_class_map(path).label_map()
    except ClassMapError as e:
        raise DataPipelineError(f"data.class_map: {e}") from None


def parse_label(sample: Dict[str, bytes], num_classes: int, class_map: Optional[Dict[int, int]]
                ) -> Tuple[Optional[int], Optional[str]]:
    raw = sample.get("cls")
    if raw is None:
        return None, S.BAD_LABEL
    try:
        label = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None, S.BAD_LABEL
    if class_map is not None:
        if label not in class_map:
            return None, S.UNMAPPED_LABEL
        label = class_map[label]
    if not 0 <= label < num_classes:
        return None, S.LABEL_OUT_OF_RANGE
    return label, None


def image_bytes(sample: Dict[str, bytes]) -> Optional[bytes]:
    for ext in S.IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    return None


NO_LABEL = -1  # the target of a sample decoded without its label (labels=False)


class _Decoder:
    """Encoded sample -> (tensor, label) or None (counted). With `labels=False` (SimMIM) the
    `.cls` entry is not read: unlabeled shards work, and the label is NO_LABEL."""

    def __init__(self, cfg: DataConfig, transform, tracker: BadSampleTracker, seed_parts, labels: bool = True):
        self.cfg, self.transform, self.tracker = cfg, transform, tracker
        self.seed_parts, self.labels = seed_parts, labels
        self.class_map = load_class_map(cfg.class_map) if cfg.class_map and labels else None

    def __call__(self, sample, extra=()) -> Optional[Tuple[torch.Tensor, int]]:
        label, reason = (parse_label(sample, self.cfg.num_classes, self.class_map) if self.labels
                         else (NO_LABEL, None))
        if reason is None:
            data = image_bytes(sample)
            if data is None:
                reason = S.MISSING_IMAGE
        if reason is not None:
            self.tracker.bad(reason)
            return None
        rng = random.Random(mix_seed(*self.seed_parts, *extra, sample["__key__"]))
        try:
            x = self.transform(data, rng)
        except CorruptImageError:
            self.tracker.bad(S.CORRUPT_IMAGE)
            return None
        self.tracker.good()
        return x, label


def _shuffled(samples: Iterator[dict], bufsize: int, rng: random.Random) -> Iterator[dict]:
    """Seeded buffer shuffle of encoded samples (cheap: bytes, not decoded images)."""
    if bufsize <= 1:
        yield from samples
        return
    buf: List[dict] = []
    for s in samples:
        if len(buf) < bufsize:
            buf.append(s)
            continue
        i = rng.randrange(bufsize)
        buf[i], s = s, buf[i]
        yield s
    rng.shuffle(buf)
    yield from buf


def _worker_id() -> Tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def assign_shards(urls: Sequence[str], rank: int, world_size: int, worker: int,
                  num_workers: int) -> Tuple[List[str], int, int]:
    """Node-then-worker split: (shards to read, sample modulus, sample remainder).

    With >= world*W shards (per rank: >= W) each worker reads disjoint shards (modulus 1).
    If a rank has fewer shards than workers, its workers read all of the rank's shards and
    keep every W-th sample; if there are fewer shards than ranks, every reader reads all
    shards and keeps every (world*W)-th sample (eval only: train refuses this case)."""
    if len(urls) >= world_size:
        mine = list(urls[rank::world_size])
        if len(mine) >= num_workers:
            return mine[worker::num_workers], 1, 0
        return mine, num_workers, worker
    g = world_size * num_workers
    return list(urls), g, rank * num_workers + worker


def _read(urls: Sequence[str], counts: Counter, modulus: int, remainder: int,
          io: Optional[ShardIO] = None) -> Iterator[dict]:
    i = 0
    for url in urls:
        for s in S.iter_shard(url, counts, io):
            if modulus == 1 or i % modulus == remainder:
                yield s
            i += 1


# ----------------------------------------------------------------------------- loader
class StreamingLoader:
    """Iterable of (images, targets) of the eval stream; wraps a torch DataLoader(batch_size=None).
    Workers hand over uint8 images; with a `feed` (feed.DeviceFeed) they come out normalised
    on `device` (None: the current CUDA device, else the CPU)."""

    def __init__(self, dataset, *, num_workers, pin_memory, prefetch_factor, pattern, timeout_s=0.0,
                 feed=None, device=None):
        self.dataset = dataset
        self.pattern = pattern
        self.feed, self.device = feed, device
        self._counts: Dict[int, Dict[str, int]] = {}
        self._seen: Dict[int, int] = {}
        kw = dict(batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                  worker_init_fn=_worker_init)
        if num_workers > 0:
            kw["prefetch_factor"] = prefetch_factor
            kw["timeout"] = timeout_s
        self.loader = DataLoader(dataset, **kw)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        self._counts, self._seen = {}, {}
        n = 0
        it = iter(self.loader)
        try:
            for images, targets, stats in it:
                self._counts[stats["worker"]] = stats["counts"]
                self._seen[stats["worker"]] = stats["seen"]
                if targets.numel() == 0:  # count-only message from a worker at its end
                    continue
                n += 1
                yield (images if self.feed is None else self.feed(images, self.device)), targets
        finally:
            # Stop workers now: a worker error's traceback keeps the iterator alive, and
            # workers forked later would inherit it (and try to reap it at exit).
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            del it
        if n == 0:
            raise DataPipelineError(
                f"shard pattern {self.pattern!r} yielded no sample on this rank "
                f"(bad counts: {self.bad_samples()})")

    def bad_samples(self) -> Dict[str, int]:
        """Bad-sample counts by reason, summed over workers, for the batches yielded so far
        (remote-read retries, which are not bad input, left out)."""
        total: Counter = Counter()
        for c in self._counts.values():
            total.update(c)
        return {k: v for k, v in total.items() if k not in S.IO_EVENTS}

    def samples_seen(self) -> int:
        return sum(self._seen.values())


def _worker_init(_):
    torch.set_num_threads(1)  # decode is per-sample; avoid W x cores oversubscription


# ----------------------------------------------------------------------------- eval
class _EvalStream(IterableDataset):
    def __init__(self, urls, cfg, transform, *, pattern, rank, world_size, num_workers, batch_size, labels=True):
        self.urls, self.cfg, self.transform, self.pattern = list(urls), cfg, transform, pattern
        self.labels = labels
        self.rank, self.world_size, self.W, self.batch_size = rank, world_size, max(1, num_workers), batch_size

    def __iter__(self):
        d, _ = _worker_id()
        tracker = BadSampleTracker(self.cfg.max_bad_fraction, self.cfg.bad_window,
                                   f"eval shards {self.pattern!r} (rank {self.rank}, worker {d})")
        decoder = _Decoder(self.cfg, self.transform, tracker, ("eval",), labels=self.labels)
        mine, mod, rem = assign_shards(self.urls, self.rank, self.world_size, d, self.W)
        out: list = []

        def emit():
            images = torch.stack([x for (x, _), _ in out])  # uint8; the eval transform erases nothing
            targets = torch.tensor([y for _, y in out], dtype=torch.int64)
            return images, targets, {"worker": d, "counts": dict(tracker.counts), "seen": tracker.seen}

        for s in _read(mine, tracker.counts, mod, rem, ShardIO.of(self.cfg)):
            r = decoder(s)
            if r is None:
                continue
            out.append(r)
            if len(out) == self.batch_size:
                yield emit()
                out = []
        if out:  # partial last batch: eval never drops samples
            yield emit()
        elif tracker.counts:  # no batch left to carry the final counts: send an empty one
            yield (torch.empty(0), torch.empty(0, dtype=torch.int64),
                   {"worker": d, "counts": dict(tracker.counts), "seen": tracker.seen})


def build_eval_loader(cfg, *, img_size: int, batch_size: int, rank: int, world_size: int,
                      labels: bool = True, device=None) -> StreamingLoader:
    """Eval loader of one rank: every sample exactly once across ranks, in fixed shard order,
    partial last batches (per worker), nothing dropped except counted bad samples. Ranks may
    yield different numbers of batches: reduce metrics once at the end. `labels=False`: `.cls`
    is not read (unlabeled val shards; targets are NO_LABEL). Images come out normalised on
    `device` (None: the current CUDA device, else the CPU); the workers hand over uint8."""
    cfg = as_data_config(cfg).resolved()
    if world_size < 1 or not 0 <= rank < world_size or batch_size < 1:
        raise ValueError(f"bad rank/world_size/batch_size: {rank}/{world_size}/{batch_size}")
    cfg = resolve_sources(cfg, ("val",))
    pattern = cfg.val_shards
    urls = S.expand_shards(pattern)
    loader = StreamingLoader(
        _EvalStream(urls, cfg, build_transform(cfg, img_size, train=False), pattern=pattern,
                    rank=rank, world_size=world_size, num_workers=cfg.num_workers,
                    batch_size=batch_size, labels=labels),
        num_workers=cfg.num_workers, pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        prefetch_factor=cfg.prefetch_factor, pattern=pattern, timeout_s=cfg.timeout_s,
        feed=build_feed(cfg), device=device or default_device())
    loader.num_samples = cfg.val_samples
    return loader
