"""Streaming shards from anywhere (train/data/remote.py, the failed-shard record in stream.py) and
epochs that count each sample once (sources.TrainCounts).

A real HTTP server (tests/http_shard_server.py, Python's http.server with Range requests and
faults on chosen paths) runs on 127.0.0.1 in its own process, stopped by its PID; the shards are
real tars. Small data.io_timeout_s values keep the stall tests short: a stalled shard costs at
most io_timeout_s x (io_retries + 1)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from data_helpers import jpeg_bytes, make_dataset, write_tar
from swinv2_train.data import (DataConfig, DataPipelineError, DataSourceError, TrainStream,
                               build_eval_loader, resolve_sources)
from swinv2_train.data import shards as S

HERE = os.path.dirname(os.path.abspath(__file__))
B = 8  # global batch; canonical_streams=4 -> 2 samples of each stream per batch
SHARDS, PER_SHARD = 8, 12


# ----------------------------------------------------------------------------- the server
class Server:
    """tests/http_shard_server.py serving `root` on loopback."""

    def __init__(self, root):
        self.root = root
        port_file = os.path.join(root, "_port")
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "http_shard_server.py"),
                                      root, port_file])
        deadline = time.monotonic() + 30
        while not os.path.exists(port_file):
            assert self.proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{open(port_file).read()}"

    def faults(self, **by_name):
        """Make shards misbehave: faults(**{"train-0003.tar": {"mode": "404"}}); none: all well."""
        with open(os.path.join(self.root, "_faults.json"), "w") as f:
            json.dump({f"/{name}": fault for name, fault in by_name.items()}, f)

    def requests(self):
        with open(os.path.join(self.root, "_requests.log")) as f:
            return [line.split() for line in f]

    def stop(self):
        os.kill(self.proc.pid, signal.SIGTERM)  # our own child, by its PID
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server, local pattern, http pattern, samples): 8 shards x 12 samples with _info.json."""
    root = str(tmp_path_factory.mktemp("served"))
    pattern, n = make_dataset(root, n_shards=SHARDS, per_shard=PER_SHARD)
    server = Server(root)
    yield server, pattern, f"{server.url}/train-{{0000..{SHARDS - 1:04d}}}.tar", n
    server.stop()


@pytest.fixture
def server(served):
    served[0].faults()
    yield served[0]
    served[0].faults()


def cfg_for(pattern, **kw):
    base = dict(train_shards=pattern, val_shards=pattern, num_classes=1000, augment="light",
                num_workers=0, canonical_streams=4, shuffle_buffer=8, max_bad_fraction=1.0,
                bad_window=100, io_retries=1, io_timeout_s=0.5)
    base.update(kw)
    return DataConfig(**base)


def epoch(cfg, n_batches=None, position=None):
    """(keys of each global batch, the position after each, the stream) from `position` on."""
    st = TrainStream(cfg, img_size=16, global_batch=B, grad_accum=1, rank=0, world_size=1, seed=0,
                     position=position)
    batches, positions = [], []
    try:
        for _ in range(n_batches or st.batches_per_epoch):
            st.next_batch()
            batches.append(list(st.last_keys))
            positions.append(st.position())
    finally:
        st.close()
    return batches, positions, st


def shard_keys(k):
    return {f"s{i:05d}" for i in range(k * PER_SHARD, (k + 1) * PER_SHARD)}


# ----------------------------------------------------------------------------- same batches
def test_http_shards_give_the_same_batches_as_on_disk(served, server):
    _, local, http, n = served
    on_disk, _, _ = epoch(cfg_for(local, num_workers=2))
    over_http, _, st = epoch(cfg_for(http, num_workers=2))
    assert over_http == on_disk and len(on_disk) == n // B
    assert st.bad_samples() == {} and st.io_events() == {}
    # data.root=http://...: its _info.json is read over http, the shards too
    from_root, _, _ = epoch(cfg_for(None, root=server.url, train_shards=None, val_shards=None))
    assert from_root == epoch(cfg_for(local))[0]
    # read once in this process, though sources, classes and stream lengths all ask for it
    assert [r for r in server.requests() if r[0] == "/_info.json"] == [["/_info.json", "-", "200"]]


