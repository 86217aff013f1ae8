"""Shard lists and a fault-tolerant tar reader.

We read tars ourselves (tarfile in stream mode) instead of using `wds.tarfile_samples`, because
every failure must be *counted by reason* and a truncated archive must cost only the rest of that
shard. Local files are opened directly; http(s) and `pipe:` shards go through `remote.py`, our own
opener with bounded retries (`data.io_retries`) and a stall limit (`data.io_timeout_s`) instead of
webdataset's curl (`--retry 30`, no time limit); any other scheme goes to `webdataset.gopen`.
"""
from __future__ import annotations

import json
import os
import re
import tarfile
from collections import Counter
from typing import Dict, Iterator, List, Optional, Tuple
from urllib.parse import urlparse

import webdataset as wds
from webdataset.shardlists import expand_urls

from ..errors import UserError
from . import remote
from .remote import ShardIO

# Reasons used in bad-sample counts (public: loader.bad_samples() keys).
CORRUPT_IMAGE = "corrupt_image"
MISSING_IMAGE = "missing_image"
BAD_LABEL = "bad_label"              # missing or non-integer .cls
LABEL_OUT_OF_RANGE = "label_out_of_range"
UNMAPPED_LABEL = "unmapped_label"    # class_map given and the class is not in it
TRUNCATED_TAR = "truncated_tar"      # per shard: rest of the shard lost
UNREADABLE_SHARD = "unreadable_shard"  # per shard: could not be opened / not a tar
# Per-shard events are not samples: they do not enter the bad-fraction window.
SHARD_REASONS = (TRUNCATED_TAR, UNREADABLE_SHARD)
# I/O events, counted in the same Counter but not bad input: reported as data/io/<name>.
IO_RETRIES = remote.IO_RETRIES     # a remote read tried again (after a drop, a stall, a 5xx)
IO_EVENTS = (IO_RETRIES,)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def is_local(url: str) -> bool:
    scheme = urlparse(url).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def is_http(url: str) -> bool:
    return urlparse(str(url)).scheme in ("http", "https")


class ShardPatternError(UserError, FileNotFoundError):
    """A shard pattern names no shard (empty, or no local file exists)."""


# the way out of a ShardPatternError, in one place
_FIX_PATTERN = ("fix the path or the {a..b} range in data.train_shards / data.val_shards, or "
                "point data.root at the shard directory")


def expand_shards(pattern: str, *, check_local: bool = True) -> List[str]:
    """Brace-expand `pattern` ('::' joins several). Local paths must exist (clear error)."""
    if not pattern or not str(pattern).strip():
        raise ShardPatternError(f"empty shard pattern {pattern!r}: {_FIX_PATTERN}")
    urls = expand_urls(str(pattern))
    if not urls:
        raise ShardPatternError(f"shard pattern {pattern!r} expands to no shards: {_FIX_PATTERN}")
    if check_local:
        local = [u for u in urls if is_local(u)]
        missing = [u for u in local if not os.path.exists(_local_path(u))]
        if local and len(missing) == len(local):
            raise ShardPatternError(
                f"shard pattern {pattern!r} matches no existing file ({len(urls)} expanded, "
                f"e.g. {missing[0]!r} does not exist): {_FIX_PATTERN}")
    return urls


def _local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file:") else url


def info_path(pattern: str, io: Optional[ShardIO] = None) -> Optional[str]:
    """`_info.json` beside the shards (timm convention): a local file, or over http(s) when the
    server has it (one GET, with the shards' retries); None for other schemes or when absent."""
    first = expand_urls(str(pattern))[0]
    if is_http(first):
        url = first.rsplit("/", 1)[0] + "/_info.json"
        return url if remote.read_small_file(url, io or ShardIO.default()) is not None else None
    if not is_local(first):
        return None
    p = os.path.join(os.path.dirname(_local_path(first)), "_info.json")
    return p if os.path.exists(p) else None


def info_num_samples(pattern: str, split: str, urls: List[str], io: Optional[ShardIO] = None
                     ) -> Optional[int]:
    """Samples of `urls` per `_info.json` (sum of shard_lengths of the listed files)."""
    lengths = info_shard_lengths(pattern, split, urls, io)
    return None if lengths is None else sum(lengths)


def info_shard_lengths(pattern: str, split: str, urls: List[str], io: Optional[ShardIO] = None
                       ) -> Optional[List[int]]:
    """Samples of each of `urls` per `_info.json` (its shard_lengths), or None if not listed."""
    p = info_path(pattern, io)
    if p is None:
        return None
    splits = read_info(p, io)["splits"]
    names = [_basename(u) for u in urls]
    named = [splits[n] for n in split_names(split) if n in splits]
    for sp in named + list(splits.values()):
        files = sp.get("filenames") or []
        if isinstance(files, str):  # a brace pattern instead of a list
            files = expand_urls(files)
        lengths = sp.get("shard_lengths") or []
        if files and len(files) == len(lengths) and set(names) <= set(files):
            by_name = dict(zip(files, lengths))
            return [int(by_name[n]) for n in names]
    return None


