"""`data.root=DIR`: shard directories with `_info.json` (ours or timm's layout) or without one
(split by shard name, samples counted once per run), num_classes from `_info.json`, clear
errors naming the key, the synthetic first-run message, and `swinv2-train data.root=DIR` end
to end on shards written by the real `swinv2-make-shards`. Real files, no mocks."""
import json
import logging
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from data_helpers import jpeg_bytes, write_tar
from swinv2_tools.make_shards import main as make_shards_main
from swinv2_train.data import (DataConfig, DataSourceError, TrainStream, build_eval_loader,
                               ensure_synthetic_shards, resolve_sources)
from swinv2_train.data import shards as S

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- helpers
_OPENS: list = []  # Counters of the tests that are watching file opens


def _audit(event, args):
    if event == "open" and _OPENS and isinstance(args[0], str) and args[0].endswith(".tar"):
        for c in _OPENS:
            c[os.path.basename(args[0])] += 1


sys.addaudithook(_audit)  # audit hooks cannot be removed: it only counts while a test watches


class shard_opens:
    """Counts the opens of .tar files (by name) inside the block: every read of a shard."""

    def __enter__(self):
        self.counts = Counter()
        _OPENS.append(self.counts)
        return self.counts

    def __exit__(self, *exc):
        _OPENS.remove(self.counts)


