"""Config tree -> run spec: every recipe composes and resolves with the paper's numbers; bad configs
are rejected naming the key; the model node is SwinV2Config field by field; DeepSpeed config and LR
schedule from the spec. In-process, no process group."""
import dataclasses
import math
import os

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import OmegaConfBaseException

import swinv2_train.config as C
from swinv2.config import SwinV2Config
from swinv2_train.parallelize import build_ds_config
from swinv2_train.config import cosine_lr
from swinv2_train.spec import resolve_spec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
SHARDS = ["data.train_shards='/d/train-{000000..000099}.tar'", "data.val_shards='/d/val-{000000..000004}.tar'"]


def _compose(overrides=()):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("train", overrides=list(overrides))


# name: (variant, img, window, effective lr, epochs, wd, drop path, batch, warmup epochs, classes)
PAPER = {
    "swinv2_tiny_256_w8_1k": ("tiny", 256, 8, 1e-3, 300, 0.05, 0.2, 1024, 20, 1000),
    "swinv2_tiny_256_w16_1k": ("tiny", 256, 16, 1e-3, 300, 0.05, 0.2, 1024, 20, 1000),
    "swinv2_small_256_w8_1k": ("small", 256, 8, 1e-3, 300, 0.05, 0.3, 1024, 20, 1000),
    "swinv2_small_256_w16_1k": ("small", 256, 16, 1e-3, 300, 0.05, 0.3, 1024, 20, 1000),
    "swinv2_base_256_w8_1k": ("base", 256, 8, 1e-3, 300, 0.05, 0.5, 1024, 20, 1000),
    "swinv2_base_256_w16_1k": ("base", 256, 16, 1e-3, 300, 0.05, 0.5, 1024, 20, 1000),
    "swinv2_base_192_w12_22k": ("base", 192, 12, 1e-3, 90, 0.1, 0.2, 4096, 5, 21841),
    "swinv2_large_192_w12_22k": ("large", 192, 12, 1e-3, 90, 0.1, 0.2, 4096, 5, 21841),
    "swinv2_base_22kto1k_256_w16": ("base", 256, 16, 4e-5, 30, 1e-8, 0.2, 1024, 5, 1000),
    "swinv2_base_22kto1k_384_w24": ("base", 384, 24, 4e-5, 30, 1e-8, 0.2, 1024, 5, 1000),
    "swinv2_large_22kto1k_256_w16": ("large", 256, 16, 4e-5, 30, 1e-8, 0.2, 1024, 5, 1000),
    "swinv2_large_22kto1k_384_w24": ("large", 384, 24, 4e-5, 30, 1e-8, 0.2, 1024, 5, 1000),
    "swinv2_giant_1536_w48": ("giant", 1536, 48, 1e-3, 90, 0.1, 0.2, 4096, 5, 21841),
}


def test_every_paper_recipe_exists():
    names = {f[:-5] for f in os.listdir(os.path.join(CONFIGS, "experiment")) if f.endswith(".yaml")}
    assert set(PAPER) | {"default"} <= names  # other experiments (e.g. stability) may exist


@pytest.mark.parametrize("name", sorted(PAPER))
def test_recipe_matches_paper(name):
    ov = [f"experiment={name}", *SHARDS]
    if "22kto1k" in name:
        ov.append(f"model.pretrained={os.path.join(REPO, 'setup.py')}")  # any existing file
    cfg = _compose(ov)
    spec = resolve_spec(cfg, world_size=8, resolve_data=False)
    variant, img, win, lr, epochs, wd, dp, batch, warm, ncls = PAPER[name]
    assert (spec.variant, spec.model.img_size, spec.model.window_size) == (variant, img, win)
    assert math.isclose(spec.schedule.lr, lr, rel_tol=1e-9)
    assert cfg.train.epochs == epochs and cfg.train.max_steps is None
    assert cfg.optim.weight_decay == wd and cfg.optim.clip_grad == 5.0
    assert cfg.model.drop_path_rate == dp and cfg.train.batch_size == batch
    assert cfg.sched.warmup_epochs == warm and cfg.data.num_classes == ncls
    assert cfg.data.augment == "imagenet" and cfg.train.precision == "bf16"
    if "22kto1k" in name:
        assert list(cfg.model.pretrained_window_sizes) == [12, 12, 12, 6]
        assert cfg.data.test_crop is (False if img == 384 else None)
        assert math.isclose(spec.schedule.min_lr, 4e-7)  # official MIN_LR 2e-7 x 2
    if variant == "giant":
        assert cfg.model.attention == "sequential" and cfg.train.precision == "bf16"
        assert cfg.train.activation_checkpointing.every == 1


