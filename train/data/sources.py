"""Where the data comes from, decided in one place: `resolve_sources(cfg) -> DataConfig`.

The returned copy has explicit `train_shards`, `val_shards`, `train_samples`, `val_samples` and
`num_classes`, so the loaders never look anything up again (no per-epoch recount). Per split
(train, val), the first of these that is given wins:

1. An explicit shard pattern (`data.train_shards` / `data.val_shards`). It wins over
   `data.root` for its split, so a preset's root can be overridden one split at a time. An
   `_info.json` beside the shards gives the sample count and the class count.
2. `data.root`, a directory of shards:
   - with `_info.json` (written by `swinv2-make-shards`, or timm's webdataset layout
     `{"num_classes": N, "splits": {"train": {"name", "num_samples", "filenames",
     "shard_lengths"}, ...}}`): the split named `data.train_split` / `data.val_split` gives
     the shard files and counts;
   - without `_info.json`: every `*.tar` in it, assigned to a split by the last word of its
     name before the shard number (`train-000000.tar` -> train, `imagenet1k-val-0003.tar` ->
     val). `val` and `validation` are the same split name everywhere. Samples are counted by
     reading the shards once, here, and one log line says how to write `_info.json`.
3. Neither root nor shards: the built-in synthetic dataset (generated once into a cache).

num_classes: an explicit `data.num_classes` must agree with every `_info.json` that states one
(else an error naming `data.num_classes`); null takes it from `_info.json` (10 for the synthetic
set). With no `_info.json` and no explicit value this is an error asking for `data.num_classes`:
we do not guess it from the labels seen, because a split may lack the highest classes.

`data.train_samples` / `data.val_samples`, when set, always win (e.g. the epoch length of a
resampled stream). Errors a user can cause are `DataSourceError`s whose message starts with the
dotted key to change.
"""
from __future__ import annotations

import collections
import dataclasses
import io as io_module
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

from PIL import Image

from ..errors import UserError
from . import remote
from . import shards as S
from .config import DataConfig, as_data_config
from .remote import ShardIO

log = logging.getLogger(__name__)

SPLITS = ("train", "val")  # the two sources a run needs: DataConfig fields <which>_shards etc.


class DataSourceError(UserError, ValueError):
    """The data sources are missing or contradict each other; the message starts with the key."""


def _fail(key: str, msg: str) -> None:
    raise DataSourceError(f"data.{key}: {msg}")


# ----------------------------------------------------------------------------- static checks
def check_sources(cfg: Any, splits: Tuple[str, ...] = SPLITS) -> DataConfig:
    """The checks that need no shard read: `validate()` of the trainer config runs these before
    any process starts, and `resolve_sources` runs them again (for the splits it resolves)."""
    cfg = as_data_config(cfg)
    if cfg.root is not None and all(_pattern(cfg, w) is not None for w in splits):
        return cfg  # explicit patterns win for every split asked for: root is not used
    if cfg.root is not None:
        if S.is_http(cfg.root):
            return cfg  # read (its _info.json) when resolved
        if not S.is_local(cfg.root):
            _fail("root", f"{cfg.root!r} must be a local directory or an http(s) URL of one (use "
                  f"data.train_shards / data.val_shards for pipe: or other shard URLs)")
        if not os.path.isdir(cfg.root):
            _fail("root", f"{cfg.root!r} is not a directory; give the directory holding the "
                  f"shards (and _info.json), e.g. the output directory of swinv2-make-shards")
        return cfg
    given = [w for w in SPLITS if _pattern(cfg, w) is not None]
    missing = [w for w in splits if w not in given]
    if given and missing:
        _fail(f"{missing[0]}_shards", f"required when data.{given[0]}_shards is set (or set "
              f"data.root to a directory that holds both splits)")
    if not given:  # the synthetic default
        from .synthetic import CLASSES

        if cfg.num_classes is not None and cfg.num_classes != len(CLASSES):
            _fail("num_classes", f"{cfg.num_classes}, but the built-in synthetic dataset (used "
                  f"when data.root and data.train_shards are null) has {len(CLASSES)} classes; "
                  f"set data.root to your shard directory, or data.num_classes=null")
    return cfg


