"""Evaluation: `evaluate()` (the one code path of the trainer and `swinv2-eval`) on tiny shards
against hand-computed numbers, and `swinv2-eval` as users run it on a real tiny run: the same
top-1 as the trainer's own final validation, from the run directory and from the exported .pth,
another resolution, and one-line errors for inputs a user gets wrong."""
import json
import os
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import swinv2
from data_helpers import make_dataset
from swinv2_train import eval_command as E
from swinv2_train.data.config import DataConfig

pytestmark = pytest.mark.usefixtures("single_thread")

N_CLASSES = 12  # make_dataset labels each sample with its index: 2 shards x 6 = labels 0..11


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    pattern, n = make_dataset(str(root), n_shards=2, per_shard=6, size=(16, 16), prefix="validation")
    assert n == N_CLASSES
    return DataConfig(val_shards=pattern, num_classes=N_CLASSES, num_workers=0, augment="none")


class FixedLogits(nn.Module):
    """The same logits for every image: its metrics follow from the labels alone."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", torch.as_tensor(logits, dtype=torch.float32))

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1) + 0 * x.mean()


def expected(logits, labels):
    logits = torch.as_tensor(logits, dtype=torch.float32).expand(len(labels), -1)
    y = torch.tensor(labels)
    top5 = logits.topk(5, dim=1).indices
    return {"val/top1": 100.0 * (logits.argmax(1) == y).float().mean().item(),
            "val/top5": 100.0 * (top5 == y[:, None]).any(1).float().mean().item(),
            "val/loss": F.cross_entropy(logits, y).item(), "val/samples": float(len(labels))}


def run_evaluate(model, data, **kw):
    return E.evaluate(model, data, img_size=16, batch_size=5, device=torch.device("cpu"), **kw)


# ----------------------------------------------------------------------------- evaluate()
def test_evaluate_counts_against_hand_computed_metrics(shards):
    logits = torch.linspace(3.0, -2.0, N_CLASSES)  # ranks the classes 0, 1, 2, ...
    model = FixedLogits(logits).train()
    rng = torch.get_rng_state()
    got = run_evaluate(model, shards)
    want = expected(logits, list(range(N_CLASSES)))
    assert got["val/samples"] == want["val/samples"] == 12
    assert got["val/top1"] == pytest.approx(100 / 12) and got["val/top5"] == pytest.approx(500 / 12)
    assert got["val/loss"] == pytest.approx(want["val/loss"], rel=1e-6)
    assert model.training  # mode restored
    assert torch.equal(torch.get_rng_state(), rng)  # training randomness untouched


def test_evaluate_class_map_selects_logit_columns(shards):
    # a 20-output head scored on 12 labels: label c is column class_map[c]
    class_map = torch.tensor([19, 3, 7, 0, 11, 2, 15, 8, 1, 13, 5, 17])
    logits = torch.zeros(20)
    logits[class_map[4]], logits[class_map[9]] = 5.0, 4.0  # label 4 first, label 9 second
    got = run_evaluate(FixedLogits(logits), shards, class_map=class_map)
    want = expected(logits[class_map], list(range(N_CLASSES)))
    assert got["val/top1"] == pytest.approx(100 / 12)
    assert got == pytest.approx(want, rel=1e-6)


def test_evaluate_ranks_see_every_sample_once(shards):
    # without a process group each rank returns its own share; the shares add up to the set
    logits = torch.linspace(3.0, -2.0, N_CLASSES)
    parts = [run_evaluate(FixedLogits(logits), shards, rank=r, world_size=2) for r in range(2)]
    assert sum(p["val/samples"] for p in parts) == 12 and all(p["val/samples"] > 0 for p in parts)
    hits = sum(p["val/top1"] * p["val/samples"] for p in parts) / 100
    assert hits == pytest.approx(1.0)  # only label 0 is ranked first


def test_evaluate_runs_a_real_swinv2(shards):
    torch.manual_seed(0)
    model = swinv2.create_model("tiny", img_size=16, window_size=2, num_classes=N_CLASSES,
                                embed_dim=16, depths=(1, 1), num_heads=(1, 2), drop_path_rate=0.0,
                                pretrained_window_sizes=(0, 0))
    got = run_evaluate(model, shards)
    assert got["val/samples"] == 12 and 0 <= got["val/top1"] <= got["val/top5"] <= 100
    assert torch.isfinite(torch.tensor(got["val/loss"]))


# ----------------------------------------------------------------------------- helpers of the CLI
@pytest.mark.parametrize("window,pretrained", [(8, 0), (8, 6), (12, 16), (1, 0)])
def test_checkpoint_windows_reads_the_normalising_window(window, pretrained):
    from swinv2.attention import relative_coords_table

    sd = {"layers.0.blocks.0.attn.relative_coords_table": relative_coords_table(window, pretrained)}
    want = 0 if window == 1 else (pretrained or window)
    assert E.checkpoint_windows(sd) == {0: (window, want)}


def test_window_transfer_keeps_the_checkpoint_normalisation():
    from swinv2.config import SwinV2Config

    # a W4 model at 32 px has stage windows 4, 4, 2, 1; at 64 px / W8: 8, 8, 4, 2
    kw = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))
    trained = swinv2.create_model("tiny", img_size=32, window_size=4, **kw)
    sd = trained.state_dict()
    target = SwinV2Config.from_variant("tiny", img_size=64, window_size=8, **kw)
    pws, note = E.window_transfer(target, sd, set())
    assert pws == [4, 4, 2, 0] and "[4, 4, 2, 1] -> model [8, 8, 4, 2]" in note
    same = SwinV2Config.from_variant("tiny", img_size=32, window_size=4, **kw)
    assert E.window_transfer(same, sd, set()) == ([0, 0, 0, 0], None)
    assert E.window_transfer(target, sd, {"model.pretrained_window_sizes"}) == (None, None)
    # the rebuilt model sees the coordinates of training at the offsets both windows share
    model = swinv2.create_model("tiny", img_size=64, window_size=8, pretrained_window_sizes=pws, **kw)
    old = sd["layers.0.blocks.0.attn.relative_coords_table"][0]
    new = model.state_dict()["layers.0.blocks.0.attn.relative_coords_table"][0]
    assert torch.allclose(new[4:11, 4:11], old)


def test_parse_args():
    a = E.parse_args(["runs/x", "model.img_size=64", "--json", "o.json", "--step=30", "data.root=/d"])
    assert (a.source, a.overrides, a.json_out, a.step) == ("runs/x", ["model.img_size=64", "data.root=/d"],
                                                           "o.json", 30)
    for bad in (["--step", "x", "runs/x"], ["model.img_size=64"], ["runs/x", "--bogus"], ["runs/x", "--json"]):
        with pytest.raises(E.UserError):
            E.parse_args(bad)


@pytest.mark.parametrize("argv,words", [
    (["/nonexistent/run"], "no such file"),
    (["{empty}"], "no committed checkpoint"),
    (["{textfile}"], "not a readable official-format state dict"),
    (["{textfile}", "--step", "3"], "only for a run directory"),
])
def test_cli_input_errors_are_one_line(argv, words, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.pth").write_text("not a checkpoint\n")
    argv = [a.format(empty=tmp_path / "empty", textfile=tmp_path / "notes.pth") for a in argv]
    assert E.main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("swinv2-eval: ") and words in err and "\n" not in err, err


# ----------------------------------------------------------------------------- swinv2-eval on a real run
def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    # one thread everywhere: the trainer and swinv2-eval then compute the same logits bit for
    # bit (and share the 2 cores politely)
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", WANDB_MODE="disabled")
    return env


def swinv2_eval(*args, cwd, check=True):
    p = subprocess.run(["swinv2-eval", *map(str, args)], cwd=cwd, env=_env(), capture_output=True,
                       text=True, timeout=300)
    if check:
        assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The default tiny experiment, a short run: (run dir, trainer stdout, its final val metrics)."""
    tmp = tmp_path_factory.mktemp("evalrun")
    run_dir = tmp / "run"
    p = subprocess.run(["swinv2-train", f"run.dir={run_dir}", "train.max_steps=30", "logger=none",
                        "train.probe_every=0", "train.progress=lines"],
                       cwd=tmp, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "val/top1" in r][-1]
    return run_dir, p.stdout, final


