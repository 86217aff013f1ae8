"""Elastic train order (train/data/stream.py): global batch b is the same set of samples for every
ranks x workers; a resize mid-epoch reads each sample of the epoch exactly once. Real shards,
real DataLoader workers; ranks are simulated by one TrainStream per rank in this process."""
import json
import os
import random
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from swinv2_train.data import (DataConfig, DataGeometryError, DataPipelineError,
                               ShardPatternError, TrainStream, merge_positions)
from swinv2_train.errors import UserError

sys.path.insert(0, os.path.dirname(__file__))
from data_helpers import jpeg_bytes, make_dataset, write_tar  # noqa: E402

B, A = 8, 2  # global batch, grad accumulation (micro-batch = B / (ranks x A))


def cfg_for(pattern, **kw):
    base = dict(train_shards=pattern, val_shards=pattern, num_classes=1000, augment="light",
                num_workers=1, shuffle_buffer=8, max_bad_fraction=1.0, bad_window=100)
    base.update(kw)
    return DataConfig(**base)


def open_ranks(cfg, world_size, position=None, **kw):
    return [TrainStream(cfg, img_size=16, global_batch=kw.get("batch", B), grad_accum=A,
                        rank=r, world_size=world_size, seed=kw.get("seed", 0), position=position)
            for r in range(world_size)]


def next_global_batch(ranks):
    """[(key, image)] of every rank's micro-batches of the next global batch."""
    batch = []
    for st in ranks:
        for _ in range(A):
            x, y = st.next_batch()
            assert x.shape[0] == len(st.last_keys) == st.global_batch // (len(ranks) * A)
            for key, xi, yi in zip(st.last_keys, x, y.tolist()):
                assert key == f"s{yi:05d}"  # the targets belong to the keys (cls = index)
                batch.append((key, xi))
    return batch


def run(cfg, world_size, n_batches, position=None, **kw):
    """(n global batches, the merged position after each) from `position` on."""
    ranks = open_ranks(cfg, world_size, position, **kw)
    batches, positions = [], []
    for _ in range(n_batches):
        batches.append(next_global_batch(ranks))
        positions.append(merge_positions([st.position() for st in ranks]))
    for st in ranks:
        st.close()
    return batches, positions


def keys(batches):
    return [sorted(k for k, _ in b) for b in batches]


def assert_same_batches(got, want):
    assert keys(got) == keys(want)
    # the pixels too (exactly): augmentation does not depend on the rank or worker decoding
    canon = lambda b: sorted((k, x.flatten().tolist()) for k, x in b)  # noqa: E731
    assert all(canon(g) == canon(w) for g, w in zip(got, want))


@pytest.fixture(scope="module")
def data8(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("d8")), n_shards=8, per_shard=12)


@pytest.fixture(scope="module")
def data_bad(tmp_path_factory):
    """8 shards of 12 good samples; shards 0 and 1 also hold one corrupt sample each."""
    return make_dataset(str(tmp_path_factory.mktemp("dbad")), n_shards=8, per_shard=12,
                        corrupt=(0, 1))


