"""Resize end to end, through the real trainer: a run stopped mid-epoch on R ranks and resumed on
R' ranks (and with another data.num_workers) trains on the same global batches, in the same
order, as an uninterrupted run on either world size.

The data: 8 shards x 10 samples of known keys, data.canonical_streams=4 (two shards per stream),
global batch 16 = 4 samples of each stream: 5 steps per epoch, train.epochs=2. The runs stop at
step 3 (mid-epoch; stop_at_step takes the preemption path, which checkpoints) and resume with
another world size through DeepSpeed's universal checkpoint. Augmentation is `light` (random
resized crop and flip, seeded per sample by its stream position, so the pixels do not depend on
who decodes them); mixup/cutmix and drop path are off (they draw per rank by design).
SWINV2_DEBUG_KEY_TRACE=1 makes every rank write the sample keys of each step.

Tolerance of the loss comparison: 1e-5 absolute (losses ~4.4 = ln 80 at the start). The 1- and
2-rank runs compute the same fp32 sums in another order (one forward of 16 samples vs two of 8,
the gradient all-reduce), so they differ in the last bits (2.4e-7 = one ulp at 4.4), and
training amplifies that step by step (measured over these 10 steps: at most 1e-6; it passes
1e-5 only after ~80 steps). Any other sample in a batch, or another crop, changes the loss by
~1e-2 or more.
"""
import json
import os
import subprocess
from collections import Counter

import pytest
from data_helpers import make_dataset
from test_train import clean_env, metrics

from swinv2_train.distributed import free_port

pytestmark = pytest.mark.slow

SHARDS, PER_SHARD, VAL = 8, 10, 16
STEPS_PER_EPOCH, EPOCHS, STOP = 5, 2, 3
TOL = 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic_data")
    train_pattern, n = make_dataset(str(root / "train"), n_shards=SHARDS, per_shard=PER_SHARD, size=(32, 32))
    val_pattern, _ = make_dataset(str(root / "val"), n_shards=1, per_shard=VAL, size=(32, 32), prefix="validation")
    return root, [f"data.train_shards={train_pattern}", f"data.val_shards={val_pattern}",
                  f"data.num_classes={n}", f"data.train_samples={n}", f"data.val_samples={VAL}"]


def common(data):
    return [*data[1], "model.img_size=32", "model.embed_dim=16", "model.depths=[1,1,1,1]",
            "model.num_heads=[1,2,2,4]", "model.drop_path_rate=0", "data.augment=light",
            "data.canonical_streams=4", "train.batch_size=16", "train.max_steps=null", f"train.epochs={EPOCHS}",
            "train.ckpt_every=3", "train.log_every=1", "train.eval_every=0", "train.probe_every=0", "train.progress=lines",
            "sched.warmup_steps=2", "logger=none", "run.export_official=false"]


def run(ranks, args, cwd):
    """swinv2-train on `ranks` processes (the deepspeed launcher for 2), key trace on."""
    cmd = ["swinv2-train"] if ranks == 1 else [
        "deepspeed", "--num_gpus", str(ranks), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "--module", "swinv2_train.main"]
    p = subprocess.run([*cmd, *args], cwd=cwd, env=clean_env(SWINV2_DEBUG_KEY_TRACE="1"), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-4000:]}"
    return p.stdout + p.stderr


def losses(run_dir):
    out = {}
    for r in metrics(run_dir):
        if "train/loss" in r:
            assert r["step"] not in out, f"step {r['step']} logged twice"
            out[r["step"]] = r["train/loss"]
    return out


def step_keys(run_dir):
    """{step: Counter of the sample keys of that global batch, over every rank's trace}."""
    out = {}
    for name in sorted(os.listdir(run_dir)):
        if name.startswith("keys_rank"):
            with open(os.path.join(run_dir, name)) as f:
                for line in f:
                    rec = json.loads(line)
                    out.setdefault(rec["step"], Counter()).update(rec["keys"])
    return out


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Uninterrupted on 1 and on 2 ranks; 2 -> 1 rank; 1 rank with 1 worker -> 2 ranks with 2."""
    tmp = tmp_path_factory.mktemp("elastic_runs")
    base = common(data)
    d = {name: tmp / name for name in ("one", "two", "two_to_one", "one_to_two")}
    run(1, [*base, "data.num_workers=1", f"run.dir={d['one']}"], tmp)
    run(2, [*base, "data.num_workers=1", f"run.dir={d['two']}"], tmp)
    run(2, [*base, "data.num_workers=1", f"train.stop_at_step={STOP}", f"run.dir={d['two_to_one']}"], tmp)
    logs = {"two_to_one": run(1, [*base, "data.num_workers=1", f"run.dir={d['two_to_one']}"], tmp)}
    run(1, [*base, "data.num_workers=1", f"train.stop_at_step={STOP}", f"run.dir={d['one_to_two']}"], tmp)
    logs["one_to_two"] = run(2, [*base, "data.num_workers=2", f"run.dir={d['one_to_two']}"], tmp)
    return d, logs


def test_resumed_runs_went_through_a_resize(runs):
    _, logs = runs
    assert "written by 2 ranks, this run has 1" in logs["two_to_one"]
    assert "written by 1 ranks, this run has 2" in logs["one_to_two"]
    for log in logs.values():
        assert "resumed from" in log and f"(step {STOP}, epoch 0, batch {STOP})" in log
        assert f"completed at step {STEPS_PER_EPOCH * EPOCHS}" in log


def test_losses_equal_the_uninterrupted_runs_on_either_world_size(runs):
    d, _ = runs
    reference = losses(d["one"])
    assert sorted(reference) == list(range(1, STEPS_PER_EPOCH * EPOCHS + 1))
    assert len({round(v, 3) for v in reference.values()}) > 1  # it trains: not a constant
    for name in ("two", "two_to_one", "one_to_two"):
        other = losses(d[name])
        assert sorted(other) == sorted(reference), name
        worst = max(abs(other[s] - reference[s]) for s in reference)
        assert worst < TOL, (name, worst, other, reference)


def test_every_sample_of_an_epoch_is_read_exactly_once_across_the_resize(runs, data):
    d, _ = runs
    all_keys = {f"s{i:05d}" for i in range(SHARDS * PER_SHARD)}
    reference = step_keys(d["one"])
    for name in ("one", "two", "two_to_one", "one_to_two"):
        keys = step_keys(d[name])
        assert sorted(keys) == list(range(1, STEPS_PER_EPOCH * EPOCHS + 1)), name
        for epoch in range(EPOCHS):
            steps = range(epoch * STEPS_PER_EPOCH + 1, (epoch + 1) * STEPS_PER_EPOCH + 1)
            seen = sum((keys[s] for s in steps), Counter())
            assert set(seen) == all_keys and set(seen.values()) == {1}, (name, epoch)
        assert keys == reference, name  # global batch s holds the same samples on every run
    # and the epochs are shuffled differently
    assert set(reference[1]) != set(reference[STEPS_PER_EPOCH + 1])
