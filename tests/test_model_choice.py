"""The model a user asks for is the model built, whichever way it is asked for (`model=X`,
`model.variant=X`, with and without `experiment=`), and every config group states only what
differs from its component's defaults (one place for every default)."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import swinv2
import swinv2_train.config as C
from swinv2_train.cli import prepare_overrides
from swinv2_train.data.config import DataConfig
from swinv2_train.spec import resolve_spec
from swinv2_train.tasks import TASKS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
BASE_256_1K = 87.9e6  # SwinV2-B at 256 / W8 with a 1000-class head (timm / HF: 87.92M)
BASE_256_1K_EXACT = 87_918_816  # parameters (not buffers); independent of resolution and window
# a 1000-class head: shards of ImageNet-1K (not read: resolve_data=False)
HEAD_1K = ["data.train_shards=/d/train-{000000..000099}.tar", "data.val_shards=/d/val-000000.tar",
           "data.num_classes=1000"]


def _spec(args):
    """What `swinv2-train ARGS` resolves to (the command line's own override handling included)."""
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("train", overrides=prepare_overrides(list(args)))
    return resolve_spec(cfg, world_size=1, resolve_data=False)


def _params(spec) -> int:
    with torch.device("meta"):  # counts without allocating
        return sum(p.numel() for p in swinv2.SwinTransformerV2(spec.model).parameters())


@pytest.mark.parametrize("args", [
    ["model=base"],
    ["model.variant=base", "model.img_size=256", "model.window_size=8"],
    ["experiment=swinv2_tiny_256_w8_1k", "model=base"],
    ["experiment=swinv2_tiny_256_w8_1k", "model.variant=base"],
    ["experiment=simmim_default", "model=base"],  # SimMIM's encoder
    # a recipe that states its own sizes (the stability study): the named variant still wins
    ["experiment=stability", "model.variant=base", "model.img_size=256", "model.window_size=8"],
], ids=lambda a: " ".join(a))
def test_every_way_of_asking_for_base_builds_swinv2_b(args):
    spec = _spec([*args, *HEAD_1K])
    assert (spec.variant, spec.model.embed_dim, spec.model.depths, spec.model.num_heads) == \
        ("base", 128, (2, 2, 18, 2), (4, 8, 16, 32))
    assert (spec.model.img_size, spec.model.window_size) == (256, 8)
    assert _params(spec) == pytest.approx(BASE_256_1K, rel=1e-3)


def test_the_embedded_default_is_the_toy_and_a_variant_keeps_its_resolution():
    toy = _spec([])
    assert (toy.variant, toy.model.embed_dim, toy.model.depths, toy.model.img_size) == ("toy", 32, (1, 1, 2, 1), 32)
    assert _params(toy) == pytest.approx(1.44e6, rel=0.01)  # 10 synthetic classes
    base_at_32 = _spec(["model.variant=base", *HEAD_1K])  # the key typed wins; the resolution stays
    assert (base_at_32.model.embed_dim, base_at_32.model.img_size) == (128, 32)
    assert _params(base_at_32) == pytest.approx(BASE_256_1K, rel=1e-3)  # window-independent parameters


def test_sizes_the_user_types_beside_a_variant_win():
    spec = _spec(["model.variant=base", "model.embed_dim=64", "model.num_heads=[2,4,8,16]"])
    assert (spec.model.embed_dim, spec.model.depths, spec.model.num_heads) == (64, (2, 2, 18, 2), (2, 4, 8, 16))


@pytest.mark.parametrize("group", ["tiny", "small", "base", "large", "giant", "toy"])
def test_each_model_group_builds_its_variant(group):
    spec = _spec([f"model={group}"])
    sizes = swinv2.VARIANTS[group]
    assert (spec.variant, spec.model.embed_dim, spec.model.depths) == (group, sizes["embed_dim"], sizes["depths"])


# ----------------------------------------------------------------------------- one home per default
SCHEMA = {"optim": C.OptimConfig, "sched": C.SchedConfig, "deepspeed": C.DeepSpeedSection,
          "logger": C.LoggerConfig, "data": DataConfig, "model": C.ModelConfig}


def _leaves(node, prefix=""):
    for k, v in node.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


@pytest.mark.parametrize("path", sorted(
    os.path.relpath(os.path.join(d, f), CONFIGS) for group in SCHEMA
    for d, _, files in os.walk(os.path.join(CONFIGS, group)) for f in files if f.endswith(".yaml")))
def test_group_yaml_states_only_differences_from_its_component(path):
    group = path.split(os.sep)[0]
    defaults = OmegaConf.structured(SCHEMA[group])
    stated = yaml.safe_load(open(os.path.join(CONFIGS, path))) or {}
    selection = {"variant"} if group == "model" else set()  # what a model group is for: naming its variant
    same = [k for k, v in _leaves(stated) if k not in selection and OmegaConf.select(defaults, k) == v]
    assert not same, f"{path} restates {group} defaults {same}: remove them (the default lives in the schema)"


def test_model_groups_do_not_restate_the_variant_table():
    for name in os.listdir(os.path.join(CONFIGS, "model")):
        stated = yaml.safe_load(open(os.path.join(CONFIGS, "model", name)))
        assert not set(stated) & set(swinv2.config.VARIANT_FIELDS), name


def test_task_group_is_the_task_registry():
    """`task=NAME` selects TASKS[NAME].Config; no task YAML restates it."""
    assert not os.path.exists(os.path.join(CONFIGS, "task"))
    for name, task in TASKS.items():
        spec = _spec([f"task={name}"])
        assert isinstance(spec.task, task.Config) and spec.task.name == name


def test_simmim_defaults_are_the_official_values():
    spec = _spec(["task=simmim", "model=base", "model.img_size=192", "model.window_size=12"])
    assert (spec.task.mask_patch_size, spec.task.mask_ratio, spec.task.norm_target_window, spec.task.recon_every) \
        == (32, 0.6, 47, 1000)


@pytest.mark.slow
def test_the_log_line_shows_the_parameter_count_built(tmp_path):
    """`swinv2-train model.variant=base` trains SwinV2-B (at the embedded default's 32 px, on its
    10 synthetic classes) and its start-up line says how many parameters were built."""
    env = {**os.environ, "WANDB_MODE": "offline", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    out = subprocess.run(
        [sys.executable, "-m", "swinv2_train.main", "model.variant=base", "train.max_steps=1",
         "train.batch_size=2", "train.eval_every=0", "train.probe_every=0", "run.export_official=false",
         "logger=none", f"run.dir={tmp_path / 'run'}"],
        env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    spec = _spec(["model.variant=base"])  # the class count is resolved with the data: the synthetic set's 10
    built = _params(dataclasses.replace(spec, model=dataclasses.replace(spec.model, num_classes=10)))
    assert built == BASE_256_1K_EXACT - 990 * 1025  # a 10-class head instead of 1000
    assert f"{built / 1e6:.2f}M params" in out.stdout + out.stderr
