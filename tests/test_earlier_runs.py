"""Users' runs outlive our releases: a run directory written by an earlier version of the trainer
resumes with the current code exactly as that version would have continued it, and evaluates.

tests/fixtures/run_0e790e3/ is a run stopped after its committed step-4 checkpoint by commit 0e790e3
(before the uint8 feed and the config refactor); expected.json holds that version's uninterrupted
run of the same command (train/loss of steps 5..8, the final validation) and its swinv2-eval of
the step-4 checkpoint, with the commit and command that wrote them. The data is the built-in
synthetic-v1 set, which both versions generate byte for byte.

The uint8 feed's resize (data.resize=torch, today's default) moves pixels by up to one level; a run
whose saved config has no data.resize began with Pillow's and keeps it when it resumes or is
evaluated (data.config.kept_from_before), so the command as the user typed it continues bit-exactly."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "run_0e790e3")
TAG = os.path.join("checkpoints", "step_00000004")
with open(os.path.join(FIXTURE, "expected.json")) as _f:
    EXPECTED = json.load(_f)
OVERRIDES = EXPECTED["overrides"]  # the command that wrote the fixture, less train.stop_at_step / run.dir
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                "SLURM_STEP_ID", "SLURM_JOB_ID", "CROSS_RANK", "LOCAL_SIZE", "TORCHELASTIC_RUN_ID")


def _env():
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env.update(DS_ACCELERATOR="cpu", WANDB_MODE="disabled", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    return env


def _run(args, cwd, timeout=600):
    p = subprocess.run([sys.executable, *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"exit {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-6000:]}"
    return p.stdout + p.stderr


def _copy(tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURE, run_dir)
    (run_dir / "expected.json").unlink()  # not part of the run
    return run_dir


def _rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _resume(run_dir, extra):
    out = _run(["-m", "swinv2_train.main", *OVERRIDES, *extra, f"run.dir={run_dir}"], cwd=run_dir.parent)
    assert f"resumed from {run_dir / TAG} (step 4" in out, out[-4000:]
    assert "completed at step 8" in out, out[-4000:]
    rows = _rows(run_dir)
    losses = {str(r["step"]): r["train/loss"] for r in rows if "train/loss" in r and r["step"] > 4}
    (val,) = [r for r in rows if "val/top1" in r]
    return losses, val


def _eval(run_dir, extra, json_out):
    _run(["-m", "swinv2_train.eval_command", str(run_dir), "--json", str(json_out), "data.num_workers=1", *extra],
         cwd=run_dir.parent)
    with open(json_out) as f:
        return json.load(f)


def test_fixture_is_an_intact_committed_run_of_that_version():
    from swinv2_train.checkpoint import damaged_files, read_marker
    from swinv2_train.rundir import latest_committed

    tag_dir = os.path.join(FIXTURE, TAG)
    assert latest_committed(os.path.join(FIXTURE, "checkpoints")) == tag_dir
    assert read_marker(tag_dir)["step"] == 4 and read_marker(tag_dir)["world_size"] == 1
    assert damaged_files(tag_dir) == []  # sizes and CRC-32s in its COMMITTED marker
    assert sorted(EXPECTED["train_loss"]) == ["5", "6", "7", "8"]


def test_saved_config_composes_and_resolves_with_the_current_schema():
    """The checkpoint's config.yaml (0e790e3's schema) as swinv2-eval loads it builds the run's
    model; the command that wrote it resolves under today's schema (resolve_spec) and passes the
    trainer's resume check against that checkpoint."""
    from swinv2_train.checkpoint import resume_mismatches, saved_config
    from swinv2_train.eval_command import compose_config, load_run_config
    from swinv2_train.spec import resolve_spec

    tag_dir = os.path.join(FIXTURE, TAG)
    saved = compose_config([], base=load_run_config(FIXTURE, tag_dir))  # swinv2-eval RUN_DIR's config
    assert saved.data.resize == "pil" and saved.task.name == "classification"  # kept; its own task keys
    model = resolve_spec(saved, world_size=1, resolve_data=False).model
    assert (model.embed_dim, list(model.depths), list(model.num_heads)) == (4, [1] * 4, [1] * 4)
    assert (model.img_size, model.window_size, model.num_classes) == (32, 4, 10)

    now = compose_config(OVERRIDES)  # the user's command under today's defaults
    spec = resolve_spec(now, world_size=1, resolve_data=False)  # classes unknown until the data resolves
    assert dataclasses.replace(spec.model, num_classes=10) == model and spec.batch.global_batch == 16 and spec.train.max_steps == 8
    assert resume_mismatches(saved_config(tag_dir), now, 10) == []


@pytest.mark.slow
def test_run_of_0e790e3_resumes_bit_exactly_and_evaluates(tmp_path):
    """The command as the user typed it: the run resumes from the old checkpoint, keeps Pillow's
    resize it began with, and goes on as 0e790e3 would have; swinv2-eval agrees before and after."""
    run_dir = _copy(tmp_path)
    before = _eval(run_dir, [], tmp_path / "step4.json")  # the old run dir as it was written
    assert before["step"] == 4
    assert {k: before[k] for k in EXPECTED["eval_step4"]} == EXPECTED["eval_step4"]

    losses, val = _resume(run_dir, [])
    assert losses == EXPECTED["train_loss"]  # bitwise: floats as read from JSON on both sides
    final = EXPECTED["final_val"]
    assert (val["step"], val["val/top1"], val["val/top5"], val["val/loss"], val["val/samples"]) == \
        (8, final["top1"], final["top5"], final["loss"], final["samples"])

    after = _eval(run_dir, [], tmp_path / "step8.json")  # the new checkpoint's config carries data.resize=pil
    assert after["step"] == 8
    assert (after["top1"], after["top5"], after["loss"], after["samples"]) == \
        (final["top1"], final["top5"], final["loss"], final["samples"])
