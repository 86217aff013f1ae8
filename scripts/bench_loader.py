"""Data-loader throughput: images/s of ONE worker (decode + full transform) per crop size.

    python scripts/bench_loader.py                       # temporary 500x375 JPEG shards
    python scripts/bench_loader.py --shards '/d/train-{000000..000009}.tar' --json out.json

One worker = one process, so a node needs about (GPU images/s) / (images/s per worker)
workers. `--loader-workers N` additionally times the trainer's stream (TrainStream) with N workers.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter

import numpy as np

from swinv2_tools.bench_meta import bench_metadata, summary_line


def make_bench_shards(out_dir: str, n: int, width: int = 500, height: int = 375,
                      per_shard: int = 64) -> str:
    """Photo-like JPEGs (smooth colour fields + fine noise, ~ImageNet file sizes)."""
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    n_shards = (n + per_shard - 1) // per_shard
    idx = 0
    for sh in range(n_shards):
        with wds.TarWriter(os.path.join(out_dir, f"bench-{sh:06d}.tar"), encoder=False) as tw:
            for _ in range(min(per_shard, n - idx)):
                low = rng.uniform(0, 255, size=(12, 16, 3)).astype(np.uint8)
                img = Image.fromarray(low).resize((width, height), Image.BICUBIC)
                arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 12, (height, width, 3))
                buf = io.BytesIO()
                Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
                tw.write({"__key__": f"b{idx:07d}", "jpg": buf.getvalue(), "cls": str(idx % 1000).encode()})
                idx += 1
    return os.path.join(out_dir, f"bench-{{000000..{n_shards - 1:06d}}}.tar")


def per_worker_rate(samples, transform, seconds_min: float = 0.0) -> float:
    t0 = time.perf_counter()
    n = 0
    for i, s in enumerate(samples):
        transform(s["jpg"], random.Random(i))
        n += 1
    return n / (time.perf_counter() - t0)


def train_stream_rate(pattern: str, n: int, augment: str, crop: int, workers: int) -> float:
    """images/s of one epoch of the trainer's stream (TrainStream) on one rank with `workers`
    DataLoader workers: one canonical stream per worker, 16 images per stream per batch (the
    pattern needs at least `workers` shards)."""
    from swinv2_train.data import DataConfig, TrainStream

    cfg = DataConfig(augment=augment, train_shards=pattern, num_workers=workers, canonical_streams=workers,
                     train_samples=n, num_classes=1000, shuffle_buffer=64)
    stream = TrainStream(cfg, img_size=crop, global_batch=16 * workers, grad_accum=1, rank=0, world_size=1, seed=0)
    t0 = time.perf_counter()
    got = sum(len(stream.next_batch()[1]) for _ in range(stream.batches_per_epoch))
    rate = got / (time.perf_counter() - t0)
    stream.close()
    return rate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--shards", help="shard pattern (default: generate temporary shards)")
    ap.add_argument("--num-images", type=int, default=256, help="images per measurement")
    ap.add_argument("--crops", type=int, nargs="+", default=[192, 256, 384])
    ap.add_argument("--augment", default="imagenet", help="DataConfig.augment preset")
    ap.add_argument("--loader-workers", type=int, default=0,
                    help="also time the train stream (TrainStream) with this many workers (0: skip)")
    ap.add_argument("--json", help="write the results to this JSON file")
    args = ap.parse_args(argv)

    import torch

    from swinv2_train.data.config import DataConfig
    from swinv2_train.data.shards import expand_shards, iter_shard
    from swinv2_train.data.transforms import build_transform

    torch.set_num_threads(1)  # a loader worker runs single-threaded
    meta = bench_metadata(__file__, argv, packages=["PIL"], augment=args.augment)
    tmp = None
    pattern = args.shards
    if pattern is None:
        tmp = tempfile.TemporaryDirectory(prefix="swinv2-bench-")
        pattern = make_bench_shards(tmp.name, args.num_images)
    samples = []
    for url in expand_shards(pattern):
        for s in iter_shard(url, Counter()):
            samples.append(s)
            if len(samples) >= args.num_images:
                break
        if len(samples) >= args.num_images:
            break
    avg_kb = sum(len(s.get("jpg", b"")) for s in samples) / max(1, len(samples)) / 1024
    cfg = DataConfig(augment=args.augment).resolved()
    rows = []
    for crop in args.crops:
        row = {"crop": crop}
        for name, c, train in (("train", cfg, True),
                               ("train_nodraft", DataConfig(augment=args.augment, jpeg_draft=False).resolved(), True),
                               ("eval", cfg, False)):
            tf = build_transform(c, crop, train=train)
            per_worker_rate(samples[:8], tf)  # warm-up
            row[name] = round(per_worker_rate(samples, tf), 1)
        if args.loader_workers:
            row[f"loader_{args.loader_workers}w"] = round(train_stream_rate(
                pattern, len(samples), args.augment, crop, args.loader_workers), 1)
        rows.append(row)
    meta.update(images=len(samples), avg_jpeg_kb=round(avg_kb, 1))
    cols = list(rows[0].keys())
    print(summary_line(meta))
    print(f"images/s per worker ({meta['images']} images, avg {meta['avg_jpeg_kb']} KB, "
          f"augment={args.augment}, 1 thread)")
    print(" | ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]:>14}" for c in cols))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
