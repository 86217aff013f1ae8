"""2-rank ZeRO-1 over gloo under the real `deepspeed` launcher (DS_ACCELERATOR=cpu) against a
1-rank run with the same global batch.

With data.canonical_streams=null the 2-rank run has 2 streams (ranks x 1 worker): shard A is
stream 0 (rank 0), shard B stream 1 (rank 1), and global batch j is 8 samples of each. The
1-rank run has one stream reading shard C, which interleaves A and B in chunks of 8, so its
global batch j holds exactly the samples of the 2-rank global batch j (no shuffling, no
augmentation, no drop path, no mixup, fp32): losses must agree to 1e-5. (The same data on any
world size: test_elastic_resume.py.)
"""
import os
import socket
import tarfile

import pytest
import torch

from test_train import REPO, TINY, metrics, train

pytestmark = pytest.mark.slow
MICRO = 8  # per-rank micro batch of the 2-rank run (global batch 16)


def _samples(path, n):
    """First n samples of a tar shard as [(key, {ext: bytes})]."""
    out, cur = [], None
    with tarfile.open(path) as t:
        for m in t.getmembers():
            key, ext = m.name.split(".", 1)
            if cur is None or cur[0] != key:
                if len(out) == n:
                    break
                cur = (key, {})
                out.append(cur)
            cur[1][ext] = t.extractfile(m).read()
    return out[:n]


def _write(path, samples):
    import io
    with tarfile.open(path, "w") as t:
        for key, files in samples:
            for ext, data in sorted(files.items()):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_zero1_two_ranks_matches_one_rank(tmp_path):
    from swinv2_train.data import ensure_synthetic_shards

    syn = ensure_synthetic_shards()
    n = 64
    a = [(f"a{i:04d}", f) for i, (_, f) in enumerate(_samples(os.path.join(syn["dir"], "train-000000.tar"), n))]
    b = [(f"b{i:04d}", f) for i, (_, f) in enumerate(_samples(os.path.join(syn["dir"], "train-000001.tar"), n))]
    c = [s for j in range(0, n, MICRO) for s in (*a[j:j + MICRO], *b[j:j + MICRO])]
    for name, samples in (("A", a), ("B", b), ("C", c)):
        _write(tmp_path / f"{name}.tar", samples)

    common = [*TINY, "train.max_steps=5", "data.augment=none", "model.drop_path_rate=0", "train.precision=fp32",
              "data.shuffle_buffer=0", "data.shard_shuffle=false", "data.train_samples=128",
              f"data.val_shards='{syn['val_shards']}'", "logger=none", "train.probe_every=0",
              "run.export_official=false", "optim.lr=1e-3"]
    two, one = tmp_path / "two", tmp_path / "one"
    # `deepspeed` starts train/main.py as a script (sys.path handling) and appends --local_rank
    # (strip_launcher_args); on CPU --num_gpus is the number of local ranks
    train([*common, f"data.train_shards={tmp_path}/A.tar::{tmp_path}/B.tar", f"run.dir={two}"], cwd=REPO,
          cmd=("deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()), "train/main.py"))
    train([*common, f"data.train_shards={tmp_path}/C.tar", f"run.dir={one}"], cwd=tmp_path)

    l2 = [r["train/loss"] for r in metrics(two) if "train/loss" in r]
    l1 = [r["train/loss"] for r in metrics(one) if "train/loss" in r]
    assert len(l1) == len(l2) == 5
    assert max(abs(x - y) for x, y in zip(l1, l2)) < 1e-5, (l1, l2)
    assert len({round(x, 4) for x in l1}) > 1  # it is training, not a constant

    # ZeRO-1: each rank's optimizer file holds about half of the fp32 master weights (and of
    # the Adam moments), the 1-rank file all of them
    def partition(run, rank):
        sd = torch.load(run / "checkpoints" / "step_00000005" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
                        map_location="cpu", weights_only=False)["optimizer_state_dict"]
        fp32 = sum(t.numel() for t in sd["single_partition_of_fp32_groups"])
        moments = sum(s["exp_avg"].numel() for s in sd["base_optimizer_state"]["state"].values())
        return fp32, moments

    full, full_m = partition(one, 0)
    (r0, m0), (r1, m1) = partition(two, 0), partition(two, 1)
    import swinv2
    n_params = sum(p.numel() for p in swinv2.create_model(
        "tiny", img_size=32, window_size=4, num_classes=10, embed_dim=16, depths=(1, 1, 1, 1),
        num_heads=(1, 2, 2, 4)).parameters())
    assert abs(full - n_params) <= 64 and abs(full_m - n_params) <= 64  # up to alignment padding
    for part in (r0, r1, m0, m1):
        assert abs(part - n_params / 2) <= 64, (part, n_params)
    assert not (two / "checkpoints" / "step_00000005" / "zero_pp_rank_2_mp_rank_00_optim_states.pt").exists()


def test_bad_sample_counts_are_summed_over_ranks(tmp_path):
    """data/bad/* in metrics.jsonl are the counts of every rank (summed), not rank 0's: over one
    epoch, two ranks report what one process reports for the same shards."""
    from data_helpers import jpeg_bytes, write_tar

    from swinv2_train.data import ensure_synthetic_shards

    syn = ensure_synthetic_shards()
    corrupt = {"A": (1, 5), "B": (2, 3, 9)}  # early, so every run reads past them
    for name, bad in corrupt.items():
        samples = [{"__key__": f"{name}{i:03d}", "jpg": b"not a jpeg" if i in bad else jpeg_bytes(i),
                    "cls": str(i % 10).encode()} for i in range(32)]
        write_tar(tmp_path / f"{name}.tar", samples)
    good = 64 - 5
    common = [*TINY, "train.batch_size=4", "train.max_steps=14", f"data.train_samples={good - good % 4}",
              "data.augment=none", "data.shuffle_buffer=0", "data.shard_shuffle=false", "data.num_classes=10",
              f"data.train_shards={tmp_path}/A.tar::{tmp_path}/B.tar", f"data.val_shards='{syn['val_shards']}'",
              "logger=none", "train.probe_every=0", "train.eval_every=0", "run.export_official=false"]
    two, one = tmp_path / "two", tmp_path / "one"
    train([*common, f"run.dir={two}"], cwd=REPO,
          cmd=("deepspeed", "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "--module", "swinv2_train.main"))
    train([*common, f"run.dir={one}"], cwd=tmp_path)

    def corrupt_count(run):  # (other data/bad/* keys, e.g. batch-level events, depend on the split)
        last = [r for r in metrics(run) if "train/loss" in r][-1]
        return last["step"], last.get("data/bad/corrupt_image")

    assert corrupt_count(one) == corrupt_count(two) == (14, 5)
