"""The trainer end to end, as users run it (subprocess `swinv2-train`): artifacts and logs of the
default run, official-format export, exact resume, commit markers, NaN policies, preemption.
Integration tests (slow); the policies themselves are unit-tested in test_trainer_units.py."""
import glob
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A few-hundred-K-parameter SwinV2 at 32x32 (patch grid 8, W4): seconds per run on 2 cores.
TINY = ["model.img_size=32", "model.embed_dim=16", "model.depths=[1,1,1,1]", "model.num_heads=[1,2,2,4]",
        "train.batch_size=16", "data.num_workers=1", "train.log_every=1", "train.eval_batch_size=256",
        "sched.warmup_steps=2", "train.progress=lines"]
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                "SLURM_STEP_ID", "SLURM_JOB_ID", "CROSS_RANK", "LOCAL_SIZE", "TORCHELASTIC_RUN_ID")


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env.update(DS_ACCELERATOR="cpu", WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1",
               **extra)
    return env


def train(args, cwd, cmd=("swinv2-train",), timeout=600, check=True):
    p = subprocess.run([*cmd, *args], cwd=cwd, env=clean_env(), capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-6000:]}")
    return p


def metrics(run_dir):
    from swinv2_train.metrics import read_jsonl
    return read_jsonl(os.path.join(run_dir, "metrics.jsonl"))


def module_weights(tag_dir):
    sd = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
    return sd["module"]


