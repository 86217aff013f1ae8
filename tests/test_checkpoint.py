"""Checkpoint discovery, commit markers, integrity (sizes + checksums, fallback to the newest
intact checkpoint) and retention: file-level, plus real DeepSpeed files written by
tests/test_resize.py's workers (the trainer tests cover save/load through swinv2-train)."""
import logging
import os
import sys

import pytest
import torch

from swinv2_train.errors import CheckpointError, ResumeMismatchError
from swinv2_train.checkpoint import (MARKER, CheckpointManager, _sum_files_together, damaged_files, latest_committed,
                                     resolve_resume, tag_for, write_marker)
from swinv2_train.rundir import checkpoint_dirs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _make(root, step, committed=True):
    """A checkpoint with an old-style marker (no sizes or checksums)."""
    d = os.path.join(root, tag_for(step))
    os.makedirs(d)
    torch.save({}, os.path.join(d, "mp_rank_00_model_states.pt"))
    if committed:
        open(os.path.join(d, MARKER), "w").write("{}")
    return d


def test_uncommitted_is_never_chosen(tmp_path):
    root = str(tmp_path / "checkpoints")
    _make(root, 10)
    newest_ok = _make(root, 20)
    _make(root, 30, committed=False)  # an interrupted save, newer than every committed one
    assert latest_committed(root) == newest_ok
    assert resolve_resume("auto", str(tmp_path)) == newest_ok
    assert resolve_resume(str(tmp_path), "/elsewhere") == newest_ok       # a run dir
    assert resolve_resume(root, "/elsewhere") == newest_ok                # a checkpoints dir
    with pytest.raises(CheckpointError, match=MARKER):
        resolve_resume(os.path.join(root, tag_for(30)), "/elsewhere")     # an explicit bad tag
    assert resolve_resume("never", str(tmp_path)) is None
    assert resolve_resume("auto", str(tmp_path / "fresh")) is None


def test_prune_keeps_newest_and_drops_old_debris(tmp_path):
    root = str(tmp_path / "checkpoints")
    for s in (1, 2, 3, 4):
        _make(root, s)
    _make(root, 25, committed=False)  # newer than every commit: may be a save in progress
    os.makedirs(os.path.join(root, tag_for(0)))  # uncommitted and older than the newest commit
    CheckpointManager(str(tmp_path), keep=2, rank=0, world_size=1).prune()
    left = [(s, c) for s, _, c in checkpoint_dirs(root)]
    assert left == [(3, True), (4, True), (25, False)]


def test_a_rank_the_checkpoint_did_not_have_gets_fresh_distinct_streams():
    from swinv2_train.checkpoint import fresh_rng_state, rng_state

    template = {**rng_state(), "mixup": torch.Generator().manual_seed(3).get_state()}
    a, b = fresh_rng_state(template, (0, 10, 2)), fresh_rng_state(template, (0, 10, 3))
    assert sorted(a) == ["mixup", "numpy", "python", "torch"]
    assert torch.equal(a["torch"], fresh_rng_state(template, (0, 10, 2))["torch"])  # reproducible
    assert not torch.equal(a["torch"], b["torch"]) and not torch.equal(a["mixup"], b["mixup"])
    assert not torch.equal(a["mixup"], template["mixup"])


# ----------------------------------------------------------------------------- resume checks
def _tiny_cfg():
    """The parts of a resolved run config that the resume check reads (schema defaults + tiny)."""
    from dataclasses import asdict

    from swinv2_train.config import ModelConfig

    model = {**asdict(ModelConfig()), "img_size": 32, "window_size": 4, "embed_dim": 16, "depths": [1, 1, 1, 1],
             "num_heads": [1, 2, 2, 4]}
    return {"model": model, "data": {"num_classes": 10}, "train": {"precision": "fp32"}}


TINY_CFG = _tiny_cfg()


def _committed_with_config(root, step, cfg, world_size=1):
    import json

    import torch
    from omegaconf import OmegaConf

    d = _make(root, step)
    open(os.path.join(d, MARKER), "w").write(json.dumps({"step": step, "world_size": world_size}))
    OmegaConf.save(OmegaConf.create(cfg), os.path.join(d, "config.yaml"))
    torch.save({"w": torch.zeros(64)}, os.path.join(d, "mp_rank_00_model_states.pt"))
    return d