# ----------------------------------------------------------------------------- resolution
@dataclasses.dataclass
class TrainCounts:
    """The train split's usable samples per shard, where they must be counted (no _info.json,
    no data.train_samples): the epoch length is what can be used, not the keys in the tars.

    `lengths` given (a resumed run's, from its data position) are used as they are, so a run
    keeps its epoch; else `resolve_sources` counts them, decoding every sample once, and fills
    `lengths` for the caller to keep. `labels`: a sample needs a valid label to count (not for
    SimMIM). `keys_only`: count keys, as before usable counting, for a run begun with such a
    version (its position has no lengths): its epoch stays what it was."""

    lengths: Optional[List[int]] = None
    labels: bool = True
    keys_only: bool = False

    @classmethod
    def of_position(cls, position: Optional[Dict[str, Any]], labels: bool) -> "TrainCounts":
        if position is None:
            return cls(labels=labels)
        if "shard_lengths" in position:
            return cls([int(n) for n in position["shard_lengths"]], labels)
        return cls(labels=labels, keys_only=True)


def resolve_sources(cfg: Any, splits: Tuple[str, ...] = SPLITS,
                    train_counts: Optional[TrainCounts] = None) -> DataConfig:
    """Copy of `cfg` (DataConfig, dict or OmegaConf node) with shards, sample counts and
    num_classes filled for `splits` (default both; the loaders ask for the one they read).
    See the module docstring for the rules; `train_counts` (the train stream's): count the usable
    train samples per shard where counting is needed (see TrainCounts)."""
    cfg = check_sources(cfg, splits)
    if cfg.root is None and all(_pattern(cfg, w) is None for w in SPLITS):
        return _synthetic(cfg)
    uses_root = cfg.root is not None and any(_pattern(cfg, w) is None for w in splits)
    io = ShardIO.of(cfg)
    info = _RootInfo(cfg.root, io) if uses_root else None
    # the class count first: a missing one fails before any slow counting pass
    stated = [c for c in (_split_classes(cfg, w, info, io) for w in splits) if c is not None]
    changes: Dict[str, Any] = {"num_classes": _num_classes(cfg, stated, info)}
    counted: List[str] = []
    for which in splits:
        counter = _SampleCounter(io, changes["num_classes"], cfg.num_workers,
                                 train_counts if which == "train" else None)
        pattern, samples, was_counted = _resolve_split(cfg, which, info, counter)
        changes[f"{which}_shards"], changes[f"{which}_samples"] = pattern, samples
        if was_counted:
            counted.append(f"{samples} {which}")
    if counted and info is not None and info.info is None:
        log.warning("%s has no _info.json: counted %s samples by reading every shard (once per "
                    "run); write it with `swinv2-make-shards --info-only %s` to skip this",
                    cfg.root, " + ".join(counted), cfg.root)
    elif counted:
        log.warning("no _info.json beside the shards: counted %s samples by reading every shard "
                    "(once per run); set data.train_samples / data.val_samples to skip this",
                    " + ".join(counted))
    return dataclasses.replace(cfg, **changes)


def _pattern(cfg: DataConfig, which: str) -> Optional[str]:
    return getattr(cfg, f"{which}_shards")


def _split_classes(cfg: DataConfig, which: str, info: Optional["_RootInfo"], io: ShardIO
                   ) -> Optional[Tuple[int, str]]:
    """(num_classes, the _info.json that states it) for the source of one split, or None."""
    pattern = _pattern(cfg, which)
    if pattern is not None:
        return _stated_classes(S.info_path(pattern, io), io)
    return info.classes if info is not None else None


def _resolve_split(cfg: DataConfig, which: str, info: Optional["_RootInfo"], counter: "_SampleCounter"
                   ) -> Tuple[str, int, bool]:
    """(pattern, samples, whether the samples were counted by reading the shards)."""
    explicit = getattr(cfg, f"{which}_samples")
    split = getattr(cfg, f"{which}_split")
    pattern = _pattern(cfg, which)
    if pattern is not None:  # an explicit pattern wins over root for its split (spec.py says so, once)
        urls = S.expand_shards(pattern)
        samples = explicit or S.info_num_samples(pattern, split, urls, counter.io)
        counted = not samples
        samples = samples or counter.count(urls, f"data.{which}_shards", pattern)
        return pattern, int(samples), counted
    assert info is not None
    files, listed = info.split_files(split, f"{which}_split")
    pattern = compact_pattern(info.root, files)
    samples = explicit or listed
    counted = not samples
    samples = samples or counter.count(S.expand_shards(pattern), "data.root", info.root)
    return pattern, int(samples), counted


