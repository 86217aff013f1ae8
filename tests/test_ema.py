"""EMA of weights (train.ema_decay, swinv2_train.ema).

Fast: the EMA's arithmetic on a tiny SwinV2 (integer buffers copied, never averaged; float
entries averaged by the formula; warm-up; state round trip; evaluation swap; config check).
Slow (subprocess `swinv2-train`, as users run it): the EMA in checkpoints follows exactly the
applied steps' weights (a NaN-skipped step leaves it), val_ema/* logged beside val/*, the
official-format EMA export, bit-exact resume, and a 2-rank ZeRO-1 run whose ranks agree.
"""
import io
import os

import pytest
import torch

import swinv2
from swinv2_train.ema import ModelEma, ema_metrics, live_tensors, rank_spread, warmup_decay

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    # depths (2,1,1,1): stage 0's second block is shifted (int8 region ids, derived attn_mask)
    return swinv2.create_model("tiny", img_size=32, window_size=4, num_classes=10, embed_dim=16,
                               depths=(2, 1, 1, 1), num_heads=(1, 2, 2, 4))


def perturb(model, scale=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------- arithmetic
def test_warmup_decay_values():
    assert warmup_decay(0.9998, 0) == pytest.approx(0.1)
    assert warmup_decay(0.9998, 1) == pytest.approx(2 / 11)
    assert warmup_decay(0.9998, 90) == pytest.approx(0.91)
    assert warmup_decay(0.9998, 10**6) == 0.9998
    assert warmup_decay(0.5, 7) < 0.5 and warmup_decay(0.5, 8) == 0.5  # (1+8)/(10+8) = 0.5
    assert warmup_decay(0.9998, 0, warmup=False) == 0.9998


def test_integer_buffers_are_copied_never_averaged():
    model = tiny_model()
    ints = {k: v for k, v in live_tensors(model).items() if not v.is_floating_point()}
    assert any(k.endswith("relative_position_index") for k in ints)
    assert "layers.0.blocks.1.attn_mask_regions" not in live_tensors(model)  # non-persistent: geometry
    ema = ModelEma(model, decay=0.5, warmup=False)
    assert all(ema.tensors[k].dtype == torch.int64 for k in ints)
    with torch.no_grad():  # a changed index: an average would land halfway (and turn it into floats)
        for v in ints.values():
            v.add_(7)
    ema.update(model)
    for k, v in ints.items():
        assert ema.tensors[k].dtype == v.dtype and torch.equal(ema.tensors[k], v), k


def test_float_entries_follow_the_formula_and_constant_buffers_stay_exact():
    model = tiny_model()
    w0 = {k: v.detach().clone() for k, v in live_tensors(model).items()}
    ema = ModelEma(model, decay=0.9998)  # warm-up: the first update's decay is 0.1
    perturb(model)
    ema.update(model)
    assert ema.last_decay == pytest.approx(0.1) and ema.updates == 1
    params = dict(model.named_parameters())
    for k, p in params.items():
        expected = 0.1 * w0[k] + 0.9 * p.detach()
        torch.testing.assert_close(ema.tensors[k], expected, rtol=1e-6, atol=1e-7)
        assert not torch.equal(ema.tensors[k], p.detach()) or torch.equal(w0[k], p.detach()), k
    for step in range(2, 6):  # more updates, the weights moving each time
        perturb(model, seed=step)
        ema.update(model)
    coords = [k for k in ema.tensors if k.endswith("relative_coords_table")]
    assert coords and all(torch.equal(ema.tensors[k], w0[k]) for k in coords)  # lerp of equal values is exact
    assert ema.updates == 5 and ema.last_decay == pytest.approx(5 / 14)


def test_no_update_no_change():
    """The trainer calls update() only after an applied step; an EMA not updated keeps its values
    even while the module changes (what a NaN-skipped step must look like)."""
    model = tiny_model()
    ema = ModelEma(model, decay=0.99)
    before = {k: v.clone() for k, v in ema.tensors.items()}
    perturb(model)
    assert all(torch.equal(before[k], v) for k, v in ema.tensors.items()) and ema.updates == 0


def test_state_round_trip_continues_identically():
    model = tiny_model()
    a = ModelEma(model, decay=0.95)
    for s in range(3):
        perturb(model, seed=s)
        a.update(model)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = ModelEma(tiny_model(seed=5), decay=0.95)  # other weights: everything must come from the state
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    assert b.updates == 3
    for s in (10, 11):
        perturb(model, seed=s)
        a.update(model)
        b.update(model)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    other = swinv2.create_model("tiny", img_size=32, window_size=4, num_classes=7, embed_dim=16,
                                depths=(2, 1, 1, 1), num_heads=(1, 2, 2, 4))
    with pytest.raises(ValueError, match="does not fit the model: head.weight"):
        ModelEma(other, decay=0.95).load_state_dict(a.state_dict())


def test_swapped_in_evaluates_ema_and_restores_raw_bit_exactly():
    model = tiny_model().eval()
    ema = ModelEma(model, decay=0.5, warmup=False)
    perturb(model)
    ema.update(model)
    raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
    param_ids = [id(p) for p in model.parameters()]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out_raw = model(x)
        with ema.swapped_in(model):
            for k, v in live_tensors(model).items():
                assert torch.equal(v, ema.tensors[k].to(v.dtype)), k
            out_ema = model(x)
        assert not torch.allclose(out_ema, out_raw)
        assert torch.equal(model(x), out_raw)
    assert all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())
    assert [id(p) for p in model.parameters()] == param_ids  # the same tensors (ZeRO holds views of them)


