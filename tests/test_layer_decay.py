"""Layer-wise LR decay (optim.layer_decay): the official get_swin_layer ids and scales, the
weight-decay exclusions inside them, the off switch, validation, and a real run applying them."""
import glob
import os
import re

import pytest
import torch
from hydra import compose, initialize_config_dir

import swinv2
import swinv2_train.config as C
from swinv2 import param_groups

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DECAY = 0.87  # the paper's SwinV2-G stage 2 value

# tiny: depths (2, 2, 6, 2), L = 12, ids 0..13 -- written from the rule in swinv2-reference.md section 5,
# not from the implementation: stem 0, block j of stage i sum(depths[:i]) + j + 1, a downsample the
# id of its stage's last block, final norm / head L + 1.
TINY_IDS = {
    "patch_embed.proj.weight": 0,
    "patch_embed.norm.bias": 0,
    "layers.0.blocks.0.attn.qkv.weight": 1,
    "layers.0.blocks.1.attn.logit_scale": 2,
    "layers.0.downsample.reduction.weight": 2,
    "layers.0.downsample.norm.weight": 2,
    "layers.1.blocks.0.mlp.fc1.weight": 3,
    "layers.1.blocks.1.norm2.bias": 4,
    "layers.1.downsample.reduction.weight": 4,
    "layers.2.blocks.0.attn.cpb_mlp.0.weight": 5,
    "layers.2.blocks.5.attn.proj.bias": 10,
    "layers.2.downsample.norm.bias": 10,
    "layers.3.blocks.0.attn.q_bias": 11,
    "layers.3.blocks.1.mlp.fc2.weight": 12,
    "norm.weight": 13,
    "head.weight": 13,
    "head.bias": 13,
}
# parameter tensors per id: a block has 17 (logit_scale, q/v bias, cpb_mlp 0.w/0.b/2.w, qkv.w, proj w/b,
# norm1, norm2, fc1, fc2 w/b), a downsample 3 (reduction.w, norm w/b), the stem 4, norm + head 4
TINY_COUNTS = {0: 4, 1: 17, 2: 20, 3: 17, 4: 20, 5: 17, 6: 17, 7: 17, 8: 17, 9: 17, 10: 20, 11: 17, 12: 17, 13: 4}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return swinv2.create_model("tiny", img_size=64, window_size=4, num_classes=10)