class _SampleCounter:
    """Counts a split's samples by reading its shards: keys, or for the train stream (with a
    TrainCounts) the usable samples per shard, decoded in `threads` threads (PIL releases the
    GIL while it decodes)."""

    def __init__(self, io: ShardIO, num_classes: int, threads: int, train: Optional[TrainCounts]):
        self.io, self.num_classes, self.threads, self.train = io, num_classes, max(1, threads), train

    def count(self, urls: List[str], key: str, where: str) -> int:
        if self.train is None or self.train.keys_only:
            n = S.count_samples(urls, self.io)
        else:
            n = sum(self._usable_lengths(urls, where))
        if n == 0:  # a data problem (unreadable shards), like an empty stream in the loader
            from .pipeline import DataPipelineError  # local: pipeline imports this module

            raise DataPipelineError(f"{key}: {where!r} contains no samples (no readable shard "
                                    f"with a usable sample in it)")
        return n

    def _usable_lengths(self, urls: List[str], where: str) -> List[int]:
        saved = self.train.lengths
        if saved is not None and len(saved) == len(urls):
            return saved
        if saved is not None:
            log.warning("the data position counts %d shards, %s has %d: counting them again",
                        len(saved), where, len(urls))
        usable = _usable_check(self.num_classes, self.train.labels)
        with ThreadPoolExecutor(self.threads) as pool:
            found = list(pool.map(lambda url: _count_shard(url, usable, self.io), urls))
        self.train.lengths = [good for good, _ in found]
        keys = sum(n for _, n in found)
        log.info("%s: %d usable train samples of %d in %d shards, counted once by decoding each "
                    "(kept in each checkpoint's data position)", where, sum(self.train.lengths),
                    keys, len(urls))
        return self.train.lengths


def _count_shard(url: str, usable, io: ShardIO) -> Tuple[int, int]:
    """(usable samples, all samples) of one shard."""
    good = n = 0
    for sample in S.iter_shard(url, collections.Counter(), io):
        n += 1
        good += usable(sample)
    return good, n


def _usable_check(num_classes: int, labels: bool):
    """sample -> whether the train stream can use it: an image that decodes (the checks of the
    decoder; JPEGs decoded at 1/8 scale, which still reads all their data) and, with `labels`,
    a label in range."""
    from .pipeline import image_bytes, parse_label  # local: pipeline imports this module

    def usable(sample) -> bool:
        if labels and parse_label(sample, num_classes, None)[1] is not None:
            return False
        data = image_bytes(sample)
        if data is None:
            return False
        try:
            img = Image.open(io_module.BytesIO(data))
            img.draft("RGB", (1, 1))
            img.load()
            return img.size[0] >= 1 and img.size[1] >= 1
        except Exception:  # what the decoder counts as a corrupt image
            return False

    return usable


def _stated_classes(info_file: Optional[str], io: ShardIO) -> Optional[Tuple[int, str]]:
    if info_file is None:
        return None
    n = S.read_info(info_file, io).get("num_classes")
    return (int(n), info_file) if n is not None else None


def _num_classes(cfg: DataConfig, stated: List[Tuple[int, str]], info: Optional["_RootInfo"]) -> int:
    values = {n for n, _ in stated}
    where = ", ".join(sorted({f"{path} says {n}" for n, path in stated}))
    if cfg.num_classes is not None:
        if values - {cfg.num_classes}:
            _fail("num_classes", f"{cfg.num_classes} contradicts _info.json ({where}); set "
                  f"data.num_classes=null to take it from _info.json, or fix the file")
        return cfg.num_classes
    if len(values) > 1:
        _fail("num_classes", f"the _info.json files disagree ({where}); set data.num_classes")
    if not values:
        shard_dir = info.root if info is not None else "DIR"
        _fail("num_classes", f"required: no _info.json states the number of classes; set "
              f"data.num_classes=N, or write _info.json with `swinv2-make-shards --info-only "
              f"{shard_dir}`")
    return values.pop()


def _synthetic(cfg: DataConfig) -> DataConfig:
    from .synthetic import ensure_synthetic_shards

    syn = ensure_synthetic_shards(cfg.synthetic_dir)
    return dataclasses.replace(
        cfg, train_shards=syn["train_shards"], val_shards=syn["val_shards"],
        train_samples=cfg.train_samples or syn["train_samples"],
        val_samples=cfg.val_samples or syn["val_samples"], num_classes=syn["num_classes"])


