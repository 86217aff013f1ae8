"""`swinv2-train ... run.plan=true`: the preflight plan (swinv2_train.plan) and the memory model it
uses (swinv2_train.memory): its figures are the memory model's, it answers for every recipe without
building weights or starting a process group, and it warns when the estimate exceeds the GPU."""
import math
import os
import subprocess

import pytest
from hydra import compose, initialize_config_dir

from swinv2_train import memory
from swinv2_train.cli import prepare_overrides
from swinv2_train.gpus import GPUS, gpu_entry
from swinv2_train.plan import format_plan, make_plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
EXPERIMENTS = sorted(f[:-5] for f in os.listdir(os.path.join(CONFIGS, "experiment")) if f.endswith(".yaml"))
# The README's SwinV2-G example: 1536^2/W32 bf16, global batch 4096 as micro batches of 1
GIANT = ["experiment=swinv2_giant_1536_w32", "model.sequential_chunk=8", "data.num_classes=1000"]
GB = 1e9


def _plan(args):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("train", overrides=prepare_overrides(["run.plan=true", *args]))
    return make_plan(cfg)


def test_giant_plan_is_the_memory_model_table():
    """8 ranks: 25 GB per GPU plus DeepSpeed's 12 GB fp32 gradient buffer = 37 GB, fits 8 x 40 GB;
    one rank does not fit 40 GB. The same figures as scripts/memory_model.py's table (1000 classes)."""
    p8 = _plan([*GIANT, "run.plan_ranks=8", "train.grad_accum=512", "train.gpu_memory_gb=40"])
    P = memory.count_params("giant")
    assert p8["params"] == P and p8["micro"] == 1
    co = memory.stored_coefficients("sequential", "bf16")
    act = memory.predict_activations(p8["model"], 1536, 32, 1, True, co, chunk=8)["peak"]
    s = memory.state_bytes(P, "bf16", 8, ds_fp32_grad_acc=True)
    table_total = s["params"] + s["grads"] + s["optimizer"] + act + memory.RESERVE_GB * GB
    m = p8["memory"]
    assert m["activations"] == pytest.approx(act)
    assert m["without_deepspeed"] == pytest.approx(table_total)
    assert m["deepspeed"] == {"fp32 gradient buffer": s["ds_fp32_grad_acc"]}
    assert m["total"] == pytest.approx(table_total + 4 * P)
    assert 24 * GB < m["without_deepspeed"] < 26 * GB and 36 * GB < m["total"] < 38 * GB and p8["fits"]
    p1 = _plan([*GIANT, "run.plan_ranks=1", "train.grad_accum=4096", "train.gpu_memory_gb=40"])
    assert p1["memory"]["total"] > 40 * GB and not p1["fits"]
    assert "WARNING: the estimate" in format_plan(p1) and "WARNING" not in format_plan(p8)


def test_plan_throughput_and_workers():
    p = _plan(["experiment=swinv2_base_256_w8_1k", "data.num_classes=1000", "run.plan_ranks=16",
               "run.plan_gpu=A100-80GB", "run.plan_mfu=0.5", "run.plan_loader_rate=100"])
    per_gpu = 0.5 * 312e12 / (6 * p["macs"])
    assert p["images_per_s_gpu"] == pytest.approx(per_gpu) and p["gpus_per_node"] == 8
    text = format_plan(p)
    assert f"{per_gpu * 8:,.0f} per node of 8 GPUs" in text
    assert f"{-(-per_gpu * 8 // 100):.0f} data workers per node" in text
    assert "fits" in text and "80 GB (run.plan_gpu)" in text


def test_deepspeed_buffers_by_stage_and_precision():
    P = 1_000_000
    assert memory.deepspeed_buffers(P, "bf16", 8) == {"fp32 gradient buffer": 4e6}
    assert memory.deepspeed_buffers(P, "fp32", 8) == {"fp32 weight partition": 4e6 / 8}
    two = memory.deepspeed_buffers(P, "bf16", 8, zero_stage=2, reduce_bucket_size=10**5)
    assert two == {"fp32 gradient partition": 4e6 / 8, "reduce buckets": 10**5 * 2 * 2}
    assert memory.state_bytes(P, "bf16", 8, zero_stage=2)["grads"] == 2e6 / 8


