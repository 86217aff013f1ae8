"""The embedded default dataset: small, learnable, generated once into a cache directory.

10 classes, each a shape/texture family with a class-biased (not constant) colour, drawn at a
random position and scale over a noisy random background, 64x64 JPEG. Fixed seed, so every
machine generates the same data. Concurrency: generate into a private temp dir and rename it
into place (atomic; a loser of the race discards its copy), under an advisory lock so
concurrent ranks usually wait instead of generating in parallel.
"""
from __future__ import annotations

import colorsys
import io
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

VERSION = "synthetic-v1"
CLASSES = ["disc", "square", "triangle", "cross", "ring", "hstripes", "vstripes", "checker",
           "diagonal", "dots"]
NUM_TRAIN_SHARDS, NUM_VAL_SHARDS = 8, 2
TRAIN_PER_SHARD, VAL_PER_SHARD = 512, 256
SIZE = 64

log = logging.getLogger(__name__)


def default_cache_root() -> str:
    return os.environ.get("SWINV2_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "swinv2")


def _draw(cls: int, rng: np.random.Generator) -> Image.Image:
    # noisy background of a random dull colour
    bg = rng.integers(0, 110, size=3)
    arr = np.clip(bg + rng.normal(0, 18, size=(SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(img)
    hue = (cls / len(CLASSES) + rng.uniform(-0.04, 0.04)) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.75, 1.0))
    col = (int(r * 255), int(g * 255), int(b * 255))
    s = rng.uniform(0.3, 0.48) * SIZE  # half-extent
    cx, cy = rng.uniform(s * 0.7, SIZE - s * 0.7, size=2)
    box = [cx - s, cy - s, cx + s, cy + s]
    w = max(2, int(s / 4))
    name = CLASSES[cls]
    if name == "disc":
        d.ellipse(box, fill=col)
    elif name == "square":
        d.rectangle(box, fill=col)
    elif name == "triangle":
        d.polygon([(cx, cy - s), (cx - s, cy + s), (cx + s, cy + s)], fill=col)
    elif name == "cross":
        d.rectangle([cx - s, cy - w, cx + s, cy + w], fill=col)
        d.rectangle([cx - w, cy - s, cx + w, cy + s], fill=col)
    elif name == "ring":
        d.ellipse(box, outline=col, width=w)
    elif name in ("hstripes", "vstripes"):
        period = max(4, int(s / 2.5))
        for k in range(int(-s), int(s), period):
            if name == "hstripes":
                d.rectangle([cx - s, cy + k, cx + s, cy + k + period // 2], fill=col)
            else:
                d.rectangle([cx + k, cy - s, cx + k + period // 2, cy + s], fill=col)
    elif name == "checker":
        c = max(3, int(s / 2.5))
        for i, y in enumerate(range(int(cy - s), int(cy + s), c)):
            for j, x in enumerate(range(int(cx - s), int(cx + s), c)):
                if (i + j) % 2 == 0:
                    d.rectangle([x, y, x + c - 1, y + c - 1], fill=col)
    elif name == "diagonal":
        d.line([(cx - s, cy - s), (cx + s, cy + s)], fill=col, width=w + 1)
        d.line([(cx - s, cy - s + 2 * w), (cx + s - 2 * w, cy + s)], fill=col, width=max(1, w // 2))
    elif name == "dots":
        for _ in range(int(rng.integers(5, 9))):
            px, py = rng.uniform(cx - s, cx + s), rng.uniform(cy - s, cy + s)
            rr = s / 5
            d.ellipse([px - rr, py - rr, px + rr, py + rr], fill=col)
    return img


def _write_split(out_dir: str, prefix: str, n_shards: int, per_shard: int, seed: int):
    import webdataset as wds

    rng = np.random.default_rng(seed)
    files, lengths = [], []
    idx = 0
    for sh in range(n_shards):
        fn = f"{prefix}-{sh:06d}.tar"
        with wds.TarWriter(os.path.join(out_dir, fn), encoder=False, mtime=0) as tw:
            for _ in range(per_shard):
                cls = idx % len(CLASSES)  # balanced classes; the reader shuffles
                buf = io.BytesIO()
                _draw(cls, rng).save(buf, format="JPEG", quality=90)
                tw.write({"__key__": f"{prefix}_{idx:06d}", "jpg": buf.getvalue(),
                          "cls": str(cls).encode()})
                idx += 1
        files.append(fn)
        lengths.append(per_shard)
    return dict(name=prefix if prefix == "train" else "validation", num_samples=idx,
                filenames=files, shard_lengths=lengths)


def _result(d: str) -> dict:
    return dict(
        train_shards=os.path.join(d, f"train-{{000000..{NUM_TRAIN_SHARDS - 1:06d}}}.tar"),
        val_shards=os.path.join(d, f"val-{{000000..{NUM_VAL_SHARDS - 1:06d}}}.tar"),
        num_classes=len(CLASSES), train_samples=NUM_TRAIN_SHARDS * TRAIN_PER_SHARD,
        val_samples=NUM_VAL_SHARDS * VAL_PER_SHARD, dir=d)


def _complete(d: str) -> bool:
    return os.path.exists(os.path.join(d, "_info.json"))


def ensure_synthetic_shards(cache_dir: Optional[str] = None, *, seed: int = 0) -> dict:
    """Generate the default dataset once under `cache_dir/synthetic-v1` and return
    dict(train_shards, val_shards, num_classes, train_samples, val_samples, dir)."""
    root = os.path.abspath(cache_dir or default_cache_root())
    final = os.path.join(root, VERSION if seed == 0 else f"{VERSION}-seed{seed}")
    if _complete(final):
        return _result(final)
    os.makedirs(root, exist_ok=True)
    with _FileLock(final + ".lock"):
        if _complete(final):  # someone else finished while we waited
            return _result(final)
        # first run only (later runs return above, quietly): say what the pause is
        log.info("generating the built-in synthetic dataset (%d classes, %d train + %d val "
                 "images, once) into %s", len(CLASSES), NUM_TRAIN_SHARDS * TRAIN_PER_SHARD,
                 NUM_VAL_SHARDS * VAL_PER_SHARD, final)
        started = time.monotonic()
        tmp = tempfile.mkdtemp(prefix=f".{VERSION}.tmp-", dir=root)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the cache may be shared
        try:
            splits = {
                "train": _write_split(tmp, "train", NUM_TRAIN_SHARDS, TRAIN_PER_SHARD, seed),
                "validation": _write_split(tmp, "val", NUM_VAL_SHARDS, VAL_PER_SHARD, seed + 1),
            }
            with open(os.path.join(tmp, "classes.json"), "w") as f:
                json.dump(CLASSES, f)
            with open(os.path.join(tmp, "_info.json"), "w") as f:
                json.dump({"name": VERSION, "num_classes": len(CLASSES), "splits": splits}, f, indent=1)
            if os.path.isdir(final) and not _complete(final):
                shutil.rmtree(final, ignore_errors=True)  # debris of a foreign partial copy
            try:
                os.rename(tmp, final)  # atomic publish; fails if another process won
            except OSError:
                if not _complete(final):
                    raise
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        log.info("synthetic dataset ready in %.1f s: %s", time.monotonic() - started, final)
    return _result(final)


class _FileLock:
    """Advisory flock; a no-op where flock is unavailable (rename still keeps it correct)."""

    def __init__(self, path: str, timeout: float = 600.0):
        self.path, self.timeout, self.fd = path, timeout, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:
            return self
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except OSError:
                if time.monotonic() > deadline:
                    return self  # give up waiting; atomic rename still protects the result
                time.sleep(0.1)

    def __exit__(self, *exc):
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