def test_metric_names_and_rank_spread():
    assert ema_metrics({"val/top1": 1.0, "val/loss": 2.0, "x": 3.0}) == {"val_ema/top1": 1.0, "val_ema/loss": 2.0,
                                                                         "ema/x": 3.0}
    ema = ModelEma(tiny_model(), decay=0.9)
    f = ema.fingerprint()
    two_ranks = lambda other: (lambda v: [max(v[0], other), max(v[1], -other)])  # noqa: E731
    assert rank_spread(ema, two_ranks(f)) == 0.0
    assert rank_spread(ema, two_ranks(f + 0.5)) == pytest.approx(0.5)


def test_config_key_is_checked():
    from hydra import compose, initialize_config_dir

    from swinv2_train.config import ConfigError
    from swinv2_train.spec import resolve_spec

    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

    def spec(*overrides):
        with initialize_config_dir(config_dir=configs, version_base="1.3"):
            return resolve_spec(compose("train", overrides=list(overrides)), 1, resolve_data=False)

    assert spec().train.ema_decay is None and spec().train.ema_warmup is True
    assert spec("train.ema_decay=0.9998").train.ema_decay == 0.9998
    assert spec("train.ema_decay=0").train.ema_decay == 0  # off
    for bad in ("1.0", "1.5", "-0.1"):
        with pytest.raises(ConfigError, match=r"^train.ema_decay: must be in \(0, 1\)"):
            spec(f"train.ema_decay={bad}")


# ----------------------------------------------------------------------------- the trainer
STEPS, NAN_STEP, EVERY = 6, 4, 3
EMA_RUN = ["train.ema_decay=0.9", f"train.max_steps={STEPS}", "data.augment=light", "data.mixup=0.8",
           "data.cutmix=1.0", "model.drop_path_rate=0.1", "data.train_samples=64", "train.probe_every=0",
           f"train.eval_every={EVERY}", "train.ckpt_every=1", "train.keep_ckpts=10", "logger.wandb.enabled=false",
           f"train.debug_inject_nan_steps=[{NAN_STEP}]"]


def _tag(run, step):
    return os.path.join(run, "checkpoints", f"step_{step:08d}")