def test_gpu_names():
    assert gpu_entry("NVIDIA H100 80GB HBM3") is GPUS["H100"]
    assert gpu_entry("NVIDIA A100-SXM4-40GB") is GPUS["A100-40GB"]
    assert gpu_entry("NVIDIA H100 PCIe") is GPUS["H100-PCIE"] and gpu_entry("NVIDIA A100 80GB PCIe") is GPUS["A100-80GB"]
    assert gpu_entry("NVIDIA H200") is GPUS["H200"] and gpu_entry("Tesla T4") is None


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_plan_answers_for_every_recipe(experiment):
    """Meta device only, no data read, no weights file needed (fine-tuning recipes included)."""
    p = _plan([f"experiment={experiment}", "run.plan_ranks=8"])
    assert p["params"] > 0 and p["memory"]["total"] > p["memory"]["activations"] > 0
    assert "per GPU" in format_plan(p)


def test_plan_command_prints_and_starts_nothing(tmp_path):
    """Under a launcher's environment (rank 0 of 8, no MASTER_ADDR: a process group could not start)
    the plan is for the launcher's world size, printed once, and nothing is written."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(RANK="0", WORLD_SIZE="8", LOCAL_RANK="0")
    p = subprocess.run(["swinv2-train", *GIANT, "train.grad_accum=512", "run.plan=true", "train.gpu_memory_gb=40",
                        f"run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "no process group started" in p.stdout and "8 ranks x 512 accumulation x micro 1" in p.stdout
    assert "GB per GPU" in p.stdout and "WARNING" not in p.stdout
    assert os.listdir(tmp_path) == []  # no run dir, no Hydra output


def test_plan_key_errors_name_the_key():
    from swinv2_train.config import ConfigError

    with pytest.raises(ConfigError, match="run.plan_gpu: 'K80' is not one of"):
        _plan(["run.plan_gpu=K80"])
    with pytest.raises(ConfigError, match="run.plan_mfu: must be in"):
        _plan(["run.plan_mfu=2"])


def test_readme_plan_table_is_what_the_plan_prints():
    """The README's table of plans: each row's figures as make_plan computes them (8 ranks unless the
    row says otherwise, the recipe's own batch; the giant row with its grad_accum)."""
    import re

    text = open(os.path.join(REPO, "README.md")).read()
    rows = re.findall(r"^\| `(\w+)`(?: \(([^)]*)\))? \| (.+) \|$", text, re.M)
    assert len(rows) == 4, rows
    for recipe, note, cells in rows:
        extra = ["run.plan_ranks=16"] if note == "16 ranks" else ["run.plan_ranks=8"]
        if "grad_accum" in note:
            extra.append(f"train.{note.strip('`')}")
        p = _plan([f"experiment={recipe}", "model.sequential_chunk=8" if "giant" in recipe else "run.plan=true", *extra])
        node = p["images_per_s_gpu"] * 8
        want = [f"{p['params'] / 1e6:,.1f}M" if p["params"] < 1e9 else f"{p['params'] / 1e6:,.0f}M",
                f"{p['macs'] / 1e9:,.2f}" if p["macs"] < 1e12 else f"{p['macs'] / 1e9:,.0f}", str(p["micro"]),
                f"{p['memory']['total'] / GB:.1f}", f"{round(node, -2 if node > 1000 else 0):,.0f}",
                str(math.ceil(node / 150))]
        assert [c.strip() for c in cells.split("|")] == want, recipe


DS_BUFFERS = r"""
import os, sys, json, torch, deepspeed
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
deepspeed.init_distributed("gloo", verbose=False)
from swinv2_train import memory
out = {}
for precision in ("bf16", "fp32"):
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 10))
    P = sum(p.numel() for p in model.parameters())
    conf = {"train_batch_size": 2, "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True}
    if precision == "bf16":  # as parallelize.build_ds_config
        conf.update(bf16={"enabled": True}, data_types={"grad_accum_dtype": "fp32"})
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=conf)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    if precision == "bf16":
        real = {"fp32 gradient buffer": nbytes(opt.fp32_groups_gradients_flat)}
    else:
        real = {"fp32 weight partition": nbytes(opt.single_partition_of_fp32_groups)}
    out[precision] = [type(opt).__name__, real, memory.deepspeed_buffers(P, precision, 1)]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_deepspeed_buffers_are_a_real_engines(tmp_path):
    """The buffers the plan adds are the ones DeepSpeed allocates (CPU engine, world 1, the trainer's
    precision settings): BF16_Optimizer's full-size fp32 gradients in bf16, the fp32 partition in fp32."""
    import json
    import socket
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": "/tmp/ext-gpu"}
    p = subprocess.run([sys.executable, "-c", DS_BUFFERS, str(port)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["bf16"][0] == "BF16_Optimizer" and out["bf16"][1] == out["bf16"][2]
    assert out["fp32"][0] == "DeepSpeedZeroOptimizer" and out["fp32"][1] == out["fp32"][2]
