"""Data-loader throughput per core: the old (reference) transform against the new one, in one run.

    python scripts/bench_loader.py                       # 500x375 q90 JPEGs, 192 and 224, ~2-3 min
    python scripts/bench_loader.py --quick               # seconds: a smoke run (the tests)
    python scripts/bench_loader.py --shards '/d/train-{000000..000009}.tar' --json out.json

On the same files and crop sizes, single-threaded (one loader worker = one process = one core):

* ceilings: decode only (Pillow), decode + one bicubic crop-resize with Pillow (the old resize) and
  with torch's antialiased uint8 resize (the new one): no transform is faster than its ceiling;
* the old transform (`build_transform(reference=True)`: Pillow resize, float32 normalised, erasing
  in the worker) and the new one (uint8 out; normalisation and erasing on the device), for the
  `light` and `imagenet` presets, and new / old;
* the trainer's stream (TrainStream, one rank, no device) with 1 and 2 workers, and the bytes per
  image the workers hand to the main process (old: the reference's float32 output).

Each figure is the best of `--repeats` passes; within a pass the variants take turns every 16
images, so a loaded machine slows all of them alike; the spread of new/old over the passes
(min-max) is printed beside the ratios.
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

AUGMENTS = ("light", "imagenet")


def make_bench_shards(out_dir: str, n: int, width: int = 500, height: int = 375,
                      per_shard: int = 64, quality: int = 90) -> str:
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
                Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
                tw.write({"__key__": f"b{idx:07d}", "jpg": buf.getvalue(), "cls": str(idx % 1000).encode()})
                idx += 1
    return os.path.join(out_dir, f"bench-{{000000..{n_shards - 1:06d}}}.tar")


# ----------------------------------------------------------------------------- per-core variants
def ceilings(crop: int):
    """name -> fn(jpeg bytes, rng): decode only, and decode + one crop-resize (old / new resize)."""
    from PIL import Image

    from swinv2_train.data.transforms import _pixels, finish_decode, open_image, resize_u8, rrc_params

    def decode(data, rng):
        return finish_decode(open_image(data))

    def box(img, rng):
        return rrc_params(img.size[0], img.size[1], (0.08, 1.0), (3 / 4, 4 / 3), rng)

    def pil_resize(data, rng):
        img = decode(data, rng)
        top, left, h, w = box(img, rng)
        return img.resize((crop, crop), Image.BICUBIC, box=(left, top, left + w, top + h))

    def torch_resize(data, rng):
        img = decode(data, rng)
        top, left, h, w = box(img, rng)
        return resize_u8(_pixels(img)[top:top + h, left:left + w], crop, crop)

    return {"decode": decode, "decode+resize old": pil_resize, "decode+resize new": torch_resize}


def levers(crop: int) -> dict:
    """The speed levers tried, one at a time (`--levers`): each a decode + crop-resize to `crop`,
    or the light transform with one change."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from swinv2_train.data import DataConfig
    from swinv2_train.data.transforms import TrainTransform, _pixels, build_transform, finish_decode, open_image

    def crop_of(data, rng):
        img = finish_decode(open_image(data))
        top, left, h, w = build_transform(DataConfig(augment="light").resolved(), crop, True).crop_box(*img.size, rng)
        return img, (top, left, h, w)

    def pil(gap):
        def fn(data, rng):
            img, (top, left, h, w) = crop_of(data, rng)
            return img.resize((crop, crop), Image.BICUBIC, box=(left, top, left + w, top + h), reducing_gap=gap)
        return fn

    def torch_resize(dtype, layout):
        def fn(data, rng):
            img, (top, left, h, w) = crop_of(data, rng)
            x = _pixels(img)[top:top + h, left:left + w].permute(2, 0, 1).unsqueeze(0)
            x = x.to(dtype) if layout is None else x.to(dtype).contiguous(memory_format=layout)
            return F.interpolate(x, size=(crop, crop), mode="bicubic", antialias=True, align_corners=False)
        return fn

    light = dict(scale=(0.67, 1.0), hflip=0.5)
    return {"Pillow resize": pil(None), "Pillow reduce+resize (reducing_gap=2)": pil(2.0),
            "torch uint8, strided view": torch_resize(torch.uint8, None),
            "torch uint8, channels-last copy": torch_resize(torch.uint8, torch.channels_last),
            "torch float32": torch_resize(torch.float32, torch.contiguous_format),
            "light old (float32 out)": build_transform(DataConfig(augment="light").resolved(), crop, True, reference=True),
            "light, uint8 out, Pillow resize": TrainTransform(crop, resize="pil", **light),
            "light new": TrainTransform(crop, **light)}