def test_eval_loader_over_http_with_the_run_s_retries(served, server):
    """Two drops: data.io_retries=2 gets through, io_retries=1 (not the default 3) gives up."""
    _, _, http, n = served
    for retries, lost in ((2, False), (1, True)):
        server.faults(**{"train-0004.tar": {"mode": "drop", "at": 2000, "times": 2}})
        loader = build_eval_loader(cfg_for(http, augment="none", io_retries=retries),
                                   img_size=16, batch_size=16, rank=0, world_size=1)
        labels = [int(y) for _, ys in loader for y in ys]
        assert loader.bad_samples() == ({"truncated_tar": 1} if lost else {})
        assert (len(labels) < n) == lost and len(set(labels)) == len(labels)


def test_pipe_shards_and_a_failing_command(served, server, tmp_path):
    _, local, _, n = served
    root = os.path.dirname(local)
    piped = "::".join(f"pipe:cat {root}/train-{k:04d}.tar" for k in range(SHARDS))
    assert epoch(cfg_for(piped, train_samples=n))[0] == epoch(cfg_for(local))[0]
    failing = piped.replace(f"cat {root}/train-0005.tar", "exit 3")
    _, _, st = epoch(cfg_for(failing, train_samples=n))
    assert st.bad_samples() == {"unreadable_shard": 1} and st.io_events() == {"retries": 1}


# ----------------------------------------------------------------------------- failures
def readable_head(path, nbytes, tmp_path):
    """Keys the tar reader yields from the first `nbytes` of a shard."""
    cut = os.path.join(tmp_path, "cut.tar")
    with open(path, "rb") as f, open(cut, "wb") as g:
        g.write(f.read(nbytes))
    return {s["__key__"] for s in S.iter_shard(cut, Counter())}


def test_404_drop_and_stall_each_counted_exactly(served, server, tmp_path):
    """A 404 (not retried), a drop cured by one Range retry, a drop that never ends (cut short
    after 2 tries of 4000 bytes) and a stalled server (2 silent tries of io_timeout_s): each
    counted exactly, the run goes on, and only the failed shards' samples are missing."""
    _, local, http, _ = served
    server.faults(**{"train-0003.tar": {"mode": "404"},
                     "train-0005.tar": {"mode": "drop", "at": 3000, "times": 1},
                     "train-0001.tar": {"mode": "drop", "at": 4000},
                     "train-0006.tar": {"mode": "stall", "at": 0, "seconds": 60}})
    start = time.monotonic()
    batches, _, st = epoch(cfg_for(http, io_timeout_s=0.5, shuffle_buffer=0, max_failed_shards=0.2))
    took = time.monotonic() - start
    assert st.bad_samples() == {"unreadable_shard": 2, "truncated_tar": 1}
    assert st.io_events() == {"retries": 3}
    assert took < 0.5 * 2 + 10  # the stall cost at most its two silent tries
    head = readable_head(local.replace("{0000..0007}", "0001"), 2 * 4000, tmp_path)
    assert 0 < len(head) < PER_SHARD
    lost = shard_keys(3) | shard_keys(6) | (shard_keys(1) - head)
    read = {k for b in batches for k in b}
    assert read == set().union(*map(shard_keys, range(SHARDS))) - lost  # nothing else lost
    ranges = [r for path, r, status in server.requests() if path == "/train-0005.tar"]
    resumed_at = ranges.index("bytes=3000-")
    assert ranges[resumed_at - 1] == "-"  # the retry asked for the rest only


def test_a_stalled_shard_costs_at_most_timeout_times_tries(served, server, tmp_path):
    """io_timeout_s=0.3, io_retries=2: a server that sends nothing and a command that writes
    nothing are each given up after 3 silent tries, about 0.9 s, and the command is stopped."""
    from swinv2_train.data.remote import ShardIO

    server.faults(**{"train-0007.tar": {"mode": "stall", "at": 0, "seconds": 60}})
    pid_file = os.path.join(tmp_path, "sleep.pid")
    sources = (f"{server.url}/train-0007.tar", f"pipe:sleep 30 & echo $! > {pid_file}; wait")
    for url in sources:
        counts = Counter()
        start = time.monotonic()
        assert list(S.iter_shard(url, counts, ShardIO(retries=2, timeout_s=0.3))) == []
        took = time.monotonic() - start
        assert counts == {"unreadable_shard": 1, "io_retries": 2}
        assert 0.9 <= took < 0.9 + 1.0, (url, took)
    assert not process_alive(int(open(pid_file).read()))  # the command's group was stopped


def process_alive(pid, wait_s=2.0):
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):  # a zombie: dead, not yet reaped
                    return False
        except FileNotFoundError:
            return False
        time.sleep(0.05)
    return True


