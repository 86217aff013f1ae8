"""swinv2-make-shards throughput on ImageNet-sized JPEGs, and what it means for ImageNet-21K.

    python scripts/bench_make_shards.py                         # 2,400 images, 1 and 2 workers
    python scripts/bench_make_shards.py --num-images 400 --workers 1 --out bench.json

It builds a miniature release in a temporary folder (a gzipped and an uncompressed tar of per-class
tars holding photo-like 500x375 / 375x500 JPEGs of about 110 KB, as ImageNet's), then times:
- `--prepare` of the gzipped archive: the one streaming pass (MB/s of compressed input);
- `--prepare` of the uncompressed archive: indexing in place (images/s);
- writing the shards with each `--workers` count from the prepared inputs (images/s, every image
  read, fully decoded once and written).
The projection: ImageNet-21K (winter21: 13.2M images, 1.1 TB gzipped) in hours on one node of
`--node-cores` cores, from the best measured images/s per worker process, and the prepare pass.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import tarfile
import tempfile
import time

import numpy as np

from swinv2_tools.bench_meta import bench_metadata, summary_line
from swinv2_tools.make_shards import main as make_shards

WINTER21_IMAGES = 13_200_000
WINTER21_GZ_BYTES = 1.1e12


def photo_jpeg(rng, width: int, height: int) -> bytes:
    """A smooth colour field with fine noise: about ImageNet's 110 KB at 500x375, quality 90."""
    from PIL import Image

    low = rng.uniform(0, 255, size=(12, 16, 3)).astype(np.uint8)
    img = Image.fromarray(low).resize((width, height), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 23, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def build_release(folder: str, num_images: int, num_classes: int) -> dict:
    """release.tar.gz and release.tar (the same per-class tars); returns their sizes."""
    rng = np.random.default_rng(0)
    inner_tars, total = [], 0
    for c in range(num_classes):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for i in range(c, num_images, num_classes):
                w, h = (500, 375) if i % 4 else (375, 500)
                data = photo_jpeg(rng, w, h)
                total += len(data)
                info = tarfile.TarInfo(f"n{c:08d}_{i}.JPEG")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        inner_tars.append((f"n{c:08d}.tar", buf.getvalue()))
    for name, mode in (("release.tar.gz", "w:gz"), ("release.tar", "w")):
        with tarfile.open(os.path.join(folder, name), mode) as outer:
            for inner_name, data in inner_tars:
                info = tarfile.TarInfo(inner_name)
                info.size = len(data)
                outer.addfile(info, io.BytesIO(data))
    return {"images": num_images, "mean_image_kb": total / num_images / 1e3,
            "gz_bytes": os.path.getsize(os.path.join(folder, "release.tar.gz"))}


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the pool's workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(argv) -> tuple:
    """(wall seconds, CPU seconds) of one make_shards run. On a shared machine the CPU time per image
    is the steadier figure: other jobs stretch the wall time, not the work."""
    t0, c0 = time.perf_counter(), cpu_seconds()
    make_shards([*argv, "--no-progress"])
    return time.perf_counter() - t0, cpu_seconds() - c0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--num-images", type=int, default=2400)
    ap.add_argument("--classes", type=int, default=24, help="per-class tars in the release")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--samples-per-shard", type=int, default=100,
                    help="small enough that the shards spread evenly over the workers")
    ap.add_argument("--node-cores", type=int, default=32, help="cores of the node in the projection")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    meta = bench_metadata(__file__, argv, packages=("PIL",), num_images=args.num_images)
    print(summary_line(meta))
    tmp = tempfile.mkdtemp(prefix="bench_make_shards-")
    try:
        release = build_release(tmp, args.num_images, args.classes)
        gz, plain = os.path.join(tmp, "release.tar.gz"), os.path.join(tmp, "release.tar")
        prepare_gz_s, _ = timed([gz, os.path.join(tmp, "gz"), "--prepare"])
        prepare_plain_s, _ = timed([plain, os.path.join(tmp, "plain"), "--prepare"])
        rates, cpu_ms = {}, {}
        for n in args.workers:
            out = os.path.join(tmp, f"w{n}")  # fresh OUT, the gzipped release's prepared inputs
            seconds, cpu = timed([gz, out, "--prepared", os.path.join(tmp, "gz", "_prepared"), "--workers", str(n),
                                  "--samples-per-shard", str(args.samples_per_shard)])
            rates[n], cpu_ms[n] = args.num_images / seconds, cpu / args.num_images * 1e3
            print(f"workers {n}: {rates[n]:.0f} images/s ({seconds:.1f} s), {cpu_ms[n]:.2f} CPU ms per image")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    per_worker = max(rate / n for n, rate in rates.items())
    per_core = 1e3 / min(cpu_ms.values())  # images/s of one fully busy core
    gz_mb_s = release["gz_bytes"] / prepare_gz_s / 1e6
    projection = {"node_cores": args.node_cores, "images_per_s_per_worker": per_worker,
                  "images_per_cpu_s": per_core,
                  "write_hours": WINTER21_IMAGES / (per_worker * args.node_cores) / 3600,
                  "write_hours_from_cpu_time": WINTER21_IMAGES / (per_core * args.node_cores) / 3600,
                  "prepare_gz_hours": WINTER21_GZ_BYTES / (gz_mb_s * 1e6) / 3600,
                  "storage_gb_s": per_worker * args.node_cores * release["mean_image_kb"] / 1e6}
    results = {"meta": meta, "release": release, "prepare_gz_s": prepare_gz_s, "prepare_gz_mb_s": gz_mb_s,
               "index_images_per_s": args.num_images / prepare_plain_s,
               "images_per_s": {str(n): r for n, r in rates.items()},
               "cpu_ms_per_image": {str(n): c for n, c in cpu_ms.items()}, "projection_winter21": projection}
    print(f"images of {release['mean_image_kb']:.0f} KB; prepare: gzipped {gz_mb_s:.0f} MB/s, "
          f"uncompressed index {results['index_images_per_s']:.0f} images/s")
    print(f"ImageNet-21K (13.2M images) on one {args.node_cores}-core node: writing {projection['write_hours']:.2f} h "
          f"at {per_worker:.0f} images/s per worker ({projection['write_hours_from_cpu_time']:.2f} h from the CPU "
          f"time, {per_core:.0f} images per CPU second), plus the one prepare pass over 1.1 TB gzipped: "
          f"{projection['prepare_gz_hours']:.1f} h; the node's storage must then read and write "
          f"{projection['storage_gb_s']:.1f} GB/s each")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