def variants(crop: int) -> dict:
    from swinv2_train.data import DataConfig
    from swinv2_train.data.transforms import build_transform

    out = dict(ceilings(crop))
    for aug in AUGMENTS:
        cfg = DataConfig(augment=aug).resolved()
        out[f"{aug} old"] = build_transform(cfg, crop, train=True, reference=True)
        out[f"{aug} new"] = build_transform(cfg, crop, train=True)
    return out


def one_pass(samples, fn) -> float:
    t0 = time.perf_counter()
    for i, data in enumerate(samples):
        fn(data, random.Random(i))
    return len(samples) / (time.perf_counter() - t0)


def per_core(samples, crop: int, repeats: int, block: int = 16, fns=None) -> dict:
    """name -> [images/s of each pass]. Within a pass the variants take turns every `block`
    images, so a burst of load from other processes falls on all of them alike."""
    fns = fns or variants(crop)
    for fn in fns.values():
        one_pass(samples[:8], fn)  # warm-up
    rates = {name: [] for name in fns}
    for _ in range(repeats):
        spent = dict.fromkeys(fns, 0.0)
        for start in range(0, len(samples), block):
            for name, fn in fns.items():
                spent[name] += len(samples[start:start + block]) / one_pass(samples[start:start + block], fn)
        for name in fns:
            rates[name].append(len(samples) / spent[name])
    return rates


# ----------------------------------------------------------------------------- the loader
def loader_rate(pattern: str, n: int, augment: str, crop: int, workers: int) -> tuple:
    """(images/s, bytes per image handed to the main process) of the trainer's stream on one rank
    with `workers` DataLoader workers (the first batch, which starts the workers, is not timed)."""
    from swinv2_train.data import DataConfig, TrainStream

    cfg = DataConfig(augment=augment, train_shards=pattern, num_workers=workers, canonical_streams=workers,
                     train_samples=n, num_classes=1000, shuffle_buffer=64)
    stream = TrainStream(cfg, img_size=crop, global_batch=16 * workers, grad_accum=1, rank=0, world_size=1,
                         seed=0, device=None)
    images, _ = stream.next_batch()
    nbytes = images.element_size() * images[0].numel()
    t0, got = time.perf_counter(), 0
    for _ in range(stream.batches_per_epoch - 1):
        got += len(stream.next_batch()[1])
    rate = got / (time.perf_counter() - t0)
    stream.close()
    return rate, nbytes


# ----------------------------------------------------------------------------- output
def summarise(rates: dict) -> dict:
    best = {k: max(v) for k, v in rates.items()}
    row = {k: round(v, 1) for k, v in best.items()}
    for aug in AUGMENTS:
        old, new = rates[f"{aug} old"], rates[f"{aug} new"]
        row[f"{aug} new/old"] = round(best[f"{aug} new"] / best[f"{aug} old"], 2)
        row[f"{aug} new/old range"] = [round(min(n / o for n, o in zip(new, old)), 2),
                                       round(max(n / o for n, o in zip(new, old)), 2)]
    return row


