"""The plan of a swinv2-make-shards run: which image goes into which shard, fixed before any is written.

The plan is computed once from the source and the options, saved in OUT/_make_shards/, and then only
read: every process, part and rerun writes shards from the same plan, so the shards do not depend on
the number of workers or parts, a rerun resumes, and a rerun with a changed input or other options is
refused (the plan's `identity` names what it was made from).

How it is made:
1. The samples sorted by their name in the source; each gets a webdataset key (its name with
   non-word characters replaced, made unique).
2. Labels: the class order of `--classes FILE`, else of OUT/classes.json (written by an earlier
   split), else the sorted class names (a list file: its integer labels).
3. `--holdout K`: per class, the K samples whose sha256(key) is smallest go to the `validation`
   split (at most all but one of a class): chosen by key alone, whatever the seed or the other classes.
4. One seeded global shuffle of all samples (so every shard mixes classes), then each split keeps its
   samples in that order and cuts them into shards of `--samples-per-shard` (or `--max-bytes`).

Files: plan-<split>.json (identity, options, classes, shards per split) and plan-<split>.jsonl.gz
(one row a sample, in shard order: [shard, key, label, file, offset, size, name], shard counted
over the plan's splits in order).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
from collections import Counter
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence

from swinv2_tools.shards_sources import Source, SourceError

STATE_DIR = "_make_shards"
HOLDOUT_SPLIT = "validation"
PLAN_VERSION = 1


class Row(NamedTuple):
    shard: int
    key: str
    label: int
    file: str
    offset: int
    size: int
    name: str


def state_dir(out: str) -> str:
    return os.path.join(out, STATE_DIR)


def plan_paths(out: str, split: str):
    d = state_dir(out)
    return os.path.join(d, f"plan-{split}.json"), os.path.join(d, f"plan-{split}.jsonl.gz")


# ----------------------------------------------------------------------------- classes
def read_classes_file(path: str) -> List[str]:
    """A JSON list (a classes.json) or one class per line (first word; blank and # lines skipped)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise SourceError(f"--classes {path}: {e.strerror}") from None
    try:
        classes = json.loads(text)
        ok = isinstance(classes, list) and all(isinstance(c, str) for c in classes)
    except ValueError:
        classes = [line.split()[0] for line in text.splitlines() if line.strip() and not line.startswith("#")]
        ok = True
    if not ok or not classes:
        raise SourceError(f"--classes {path}: expected one class name per line, or a JSON list of names")
    dupes = sorted(c for c, n in Counter(classes).items() if n > 1)
    if dupes:
        raise SourceError(f"--classes {path}: {dupes[0]!r} is listed more than once")
    return classes


def resolve_classes(source: Source, pinned: Optional[List[str]], pinned_from: str) -> List[str]:
    """The label order: `pinned` (from --classes or OUT/classes.json) or the source's own."""
    present = sorted({s.cls for s in source.samples})
    if pinned is None:
        return source.natural_classes or present
    if source.kind == "list":  # integer labels index the pinned names
        top = max(int(c) for c in present)
        if top >= len(pinned):
            raise SourceError(f"{source.path}: label {top} is beyond the {len(pinned)} classes of "
                              f"{pinned_from}; give a --classes file with at least {top + 1} names")
        return pinned
    known = set(pinned)
    unknown = [c for c in present if c not in known]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        way_out = ("add it there, or leave --classes out to use the source's own classes"
                   if pinned_from.startswith("--classes") else
                   "give a --classes file that lists the classes of every split, or use another OUT")
        raise SourceError(f"class {unknown[0]!r}{more} of {source.path} is not in {pinned_from}; {way_out}")
    return pinned


# ----------------------------------------------------------------------------- keys, holdout, shards
def make_keys(names: Sequence[str]) -> List[str]:
    """webdataset keys: no dots or slashes (a dot would split the key from the extension); the
    class folder is dropped where the file name alone is unique (ImageNet: n01440764_10026)."""
    stems = [re.sub(r"[^A-Za-z0-9_-]", "_", os.path.splitext(n)[0]) for n in names]
    leaves = [re.sub(r"[^A-Za-z0-9_-]", "_", os.path.splitext(os.path.basename(n))[0]) for n in names]
    use_leaf = len(set(leaves)) == len(leaves)
    used, keys = set(), []
    for stem, leaf in zip(stems, leaves):
        key = base = leaf if use_leaf else stem
        n = 1
        while key in used:
            key, n = f"{base}_{n}", n + 1
        used.add(key)
        keys.append(key)
    return keys


def holdout_keys(keys: Sequence[str], labels: Sequence[int], k: int) -> set:
    """K keys per class, those with the smallest sha256, leaving each class at least one sample."""
    by_class: Dict[int, List[str]] = {}
    for key, label in zip(keys, labels):
        by_class.setdefault(label, []).append(key)
    chosen = set()
    for members in by_class.values():
        members.sort(key=lambda key: hashlib.sha256(key.encode()).digest())
        chosen.update(members[:min(k, len(members) - 1)])
    return chosen


def cut_shards(sizes: Sequence[int], samples_per_shard: Optional[int], max_bytes: Optional[float]) -> List[int]:
    """Samples per shard, in order: by count, or by the source sizes with --max-bytes (plus the tar
    headers of a sample's three members), so the plan is known before any image is read."""
    counts, n, total = [], 0, 0
    for size in sizes:
        s = size + 1536 if max_bytes else 0
        if n and ((samples_per_shard and n >= samples_per_shard) or (max_bytes and total + s > max_bytes)):
            counts.append(n)
            n, total = 0, 0
        n += 1
        total += s
    return counts + [n] if n else counts


# ----------------------------------------------------------------------------- the plan
class Plan(NamedTuple):
    header: dict
    rows_path: str

    @property
    def identity(self) -> str:
        return self.header["identity"]

    def shard_names(self) -> List[str]:
        return [name for split in self.header["splits"].values() for name in split["filenames"]]

    def shard_splits(self) -> List[str]:
        return [s for s, split in self.header["splits"].items() for _ in split["filenames"]]

    def rows(self, shards: Optional[set] = None) -> Iterator[Row]:
        """The rows of `shards` (default: all), in plan order; reading stops after the last one."""
        if shards is not None and not shards:
            return
        last = max(shards) if shards else None
        with gzip.open(self.rows_path, "rt", encoding="utf-8") as f:
            for line in f:
                row = Row(*json.loads(line))
                if last is not None and row.shard > last:
                    return
                if shards is None or row.shard in shards:
                    yield row


def identity_of(options: dict, fingerprint: dict) -> str:
    """What a plan is made from: the options (a --classes file by its digest) and the source."""
    blob = json.dumps([PLAN_VERSION, options, fingerprint], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def build_plan(out: str, source: Source, classes: List[str], options: dict) -> Plan:
    """Compute and save the plan (see the module doc). options: split, prefix, seed, shuffle,
    samples_per_shard, max_bytes, holdout, quality (all part of the identity)."""
    index = {c: i for i, c in enumerate(classes)}
    samples = sorted(source.samples, key=lambda s: s.name)
    keys = make_keys([s.name for s in samples])
    labels = [index[s.cls] if source.kind != "list" else int(s.cls) for s in samples]
    held = holdout_keys(keys, labels, options["holdout"]) if options["holdout"] else set()
    order = list(range(len(samples)))
    if options["shuffle"]:
        random.Random(options["seed"]).shuffle(order)  # one global shuffle: shards mix classes
    splits = [(options["split"], options["prefix"])] + ([(HOLDOUT_SPLIT, HOLDOUT_SPLIT)] if held else [])
    header_splits, members_of = {}, []
    for held_out, (split, prefix) in enumerate(splits):  # the second split, if any, is the holdout
        members = [i for i in order if (keys[i] in held) == bool(held_out)]
        counts = cut_shards([samples[i].size for i in members], options["samples_per_shard"], options["max_bytes"])
        header_splits[split] = {"name": split, "filenames": [f"{prefix}-{k:06d}.tar" for k in range(len(counts))],
                                "planned_lengths": counts}
        members_of.append((members, counts))

    def rows():  # generated while saving: 13M rows are not held twice
        first_shard = 0
        for members, counts in members_of:
            pos = 0
            for k, n in enumerate(counts):
                for i in members[pos:pos + n]:
                    s = samples[i]
                    yield (first_shard + k, keys[i], labels[i], s.file, s.offset, s.size, s.name)
                pos += n
            first_shard += len(counts)

    with_images = {s.cls for s in samples}
    header = {"version": PLAN_VERSION, "identity": identity_of(options, source.fingerprint),
              "source": {"kind": source.kind, "path": source.path, "fingerprint": source.fingerprint},
              "base": source.base, "options": options, "classes": classes,
              "classes_without_images": [c for c in classes if c not in with_images]
              if source.kind != "list" else [],
              "damaged_inner_tars": source.damaged, "num_samples": len(samples), "splits": header_splits}
    return save_plan(out, options["split"], header, rows())


def save_plan(out: str, split: str, header: dict, rows) -> Plan:
    header_path, rows_path = plan_paths(out, split)
    tmp = f"{rows_path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=3, mtime=0) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    os.replace(tmp, rows_path)
    tmp = f"{header_path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(header, f, indent=1)
    os.replace(tmp, header_path)  # the header last: a plan with a header is complete
    return Plan(header, rows_path)


def load_plan(out: str, split: str) -> Optional[Plan]:
    header_path, rows_path = plan_paths(out, split)
    if not os.path.exists(header_path):
        return None
    with open(header_path) as f:
        return Plan(json.load(f), rows_path)


def all_plans(out: str) -> List[Plan]:
    d = state_dir(out)
    names = sorted(f for f in os.listdir(d) if f.startswith("plan-") and f.endswith(".json")) if os.path.isdir(d) else []
    return [load_plan(out, n[len("plan-"):-len(".json")]) for n in names]


def differences(plan: Plan, options: dict, fingerprint: dict) -> List[str]:
    """What differs between a saved plan and this run, in words (for the refusal message)."""
    old = plan.header
    diffs = [f"--{k.replace('_', '-')} {old['options'].get(k)!r} -> {v!r}"
             for k, v in options.items() if old["options"].get(k) != v]
    if old["source"]["fingerprint"] != fingerprint:
        diffs.append(f"the source changed ({old['source']['fingerprint']} -> {fingerprint})")
    return diffs or ["the plan format"]
