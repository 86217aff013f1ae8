"""FLOPs against the published numbers; amplitude probes and logit scales against direct computation."""
import math

import pytest
import torch

from swinv2 import (SwinV2Config, apply_activation_checkpointing, create_model, flops, iter_blocks)
from swinv2.probes import AmplitudeProbe, logit_scales


# --------------------------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("variant,img,win,num_classes,gflops", [
    ("tiny", 256, 8, 1000, 5.93),
    ("tiny", 256, 16, 1000, 6.61),
    ("small", 256, 8, 1000, 11.51),
    ("base", 256, 8, 1000, 20.29),
    ("base", 256, 16, 1000, 21.80),
    ("large", 256, 16, 1000, 47.49),
    ("base", 384, 24, 1000, 54.75),
    ("large", 384, 24, 1000, 115.42),
    # the 192/W12 figures are those of the 22K pre-training configs, i.e. with the 21,841-class head
    ("base", 192, 12, 21841, 11.78),
    ("large", 192, 12, 21841, 26.00),
])
def test_flops_match_published(variant, img, win, num_classes, gflops):
    cfg = SwinV2Config.from_variant(variant, img_size=img, window_size=win, num_classes=num_classes)
    assert flops(cfg) / 1e9 == pytest.approx(gflops, abs=0.005 + 1e-9)


@pytest.mark.parametrize("variant,gflops", [("huge", 85.7), ("giant", 370.7)])
def test_flops_huge_giant_192(variant, gflops):
    # the reference gives these to one decimal (85.7 may be truncated: we get 85.75), so 0.1%
    cfg = SwinV2Config.from_variant(variant, img_size=192, window_size=12)
    assert flops(cfg) / 1e9 == pytest.approx(gflops, rel=1e-3)


def test_flops_accepts_model_and_img_size_override():
    with torch.device("meta"):
        model = create_model("tiny", img_size=256, window_size=8)
    assert flops(model) == flops(model.config)
    assert flops(model, img_size=256) == flops(model.config)
    # same window at a different resolution == a config built for that resolution
    assert flops(model, img_size=512) == flops(SwinV2Config(img_size=512, window_size=8))
    assert flops(model, img_size=512) > 3.5 * flops(model)
    with pytest.raises(ValueError, match="img_size"):
        flops(model, img_size=250)
    with pytest.raises(TypeError):
        flops("tiny")


def test_flops_scale_with_head_dim_terms():
    # hand count of one term: doubling num_classes adds exactly num_features * num_classes
    a = SwinV2Config(num_classes=1000)
    b = SwinV2Config(num_classes=2000)
    assert flops(b) - flops(a) == 768 * 1000


# --------------------------------------------------------------------------------------------- probes
SMALL = dict(img_size=64, window_size=4, drop_path_rate=0.0, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))


def _nontrivial_model(**kw):
    torch.manual_seed(0)
    m = create_model("tiny", **{**SMALL, **kw})
    with torch.no_grad():  # make blocks non-identity so per-block stats differ
        for n, p in m.named_parameters():
            if "norm" in n and n.endswith("weight"):
                p.fill_(0.5)
    return m.eval()


def _manual_block_outputs(model, x):
    """Run the trunk by hand (class forwards, no hooks) and collect every block's output."""
    outs = []
    with torch.no_grad():
        t = type(model.patch_embed).forward(model.patch_embed, x)
        for layer in model.layers:
            for blk in layer.blocks:
                t = type(blk).forward(blk, t)
                outs.append(t.clone())
            if layer.downsample is not None:
                t = layer.downsample(t)
    return outs


def test_amplitude_probe_matches_direct_computation():
    model = _nontrivial_model()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2
    expected = _manual_block_outputs(model, x)
    with torch.no_grad():
        plain = model(x)
    with AmplitudeProbe(model) as probe:
        with torch.no_grad():
            probed = model(x)
        stats = probe.stats()
    assert torch.equal(probed, plain)  # probes do not change the model
    assert sorted(stats) == list(range(8)) and len(expected) == 8
    for i, out in enumerate(expected):
        a = out.abs().double()
        assert stats[i]["mean_abs"] == pytest.approx(a.mean().item(), rel=1e-5)
        assert stats[i]["rms"] == pytest.approx(a.square().mean().sqrt().item(), rel=1e-5)
        assert stats[i]["max"] == pytest.approx(a.max().item(), rel=1e-6)
    assert len({round(s["rms"], 6) for s in stats.values()}) > 5  # the blocks really differ
    # removed on exit: a new forward is not recorded
    probe.clear()
    model(x)
    assert probe.stats() == {}


def test_amplitude_probe_hand_built_constant_input():
    # A block whose branches output zero (res-post init) passes its input through; feed the first
    # block a constant token map and the stats are known in closed form.
    torch.manual_seed(0)
    model = create_model("tiny", img_size=64, window_size=4)
    blk = model.layers[0].blocks[0]
    probe = AmplitudeProbe(model).attach()
    tokens = torch.full((1, 256, 96), -3.0)
    tokens[0, 0, 0] = 5.0
    blk(tokens)
    s = probe.stats()[0]
    n = 256 * 96
    assert s["max"] == 5.0
    assert s["mean_abs"] == pytest.approx((3.0 * (n - 1) + 5.0) / n, rel=1e-6)
    assert s["rms"] == pytest.approx(math.sqrt((9.0 * (n - 1) + 25.0) / n), rel=1e-6)
    probe.remove()
    assert not probe.attached


def test_amplitude_probe_with_activation_checkpointing():
    model = _nontrivial_model(attention="sequential", sequential_chunk=3).train()
    x = torch.randn(1, 3, 64, 64)
    with AmplitudeProbe(model) as probe:
        model(x).sum().backward()
        plain_stats = probe.stats()
    apply_activation_checkpointing(model)
    counts = {}
    model.layers[0].blocks[0].register_forward_hook(lambda *a: counts.update(n=counts.get("n", 0) + 1))
    model.zero_grad()
    with AmplitudeProbe(model) as probe:
        model(x).sum().backward()  # backward recomputes the blocks; hooks must not fire again
        ckpt_stats = probe.stats()
    assert counts["n"] == 1
    assert ckpt_stats.keys() == plain_stats.keys()
    for i in plain_stats:
        assert ckpt_stats[i] == pytest.approx(plain_stats[i], rel=1e-6)


def test_logit_scales():
    model = create_model("tiny", img_size=64, window_size=4)
    scales = logit_scales(model)
    assert sorted(scales) == list(range(12))
    assert scales[0] == pytest.approx([10.0] * 3) and len(scales[11]) == 24  # init ln(10) -> tau = 0.1
    blk = model.layers[1].blocks[0]
    with torch.no_grad():
        blk.attn.logit_scale[0] = math.log(500.0)  # clamped at ln(100)
        blk.attn.logit_scale[1] = math.log(2.0)
    assert logit_scales(model)[2][:2] == pytest.approx([100.0, 2.0])
    dot = create_model("tiny", img_size=64, window_size=4, attn_type="dot")
    assert logit_scales(dot) == {}
