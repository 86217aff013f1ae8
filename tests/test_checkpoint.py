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
