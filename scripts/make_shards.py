"""Write webdataset tar shards (timm ImageNet conventions) from an image folder or a list file.

    swinv2-make-shards /data/imagenet/train /shards/in1k --split train --samples-per-shard 1000
    swinv2-make-shards --list train.txt --root /data /shards/mine --split train --max-bytes 5e8
    swinv2-make-shards --info-only /shards/theirs    # _info.json for shards written elsewhere

Each sample: `<key>.jpg` (JPEG bytes, re-encoded only if the source is not a JPEG), `<key>.cls`
(ASCII integer label), `<key>.json` (source path, class name). Beside the shards:
`classes.json` (index -> class name) and `_info.json` (splits -> name, num_samples, filenames,
shard_lengths), which the loader reads for the epoch length.

Resumable: the sample->shard assignment is computed up front from the sorted (optionally
seed-shuffled) input list, so it is the same on every run. Each shard is written to a hidden
temp file and renamed when complete; a rerun skips shards whose final file exists and refuses
to continue if the inputs or options changed (see `_make_shards_<split>.json`).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import re
import sys
import tarfile
from typing import List, Optional, Sequence, Tuple

IMG_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def scan_folder(src: str) -> Tuple[List[Tuple[str, int]], List[str]]:
    """ImageFolder layout: src/<class_name>/<image>; classes sorted by name -> index."""
    classes = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
    if not classes:
        raise SystemExit(f"error: no class sub-directories in {src!r}")
    items = []
    for ci, c in enumerate(classes):
        for dirpath, _, files in os.walk(os.path.join(src, c)):
            for fn in files:
                if fn.lower().endswith(IMG_EXTS):
                    items.append((os.path.join(dirpath, fn), ci))
    items.sort()
    return items, classes


def read_list(path: str, root: Optional[str]) -> Tuple[List[Tuple[str, int]], List[str]]:
    """`path label` per line (label: integer); relative paths are relative to --root or to
    the list file's directory."""
    base = root or os.path.dirname(os.path.abspath(path))
    items = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                p, lab = line.rsplit(None, 1)
                label = int(lab)
            except ValueError:
                raise SystemExit(f"error: {path}:{n}: expected 'path label', got {line!r}")
            if label < 0:
                raise SystemExit(f"error: {path}:{n}: negative label {label}")
            items.append((p if os.path.isabs(p) else os.path.join(base, p), label))
    if not items:
        raise SystemExit(f"error: list file {path!r} has no entries")
    n_cls = max(lab for _, lab in items) + 1
    return items, [str(i) for i in range(n_cls)]


def plan_shards(items: Sequence[Tuple[str, int]], samples_per_shard: Optional[int],
                max_bytes: Optional[float]) -> List[List[int]]:
    """Indices of `items` per shard. With --max-bytes the split uses *source* file sizes so the
    plan is known before encoding (shards are approximately max-bytes)."""
    plan: List[List[int]] = []
    cur: List[int] = []
    size = 0
    for i, (p, _) in enumerate(items):
        s = os.path.getsize(p) + 1536 if max_bytes else 0  # + tar headers of 3 members
        full = (samples_per_shard and len(cur) >= samples_per_shard) or (
            max_bytes and cur and size + s > max_bytes)
        if full:
            plan.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += s
    if cur:
        plan.append(cur)
    return plan


def encode_jpeg(path: str, quality: int) -> bytes:
    """Source bytes if already a JPEG (no generation loss), else re-encoded RGB JPEG."""
    from PIL import Image

    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as img:
        if img.format == "JPEG" and img.mode in ("RGB", "L"):
            img.verify()
            return data
        img.load()
        rgb = img.convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_key(path: str, src: str, used: set) -> str:
    rel = os.path.splitext(os.path.relpath(path, src))[0]
    key = re.sub(r"[^A-Za-z0-9_-]", "_", rel)  # webdataset keys: no dots, no slashes
    base, n = key, 1
    while key in used:
        key, n = f"{base}_{n}", n + 1
    used.add(key)
    return key


def count_tar_samples(path: str) -> int:
    with tarfile.open(path, "r:") as tf:
        return len({m.name.split(".", 1)[0] for m in tf.getmembers() if m.isfile()})