def _cfg(**changes):
    import copy

    from omegaconf import OmegaConf

    cfg = copy.deepcopy(TINY_CFG)
    for key, value in changes.items():
        group, name = key.split("__")
        cfg[group][name] = value
    return OmegaConf.create(cfg)


def test_check_resumable_names_what_differs(tmp_path):
    from swinv2_train.checkpoint import check_resumable

    d = _committed_with_config(str(tmp_path / "checkpoints"), 5, TINY_CFG)
    check_resumable(d, _cfg(), 1, str(tmp_path), num_classes=10)  # same setup: fine
    check_resumable(d, _cfg(model__drop_path_rate=0.3, model__attention="sequential"), 1, str(tmp_path), 10)
    with pytest.raises(ResumeMismatchError, match=r"model.embed_dim 16 -> 32; model.window_size 4 -> 8") as e:
        check_resumable(d, _cfg(model__embed_dim=32, model__window_size=8), 1, str(tmp_path), 10)
    assert "run.dir=" in str(e.value) and "run.resume=never" in str(e.value)
    with pytest.raises(ResumeMismatchError, match=r"data.num_classes 10 -> 100"):
        check_resumable(d, _cfg(), 1, str(tmp_path), num_classes=100)
    with pytest.raises(ResumeMismatchError, match=r"train.precision fp32 -> bf16"):
        check_resumable(d, _cfg(train__precision="bf16"), 1, str(tmp_path), 10)


def test_another_world_size_resumes_with_a_warning(tmp_path, caplog):
    from swinv2_train.checkpoint import check_resumable

    d = _committed_with_config(str(tmp_path / "checkpoints"), 5, TINY_CFG)
    with caplog.at_level(logging.WARNING, logger="swinv2_train.checkpoint"):
        check_resumable(d, _cfg(), 4, str(tmp_path), 10)
    assert "written by 1 ranks, this run has 4" in caplog.text and "universal" in caplog.text


# ----------------------------------------------------------------------------- integrity
def _committed_with_files(root, step):
    """A checkpoint of model, optimizer and RNG files, committed with their sizes and checksums."""
    d = os.path.join(root, tag_for(step))
    os.makedirs(d)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng_rank0.pt"):
        torch.save({"w": torch.full((256,), float(step))}, os.path.join(d, name))
    write_marker(d, step, 1, _sum_files_together(d, rank=0, world_size=1))
    return d