def test_global_batches_independent_of_ranks_and_workers(data8):
    pattern, n = data8
    ref = None
    for ranks, workers in [(1, 1), (1, 2), (2, 1), (2, 2), (2, 0), (4, 1)]:
        cfg = cfg_for(pattern, canonical_streams=4, num_workers=workers)
        assert open_ranks(cfg, 1)[0].batches_per_epoch == n // B  # 4 streams x 24 samples
        batches, _ = run(cfg, ranks, n // B)
        if ref is None:
            ref = batches
        assert_same_batches(batches, ref)
    epoch = Counter(k for b in keys(ref) for k in b)
    assert sorted(epoch) == [f"s{i:05d}" for i in range(n)] and set(epoch.values()) == {1}


def test_order_depends_on_seed_epoch_and_stream_count(data8):
    pattern, n = data8
    first, _ = run(cfg_for(pattern, canonical_streams=4), 1, 2 * (n // B))  # two epochs
    other_seed, _ = run(cfg_for(pattern, canonical_streams=4), 1, 2, seed=1)
    two_streams, _ = run(cfg_for(pattern, canonical_streams=2), 1, 2)
    e0, e1 = keys(first[: n // B]), keys(first[n // B:])
    assert sorted(k for b in e1 for k in b) == sorted(k for b in e0 for k in b)  # whole epoch
    assert e1 != e0
    assert keys(other_seed) != e0[:2] and keys(two_streams) != e0[:2]


@pytest.mark.parametrize("before,after", [((2, 1), (1, 2)), ((1, 2), (2, 1)), ((1, 2), (1, 1))],
                         ids=["2x1-to-1x2", "1x2-to-2x1", "workers-2-to-1"])
def test_resize_mid_epoch_reads_each_sample_once(data_bad, before, after):
    """canonical_streams null: the first run's ranks x workers (2), kept in the position.
    Stop just after a stream skipped a corrupt sample, so the resume must skip exactly."""
    pattern, n = data_bad
    (r0, w0), (r1, w1) = before, after
    full, positions = run(cfg_for(pattern, num_workers=w0), r0, n // B)
    assert positions[0]["canonical_streams"] == 2 and len(full) == n // B == 12
    # first batch boundary at which a stream has read more samples than it handed out
    k = next(b + 1 for b, p in enumerate(positions) if sum(p["offsets"].values()) > (b + 1) * B)
    assert k < len(full)
    head, _ = run(cfg_for(pattern, num_workers=w0), r0, k)
    saved = json.loads(json.dumps(positions[k - 1]))  # survives JSON (offsets keys as strings)
    tail, end = run(cfg_for(pattern, num_workers=w1), r1, len(full) - k, position=saved)
    assert_same_batches(head + tail, full)
    trace = Counter(key for b in keys(head + tail) for key in b)
    assert sorted(trace) == [f"s{i:05d}" for i in range(n)] and set(trace.values()) == {1}
    assert end[-1]["epoch"] == 1 and end[-1]["batch"] == 0


def test_resampled_draws_independent_of_ranks_workers_and_resize(tmp_path):
    # 3 shards for 4 streams: resampled streams draw from the whole set
    pattern, _ = make_dataset(str(tmp_path), n_shards=3, per_shard=10)
    cfg = lambda w: cfg_for(pattern, resampled=True, train_samples=64, canonical_streams=4,  # noqa
                            num_workers=w)
    ref, positions = run(cfg(1), 1, 8)
    assert len(ref) == open_ranks(cfg(1), 1)[0].batches_per_epoch == 64 // B
    for ranks, workers in [(2, 2), (4, 1), (1, 2)]:
        assert_same_batches(run(cfg(workers), ranks, 8)[0], ref)
    head, _ = run(cfg(1), 2, 3)
    tail, _ = run(cfg(2), 1, 5, position=positions[2])
    assert_same_batches(head + tail, ref)


def test_short_stream_rereads_its_shards(tmp_path, caplog):
    # no _info.json and a stated data.train_samples (a count that can be wrong): 30 samples
    # spread as 10 per stream; stream 2's one shard holds 6
    for sh, n in enumerate((12, 12, 6)):
        write_tar(os.path.join(tmp_path, f"train-{sh}.tar"),
                  [{"__key__": f"s{sh * 100 + i:05d}", "jpg": jpeg_bytes(i),
                    "cls": str(sh * 100 + i).encode()} for i in range(n)])
    cfg = lambda w: cfg_for(os.path.join(tmp_path, "train-{0..2}.tar"), canonical_streams=3,  # noqa
                            num_workers=w, train_samples=30)
    with caplog.at_level("WARNING"):
        ref, _ = run(cfg(0), 1, 5, batch=6)
    assert "canonical stream 2" in caplog.text and "re-reading its shards" in caplog.text
    assert_same_batches(run(cfg(1), 3, 5, batch=6)[0], ref)
    trace = Counter(k for b in keys(ref) for k in b)
    assert {k for k, c in trace.items() if c > 1} <= {f"s{200 + i:05d}" for i in range(6)}
    assert sum(trace.values()) == 30


def test_bad_samples_counted_and_skipped_over_epochs(data_bad):
    pattern, n = data_bad
    st = open_ranks(cfg_for(pattern, canonical_streams=2, num_workers=2), 1)[0]
    keys = []
    for _ in range(2 * (n // B) * A):  # two epochs
        st.next_batch()
        keys += st.last_keys
    assert not any(k.startswith("bad") for k in keys)
    assert st.bad_samples() == {"corrupt_image": 4}  # 2 per epoch
    assert st.position() == {"epoch": 2, "batch": 0, "canonical_streams": 2, "global_batch": B,
                             "offsets": {0: 0, 1: 0}, "failed_shards": {}}
    st.close()


def test_position_only_between_global_batches_and_global_rng_untouched(data8):
    pattern, _ = data8
    st = open_ranks(cfg_for(pattern, canonical_streams=4), 1)[0]
    torch.manual_seed(7)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    st.next_batch()  # opens the DataLoader: training randomness must not shift
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert (np.random.get_state()[1] == states[2]).all()
    with pytest.raises(RuntimeError, match="middle of a global batch"):
        st.position()
    st.next_batch()
    assert st.position()["batch"] == 1
    st.close()


# ----------------------------------------------------------------------------- errors
def geometry_error(cfg, world_size=1, match="", **kw):
    with pytest.raises(DataGeometryError, match=match) as e:
        TrainStream(cfg, img_size=16, global_batch=kw.get("batch", B), grad_accum=1,
                    rank=0, world_size=world_size, seed=0, position=kw.get("position"))
    assert isinstance(e.value, UserError)
    return str(e.value)


def test_geometry_errors_name_the_keys(data8):
    pattern, _ = data8
    geometry_error(cfg_for(pattern, canonical_streams=3), match=r"train.batch_size=8 is not "
                   r"divisible by data.canonical_streams=3.*one of \[1, 2, 4, 8\]")
    geometry_error(cfg_for(pattern, num_workers=3), world_size=2, match=r"canonical_streams=6 "
                   r"\(null: .*set data.num_workers to one of \[1, 2, 4\]")
    geometry_error(cfg_for(pattern, canonical_streams=4, num_workers=3),
                   match=r"data.num_workers must divide 4 \(one of \[1, 2, 4\]\)")
    geometry_error(cfg_for(pattern, canonical_streams=4), world_size=3, batch=12,
                   match=r"rank count must divide 4 \(one of \[1, 2, 4\]\)")
    geometry_error(cfg_for(pattern, canonical_streams=16), batch=16,
                   match=r"8 shards for data.canonical_streams=16.*data.resampled=true")
    geometry_error(cfg_for(pattern, canonical_streams=4), batch=200,
                   match=r"fewer than train.batch_size")
    mid_epoch = {"epoch": 0, "batch": 3, "canonical_streams": 2, "global_batch": B, "offsets": {}}
    geometry_error(cfg_for(pattern, canonical_streams=4), position=mid_epoch,
                   match=r"data.canonical_streams=4.*set data.canonical_streams=2")
    geometry_error(cfg_for(pattern), position=mid_epoch, batch=16,
                   match=r"train.batch_size=16.*resume with train.batch_size=8")
    # at an epoch boundary both may change
    st = open_ranks(cfg_for(pattern, canonical_streams=4), 1, dict(mid_epoch, batch=0), batch=16)[0]
    assert st.canonical_streams == 4
    st.close()


def test_missing_pattern_is_a_user_error(tmp_path):
    missing = os.path.join(tmp_path, "nope-{000..003}.tar")
    with pytest.raises(ShardPatternError, match=r"nope-\{000\.\.003\}.*data.train_shards") as e:
        open_ranks(cfg_for(missing, train_samples=10), 1)
    assert isinstance(e.value, UserError)


def test_too_many_bad_samples_says_what_to_do(tmp_path):
    samples = [{"__key__": f"k{i}", "jpg": jpeg_bytes(i) if i % 2 else b"junk", "cls": b"1"}
               for i in range(40)]
    write_tar(os.path.join(tmp_path, "x-0.tar"), samples)
    cfg = cfg_for(os.path.join(tmp_path, "x-0.tar"), max_bad_fraction=0.2, bad_window=10,
                  train_samples=40, canonical_streams=1)
    st = open_ranks(cfg, 1)[0]
    with pytest.raises(DataPipelineError, match=r"rebuild the damaged ones.*raise "
                                                r"data.max_bad_fraction"):
        st.next_batch()
    st.close()


def test_unreadable_stream_names_its_shards(tmp_path):
    pattern, _ = make_dataset(str(tmp_path), n_shards=2, per_shard=8)
    with open(os.path.join(tmp_path, "train-0001.tar"), "wb") as f:
        f.write(b"not a tar" * 100)
    st = open_ranks(cfg_for(pattern, canonical_streams=2, train_samples=16), 1)[0]
    with pytest.raises(DataPipelineError, match=r"canonical stream 1 .*train-0001.tar"):
        st.next_batch()
    st.close()


# ----------------------------------------------------------------------------- distributed
def _gather_position(rank, port, pattern, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        st = TrainStream(cfg_for(pattern, canonical_streams=4, num_workers=0), img_size=16,
                         global_batch=B, grad_accum=A, rank=rank, world_size=2, seed=0)
        for _ in range(3 * A):
            st.next_batch()
        torch.save({"local": st.position(), "global": st.global_position()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("info", [True, False], ids=["info", "counted"])
def test_global_position_gathers_every_rank(data8, tmp_path, info):
    """Without _info.json the position also keeps the counted shard lengths (not gathered: the
    same on every rank)."""
    import socket

    import torch.multiprocessing as mp

    pattern = data8[0] if info else make_dataset(str(tmp_path / "d"), n_shards=8, per_shard=12,
                                                 info=False)[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gather_position, args=(port, pattern, str(tmp_path)), nprocs=2)
    got = [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in (0, 1)]
    assert got[0]["global"] == got[1]["global"] == merge_positions([g["local"] for g in got])
    assert got[0]["global"]["batch"] == 3 and sorted(got[0]["global"]["offsets"]) == [0, 1, 2, 3]
    assert ("shard_lengths" in got[0]["global"]) == (not info)
    # it resumes a single rank where the two left off
    _, want = run(cfg_for(pattern, canonical_streams=4), 1, 3)
    assert got[0]["global"] == want[-1]