def _atomic_json(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def write_shards(items, classes, out: str, *, split: str, prefix: str,
                 samples_per_shard: Optional[int], max_bytes: Optional[float], quality: int,
                 src_root: str, overwrite: bool = False, progress: bool = True) -> dict:
    import webdataset as wds
    from tqdm import tqdm

    os.makedirs(out, exist_ok=True)
    plan = plan_shards(items, samples_per_shard, max_bytes)
    names = [f"{prefix}-{k:06d}.tar" for k in range(len(plan))]
    # identity of the run: a resume is only valid with the same inputs and plan
    ident = hashlib.sha256(json.dumps(
        [[items[i][0], items[i][1]] for sh in plan for i in sh] + [names, quality]
    ).encode()).hexdigest()
    state_path = os.path.join(out, f"_make_shards_{split}.json")
    if os.path.exists(state_path) and not overwrite:
        with open(state_path) as f:
            old = json.load(f)
        if old.get("ident") != ident:
            raise SystemExit(f"error: {out!r} holds a different partial run of split {split!r} "
                             f"(inputs or options changed); use --overwrite or a new directory")
    if overwrite:
        for n in names:
            if os.path.exists(os.path.join(out, n)):
                os.remove(os.path.join(out, n))
    _atomic_json(state_path, {"ident": ident, "num_shards": len(plan)})
    for fn in os.listdir(out):  # temp files of an interrupted run
        if fn.startswith(".") and ".tmp-" in fn and fn[1:].startswith(prefix):
            os.remove(os.path.join(out, fn))

    used: set = set()
    keys = [make_key(p, src_root, used) for p, _ in items]
    lengths = [0] * len(plan)
    todo = []
    for k, name in enumerate(names):
        final = os.path.join(out, name)
        if os.path.exists(final):
            lengths[k] = count_tar_samples(final)  # complete: it was renamed into place
        else:
            todo.append(k)
    bar = tqdm(total=len(items), initial=sum(len(plan[k]) for k in range(len(plan)) if k not in todo),
               unit="img", desc=f"shards {split}", disable=not progress)
    skipped = 0
    for k in todo:
        final = os.path.join(out, names[k])
        tmp = os.path.join(out, f".{names[k]}.tmp-{os.getpid()}")
        handle = {}

        def opener(fname, tmp=tmp):
            handle["f"] = open(tmp, "wb")
            return handle["f"]

        def commit(fname, tmp=tmp, final=final):
            f = handle.pop("f")
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(tmp, final)  # the shard appears only when complete

        pattern = os.path.join(out, f"{prefix}-%06d.tar")
        writer = wds.ShardWriter(pattern, maxcount=len(plan[k]) + 1, maxsize=float("inf"),
                                 start_shard=k, opener=opener, post=commit, verbose=0,
                                 encoder=False, mtime=0)
        n = 0
        for i in plan[k]:
            path, label = items[i]
            try:
                data = encode_jpeg(path, quality)
            except Exception as e:  # unreadable source: leave it out, keep going
                print(f"warning: skipping unreadable image {path}: {e}", file=sys.stderr)
                skipped += 1
                bar.update(1)
                continue
            meta = {"filename": os.path.relpath(path, src_root), "label": label,
                    "class_name": classes[label] if label < len(classes) else str(label)}
            writer.write({"__key__": keys[i], "jpg": data, "cls": str(label).encode(),
                          "json": json.dumps(meta).encode()})
            n += 1
            bar.update(1)
        writer.close()
        lengths[k] = n
    bar.close()

    with open(os.path.join(out, "classes.json"), "w") as f:
        json.dump(classes, f)
    info_path = os.path.join(out, "_info.json")
    info = {"name": os.path.basename(os.path.abspath(out)), "num_classes": len(classes), "splits": {}}
    if os.path.exists(info_path):
        with open(info_path) as f:
            info = json.load(f)
        info.setdefault("splits", {})
    info["num_classes"] = len(classes)
    info["splits"][split] = {"name": split, "num_samples": int(sum(lengths)),
                             "filenames": names, "shard_lengths": lengths}
    _atomic_json(info_path, info)
    pat = os.path.join(out, f"{prefix}-{{000000..{len(plan) - 1:06d}}}.tar")
    return {"pattern": pat, "num_shards": len(plan), "num_samples": int(sum(lengths)),
            "written": len(todo), "skipped_existing": len(plan) - len(todo),
            "unreadable_inputs": skipped}


def scan_tar(path: str) -> Tuple[int, int]:
    """(samples, largest label) of one shard; metadata members (names starting with '_') and
    samples without an integer .cls do not count towards the label."""
    keys, top = set(), -1
    with tarfile.open(path, "r:*") as tf:
        for m in tf:
            base = os.path.basename(m.name)
            if not m.isfile() or base.startswith("_") or "." not in base:
                continue
            key, ext = m.name.split(".", 1)
            keys.add(key)
            if ext.lower() == "cls":
                try:
                    top = max(top, int(tf.extractfile(m).read().decode("ascii").strip()))
                except ValueError:
                    pass
    return len(keys), top


def write_info_only(out: str, overwrite: bool = False) -> dict:
    """`--info-only`: write `_info.json` for the shards already in `out` (from any writer), so the
    trainer stops counting them on every run. A shard's split is the word before its number
    (train-000000.tar -> train), the rule the trainer uses when there is no _info.json."""
    from swinv2_train.data.shards import shard_split_name  # the trainer's rule, shared

    info_path = os.path.join(out, "_info.json")
    if os.path.exists(info_path) and not overwrite:
        raise SystemExit(f"error: {info_path} exists; add --overwrite to rewrite it")
    tars = sorted(f for f in os.listdir(out) if f.endswith(".tar")) if os.path.isdir(out) else []
    if not tars:
        raise SystemExit(f"error: no .tar shards in {out!r}")
    splits: dict = {}
    top = -1
    for fn in tars:
        split = shard_split_name(fn)
        if split is None:
            print(f"warning: {fn}: no split word before the shard number; left out", file=sys.stderr)
            continue
        n, largest = scan_tar(os.path.join(out, fn))
        top = max(top, largest)
        sp = splits.setdefault(split, {"name": split, "num_samples": 0, "filenames": [],
                                       "shard_lengths": []})
        sp["num_samples"] += n
        sp["filenames"].append(fn)
        sp["shard_lengths"].append(n)
    classes_path = os.path.join(out, "classes.json")
    if os.path.exists(classes_path):
        with open(classes_path) as f:
            num_classes = len(json.load(f))
    else:  # a guess: the highest class may be missing from every shard
        num_classes = top + 1
        print(f"note: no classes.json: num_classes={num_classes} (largest label + 1); edit "
              f"{info_path} if the dataset has more classes", file=sys.stderr)
    _atomic_json(info_path, {"name": os.path.basename(os.path.abspath(out)),
                             "num_classes": num_classes, "splits": splits})
    return {"info": info_path, "num_classes": num_classes,
            "splits": {k: v["num_samples"] for k, v in splits.items()}}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="swinv2-make-shards",
        description="Write webdataset tar shards (+ classes.json, _info.json) from an "
                    "ImageFolder directory (class_name/*.jpg) or a list file ('path label').",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("src", nargs="?", help="ImageFolder root (class_name/<images>); omit with --list")
    ap.add_argument("out", help="output directory for the shards")
    ap.add_argument("--list", dest="list_file", help="list file with 'path label' lines instead of src")
    ap.add_argument("--root", help="base for relative paths in --list (default: the list file's dir)")
    ap.add_argument("--split", default="train", help="split name recorded in _info.json "
                    "(the trainer looks up data.train_split=train and data.val_split=validation)")
    ap.add_argument("--info-only", action="store_true",
                    help="write only OUT/_info.json for the .tar shards already in OUT (split = "
                         "the word before the shard number, e.g. train-000000.tar); no SRC")
    ap.add_argument("--prefix", default=None, help="shard file prefix (default: the split name)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--samples-per-shard", type=int, default=None,
                   help="samples per shard (default 1000 unless --max-bytes)")
    g.add_argument("--max-bytes", type=float, default=None,
                   help="approximate shard size in bytes (planned from source file sizes)")
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encoded non-JPEG inputs")
    ap.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True,
                    help="write samples in a seeded random order (readers only shuffle within a buffer)")
    ap.add_argument("--seed", type=int, default=0, help="seed of --shuffle")
    ap.add_argument("--overwrite", action="store_true",
                    help="rewrite all shards of this split (with --info-only: an existing _info.json)")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.info_only:
        if args.src is not None or args.list_file is not None:
            raise SystemExit("error: --info-only takes only OUT (the shard directory)")
        print(json.dumps(write_info_only(args.out, overwrite=args.overwrite)))
        return 0
    if (args.src is None) == (args.list_file is None):
        raise SystemExit("error: give exactly one of SRC (ImageFolder) or --list")
    if args.samples_per_shard is not None and args.samples_per_shard < 1:
        raise SystemExit("error: --samples-per-shard must be >= 1")
    if args.max_bytes is not None and args.max_bytes <= 0:
        raise SystemExit("error: --max-bytes must be > 0")
    if not 1 <= args.quality <= 100:
        raise SystemExit("error: --quality must be in 1..100")
    if args.list_file:
        items, classes = read_list(args.list_file, args.root)
        src_root = args.root or os.path.dirname(os.path.abspath(args.list_file))
    else:
        if not os.path.isdir(args.src):
            raise SystemExit(f"error: {args.src!r} is not a directory")
        items, classes = scan_folder(args.src)
        src_root = args.src
    if not items:
        raise SystemExit("error: no input images found")
    if args.shuffle:
        random.Random(args.seed).shuffle(items)
    sps = args.samples_per_shard or (None if args.max_bytes else 1000)
    res = write_shards(items, classes, args.out, split=args.split,
                       prefix=args.prefix or args.split, samples_per_shard=sps,
                       max_bytes=args.max_bytes, quality=args.quality, src_root=src_root,
                       overwrite=args.overwrite, progress=not args.no_progress)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
