"""Write webdataset tar shards (timm ImageNet conventions) from an image folder, a list file, or
the ImageNet release archives (a tar of per-class tars, gzipped or not), without extracting images.

    swinv2-make-shards /data/imagenet/train /shards/in1k --split train --workers 8
    swinv2-make-shards train.txt /shards/mine --root /data --max-bytes 5e8      # 'path label' lines
    swinv2-make-shards winter21_whole.tar.gz /shards/in21k --holdout 10 --workers 16
    # on a cluster: prepare once, one part per SLURM array task, then merge
    swinv2-make-shards winter21_whole.tar.gz /shards/in21k --holdout 10 --prepare
    swinv2-make-shards winter21_whole.tar.gz /shards/in21k --holdout 10 --part $SLURM_ARRAY_TASK_ID/16
    swinv2-make-shards /shards/in21k --merge
    swinv2-make-shards --info-only /shards/theirs    # _info.json for shards written elsewhere

Each sample: `<key>.jpg` (the source JPEG's bytes; re-encoded only for CMYK and non-JPEG inputs),
`<key>.cls` (ASCII integer label), `<key>.json` (source name, label, class name). Beside the
shards: `classes.json` (index -> class name, e.g. synset ids), `_info.json` (splits -> name,
num_samples, filenames, shard_lengths; and `make_shards`: what was kept, re-encoded, skipped) and
`_skipped_<split>.tsv` (the skipped source files and why).

Which image goes into which shard is planned once (shards_plan.py) and saved in OUT/_make_shards/;
the same shards come out byte for byte whatever --workers and --part are, a rerun resumes (done
shards are kept), and a rerun with a changed input or other options is refused.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import sys
import tarfile
from contextlib import contextmanager
from typing import Optional, Sequence, Tuple

from swinv2_tools import shards_plan as P
from swinv2_tools.shards_sources import (SourceError, atomic_json, is_archive, is_gzipped, is_prepared, prepare_archive,
                                         read_list, scan_archive, scan_folder)
from swinv2_tools.shards_write import (mark_part_done, merge, parse_part, part_range, read_record, record_path,
                                       write_shards)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the plan
def plan_options(args) -> dict:
    """The options a plan is made from (all part of its identity)."""
    classes_sha = None
    if args.classes:
        P.read_classes_file(args.classes)  # a bad file is reported now, before any work
        with open(args.classes, "rb") as f:
            classes_sha = hashlib.sha256(f.read()).hexdigest()
    return {"split": args.split, "prefix": args.prefix or args.split, "seed": args.seed,
            "shuffle": args.shuffle, "samples_per_shard": args.samples_per_shard,
            "max_bytes": args.max_bytes, "holdout": args.holdout, "quality": args.quality,
            "classes": classes_sha}


def source_kind(args) -> str:
    path = args.list_file or args.src
    if not os.path.exists(path):
        raise SourceError(f"{path}: no such file or folder")
    if args.list_file:
        return "list"
    if os.path.isdir(path):
        return "folder"
    return "archive" if is_archive(path) else "list"


def scan_source(args, kind: str):
    sizes = args.max_bytes is not None  # a folder's file sizes are needed only to plan by bytes
    if kind == "folder":
        return scan_folder(args.src, with_sizes=sizes)
    if kind == "list":
        return read_list(args.list_file or args.src, args.root, with_sizes=sizes)
    return scan_archive(args.src, prepared_dir(args), progress=say)


def prepared_dir(args) -> str:
    return os.path.abspath(args.prepared or os.path.join(args.out, "_prepared"))


def quick_fingerprint(args, kind: str):
    """The source's fingerprint where it is cheap (an archive's size and mtime, a list's digest);
    None for a folder, whose fingerprint needs a scan."""
    if kind == "archive":
        st = os.stat(args.src)
        return {"archive": os.path.abspath(args.src), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if kind == "list":
        return read_list(args.list_file or args.src, args.root).fingerprint
    return None


def check_plan(plan: P.Plan, options: dict, fingerprint: dict, out: str) -> P.Plan:
    if P.identity_of(options, fingerprint) == plan.identity:
        return plan
    diffs = P.differences(plan, options, fingerprint)
    raise SourceError(f"{out} holds split {options['split']!r} planned from other inputs or options "
                      f"({'; '.join(diffs)}): a different partial run cannot be resumed; rerun with the same "
                      f"ones, or add --overwrite to make this split again (or use a new OUT)")


@contextmanager
def locked(out: str):
    """One process at a time prepares and plans OUT (SLURM array tasks start together). fcntl
    record locks work across nodes on NFS and Lustre (mounted with flock/localflock off: lockd)."""
    os.makedirs(P.state_dir(out), exist_ok=True)
    fd = os.open(os.path.join(P.state_dir(out), "lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            say(f"waiting for another process preparing {out} ...")
            fcntl.lockf(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def ensure_plan(args) -> P.Plan:
    """The saved plan of this split, checked against the source and options; made (and the
    source prepared) under OUT's lock where there is none yet."""
    kind, options, out = source_kind(args), plan_options(args), args.out
    if args.overwrite:
        with locked(out):
            discard_split(out, args.split)
    fingerprint = quick_fingerprint(args, kind)
    plan = P.load_plan(out, args.split)
    if plan is not None:  # a folder is scanned for its fingerprint: outside the lock, in parallel
        return check_plan(plan, options, fingerprint or scan_source(args, kind).fingerprint, out)
    with locked(out):
        plan = P.load_plan(out, args.split)  # another part may have made it while this one waited
        if plan is not None:
            return check_plan(plan, options, fingerprint or scan_source(args, kind).fingerprint, out)
        check_holdout_split_free(out, args)
        source = scan_source(args, kind)
        pinned, pinned_from = pinned_classes(args, out)
        classes = P.resolve_classes(source, pinned, pinned_from)
        say(f"planning {len(source.samples)} images of {len(classes)} classes from {source.path}")
        return P.build_plan(out, source, classes, options)


