"""What a log step reports about speed (swinv2_train.throughput): MFU against a hand computation,
swinv2.flops counting multiply-accumulates, the peak table, the log line, the lr line, the
interval meter, and train.profile_steps' trace (swinv2_train.profiling)."""
import json
import os

import pytest
import torch

import swinv2
from swinv2_train.lifecycle import lr_description
from swinv2_train.throughput import (Meter, format_duration, macs_per_image, mfu_pct, model_tflops, peak_tflops,
                                     table_peak_tflops)
from swinv2_train.trainer import log_line


def test_mfu_against_a_hand_computation():
    # SwinV2-T 256/W8: 5.925697536 G multiply-accumulates per image forward (swinv2.flops).
    # 1000 images/s on one H100 SXM in bf16 (989 TFLOP/s dense):
    # 3 (forward + backward) x 2 (FLOPs per MAC) x 5.925697536e9 x 1000 = 35.554185216e12 FLOP/s
    macs = swinv2.flops(swinv2.SwinV2Config.from_variant("tiny", img_size=256, window_size=8))
    assert macs == 5_925_697_536
    assert model_tflops(macs, 1000.0) == pytest.approx(35.554185216)
    assert mfu_pct(macs, 1000.0, 989.0) == pytest.approx(100 * 35.554185216 / 989.0)  # 3.595%
    assert mfu_pct(macs, 1000.0, None) is None  # no peak, no MFU


