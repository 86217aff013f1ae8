"""GPU tier: the trainer on one CUDA GPU, as users run it (subprocess `swinv2-train`, no launcher):
DeepSpeed ZeRO-1 in bf16 over NCCL (world 1) for a few dozen steps, resumed exactly, and
`train.compile=true` without a recompilation. Skipped, with the reason, without CUDA."""
import os
import subprocess

import pytest
import torch

from gpu_helpers import GPU
from test_train import TINY, metrics

pytestmark = GPU
STEPS = 24
GPU_RUN = [*(a for a in TINY if not a.startswith("train.eval_batch_size=")), "train.eval_batch_size=16",
           "train.precision=bf16", "logger=none", "train.probe_every=0", "data.train_samples=160",
           "data.augment=light", "model.drop_path_rate=0.1"]


def train_gpu(args, cwd, cache, **env):
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DS_ACCELERATOR")}
    e.update(PYTHONUNBUFFERED="1", SWINV2_CACHE=str(cache), **env)
    p = subprocess.run(["swinv2-train", *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p.stdout + p.stderr


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("swinv2-cache")  # the synthetic shards, made once for the module


def test_zero1_bf16_nccl_runs_and_resumes_exactly(tmp_path, cache):
    a, b = tmp_path / "a", tmp_path / "b"
    out = train_gpu([*GPU_RUN, f"train.max_steps={STEPS}", f"run.dir={a}"], tmp_path, cache)
    log = (a / "train.log").read_text()
    assert "backend='nccl'" in log and "device=device(type='cuda'" in log, log[:3000]
    assert "ZeRO stage 1, precision=bf16" in log
    train_gpu([*GPU_RUN, f"train.max_steps={STEPS}", f"run.dir={b}", f"train.stop_at_step={STEPS // 2}"],
              tmp_path, cache)
    out = train_gpu([*GPU_RUN, f"train.max_steps={STEPS}", f"run.dir={b}"], tmp_path, cache)
    assert "resumed from" in out
    wa = torch.load(a / "model_official.pth", weights_only=True)["model"]
    wb = torch.load(b / "model_official.pth", weights_only=True)["model"]
    diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not diff, f"weights differ after resume on CUDA: {diff[:5]}"
    la = {r["step"]: r["train/loss"] for r in metrics(a) if "train/loss" in r}
    lb = {r["step"]: r["train/loss"] for r in metrics(b) if "train/loss" in r}
    assert la == lb and sorted(la) == list(range(1, STEPS + 1))


def test_train_compile_on_cuda_does_not_recompile(tmp_path, cache):
    run = tmp_path / "c"
    out = train_gpu([*GPU_RUN, "train.max_steps=12", "train.compile=true", f"run.dir={run}"], tmp_path, cache,
                    TORCH_LOGS="recompiles")
    assert "train.compile: first step" in out
    assert "recompiled the model" not in out and "Recompiling" not in out, out[-4000:]
    assert (run / "model_official.pth").exists()