def image_folder(root, classes=("ant", "bee", "cat"), per_class=8, size=16, seed=0):
    """ImageFolder tree: a solid colour per class plus noise."""
    rng = np.random.default_rng(seed)
    for ci, c in enumerate(classes):
        os.makedirs(os.path.join(root, c), exist_ok=True)
        colour = np.array([(80 * ci) % 256, 255 - 70 * ci, 40 + 60 * ci], dtype=np.int16)
        for i in range(per_class):
            arr = np.clip(colour + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(os.path.join(root, c, f"{c}{i:03d}.png"))
    return root


def labelled_shard(path, n, first_label=0, num_classes=3):
    write_tar(path, [{"__key__": f"{os.path.basename(path)[:-4]}_{i}", "jpg": jpeg_bytes(i),
                      "cls": str((first_label + i) % num_classes).encode()} for i in range(n)])


def no_info_dir(root):
    """train-000000..2 (5, 5, 4 samples), val-000000..1 (3, 3), plus files that are not shards."""
    os.makedirs(root, exist_ok=True)
    for k, n in enumerate((5, 5, 4)):
        labelled_shard(os.path.join(root, f"train-{k:06d}.tar"), n, k)
    for k in range(2):
        labelled_shard(os.path.join(root, f"val-{k:06d}.tar"), 3, k)
    open(os.path.join(root, "README.txt"), "w").write("not a shard")
    return str(root)


# ----------------------------------------------------------------------------- _info.json
def test_root_with_info_from_make_shards(tmp_path):
    src, out = image_folder(str(tmp_path / "src")), str(tmp_path / "shards")
    val_src = image_folder(str(tmp_path / "val"), per_class=3, seed=1)
    assert make_shards_main([src, out, "--split", "train", "--samples-per-shard", "5", "--no-progress"]) == 0
    assert make_shards_main([val_src, out, "--split", "validation", "--samples-per-shard", "4",
                             "--no-progress"]) == 0

    r = resolve_sources(DataConfig(root=out))
    assert S.expand_shards(r.train_shards) == [os.path.join(out, f"train-{k:06d}.tar") for k in range(5)]
    assert S.expand_shards(r.val_shards) == [os.path.join(out, f"validation-{k:06d}.tar") for k in range(3)]
    assert (r.train_samples, r.val_samples, r.num_classes) == (24, 9, 3)
    assert r.root == out and r.train_split == "train"  # the input is kept; a copy is returned

    # "val" names the same split as "validation"; explicit counts win
    r2 = resolve_sources(DataConfig(root=out, val_split="val", train_samples=20))
    assert r2.val_shards == r.val_shards and r2.train_samples == 20
    # the resolved config feeds the loaders: every validation sample once, labels in range
    ys = [int(y) for _, yb in build_eval_loader(DataConfig(root=out, num_workers=0, augment="none"),
                                               img_size=16, batch_size=4, rank=0, world_size=1)
          for y in yb]
    assert len(ys) == 9 and sorted(set(ys)) == [0, 1, 2]


def test_root_with_timm_layout_info(tmp_path):
    root = tmp_path / "in-wds"
    root.mkdir()
    names = {"train": ["imagenet-train-0000.tar", "imagenet-train-0001.tar"],
             "validation": ["imagenet-validation-0000.tar"]}
    lengths = {"train": [6, 4], "validation": [5]}
    for split in names:
        for fn, n in zip(names[split], lengths[split]):
            labelled_shard(str(root / fn), n, num_classes=7)
    info = {"name": "imagenet-1k", "num_classes": 7, "version": "1.0.0",
            "splits": {s: {"name": s, "num_samples": sum(lengths[s]), "filenames": names[s],
                           "shard_lengths": lengths[s]} for s in names}}
    (root / "_info.json").write_text(json.dumps(info))
    with shard_opens() as opens:
        r = resolve_sources(DataConfig(root=str(root)))
    assert not opens  # _info.json is enough: no shard is read
    assert [os.path.basename(u) for u in S.expand_shards(r.train_shards)] == names["train"]
    assert [os.path.basename(u) for u in S.expand_shards(r.val_shards)] == names["validation"]
    assert (r.train_samples, r.val_samples, r.num_classes) == (10, 5, 7)
    # the preset way: the explicit num_classes agrees
    assert resolve_sources(DataConfig(root=str(root), num_classes=7)).num_classes == 7


def test_unknown_split_lists_the_splits_present(tmp_path):
    out = str(tmp_path / "shards")
    assert make_shards_main([image_folder(str(tmp_path / "src")), out, "--no-progress"]) == 0
    with pytest.raises(DataSourceError) as e:  # make_shards wrote only "train"
        resolve_sources(DataConfig(root=out))
    msg = str(e.value)
    assert msg.startswith("data.val_split:") and "'validation'" in msg and "splits present: train" in msg
    with pytest.raises(DataSourceError, match=r"^data.train_split: .*'tain'.*present: train"):
        resolve_sources(DataConfig(root=out, train_split="tain"))
    # without _info.json: the splits present are the shard-name words
    d = no_info_dir(tmp_path / "raw")
    with pytest.raises(DataSourceError, match=r"^data.val_split: .*'test'.*present: train, val"):
        resolve_sources(DataConfig(root=d, val_split="test", num_classes=3))


def test_num_classes_conflict_and_missing(tmp_path):
    out = str(tmp_path / "shards")
    src = image_folder(str(tmp_path / "src"))
    assert make_shards_main([src, out, "--no-progress"]) == 0
    assert make_shards_main([src, out, "--split", "validation", "--no-progress"]) == 0
    with pytest.raises(DataSourceError, match=r"^data.num_classes: 1000 contradicts _info.json .*says 3"):
        resolve_sources(DataConfig(root=out, num_classes=1000))
    # explicit patterns: _info.json beside them is checked the same way
    pat = os.path.join(out, "train-000000.tar")
    with pytest.raises(DataSourceError, match=r"^data.num_classes: 5 contradicts"):
        resolve_sources(DataConfig(train_shards=pat, val_shards=pat, num_classes=5))
    # no _info.json and no value: asked for, with the way to write _info.json
    d = no_info_dir(tmp_path / "raw")
    with shard_opens() as opens, pytest.raises(
            DataSourceError, match=rf"^data.num_classes: required.*--info-only {d}"):
        resolve_sources(DataConfig(root=d))
    assert not opens  # fails before the slow counting pass


# ----------------------------------------------------------------------------- no _info.json
def test_directory_without_info_split_by_name_and_counted_once(tmp_path, caplog):
    d = no_info_dir(tmp_path / "raw")
    caplog.set_level(logging.WARNING, logger="swinv2_train.data.sources")
    with shard_opens() as opens:
        r = resolve_sources(DataConfig(root=d, num_classes=3, num_workers=0, augment="none",
                                       shuffle_buffer=0))
    assert [os.path.basename(u) for u in S.expand_shards(r.train_shards)] == [
        "train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [os.path.basename(u) for u in S.expand_shards(r.val_shards)] == ["val-000000.tar", "val-000001.tar"]
    assert (r.train_samples, r.val_samples, r.num_classes) == (14, 6, 3)
    assert opens == Counter({f: 1 for f in os.listdir(d) if f.endswith(".tar")})  # each read once
    advice = [rec.getMessage() for rec in caplog.records if "--info-only" in rec.getMessage()]
    assert len(advice) == 1 and f"swinv2-make-shards --info-only {d}" in advice[0]

    # the trainer's stream, epoch after epoch, reads the shards only to train on them
    with shard_opens() as opens:
        stream = TrainStream(r, img_size=16, global_batch=7, grad_accum=1, rank=0, world_size=1, seed=0)
        ev = build_eval_loader(r, img_size=16, batch_size=4, rank=0, world_size=1)
        assert not opens  # building a loader counts nothing
        assert stream.batches_per_epoch == 2
        for _ in range(2):  # two epochs
            assert sum(len(stream.next_batch()[1]) for _ in range(2)) == 14
        stream.close()
        assert sum(len(y) for _, y in ev) == 6
    assert all(opens[f"train-{k:06d}.tar"] == 2 for k in range(3))  # once per epoch
    assert all(opens[f"val-{k:06d}.tar"] == 1 for k in range(2))


def test_info_only_writes_what_the_counting_found(tmp_path):
    d = no_info_dir(tmp_path / "raw")
    counted = resolve_sources(DataConfig(root=d, num_classes=3))
    r = subprocess.run(["swinv2-make-shards", "--info-only", d], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    info = json.load(open(os.path.join(d, "_info.json")))
    assert set(info["splits"]) == {"train", "val"} and info["num_classes"] == 3  # largest label + 1
    assert info["splits"]["train"]["shard_lengths"] == [5, 5, 4]
    with shard_opens() as opens:
        r2 = resolve_sources(DataConfig(root=d))  # num_classes and counts now from _info.json
    assert not opens
    assert (r2.train_shards, r2.val_shards, r2.train_samples, r2.val_samples, r2.num_classes) == (
        counted.train_shards, counted.val_shards, 14, 6, 3)
    again = subprocess.run(["swinv2-make-shards", "--info-only", d], capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "--overwrite" in again.stderr  # never clobbers silently


def test_shard_split_name_rule():
    assert [S.shard_split_name(f) for f in (
        "train-000000.tar", "imagenet1k-validation-0003.tar", "val_7.tar", "train.tar", "000001.tar")] == [
        "train", "validation", "val", "train", None]


# ----------------------------------------------------------------------------- precedence
def test_explicit_patterns_win_over_root(tmp_path):
    d = no_info_dir(tmp_path / "raw")
    other = tmp_path / "other"
    other.mkdir()
    labelled_shard(str(other / "x-0.tar"), 9)
    # train from the pattern, validation still from root
    r = resolve_sources(DataConfig(root=d, train_shards=str(other / "x-0.tar"), num_classes=3))
    assert r.train_shards == str(other / "x-0.tar") and r.train_samples == 9
    assert r.val_samples == 6 and "val-" in r.val_shards
    # both patterns given: root is not looked at (may even not exist, e.g. a preset's path)
    pat = str(other / "x-0.tar")
    r = resolve_sources(DataConfig(root="/no/such/dir", train_shards=pat, val_shards=pat, num_classes=3))
    assert r.val_shards == pat
    with pytest.raises(DataSourceError, match=r"^data.root: '/no/such/dir' is not a directory"):
        resolve_sources(DataConfig(root="/no/such/dir", num_classes=3))


def test_trainer_config_checks_data_root_early(tmp_path):
    from hydra import compose, initialize_config_dir

    import swinv2_train.config as C

    def compose_(ov):
        with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base="1.3"):
            return compose("train", overrides=ov)

    with pytest.raises(C.ConfigError, match=r"^data.root: .*is not a directory"):
        C.validate(compose_([f"data.root={tmp_path}/missing"]), world_size=1)
    with pytest.raises(C.ConfigError, match=r"^data.val_shards: required"):
        C.validate(compose_([f"data.train_shards={tmp_path}/a.tar"]), world_size=1)
    # num_classes is optional (null) and data.root is a plain key of the schema
    assert C.validate(compose_([f"data.root={tmp_path}"]), world_size=1).data.num_classes is None


# ----------------------------------------------------------------------------- synthetic
def test_synthetic_first_run_says_what_and_where(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="swinv2_train.data.synthetic")
    cache = str(tmp_path / "cache")
    syn = ensure_synthetic_shards(cache)
    lines = [r.getMessage() for r in caplog.records if r.name == "swinv2_train.data.synthetic"]
    assert len(lines) == 2, lines
    assert "generating" in lines[0] and syn["dir"] in lines[0]
    assert "ready in" in lines[1] and " s:" in lines[1]
    caplog.clear()
    r = resolve_sources(DataConfig(synthetic_dir=cache))  # already there: quiet
    assert not [r_ for r_ in caplog.records if r_.name == "swinv2_train.data.synthetic"]
    assert (r.num_classes, r.train_samples, r.val_samples) == (10, 4096, 512)
    with pytest.raises(DataSourceError, match=r"^data.num_classes: 1000, but the built-in synthetic"):
        resolve_sources(DataConfig(synthetic_dir=cache, num_classes=1000))


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_swinv2_train_data_root_end_to_end(tmp_path):
    """An ImageFolder -> `swinv2-make-shards` (train + validation) -> `swinv2-train data.root=DIR`."""
    classes = ("red", "green", "blue")
    train_src = image_folder(str(tmp_path / "imgs" / "train"), classes, per_class=40, size=64)
    val_src = image_folder(str(tmp_path / "imgs" / "val"), classes, per_class=10, size=64, seed=1)
    shards = str(tmp_path / "shards")
    for src, split in ((train_src, "train"), (val_src, "validation")):
        p = subprocess.run(["swinv2-make-shards", src, shards, "--split", split, "--samples-per-shard", "32",
                            "--no-progress"], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                            "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID")}
    env.update(DS_ACCELERATOR="cpu", WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
               SWINV2_CACHE=str(tmp_path / "cache"))
    p = subprocess.run(
        ["swinv2-train", f"data.root={shards}", f"run.dir={run_dir}", "train.max_steps=3",
         "train.eval_every=0", "train.batch_size=16", "train.eval_batch_size=32", "train.amp_every=0",
         "train.progress=lines", "data.num_workers=1", "logger=none", "run.export_official=false",
         "sched.warmup_steps=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-5000:]}"
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    val = [r for r in rows if "val/samples" in r]
    assert val and val[-1]["val/samples"] == 30  # the validation split (3 x 10), not train (120)
    assert not os.path.exists(tmp_path / "cache")  # the synthetic set was not used