def test_recipes_pick_the_imagenet_data_presets():
    assert _compose(["experiment=swinv2_tiny_256_w8_1k"]).data.root == "/data/imagenet1k-wds"
    in22k = _compose(["experiment=swinv2_large_192_w12_22k"]).data
    # epochs over _info.json's counts (configs/data/imagenet22k.yaml says why), not resampled
    assert in22k.root == "/data/imagenet22k-wds" and in22k.num_classes == 21841
    assert in22k.resampled is False and in22k.train_samples is None


def test_default_validates_and_is_small():
    cfg = C.validate(_compose(), world_size=1)
    assert cfg.run.dir == "runs/default" and cfg.train.max_steps and cfg.data.train_shards is None
    assert cfg.model.variant == "toy" and cfg.model.img_size == 32
    assert resolve_spec(cfg, world_size=1, resolve_data=False).model.embed_dim == 32


def test_finetune_recipe_requires_pretrained():
    cfg = _compose(["experiment=swinv2_base_22kto1k_256_w16", *SHARDS])
    with pytest.raises(C.ConfigError, match="model.pretrained"):
        C.validate(cfg, world_size=8)


@pytest.mark.parametrize("overrides, key", [
    (["train.bogus=1"], "bogus"),
    (["train.batch_size=abc"], "train.batch_size"),
    (["model.variant=huge2"], "model.variant"),
    (["train.batch_size=100", "train.grad_accum=3"], "train.batch_size"),
    (["model.window_size=6"], "model.window_size"),
    (["experiment=swinv2_giant_1536_w48", *SHARDS, "model.window_size=32"], "model.window_size"),
    (["train.nan_policy=ignore"], "train.nan_policy"),
    (["train.precision=fp8"], "train.precision"),
    (["data.augment=heavy"], "data.augment"),
    (["data.num_classes=1000"], "data.train_shards"),
    (["deepspeed.zero_stage=3"], "deepspeed.zero_stage"),
    (["optim.layer_decay=0"], "optim.layer_decay"),
])
def test_bad_config_names_key(overrides, key):
    with pytest.raises((C.ConfigError, ConfigCompositionException, OmegaConfBaseException)) as e:
        C.validate(_compose(overrides), world_size=2)
    text = str(e.value) + str(getattr(e.value, "__cause__", ""))
    assert key in text, text


def test_batch_divisibility_uses_world_size():
    cfg = _compose(["train.batch_size=48", "train.grad_accum=2"])
    C.validate(cfg, world_size=2)
    with pytest.raises(C.ConfigError, match="train.batch_size"):
        C.validate(cfg, world_size=5)


def _spec(overrides=(), world_size=1):
    return resolve_spec(_compose(overrides), world_size, resolve_data=False)


