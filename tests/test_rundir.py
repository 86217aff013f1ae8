"""swinv2_train.rundir: the run directory's names (a format: runs of earlier versions must still
resume and evaluate), what a user's path points at, and the one path -> checkpoint rule
(swinv2_train.checkpoint.find_checkpoint) that resuming, swinv2-eval and the export share."""
import json
import logging
import os

import pytest

from swinv2_train import rundir as R
from swinv2_train.checkpoint import MARKER, file_entry, find_checkpoint
from swinv2_train.errors import CheckpointError


def test_on_disk_names_are_those_of_earlier_runs():
    """Renaming any of these orphans every run dir written before: never change them."""
    run = R.RunDir("/r")
    assert run.ckpt_root == "/r/checkpoints" and run.checkpoint(300) == "/r/checkpoints/step_00000300"
    assert run.set_aside_dir(2) == "/r/checkpoints.old-2"
    assert (run.config, run.metrics, run.tensorboard, run.wandb_id, run.amplitudes_png) == (
        "/r/config.yaml", "/r/metrics.jsonl", "/r/tensorboard", "/r/wandb_id", "/r/amplitudes.png")
    assert run.reconstruction(60) == "/r/reconstructions/step_00000060.png"
    assert run.key_trace(3) == "/r/keys_rank3.jsonl" and run.amplitude_report == "/r/amplitude_report"
    assert (R.MARKER, R.UNIVERSAL_DIR, R.EMA_FILE, R.rng_file(1), R.MODEL_STATES_FILE) == (
        "COMMITTED", "universal", "ema.pt", "rng_rank1.pt", "mp_rank_00_model_states.pt")
    assert (R.EXPORT_FILE, R.SIMMIM_EXPORT_FILE, R.EMA_EXPORT_FILE) == (
        "model_official.pth", "model_simmim.pth", "model_ema_official.pth")
    assert (R.TRAIN_LOG, R.WANDB_DIR) == ("train.log", "wandb")


def test_checkpoint_tags():
    assert R.tag_for(7) == "step_00000007" and R.step_of("/x/step_00000007/") == 7
    assert R.step_of("step_7") is None and R.step_of("step_000000070") is None and R.step_of("checkpoints") is None


def test_metric_keys_are_parsed_as_they_are_formatted():
    key = R.amplitude_key(3, "rms")
    assert key == "amplitude/03/rms" and R.AMPLITUDE_KEY_RE.match(key).groups() == ("03", "rms")
    assert R.LOGIT_SCALE_KEY_RE.match(R.logit_scale_key(12)).group(1) == "12"
    assert (R.VAL_LOSS, R.VAL_TOP1, R.VAL_TOP5, R.VAL_SAMPLES) == ("val/loss", "val/top1", "val/top5", "val/samples")
    assert R.ema_key(R.VAL_TOP1) == "val_ema/top1" and R.ema_key("decay") == "ema/decay"
    assert R.val_key("mask_ratio") == "val/mask_ratio"


def committed(root, step, damaged=False):
    """A checkpoint folder with one file, summed in its marker (`damaged`: changed since)."""
    d = os.path.join(root, R.tag_for(step))
    os.makedirs(d)
    with open(os.path.join(d, "w.pt"), "wb") as f:
        f.write(b"weights %d" % step)
    files = {"w.pt": file_entry(os.path.join(d, "w.pt"))}
    with open(os.path.join(d, MARKER), "w") as f:
        json.dump({"step": step, "files": files}, f)
    if damaged:
        with open(os.path.join(d, "w.pt"), "ab") as f:
            f.write(b"!")
    return d


def test_locate_tells_run_dirs_checkpoint_roots_and_checkpoints_apart(tmp_path):
    run = tmp_path / "run"
    root = str(run / "checkpoints")
    tag = committed(root, 4)
    assert R.locate(str(run)) == R.Located(str(run), root)
    assert R.locate(root) == R.Located(str(run), root)
    assert R.locate(tag + "/") == R.Located(str(run), root, tag)
    assert R.locate(str(run), step=9).tag_dir == os.path.join(root, "step_00000009")
    assert R.set_aside(str(run)) == str(run / "checkpoints.old-1") and not os.path.exists(root)
    aside = R.locate(str(run / "checkpoints.old-1"))  # a set-aside root still holds its checkpoints
    assert aside == R.Located(str(run), str(run / "checkpoints.old-1"))
    assert R.set_aside(str(run)) is None  # nothing left to move
    assert R.locate(str(tmp_path / "fresh")).ckpt_root == str(tmp_path / "fresh" / "checkpoints")


def test_one_rule_a_named_checkpoint_is_never_substituted(tmp_path, caplog):
    root = str(tmp_path / "checkpoints")
    first, second, third = committed(root, 1), committed(root, 2), committed(root, 3, damaged=True)
    os.makedirs(os.path.join(root, R.tag_for(4)))  # an interrupted save
    with caplog.at_level(logging.WARNING):
        assert find_checkpoint(str(tmp_path))[1] == second  # the run dir: newest intact
        assert find_checkpoint(root)[1] == second           # its checkpoint root: the same
    assert f"{third} is damaged: w.pt" in caplog.text
    assert find_checkpoint(str(tmp_path), step=1)[1] == first
    with pytest.raises(CheckpointError, match=r"step_00000003 is damaged: w.pt.*; use another"):
        find_checkpoint(third, way_out="use another")
    with pytest.raises(CheckpointError, match=r"not committed .*committed steps here: \[1, 2, 3\]"):
        find_checkpoint(str(tmp_path), step=4)
    with pytest.raises(CheckpointError, match=r"step_00000009: no such checkpoint"):
        find_checkpoint(str(tmp_path), step=9)
    assert find_checkpoint(str(tmp_path / "empty")) == (R.Located(str(tmp_path / "empty"),
                                                                  str(tmp_path / "empty" / "checkpoints")), None)


def test_one_rule_every_committed_one_damaged_is_an_error(tmp_path):
    root = str(tmp_path / "checkpoints")
    committed(root, 1, damaged=True)
    committed(root, 2, damaged=True)
    with pytest.raises(CheckpointError) as e:
        find_checkpoint(str(tmp_path), way_out="evaluate an exported .pth")
    msg = str(e.value)
    assert "step_00000002 is damaged: w.pt" in msg and "1 older ones are damaged too" in msg
    assert "no intact checkpoint" in msg and msg.endswith("evaluate an exported .pth")
