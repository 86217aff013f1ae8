"""make_shards from folders and list files: round trip, resumability, workers, a later split's labels;
the synthetic default generated once and reused. The release archives: test_make_shards_archive.py."""
import glob
import json
import multiprocessing as mp
import os

import numpy as np
import pytest
import torch
from PIL import Image

from swinv2_tools.make_shards import main as make_shards_main
from swinv2_train.data import DataConfig, TrainStream, build_eval_loader, ensure_synthetic_shards

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def make_folder(root, classes=("cat", "dog", "eel"), per_class=5, size=32):
    """Each image: a distinct smooth colour gradient; mixed JPEG and PNG inputs."""
    originals = {}
    rng = np.random.default_rng(0)
    for ci, c in enumerate(classes):
        os.makedirs(os.path.join(root, c))
        for i in range(per_class):
            base = rng.integers(30, 225, size=3)
            ramp = np.linspace(-25, 25, size)[None, :, None]
            arr = np.clip(base[None, None, :] + ramp, 0, 255).astype(np.uint8)
            arr = np.repeat(arr, size, axis=0)
            ext = "png" if i % 2 else "jpg"
            Image.fromarray(arr).save(os.path.join(root, c, f"img{i}.{ext}"), quality=95)
            originals[(c, i)] = (arr, ci)
    return originals


def test_round_trip_folder_to_loader(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    originals = make_folder(str(src))
    assert make_shards_main([str(src), str(out), "--samples-per-shard", "4", "--no-progress"]) == 0
    info = json.load(open(out / "_info.json"))["splits"]["train"]
    assert info["num_samples"] == 15 and info["shard_lengths"] == [4, 4, 4, 3]
    assert json.load(open(out / "classes.json")) == ["cat", "dog", "eel"]
    pattern = str(out / "train-{000000..000003}.tar")
    cfg = DataConfig(val_shards=pattern, train_shards=pattern, num_classes=3, augment="none",
                     num_workers=0, test_crop=False)
    loader = build_eval_loader(cfg, img_size=32, batch_size=5, rank=0, world_size=1)
    got = [(x, int(y)) for xb, yb in loader for x, y in zip(xb, yb)]
    assert len(got) == 15
    remaining = dict(originals)
    for x, y in got:  # match each decoded image to its closest original
        pix = (x * STD + MEAN).permute(1, 2, 0).numpy() * 255
        key = min(remaining, key=lambda k: np.abs(remaining[k][0] - pix).mean())
        arr, label = remaining.pop(key)
        assert label == y
        assert np.abs(arr - pix).mean() < 3.0  # JPEG round trip
    # the train stream reads the same shards (epoch length from _info.json)
    tl = TrainStream(cfg, img_size=32, global_batch=5, grad_accum=1, rank=0, world_size=1, seed=0)
    labels = [tl.next_batch()[1] for _ in range(tl.batches_per_epoch)]
    tl.close()
    assert tl.batches_per_epoch == 3 and sorted(torch.cat(labels).tolist()) == sorted(y for _, y in got)


def test_list_file_and_reencode(tmp_path):
    src = tmp_path / "imgs"
    os.makedirs(src)
    lines = []
    for i in range(6):
        Image.new("RGB", (20, 20), (i * 40, 10, 200)).save(src / f"a{i}.png")
        lines.append(f"imgs/a{i}.png {i % 3}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    make_shards_main(["--list", str(tmp_path / "list.txt"), str(out), "--split", "validation",
                      "--samples-per-shard", "3", "--no-progress"])
    import tarfile

    with tarfile.open(out / "validation-000000.tar") as tf:
        names = tf.getnames()
        jpg = tf.extractfile([n for n in names if n.endswith(".jpg")][0]).read()
    assert jpg[:2] == b"\xff\xd8"  # PNG input re-encoded to JPEG
    assert json.load(open(out / "_info.json"))["splits"]["validation"]["num_samples"] == 6