def _printed(stdout: str, label: str) -> str:
    return next(line.split()[-1] for line in stdout.splitlines() if line.startswith(label))


@pytest.mark.slow
def test_run_dir_gives_the_trainers_final_top1(trained, tmp_path):
    run_dir, train_out, final = trained
    p = swinv2_eval(run_dir, "--json", tmp_path / "r.json", cwd=tmp_path)
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["top1"] == final["val/top1"] and r["top5"] == final["val/top5"]  # same weights, same data
    assert r["loss"] == pytest.approx(final["val/loss"], rel=1e-6)
    assert r["samples"] == final["val/samples"] == 512 and r["step"] == 30
    train_top1 = next(ln for ln in train_out.splitlines() if ln.startswith("final val top-1")).split()[3]
    assert _printed(p.stdout, "top-1") == train_top1  # e.g. 67.19%
    for label in ("top-5", "loss", "samples", "speed"):
        assert any(line.startswith(label) for line in p.stdout.splitlines()), p.stdout


@pytest.mark.slow
def test_official_pth_with_model_keys_gives_the_same_numbers(trained, tmp_path):
    run_dir, _, final = trained
    swinv2_eval(run_dir / "model_official.pth", "model.variant=tiny", "model.img_size=32",
                "model.window_size=4", "model.embed_dim=32", "model.depths=[1,1,2,1]",
                "model.num_heads=[1,2,4,8]", "--json", tmp_path / "p.json", cwd=tmp_path)
    r = json.loads((tmp_path / "p.json").read_text())
    assert (r["top1"], r["top5"], r["samples"]) == (final["val/top1"], final["val/top5"], 512)
    assert r["loss"] == pytest.approx(final["val/loss"], rel=1e-6)
    assert r["step"] is None and r["weights"].endswith("model_official.pth")


