"""Streaming pipeline: the train stream's split over ranks and workers, bad input, errors; the eval
loader. (The elastic order itself, resize and resume: test_elastic_data.py.)"""
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

from swinv2_train.data import DataConfig, DataGeometryError, DataPipelineError, TrainStream, build_eval_loader

sys.path.insert(0, os.path.dirname(__file__))
from data_helpers import jpeg_bytes, make_dataset, member_offsets, write_tar  # noqa: E402


def cfg_for(pattern, **kw):
    base = dict(train_shards=pattern, val_shards=pattern, num_classes=1000, augment="none",
                num_workers=2, shuffle_buffer=8, max_bad_fraction=1.0, bad_window=100)
    base.update(kw)
    return DataConfig(**base)


def run_train(cfg, *, gbs=8, rank=0, ws=1, seed=0, position=None, img=16):
    """One epoch of rank `rank`'s train stream (grad_accum 1: a micro-batch is the rank's share)."""
    stream = TrainStream(cfg, img_size=img, global_batch=gbs, grad_accum=1, rank=rank, world_size=ws,
                         seed=seed, position=position)
    try:
        batches = [stream.next_batch() for _ in range(stream.batches_per_epoch)]
    finally:
        stream.close()
    return stream, batches


@pytest.fixture(scope="module")
def data8(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("d8")), n_shards=8, per_shard=12)


