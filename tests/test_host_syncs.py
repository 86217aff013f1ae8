"""The host reads an optimizer step makes, counted at the trainer's own call sites: a real
DeepSpeed ZeRO-1 engine (CPU, gloo, world 1) with train.grad_accum=4, and every Python-level read
of a tensor's value (.item(), .tolist(), float(), int(), bool()) attributed to the line of
train/trainer.py that led to it. Between two log steps a step may read only what docs/DESIGN.md
lists ("Host syncs per optimizer step"): the preemption agreement, and DeepSpeed's own overflow
check and gradient norm inside engine.step(). The losses wait for the log step."""
import json
import linecache
import os
import subprocess
import sys
from collections import Counter

import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, LOG_EVERY = 6, 3
READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")
# what a step between log steps may read (docs/DESIGN.md), by (the trainer's call site, the reader)
PREEMPTION = ("self.preempt.should_stop()", "swinv2_train:_all_reduce")  # one all-reduce of a flag: once a step
DEEPSPEED_CHECKS = {"is_invalid_grad_norm", "has_overflow", "get_grad_norm_direct", "scaled_global_norm",
                    "check_overflow"}  # DeepSpeed's overflow check and gradient norm, inside engine.step()
# values that live on the host in a GPU run too: reading them waits for no device
HOST_ONLY = {"torch:_get_value",           # torch Adam's step count: a CPU tensor unless capturable
             "swinv2_train:attach_erase",  # the erase boxes the data workers made
             "torch:__init__"}             # the DataLoader's base seed, drawn on the host when it starts


def _site(frame) -> str:
    """Who read: swinv2_train:<function>, deepspeed:<function> or torch:<function>."""
    path = frame.f_code.co_filename
    package = "deepspeed" if "/deepspeed/" in path else "torch" if "/torch/" in path else "swinv2_train"
    return f"{package}:{frame.f_code.co_name}"


def _count_reads(trainer_file: str, events: list) -> None:
    """Wrap the tensor methods that copy a value to the host; record, for each read made under a
    line of train/trainer.py, that line and the function that read."""
    import torch

    def wrap(name):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, **kw):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename != trainer_file:
                frame = frame.f_back
            if frame is not None:
                line = linecache.getline(trainer_file, frame.f_lineno).strip().split("  #")[0].removeprefix("if ")
                events.append((line.rstrip(":"), _site(sys._getframe(1))))
            return original(self, *a, **kw)

        setattr(torch.Tensor, name, counted)

    for name in READS:
        wrap(name)


def _worker(run_dir: str) -> None:
    from hydra import compose, initialize_config_dir

    from swinv2_train import trainer as T
    from swinv2_train.distributed import init_distributed, shutdown
    from swinv2_train.preemption import PreemptionHandler
    from swinv2_train.spec import resolve_spec

    with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[
            "model.img_size=32", "model.embed_dim=16", "model.depths=[1,1,1,1]", "model.num_heads=[1,2,2,4]",
            "train.batch_size=16", "train.grad_accum=4", f"train.max_steps={STEPS}", f"train.log_every={LOG_EVERY}",
            "train.probe_every=0", "train.eval_every=0", "train.ckpt_every=0", "data.num_workers=1",
            "data.mixup=0.8", "data.cutmix=1.0", "logger=none", "train.progress=lines", f"run.dir={run_dir}"])
    spec = resolve_spec(cfg)
    env = init_distributed()
    trainer = T.build_trainer(spec, env, PreemptionHandler(), None)
    events: list = []
    boundaries = []  # index into events where each step's should_stop() begins
    should_stop = trainer.preempt.should_stop
    trainer.preempt.should_stop = lambda: (boundaries.append(len(events)), should_stop())[1]
    _count_reads(T.__file__, events)
    trainer.fit()
    trainer.stream.close()
    boundaries.append(len(events))
    per_step = [events[a:b] for a, b in zip(boundaries, boundaries[1:])]
    shutdown()
    print("READS " + json.dumps(per_step), flush=True)


def test_a_step_reads_only_what_design_lists(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, __file__, str(tmp_path / "run")], env=env, capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    line = [x for x in p.stdout.splitlines() if x.startswith("READS ")]
    assert p.returncode == 0 and line, p.stdout[-3000:] + p.stderr[-6000:]
    per_step = [[tuple(e) for e in step] for step in json.loads(line[0][len("READS "):])]
    assert len(per_step) == STEPS
    for step, reads in enumerate(per_step, start=1):
        device_reads = [r for r in reads if r[1] not in HOST_ONLY]
        if step % LOG_EVERY == 0 or step == STEPS:  # the log step reads the losses and reduces the metrics
            assert any("self.loss_sum" in line for line, _ in device_reads), reads
            continue
        ours = [r for r in device_reads if r[0] != "self.engine.step()"]
        assert ours == [PREEMPTION], f"step {step} (grad_accum 4, not a log step) read {ours}"
        deepspeed = Counter(who for line, who in device_reads if line == "self.engine.step()")
        assert deepspeed and {who.split(":")[1] for who in deepspeed} <= DEEPSPEED_CHECKS, deepspeed
        assert all(who.startswith("deepspeed:") for who in deepspeed), deepspeed


if __name__ == "__main__":
    _worker(sys.argv[1])
    sys.stderr.flush()