def _ids_by_param(groups):
    return {id(p): (g["layer_id"], g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}


def test_tiny_layer_ids_and_scales_follow_the_official_rule(tiny):
    groups = param_groups(tiny, 0.05, DECAY)
    got = _ids_by_param(groups)
    named = dict(tiny.named_parameters())
    for name, want in TINY_IDS.items():
        lid, scale, _ = got[id(named[name])]
        assert lid == want, name
        assert scale == pytest.approx(DECAY ** (13 - want), rel=1e-12), name
    counts = {}
    for lid, _, _ in got.values():
        counts[lid] = counts.get(lid, 0) + 1
    assert counts == TINY_COUNTS
    assert len(got) == len(named) == sum(TINY_COUNTS.values())
    assert [g["lr_scale"] for g in groups if g["layer_id"] == 13] == [1.0] * 2  # the head trains at the schedule's LR
    assert [g["layer_id"] for g in groups] == sorted(g["layer_id"] for g in groups)


def test_layer_decay_keeps_the_weight_decay_exclusions(tiny):
    groups = param_groups(tiny, 0.05, DECAY)
    got = _ids_by_param(groups)
    for name, p in tiny.named_parameters():
        excluded = (p.ndim <= 1 or name.endswith(".bias")
                    or any(k in name for k in ("cpb_mlp", "logit_scale", "relative_position_bias_table")))
        assert got[id(p)][2] == (0.0 if excluded else 0.05), name
    # each id is split in (at most) one decay and one no_decay group
    keys = [(g["layer_id"], g["weight_decay"]) for g in groups]
    assert len(keys) == len(set(keys)) and all(g["params"] for g in groups)
    assert {lid for lid, wd in keys if wd == 0.05} == set(range(14))  # every id has 2-D weights


def test_layer_decay_one_is_todays_two_groups(tiny):
    decay, no_decay = param_groups(tiny, 0.05, 1.0)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert decay["lr_scale"] == no_decay["lr_scale"] == 1.0
    want_decay = [p for n, p in tiny.named_parameters() if not swinv2.no_weight_decay(n, p)]
    want_rest = [p for n, p in tiny.named_parameters() if swinv2.no_weight_decay(n, p)]
    assert [id(p) for p in decay["params"]] == [id(p) for p in want_decay]
    assert [id(p) for p in no_decay["params"]] == [id(p) for p in want_rest]
    assert param_groups(tiny, 0.05)[0]["params"] == decay["params"]  # the default is off


class _Wrapped(torch.nn.Module):
    """SimMIM-like: a backbone under `encoder.` with a mask token, plus a decoder."""

    def __init__(self, backbone):
        super().__init__()
        self.encoder = backbone
        self.encoder.mask_token = torch.nn.Parameter(torch.zeros(1, 1, 96))
        self.decoder = torch.nn.Conv2d(768, 48, 1)


def test_backbone_prefix_mask_token_and_decoder():
    torch.manual_seed(0)
    model = _Wrapped(swinv2.create_model("tiny", img_size=64, window_size=4, num_classes=0))
    got = _ids_by_param(param_groups(model, 0.05, DECAY, depths=(2, 2, 6, 2), backbone_prefix="encoder."))
    named = dict(model.named_parameters())
    assert got[id(named["encoder.mask_token"])] == (0, pytest.approx(DECAY ** 13), 0.0)  # id 0, no weight decay
    assert got[id(named["encoder.layers.2.blocks.3.attn.qkv.weight"])][:2] == (8, pytest.approx(DECAY ** 5))
    assert got[id(named["decoder.weight"])] == (13, 1.0, 0.05)
    assert got[id(named["decoder.bias"])] == (13, 1.0, 0.0)


def test_layer_decay_out_of_range_names_the_key(tiny):
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="layer_decay"):
            param_groups(tiny, 0.05, bad)
    with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["optim.layer_decay=1.2"])
    with pytest.raises(C.ConfigError, match=r"optim\.layer_decay"):
        C.validate(cfg, world_size=1)


@pytest.mark.slow
def test_training_run_applies_the_per_group_lrs(tmp_path):
    """A real run through the trainer (DeepSpeed ZeRO-1 on CPU): the log names every id's scale and the
    optimizer state of the step-2 checkpoint holds LR x lr_scale in every group."""
    from test_train import TINY, train

    run = tmp_path / "run"
    p = train([*TINY, "optim.layer_decay=0.87", "train.max_steps=2", "train.ckpt_every=2", "train.eval_every=100",
               f"run.dir={run}"], cwd=tmp_path)
    out = p.stdout + p.stderr
    # TINY has depths [1,1,1,1]: L = 4, ids 0..5
    line = re.search(r"optimizer groups: .*layer_decay 0\.87, layer id:lr_scale\(tensors\) (.*)", out)
    assert line, out[-3000:]
    logged = dict(re.findall(r"(\d+):([0-9.e-]+)\(\d+\)", line.group(1)))
    assert {int(k): float(v) for k, v in logged.items()} == {k: pytest.approx(0.87 ** (5 - k), rel=1e-3)
                                                              for k in range(6)}
    states = glob.glob(str(run / "checkpoints" / "*" / "*optim_states.pt")) or glob.glob(str(run / "**" / "*optim_states.pt"), recursive=True)
    assert states, list(run.rglob("*"))
    sd = torch.load(states[0], map_location="cpu", weights_only=False)
    base = sd["optimizer_state_dict"]["base_optimizer_state"]
    pgs = base["param_groups"] if isinstance(base, dict) else base[0]["param_groups"]
    head_lr = max(g["lr"] for g in pgs)
    assert head_lr > 0
    for g in pgs:
        assert g["lr"] == pytest.approx(head_lr * 0.87 ** (5 - g["layer_id"]), rel=1e-9)
    assert len({g["layer_id"] for g in pgs}) == 6
