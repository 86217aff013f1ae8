"""Writing planned shards (by workers, in parts) and merging what the parts wrote into `_info.json`.

A shard's bytes depend on its plan rows and the source images only: members are written in plan
order with fixed metadata (mtime 0, uid/gid 0, no user names, mode 0444), so any number of workers
or parts writes the same files. Each shard is written to a hidden temporary file, then its record
(OUT/_make_shards/done/<shard>.json: plan identity, bytes, samples, what was kept, re-encoded and
skipped) and last the shard is renamed into place. A shard counts as done when its record belongs
to the current plan and the file has the recorded size; anything else is written again.
"""
from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import sys
import tarfile
from collections import Counter
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from swinv2_tools.shards_images import KINDS, SKIP_KINDS, Verdict, judge_image
from swinv2_tools.shards_plan import Plan, Row, all_plans, state_dir
from swinv2_tools.shards_sources import ByteReader, SourceError, atomic_json

SKIPPED_LIST = "_skipped_{split}.tsv"  # beside the shards: split, kind, source file, reason


def record_path(out: str, shard: str) -> str:
    return os.path.join(state_dir(out), "done", f"{shard}.json")


def read_record(out: str, plan: Plan, shard: str) -> Optional[dict]:
    """The record of a finished shard of this plan, or None (not written, or not verifiably)."""
    try:
        with open(record_path(out, shard)) as f:
            record = json.load(f)
        return record if (record["identity"] == plan.identity
                          and os.path.getsize(os.path.join(out, shard)) == record["bytes"]) else None
    except (OSError, ValueError, KeyError):
        return None


# ----------------------------------------------------------------------------- one shard
def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Writes whole shards of one plan (one per worker process)."""

    def __init__(self, out: str, plan_header: dict):
        self.out, self.identity = out, plan_header["identity"]
        self.classes, self.quality = plan_header["classes"], plan_header["options"]["quality"]
        self.reader = ByteReader(plan_header["base"])

    def write(self, shard: str, rows: Sequence[Row]) -> dict:
        counts: Counter = Counter()
        skipped = []
        tmp = os.path.join(self.out, f".{shard}.tmp-{os.getpid()}")
        with open(tmp, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tf:
                for row in rows:
                    verdict = self._judge(row)
                    counts[verdict.kind] += 1
                    if verdict.data is None:
                        skipped.append([verdict.kind, row.name, verdict.reason])
                        continue
                    meta = {"filename": row.name, "label": row.label, "class_name": self.classes[row.label]}
                    _add(tf, f"{row.key}.jpg", verdict.data)
                    _add(tf, f"{row.key}.cls", str(row.label).encode())
                    _add(tf, f"{row.key}.json", json.dumps(meta).encode())
            raw.flush()
            os.fsync(raw.fileno())
        record = {"identity": self.identity, "bytes": os.path.getsize(tmp),
                  "samples": len(rows) - sum(counts[k] for k in SKIP_KINDS),
                  "counts": dict(sorted(counts.items())), "skipped": skipped}
        atomic_json(record_path(self.out, shard), record)
        os.replace(tmp, os.path.join(self.out, shard))  # the shard appears only when complete
        return record

    def _judge(self, row: Row) -> Verdict:
        try:
            data = self.reader.read(row.file, row.offset, row.size)
        except OSError as e:
            return Verdict("unreadable", None, f"{type(e).__name__}: {e.strerror or e}")
        return judge_image(data, self.quality)


# ----------------------------------------------------------------------------- many shards
_WORKER: Optional[ShardWriter] = None


def _init_worker(out: str, header: dict) -> None:
    global _WORKER
    _WORKER = ShardWriter(out, header)


def _write_in_worker(task: Tuple[str, List[Row]]) -> Tuple[str, int, dict]:
    shard, rows = task
    return shard, len(rows), _WORKER.write(shard, rows)


def _tasks(plan: Plan, todo: Dict[int, str]) -> Iterable[Tuple[str, List[Row]]]:
    """(shard name, its rows) for the shards in `todo`, read from the plan in one pass."""
    current, rows = None, []
    for row in plan.rows(set(todo)):
        if row.shard != current and rows:
            yield todo[current], rows
            rows = []
        current = row.shard
        rows.append(row)
    if rows:
        yield todo[current], rows


def write_shards(out: str, plan: Plan, shard_indices: Sequence[int], workers: int,
                 progress: bool = True) -> dict:
    """Write the planned shards `shard_indices` that are not done yet, with `workers` processes.
    Returns {"written": n, "kept": n} (shards written now, shards found done and kept)."""
    from tqdm import tqdm

    names = plan.shard_names()
    os.makedirs(os.path.join(state_dir(out), "done"), exist_ok=True)
    todo = {k: names[k] for k in shard_indices if read_record(out, plan, names[k]) is None}
    mine = {f".{name}.tmp-" for name in todo.values()}
    for fn in os.listdir(out):  # temporary files of an interrupted earlier attempt at these shards
        if fn.startswith(".") and ".tmp-" in fn and fn[:fn.index(".tmp-") + 5] in mine:
            os.remove(os.path.join(out, fn))
    planned = [n for split in plan.header["splits"].values() for n in split["planned_lengths"]]
    bar = tqdm(total=sum(planned[k] for k in todo), unit="img", desc="shards", disable=not progress,
               file=sys.stderr)
    if workers <= 1 or len(todo) <= 1:
        writer = ShardWriter(out, plan.header)
        for shard, rows in _tasks(plan, todo):
            writer.write(shard, rows)
            bar.update(len(rows))
        writer.reader.close()
    else:
        _write_in_pool(out, plan, todo, workers, bar)
    bar.close()
    return {"written": len(todo), "kept": len(shard_indices) - len(todo)}


def _write_in_pool(out: str, plan: Plan, todo: Dict[int, str], workers: int, bar) -> None:
    """At most 2 shards per worker in flight, so a part's rows are never all in memory at once."""
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(out, plan.header)) as pool:
        pending = []
        for task in _tasks(plan, todo):
            pending.append(pool.apply_async(_write_in_worker, (task,)))
            while len(pending) >= 2 * workers:
                bar.update(pending.pop(0).get()[1])
        for result in pending:
            bar.update(result.get()[1])