def ensure_inputs(args, plan: P.Plan) -> None:
    """A gzipped archive's images are read from its extracted inner tars: extract them again if they
    were deleted (after a merge, say) while shards are still to be written."""
    prepared = plan.header["base"]
    if plan.header["source"]["kind"] != "archive" or not is_gzipped(args.src) or is_prepared(args.src, prepared):
        return
    with locked(args.out):
        if not is_prepared(args.src, prepared):  # another part may have done it while this one waited
            say(f"{prepared}: the prepared inner tars are gone; preparing again")
            prepare_archive(args.src, prepared, progress=say)


def pinned_classes(args, out: str):
    """--classes, else the classes.json that a run of another split left in OUT (so a validation
    folder that lacks a class still gets the train labels), else None (the source's own order)."""
    if args.classes:
        return P.read_classes_file(args.classes), f"--classes {args.classes}"
    existing, info = os.path.join(out, "classes.json"), os.path.join(out, "_info.json")
    if not (os.path.exists(existing) and os.path.exists(info)):
        return None, ""
    with open(info) as f:
        others = set(json.load(f).get("splits", {})) - {args.split, P.HOLDOUT_SPLIT if args.holdout else None}
    if not others:
        return None, ""
    with open(existing) as f:
        return json.load(f), f"{existing} (written with split {sorted(others)[0]!r})"


def check_holdout_split_free(out: str, args) -> None:
    if args.holdout and args.split == P.HOLDOUT_SPLIT:
        raise SourceError(f"--holdout sets images aside as split {P.HOLDOUT_SPLIT!r}; give another --split")
    for plan in P.all_plans(out):
        taken = set(plan.header["splits"]) & ({args.split} | ({P.HOLDOUT_SPLIT} if args.holdout else set()))
        if taken and plan.header["options"]["split"] != args.split:
            raise SourceError(f"{out}: split {sorted(taken)[0]!r} is already planned by the run of split "
                              f"{plan.header['options']['split']!r}; use another OUT")