def test_resume_after_a_skipped_shard_replays_the_same_batches(served, server):
    _, _, http, _ = served
    server.faults(**{"train-0002.tar": {"mode": "404"}})
    cfg = cfg_for(http, num_workers=1)
    full, positions, _ = epoch(cfg)
    k = 4
    saved = json.loads(json.dumps(positions[k - 1]))  # as a checkpoint keeps it
    (stream, record), = saved["failed_shards"].items()  # shard 2 of stream 2: nothing read
    assert stream == "2" and list(record.values()) == [0]
    server.faults()  # the shard is back: the rest of this epoch still goes without it
    tail, _, st = epoch(cfg, len(full) - k, position=saved)
    assert tail == full[k:] and st.bad_samples() == {}
    unrecorded = {key: v for key, v in saved.items() if key != "failed_shards"}  # older position
    assert epoch(cfg, len(full) - k, position=unrecorded)[0] != full[k:]
    # the next epoch reads it again
    nxt, _, _ = epoch(cfg, position={**saved, "epoch": 1, "batch": 0, "offsets": {},
                                     "failed_shards": {}})
    assert shard_keys(2) <= {key for b in nxt for key in b}


def test_a_retry_from_a_server_without_range_support(served, server):
    """The server ignores Range: the retry gets the whole file again and skips what was read."""
    _, local, http, _ = served
    server.faults(**{"train-0005.tar": {"mode": "drop", "at": 3000, "times": 1, "norange": True}})
    over_http, _, st = epoch(cfg_for(http))
    assert over_http == epoch(cfg_for(local))[0]
    assert st.bad_samples() == {} and st.io_events() == {"retries": 1}
    asked = [(r, status) for p, r, status in server.requests() if p == "/train-0005.tar"]
    assert asked[-2:] == [("-", "200"), ("bytes=3000-", "200")]  # the rest asked, the whole sent


def test_resampled_streams_record_failed_draws_and_replay_them(served, server):
    _, _, http, n = served
    server.faults(**{f"train-{k:04d}.tar": {"mode": "404"} for k in range(4)})
    cfg = cfg_for(http, resampled=True, train_samples=n, canonical_streams=2, num_workers=1,
                  max_failed_shards=1.0)
    full, positions, st = epoch(cfg, 6)
    assert st.bad_samples()["unreadable_shard"] >= 1 and any(positions[2]["failed_shards"].values())
    server.faults()  # back: the resumed epoch still goes without the draws that failed
    tail, _, _ = epoch(cfg, 3, position=json.loads(json.dumps(positions[2])))
    assert tail == full[3:]


@pytest.mark.parametrize("workers", [0, 1])
def test_mostly_failing_source_stops_with_the_urls(served, server, workers):
    _, _, http, _ = served
    server.faults(**{f"train-{k:04d}.tar": {"mode": "404"} for k in range(1, SHARDS)})
    with pytest.raises(DataPipelineError) as e:
        epoch(cfg_for(http, num_workers=workers))
    msg = str(e.value)
    named = [f"{server.url}/train-{k:04d}.tar (unreadable)" for k in range(1, SHARDS)]
    assert sum(u in msg for u in named) == 2  # the second failure is over 5% of 20 shards
    assert "data.max_failed_shards=0.05" in msg and "data.io_retries" in msg
    # 1.0: trains on what is left
    _, _, st = epoch(cfg_for(http, num_workers=workers, max_failed_shards=1.0,
                             canonical_streams=1), 2)
    assert st.bad_samples()["unreadable_shard"] >= 1


def test_http_root_errors_name_the_key(served, server):
    with pytest.raises(DataSourceError, match=r"^data.root: .*/nope/_info.json does not exist.*"
                                              r"data.train_shards"):
        resolve_sources(DataConfig(root=f"{server.url}/nope", num_classes=1000))
    closed = "http://127.0.0.1:9/shards"  # discard port: nothing listens
    with pytest.raises(DataSourceError, match=r"^data.root: .*Connection refused.*after 1 "
                                              r"retries.*data.io_retries"):
        resolve_sources(DataConfig(root=closed, num_classes=1000, io_retries=1))