# "val" and "validation" name the same split (timm writes "validation", many tools "val").
SPLIT_ALIASES = {"val": ("val", "validation"), "validation": ("validation", "val")}


def split_names(split: str) -> Tuple[str, ...]:
    """The names under which `split` may appear (in _info.json or in shard file names)."""
    return SPLIT_ALIASES.get(split, (split,))


def shard_split_name(filename: str) -> Optional[str]:
    """The split a shard file belongs to by its name: the last word before the shard number.

    train-000000.tar -> train, imagenet1k-validation-0003.tar -> validation, val_7.tar -> val,
    train.tar -> train; 000001.tar -> None (no word)."""
    stem = os.path.basename(filename)
    if stem.endswith(".tar"):
        stem = stem[:-4]
    stem = stem.rstrip("0123456789").rstrip("-_.")
    word = re.split(r"[-_.]", stem)[-1] if stem else ""
    return word or None


def _basename(url: str) -> str:
    return urlparse(url).path.rsplit("/", 1)[-1] if is_http(url) else os.path.basename(_local_path(url))


def read_info(path: str, io: Optional[ShardIO] = None) -> dict:
    """`_info.json` (a path or an http(s) URL) with `splits` as a {name: split} dict (a list of
    split dicts is accepted)."""
    if is_http(path):
        text = remote.read_small_file(path, io or ShardIO.default())
        if text is None:
            raise FileNotFoundError(f"{path}: not found (HTTP 404)")
        info = json.loads(text)
    else:
        with open(path) as f:
            info = json.load(f)
    splits = info.get("splits") or {}
    if isinstance(splits, list):
        splits = {sp.get("name"): sp for sp in splits}
    info["splits"] = splits
    return info


def count_samples(urls: List[str], io: Optional[ShardIO] = None) -> int:
    """Count samples by reading the shards (slow path when no `_info.json`)."""
    n = 0
    for url in urls:
        for _ in iter_shard(url, Counter(), io):
            n += 1
    return n


class _CountingReader:
    """Byte-counting file wrapper: lets us see whether the end-of-archive marker was present."""

    def __init__(self, f):
        self.f, self.n = f, 0

    def read(self, size=-1):
        b = self.f.read(size)
        self.n += len(b)
        return b


def split_name(name: str) -> Tuple[str, str]:
    """webdataset key convention: key = path up to the first '.' of the basename."""
    d, base = os.path.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return (os.path.join(d, stem) if d else stem), ext.lower()


def open_shard(url: str, io: ShardIO, counts: Counter):
    """A readable binary stream of one shard: local file, remote (http(s), pipe:) with retries,
    or webdataset's opener for other schemes. Raises OSError when it cannot be opened."""
    if is_local(url):
        return open(_local_path(url), "rb")
    if remote.handles(url):
        return remote.open_remote(url, io, counts)
    return wds.gopen(url, "rb")


def iter_shard(url: str, counts: Counter, io: Optional[ShardIO] = None) -> Iterator[Dict[str, bytes]]:
    """Yield encoded samples {"__key__", "__url__", ext: bytes} of one shard.

    Unopenable shard (after `io`'s retries for a remote one) -> counts[unreadable_shard] += 1,
    nothing yielded. Truncated archive, or a download cut short for good -> samples before the
    damage are yielded, the partial sample is dropped, counts[truncated_tar] += 1. Retries made
    are counted as counts[io_retries]. Never raises for data problems.
    """
    try:
        stream = open_shard(url, io or ShardIO.default(), counts)
    except Exception:
        counts[UNREADABLE_SHARD] += 1
        return
    reader = _CountingReader(stream)
    current: Optional[Dict[str, bytes]] = None
    try:
        try:
            tf = tarfile.open(fileobj=reader, mode="r|*")
        except Exception:
            counts[UNREADABLE_SHARD] += 1
            return
        try:
            for member in tf:
                if not member.isfile():
                    continue
                key, ext = split_name(member.name)
                if ext == "" or key.startswith("_") or os.path.basename(key).startswith("_"):
                    continue  # metadata files such as __index__ are not samples
                if current is not None and current["__key__"] != key:
                    yield current  # complete: a new key started (before reading, so a
                    current = None  # truncation inside this member cannot lose it)
                data = tf.extractfile(member).read()
                if current is None:
                    current = {"__key__": key, "__url__": url}
                current[ext] = data
            end = tf.offset
        except (tarfile.TarError, EOFError, OSError, zlib_error()):
            counts[TRUNCATED_TAR] += 1
            return
        # tarfile stops silently when a file is cut exactly at a member boundary; a real
        # archive always ends with >= 2 zero blocks, so fewer trailing bytes means truncation.
        try:
            while reader.read(1 << 16):
                pass
        except Exception:
            pass
        if reader.n < end + 1024:
            counts[TRUNCATED_TAR] += 1
            return
        if current is not None:
            yield current
    finally:
        try:
            stream.close()
        except Exception:
            pass


def zlib_error():
    import zlib

    return zlib.error
