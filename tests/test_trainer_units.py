"""The trainer's policies as units: no subprocess, no DeepSpeed engine (small fakes stand in for
the engine, the batch stream, the checkpoint manager and the preemption handler). The same
behaviours end to end, through `swinv2-train`, are in test_train.py (slow)."""
import math
import os

import pytest
import torch
from hydra import compose, initialize_config_dir

from swinv2_train.errors import NonFiniteError, ResumeMismatchError
from swinv2_train.lifecycle import cpu_threads
from swinv2_train.spec import resolve_spec
from swinv2_train.tasks import TASKS, build_task
from swinv2_train.trainer import (Budget, Cadence, KeyTrace, NonFinitePolicy, StepResult, Trainer, rank_metrics,
                                  restore)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spec_of(*overrides, world_size=1):
    with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["logger=none", "train.probe_every=0", *overrides])
    return resolve_spec(cfg, world_size, resolve_data=False)


def result(bad_loss=False, applied=None, loss=1.0):
    """A step's host values; a non-finite loss makes non-finite gradients, which DeepSpeed refuses."""
    applied = not bad_loss if applied is None else applied
    return StepResult(loss=float("nan") if bad_loss else loss, bad_loss=bad_loss, grad_norm=1.0, applied=applied,
                      time=0.5, wait=0.1)


# ----------------------------------------------------------------------------- policies
def test_nonfinite_skip_counts_and_resets():
    p = NonFinitePolicy("skip", max_consecutive=3)
    seen = [p.observe(s, result(bad_loss=s in (2, 3))) for s in range(1, 6)]
    assert seen == [False, True, True, False, False]
    assert p.total == 2 and p.consecutive == 0
    assert p.observe(6, result(applied=False)) and p.total == 3  # a refused update counts too


def test_nonfinite_skip_stops_after_k_consecutive():
    p = NonFinitePolicy("skip", max_consecutive=3)
    for s in (2, 3):
        p.observe(s, result(bad_loss=True))
    with pytest.raises(NonFiniteError, match=r"3 consecutive non-finite steps .*at step 4"):
        p.observe(4, result(bad_loss=True))


def test_nonfinite_fail_names_the_step():
    with pytest.raises(NonFiniteError, match=r"train.nan_policy=fail: .*at step 2"):
        NonFinitePolicy("fail", max_consecutive=5).observe(2, result(bad_loss=True))


def test_fp16_loss_scaler_skips_are_not_nonfinite_steps():
    p = NonFinitePolicy("fail", max_consecutive=1, loss_scaling=True)
    assert not p.observe(1, result(applied=False))
    with pytest.raises(NonFiniteError):
        p.observe(2, result(bad_loss=True))


def due_steps(cadence, total):
    return [s for s in range(1, total + 1) if cadence.due(s, total)]


def test_cadences():
    assert due_steps(Cadence(4), 12) == [4, 8, 12] and not Cadence(0).due(4, 12)
    # the trainer's probes: the first, every 4th, the last
    assert due_steps(Cadence(4, first=True, last=True), 8) == [1, 4, 8]
    assert due_steps(Cadence(0, first=True, last=True), 8) == []


def test_cadence_first_and_last_come_on_top_of_every():
    assert due_steps(Cadence(3), 8) == [3, 6]
    assert due_steps(Cadence(3, last=True), 8) == [3, 6, 8]     # the log cadence: the last step too
    assert due_steps(Cadence(3, first=True), 8) == [1, 3, 6]
    assert due_steps(Cadence(1, first=True, last=True), 3) == [1, 2, 3]  # no step twice
    assert due_steps(Cadence(10, last=True), 8) == [8]         # longer than the run: the last only