# ----------------------------------------------------------------------------- parts
def part_range(part: int, parts: int, num_shards: int) -> range:
    """Part i (1-based) of n: a contiguous run of shards, the same for every run of that part."""
    return range((part - 1) * num_shards // parts, part * num_shards // parts)


def parse_part(text: str) -> Tuple[int, int]:
    try:
        part, parts = (int(x) for x in text.split("/"))
    except ValueError:
        part, parts = 0, 0
    if not 1 <= part <= parts:
        raise SourceError(f"--part {text}: expected i/n with 1 <= i <= n, e.g. --part "
                          f"$SLURM_ARRAY_TASK_ID/16 with sbatch --array=1-16")
    return part, parts


def part_marker(out: str, plan: Plan, part: int, parts: int) -> str:
    return os.path.join(state_dir(out), "parts", f"{plan.header['options']['split']}-{part}-of-{parts}.json")


def mark_part_done(out: str, plan: Plan, part: int, parts: int, shards: range) -> None:
    path = part_marker(out, plan, part, parts)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_json(path, {"identity": plan.identity, "part": part, "parts": parts,
                        "shards": [shards.start, shards.stop]})


def _parts_seen(out: str, plan: Plan) -> Counter:
    """How many finished-part markers of this plan there are for each n."""
    d = os.path.join(state_dir(out), "parts")
    seen: Counter = Counter()
    for fn in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        with open(os.path.join(d, fn)) as f:
            marker = json.load(f)
        if marker.get("identity") == plan.identity:
            seen[marker["parts"]] += 1
    return seen


def missing_message(out: str, plan: Plan, missing: List[int]) -> str:
    names = plan.shard_names()
    split = plan.header["options"]["split"]
    head = (f"{out}: {len(missing)} of {len(names)} shards of split {split!r} are not written yet "
            f"({', '.join(names[k] for k in missing[:3])}{', ...' if len(missing) > 3 else ''})")
    seen = _parts_seen(out, plan)
    if seen:
        parts = seen.most_common(1)[0][0]
        todo = sorted({i for i in range(1, parts + 1) for k in missing if k in part_range(i, parts, len(names))})
        return (f"{head}; missing parts: {', '.join(f'{i}/{parts}' for i in todo)}. Run them "
                f"(swinv2-make-shards SRC {out} --part i/{parts}, with the options of the other parts), "
                f"then --merge again")
    return (f"{head}. Run the parts that write them (swinv2-make-shards SRC {out} --part i/n), or the "
            f"whole command again (it resumes), then --merge again")


# ----------------------------------------------------------------------------- merge
def merge(out: str, plans: Optional[List[Plan]] = None) -> dict:
    """Write _info.json, classes.json and the skipped-file lists once every planned shard is done;
    refuse, naming what is missing, otherwise. Splits already in _info.json from other runs stay."""
    plans = all_plans(out) if plans is None else plans
    if not plans:
        raise SourceError(f"{out}: nothing to merge (no plan in {state_dir(out)}); run "
                          f"swinv2-make-shards SRC {out} --part i/n first")
    records = {}
    for plan in plans:
        names = plan.shard_names()
        found = [read_record(out, plan, n) for n in names]
        missing = [k for k, r in enumerate(found) if r is None]
        if missing:
            raise SourceError(missing_message(out, plan, missing))
        records[plan.identity] = dict(zip(names, found))
    classes = _one_class_list(out, plans)
    info_path = os.path.join(out, "_info.json")
    info = {"name": os.path.basename(os.path.abspath(out)), "splits": {}}
    if os.path.exists(info_path):
        with open(info_path) as f:
            info = json.load(f)
        info.setdefault("splits", {})
    info["num_classes"] = len(classes)
    summary = info.setdefault("make_shards", {})
    for plan in plans:
        recs = records[plan.identity]
        for split, sp in plan.header["splits"].items():
            lengths = [recs[n]["samples"] for n in sp["filenames"]]
            info["splits"][split] = {"name": split, "num_samples": sum(lengths), "filenames": sp["filenames"],
                                     "shard_lengths": lengths}
            summary[split] = _split_summary(out, plan, split, [recs[n] for n in sp["filenames"]])
    with open(os.path.join(out, "classes.json"), "w") as f:
        json.dump(classes, f)
    atomic_json(info_path, info)
    return {split: summary[split] for plan in plans for split in plan.header["splits"]}


def _one_class_list(out: str, plans: List[Plan]) -> List[str]:
    classes = plans[0].header["classes"]
    for plan in plans[1:]:
        if plan.header["classes"] != classes:
            raise SourceError(f"{out}: split {plan.header['options']['split']!r} was planned with other classes "
                              f"than split {plans[0].header['options']['split']!r}; make it again with "
                              f"--classes {os.path.join(out, 'classes.json')} --overwrite")
    return classes


def _split_summary(out: str, plan: Plan, split: str, recs: List[dict]) -> dict:
    """Counts of each kind for one split, and its list of skipped files written beside the shards."""
    counts: Counter = Counter()
    for r in recs:
        counts.update(r["counts"])
    listing = SKIPPED_LIST.format(split=split)
    with open(os.path.join(out, listing), "w", encoding="utf-8") as f:
        f.write("kind\tfile\treason\n")
        for r in recs:
            for kind, name, reason in r["skipped"]:
                f.write(f"{kind}\t{name}\t{reason}\n")
    return {"source": plan.header["source"]["path"], "planned": sum(sp for sp in
            plan.header["splits"][split]["planned_lengths"]), "samples": sum(r["samples"] for r in recs),
            "counts": {k: counts.get(k, 0) for k in KINDS}, "skipped_list": listing,
            "classes_without_images": plan.header["classes_without_images"],
            "damaged_inner_tars": plan.header.get("damaged_inner_tars", [])}