def test_marker_sizes_and_checksums_find_each_kind_of_damage(tmp_path):
    d = _committed_with_files(str(tmp_path), 1)
    assert damaged_files(d) == []
    model, optim, rng = (os.path.join(d, n) for n in ("mp_rank_00_model_states.pt",
                                                      "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng_rank0.pt"))
    os.truncate(model, os.path.getsize(model) - 100)
    with open(optim, "r+b") as f:  # same size, one byte changed
        f.seek(os.path.getsize(optim) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.remove(rng)
    found = dict(damaged_files(d))
    assert found.keys() == {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng_rank0.pt"}
    assert "truncated" in found["mp_rank_00_model_states.pt"]
    assert "CRC-32" in found["zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert found["rng_rank0.pt"] == "missing"
    open(os.path.join(d, MARKER), "w").write('{"step": 1, "files": {')  # a torn marker
    assert damaged_files(d)[0][0] == MARKER


def test_an_old_marker_still_finds_a_truncated_torch_file(tmp_path):
    d = _committed_with_config(str(tmp_path / "checkpoints"), 5, TINY_CFG)  # marker without "files"
    assert damaged_files(d) == []
    f = os.path.join(d, "mp_rank_00_model_states.pt")
    os.truncate(f, os.path.getsize(f) - 100)
    assert [name for name, _ in damaged_files(d)] == ["mp_rank_00_model_states.pt"]


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, caplog):
    root = str(tmp_path / "checkpoints")
    first, second, third = (_committed_with_files(root, s) for s in (1, 2, 3))
    os.truncate(os.path.join(third, "rng_rank0.pt"), 10)
    with caplog.at_level(logging.WARNING, logger="swinv2_train.checkpoint"):
        assert resolve_resume("auto", str(tmp_path)) == second
        assert resolve_resume(str(tmp_path), "/elsewhere") == second  # a run dir given by path
    assert f"{third} is damaged: rng_rank0.pt" in caplog.text and f"previous intact checkpoint {second}" in caplog.text
    with pytest.raises(CheckpointError, match=r"step_00000003 is damaged: rng_rank0.pt.*run.resume=never"):
        resolve_resume(third, str(tmp_path))  # named explicitly: no silent substitute
    os.remove(os.path.join(second, "mp_rank_00_model_states.pt"))
    assert resolve_resume("auto", str(tmp_path)) == first
    os.truncate(os.path.join(first, "zero_pp_rank_0_mp_rank_00_optim_states.pt"), 0)
    with pytest.raises(CheckpointError) as e:
        resolve_resume("auto", str(tmp_path))
    msg = str(e.value)
    assert "step_00000003 is damaged: rng_rank0.pt" in msg and "2 older ones are damaged too" in msg
    assert "no intact checkpoint" in msg and "run.resume=never" in msg and "run.dir=" in msg


def test_verify_command_reports_every_checkpoint(tmp_path, capsys):
    from swinv2_train.checkpoint import main

    root = str(tmp_path / "checkpoints")
    _committed_with_files(root, 1)
    bad = _committed_with_files(root, 2)
    assert main(["verify", str(tmp_path)]) == 0
    os.truncate(os.path.join(bad, "zero_pp_rank_0_mp_rank_00_optim_states.pt"), 50)
    assert main(["verify", str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()[-2:]
    assert lines[0].endswith("step_00000001: ok")
    assert "step_00000002: DAMAGED: zero_pp_rank_0_mp_rank_00_optim_states.pt 50 bytes" in lines[1]


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
                                    "rng_rank1.pt"])
def test_a_truncated_deepspeed_checkpoint_falls_back(tmp_path, caplog, victim):
    """Real ZeRO-1 files of 2 ranks (step_1, step_2): each kind of file truncated in the newest."""
    from test_resize import run_ranks

    run = str(tmp_path / "run")
    run_ranks(2, "save", run, "fp32")
    newest, previous = (os.path.join(run, "checkpoints", tag_for(s)) for s in (2, 1))
    assert resolve_resume("auto", run) == newest
    os.truncate(os.path.join(newest, victim), os.path.getsize(os.path.join(newest, victim)) // 2)
    with caplog.at_level(logging.WARNING, logger="swinv2_train.checkpoint"):
        assert resolve_resume("auto", run) == previous
    assert f"{newest} is damaged: {victim}" in caplog.text
    os.truncate(os.path.join(previous, victim), 0)
    with pytest.raises(CheckpointError, match=rf"step_00000002 is damaged: {victim}.*no intact checkpoint"):
        resolve_resume("auto", run)


def test_resume_never_sets_earlier_checkpoints_aside(tmp_path):
    from swinv2_train.rundir import set_aside as set_aside_checkpoints

    assert set_aside_checkpoints(str(tmp_path)) is None  # nothing there
    _make(str(tmp_path / "checkpoints"), 3)
    assert set_aside_checkpoints(str(tmp_path)) == str(tmp_path / "checkpoints.old-1")
    _make(str(tmp_path / "checkpoints"), 4)
    assert set_aside_checkpoints(str(tmp_path)) == str(tmp_path / "checkpoints.old-2")
    assert not os.path.exists(tmp_path / "checkpoints")


def test_a_config_of_an_older_schema_is_not_compared(tmp_path):
    from swinv2_train.checkpoint import check_resumable

    old = _tiny_cfg()
    old["model"]["variant"] = "tiny_v0"  # a name this version of the schema no longer reads
    d = _committed_with_config(str(tmp_path / "checkpoints"), 5, old)
    check_resumable(d, _cfg(model__embed_dim=32), 1, str(tmp_path), 10)  # DeepSpeed's load decides