def test_spec_batch_geometry_and_schedule():
    spec = _spec(["train.batch_size=64", "train.grad_accum=2", "optim.lr=1e-3", "optim.lr_batch_ref=32",
                  "sched.warmup_steps=null", "sched.warmup_epochs=2", "train.max_steps=null", "train.epochs=3"], 4)
    b = spec.batch
    assert (b.global_batch, b.micro, b.accum, b.world_size, b.micro_global, b.eval_batch) == (64, 8, 2, 4, 32, 8)
    s = spec.schedule
    assert math.isclose(s.lr, 2e-3) and math.isclose(s.min_lr, 2e-5)  # x 64/32
    assert s.total_steps(steps_per_epoch=10.5) == 32 and s.warmup(10.5) == 21
    assert s.budget == ("train.epochs", 3.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.batch = None


def test_model_node_is_swinv2config_field_by_field():
    """Every SwinV2Config field but the class count (data.num_classes) is a model key; a key set
    reaches the spec's SwinV2Config, an unset one is the variant's value or the dataclass default."""
    model_keys = set(C.ModelConfig.__dataclass_fields__)
    assert {f.name for f in dataclasses.fields(SwinV2Config)} - {"num_classes"} <= model_keys
    spec = _spec(["model.mlp_ratio=2.0", "model.qkv_bias=false", "model.patch_size=2", "model.img_size=64",
                  "model.window_size=4"])
    assert (spec.model.mlp_ratio, spec.model.qkv_bias, spec.model.patch_size) == (2.0, False, 2)
    assert resolve_spec(_compose(), 1).model.num_classes == 10  # resolved: the synthetic set's classes
    assert spec.model.sequential_chunk == SwinV2Config.sequential_chunk  # unset: the dataclass default
    assert _spec(["model.variant=base", "model.embed_dim=null", "model.depths=null",
                  "model.num_heads=null"]).model.embed_dim == 128  # unset: the variant's value
    with pytest.raises(C.ConfigError, match=r"^model.mlp_ratio: must be > 0"):
        _spec(["model.mlp_ratio=0"])


def test_deprecated_amp_every_is_probe_every(caplog):
    assert _spec(["train.amp_every=7"]).train.probe_every == 7
    assert "train.amp_every is deprecated" in caplog.text
    assert _spec(["train.probe_every=3"]).train.probe_every == 3


def test_task_group_default_and_unknown():
    assert _spec().task.name == "classification"
    assert _spec(["task=simmim"]).task.name == "simmim"
    with pytest.raises(C.ConfigError, match="task.name"):
        _spec(["task.name=bogus"])


def test_deepspeed_config():
    ds = build_ds_config(_spec(["train.batch_size=64", "train.grad_accum=2", "train.precision=bf16"], 4))
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * 2 * 4 == 64
    assert ds["zero_optimization"]["stage"] == 1
    assert ds["zero_optimization"]["overlap_comm"] and ds["zero_optimization"]["contiguous_gradients"]
    assert ds["bf16"]["enabled"] and ds["data_types"]["grad_accum_dtype"] == "fp32"
    assert ds["data_types"]["buffer_dtype"] == "bf16"
    assert ds["gradient_clipping"] == 5.0 and "fp16" not in ds
    ds16 = build_ds_config(_spec(["train.precision=fp16", "+deepspeed.extra.wall_clock_breakdown=true"]))
    assert ds16["fp16"]["enabled"] and ds16["fp16"]["loss_scale"] == 0  # dynamic
    assert ds16["wall_clock_breakdown"] is True  # deepspeed.extra merged verbatim
    assert "bf16" not in build_ds_config(_spec())


def test_cosine_schedule():
    kw = dict(total=100, warmup=10, lr=1e-3, warmup_lr=1e-6, min_lr=1e-5)
    assert cosine_lr(0, **kw) == 1e-6
    assert math.isclose(cosine_lr(10, **kw), 1e-3)
    assert cosine_lr(5, **kw) < cosine_lr(9, **kw) < 1e-3
    assert math.isclose(cosine_lr(55, **kw), (1e-3 + 1e-5) / 2)
    assert math.isclose(cosine_lr(100, **kw), 1e-5)
    lrs = [cosine_lr(s, **kw) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


# ----------------------------------------------------------------------------- SimMIM recipes
# name: (task, variant, img, window, effective lr, batch, wd, clip, layer decay, drop path, augment)
SIMMIM_RECIPES = {
    "simmim_swinv2_base_192_w12_800ep": ("simmim", "base", 192, 12, 1e-4 * 2048 / 512, 2048, 0.05, 5.0, 1.0, 0.1, "light"),
    "swinv2_base_simmim_ft_224_w14": ("classification", "base", 224, 14, 1.25e-3 * 2048 / 512, 2048, 0.05, 5.0, 0.75,
                                      0.2, "imagenet"),
    "swinv2_giant_simmim_stage1_192": ("simmim", "giant", 192, 12, 1.4e-3, 9216, 0.1, 100.0, 1.0, 0.1, "light"),
    "swinv2_giant_supervised_stage2_192": ("classification", "giant", 192, 12, 1.4e-3, 9216, 0.1, 100.0, 0.87, 0.3,
                                           "imagenet"),
    "swinv2_giant_ft_640_w40": ("classification", "giant", 640, 40, 2.1e-5, 576, 0.1, 100.0, 1.0, 0.5, "imagenet"),
}


@pytest.mark.parametrize("name", sorted(SIMMIM_RECIPES))
def test_simmim_chain_recipes(name):
    ov = [f"experiment={name}", *SHARDS]
    if "ft" in name or "stage2" in name:
        ov.append(f"model.pretrained={os.path.join(REPO, 'setup.py')}")  # any existing file
    cfg = _compose(ov)
    spec = resolve_spec(cfg, world_size=8, resolve_data=False)
    task, variant, img, win, lr, batch, wd, clip, ld, dp, aug = SIMMIM_RECIPES[name]
    assert (spec.task.name, spec.variant, spec.model.img_size, spec.model.window_size) == (task, variant, img, win)
    assert math.isclose(spec.schedule.lr, lr, rel_tol=1e-9) and cfg.train.batch_size == batch
    assert (cfg.optim.weight_decay, cfg.optim.clip_grad, cfg.optim.layer_decay) == (wd, clip, ld)
    assert cfg.model.drop_path_rate == dp and cfg.data.augment == aug
    if task == "simmim":
        assert (cfg.task.mask_patch_size, cfg.task.mask_ratio, cfg.task.norm_target.window) == (32, 0.6, 47)
    if variant == "giant":  # every memory measure of the paper
        assert cfg.model.attention == "sequential" and cfg.train.activation_checkpointing.every == 1
        assert cfg.train.precision == "bf16" and cfg.deepspeed.zero_stage == 1
    if name == "swinv2_giant_simmim_stage1_192":
        assert (cfg.train.epochs, cfg.sched.warmup_steps) == (20, 30000)
    if name == "swinv2_giant_supervised_stage2_192":
        assert (cfg.train.epochs, cfg.sched.warmup_steps, cfg.data.mixup, cfg.data.cutmix) == (30, 20000, 0.0, 0.0)
    if name == "swinv2_giant_ft_640_w40":
        assert (cfg.train.epochs, cfg.sched.warmup_epochs) == (10, 2)
    if name == "swinv2_base_simmim_ft_224_w14":
        assert list(cfg.model.pretrained_window_sizes) == [12, 12, 12, 6]
        assert (cfg.train.epochs, cfg.sched.warmup_epochs) == (100, 20)
    if name == "simmim_swinv2_base_192_w12_800ep":
        assert (cfg.train.epochs, cfg.sched.warmup_epochs, cfg.task.norm_target.enable) == (800, 10, True)


def test_simmim_default_validates():
    cfg = C.validate(_compose(["experiment=simmim_default"]), world_size=1)
    assert cfg.task.name == "simmim" and cfg.data.train_shards is None and cfg.model.img_size == 32


@pytest.mark.parametrize("overrides, key", [
    (["task.mask_patch_size=12"], "task.mask_patch_size"),   # does not divide 32
    (["task.mask_patch_size=6"], "task.mask_patch_size"),    # not a multiple of the patch (4)
    (["task.mask_ratio=1.5"], "task.mask_ratio"),
    (["task.norm_target.enable=true", "task.norm_target.window=8"], "task.norm_target.window"),
    (["task.recon_every=-1"], "task.recon_every"),
])
def test_simmim_settings_errors_name_the_key(overrides, key):
    cfg = _compose(["experiment=simmim_default", *overrides])
    with pytest.raises(C.ConfigError, match=key.replace(".", r"\.")):
        C.validate(cfg, world_size=1)