def _ema_file(run, step):
    return torch.load(os.path.join(_tag(run, step), "ema.pt"), map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    from test_train import TINY, train

    tmp = tmp_path_factory.mktemp("ema")
    p = train([*TINY, *EMA_RUN, f"run.dir={tmp / 'run'}"], cwd=tmp)
    return str(tmp / "run"), p


@pytest.mark.slow
def test_ema_follows_the_applied_steps_exactly(ema_run):
    """ema.pt of step s = lerp(ema.pt of step s-1, the module weights of step s, 1 - d_n), with
    d_n the warm-up decay of update n; the NaN-skipped step leaves it untouched."""
    from test_train import module_weights

    from swinv2_train.checkpoint import damaged_files, read_marker

    run, _ = ema_run
    assert [_ema_file(run, s)["updates"] for s in range(1, STEPS + 1)] == [1, 2, 3, 3, 4, 5]
    for s in range(2, STEPS + 1):
        prev, cur, w = _ema_file(run, s - 1), _ema_file(run, s), module_weights(_tag(run, s))
        assert "layers.0.blocks.1.attn_mask" not in cur["weights"]  # derived geometry: not kept
        for k, e in cur["weights"].items():
            if s == NAN_STEP:
                assert torch.equal(e, prev["weights"][k]), k
            elif e.is_floating_point():
                d = warmup_decay(0.9, prev["updates"])
                assert torch.equal(e, torch.lerp(prev["weights"][k], w[k].float(), 1.0 - d)), (s, k)
            else:
                assert e.dtype == torch.int64 and torch.equal(e, w[k]), (s, k)
    # the commit marker sums ema.pt like every other file: damage to it is found
    tag = _tag(run, STEPS)
    assert "ema.pt" in read_marker(tag)["files"] and damaged_files(tag) == []


@pytest.mark.slow
def test_ema_is_evaluated_logged_and_exported(ema_run, tmp_path):
    from omegaconf import OmegaConf
    from test_train import metrics, module_weights

    from swinv2_train.checkpoint import export
    from swinv2_train.config import model_kwargs

    run, p = ema_run
    vals = [r for r in metrics(run) if "val/top1" in r]
    assert [r["step"] for r in vals] == [EVERY, STEPS]
    for r in vals:
        assert {"val_ema/top1", "val_ema/top5", "val_ema/loss", "val_ema/samples"} <= set(r)
        assert r["val_ema/loss"] != r["val/loss"] and r["val_ema/samples"] == r["val/samples"]
        assert r["ema/rank_spread"] == 0.0
    # the decay of the last update before each evaluation (update n=2 at step 3; n=4 at step 6)
    assert [r["ema/decay"] for r in vals] == pytest.approx([3 / 12, 5 / 14])
    assert "EMA weights top-1" in p.stdout and "model_ema_official.pth" in p.stdout

    raw = torch.load(os.path.join(run, "model_official.pth"), weights_only=True)["model"]
    ema = torch.load(os.path.join(run, "model_ema_official.pth"), weights_only=True)["model"]
    assert ema.keys() == raw.keys()  # derived entries (attn_mask) included, from the raw weights
    saved = _ema_file(run, STEPS)["weights"]
    assert all(torch.equal(ema[k], saved[k]) for k in saved)
    first = module_weights(_tag(run, 1))  # tensors that training moved (stage 3's 1-token window learns nothing)
    moved = [k for k in saved if saved[k].is_floating_point() and not torch.equal(first[k], raw[k].to(first[k].dtype))]
    assert "head.weight" in moved and len(moved) > len(saved) // 2
    assert all(not torch.equal(ema[k], raw[k]) for k in moved)  # the EMA lags every one of them
    assert all(torch.equal(ema[k], raw[k]) for k in raw if not raw[k].is_floating_point())
    # it loads as an official checkpoint; an earlier step's EMA exports too (export --ema)
    cfg = OmegaConf.load(os.path.join(run, "config.yaml"))
    model = swinv2.create_model(**model_kwargs(cfg.model, cfg.data.num_classes))
    swinv2.load_official_state_dict(model, os.path.join(run, "model_ema_official.pth"))
    export(run, str(tmp_path / "ema3.pth"), EVERY, ema=True)
    ema3 = torch.load(tmp_path / "ema3.pth", weights_only=True)["model"]
    assert all(torch.equal(ema3[k], v) for k, v in _ema_file(run, EVERY)["weights"].items())


@pytest.mark.slow
def test_ema_resume_is_bit_identical(ema_run, tmp_path):
    from test_train import TINY, metrics, train

    run, _ = ema_run
    b = tmp_path / "b"
    train([*TINY, *EMA_RUN, f"run.dir={b}", "train.stop_at_step=2"], cwd=tmp_path)
    assert not (b / "model_ema_official.pth").exists()
    p = train([*TINY, *EMA_RUN, f"run.dir={b}"], cwd=tmp_path)
    assert "resumed from" in p.stdout + p.stderr
    for name in ("model_ema_official.pth", "model_official.pth"):
        wa = torch.load(os.path.join(run, name), weights_only=True)["model"]
        wb = torch.load(b / name, weights_only=True)["model"]
        diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
        assert wa.keys() == wb.keys() and not diff, (name, diff[:5])
    va = [r for r in metrics(run) if "val_ema/top1" in r]
    vb = [r for r in metrics(b) if "val_ema/top1" in r]
    keys = ("step", "val_ema/loss", "val_ema/top1", "val/loss", "ema/decay")
    assert [[r[k] for k in keys] for r in va] == [[r[k] for k in keys] for r in vb]


@pytest.mark.slow
def test_ema_two_ranks_zero1(tmp_path):
    """2 ranks under the deepspeed launcher: every rank keeps its own EMA; at each evaluation the
    ranks' EMA checksums agree (ema/rank_spread is max - min over ranks), val_ema/* are logged,
    rank 0's ema.pt is committed and exported, and a 2-rank run interrupted and resumed ends with
    the same EMA, bit for bit (every rank reloads rank 0's ema.pt)."""
    from test_train import REPO, TINY, metrics, train
    from test_train_distributed import _free_port

    from swinv2_train.checkpoint import read_marker

    def two_ranks(run, *extra):
        train([*TINY, "train.ema_decay=0.99", "train.max_steps=4", "train.eval_every=2", "train.probe_every=0",
               "data.augment=light", "model.drop_path_rate=0.1", "logger=none", f"run.dir={run}", *extra], cwd=REPO,
              cmd=("deepspeed", "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                   "--module", "swinv2_train.main"))

    run, resumed = tmp_path / "two", tmp_path / "resumed"
    two_ranks(run)
    vals = [r for r in metrics(run) if "val/top1" in r]
    assert [r["step"] for r in vals] == [2, 4]
    assert all(r["ema/rank_spread"] == 0.0 and r["val_ema/loss"] != r["val/loss"] for r in vals)
    tag = _tag(str(run), 4)
    assert "ema.pt" in read_marker(tag)["files"] and _ema_file(str(run), 4)["updates"] == 4
    raw = torch.load(run / "model_official.pth", weights_only=True)["model"]
    ema = torch.load(run / "model_ema_official.pth", weights_only=True)["model"]
    assert ema.keys() == raw.keys() and not torch.equal(ema["head.weight"], raw["head.weight"])
    assert read_marker(tag)["world_size"] == 2

    two_ranks(resumed, "train.stop_at_step=3")
    two_ranks(resumed)
    again = torch.load(resumed / "model_ema_official.pth", weights_only=True)["model"]
    assert [k for k in ema if not torch.equal(ema[k], again[k])] == []
    assert [r["ema/rank_spread"] for r in metrics(resumed) if "val_ema/top1" in r] == [0.0, 0.0]