def test_two_ranks_two_workers_cover_every_sample_once(data8):
    pattern, n = data8
    cfg = cfg_for(pattern)  # canonical streams: 2 ranks x 2 workers
    seen = []
    per_rank = []
    for rank in (0, 1):
        stream, batches = run_train(cfg, gbs=8, rank=rank, ws=2)
        assert stream.batches_per_epoch == n // 8 == len(batches)
        assert all(x.shape == (4, 3, 16, 16) and x.dtype == torch.uint8 for x, _ in batches)  # 1 byte a pixel
        assert all(y.dtype == torch.int64 for _, y in batches)
        ys = torch.cat([y for _, y in batches]).tolist()
        per_rank.append(ys)
        seen += ys
    assert sorted(seen) == list(range(n))  # every sample exactly once over both ranks
    # shards are the unit of reading: a rank's samples come from whole shards (12 per shard)
    for ys in per_rank:
        shards = Counter(y // 12 for y in ys)
        assert len(shards) == 4 and set(shards.values()) == {12}


def test_uneven_shards_every_rank_same_batch_count(tmp_path):
    # 5 shards, 2 streams: stream 0 holds 3 shards, stream 1 two; the epoch is what the smaller
    # stream supplies (drop_last-like), on every rank
    pattern, n = make_dataset(str(tmp_path), n_shards=5, per_shard=8)
    counts = []
    for rank in (0, 1):
        stream, batches = run_train(cfg_for(pattern, num_workers=1), gbs=8, rank=rank, ws=2)
        counts.append(len(batches))
        assert len(batches) == stream.batches_per_epoch == 16 // 4
    assert counts[0] == counts[1]


def test_fewer_shards_than_streams_errors_clearly(tmp_path):
    pattern, _ = make_dataset(str(tmp_path), n_shards=2, per_shard=4)
    with pytest.raises(DataGeometryError, match="resampled"):
        run_train(cfg_for(pattern, num_workers=1), gbs=3, rank=0, ws=3)
    # resampled mode handles it
    stream, batches = run_train(cfg_for(pattern, resampled=True, num_workers=1), gbs=3, rank=2, ws=3)
    assert len(batches) == stream.batches_per_epoch == 8 // 3


def _bad_dataset(root):
    """Shard 0: good s0..s5 plus 6 bad samples; shard 1: 8 good, truncated inside sample t3's
    image data; shard 2: 6 good cut exactly at the header of u4 (no end marker)."""
    good = lambda k, i: {"__key__": k, "jpg": jpeg_bytes(i), "cls": str(i).encode()}  # noqa
    j = jpeg_bytes(99)
    sh0 = [good(f"s{i}", i) for i in range(6)] + [
        {"__key__": "corrupt", "jpg": b"\xff\xd8\xff\xe0garbage" * 10, "cls": b"1"},
        {"__key__": "trunc", "jpg": j[: len(j) // 2], "cls": b"2"},
        {"__key__": "nocls", "jpg": j},
        {"__key__": "notint", "jpg": j, "cls": b"seven"},
        {"__key__": "range", "jpg": j, "cls": b"5000"},
        {"__key__": "noimg", "cls": b"3"},
    ]
    write_tar(os.path.join(root, "b-0.tar"), sh0)
    p1 = os.path.join(root, "b-1.tar")
    write_tar(p1, [good(f"t{i}", 100 + i) for i in range(8)])
    _, data_off = member_offsets(p1)["t3.jpg"]
    with open(p1, "r+b") as f:
        f.truncate(data_off + 20)
    p2 = os.path.join(root, "b-2.tar")
    write_tar(p2, [good(f"u{i}", 200 + i) for i in range(6)])
    hdr, _ = member_offsets(p2)["u4.cls"]
    with open(p2, "r+b") as f:
        f.truncate(hdr)
    # b-3 does not exist; b-4 is not a tar at all
    with open(os.path.join(root, "b-4.tar"), "wb") as f:
        f.write(b"this is not a tar file" * 50)
    good_labels = list(range(6)) + [100, 101, 102] + [200, 201, 202, 203]
    return os.path.join(root, "b-{0..4}.tar"), good_labels


EXPECTED_BAD = {"corrupt_image": 2, "bad_label": 2, "label_out_of_range": 1, "missing_image": 1,
                "truncated_tar": 2, "unreadable_shard": 2}


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_inputs_skipped_and_counted_eval(tmp_path, workers):
    pattern, good_labels = _bad_dataset(str(tmp_path))
    loader = build_eval_loader(cfg_for(pattern, num_workers=workers), img_size=16, batch_size=4,
                               rank=0, world_size=1)
    ys = sorted(torch.cat([y for _, y in loader]).tolist())
    assert ys == good_labels
    assert loader.bad_samples() == EXPECTED_BAD


def test_bad_inputs_skipped_and_counted_train(tmp_path):
    pattern, good_labels = _bad_dataset(str(tmp_path))
    # 2 streams (1 rank x 2 workers): b-0, b-2, b-4 and b-1, b-3, estimated at 14 and 9 samples
    # (data.train_samples=24, no _info.json): 4 batches of 2 + 2. Stream 0 reads b-0 and the
    # head of b-2; stream 1 has 3 good samples for 8 slots: it reads its shards again, and its
    # failed shards are counted once per epoch, not once per pass.
    # 2 of the 4 shards read fail: max_failed_shards=1 lets it train on what can be read
    cfg = cfg_for(pattern, num_workers=2, train_samples=24, shuffle_buffer=0, shard_shuffle=False,
                  max_failed_shards=1.0)
    stream, batches = run_train(cfg, gbs=4)
    assert len(batches) == 4
    ys = set(torch.cat([y for _, y in batches]).tolist())
    assert ys <= set(good_labels) and len(ys) > 5
    assert stream.bad_samples() == {**EXPECTED_BAD, "truncated_tar": 1, "unreadable_shard": 1}


def test_max_bad_fraction_raises(tmp_path):
    samples = []
    for i in range(40):
        if i % 2:
            samples.append({"__key__": f"k{i}", "jpg": b"not a jpeg", "cls": b"1"})
        else:
            samples.append({"__key__": f"k{i}", "jpg": jpeg_bytes(i), "cls": b"1"})
    write_tar(os.path.join(tmp_path, "x-0.tar"), samples)
    write_tar(os.path.join(tmp_path, "x-1.tar"), samples)
    pattern = os.path.join(tmp_path, "x-{0..1}.tar")
    cfg = cfg_for(pattern, max_bad_fraction=0.2, bad_window=10, train_samples=80, num_workers=1)
    with pytest.raises(DataPipelineError, match="too many bad samples"):
        run_train(cfg, gbs=4)
    with pytest.raises(DataPipelineError, match="max_bad_fraction"):
        list(build_eval_loader(cfg, img_size=16, batch_size=4, rank=0, world_size=1))
    # within budget it passes (no shuffle: exactly every other sample is bad). 40 samples make
    # 10 batches of 4 good ones: the stream reads 79 samples, the last bad one is never reached
    ok = cfg_for(pattern, max_bad_fraction=0.5, bad_window=10, train_samples=40, shuffle_buffer=0,
                 shard_shuffle=False, num_workers=0)
    stream, batches = run_train(ok, gbs=4)
    assert len(batches) == 10 and stream.bad_samples() == {"corrupt_image": 39}


def test_missing_pattern_and_no_samples_name_the_pattern(tmp_path):
    missing = os.path.join(tmp_path, "nope-{000..003}.tar")
    with pytest.raises(FileNotFoundError, match=r"nope-\{000\.\.003\}"):
        run_train(cfg_for(missing), gbs=4)
    with pytest.raises(FileNotFoundError, match="nope"):
        build_eval_loader(cfg_for(missing), img_size=16, batch_size=4, rank=0, world_size=1)
    for i in range(2):
        with open(os.path.join(tmp_path, f"junk-{i}.tar"), "wb") as f:
            f.write(b"\0garbage" * 100)
    junk = os.path.join(tmp_path, "junk-{0..1}.tar")
    with pytest.raises(DataPipelineError, match=r"junk-\{0\.\.1\}"):  # counting finds nothing
        run_train(cfg_for(junk), gbs=4)
    with pytest.raises(DataPipelineError, match=r"junk-\{0\.\.1\}.*no readable sample"):
        run_train(cfg_for(junk, train_samples=100), gbs=4)  # epoch length given: fails in workers
    with pytest.raises(DataPipelineError, match=r"junk-\{0\.\.1\}.*no sample"):
        list(build_eval_loader(cfg_for(junk), img_size=16, batch_size=4, rank=0, world_size=1))


def test_eval_every_sample_once_across_ranks(tmp_path):
    pattern, n = make_dataset(str(tmp_path), n_shards=3, per_shard=7, prefix="validation")
    for ws in (2, 4):  # 3 shards on 4 ranks: falls back to splitting by sample
        seen = []
        for rank in range(ws):
            loader = build_eval_loader(cfg_for(pattern), img_size=16, batch_size=4, rank=rank,
                                       world_size=ws)
            seen += torch.cat([y for _, y in loader]).tolist()
        assert sorted(seen) == list(range(n))


def test_class_map_skips_unmapped(tmp_path):
    pattern, n = make_dataset(str(tmp_path), n_shards=2, per_shard=10, prefix="validation")
    mp = os.path.join(tmp_path, "map.txt")
    with open(mp, "w") as f:  # official format: line i = source index of target class i
        f.write("\n".join(str(s) for s in (3, 7, 11, 19)))
    cfg = cfg_for(pattern, class_map=mp, num_classes=4)
    loader = build_eval_loader(cfg, img_size=16, batch_size=8, rank=0, world_size=1)
    ys = sorted(torch.cat([y for _, y in loader]).tolist())
    assert ys == [0, 1, 2, 3]
    assert loader.bad_samples() == {"unmapped_label": n - 4}


def test_no_torchvision_or_timm_imported(data8):
    pattern, _ = data8
    code = (
        "import sys\n"
        "from swinv2_train.data import DataConfig, TrainStream, build_mixup\n"
        f"cfg = DataConfig(train_shards={pattern!r}, num_classes=1000, num_workers=1, augment='imagenet')\n"
        "st = TrainStream(cfg, img_size=16, global_batch=8, grad_accum=1, rank=0, world_size=1, seed=0)\n"
        "x, y = st.next_batch()\n"
        "st.close()\n"
        "build_mixup(cfg, 1000)(x, y)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torchvision', 'timm', 'swinv2')]\n"
        "assert not bad, bad\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