def test_resume_skips_complete_shards(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_folder(str(src), per_class=4)
    args = [str(src), str(out), "--samples-per-shard", "3", "--no-progress"]
    make_shards_main(args)
    shards = sorted(glob.glob(str(out / "train-*.tar")))
    assert len(shards) == 4
    before = {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in shards}
    with open(shards[-1], "rb") as f:
        last_bytes = f.read()
    # simulate an interruption while writing the last shard: final missing, temp debris left
    os.remove(shards[-1])
    debris = out / ".train-000003.tar.tmp-99999"
    debris.write_bytes(b"partial")
    make_shards_main(args)
    for p in shards[:-1]:
        st = os.stat(p)
        assert (st.st_ino, st.st_mtime_ns) == before[p]  # complete shards not rewritten
    assert os.path.exists(shards[-1]) and not debris.exists()
    with open(shards[-1], "rb") as f:
        assert f.read() == last_bytes  # deterministic assignment: same content again
    info = json.load(open(out / "_info.json"))["splits"]["train"]
    assert info["shard_lengths"] == [3, 3, 3, 3]
    # changing the plan with shards present is refused, not silently mixed
    with pytest.raises(SystemExit, match="different partial run"):
        make_shards_main([str(src), str(out), "--samples-per-shard", "5", "--no-progress"])


def test_max_bytes_plan(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_folder(str(src), per_class=4)
    make_shards_main([str(src), str(out), "--max-bytes", "6000", "--no-progress"])
    info = json.load(open(out / "_info.json"))["splits"]["train"]
    assert sum(info["shard_lengths"]) == 12 and len(info["filenames"]) > 1


def _gen(cache, q):
    q.put(ensure_synthetic_shards(cache)["train_shards"])


def test_synthetic_generated_once_and_reused(tmp_path):
    cache = str(tmp_path / "cache")
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_gen, args=(cache, q)) for _ in range(2)]  # concurrent ranks
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    pats = {q.get(), q.get()}
    assert len(pats) == 1
    r = ensure_synthetic_shards(cache)
    files = sorted(glob.glob(os.path.join(r["dir"], "*")))
    stamps = {f: os.stat(f).st_mtime_ns for f in files}
    r2 = ensure_synthetic_shards(cache)
    assert r2 == r and {f: os.stat(f).st_mtime_ns for f in files} == stamps
    assert len(glob.glob(os.path.join(r["dir"], "train-*.tar"))) == 8
    assert len(glob.glob(os.path.join(r["dir"], "val-*.tar"))) == 2
    assert not [d for d in os.listdir(cache) if ".tmp-" in d]  # no temp dirs left behind
    assert r["num_classes"] == 10 and r["train_samples"] == 4096 and r["val_samples"] == 512
    # null shards -> the synthetic default through the normal builders
    cfg = DataConfig(synthetic_dir=cache, num_workers=0, augment="light")
    ev = build_eval_loader(cfg, img_size=32, batch_size=128, rank=0, world_size=2)
    ys = torch.cat([y for _, y in ev])
    assert len(ys) == 256 and set(ys.tolist()) == set(range(10))


def test_folder_workers_same_bytes_and_a_later_split_keeps_the_labels(tmp_path):
    src = tmp_path / "src"
    make_folder(str(src), per_class=6)
    outs = {}
    for n in (1, 2):
        outs[n] = tmp_path / f"w{n}"
        make_shards_main([str(src), str(outs[n]), "--samples-per-shard", "5", "--workers", str(n), "--no-progress"])
    shards = sorted(p.name for p in outs[1].glob("train-*.tar"))
    assert len(shards) == 4 and all((outs[1] / s).read_bytes() == (outs[2] / s).read_bytes() for s in shards)
    # a validation folder without "dog": eel keeps label 2 from the classes.json the train split wrote
    val = tmp_path / "val"
    make_folder(str(val), classes=("cat", "eel"), per_class=2)
    make_shards_main([str(val), str(outs[1]), "--split", "validation", "--no-progress"])
    import tarfile

    with tarfile.open(outs[1] / "validation-000000.tar") as tf:
        metas = [json.loads(tf.extractfile(m).read()) for m in tf if m.name.endswith(".json")]
    labels = {meta["class_name"]: meta["label"] for meta in metas}
    assert labels == {"cat": 0, "eel": 2}
    assert json.load(open(outs[1] / "classes.json")) == ["cat", "dog", "eel"]
    assert set(json.load(open(outs[1] / "_info.json"))["splits"]) == {"train", "validation"}