def print_table(meta: dict, rows: list, loader_rows: list) -> None:
    print(summary_line(meta))
    print(f"images/s on one core ({meta['images']} images {meta['image_size']}, avg {meta['avg_jpeg_kb']} KB, "
          f"best of {meta['repeats']} interleaved passes; new/old: best, and [min, max] over passes)")
    names = [k for k in rows[0] if k != "crop" and not k.endswith("range")]
    print("| crop | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for r in rows:
        cells = [f"{r[k]}" + (f" [{r[k + ' range'][0]}-{r[k + ' range'][1]}]" if k + " range" in r else "")
                 for k in names]
        print(f"| {r['crop']} | " + " | ".join(cells) + " |")
    print("\nloader (TrainStream, one rank, images/s; bytes per image handed to the main process):")
    print("| crop | augment | workers | images/s | bytes/image (per pixel value) | old: bytes/image (per value) |")
    print("|---|---|---|---|---|---|")
    for r in loader_rows:
        print(f"| {r['crop']} | {r['augment']} | {r['workers']} | {r['images_per_s']} | {r['bytes_per_image']} "
              f"({r['bytes_per_value']:g}) | {r['old_bytes_per_image']} ({r['old_bytes_per_value']:g}) |")


def print_levers(meta: dict, rates: dict, json_path=None) -> int:
    print(summary_line(meta))
    print(f"images/s on one core, best of {meta['repeats']} passes (variants take turns every 16 images)")
    names = list(next(iter(rates.values())))
    print("| lever | " + " | ".join(f"{c}²" for c in rates) + " |\n|---" + "|---" * len(rates) + "|")
    for name in names:
        print(f"| {name} | " + " | ".join(f"{max(r[name]):.0f}" for r in rates.values()) + " |")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "levers": {str(c): r for c, r in rates.items()}}, f, indent=1)
    return 0


def load_samples(pattern: str, n: int) -> list:
    from swinv2_train.data.shards import expand_shards, iter_shard

    samples = []
    for url in expand_shards(pattern):
        samples += [s["jpg"] for s in iter_shard(url, Counter()) if "jpg" in s]
        if len(samples) >= n:
            break
    return samples[:n]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--shards", help="shard pattern (default: generate temporary 500x375 q90 shards)")
    ap.add_argument("--num-images", type=int, default=128, help="images per per-core measurement")
    ap.add_argument("--loader-images", type=int, default=384, help="images per loader measurement")
    ap.add_argument("--crops", type=int, nargs="+", default=[192, 224])
    ap.add_argument("--repeats", type=int, default=5, help="interleaved passes (the best one counts)")
    ap.add_argument("--loader-workers", type=int, nargs="*", default=[1, 2], help="worker counts (none: skip)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: few images, one pass, one crop")
    ap.add_argument("--levers", action="store_true", help="time the speed levers tried, one at a time, instead")
    ap.add_argument("--json", help="write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.quick:
        args.num_images, args.loader_images, args.crops, args.repeats = 16, 64, [64], 1

    import torch

    torch.set_num_threads(1)  # a loader worker runs single-threaded
    meta = bench_metadata(__file__, argv, packages=["PIL", "numpy"])
    with tempfile.TemporaryDirectory(prefix="swinv2-bench-") as tmp:
        n = max(args.num_images, args.loader_images)
        pattern = args.shards or make_bench_shards(tmp, n, per_shard=max(8, n // 8))  # >= 8 shards: 2 streams
        samples = load_samples(pattern, args.num_images)
        from PIL import Image

        meta.update(images=len(samples), repeats=args.repeats,
                    image_size="x".join(map(str, Image.open(io.BytesIO(samples[0])).size)),
                    avg_jpeg_kb=round(sum(map(len, samples)) / len(samples) / 1024, 1))
        if args.levers:
            return print_levers(meta, {c: per_core(samples, c, args.repeats, fns=levers(c)) for c in args.crops}, args.json)
        rows, loader_rows, raw = [], [], {}
        for crop in args.crops:
            raw[crop] = per_core(samples, crop, args.repeats)
            rows.append({"crop": crop, **summarise(raw[crop])})
            for aug in AUGMENTS:
                from swinv2_train.data import DataConfig
                from swinv2_train.data.transforms import build_transform

                old = build_transform(DataConfig(augment=aug).resolved(), crop, True, reference=True)
                old_bytes = old(samples[0], random.Random(0)).nbytes
                for w in args.loader_workers or []:
                    rate, nbytes = loader_rate(pattern, args.loader_images, aug, crop, w)
                    loader_rows.append(dict(crop=crop, augment=aug, workers=w, images_per_s=round(rate, 1),
                                            bytes_per_image=nbytes, bytes_per_value=nbytes / (3 * crop * crop),
                                            old_bytes_per_image=old_bytes, old_bytes_per_value=old_bytes / (3 * crop * crop)))
    print_table(meta, rows, loader_rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "loader": loader_rows,
                       "passes": {str(c): {k: [round(x, 1) for x in v] for k, v in r.items()} for c, r in raw.items()}},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
