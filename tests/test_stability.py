"""Post-norm stability tooling: the amplitude study end to end on a tiny budget, the amplitude
statistics against independent forward hooks, and the report command on a real trainer run dir."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import swinv2
from swinv2_tools.amplitude_report import summarize_run
from swinv2_tools.amplitude_study import parse_args
from swinv2.probes import AmplitudeProbe, logit_scales
from swinv2_train.amplitudes import amplitude_metrics
from swinv2_train.metrics import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _assert_png(path):
    assert os.path.isfile(path), path
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == PNG_MAGIC, f"{path} is not a PNG"
    assert os.path.getsize(path) > 5000, f"{path} is suspiciously small"


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    p = subprocess.run([sys.executable, "-m", "swinv2_tools.amplitude_study", "--quick", "--out", str(out)],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with open(out / "summary.json") as f:
        return out, json.load(f)


# ----------------------------------------------------------------------------- the study, end to end
@pytest.mark.slow  # subprocess trainers
def test_quick_study_runs_all_requested_variants_and_writes_plots(quick_study):
    out, summary = quick_study
    runs = {(r["norm"], r["attn"]): r for r in summary["runs"]}
    assert set(runs) == {("res_post", "cosine"), ("pre", "dot")}
    assert summary["config"]["quick"] is True and summary["config"]["steps"] == 3
    for (norm, attn), r in runs.items():
        assert r["rc"] == 0 and r["crashed"] is False, r
        s = r["summary"]
        for key in ("diverged", "failed_to_train", "nonfinite_steps", "final_loss", "final_val_top1", "mean_abs_ratio_all",
                    "mean_abs_ratio_deep_stage", "max_ratio_deep_stage", "amp_step"):
            assert key in s, (key, s)
        assert s["steps"] == 3 and s["amp_step"] == 3
        assert s["diverged"] is False and s["nonfinite_steps"] == 0
        assert 0.0 <= s["final_val_top1"] <= 100.0
        # the variant really reached the model: resolved config and logged keys
        recs = read_jsonl(os.path.join(r["run_dir"], "metrics.jsonl"))
        cfg = open(os.path.join(r["run_dir"], "config.yaml")).read()
        assert f"norm_style: {norm}" in cfg and f"attn_type: {attn}" in cfg
        has_scale = any(k.startswith("logit_scale/") for rec in recs for k in rec)
        assert has_scale == (attn == "cosine")
        n_blocks = 1 + 1 + 2 + 1  # --quick: depths [1, 1, 2, 1]
        amp_recs = [rec for rec in recs if "amplitude/00/mean_abs" in rec]
        assert amp_recs and all(f"amplitude/{n_blocks - 1:02d}/max" in rec for rec in amp_recs)
        assert not any(f"amplitude/{n_blocks:02d}/max" in rec for rec in amp_recs)
    # identical seeds, data, budget and model apart from the variant (from the resolved configs)
    assert len({r["command"].split("run.seed=")[1].split()[0] for r in summary["runs"]}) == 1
    assert summary["same_setup"] == {"identical": True, "differing_runs": []}
    figs = summary["figures"]
    assert set(figs) == {"amplitude_lr0.001", "loss", "logit_scale", "amplitude_ratio"}
    for path in figs.values():
        _assert_png(path)
    table = open(out / "summary.md").read()
    assert table.count("\n") == 2 + 2 and "res_post | cosine" in table and "pre | dot" in table


def test_study_rejects_unknown_variant():
    with pytest.raises(SystemExit):
        parse_args(["--variants", "post:cosine"])
    a = parse_args(["--variants", "pre:cosine,res_post:dot", "--lrs", "1e-3,3e-3"])
    assert a.variants == [("pre", "cosine"), ("res_post", "dot")] and a.lrs == [1e-3, 3e-3]


# ----------------------------------------------------------------------------- statistics vs hooks
def _hand_built_model():
    torch.manual_seed(0)
    m = swinv2.create_model("tiny", img_size=32, window_size=4, num_classes=5, embed_dim=16,
                            depths=(1, 2, 2, 1), num_heads=(1, 2, 2, 4), drop_path_rate=0.0)
    with torch.no_grad():
        # res-post-norm starts as identity (zero post-norms): give every block a non-trivial branch
        for layer in m.layers:
            for j, blk in enumerate(layer.blocks):
                blk.norm1.weight.fill_(0.5 + 0.25 * j)
                blk.norm2.weight.fill_(1.5)
                blk.norm2.bias.fill_(0.1)
                blk.attn.logit_scale.copy_(torch.linspace(0.5, 6.0, blk.attn.logit_scale.numel())
                                           .view_as(blk.attn.logit_scale))  # 6.0 > ln 100: clamped
    return m.eval()


def test_amplitude_stats_equal_direct_hook_computation():
    model = _hand_built_model()
    # hand-built input: a deterministic ramp with a sign pattern, no RNG
    n = 2 * 3 * 32 * 32
    x = (torch.arange(n, dtype=torch.float32) / n - 0.5).view(2, 3, 32, 32) * 4.0
    x[:, 1] = -x[:, 1] ** 2
    outputs = []  # our own hooks, blocks enumerated by walking the modules (not iter_blocks)

    def grab(module, inputs, output):
        outputs.append(output.detach().clone().double())

    handles = [blk.register_forward_hook(grab) for layer in model.layers for blk in layer.blocks]
    with AmplitudeProbe(model) as probe:
        with torch.no_grad():
            model(x)
        stats = probe.stats()
    for h in handles:
        h.remove()
    assert len(outputs) == sum(len(layer.blocks) for layer in model.layers) == len(stats) == 6
    expected = {i: {"mean_abs": o.abs().mean().item(), "rms": o.pow(2).mean().sqrt().item(),
                    "max": o.abs().max().item()} for i, o in enumerate(outputs)}
    for i in expected:
        for k in ("mean_abs", "rms", "max"):
            assert stats[i][k] == pytest.approx(expected[i][k], rel=1e-5), (i, k)
    # the blocks really differ (otherwise an index mix-up could pass unnoticed)
    assert len({round(e["mean_abs"], 4) for e in expected.values()}) == 6

    # what the trainer logs from them
    direct_scales = {}
    i = 0
    for layer in model.layers:
        for blk in layer.blocks:
            ls = blk.attn.logit_scale.detach().double().flatten()
            direct_scales[i] = torch.exp(torch.clamp(ls, max=math.log(100.0))).mean().item()
            i += 1
    m = amplitude_metrics(stats, logit_scales(model))
    for i, e in expected.items():
        for k, v in e.items():
            assert m[f"amplitude/{i:02d}/{k}"] == pytest.approx(v, rel=1e-5)
        assert m[f"logit_scale/{i:02d}"] == pytest.approx(direct_scales[i], rel=1e-6)
    assert m["logit_scale/05"] <= 100.0 + 1e-4 and max(direct_scales.values()) > 50
    assert len([k for k in m if k.startswith("amplitude/")]) == 18

    # and what the report derives from those logged metrics
    recs = [{"step": 1, "train/loss": 2.0, **m}]
    s = summarize_run(recs, depths=[1, 2, 2, 1])
    assert s["mean_abs_ratio_all"] == pytest.approx(expected[5]["mean_abs"] / expected[0]["mean_abs"], rel=1e-5)
    assert s["max_ratio_deep_stage"] == pytest.approx(expected[2]["max"] / expected[1]["max"], rel=1e-5)


def test_summary_flags_divergence_and_explosion():
    amps = {f"amplitude/{i:02d}/mean_abs": float(2 ** i) for i in range(4)}
    amps.update({f"amplitude/{i:02d}/max": float(10 * (i + 1)) for i in range(4)})
    ok = [{"step": 1, "train/loss": 2.3, **amps}, {"step": 2, "train/loss": 2.0, "train/nonfinite_steps": 0},
          {"step": 2, "val/top1": 40.0, "val/loss": 1.9}]
    s = summarize_run(ok, depths=[1, 2, 1])
    assert s["diverged"] is False and s["final_val_top1"] == 40.0
    assert s["failed_to_train"] is False and s["final_over_first_loss"] == pytest.approx(2.0 / 2.3)
    assert s["mean_abs_ratio_all"] == pytest.approx(8.0)
    assert s["mean_abs_ratio_deep_stage"] == pytest.approx(2.0)  # blocks 1 -> 2
    nan = ok + [{"step": 3, "train/loss": float("nan"), "train/nonfinite_steps": 1}]
    s = summarize_run(nan, depths=[1, 2, 1])
    assert s["diverged"] is True and s["nonfinite_steps"] == 1 and s["first_nonfinite_step"] == 3
    boom = ok + [{"step": 3, "train/loss": 9.0}]
    s = summarize_run(boom)
    assert s["diverged"] is True and s["loss_exploded"] is True and s["failed_to_train"] is True
    stuck = ok + [{"step": 3, "train/loss": 2.25}]  # back at the start: finite, not exploded, not trained
    s = summarize_run(stuck)
    assert s["diverged"] is False and s["failed_to_train"] is True
    assert s["max_over_first_loss"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- report command
@pytest.mark.slow  # subprocess trainers
def test_report_on_real_trainer_run_dir(quick_study, tmp_path):
    _, summary = quick_study
    run = next(r for r in summary["runs"] if r["attn"] == "cosine")
    out = tmp_path / "report"
    p = subprocess.run([sys.executable, "-m", "swinv2_tools.amplitude_report", run["run_dir"], "--out", str(out)],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    for name in ("amplitude_layers.png", "loss.png", "logit_scale.png"):
        _assert_png(str(out / name))
    rep = json.load(open(out / "amplitude_summary.json"))
    recs = read_jsonl(os.path.join(run["run_dir"], "metrics.jsonl"))
    last = [r for r in recs if "amplitude/00/mean_abs" in r][-1]
    assert rep["mean_abs_ratio_all"] == pytest.approx(last["amplitude/04/mean_abs"] / last["amplitude/00/mean_abs"])
    assert rep["mean_abs_ratio_deep_stage"] == pytest.approx(last["amplitude/03/mean_abs"] / last["amplitude/02/mean_abs"])
    assert "last/first block" in p.stdout


def test_report_without_metrics_fails_cleanly(tmp_path):
    p = subprocess.run([sys.executable, "-m", "swinv2_tools.amplitude_report", str(tmp_path)],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no metrics.jsonl" in p.stderr