def test_swinv2_flops_counts_multiply_accumulates():
    """torch's FLOP counter counts 2 per multiply-accumulate: half of it is swinv2.flops, to the
    terms the official formula leaves out (the CPB MLP) or adds (LayerNorm, one op per element)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = swinv2.create_model("tiny", img_size=256, window_size=8, attention="reference")
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.empty(1, 3, 256, 256))
    assert counter.get_total_flops() / 2 == pytest.approx(swinv2.flops(model.config), rel=0.01)


def test_macs_of_the_runs_model():
    config = dict(img_size=64, window_size=4, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))
    with torch.device("meta"):
        classifier = swinv2.create_model("tiny", num_classes=10, **config)
        simmim = swinv2.SimMIM(swinv2.SwinV2Config.from_variant("tiny", num_classes=0, **config))
    assert macs_per_image(classifier) == swinv2.flops(classifier.config)
    decoder = (64 // 32) ** 2 * 128 * (32 * 32 * 3)  # 1x1 conv 8C -> 32^2 x 3 per 32-pixel cell
    assert macs_per_image(simmim) == swinv2.flops(simmim.config) + decoder
    assert macs_per_image(torch.nn.Linear(2, 2)) is None


def test_peak_table_and_its_sources():
    assert table_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert table_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert table_peak_tflops("NVIDIA H100 NVL", "tf32") == 417.5
    assert table_peak_tflops("NVIDIA H200", "fp16") == 989.0
    assert table_peak_tflops("NVIDIA A100-SXM4-80GB", "tf32") == 156.0
    assert table_peak_tflops("NVIDIA A100 80GB PCIe", "fp32") == 19.5
    assert table_peak_tflops("NVIDIA L40S", "bf16") == 362.0
    assert table_peak_tflops("NVIDIA A10", "bf16") == 125.0
    assert table_peak_tflops("NVIDIA A10G", "bf16") is None            # not the A10's numbers
    assert table_peak_tflops("Tesla V100-SXM2-32GB", "fp16") == 125.0
    assert table_peak_tflops("Tesla V100-SXM2-32GB", "bf16") is None   # no bf16 tensor cores
    assert table_peak_tflops("Some Future GPU", "bf16") is None
    assert peak_tflops(250.0, torch.device("cpu"), "fp32") == (250.0, "train.peak_tflops")
    peak, why = peak_tflops(None, torch.device("cpu"), "fp32")
    assert peak is None and "train.peak_tflops" in why


def test_the_log_line_shows_progress_time_and_speed():
    m = {"train/elapsed_s": 3725.0, "train/eta_s": 90061.0, "train/loss": 1.23456, "lr": 5e-4, "train/grad_norm": 0.5,
         "train/images_per_s": 1234.4, "train/data_wait_frac": 0.031, "train/tflops": 43.87, "train/mfu_pct": 4.436,
         "train/peak_mem_mb": 20480.4}
    assert log_line(120, 300, m) == ("step 120/300 | elapsed 1:02:05 | ETA 1d 1:01:01 | loss 1.2346 | lr 5.000e-04 | "
                                     "grad_norm 0.500 | 1234 img/s | data wait 3% | 43.9 TFLOP/s | MFU 4.4% | "
                                     "peak mem 20480 MB")
    del m["train/mfu_pct"]  # a CPU without train.peak_tflops
    assert "MFU" not in log_line(1, 2, m) and "TFLOP/s" in log_line(1, 2, m)
    assert format_duration(59.6) == "0:01:00"


def test_the_lr_line_says_how_the_rate_was_made():
    assert lr_description(1e-3, 5e-4, 512, 1024) == \
        "effective lr 0.001 (optim.lr 0.0005 x batch 1024 / optim.lr_batch_ref 512)"
    assert lr_description(5e-4, 5e-4, None, 64) == \
        "lr 0.0005 (optim.lr; optim.lr_batch_ref=null: not scaled by the batch)"


def test_meter_intervals_leave_out_pauses(monkeypatch):
    clock = iter([100.0, 110.0, 130.0])
    monkeypatch.setattr("swinv2_train.throughput.time.perf_counter", lambda: next(clock))
    meter = Meter(start_step=10)              # t0 = 100
    for _ in range(4):
        meter.add_step(wait=0.5)
    meter.pause(2.0)                          # an evaluation
    lap = meter.lap(step=14, total=20)        # now = 110: 8 s of steps over 4 steps
    assert lap["step_time"] == 2.0 and lap["wait_frac"] == 0.25 and lap["elapsed"] == 10.0
    assert lap["eta"] == 10.0 / 4 * 6         # this process's mean step time, pauses included
    meter.add_step(wait=0.0)
    assert meter.lap(step=15, total=20)["step_time"] == 20.0  # now = 130: the next interval alone


def test_profile_of_two_steps_is_chrome_trace_json(tmp_path):
    from swinv2_train.profiling import StepProfiler

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    prof = StepProfiler(str(tmp_path), [2, 3], torch.device("cpu"))
    written = []
    for step in range(1, 5):
        prof.before_step(step)
        model(torch.randn(4, 8)).sum().backward()
        written.append(prof.after_step(step))
    path = str(tmp_path / "profile" / "rank0_steps_2-3.pt.trace.json")
    assert written == [None, None, path, None] and os.listdir(tmp_path / "profile") == [os.path.basename(path)]
    trace = json.load(open(path))
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "aten::addmm" in names and any(n and "backward" in n.lower() for n in names)
    assert all({"ph", "ts"} <= set(e) for e in trace["traceEvents"] if e.get("ph") == "X")


def test_a_profile_cut_short_by_the_end_of_the_run_keeps_its_steps(tmp_path):
    from swinv2_train.profiling import StepProfiler

    prof = StepProfiler(str(tmp_path), [2, 9], torch.device("cpu"))
    for step in (1, 2, 3):
        prof.before_step(step)
        torch.ones(3).sum()
        assert prof.after_step(step) is None
    path = prof.finish(3)
    assert path.endswith("rank0_steps_2-3.pt.trace.json") and "traceEvents" in json.load(open(path))
    assert prof.finish(3) is None


def test_tensorboard_profiler_plugin_reads_the_trace(tmp_path):
    """The parser of TensorBoard's profiler plugin (torch-tb-profiler, when installed) takes the trace."""
    pytest.importorskip("torch_tb_profiler", reason="torch-tb-profiler (TensorBoard's profiler plugin) not installed")
    from torch_tb_profiler.profiler.data import RunProfileData

    from swinv2_train.profiling import StepProfiler

    model = torch.nn.Linear(8, 8)
    prof = StepProfiler(str(tmp_path), [1, 1], torch.device("cpu"))
    prof.before_step(1)
    model(torch.randn(4, 8)).sum().backward()
    path = prof.after_step(1)
    data = RunProfileData.parse("rank0_steps_1-1", None, path, None)
    data.process()
    data.analyze()
    assert data.events


@pytest.mark.parametrize("override, message", [
    ("train.profile_steps=[3]", r"train.profile_steps: must be \[first, last\]"),
    ("train.profile_steps=[5,2]", r"train.profile_steps: must be \[first, last\]"),
    ("train.profile_steps=[0,2]", r"train.profile_steps: must be \[first, last\]"),
    ("train.peak_tflops=0", r"train.peak_tflops: must be > 0")])
def test_bad_profile_or_peak_settings_name_the_key(override, message):
    from test_trainer_units import spec_of

    from swinv2_train.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        spec_of(override)