def discard_split(out: str, split: str) -> None:
    """--overwrite: forget the split's plan, its shards, their records and its part markers."""
    plan = P.load_plan(out, split)
    if plan is None:
        return
    for name in plan.shard_names():
        for path in (os.path.join(out, name), record_path(out, name)):
            if os.path.exists(path):
                os.remove(path)
    parts = os.path.join(P.state_dir(out), "parts")
    for fn in os.listdir(parts) if os.path.isdir(parts) else []:
        if fn.startswith(f"{split}-"):
            os.remove(os.path.join(parts, fn))
    for path in P.plan_paths(out, split):
        os.remove(path)


# ----------------------------------------------------------------------------- --info-only
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
    atomic_json(info_path, {"name": os.path.basename(os.path.abspath(out)),
                             "num_classes": num_classes, "splits": splits})
    return {"info": info_path, "num_classes": num_classes,
            "splits": {k: v["num_samples"] for k, v in splits.items()}}


# ----------------------------------------------------------------------------- the command
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="swinv2-make-shards",
        description="Write webdataset tar shards (+ classes.json, _info.json) from an ImageFolder "
                    "(class_name/*.jpg), a list file ('path label' lines) or a tar of per-class tars "
                    "(fall11_whole.tar, winter21_whole.tar.gz, ILSVRC2012_img_train.tar), read in place. "
                    "On a cluster: --prepare once, --part i/n per array task, then OUT --merge.")
    ap.add_argument("src", nargs="?", help="an ImageFolder, a list file, or a tar of per-class tars "
                    "(.tar, .tar.gz, .tgz); omitted with --merge, --info-only and --list")
    ap.add_argument("out", help="output folder for the shards")
    ap.add_argument("--list", dest="list_file", metavar="FILE", help="a list file of 'path label' lines (as SRC)")
    ap.add_argument("--root", metavar="DIR", help="base of a list file's relative paths (default: its folder)")
    ap.add_argument("--split", default="train", metavar="NAME", help="split name in _info.json (default train; "
                    "the trainer looks up data.train_split=train and data.val_split=validation)")
    ap.add_argument("--workers", type=int, default=1, metavar="N", help="processes writing shards (default 1)")
    steps = ap.add_mutually_exclusive_group()
    steps.add_argument("--prepare", action="store_true", help="only prepare the source (index an "
                       "uncompressed archive, extract a gzipped one's inner tars) and save the plan")
    steps.add_argument("--part", metavar="I/N", help="write only part I of N of the shards (I from 1), "
                       "e.g. $SLURM_ARRAY_TASK_ID/16; prepares first, under a lock, where needed")
    steps.add_argument("--merge", action="store_true", help="OUT only: write _info.json once every part is in")
    steps.add_argument("--info-only", action="store_true",
                       help="write only OUT/_info.json for the .tar shards already in OUT (split = the word "
                            "before the shard number, e.g. train-000000.tar); no SRC")
    ap.add_argument("--prepared", metavar="DIR", help="where a gzipped archive's inner tars and an archive's "
                    "index go (default OUT/_prepared)")
    ap.add_argument("--classes", metavar="FILE", help="the label order: one class (synset) per line, or a "
                    "JSON list; a source class not in it is an error (default: the source's classes, sorted)")
    ap.add_argument("--holdout", type=int, default=0, metavar="K", help="set K images per class aside as "
                    "split 'validation' (chosen by key), for a release that ships none")
    ap.add_argument("--prefix", metavar="P", help="shard file prefix (default: the split name)")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=int, metavar="N", help="samples per shard (default 1000)")
    size.add_argument("--max-bytes", type=float, metavar="B",
                      help="approximate shard size in bytes (planned from the source files' sizes)")
    ap.add_argument("--quality", type=int, default=95, metavar="Q",
                    help="JPEG quality of re-encoded (CMYK, non-JPEG) images (default 95)")
    ap.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True,
                    help="one seeded global shuffle, so every shard mixes classes (default on; readers "
                         "only shuffle within a buffer)")
    ap.add_argument("--seed", type=int, default=0, metavar="S", help="seed of --shuffle (default 0)")
    ap.add_argument("--overwrite", action="store_true",
                    help="make this split again from scratch (with --info-only: rewrite _info.json)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def check_args(args) -> None:
    if args.merge or args.info_only:
        if args.src is not None or args.list_file is not None:
            flag = "--merge" if args.merge else "--info-only"
            raise SourceError(f"{flag} takes only OUT (the shard folder), e.g. swinv2-make-shards {args.out} {flag}")
        return
    if (args.src is None) == (args.list_file is None):
        raise SourceError("give exactly one source: SRC (a folder, list file or archive) or --list FILE")
    if args.samples_per_shard is None and args.max_bytes is None:
        args.samples_per_shard = 1000
    bad = [(args.samples_per_shard is not None and args.samples_per_shard < 1, "--samples-per-shard must be >= 1"),
           (args.max_bytes is not None and args.max_bytes <= 0, "--max-bytes must be > 0"),
           (not 1 <= args.quality <= 100, "--quality must be in 1..100"),
           (args.workers < 1, "--workers must be >= 1"), (args.holdout < 0, "--holdout must be >= 0"),
           (args.overwrite and args.part, "--overwrite with --part would let each part delete the others' "
                                          "shards; run --overwrite --prepare once, then the parts")]
    for failed, msg in bad:
        if failed:
            raise SourceError(msg)
    if args.part:
        parse_part(args.part)  # a wrong --part is reported before any work


def run(args) -> dict:
    if args.info_only:
        return write_info_only(args.out, overwrite=args.overwrite)
    if args.merge:
        summary = merge(args.out)
        report(args.out, summary)
        return summary
    plan = ensure_plan(args)
    names = plan.shard_names()
    shards = part_range(*parse_part(args.part), len(names)) if args.part else range(len(names))
    if args.prepare or any(read_record(args.out, plan, names[k]) is None for k in shards):
        ensure_inputs(args, plan)
    if args.prepare:
        say(f"prepared and planned: {plan.header['num_samples']} images -> {len(names)} shards in {args.out}; "
            f"next: the parts (--part i/n), then swinv2-make-shards {args.out} --merge")
        return {"planned_shards": len(names), "planned_samples": plan.header["num_samples"]}
    if args.part:
        part, parts = parse_part(args.part)
        done = write_shards(args.out, plan, shards, args.workers, progress=not args.no_progress)
        mark_part_done(args.out, plan, part, parts, shards)
        say(f"part {part}/{parts} done: shards {shards.start}..{shards.stop - 1} ({done['written']} written, "
            f"{done['kept']} kept); when every part is in: swinv2-make-shards {args.out} --merge")
        return {"part": f"{part}/{parts}", **done}
    done = write_shards(args.out, plan, shards, args.workers, progress=not args.no_progress)
    summary = merge(args.out, [plan])
    report(args.out, summary)
    split = plan.header["splits"][args.split]
    pattern = os.path.join(args.out, f"{plan.header['options']['prefix']}-{{000000..{len(split['filenames']) - 1:06d}}}.tar")
    return {"pattern": pattern, "num_shards": len(names), "num_samples": sum(s["samples"] for s in summary.values()),
            "written": done["written"], "skipped_existing": done["kept"],
            "skipped_images": sum(s["planned"] - s["samples"] for s in summary.values())}


def report(out: str, summary: dict) -> None:
    """The summary a user reads: per split, what was kept, re-encoded and skipped, and where the
    skipped files are listed."""
    for split, s in summary.items():
        counts = ", ".join(f"{k} {v}" for k, v in s["counts"].items() if v)
        say(f"{split}: {s['samples']} samples ({counts}); skipped files listed in "
            f"{os.path.join(out, s['skipped_list'])}")
        for line in s["damaged_inner_tars"]:
            say(f"{split}: warning: {line}; its readable images were used")
        empty = s["classes_without_images"]
        if empty:
            say(f"{split}: {len(empty)} classes of the class list have no images ({', '.join(empty[:5])}"
                f"{', ...' if len(empty) > 5 else ''}; all in {os.path.join(out, '_info.json')}, make_shards)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        print(json.dumps(run(args)))
    except SourceError as e:
        raise SystemExit(f"error: {e}") from None
    except OSError as e:  # e.g. a full disk or a folder without write permission
        raise SystemExit(f"error: {e.filename or ''}: {e.strerror or e}; fix that and run the same command "
                         f"again (finished shards are kept)") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