# ----------------------------------------------------------------------------- default run
@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The embedded default (no model/data overrides) with a small step budget."""
    tmp = tmp_path_factory.mktemp("default")
    run_dir = tmp / "run"
    p = train(["train.max_steps=8", "train.eval_every=4", "train.ckpt_every=4", "train.probe_every=4",
               f"run.dir={run_dir}"], cwd=tmp)
    return str(run_dir), p


def test_default_run_artifacts(default_run):
    run_dir, p = default_run
    ck = os.path.join(run_dir, "checkpoints")
    assert os.path.isfile(os.path.join(ck, "step_00000008", "COMMITTED"))
    assert os.path.isfile(os.path.join(ck, "step_00000004", "COMMITTED"))  # keep_ckpts=2
    assert os.path.isfile(os.path.join(ck, "step_00000008", "rng_rank0.pt"))
    recs = metrics(run_dir)
    vals = [r for r in recs if "val/top1" in r]
    assert [r["step"] for r in vals] == [4, 8] and all(0 <= r["val/top1"] <= 100 for r in vals)
    assert {"val/top5", "val/loss"} <= set(vals[-1])
    train_keys = set().union(*(r.keys() for r in recs if "train/loss" in r))
    assert {"lr", "train/grad_norm", "train/loss_scale", "train/skipped_steps", "train/images_per_s",
            "train/samples_seen", "train/peak_mem_mb", "train/data_wait_frac"} <= train_keys
    amp = [r for r in recs if "amplitude/00/rms" in r]
    assert [r["step"] for r in amp] == [1, 4, 8]
    n_blocks = 5  # default depths 1,1,2,1
    assert all(f"amplitude/{i:02d}/{s}" in amp[-1] for i in range(n_blocks) for s in ("mean_abs", "rms", "max"))
    assert f"logit_scale/{n_blocks - 1:02d}" in amp[-1]
    png = os.path.join(run_dir, "amplitudes.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.isfile(os.path.join(run_dir, "model_official.pth"))
    assert os.path.isfile(os.path.join(run_dir, "config.yaml"))
    assert "final val top-1" in p.stdout and "wandb sync" in p.stdout and run_dir in p.stdout
    assert "CPU allocator: glibc keeps freed blocks" in p.stdout + p.stderr  # auto below 1024^2: retain


def test_default_run_tensorboard_and_wandb(default_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = default_run
    events = glob.glob(os.path.join(run_dir, "tensorboard", "events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(events[0])
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "lr", "val/top1", "amplitude/00/rms", "amplitude/04/max", "logit_scale/00"} <= tags
    assert [e.step for e in acc.Scalars("amplitude/02/mean_abs")] == [1, 4, 8]

    runs = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*"))
    assert len(runs) == 1
    wid = open(os.path.join(run_dir, "wandb_id")).read().strip()
    assert runs[0].endswith(wid)
    from wandb_records import read_run

    keys = set().union(*read_run(glob.glob(os.path.join(runs[0], "*.wandb"))[0]).history)
    assert {"train/loss", "val/top1", "amplitude/00/rms", "amplitude/04/mean_abs", "logit_scale/03"} <= keys


def test_export_official_format_same_logits(default_run, tmp_path):
    import swinv2
    from omegaconf import OmegaConf

    from swinv2_train.config import model_kwargs

    run_dir, _ = default_run
    cfg = OmegaConf.load(os.path.join(run_dir, "config.yaml"))
    build = lambda: swinv2.create_model(**model_kwargs(cfg.model, cfg.data.num_classes)).eval()  # noqa: E731
    trained = build()
    trained.load_state_dict(module_weights(os.path.join(run_dir, "checkpoints", "step_00000004")))
    out = tmp_path / "step4.pth"
    p = subprocess.run([sys.executable, "-m", "swinv2_train.checkpoint", "export", run_dir, str(out), "--step", "4"],
                       cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    sd = torch.load(out, map_location="cpu", weights_only=True)
    assert set(sd) == {"model"} and all(v.dtype != torch.bfloat16 for v in sd["model"].values())
    assert "layers.0.blocks.0.attn.cpb_mlp.0.weight" in sd["model"] and "head.weight" in sd["model"]
    fresh = build()
    swinv2.load_official_state_dict(fresh, str(out))
    x = torch.randn(4, 3, cfg.model.img_size, cfg.model.img_size)
    with torch.no_grad():
        assert torch.equal(fresh(x), trained(x))
    # the end-of-run export is the last step, not step 4
    final = build()
    swinv2.load_official_state_dict(final, os.path.join(run_dir, "model_official.pth"))
    with torch.no_grad():
        assert not torch.equal(final(x), trained(x))


# ----------------------------------------------------------------------------- exact resume
def test_resume_is_bit_identical_and_ignores_uncommitted(tmp_path):
    # augmentation, mixup/cutmix and drop path all draw random numbers; 80 samples per epoch
    # (5 steps) so the run crosses an epoch boundary after resuming mid-epoch at step 3
    common = [*TINY, "train.max_steps=8", "data.augment=light", "data.mixup=0.8", "data.cutmix=1.0",
              "model.drop_path_rate=0.1", "data.train_samples=80", "train.probe_every=0"]
    a, b = tmp_path / "a", tmp_path / "b"
    train([*common, f"run.dir={a}", "logger=none"], cwd=tmp_path)
    train([*common, f"run.dir={b}", "train.stop_at_step=3"], cwd=tmp_path)
    ck = b / "checkpoints"
    assert sorted(os.listdir(ck)) == ["step_00000003", "zero_to_fp32.py", "zero_to_torch.py"]
    assert not (b / "model_official.pth").exists()  # stopped early: no final eval/export
    # a newer checkpoint without the commit marker (an interrupted save) must be ignored
    shutil.copytree(ck / "step_00000003", ck / "step_00000006")
    os.remove(ck / "step_00000006" / "COMMITTED")
    p = train([*common, f"run.dir={b}"], cwd=tmp_path)
    assert "resumed from" in p.stdout + p.stderr and "step_00000003" in p.stdout + p.stderr
    assert not (ck / "step_00000006").exists()  # debris older than the newest commit is pruned

    wa = torch.load(a / "model_official.pth", weights_only=True)["model"]
    wb = torch.load(b / "model_official.pth", weights_only=True)["model"]
    assert wa.keys() == wb.keys()
    diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not diff, f"weights differ after resume: {diff[:5]}"
    la = {r["step"]: r["train/loss"] for r in metrics(a) if "train/loss" in r}
    lb = {r["step"]: r["train/loss"] for r in metrics(b) if "train/loss" in r}
    assert la == lb and sorted(la) == list(range(1, 9))
    # the resumed run continued the same W&B run
    assert len(glob.glob(str(b / "wandb" / "offline-run-*"))) == 2
    wid = (b / "wandb_id").read_text().strip()
    assert all(r.endswith(wid) for r in glob.glob(str(b / "wandb" / "offline-run-*")))


def test_resume_with_a_worker_count_that_does_not_fit_is_one_message(tmp_path):
    """data.canonical_streams=null is the first run's ranks x workers (1 x 1 here), kept on resume:
    2 workers cannot share 1 stream mid-epoch. The message says what fits; with the saved count
    the run goes on (worker counts that fit resume exactly: test_elastic_resume.py)."""
    common = [*TINY, "train.max_steps=6", "train.probe_every=0", "logger=none", "run.export_official=false",
              f"run.dir={tmp_path / 'r'}"]
    train([*common, "train.stop_at_step=3", "data.num_workers=1"], cwd=tmp_path)
    p = train([*common, "data.num_workers=2"], cwd=tmp_path, check=False)
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("swinv2-train: error:")]
    assert p.returncode != 0 and len(errors) == 1, p.stderr[-3000:]
    assert "data.canonical_streams=1 cannot be dealt to 1 ranks x 2 data workers" in errors[0]
    assert "Traceback" not in p.stderr
    p = train([*common, "data.num_workers=1"], cwd=tmp_path)
    assert "resumed from" in p.stdout + p.stderr
    assert max(r["step"] for r in metrics(tmp_path / "r") if "train/loss" in r) == 6


# ----------------------------------------------------------------------------- NaN policies
NAN_COMMON = [*TINY, "logger=none", "run.export_official=false", "train.probe_every=0"]


def test_nan_skip_leaves_weights_and_continues(tmp_path):
    run = tmp_path / "run"
    train([*NAN_COMMON, "train.max_steps=5", "train.ckpt_every=1", "train.keep_ckpts=10",
           "train.debug_inject_nan_steps=[3]", f"run.dir={run}"], cwd=tmp_path)
    recs = {r["step"]: r for r in metrics(run) if "train/loss" in r}
    assert recs[3]["train/step_applied"] == 0 and recs[3]["train/nonfinite_steps"] == 1
    assert recs[2]["train/nonfinite_steps"] == 0 and recs[5]["train/nonfinite_steps"] == 1
    assert recs[4]["train/step_applied"] == 1 and recs[5]["train/skipped_steps"] == 1
    ck = run / "checkpoints"
    w2, w3, w4 = (module_weights(ck / f"step_0000000{s}") for s in (2, 3, 4))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)  # the NaN step changed nothing
    assert not all(torch.equal(w3[k], w4[k]) for k in w3)  # training went on
    assert all(torch.isfinite(v).all() for v in w4.values() if v.is_floating_point())


def test_nan_fail_names_step(tmp_path):
    p = train([*NAN_COMMON, "train.max_steps=4", "train.nan_policy=fail", "train.debug_inject_nan_steps=[2]",
               f"run.dir={tmp_path / 'run'}"], cwd=tmp_path, check=False)
    assert p.returncode != 0
    assert "nan_policy=fail" in p.stderr and "at step 2" in p.stderr


def test_nan_skip_stops_after_k_consecutive(tmp_path):
    p = train([*NAN_COMMON, "train.max_steps=8", "train.max_consecutive_nonfinite=3",
               "train.debug_inject_nan_steps=[2,3,4,5]", f"run.dir={tmp_path / 'run'}"], cwd=tmp_path, check=False)
    assert p.returncode != 0
    assert "3 consecutive non-finite steps" in p.stderr and "at step 4" in p.stderr


def test_preemption_signal_checkpoints_and_exits_cleanly(tmp_path):
    import signal

    run = tmp_path / "run"
    p = subprocess.Popen(["swinv2-train", *NAN_COMMON, "train.max_steps=500", f"run.dir={run}"], cwd=tmp_path,
                         env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in p.stdout:
            if "step 3/500" in line:
                p.send_signal(signal.SIGUSR1)  # what SLURM sends before the time limit
                break
        out = p.communicate(timeout=300)[0]
    finally:
        p.kill()
    assert p.returncode == 0, out[-3000:]
    tags = [t for t in os.listdir(run / "checkpoints") if t.startswith("step_")]
    assert len(tags) == 1 and (run / "checkpoints" / tags[0] / "COMMITTED").exists()
    step = int(tags[0][5:])
    assert 3 <= step < 500 and max(r["step"] for r in metrics(run)) == step
    assert "preempted at step" in out and not (run / "model_official.pth").exists()


def test_bf16_accum_checkpointing_sequential_and_export(tmp_path):
    """The memory recipe of the paper on a tiny model: bf16 (BF16_Optimizer, fp32 grad
    accumulation), DeepSpeed gradient accumulation, activation checkpointing on every block,
    sequential attention; the export reads the fp32 master weights, not the bf16 module."""
    run, run32 = tmp_path / "run", tmp_path / "run32"
    common = [*TINY, "train.max_steps=3", "train.grad_accum=2", "train.activation_checkpointing.every=1",
              "model.attention=sequential", "logger=none", "train.probe_every=1"]
    p = train([*common, "train.precision=bf16", f"run.dir={run}"], cwd=tmp_path)
    log = p.stdout + p.stderr
    assert "checkpointed blocks=4" in log and "precision=bf16" in log and "8 micro x 2 accum" in log
    recs = [r for r in metrics(run) if "train/loss" in r]
    assert [r["train/step_applied"] for r in recs] == [1, 1, 1]
    assert all(math.isfinite(r["train/loss"]) and math.isfinite(r["train/grad_norm"]) for r in recs)
    # the same run in fp32: bf16 follows it step by step (measured: within 0.1%)
    train([*common, "train.precision=fp32", f"run.dir={run32}"], cwd=tmp_path)
    recs32 = [r for r in metrics(run32) if "train/loss" in r]
    for a, b in zip(recs, recs32, strict=True):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=0.01), (a["step"], a["train/loss"], b["train/loss"])
    tag = run / "checkpoints" / "step_00000003"
    assert any(f.startswith("bf16_zero_pp_rank_0") for f in os.listdir(tag))
    exported = torch.load(run / "model_official.pth", weights_only=True)["model"]
    module = module_weights(tag)
    w = "layers.0.blocks.0.mlp.fc1.weight"
    assert module[w].dtype == torch.bfloat16 and exported[w].dtype == torch.float32
    assert torch.allclose(exported[w].to(torch.bfloat16).float(), module[w].float())  # bf16 = rounded master
    assert not torch.equal(exported[w], module[w].float())  # ... but the export kept fp32 precision
