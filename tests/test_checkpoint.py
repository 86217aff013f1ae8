"""Checkpoint discovery, commit markers and retention (file-level; the trainer tests cover
save/load through DeepSpeed)."""
import os

import pytest

from swinv2_train.errors import CheckpointError, ResumeMismatchError
from swinv2_train.checkpoint import MARKER, CheckpointManager, latest_committed, list_checkpoints, resolve_resume, tag_for


def _make(root, step, committed=True):
    d = os.path.join(root, tag_for(step))
    os.makedirs(d)
    open(os.path.join(d, "mp_rank_00_model_states.pt"), "w").close()
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
    left = [(s, c) for s, _, c in list_checkpoints(root)]
    assert left == [(3, True), (4, True), (25, False)]


def test_resume_at_another_world_size_is_refused_clearly(tmp_path):
    root = str(tmp_path / "checkpoints")
    d = _make(root, 10)
    open(os.path.join(d, MARKER), "w").write('{"step": 10, "world_size": 8}')
    with pytest.raises(ResumeMismatchError, match=r"world size 8, this run has 2.*ds_to_universal"):
        CheckpointManager(str(tmp_path), keep=2, rank=0, world_size=2).load(engine=None, tag_dir=d)


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
    with pytest.raises(ResumeMismatchError, match=r"world size 1 -> 4"):
        check_resumable(d, _cfg(), 4, str(tmp_path), 10)


def test_check_resumable_finds_a_truncated_file(tmp_path):
    from swinv2_train.checkpoint import check_resumable

    d = _committed_with_config(str(tmp_path / "checkpoints"), 5, TINY_CFG)
    f = os.path.join(d, "mp_rank_00_model_states.pt")
    os.truncate(f, os.path.getsize(f) - 100)
    with pytest.raises(CheckpointError, match=r"damaged: mp_rank_00_model_states.pt"):
        check_resumable(d, _cfg(), 1, str(tmp_path), 10)


def test_resume_never_sets_earlier_checkpoints_aside(tmp_path):
    from swinv2_train.checkpoint import set_aside_checkpoints

    assert set_aside_checkpoints(str(tmp_path)) is None  # nothing there
    _make(str(tmp_path / "checkpoints"), 3)
    assert set_aside_checkpoints(str(tmp_path)) == str(tmp_path / "checkpoints.old-1")
    _make(str(tmp_path / "checkpoints"), 4)
    assert set_aside_checkpoints(str(tmp_path)) == str(tmp_path / "checkpoints.old-2")
    assert not os.path.exists(tmp_path / "checkpoints")


def test_a_config_of_an_older_schema_is_not_compared(tmp_path):
    from swinv2_train.checkpoint import check_resumable

    old = _tiny_cfg()
    del old["model"]["extra_norm_every"]  # a key the schema did not have then
    d = _committed_with_config(str(tmp_path / "checkpoints"), 5, old)
    check_resumable(d, _cfg(model__embed_dim=32), 1, str(tmp_path), 10)  # DeepSpeed's load decides
    with pytest.raises(ResumeMismatchError, match=r"world size 1 -> 2"):
        check_resumable(d, _cfg(), 2, str(tmp_path), 10)  # the marker is still read