def test_budget_decides_the_end_and_what_a_checkpoint_can_resume(tmp_path):
    b = Budget.of(spec_of("train.max_steps=8", "train.stop_at_step=5"))
    assert (b.total, b.key, b.value) == (8, "train.max_steps", 8)
    assert [s for s in range(10) if b.reached(s)] == [8, 9] and [s for s in range(10) if b.stops_early(s)] == [5]
    assert b.resumes(7, "run") and not b.resumes(8, "run")  # 8: the run is complete
    with pytest.raises(ResumeMismatchError, match=r"step 9, beyond train.max_steps=8.*run.resume=never"):
        b.resumes(9, "run")
    assert "already completed its 8 steps (train.max_steps=8)" in b.completed_message("run", 8)
    # train.epochs: the total is known once the stream gives the steps per epoch
    epochs = spec_of("train.max_steps=null", "train.epochs=2")
    unknown, known = Budget.of(epochs), Budget.of(epochs, steps_per_epoch=3)
    assert unknown.total is None and not unknown.reached(10**6) and unknown.resumes(10**6, "run")
    assert known.total == 6 and known.key == "train.epochs" and not known.resumes(6, "run")
    with pytest.raises(ResumeMismatchError, match=r"beyond train.epochs=2.* \(6 steps\)"):
        known.resumes(7, "run")


def test_rank_metrics_reductions():
    """images/s from the slowest rank's step time, data wait and memory: max, bad counts: sum."""
    ranks = [StepResult(1.0, False, 1.0, True, time=0.5, wait=0.1), StepResult(1.0, False, 1.0, True, time=2.0, wait=1.5)]
    local = [[r.time, r.wait / r.time, 100.0 * (i + 1)] for i, r in enumerate(ranks)]
    counts = [{"corrupt_image": 2}, {"corrupt_image": 1, "bad_label": 4}]

    def max_over(values):
        return [max(col) for col in zip(*local)]

    def sum_over(c):
        out = {}
        for part in counts:
            for k, v in part.items():
                out[k] = out.get(k, 0) + v
        return out

    m = rank_metrics(ranks[0], 64, counts[0], max_over_ranks=max_over, sum_over_ranks=sum_over)
    assert m["train/images_per_s"] == 32.0 and m["train/data_wait_frac"] == 0.75
    assert m["train/peak_mem_mb"] == 200.0
    assert m["data/bad/corrupt_image"] == 3 and m["data/bad/bad_label"] == 4


def test_rank_metrics_single_process():
    m = rank_metrics(result(), 16, {"corrupt_image": 2})
    assert m["train/images_per_s"] == 32.0 and m["data/bad/corrupt_image"] == 2
    assert math.isclose(m["train/data_wait_frac"], 0.2)


def test_cpu_threads_leave_cores_for_data_workers(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert cpu_threads(None, num_workers=4) == 12
    assert cpu_threads(3, num_workers=4) == 3                      # explicit train.cpu_threads
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")                    # torchrun: 4 ranks share 16 cores
    assert cpu_threads(None, num_workers=2) == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("LOCAL_SIZE", "8")                          # deepspeed launcher's name
    assert cpu_threads(None, num_workers=4) == 1                   # never below one
    monkeypatch.setenv("OMP_NUM_THREADS", "5")                     # the user's setting wins
    assert cpu_threads(None, num_workers=4) == torch.get_num_threads()


# ----------------------------------------------------------------------------- the loop, with fakes
class FakeEngine:
    """What the trainer uses of a DeepSpeed engine; a non-finite gradient skips the update, as
    ZeRO's overflow check does."""

    def __init__(self):
        torch.manual_seed(0)
        self.module = torch.nn.Linear(4, 3)
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=0.1)
        self.skipped_steps, self._applied = 0, True

    def __call__(self, x):
        return self.module(x)

    def backward(self, loss):
        loss.backward()

    def step(self):
        finite = all(torch.isfinite(p.grad).all() for p in self.module.parameters())
        if finite:
            self.optimizer.step()
        else:
            self.skipped_steps += 1
        self.optimizer.zero_grad()
        self._applied = finite

    def was_step_applied(self):
        return self._applied

    def get_global_grad_norm(self):
        return 1.0