# ----------------------------------------------------------------------------- epoch length
def corrupt_set(root, shards=4, good=12, corrupt=8):
    """No _info.json; each shard: `corrupt` undecodable samples among `good` ones, ending with
    a good one (so no bad sample trails the last good one of a stream)."""
    os.makedirs(root, exist_ok=True)
    for sh in range(shards):
        samples = []
        for i in range(good):
            idx = sh * good + i
            if i < corrupt:
                samples.append({"__key__": f"bad{sh}_{i}", "jpg": b"\xff\xd8 not a jpeg", "cls": b"1"})
            samples.append({"__key__": f"s{idx:05d}", "jpg": jpeg_bytes(idx), "cls": str(idx).encode()})
        write_tar(os.path.join(root, f"train-{sh:04d}.tar"), samples)
    return os.path.join(root, f"train-{{0000..{shards - 1:04d}}}.tar"), shards * good


def test_epoch_reads_each_sample_once_and_counts_each_bad_one_once(tmp_path, caplog):
    """2/5 of the keys corrupt, no _info.json: the epoch is the usable samples (48, not 80), each
    read once, each bad one counted once; the counts stay with the run (its position)."""
    pattern, good = corrupt_set(str(tmp_path))
    cfg = cfg_for(pattern, val_shards=pattern, shuffle_buffer=0, num_workers=1)
    with caplog.at_level("WARNING"):
        batches, positions, st = epoch(cfg)
    assert len(batches) == good // B == 6 and "re-reading" not in caplog.text
    read = Counter(k for b in batches for k in b)
    assert set(read) == {f"s{i:05d}" for i in range(good)} and set(read.values()) == {1}
    assert st.bad_samples() == {"corrupt_image": 32}
    assert positions[0]["shard_lengths"] == [12, 12, 12, 12]
    # a resume takes the counts from the position: no shard is read to count them
    os.remove(os.path.join(tmp_path, "train-0003.tar"))
    resumed = TrainStream(cfg, img_size=16, global_batch=B, grad_accum=1, rank=0, world_size=1,
                          seed=0, position=positions[2])
    assert resumed.batches_per_epoch == 6
    resumed.close()


def test_a_run_begun_before_usable_counts_keeps_its_epoch(tmp_path):
    """A position without shard_lengths (written before this change): keys are counted as then,
    so the epoch and the position's batch index mean what they meant."""
    pattern, good = corrupt_set(str(tmp_path))
    old = {"epoch": 0, "batch": 3, "canonical_streams": 4, "global_batch": B,
           "offsets": {"0": 10, "1": 10, "2": 10, "3": 10}}
    st = TrainStream(cfg_for(pattern, shuffle_buffer=0), img_size=16, global_batch=B, grad_accum=1,
                     rank=0, world_size=1, seed=0, position=old)
    assert st.batches_per_epoch == 80 // B and "shard_lengths" not in st.position()
    st.next_batch()
    assert st.position()["batch"] == 4
    st.close()


# ----------------------------------------------------------------------------- end to end
def two_split_dir(root):
    """train-*.tar (4 x 16) and validation-*.tar (1 x 16) with one _info.json for both."""
    make_dataset(root, n_shards=1, per_shard=16, size=(32, 32), prefix="validation")
    val_info = json.load(open(os.path.join(root, "_info.json")))["splits"]
    make_dataset(root, n_shards=4, per_shard=16, size=(32, 32))
    info = json.load(open(os.path.join(root, "_info.json")))
    info["splits"].update(val_info)
    info["num_classes"] = 64
    json.dump(info, open(os.path.join(root, "_info.json"), "w"))


@pytest.mark.slow
def test_swinv2_train_from_an_http_root(tmp_path):
    from test_train import clean_env

    root = str(tmp_path / "shards")
    two_split_dir(root)
    server = Server(root)
    try:
        server.faults(**{"train-0002.tar": {"mode": "drop", "at": 5000, "times": 1}})
        run_dir = tmp_path / "run"
        p = subprocess.run(
            ["swinv2-train", f"data.root={server.url}", f"run.dir={run_dir}", "train.max_steps=3",
             "train.eval_every=3", "train.batch_size=8", "train.eval_batch_size=8",
             "train.amp_every=0", "train.log_every=1", "train.progress=lines", "data.num_workers=1",
             "data.canonical_streams=4", "model.img_size=32", "logger=none",
             "run.export_official=false", "sched.warmup_steps=1"],
            cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    finally:
        server.stop()
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["val/samples"] for r in rows if "val/samples" in r][-1] == 16
    logged = [r for r in rows if "train/loss" in r]
    assert len(logged) == 3 and not any(k.startswith("data/bad/") for r in logged for k in r)
    assert any(r.get("data/io/retries") == 1 for r in logged)
