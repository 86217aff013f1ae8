"""`swinv2-train` as a command-line tool: shard patterns as typed in bash, reruns of a run dir,
checkpoints that do not fit, runtime errors as one message (traceback only in train.log),
--help, and a quiet start. Unit tests of train/cli.py first (fast), then real subprocess runs
of the console script on the tiny default."""
import logging
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

from swinv2_train import cli
from swinv2_train.errors import UsageError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data_helpers import jpeg_bytes, make_dataset, write_tar  # noqa: E402
from test_train import clean_env  # noqa: E402

PATTERN = "/d/train-{000000..000099}.tar"
EXPANDED = [f"/d/train-{i:06d}.tar" for i in range(100)]


def parsed_value(arg):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    return OverridesParser.create().parse_overrides([arg])[0].value()


# ----------------------------------------------------------------------------- prepare_overrides
def test_bash_expanded_shard_args_are_joined_again():
    args = [f"data.train_shards={u}" for u in EXPANDED] + ["train.max_steps=5"]
    out = cli.prepare_overrides(args)
    assert out == ["data.train_shards=" + "::".join(EXPANDED), "train.max_steps=5"]
    from swinv2_train.data.shards import expand_shards
    assert expand_shards(parsed_value(out[0]), check_local=False) == EXPANDED


def test_only_consecutive_shard_args_of_one_key_are_joined():
    args = ["data.train_shards=/a.tar", "data.val_shards=/v.tar", "data.train_shards=/b.tar",
            "model.embed_dim=8", "model.embed_dim=16"]
    assert cli.join_expanded_shards(args) == args
    assert cli.join_expanded_shards(["+data.val_shards=/a", "+data.val_shards=/b"]) == ["+data.val_shards=/a::/b"]


@pytest.mark.parametrize("value", [PATTERN, "/d/{a,b}/x-{0..3}.tar", "/d/a b/[x].tar", "/d/x.tar,/d/y.tar"])
def test_path_values_reach_hydra_as_typed(value):
    out = cli.prepare_overrides([f"data.train_shards={value}"])
    assert parsed_value(out[0]) == value


@pytest.mark.parametrize("arg", ["data.train_shards=null", "data.root=/data/in1k", "data.train_shards='/q/{0..1}'",
                                 "data.root=${oc.env:HOME}/x", "data.val_shards=/a.tar::/b.tar"])
def test_plain_values_are_left_alone(arg):
    assert cli.prepare_overrides([arg]) == [arg]


@pytest.mark.parametrize("key", ["data.root", "run.dir", "model.pretrained"])
def test_other_path_keys_are_quoted_too(key):
    assert parsed_value(cli.prepare_overrides([f"{key}=/x/{{a,b}} [1]"])[0]) == "/x/{a,b} [1]"


def test_quotes_inside_a_value():
    out = cli.quote_path_value("data.root=/d/it's {x}")
    assert parsed_value(out) == "/d/it's {x}"


def test_hydra_flags_pass_through():
    args = ["--cfg", "job", "-cn", "train", "--info", "defaults", "--help", "train.max_steps=3"]
    out = cli.prepare_overrides(args)
    assert out[:-1] == args[:-1] and out[-1] == "train.max_steps=3"


def test_unparsable_override_is_named():
    with pytest.raises(UsageError, match=r"cannot parse override 'model.embed_dim=6\{4'") as e:
        cli.prepare_overrides(["train.max_steps=3", "model.embed_dim=6{4"])
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- error reporting
def test_worker_traceback_is_stripped_from_the_message():
    from torch._utils import ExceptionWrapper

    from swinv2_train.data import DataPipelineError
    try:
        raise DataPipelineError("too many bad samples in shards '/d/x-{0..1}.tar': 51 of 102\ncounts: {}")
    except DataPipelineError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DataPipelineError) as e:
        wrapped.reraise()  # what the DataLoader does in the main process
    assert "Original Traceback" in str(e.value)
    assert cli.user_message(e.value) == "too many bad samples in shards '/d/x-{0..1}.tar': 51 of 102\ncounts: {}"
    plain = DataPipelineError("no samples")
    assert cli.user_message(plain) == "no samples"