@pytest.mark.slow
def test_another_resolution_and_window(trained, tmp_path):
    run_dir, _, _ = trained
    p = swinv2_eval(run_dir, "model.img_size=64", "model.window_size=8", "train.eval_batch_size=128",
                    "--json", tmp_path / "w.json", cwd=tmp_path)
    r = json.loads((tmp_path / "w.json").read_text())
    assert r["samples"] == 512 and r["model"]["img_size"] == 64 and r["batch_size"] == 128
    assert r["model"]["pretrained_window_sizes"] == [4, 4, 2, 0]
    assert "window transfer" in p.stdout and 0 <= r["top1"] <= 100


@pytest.mark.slow
@pytest.mark.parametrize("args,words", [
    (["{run}/model_official.pth", "model.variant=base"], "does not fit the model"),
    (["{run}", "--step", "7"], "no such checkpoint"),
    (["{run}", "data.val_shards={tmp}/none-0000.tar"], "data.val_shards"),
    (["{run}", "model.bogus=1"], "override error"),
    (["{run}", "data=imagenet1k"], "not config groups"),
    (["{run}/model_official.pth", "data.num_classes=7", "data.val_shards={shards}"], "data.num_classes"),
])
def test_bad_inputs_end_in_one_line(trained, tmp_path, args, words, shards):
    run_dir, _, _ = trained
    args = [a.format(run=run_dir, tmp=tmp_path, shards=shards.val_shards) for a in args]
    p = swinv2_eval(*args, cwd=tmp_path, check=False)
    err = p.stderr.strip()
    assert p.returncode != 0, p.stdout + p.stderr
    assert "Traceback" not in p.stderr and err.startswith("swinv2-eval: ") and words in err, err
    assert len(err.splitlines()) == 1, err


@pytest.mark.slow
def test_a_checkpoint_file_changed_since_saved_is_one_line(trained, tmp_path):
    """One flipped byte keeps the file a valid zip archive: the marker's CRC-32 is what finds it."""
    run_dir, _, _ = trained
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    victim = run / "checkpoints" / "step_00000030" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    p = swinv2_eval(run, cwd=tmp_path, check=False)
    err = p.stderr.strip()
    assert p.returncode != 0 and "Traceback" not in p.stderr and len(err.splitlines()) == 1, err
    assert err.startswith("swinv2-eval: ") and victim.name in err and "CRC-32 differs" in err, err


def test_help_explains_usage(tmp_path):
    p = subprocess.run(["swinv2-eval", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "usage: swinv2-eval RUN_DIR_OR_PTH" in p.stdout and "examples" in p.stdout