class FakeStream:
    """2 global batches (optimizer steps) per epoch, each of ACCUM micro-batches."""
    batches_per_epoch = 2
    ACCUM = 2

    def __init__(self):
        self.n = 0

    def next_batch(self):
        self.n += 1
        g = torch.Generator().manual_seed(self.n)
        return torch.randn(2, 4, generator=g), torch.tensor([0, 1])

    def global_position(self):
        epoch, batch = divmod(self.n // self.ACCUM, self.batches_per_epoch)
        return {"epoch": epoch, "batch": batch}

    def bad_samples(self):
        return {"corrupt_image": self.n // 4}

    def io_events(self):
        return {}


class FakeCheckpoints:
    def __init__(self):
        self.saved = []

    def save(self, engine, step, client_state, extra_rng=None):
        self.saved.append((step, client_state["data_position"], {k: v.clone() for k, v in engine.module.state_dict().items()}))
        return f"step_{step:08d}"


class FakePreemption:
    def __init__(self, signal_at=None):
        self.signal_at, self.flag, self.requeued, self.checks = signal_at, False, False, 0

    def should_stop(self):
        self.checks += 1
        return self.flag or (self.signal_at is not None and self.checks > self.signal_at)

    def request_stop(self):
        self.flag = True

    def requeue(self):
        self.requeued = True


class FakeTask:
    name = "fake"

    def batch(self, x, y):
        return x, y

    def loss(self, model, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y)

    def evaluate(self, model):
        return {"val/top1": 50.0}

    def describe(self, m):
        return f"top-1 {m['val/top1']}"

    def rng_state(self):
        return {}


class Recorder:
    wandb_id = None

    def __init__(self):
        self.records = []

    def log(self, m, step):
        self.records.append((step, dict(m)))


class Env:
    rank, world_size, device = 0, 1, torch.device("cpu")


def make_trainer(*overrides, signal_at=None):
    spec = spec_of("train.batch_size=4", "train.grad_accum=2", "train.max_steps=8", "sched.warmup_steps=2", *overrides)
    return Trainer(spec=spec, env=Env(), engine=FakeEngine(), task=FakeTask(), stream=FakeStream(),
                   ckpt=FakeCheckpoints(), preempt=FakePreemption(signal_at), logger=Recorder())


def test_trainer_is_built_whole():
    """Nothing is attached to a Trainer from outside: what build_trainer knows goes in its fields."""
    fields = set(Trainer.__dataclass_fields__)
    assert {"info", "ema", "probe", "key_trace", "logger"} <= fields
    tr = make_trainer()
    assert tr.info == {} and tr.budget.total == tr.total == 8


def test_fit_runs_the_budget_with_its_cadences():
    tr = make_trainer("train.log_every=3", "train.eval_every=4", "train.ckpt_every=2")
    assert tr.fit() == "completed" and tr.step == 8 and tr.total == 8 and tr.steps_per_epoch == 2
    logged = [s for s, m in tr.logger.records if "train/loss" in m]
    assert logged == [3, 6, 8]
    assert [s for s, m in tr.logger.records if "val/top1" in m] == [4]  # the end-of-run eval is finish()'s
    assert [s for s, _, _ in tr.ckpt.saved] == [2, 4, 6]
    assert tr.stream.n == 16  # accum 2 micro-batches per step
    m = dict(tr.logger.records)[8]
    assert m["train/samples_seen"] == 32 and m["train/epoch"] == 4 and m["data/bad/corrupt_image"] == 4
    assert m["lr"] == pytest.approx(tr.spec.schedule.lr_at(7, 8, 2))


def test_nan_step_is_skipped_and_logged():
    tr = make_trainer("train.debug_inject_nan_steps=[3]", "train.ckpt_every=1", "train.log_every=100")
    tr.fit()
    recs = {s: m for s, m in tr.logger.records if "train/loss" in m}
    assert sorted(recs) == [3, 8]  # a non-finite step is always logged
    assert recs[3]["train/step_applied"] == 0 and recs[3]["train/nonfinite_steps"] == 1
    weights = {s: w for s, _, w in tr.ckpt.saved}
    assert all(torch.equal(weights[2][k], weights[3][k]) for k in weights[2])  # the NaN step changed nothing
    assert not all(torch.equal(weights[3][k], weights[4][k]) for k in weights[3])


def test_nan_fail_stops_the_loop():
    tr = make_trainer("train.debug_inject_nan_steps=[2]", "train.nan_policy=fail")
    with pytest.raises(NonFiniteError, match="at step 2"):
        tr.fit()
    assert tr.step == 2


def test_preemption_saves_and_stops_at_a_boundary():
    tr = make_trainer(signal_at=3)
    assert tr.fit() == "preempted" and tr.step == 3
    assert [s for s, _, _ in tr.ckpt.saved] == [3] and tr.preempt.requeued


def test_stop_at_step_takes_the_preemption_path():
    tr = make_trainer("train.stop_at_step=5")
    assert tr.fit() == "preempted" and tr.step == 5
    step, position, _ = tr.ckpt.saved[-1]
    assert step == 5 and position == {"epoch": 2, "batch": 1}  # 5 global batches, 2 per epoch


def test_resumed_trainer_continues_the_step_count():
    tr = make_trainer("train.log_every=1")
    tr.step = 6
    assert tr.fit() == "completed"
    assert [s for s, m in tr.logger.records if "train/loss" in m] == [7, 8]


class LoadedCheckpoint:
    rank = 0

    def __init__(self, client):
        self.client = client

    def load(self, engine, tag_dir):
        return dict(self.client)


def test_restore_reads_the_elastic_position():
    pos = {"epoch": 1, "batch": 3, "canonical_streams": 4, "global_batch": 16, "offsets": {0: 12, 1: 13}}
    state = restore(LoadedCheckpoint({"step": 7, "data_position": pos, "wandb_id": "w"}), None, "ckpt")
    assert (state.step, state.data_position, state.wandb_id) == (7, pos, "w")


def test_restore_of_the_old_per_rank_position_restarts_its_epoch(caplog):
    with caplog.at_level("WARNING"):
        state = restore(LoadedCheckpoint({"step": 7, "data_position": [3, 5]}), None, "ckpt")
    assert state.step == 7 and state.data_position == {"epoch": 3, "batch": 0}
    assert "epoch 3 starts again from its first batch" in caplog.text


def test_key_trace_writes_a_line_per_step(tmp_path):
    trace = KeyTrace(str(tmp_path), rank=1)
    trace.add(["a", "b"])
    trace.add(["c"])
    trace.write(1)
    trace.write(2)
    lines = (tmp_path / "keys_rank1.jsonl").read_text().splitlines()
    assert lines == ['{"step": 1, "keys": ["a", "b", "c"]}', '{"step": 2, "keys": []}']


# ----------------------------------------------------------------------------- the task
def test_classification_task_loss_and_rng_state():
    assert set(TASKS) == {"classification", "simmim"}
    spec = spec_of("data.mixup=0.8", "data.cutmix=1.0", "data.num_classes=10")
    task = build_task(spec, Env())
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    state = task.rng_state()
    xb, yb = task.batch(x, y)
    assert yb.shape == (4, 10) and math.isclose(float(yb.sum()), 4.0, rel_tol=1e-5)  # soft targets
    task.set_rng_state(state)
    xb2, yb2 = task.batch(x, y)
    assert torch.equal(xb, xb2) and torch.equal(yb, yb2)  # the mixup generator is the task's state
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64, 10))
    loss = task.loss(model, (xb, yb))
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_log_steps_carry_time_throughput_mfu_and_a_profile(tmp_path):
    tr = make_trainer("train.log_every=4", "train.eval_every=4", f"run.dir={tmp_path}", "train.peak_tflops=2.0",
                      "train.profile_steps=[2,3]")
    tr.macs = 10**9  # a SwinV2's multiply-accumulates per image (the fake engine's Linear has none)
    tr.fit()
    m = dict((s, r) for s, r in tr.logger.records if "train/loss" in r)[8]
    assert m["train/total_steps"] == 8 and m["train/eta_s"] == 0 and m["train/elapsed_s"] > 0
    assert m["train/tflops"] == pytest.approx(6e9 * m["train/images_per_s"] / 1e12)
    assert m["train/mfu_pct"] == pytest.approx(100 * m["train/tflops"] / 2.0)
    val = [r for s, r in tr.logger.records if "val/top1" in r]
    assert val == [{"val/top1": 50.0, "train/samples_seen": 16}]  # W&B plots val against samples seen
    assert tr.best_val == {"val/top1_best": 50.0} and tr.client_state()["best_val"] == tr.best_val
    assert os.listdir(tmp_path / "profile") == ["rank0_steps_2-3.pt.trace.json"]