def test_user_error_message_on_terminal_traceback_in_log_file(tmp_path, capsys, monkeypatch):
    from swinv2_train.errors import CheckpointError

    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    handler = logging.FileHandler(tmp_path / "train.log")
    logging.getLogger().addHandler(handler)
    try:
        with pytest.raises(SystemExit) as ex:
            with cli.user_errors_as_messages("prog"):
                raise CheckpointError("checkpoint /r/step_1 is damaged")
        with pytest.raises(SystemExit):
            with cli.user_errors_as_messages("prog", rank=3):
                raise CheckpointError("line one\nline two")
        shared = CheckpointError("decided on rank 0, raised by all")
        shared.same_on_every_rank = True
        with pytest.raises(SystemExit):
            with cli.user_errors_as_messages("prog", rank=1):  # rank 0 says it: rank 1 stays quiet
                raise shared
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    err = capsys.readouterr().err
    assert ex.value.code == 1
    assert err.splitlines() == ["prog: error: checkpoint /r/step_1 is damaged", "prog (rank 3): line one"]
    log = (tmp_path / "train.log").read_text()
    assert log.count("Traceback (most recent call last)") == 3 and "CheckpointError" in log


def test_bugs_keep_their_traceback(capsys):
    with pytest.raises(KeyError):
        with cli.user_errors_as_messages("prog"):
            raise KeyError("bug")


# ----------------------------------------------------------------------------- subprocess runs
QUICK = ["train.eval_every=0", "train.probe_every=0", "logger.wandb.mode=disabled", "logger.tensorboard=false"]


def swinv2_train(args, cwd, env=None, timeout=600):
    return subprocess.run(["swinv2-train", *args], cwd=cwd, env=env or clean_env(), capture_output=True,
                          text=True, timeout=timeout)