# ----------------------------------------------------------------------------- data.root
class _RootInfo:
    """A shard directory, local or over http(s): its `_info.json` (None when absent; required
    over http, where no directory can be listed) and its `*.tar` files."""

    def __init__(self, root: str, io: ShardIO):
        if S.is_http(root):
            self.root = root.rstrip("/")
            self.info_file = _http_info(self.root, io)
        else:
            self.root = os.path.abspath(os.path.expanduser(root))
            path = os.path.join(self.root, "_info.json")
            self.info_file = path if os.path.exists(path) else None
        self.info = S.read_info(self.info_file, io) if self.info_file else None
        self.classes = _stated_classes(self.info_file, io)

    def split_files(self, split: str, key: str) -> Tuple[List[str], Optional[int]]:
        """(shard file names of `split`, its sample count or None when it must be counted)."""
        if self.info is not None:
            return self._from_info(split, key)
        return self._by_name(split, key), None

    def _from_info(self, split: str, key: str) -> Tuple[List[str], Optional[int]]:
        splits = self.info["splits"]
        name = next((n for n in S.split_names(split) if n in splits), None)
        if name is None:
            _fail(key, f"no split {split!r} in {self.info_file}; splits present: "
                  f"{', '.join(sorted(map(str, splits))) or 'none'}")
        sp = splits[name]
        files = sp.get("filenames") or []
        if isinstance(files, str):  # a brace pattern instead of a list
            files = S.expand_urls(files)
        if not files:
            _fail(key, f"split {name!r} in {self.info_file} lists no shard files ('filenames')")
        lengths = sp.get("shard_lengths") or []
        n = sp.get("num_samples") or (sum(lengths) if len(lengths) == len(files) else None)
        return list(files), (int(n) if n else None)

    def _by_name(self, split: str, key: str) -> List[str]:
        tars = sorted(f for f in os.listdir(self.root) if f.endswith(".tar"))
        if not tars:
            _fail("root", f"{self.root} holds no _info.json and no .tar shards")
        wanted = S.split_names(split)
        files = [f for f in tars if S.shard_split_name(f) in wanted]
        if not files:
            present = sorted({S.shard_split_name(f) or "(no name)" for f in tars})
            _fail(key, f"no shard in {self.root} is named for split {split!r} (no _info.json, "
                  f"so a shard's split is the word before its number, e.g. {split}-000000.tar); "
                  f"splits present: {', '.join(present)}")
        return files


def _http_info(root: str, io: ShardIO) -> str:
    """URL of the `_info.json` of an http(s) shard directory; an error naming data.root when the
    server does not have it or cannot be reached (after the retries)."""
    url = f"{root}/_info.json"
    try:
        found = remote.read_small_file(url, io) is not None
    except remote.RemoteReadError as e:
        _fail("root", f"{e}; check that the server is up and the URL right "
              f"(data.io_retries / data.io_timeout_s set how long it is tried)")
    if not found:
        _fail("root", f"{url} does not exist: an http(s) data.root needs the _info.json that "
              f"swinv2-make-shards writes beside the shards (an http directory cannot be listed); "
              f"copy it there (or write it with `swinv2-make-shards --info-only DIR` where the "
              f"shards are), or give data.train_shards / data.val_shards patterns")
    return url


def compact_pattern(root: str, files: List[str]) -> str:
    """Shard list as a short brace pattern when the names are consecutively numbered
    (readable in logs and errors), else the '::'-joined paths."""
    paths = [os.path.join(root, f) for f in files]
    parts = [re.fullmatch(r"(.*?)(\d+)\.tar", p) for p in paths]
    plain = not re.search(r"[{}]|::", "".join(paths))  # no brace or list syntax to escape
    if len(paths) > 1 and all(parts) and plain:
        prefixes = {m.group(1) for m in parts}
        widths = {len(m.group(2)) for m in parts}
        numbers = [int(m.group(2)) for m in parts]
        if len(prefixes) == 1 and len(widths) == 1 and numbers == list(
                range(numbers[0], numbers[0] + len(numbers))):
            first, last = parts[0].group(2), parts[-1].group(2)
            return f"{prefixes.pop()}{{{first}..{last}}}.tar"
    return "::".join(paths)