def assert_one_message(p, *needles):
    """Non-zero exit, one 'swinv2-train: error:' line naming every needle, no traceback."""
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-3000:]
    assert "Traceback" not in out and "Error executing job" not in out, out[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("swinv2-train")]
    assert len(errors) == 1, p.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_help_from_anywhere(tmp_path):
    p = swinv2_train(["--help"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    for needle in ("train a Swin Transformer V2", "experiment: default", "swinv2_tiny_256_w8_1k", "model: base",
                   "data.root", "data.train_shards", "model.window_size", "train.batch_size", "train.precision",
                   "optim.lr", "run.dir", "run.resume", "runs/${run.name}", "--cfg job", "README", "train.log",
                   "HYDRA_FULL_ERROR"):
        assert needle in out, needle
    assert "Powered by Hydra" not in out and "reduce_bucket_size" not in out  # no banner, no config dump
    assert len(out.splitlines()) < 70


def test_unparsable_override_one_line(tmp_path):
    p = swinv2_train(["model.embed_dim=6{4"], cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [p.stderr.strip()]
    assert "model.embed_dim=6{4" in p.stderr and "Traceback" not in p.stderr


@pytest.fixture(scope="module")
def shard_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    train_pattern, _ = make_dataset(str(root / "tr"), n_shards=8, per_shard=8, size=(32, 32), prefix="train")
    val_pattern, _ = make_dataset(str(root / "va"), n_shards=2, per_shard=8, size=(32, 32), prefix="val")
    return root, train_pattern, val_pattern


def test_brace_patterns_quoted_or_expanded_by_bash_compose_the_same(shard_dirs, tmp_path):
    """The README's command line through bash: unquoted (bash expands it into 8 arguments) and
    single-quoted (Hydra gets the braces); both compose to a pattern that lists the 8 shards."""
    from swinv2_train.data.shards import expand_shards

    _, train_pattern, val_pattern = shard_dirs
    want = expand_shards(train_pattern)
    assert len(want) == 8
    for typed in (train_pattern, shlex.quote(train_pattern)):
        cmd = f"swinv2-train data.train_shards={typed} data.val_shards={shlex.quote(val_pattern)} --cfg job"
        p = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr
        data = yaml.safe_load(p.stdout)["data"]
        assert expand_shards(data["train_shards"]) == want, data["train_shards"]
        assert expand_shards(data["val_shards"]) == expand_shards(val_pattern)


@pytest.mark.slow
def test_bash_expanded_shards_train_end_to_end(shard_dirs, tmp_path):
    _, train_pattern, val_pattern = shard_dirs
    cmd = (f"swinv2-train data.train_shards={train_pattern} data.val_shards={val_pattern} data.num_classes=64 "
           f"train.batch_size=16 train.max_steps=2 run.dir={tmp_path / 'run'} {' '.join(QUICK)}")
    p = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]
    assert saved["train_shards"].count("::") == 7
    assert "completed at step 2" in p.stdout


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The tiny default, 3 steps, finished (checkpoint at step 3)."""
    tmp = tmp_path_factory.mktemp("finished")
    run = tmp / "run"
    p = swinv2_train(["train.max_steps=3", f"run.dir={run}", *QUICK], cwd=tmp)
    assert p.returncode == 0, p.stderr[-3000:]
    return run


def copy_run(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    return run


@pytest.mark.slow
def test_rerun_of_a_completed_run_says_so(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    p = swinv2_train(["train.max_steps=3", f"run.dir={run}", *QUICK], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [ln for ln in p.stdout.splitlines() if "already completed" in ln]
    assert len(lines) == 1 and "train.max_steps" in lines[0] and "run.resume=never" in lines[0]
    assert "completed at step" not in p.stdout  # nothing was trained, no summary of a fake run
    assert "Traceback" not in p.stdout + p.stderr


@pytest.mark.slow
def test_checkpoint_beyond_max_steps_is_reported(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    p = swinv2_train(["train.max_steps=2", f"run.dir={run}", *QUICK], cwd=tmp_path)
    assert_one_message(p, "step 3", "train.max_steps=2", "run.dir=", "run.resume=never")


@pytest.mark.slow
def test_resume_with_another_model_names_the_difference(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    p = swinv2_train(["train.max_steps=5", "model.embed_dim=64", f"run.dir={run}", *QUICK], cwd=tmp_path)
    assert_one_message(p, "model.embed_dim 32 -> 64", "run.dir=", "run.resume=never")
    assert "size mismatch" not in p.stdout + p.stderr
    assert "Traceback (most recent call last)" in (run / "train.log").read_text()
    # the way out: run.resume=never starts over here and keeps the old checkpoints aside
    p = swinv2_train(["train.max_steps=2", "model.embed_dim=64", "run.resume=never", f"run.dir={run}", *QUICK],
                     cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert os.path.isfile(run / "checkpoints.old-1" / "step_00000003" / "COMMITTED")
    assert sorted(t for t in os.listdir(run / "checkpoints") if t.startswith("step_")) == ["step_00000002"]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """The tiny default on 2 ranks (deepspeed launcher), 3 steps, checkpoints at steps 2 and 3."""
    from swinv2_train.distributed import free_port

    tmp = tmp_path_factory.mktemp("two_ranks")
    run = tmp / "run"
    p = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port",
                        str(free_port()), "--module", "swinv2_train.main", "train.max_steps=3", "train.ckpt_every=2",
                        f"run.dir={run}", *QUICK], cwd=tmp, env=clean_env(), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    tags = sorted(t for t in os.listdir(run / "checkpoints") if t.startswith("step_"))
    assert tags == ["step_00000002", "step_00000003"]
    return run


@pytest.mark.slow
def test_resume_at_another_world_size_continues(two_rank_run, tmp_path):
    run = copy_run(two_rank_run, tmp_path)
    p = swinv2_train(["train.max_steps=5", f"run.dir={run}", *QUICK], cwd=tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert "written by 2 ranks, this run has 1" in out
    assert "(step 3," in out and "completed at step 5" in out, out[-3000:]
    assert os.path.isdir(run / "checkpoints" / "step_00000003" / "universal")  # DeepSpeed's universal copy


@pytest.mark.slow
def test_damaged_checkpoint_falls_back_else_is_a_message(two_rank_run, tmp_path):
    run = copy_run(two_rank_run, tmp_path)
    victim = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    newest, previous = run / "checkpoints" / "step_00000003", run / "checkpoints" / "step_00000002"
    os.truncate(newest / victim, os.path.getsize(newest / victim) // 2)
    p = swinv2_train(["train.max_steps=2", f"run.dir={run}", *QUICK], cwd=tmp_path)  # step 2 is the last intact one
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert f"{newest} is damaged: {victim}" in out and f"previous intact checkpoint {previous}" in out
    assert "already completed its 2 steps" in out
    os.truncate(previous / victim, 0)
    p = swinv2_train(["train.max_steps=5", f"run.dir={run}", *QUICK], cwd=tmp_path)
    assert_one_message(p, "damaged", "step_00000003", victim, "no intact checkpoint", "run.resume=never")
    # with HYDRA_FULL_ERROR=1 the traceback comes to the terminal as well
    p = swinv2_train(["train.max_steps=5", f"run.dir={run}", *QUICK], cwd=tmp_path,
                     env=clean_env(HYDRA_FULL_ERROR="1"))
    assert p.returncode != 0 and "Traceback" in p.stderr and "CheckpointError" in p.stderr


@pytest.mark.slow
def test_corrupt_data_stop_is_a_message(tmp_path):
    samples = [{"__key__": f"k{i:03d}", "jpg": b"not a jpeg" if i % 2 else jpeg_bytes(i, (32, 32)),
                "cls": str(i % 10).encode()} for i in range(64)]
    for name in ("train-0", "train-1", "val-0"):
        write_tar(str(tmp_path / f"{name}.tar"), samples)
    run = tmp_path / "run"
    p = swinv2_train([f"data.train_shards={tmp_path}/train-{{0..1}}.tar", f"data.val_shards={tmp_path}/val-0.tar",
                      "data.num_classes=10", "data.train_samples=128", "data.val_samples=64",
                      "train.batch_size=16", "train.max_steps=6", "data.bad_window=20", f"run.dir={run}", *QUICK],
                     cwd=tmp_path)
    line = assert_one_message(p, "too many bad samples", str(tmp_path))
    assert "Original Traceback" not in line and "DataLoader worker" not in line
    log = (run / "train.log").read_text()
    assert "Traceback (most recent call last)" in log and "DataPipelineError" in log


@pytest.mark.slow
def test_nan_stop_is_a_message(tmp_path):
    p = swinv2_train(["train.max_steps=4", "train.nan_policy=fail", "train.debug_inject_nan_steps=[2]",
                      f"run.dir={tmp_path / 'run'}", *QUICK], cwd=tmp_path)
    assert_one_message(p, "nan_policy=fail", "at step 2", "optim.lr")


@pytest.mark.slow
def test_first_start_announces_the_deepspeed_op_build_once(finished_run, tmp_path):
    """With an empty extensions dir DeepSpeed compiles its CPU op (~30 s): one line says so, no
    compiler command lines; the next start reuses the op and says nothing."""
    run = copy_run(finished_run, tmp_path)
    env = clean_env(TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    args = ["train.max_steps=3", f"run.dir={run}", *QUICK]  # completed: stops right after start-up
    first = swinv2_train(args, cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    out = first.stdout + first.stderr
    assert out.count("building DeepSpeed's deepspeed_shm_comm CPU op once into") == 1, out[-3000:]
    assert str(tmp_path / "ext") in out
    assert "gcc " not in out and "built successfully" not in out
    again = swinv2_train(args, cwd=tmp_path, env=env)
    assert again.returncode == 0 and "building DeepSpeed" not in again.stdout + again.stderr


def test_op_build_guess_follows_torch_extensions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    from swinv2_train.distributed import cpu_op_to_build

    op = cpu_op_to_build()
    if op is None:
        pytest.skip("DeepSpeed ships the op pre-built or does not use it here")
    name, build_dir = op
    assert build_dir == str(tmp_path / name)
    open(os.path.join(build_dir, f"{name}.so"), "w").close()
    assert cpu_op_to_build() is None
